"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official python-pickle batches.

Layouts (``root`` may be the folder itself or its parent):

* CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``;
  each batch is a dict with ``b"data"`` (uint8 ``(N, 3072)``: 1024 red, 1024 green, 1024 blue
  values, rows in order) and ``b"labels"`` (list of N ints); ``batches.meta`` has
  ``b"label_names"``.
* CIFAR-100: ``cifar-100-python/{train, test, meta}``; labels are ``b"fine_labels"`` (100
  classes; the 20 coarse super-classes are not used), names ``b"fine_label_names"`` in ``meta``.

The pickles were written by Python 2, so they are read with ``encoding="bytes"``. They are read
with an unpickler that only accepts numpy arrays, bytes and builtin containers: the official
files need nothing else, and a tampered file cannot run code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

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
from aal.data.cifar_jpeg import read_cifar_image_zip
from aal.data.download import Resource, download_and_extract

_CIFAR10 = {
    "folder": "cifar-10-batches-py",
    "train": ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
    "test": ("test_batch",),
    "meta": "batches.meta",
    "label_key": "labels",
    "names_key": "label_names",
    # a zip of JPEG files per class folder is read when the official batches are absent
    "image_zips": ("cifar10_jpeg.zip",),
    "pretty": "CIFAR-10",
    # the official archive and its MD5 (the per-file MD5s are those published with it)
    "archive": Resource(
        "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    ),
}
_CIFAR100 = {
    "folder": "cifar-100-python",
    "train": ("train",),
    "test": ("test",),
    "meta": "meta",
    "label_key": "fine_labels",
    "names_key": "fine_label_names",
    "image_zips": (),
    "pretty": "CIFAR-100",
    "archive": Resource(
        "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
    ),
}

_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Python 3 writes bytes as _codecs.encode(str, "latin1") under pickle protocol 2
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need."""

    def find_class(self, module: str, name: str) -> Any:
        # Python-2-era pickles name numpy.core, which numpy 2 renamed numpy._core
        canonical = module.replace("numpy.core", "numpy._core", 1) if module.startswith("numpy.core") else module
        if (canonical, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if canonical.startswith("numpy._core") and not hasattr(np, "_core"):  # numpy < 2
            canonical = canonical.replace("numpy._core", "numpy.core", 1)
        return super().find_class(canonical, name)


def read_cifar_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Read one official CIFAR pickle; keys are decoded to ``str``.

    Raises:
        DataError: missing, truncated or not a CIFAR pickle (the message names the file).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as e:
        raise DataError(f"CIFAR file not found: {path}") from e
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError,
            AttributeError, ImportError, IndexError, KeyError) as e:
        # unpickling garbage can raise almost anything; all of it means "not a valid batch"
        raise DataError(f"{path}: not a valid CIFAR python pickle ({type(e).__name__}: {e}); re-download it") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_batches(directory: Path, files: tuple[str, ...], label_key: str, num_classes: int) -> Split:
    images, labels = [], []
    for name in files:
        path = directory / name
        batch = read_cifar_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise DataError(
                f"{path}: expected keys b'data' and b'{label_key}', found {sorted(batch)} "
                "(a CIFAR-10 file given as CIFAR-100, or the other way round?)"
            )
        data = np.asarray(batch["data"])
        lab = np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: expected b'data' as uint8 (N, 3072), got {data.dtype} {data.shape}")
        if lab.shape != (data.shape[0],):
            raise DataError(f"{path}: {data.shape[0]} images but {lab.shape[0] if lab.ndim else 0} labels")
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise DataError(f"{path}: labels out of range 0..{num_classes - 1} (min {lab.min()}, max {lab.max()})")
        # rows are channel-major (R plane, G plane, B plane), so a plain reshape gives (N, C, H, W)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _has_all(directory: Path, spec: dict[str, Any]) -> bool:
    return all((directory / f).is_file() for f in (*spec["train"], *spec["test"], spec["meta"]))


def _find_image_zip(root: str | os.PathLike | None, dirs: list[Path], spec: dict[str, Any]) -> Path | None:
    """The image zip to read: ``root`` itself if it is a ``.zip`` file, else a known zip name in ``dirs``."""
    if root is not None and Path(root).expanduser().is_file() and str(root).lower().endswith(".zip"):
        return Path(root).expanduser()
    for d in dirs:
        for name in spec["image_zips"]:
            if (d / name).is_file():
                return d / name
    return None


def _load_image_zip(
    path: Path, info_name: str, spec: dict[str, Any], num_classes: int, mean: tuple[float, ...], std: tuple[float, ...],
) -> tuple[DatasetInfo, Split, Split]:
    classes, train, test, quality = read_cifar_image_zip(path)
    if len(classes) != num_classes:
        raise DataError(f"{path}: {len(classes)} class folders ({', '.join(classes)}), expected {num_classes}")
    what = f"JPEG-q{quality}" if quality is not None else "image-file"
    info = DatasetInfo(
        name=info_name, num_classes=num_classes, in_channels=3, image_size=(32, 32), mean=mean, std=std,
        classes=classes, source=f"{spec['pretty']} ({what} re-encoding)",
    )
    return info, train, test


def load_cifar(
    info_name: str, spec: dict[str, Any], num_classes: int, mean: tuple[float, ...], std: tuple[float, ...],
    root: str | os.PathLike | None, download: bool,
) -> tuple[DatasetInfo, Split, Split]:
    """Find (or download) a CIFAR folder and read its batches (or, for CIFAR-10, an image zip)."""
    expected = ", ".join((*spec["train"], *spec["test"], spec["meta"]))
    how_to_get = (
        f"Download {spec['archive'].urls[0]} (MD5 {spec['archive'].md5}), extract it "
        f"(`tar xzf {spec['archive'].filename}`) and pass root=<dir>/{spec['folder']} or its "
        "parent, or pass download=True."
    )
    dirs = candidate_dirs(root, info_name, (spec["folder"], info_name))
    found = next((d for d in dirs if _has_all(d, spec)), None)
    image_zip = _find_image_zip(root, dirs, spec) if found is None else None
    if image_zip is not None:
        return _load_image_zip(image_zip, info_name, spec, num_classes, mean, std)
    if found is None and download:
        target = download_dir(root, info_name)
        download_and_extract(spec["archive"], target)
        found = target / spec["folder"]
        if not _has_all(found, spec):
            raise DataError(
                f"{target / spec['archive'].filename} did not contain {spec['folder']}/{{{expected}}}"
            )
    if found is None:
        looked = []
        for d in dirs:
            lacking = [f for f in (*spec["train"], *spec["test"], spec["meta"]) if not (d / f).is_file()]
            hint = " (the archive is there: extract it)" if (d / spec["archive"].filename).is_file() else ""
            looked.append(f"{d} (missing {', '.join(lacking)}){hint}")
        no_default = (
            f"{info_name} has no default directory: pass root=<dir> or set ${ENV_DATA_DIR}. "
            if root is None else ""
        )
        zips = f" (or one of {', '.join(spec['image_zips'])}, a zip of <top>/{{train,test}}/<class>/*.jpg)" if spec[
            "image_zips"
        ] else ""
        raise DataError(
            f"{no_default}{info_name}: files not found. Expected {expected} in a {spec['folder']} folder{zips}; "
            f"looked in: {'; '.join(looked)}. {how_to_get}"
        )

    meta = read_cifar_pickle(found / spec["meta"])
    names = meta.get(spec["names_key"])
    if names is None or len(names) != num_classes:
        raise DataError(
            f"{found / spec['meta']}: expected b'{spec['names_key']}' with {num_classes} class names, "
            f"found {'no such key' if names is None else len(names)}"
        )
    classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    info = DatasetInfo(
        name=info_name, num_classes=num_classes, in_channels=3, image_size=(32, 32),
        mean=mean, std=std, classes=classes,
    )
    train = _read_batches(found, spec["train"], spec["label_key"], num_classes)
    test = _read_batches(found, spec["test"], spec["label_key"], num_classes)
    return info, train, test


@DATASETS.register("cifar10")
def cifar10(root: str | os.PathLike | None = None, download: bool = False) -> tuple[DatasetInfo, Split, Split]:
    """CIFAR-10: 50k/10k 32x32 RGB images, 10 classes (official python batches, or an image zip).

    ``root``: the ``cifar-10-batches-py`` folder or its parent; or, when the official batches are
    absent, a ``cifar10_jpeg.zip`` of ``<top>/{train,test}/<class>/*.jpg`` (the file itself or its
    folder), decoded once and cached (:mod:`aal.data.cifar_jpeg`; ``info.source`` then says
    "CIFAR-10 (JPEG-q75 re-encoding)" or whatever quality the files have). See
    :func:`aal.data.load_data`.
    """
    return load_cifar(
        "cifar10", _CIFAR10, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), root, download
    )


@DATASETS.register("cifar100")
def cifar100(root: str | os.PathLike | None = None, download: bool = False) -> tuple[DatasetInfo, Split, Split]:
    """CIFAR-100: 50k/10k 32x32 RGB images, 100 fine classes (official python pickles).

    ``root``: the ``cifar-100-python`` folder or its parent. See :func:`aal.data.load_data`.
    """
    return load_cifar(
        "cifar100", _CIFAR100, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), root, download
    )
