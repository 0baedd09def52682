"""Optional downloads of the official dataset files, verified by their published MD5.

Nothing here runs unless a loader is called with ``download=True``. Without network every
function raises :class:`~aal.data.DataError` naming the files and the directory to put them in.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from aal.data.base import DataError

_CHUNK = 1 << 20
_TIMEOUT_S = 30


@dataclass(frozen=True)
class Resource:
    """One official file: its name, MD5 and mirror URLs (tried in order)."""

    filename: str
    md5: str
    urls: tuple[str, ...]


def md5_file(path: str | os.PathLike) -> str:
    """Hex MD5 of a file (the official checksums are MD5: integrity, not security)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(resource: Resource, directory: str | os.PathLike) -> Path:
    """Download ``resource`` into ``directory`` and check its MD5.

    The file is written to a temporary name and renamed only once its checksum matches, so
    an interrupted download never leaves a file that looks complete.

    Args:
        resource: what to fetch.
        directory: destination (created if needed).

    Returns:
        The path of the verified file.

    Raises:
        DataError: every mirror failed (no network, HTTP error) or the checksum did not match.
    """
    directory = Path(directory)
    dest = directory / resource.filename
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create download directory {directory}: {e}") from e
    errors = []
    for url in resource.urls:
        try:
            fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{resource.filename}.", suffix=".part")
        except OSError as e:
            raise DataError(f"cannot write to download directory {directory}: {e}") from e
        tmp = Path(tmp_name)
        try:
            digest = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out, urlopen(url, timeout=_TIMEOUT_S) as response:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != resource.md5:
                errors.append(f"{url}: MD5 {digest.hexdigest()} != expected {resource.md5}")
                continue
            os.replace(tmp, dest)
            return dest
        except (URLError, OSError, ValueError) as e:  # ValueError: malformed URL
            errors.append(f"{url}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(
        f"could not download {resource.filename} (MD5 {resource.md5}):\n  "
        + "\n  ".join(errors)
        + f"\nWithout network, download the file elsewhere and put it in {directory}/."
    )


def download_and_extract(resource: Resource, directory: str | os.PathLike) -> Path:
    """Download a ``.tar.gz`` archive into ``directory``, check its MD5 and extract it there.

    Returns:
        ``directory``. The archive is kept next to the extracted files.

    Raises:
        DataError: download failed, checksum mismatch, or a corrupt archive.
    """
    directory = Path(directory)
    archive = directory / resource.filename
    if not (archive.is_file() and md5_file(archive) == resource.md5):
        archive = download_file(resource, directory)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # the "data" filter refuses absolute paths, links outside the directory, devices
            tar.extractall(directory, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot extract {archive}: {e}") from e
    return directory
