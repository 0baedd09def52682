"""Core data types of :mod:`aal.data`: the error type, dataset metadata, in-memory splits,
the dataset registry, root-directory resolution and the train/validation split.

Images are stored as uint8 ``(N, C, H, W)`` tensors (one byte per pixel value: the whole of
CIFAR-10 is 180 MB, Fashion-MNIST 55 MB) and converted to float32 in [0,1] per batch by
:class:`aal.data.BatchLoader`. Labels are int64 ``(N,)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from aal.registry import Registry

#: Environment variable naming a data directory used when ``root`` is not given.
#: For a dataset ``name`` the loaders look in ``$AAL_DATA/<name>`` and in ``$AAL_DATA`` itself
#: (e.g. ``$AAL_DATA/mnist/`` or ``$AAL_DATA/cifar-10-batches-py/``); unset, they look in
#: ``~/.cache/aal/data/<name>``, where ``download=True`` also puts files.
ENV_DATA_DIR = "AAL_DATA"


class DataError(Exception):
    """A dataset file is missing, corrupt, or not in the expected format.

    The message always names the file (or the directories searched) and what was expected.
    """


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    Attributes:
        name: registry name, e.g. ``"fashion_mnist"``.
        num_classes: number of classes; labels are in ``[0, num_classes)``.
        in_channels: image channels C (1 for grey-scale, 3 for RGB).
        image_size: ``(H, W)``.
        mean: per-channel mean of the training images in [0,1] (for the model's
            ``Normalize`` layer; data is never normalised in the loader).
        std: per-channel standard deviation, same convention.
        classes: human-readable class names, indexed by label.
        source: what the pixels are when they differ from the official files (e.g.
            ``"CIFAR-10 (JPEG-q75 re-encoding)"``); every results.json and report carries it.
            Empty for the official files.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    source: str = ""

    @property
    def description(self) -> str:
        """``source`` if set, else the registry name: the dataset as a figure should name it."""
        return self.source or self.name


@dataclass
class Split:
    """One split (train, validation or test) held in memory.

    Attributes:
        images: uint8 tensor ``(N, C, H, W)``, values 0..255.
        labels: int64 tensor ``(N,)``.

    Example:
        >>> s = Split(torch.zeros(5, 1, 28, 28, dtype=torch.uint8), torch.arange(5))
        >>> len(s.subset(3)), s.subset([4, 0]).labels.tolist()
        (3, [4, 0])
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"Split.images must be a uint8 (N,C,H,W) tensor, got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"Split.labels must be an int64 (N,) tensor, got {self.labels.dtype} "
                f"with shape {tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"Split has {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        # the default dataclass repr would print the tensors
        shape = "x".join(str(s) for s in self.images.shape)
        return f"Split(n={len(self)}, images=uint8[{shape}], labels=int64[{len(self)}])"

    def subset(self, n_or_indices: int | Sequence[int] | torch.Tensor) -> Split:
        """Return a new split with the first ``n`` samples or the given indices.

        Args:
            n_or_indices: an int ``n`` (the first ``min(n, len(self))`` samples, so a subset
                size larger than the split simply keeps everything) or a 1-D sequence/tensor
                of indices (kept in the given order; repeats and negative indices allowed).

        Returns:
            A :class:`Split`: views of this one for the ``n`` form, copies for indices.
        """
        if isinstance(n_or_indices, bool):
            raise TypeError("subset() takes an int or indices, not a bool")
        if isinstance(n_or_indices, int):
            if n_or_indices < 0:
                raise ValueError(f"subset size must be >= 0, got {n_or_indices}")
            n = min(n_or_indices, len(self))
            return Split(self.images[:n], self.labels[:n])
        idx = torch.as_tensor(n_or_indices, dtype=torch.int64)
        if idx.dim() != 1:
            raise ValueError(f"subset indices must be 1-D, got shape {tuple(idx.shape)}")
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"subset index out of range for a split of {n} samples")
        idx = torch.where(idx < 0, idx + n, idx)  # index_select does not take negative indices
        return Split(self.images.index_select(0, idx), self.labels.index_select(0, idx))

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        """Number of samples per class, int64 ``(num_classes,)``."""
        return torch.bincount(self.labels, minlength=num_classes or 0)


@dataclass
class DataBundle:
    """A loaded dataset: metadata and its splits (``val`` is None without a validation split)."""

    info: DatasetInfo
    train: Split
    val: Split | None
    test: Split


LoaderFn = Callable[..., "tuple[DatasetInfo, Split, Split]"]

#: name -> ``f(root: str | Path | None = None, download: bool = False)`` returning
#: ``(info, train, test)``. Importing :mod:`aal.data` registers the built-in datasets.
DATASETS: Registry[tuple[DatasetInfo, Split, Split]] = Registry("dataset")


