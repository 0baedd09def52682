"""MNIST and Fashion-MNIST from the official IDX files (LeCun et al.; Xiao et al. 2017).

IDX format: a 4-byte magic number ``0x00 0x00 <dtype> <ndim>``, then ``ndim`` big-endian
uint32 dimensions, then the values in C order. Images are ``0x00000803`` (uint8, 3-d:
N x 28 x 28), labels ``0x00000801`` (uint8, 1-d: N). Files may be gzip'ed (the official
``*.gz``) or not; gzip is recognised by its magic bytes, not by the file name.

Where the files are looked for (first directory holding all four wins):

* ``root`` and ``root/raw``, ``root/MNIST/raw`` (torchvision's layout) etc. when ``root`` is given;
* otherwise ``$AAL_DATA/<name>`` and ``$AAL_DATA`` (if set, else ``~/.cache/aal/data/<name>``,
  where ``download=True`` puts files), then, for Fashion-MNIST only,
  ``/usr/share/datasets/fashion-mnist/`` (Debian package ``dataset-fashion-mnist``).
  MNIST has no default directory.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from aal.data.base import (
    DATASETS,
    ENV_DATA_DIR,
    DataError,
    DatasetInfo,
    Split,
    candidate_dirs,
    download_dir,
)
from aal.data.download import Resource, download_file
from aal.data.limits import read_file_bounded

#: Largest IDX file read (bytes; MNIST's largest is 47 MB raw, 9.9 MB gzip'ed).
MAX_IDX_FILE_BYTES = 1 << 30
#: Largest data size an IDX header may declare (bytes), checked before the data is read.
MAX_IDX_BYTES = 1 << 30

# IDX type byte -> numpy dtype (big-endian where it matters)
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FMNIST_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# MD5 of the official .gz files (as published by the datasets' authors and used by torchvision).
# Only downloads are checked against them: re-packed copies (e.g. Debian's, whose gzip headers
# differ) hold the same data under other checksums, and are validated structurally instead.
_MNIST_MD5 = {
    "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
    "test_images": "9fb629c4189551a2d022fa330f9573f3",
    "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FMNIST_MD5 = {
    "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
    "test_images": "bef4ecab320f06d8554ea6380940ec79",
    "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
}


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip'ed or raw) into a numpy array.

    Args:
        path: the file.
        expected_ndim: if given, the number of dimensions the header must declare
            (3 for image files, 1 for label files).

    Returns:
        A writable, native-byte-order array with the shape from the header
        (e.g. uint8 ``(60000, 28, 28)``).

    Raises:
        DataError: missing file, truncated/corrupt gzip, bad magic number, a data size that
            does not match the header, or a header declaring more than :data:`MAX_IDX_BYTES`
            (products of dimensions are exact: no overflow). The message names the file.

    Example:
        >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz", 1).shape  # doctest: +SKIP
        (10000,)
    """
    path = Path(path)
    raw = read_file_bounded(path, MAX_IDX_FILE_BYTES, "IDX file")
    gz = raw[:2] == b"\x1f\x8b"
    # gzip is decompressed as a stream, only as far as the header says: a small .gz can expand
    # to gigabytes, and the size is known (and checked) before the data is read
    stream = gzip.GzipFile(fileobj=io.BytesIO(raw)) if gz else io.BytesIO(raw)
    try:
        return _parse_idx(stream, path, expected_ndim, None if gz else len(raw))
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt or truncated gzip file ({e}); re-download it") from e


