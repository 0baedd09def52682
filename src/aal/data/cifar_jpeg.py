"""CIFAR-10 from a zip of JPEG files (one folder per class), decoded once and cached.

Some CIFAR-10 copies are distributed not as the official python batches but as image files:
``<top>/{train,test}/<class>/<name>.jpg`` inside one zip (e.g. ``CIFAR-10-images/train/cat/0001.jpg``,
a public re-encoding at JPEG quality 75). :func:`read_cifar_image_zip` reads such a zip:

* **Labels**: the class folders' names in alphabetical order (for CIFAR-10 this is the
  official label order, ``airplane`` = 0 ... ``truck`` = 9); train and test must name the same
  classes.
* **Order**: within a split, the classes are *interleaved*: the k-th file (by name) of every class,
  in label order, then the (k+1)-th, and so on (``0 1 2 ... 9 0 1 2 ...`` for CIFAR-10). A zip
  stores the images by class, so in file order "the first n test images" (per-epoch evaluation,
  ``eval.n``, the suite on n images) would all be airplanes; interleaved, every prefix is balanced
  over the classes (within one image per class). The official python batches' order is not
  recoverable from such a zip. A given zip always gives the same tensors.
* **Decoding** (Pillow, already a dependency through matplotlib) happens once; the uint8 arrays
  are cached in ``<cache_dir>/<zip stem>-<sha256 prefix>.npz``, so a changed zip is never served
  from a stale cache. ``cache_dir``: the argument, else ``$AAL_CACHE_DIR``, else
  ``~/.cache/aal/decoded``. An unreadable cache file is rebuilt.
* **What the pixels are**: JPEG changes pixel values, so results on such a zip are not results on
  the official files. The JPEG quality is read from the first image's quantisation table (the
  IJG scaling of the standard table) and the dataset's ``source`` says, e.g.,
  ``"CIFAR-10 (JPEG-q75 re-encoding)"``; every results.json carries it.
* **Hostile input**: member names must be relative paths without ``..``; a member larger than
  :data:`MAX_MEMBER_BYTES` or an image that is not ``size`` pixels (checked from the header,
  before decoding) is refused with a :class:`~aal.data.base.DataError` naming the zip and the entry.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from aal.data.base import DataError, Split

#: Environment variable naming the folder of decoded-dataset caches.
ENV_CACHE_DIR = "AAL_CACHE_DIR"
#: Largest accepted zip member: a 32x32 JPEG is 1-3 KB; anything this large is not one.
MAX_MEMBER_BYTES = 1 << 20
_ENTRY = re.compile(r"^(?:.+/)?(train|test)/([^/]+)/([^/]+\.(?:jpe?g|png))$", re.IGNORECASE)
# IJG's standard luminance quantisation table (natural order), scaled by quality in libjpeg
_IJG_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip


def default_cache_dir() -> Path:
    """``$AAL_CACHE_DIR`` if set, else ``~/.cache/aal/decoded``."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "aal" / "decoded"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def jpeg_quality(quantization: dict[int, list[int]] | None) -> int | None:
    """The IJG quality (1-100) whose scaled standard table equals the luminance table, else None."""
    if not quantization or 0 not in quantization:
        return None
    table = list(quantization[0])
    for q in range(1, 101):
        scale = 5000 // q if q < 50 else 200 - 2 * q
        ref = [min(max((v * scale + 50) // 100, 1), 255) for v in _IJG_LUMA]
        if table == ref:
            return q
    return None


def _entries(zf: zipfile.ZipFile, path: Path) -> dict[str, list[tuple[str, zipfile.ZipInfo]]]:
    """``{"train"|"test": [(class, info), ...]}`` sorted by (class, name); names validated."""
    splits: dict[str, list[tuple[str, str, zipfile.ZipInfo]]] = {"train": [], "test": []}
    for info in zf.infolist():
        name = info.filename
        if info.is_dir():
            continue
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or "\\" in name or re.match(r"^[A-Za-z]:", name):
            raise DataError(f"{path}: refusing zip member {name[:200]!r} (absolute path or '..')")
        m = _ENTRY.match(name)
        if m is None:
            continue  # README files, licences, ...
        if info.file_size > MAX_MEMBER_BYTES:
            raise DataError(
                f"{path}: member {name[:200]!r} declares {info.file_size} bytes (limit {MAX_MEMBER_BYTES}); "
                "not a small image"
            )
        split, cls, fname = m.group(1).lower(), m.group(2), m.group(3)
        splits[split].append((cls, fname, info))
    return {k: [(c, i) for c, _, i in sorted(v, key=lambda t: (t[0], t[1]))] for k, v in splits.items()}


def _decode(zf: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo, size: tuple[int, int]) -> tuple[np.ndarray, int | None]:
    from PIL import Image, UnidentifiedImageError

    with zf.open(info) as f:
        data = f.read(MAX_MEMBER_BYTES + 1)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (size[1], size[0]):  # checked from the header, before decoding
                raise DataError(f"{path}: {info.filename}: image is {im.size[0]}x{im.size[1]}, expected {size[1]}x{size[0]}")
            quality = jpeg_quality(getattr(im, "quantization", None))
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: {info.filename}: cannot decode the image ({type(e).__name__}: {e})") from e
    return arr.transpose(2, 0, 1), quality


def _decode_zip(path: Path, size: tuple[int, int]) -> dict[str, np.ndarray]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip file ({e})") from e
    with zf:
        entries = _entries(zf, path)
        classes = sorted({c for c, _ in entries["train"]})
        if not classes or sorted({c for c, _ in entries["test"]}) != classes:
            raise DataError(
                f"{path}: expected <top>/train/<class>/*.jpg and <top>/test/<class>/*.jpg with the same class "
                f"folders; found train classes {classes} and test classes {sorted({c for c, _ in entries['test']})}"
            )
        index = {c: i for i, c in enumerate(classes)}
        out: dict[str, np.ndarray] = {"classes": np.array(classes)}
        qualities = set()
        for split, items in entries.items():
            images = np.empty((len(items), 3, *size), dtype=np.uint8)
            for i, (_, info) in enumerate(items):
                images[i], q = _decode(zf, path, info, size)
                qualities.add(q)
            out[f"{split}_images"] = images
            out[f"{split}_labels"] = np.array([index[c] for c, _ in items], dtype=np.int64)
        out["jpeg_quality"] = np.array(qualities.pop() if len(qualities) == 1 and None not in qualities else -1)
    return out


def _interleaved(images: np.ndarray, labels: np.ndarray) -> Split:
    """The split with its classes interleaved (see the module doc): order by (rank within class, label)."""
    labels_t = torch.from_numpy(labels)
    rank = torch.empty_like(labels_t)
    for c in labels_t.unique():
        where = (labels_t == c).nonzero().squeeze(1)  # already in file-name order within the class
        rank[where] = torch.arange(len(where))
    order = torch.from_numpy(np.lexsort((labels, rank.numpy())))
    return Split(torch.from_numpy(images)[order], labels_t[order])


def _load_cache(cache: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # missing or damaged: decode again


def read_cifar_image_zip(
    path: str | os.PathLike, size: tuple[int, int] = (32, 32), cache_dir: str | os.PathLike | None = None
) -> tuple[tuple[str, ...], Split, Split, int | None]:
    """Read a ``{train,test}/<class>/*.jpg`` zip: ``(classes, train, test, jpeg_quality)``.

    Args:
        path: the zip file.
        size: expected ``(H, W)`` of every image.
        cache_dir: where the decoded arrays are cached (see the module doc).

    Returns:
        class names (sorted; label ``i`` is ``classes[i]``), the train and test splits (uint8
        ``(N,3,H,W)``, int64 labels) and the JPEG quality common to all images (None if they
        differ or cannot be told).

    Raises:
        DataError: not a zip, a bad or oversized member, an image of the wrong size, or a
            layout without matching train/test class folders (the message names the entry).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    digest = sha256_file(path)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"{path.stem}-{digest[:20]}.npz"
    arrays = _load_cache(cache_file) if cache_file.is_file() else None
    if arrays is None:
        arrays = _decode_zip(path, size)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp-{os.getpid()}.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, cache_file)  # atomic: a reader never sees half a cache file
        except OSError:
            pass  # an unwritable cache only costs the next call another decode
    q = int(arrays["jpeg_quality"])
    train, test = (_interleaved(arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in ("train", "test"))
    return tuple(str(c) for c in arrays["classes"]), train, test, (q if q > 0 else None)


__all__ = ["ENV_CACHE_DIR", "MAX_MEMBER_BYTES", "default_cache_dir", "jpeg_quality", "read_cifar_image_zip"]
