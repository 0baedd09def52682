"""Limits for reading untrusted dataset files: sizes, pixel counts, archive member names.

Dataset files come from the internet or from other people's folders; a hostile (or just broken)
file must end in a :class:`~aal.data.DataError` naming it, not in gigabytes of memory or a file
read outside the dataset folder. The limits are far above what the supported datasets need
(Omniglot PNGs are ~1 KB of 105x105 pixels, BCCD JPEGs 640x480, MNIST's largest file 47 MB):

* :data:`MAX_MEMBER_BYTES` / :data:`MAX_ARCHIVE_BYTES`: the declared uncompressed size of one
  zip member / of all members read from one archive, checked *before* reading (a zip bomb
  declares its size honestly, or :mod:`zipfile` stops at the declared size); members are read
  with a bounded read as well.
* :data:`MAX_COMPRESSION_RATIO`: declared size over compressed size of a member (deflate's
  ceiling is ~1032; images are already compressed, ratio ~1). Small members are exempt.
* :data:`MAX_IMAGE_PIXELS`: width x height from the image header, checked *before* decoding
  (``PIL.Image.open`` reads the header only); Pillow's own ``DecompressionBombError`` (2x its
  89 M-pixel ``Image.MAX_IMAGE_PIXELS``) is mapped to the same error.
* member and file names used as paths or class names must be relative, without ``..``,
  backslashes, drive letters or NUL (:func:`check_relative_name`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from aal.data.base import DataError

#: Largest declared uncompressed size of one archive member read (bytes).
MAX_MEMBER_BYTES = 64 << 20
#: Largest total declared uncompressed size of the members read from one archive (bytes).
MAX_ARCHIVE_BYTES = 2 << 30
#: Largest declared/compressed size ratio of a member bigger than :data:`RATIO_EXEMPT_BYTES`.
MAX_COMPRESSION_RATIO = 200
#: Members up to this size skip the ratio check (a tiny text file may compress 1000:1).
RATIO_EXEMPT_BYTES = 1 << 20
#: Largest image file read (bytes).
MAX_IMAGE_FILE_BYTES = 256 << 20
#: Largest image (width x height) decoded: 64 M pixels (8192 x 8192), 192 MB as RGB.
MAX_IMAGE_PIXELS = 1 << 26

_DRIVE = re.compile(r"^[A-Za-z]:")


def check_relative_name(name: str, where: str) -> str:
    """``name`` if it is a safe relative POSIX path, else :class:`DataError`.

    Refused: empty names, absolute paths, ``..`` components, backslashes, drive letters
    (``C:``) and NUL bytes: any of them could name a file outside the folder (or archive
    root) it is joined to, or a class name that means something else on another system.

    Example:
        >>> check_relative_name("Greek/character01/0394_01.png", "x.zip")
        'Greek/character01/0394_01.png'
        >>> check_relative_name("../evil.png", "x.zip")
        Traceback (most recent call last):
        ...
        aal.data.base.DataError: x.zip: unsafe member name '../evil.png' (absolute, '..', backslash or drive letter)
    """
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or _DRIVE.match(name)
        or ".." in parts
    ):
        shown = name if len(name) <= 120 else name[:57] + " ... " + name[-58:]
        raise DataError(f"{where}: unsafe member name {shown!r} (absolute, '..', backslash or drive letter)")
    return name


def _check_member(info: zipfile.ZipInfo, where: str) -> None:
    if info.file_size > MAX_MEMBER_BYTES:
        raise DataError(
            f"{where}:{info.filename}: declares {info.file_size} bytes uncompressed, over the "
            f"{MAX_MEMBER_BYTES} byte limit per member (a zip bomb?)"
        )
    if info.file_size > RATIO_EXEMPT_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise DataError(
            f"{where}:{info.filename}: compression ratio {info.file_size / max(info.compress_size, 1):.0f}:1 "
            f"is over the {MAX_COMPRESSION_RATIO}:1 limit (a zip bomb?)"
        )


class SafeZip:
    """A read-only zip archive whose member names and sizes are checked before use.

    Every member name is validated on opening (:func:`check_relative_name`); :meth:`read`
    checks the member's declared size and compression ratio and the running total against the
    limits above before reading, then reads at most the declared size.

    Args:
        path: the archive.

    Raises:
        DataError: not a readable zip, or an unsafe member name (naming the archive and member).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise DataError(f"{self.path}: not a readable zip archive ({err}); re-download it") from err
        try:
            for name in self._zf.namelist():
                check_relative_name(name, str(self.path))
        except DataError:
            self._zf.close()
            raise
        self._read_total = 0

    def namelist(self) -> list[str]:
        """The member names (all validated)."""
        return self._zf.namelist()

    def read(self, name: str) -> bytes:
        """The bytes of member ``name``, within the limits."""
        try:
            info = self._zf.getinfo(name)
        except KeyError:
            raise DataError(f"{self.path}: no member {name!r}") from None
        _check_member(info, str(self.path))
        if self._read_total + info.file_size > MAX_ARCHIVE_BYTES:
            raise DataError(
                f"{self.path}: members declare more than {MAX_ARCHIVE_BYTES} bytes uncompressed in all (a zip bomb?)"
            )
        try:
            with self._zf.open(info) as f:
                data = f.read(info.file_size + 1)  # zipfile stops at the declared size; +1 detects a lie
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
            raise DataError(f"{self.path}:{name}: cannot read the member ({err})") from err
        if len(data) != info.file_size:
            raise DataError(f"{self.path}:{name}: holds {len(data)} bytes, its header declares {info.file_size}")
        self._read_total += info.file_size
        return data

    def close(self) -> None:
        self._zf.close()

    def __enter__(self) -> "SafeZip":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_file_bounded(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Devices, FIFOs and directories are refused before opening (``/dev/zero`` would never end,
    a FIFO would block); the read itself is bounded too, in case the file grows.

    Raises:
        DataError: missing, not a regular file, larger than ``limit``, or unreadable.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(f"{p}: {what} not found") from None
    except OSError as err:
        raise DataError(f"{p}: cannot read the {what} ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{p}: not a regular file (a device, FIFO or folder); expected a {what}")
    if st.st_size > limit:
        raise DataError(f"{p}: {st.st_size} bytes, over the {limit} byte limit for a {what}")
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise DataError(f"{p}: cannot read the {what} ({err.strerror or err})") from None
    if len(data) > limit:
        raise DataError(f"{p}: over the {limit} byte limit for a {what}")
    return data


@contextlib.contextmanager
def open_image(data: bytes, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator["object"]:
    """A ``PIL.Image`` of encoded ``data``, its size checked before any pixel is decoded.

    Errors raised while the ``with`` body decodes or converts the image are mapped to
    :class:`DataError` too.

    Args:
        data: the encoded file (PNG, JPEG, ...).
        where: what to name in errors (the file, or ``archive:member``).
        max_pixels: largest width x height accepted.

    Raises:
        DataError: not an image, too many pixels (from the header), a decompression bomb by
            Pillow's own check, or a decoding error.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as err:  # pragma: no cover - Pillow is a dependency of matplotlib
        raise DataError("reading image files needs Pillow: pip install pillow") from err
    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise DataError(f"{where}: image of {w}x{h} pixels is over the {max_pixels} pixel limit (a decompression bomb?)")
            yield im
    except Image.DecompressionBombError as err:
        raise DataError(f"{where}: {err}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        raise DataError(f"{where}: cannot decode image ({err})") from err


__all__ = [
    "MAX_ARCHIVE_BYTES",
    "MAX_COMPRESSION_RATIO",
    "MAX_IMAGE_FILE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_MEMBER_BYTES",
    "SafeZip",
    "check_relative_name",
    "open_image",
    "read_file_bounded",
]