def _parse_idx(stream: io.BufferedIOBase, path: Path, expected_ndim: int | None, file_size: int | None) -> np.ndarray:
    """The array of an IDX byte stream (see :func:`read_idx`); ``file_size`` for raw files."""
    expected_magic = "0x0000080{}".format(expected_ndim if expected_ndim is not None else "N")
    magic = stream.read(4)
    if len(magic) < 4:
        raise DataError(f"{path}: {len(magic)} bytes, too short for an IDX header (magic {expected_magic})")
    zero, type_code, ndim = struct.unpack(">HBB", magic)
    if zero != 0 or type_code not in _IDX_DTYPES:
        raise DataError(
            f"{path}: bad magic number 0x{magic.hex()} (expected an IDX file, magic {expected_magic}: "
            "0x08 = uint8 data). Is this the right file, or an HTML error page saved under its name?"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(
            f"{path}: magic number 0x{magic.hex()} declares a {ndim}-d array, expected {expected_ndim}-d "
            f"(magic {expected_magic}); images and labels files swapped?"
        )
    header = 4 + 4 * ndim
    dims_raw = stream.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DataError(f"{path}: truncated header ({4 + len(dims_raw)} bytes, need {header} for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", dims_raw)
    dtype = _IDX_DTYPES[type_code]
    want = math.prod(dims) * dtype.itemsize  # Python ints: no overflow (numpy's int64 product wraps)
    if want > MAX_IDX_BYTES:
        raise DataError(
            f"{path}: header declares shape {dims} of {dtype} = {want} bytes of data, over the "
            f"{MAX_IDX_BYTES} byte limit; not an MNIST-like file (corrupt header?)"
        )
    if file_size is not None and file_size - header != want:
        have = file_size - header
        raise DataError(
            f"{path}: header declares shape {dims} of {dtype} = {want} bytes of data, but the file "
            f"holds {have} ({'truncated' if have < want else 'trailing bytes'}); re-download it"
        )
    body = stream.read(want + 1)
    if len(body) != want:
        raise DataError(
            f"{path}: header declares shape {dims} of {dtype} = {want} bytes of data, but the file holds "
            f"{'only ' + str(len(body)) if len(body) < want else 'more'} (decompressed) "
            f"({'truncated' if len(body) < want else 'trailing bytes'}); re-download it"
        )
    arr = np.frombuffer(body, dtype=dtype).reshape(dims)
    # one copy: native byte order and writable (frombuffer on bytes is read-only)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _idx_split(images_path: Path, labels_path: Path, num_classes: int, size: tuple[int, int]) -> Split:
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.dtype != np.uint8 or tuple(images.shape[1:]) != size:
        raise DataError(
            f"{images_path}: expected uint8 images of {size[0]}x{size[1]}, got {images.dtype} {images.shape[1:]}"
        )
    if labels.dtype != np.uint8:
        raise DataError(f"{labels_path}: expected uint8 labels, got {labels.dtype}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range 0..{num_classes - 1}")
    return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def load_idx_dataset(
    info: DatasetInfo,
    root: str | os.PathLike | None,
    download: bool,
    *,
    subdirs: tuple[str, ...],
    default: str | None,
    urls: tuple[str, ...],
    md5: dict[str, str],
    how_to_get: str,
) -> tuple[DatasetInfo, Split, Split]:
    """Find (or download) the four IDX files of an MNIST-like dataset and read them."""
    dirs = candidate_dirs(root, info.name, subdirs, default)
    found: dict[str, Path] | None = None
    for d in dirs:
        paths = {k: _find_idx_file(d, stem) for k, stem in IDX_FILES.items()}
        if all(p is not None for p in paths.values()):
            found = paths  # type: ignore[assignment]
            break
    if found is None and download:
        target = download_dir(root, info.name)
        found = {}
        for key, stem in IDX_FILES.items():
            existing = _find_idx_file(target, stem)
            found[key] = existing or download_file(
                Resource(stem + ".gz", md5[key], tuple(u + stem + ".gz" for u in urls)), target
            )
    if found is None:
        missing = []
        for d in dirs:
            lacking = [s + "[.gz]" for s in IDX_FILES.values() if _find_idx_file(d, s) is None]
            missing.append(f"{d} (missing {', '.join(lacking)})")
        no_default = (
            f"{info.name} has no default directory: pass root=<dir> or set ${ENV_DATA_DIR}. "
            if root is None and default is None else ""
        )
        raise DataError(
            f"{no_default}{info.name}: IDX files not found. Expected all of "
            f"{', '.join(s + '.gz' for s in IDX_FILES.values())} (gzip'ed or not) in one directory; "
            f"looked in: {'; '.join(missing) or 'nowhere'}. {how_to_get}"
        )
    train = _idx_split(found["train_images"], found["train_labels"], info.num_classes, info.image_size)
    test = _idx_split(found["test_images"], found["test_labels"], info.num_classes, info.image_size)
    return info, train, test


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: str | os.PathLike | None = None, download: bool = False) -> tuple[DatasetInfo, Split, Split]:
    """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 grey-scale clothing images, 10 classes.

    Default directory ``/usr/share/datasets/fashion-mnist/`` (``apt-get install -y
    dataset-fashion-mnist``). See :func:`aal.data.load_data` for ``root`` and ``download``.
    """
    info = DatasetInfo(
        name="fashion_mnist", num_classes=10, in_channels=1, image_size=(28, 28),
        mean=(0.2860,), std=(0.3530,), classes=FASHION_MNIST_CLASSES,
    )
    return load_idx_dataset(
        info, root, download,
        subdirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "raw"),
        default=FASHION_MNIST_DIR, urls=_FMNIST_URLS, md5=_FMNIST_MD5,
        how_to_get=(
            f"To get them: `apt-get install -y dataset-fashion-mnist` (installs them in "
            f"{FASHION_MNIST_DIR}/), or download them from {_FMNIST_URLS[0]} into a directory "
            "and pass root=<dir>, or pass download=True."
        ),
    )


@DATASETS.register("mnist")
def mnist(root: str | os.PathLike | None = None, download: bool = False) -> tuple[DatasetInfo, Split, Split]:
    """MNIST (LeCun et al. 1998): 60k/10k 28x28 grey-scale handwritten digits, 10 classes.

    No default directory: pass ``root`` or set ``$AAL_DATA``. See :func:`aal.data.load_data`.
    """
    info = DatasetInfo(
        name="mnist", num_classes=10, in_channels=1, image_size=(28, 28),
        mean=(0.1307,), std=(0.3081,), classes=tuple(str(d) for d in range(10)),
    )
    return load_idx_dataset(
        info, root, download,
        subdirs=("mnist", "MNIST/raw", "raw"),
        default=None, urls=_MNIST_URLS, md5=_MNIST_MD5,
        how_to_get=(
            f"To get them: download them from {_MNIST_URLS[0]} into a directory and pass "
            "root=<dir>, or pass download=True."
        ),
    )