def _user_data_dirs(name: str) -> list[Path]:
    """``$AAL_DATA/<name>`` and ``$AAL_DATA`` if set, else ``~/.cache/aal/data/<name>``."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return [Path(env).expanduser() / name, Path(env).expanduser()]
    return [Path.home() / ".cache" / "aal" / "data" / name]


def candidate_dirs(
    root: str | os.PathLike | None,
    name: str,
    subdirs: Sequence[str] = (),
    default: str | os.PathLike | None = None,
) -> list[Path]:
    """Directories in which a dataset's files are searched, in order.

    With ``root``: ``root`` and ``root/<subdir>`` (so both the folder holding the files and
    its parent work). Without: ``$AAL_DATA/<name>`` and ``$AAL_DATA`` when that variable is
    set, else ``~/.cache/aal/data/<name>`` (where ``download=True`` puts files), each with
    the subdirs; then ``default`` (if the dataset has one).
    """
    if root is not None:
        bases = [Path(root).expanduser()]
    else:
        bases = _user_data_dirs(name)
        if default is not None:
            bases.append(Path(default))
    out: list[Path] = []
    for base in bases:
        for d in [base, *(base / s for s in subdirs)]:
            if d not in out:
                out.append(d)
    return out


def download_dir(root: str | os.PathLike | None, name: str) -> Path:
    """Where ``download=True`` puts files: ``root``, else ``$AAL_DATA/<name>``, else
    ``~/.cache/aal/data/<name>`` (both also searched when ``root`` is None)."""
    if root is not None:
        return Path(root).expanduser()
    return _user_data_dirs(name)[0]


def split_train_val(
    split: Split,
    val_fraction: float = 0.0,
    val_size: int | None = None,
    seed: int = 0,
    stratified: bool = True,
) -> tuple[Split, Split | None]:
    """Split off a validation set, deterministically from ``seed``.

    Args:
        split: the full training split.
        val_fraction: fraction of ``split`` for validation, in [0, 1). Ignored when
            ``val_size`` is given.
        val_size: exact number of validation samples (0 means no validation split).
        seed: seed of the permutation; the same (split, size, seed) always gives the same sets.
        stratified: keep the class proportions: each class contributes
            ``round(count_c * val_size / N)`` samples (largest-remainder rounding, so the
            total is exactly ``val_size``).

    Returns:
        ``(train, val)``; both keep the original sample order. ``val`` is None when the
        requested size is 0.

    Example:
        >>> s = Split(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.arange(100) % 10)
        >>> tr, va = split_train_val(s, val_fraction=0.2, seed=1)
        >>> len(tr), len(va), va.class_counts().tolist()
        (80, 20, [2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    """
    n = len(split)
    if val_size is None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        val_size = int(round(val_fraction * n))
    if not 0 <= val_size < max(n, 1):
        raise ValueError(f"val_size must be in [0, {n}) for a split of {n} samples, got {val_size}")
    if val_size == 0:
        return split, None

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    if stratified:
        # group the random permutation by class (stable sort keeps the random order within a
        # class) and take the first quota[c] of each group
        grouped = perm[torch.sort(split.labels[perm], stable=True).indices]
        counts = torch.bincount(split.labels).tolist()
        ideal = [c * val_size / n for c in counts]
        quota = [int(q) for q in ideal]
        by_remainder = sorted(range(len(counts)), key=lambda k: (-(ideal[k] - quota[k]), k))
        for k in by_remainder[: val_size - sum(quota)]:
            quota[k] += 1
        starts = [0]
        for c in counts[:-1]:
            starts.append(starts[-1] + c)
        val_idx = torch.cat([grouped[s : s + q] for s, q in zip(starts, quota)])
    else:
        val_idx = perm[:val_size]
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val_idx] = True
    train_idx = torch.nonzero(~is_val).flatten()
    val_idx = torch.nonzero(is_val).flatten()
    return split.subset(train_idx), split.subset(val_idx)


def load_data(
    name: str,
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    download: bool = False,
    *,
    val_size: int | None = None,
    stratified: bool = True,
) -> DataBundle:
    """Load a registered dataset from its official files, with an optional validation split.

    Args:
        name: a name in :data:`DATASETS` (``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``).
        root: directory with the files (or its parent). ``None``: ``$AAL_DATA/<name>`` and
            ``$AAL_DATA`` if set, else ``~/.cache/aal/data/<name>``; then the dataset's default
            directory (only Fashion-MNIST has one: ``/usr/share/datasets/fashion-mnist/``).
        val_fraction: fraction of the official training set held out for validation.
        seed: seed of the validation split.
        download: fetch missing files from the official URLs (MD5-checked). Never done unless
            asked; without network it raises :class:`DataError` saying where to put the files.
        val_size: exact validation size; overrides ``val_fraction``.
        stratified: stratify the validation split by class.

    Returns:
        A :class:`DataBundle`; ``bundle.test`` is the official test set.

    Raises:
        DataError: files missing or corrupt (the message names the file and how to get it).

    Example:
        >>> b = load_data("fashion_mnist", val_fraction=0.1)  # doctest: +SKIP
        >>> len(b.train), len(b.val), len(b.test), b.train.images.shape[1:]  # doctest: +SKIP
        (54000, 6000, 10000, torch.Size([1, 28, 28]))
    """
    if val_size is not None and val_fraction:
        raise ValueError("give either val_fraction or val_size, not both")
    info, train, test = DATASETS.get(name)(root=root, download=download)
    train, val = split_train_val(train, val_fraction, val_size, seed, stratified)
    return DataBundle(info, train, val, test)
