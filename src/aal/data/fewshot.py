"""Few-shot data: N-way K-shot episodes over class-labelled images, and the few-shot datasets.

* :class:`Episode`: one few-shot task, ``support_x (N*K,C,H,W)``, ``support_y (N*K,)``,
  ``query_x (N*Q,C,H,W)``, ``query_y (N*Q,)``; images float32 in [0,1], labels relabelled to
  ``0..N-1`` in the order the classes were drawn (so label 0 is a random class).
* :class:`EpisodeSampler`: draws episodes from a :class:`~aal.data.Split` (uint8 images + int
  labels): N classes without replacement, then K support and Q query images per class without
  replacement (a support image is never a query). Episode ``i`` of an evaluation is drawn
  from a generator seeded with ``(seed, i)`` only, so 600 test episodes are the same 600
  episodes for every model, run and machine (:meth:`EpisodeSampler.episode`).
* :class:`EpisodeLoader`: an epoch of ``episodes`` training episodes with ``set_epoch`` and
  ``len()``, which the :class:`~aal.engine.Trainer` iterates like any batch loader.
* Readers of the official layouts: Omniglot's zips (:func:`read_omniglot_zip`, the 20 one-shot
  runs :func:`read_omniglot_runs`), Ravi & Larochelle's miniImageNet / tieredImageNet
  folder-and-CSV layout (:func:`read_csv_split`), and a class split of Fashion-MNIST (the
  embedded default, :func:`fashion_mnist_split`).
* :data:`FEWSHOT_DATASETS`: name -> ``f(root=None, download=False, **options) -> FewShotData``
  (``omniglot``, ``mini_imagenet``, ``tiered_imagenet``, ``fashion_mnist_split``). Few-shot
  datasets are a separate registry from :data:`aal.data.DATASETS` on purpose: their test
  classes are *different* classes from their training classes, so they must never be used as
  an ordinary classification train/test pair.

Example:
    >>> import torch
    >>> from aal.data import Split
    >>> pool = Split(torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8), torch.arange(100) % 10)
    >>> sampler = EpisodeSampler(pool, n_way=5, k_shot=1, n_query=3, seed=0)
    >>> ep = sampler.episode(0)
    >>> tuple(ep.support_x.shape), ep.support_y.tolist(), tuple(ep.query_x.shape)
    ((5, 1, 8, 8), [0, 1, 2, 3, 4], (15, 1, 8, 8))
    >>> torch.equal(sampler.episode(0).query_x, ep.query_x)   # repeatable
    True
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from aal.data.base import DataError, Split, candidate_dirs, download_dir
from aal.data.limits import MAX_IMAGE_FILE_BYTES, SafeZip, check_relative_name, open_image, read_file_bounded
from aal.data.loader import _mix_seed
from aal.registry import Registry

# ============================================================================= episodes


@dataclass
class Episode:
    """One N-way K-shot task (a training "batch" for episodic methods).

    Attributes:
        support_x: (N*K, C, H, W) float images in [0,1], class-major (K images of class 0, ...).
        support_y: (N*K,) int64 labels in ``[0, N)``.
        query_x: (N*Q, C, H, W) float images in [0,1].
        query_y: (N*Q,) int64 labels in ``[0, N)``.

    An episode may have unequal shots per class (e.g. built by hand); every class ``0..N-1``
    must have at least one support image.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def n_way(self) -> int:
        """Number of classes N (labels are ``0..N-1``)."""
        return int(self.support_y.max().item()) + 1 if self.support_y.numel() else 0

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Episode:
        """The episode on ``device``."""
        return Episode(*(t.to(device, non_blocking=non_blocking) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(support_x, support_y, query_x, query_y)``."""
        return self.support_x, self.support_y, self.query_x, self.query_y

    def __repr__(self) -> str:
        s, q = tuple(self.support_x.shape), tuple(self.query_x.shape)
        return f"Episode(n_way={self.n_way}, support={s}, query={q})"


def as_episode(batch: object) -> Episode:
    """An :class:`Episode` from an Episode or a mapping with its four keys; ``TypeError`` otherwise."""
    if isinstance(batch, Episode):
        return batch
    keys = ("support_x", "support_y", "query_x", "query_y")
    if isinstance(batch, dict) and all(k in batch for k in keys):
        return Episode(*(batch[k] for k in keys))
    raise TypeError(
        "few-shot methods expect an Episode(support_x, support_y, query_x, query_y) batch (see "
        f"aal.data.fewshot.EpisodeSampler / EpisodeLoader), got {type(batch).__name__}"
    )


@dataclass(frozen=True)
class EpisodeBatch:
    """Several episodes taken as one training step (a meta-batch): a method's loss is their mean.

    :class:`EpisodeLoader` yields one when a step holds more than one episode on this process
    (``episodes_per_step > world_size``); a step of one episode is a plain :class:`Episode`.
    """

    episodes: tuple[Episode, ...]

    def to(self, device: str | torch.device, non_blocking: bool = False) -> EpisodeBatch:
        """The episodes on ``device``."""
        return EpisodeBatch(tuple(ep.to(device, non_blocking) for ep in self.episodes))

    def __len__(self) -> int:
        return len(self.episodes)


def episodes_of(batch: object) -> list[Episode]:
    """The episodes of a training step: an :class:`EpisodeBatch`'s, or the one episode of ``batch``."""
    if isinstance(batch, EpisodeBatch):
        return list(batch.episodes)
    return [as_episode(batch)]


class EpisodeSampler:
    """N-way K-shot episodes (support + query) drawn from a class-labelled pool of images.

    Args:
        split: the pool: uint8 images (N,C,H,W) and int64 labels (any class ids).
        n_way: classes per episode N.
        k_shot: support images per class K (>= 1).
        n_query: query images per class Q (>= 1).
        seed: base seed of :meth:`episode` (evaluation episodes).

    Only classes with at least ``K + Q`` images are eligible; ``ValueError`` if fewer than N
    classes are. Drawing: a random subset of N eligible classes (without replacement, in random
    order: the i-th drawn class gets label i), then for each class a random subset of ``K + Q``
    of its images, the first K for the support and the rest for the query. Images are converted
    to float32 in [0,1].

    Example:
        >>> pool = Split(torch.zeros(40, 1, 4, 4, dtype=torch.uint8), torch.arange(40) % 4)
        >>> ep = EpisodeSampler(pool, n_way=3, k_shot=2, n_query=4).episode(7)
        >>> len(ep.support_y), len(ep.query_y), ep.n_way
        (6, 12, 3)
    """

    def __init__(self, split: Split, n_way: int, k_shot: int, n_query: int, seed: int = 0) -> None:
        for name, v in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query)):
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.split = split
        self.n_way, self.k_shot, self.n_query = int(n_way), int(k_shot), int(n_query)
        self.seed = int(seed)
        labels = split.labels
        order = torch.argsort(labels, stable=True)
        classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
        groups = torch.split(order, counts.tolist())
        need = self.k_shot + self.n_query
        self._groups = [g for g, c in zip(groups, counts.tolist()) if c >= need]
        self.classes = [int(c) for c, n in zip(classes.tolist(), counts.tolist()) if n >= need]
        if len(self._groups) < self.n_way:
            raise ValueError(
                f"a {self.n_way}-way {self.k_shot}-shot episode with {self.n_query} queries per class needs "
                f"{self.n_way} classes with >= {need} images each; this pool has {len(self._groups)} "
                f"(of {len(groups)} classes)"
            )

    @property
    def num_classes(self) -> int:
        """Number of eligible classes in the pool."""
        return len(self._groups)

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler({self.n_way}-way {self.k_shot}-shot, {self.n_query} queries, "
            f"{self.num_classes} classes, seed={self.seed})"
        )

    def episode(self, index: int) -> Episode:
        """Evaluation episode ``index``: seeded by ``(seed, index)`` only, hence repeatable."""
        return self.sample(_mix_seed(self.seed, int(index)))

    def sample(self, seed: int | torch.Generator) -> Episode:
        """One episode drawn with a generator seeded by ``seed`` (or the generator itself)."""
        g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
        n, k, q = self.n_way, self.k_shot, self.n_query
        chosen = torch.randperm(len(self._groups), generator=g)[:n].tolist()
        sup, qry = [], []
        for c in chosen:
            idx = self._groups[c]
            pick = idx[torch.randperm(len(idx), generator=g)[: k + q]]
            sup.append(pick[:k])
            qry.append(pick[k:])
        images = self.split.images
        sx = images.index_select(0, torch.cat(sup)).float().div_(255.0)
        qx = images.index_select(0, torch.cat(qry)).float().div_(255.0)
        labels = torch.arange(n)
        return Episode(sx, labels.repeat_interleave(k), qx, labels.repeat_interleave(q))


class EpisodeLoader:
    """An epoch of ``episodes`` training episodes, for the :class:`~aal.engine.Trainer`.

    Episode ``i`` of epoch ``e`` is drawn with the seed ``(seed, e, i)``, so the episodes of an
    epoch depend only on that triple (a resumed run sees the same episodes). As
    :class:`~aal.data.BatchLoader`: call :meth:`set_epoch` before each epoch; each ``iter()``
    also advances the epoch afterwards.

    Steps and processes: the epoch's episodes are taken ``episodes_per_step`` at a time (a
    meta-batch whose loss is the mean over its episodes); under DDP each of the ``world_size``
    processes takes the step's episodes ``rank, rank + world_size, ...`` and DDP averages the
    gradients, so step ``s`` of all ranks together is exactly step ``s`` of one process with the
    same ``episodes_per_step`` (as the global batch of :class:`~aal.data.BatchLoader`). A step
    holding one episode on this process yields an :class:`Episode`, otherwise an
    :class:`EpisodeBatch`.

    Args:
        sampler: the :class:`EpisodeSampler` over the meta-training pool.
        episodes: episodes per epoch (all processes together).
        seed: base seed of the training episodes (separate from the sampler's evaluation seed).
        device: where episodes are put (the trainer does not move an Episode itself).
        episodes_per_step: episodes per optimizer step (all processes together); it must divide
            ``episodes`` and be a multiple of ``world_size``.
        rank, world_size: this process and the number of processes.

    Example:
        >>> pool = Split(torch.zeros(40, 1, 4, 4, dtype=torch.uint8), torch.arange(40) % 4)
        >>> loader = EpisodeLoader(EpisodeSampler(pool, 2, 1, 3), episodes=5)
        >>> loader.set_epoch(2)
        >>> len(loader), len(list(loader))
        (5, 5)
    """

    def __init__(
        self, sampler: EpisodeSampler, episodes: int, seed: int = 0, device: str | torch.device = "cpu",
        episodes_per_step: int = 1, rank: int = 0, world_size: int = 1,
    ) -> None:  # fmt: skip
        for name, value in (("episodes", episodes), ("episodes_per_step", episodes_per_step), ("world_size", world_size)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if episodes % episodes_per_step:
            raise ValueError(f"episodes_per_step ({episodes_per_step}) must divide the episodes per epoch ({episodes})")
        if episodes_per_step % world_size:
            raise ValueError(
                f"episodes_per_step ({episodes_per_step}) must be a multiple of the number of processes ({world_size}): "
                "each process takes an equal share of every step's episodes"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.sampler = sampler
        self.episodes = int(episodes)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.episodes_per_step, self.rank, self.world_size = int(episodes_per_step), int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose episodes the next ``iter()`` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Steps per epoch (the same on every process)."""
        return self.episodes // self.episodes_per_step

    def __iter__(self) -> Iterator[Episode | EpisodeBatch]:
        epoch = self.epoch
        self.epoch += 1
        return self._steps(epoch)

    def _episode(self, epoch: int, i: int) -> Episode:
        ep = self.sampler.sample(_mix_seed(self.seed, epoch, i, 0x5EED))
        return ep if self.device.type == "cpu" else ep.to(self.device, non_blocking=True)

    def _steps(self, epoch: int) -> Iterator[Episode | EpisodeBatch]:
        per = self.episodes_per_step
        for step in range(len(self)):
            mine = [self._episode(epoch, step * per + j) for j in range(self.rank, per, self.world_size)]
            yield mine[0] if len(mine) == 1 else EpisodeBatch(tuple(mine))


# ============================================================================= datasets


@dataclass
class FewShotData:
    """A few-shot dataset: class-disjoint meta-train / (meta-val) / meta-test pools.

    Attributes:
        name: registry name.
        train: meta-training pool (labels ``0..len(train_classes)-1``).
        test: meta-test pool, classes disjoint from ``train``'s (``None`` if only ``runs`` exist).
        val: meta-validation pool or ``None``.
        train_classes, test_classes, val_classes: class names, indexed by label.
        runs: fixed evaluation episodes, e.g. Omniglot's 20 official 20-way one-shot runs.
    """

    name: str
    train: Split
    test: Split | None
    val: Split | None = None
    train_classes: tuple[str, ...] = ()
    test_classes: tuple[str, ...] = ()
    val_classes: tuple[str, ...] = ()
    runs: list[Episode] | None = None
    notes: str = ""
    _stats: tuple[tuple[float, ...], tuple[float, ...]] | None = field(default=None, init=False, repr=False)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel ``(mean, std)`` in [0,1] of the meta-training images (for the model's Normalize)."""
        if self._stats is None:
            x = self.train.images
            mean, sq = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64)
            for i in range(0, len(x), 4096):  # chunked: no float copy of the whole pool
                xb = x[i : i + 4096].double().div_(255.0)
                mean += xb.sum((0, 2, 3))
                sq += (xb * xb).sum((0, 2, 3))
            n = x.shape[0] * x.shape[2] * x.shape[3]
            mean /= n
            std = (sq / n - mean * mean).clamp_min(1e-12).sqrt()
            self._stats = (tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std))
        return self._stats


#: name -> ``f(root=None, download=False, **options) -> FewShotData``.
FEWSHOT_DATASETS: Registry[FewShotData] = Registry("few-shot dataset")


def load_fewshot(name: str, root: str | os.PathLike | None = None, download: bool = False, **options) -> FewShotData:
    """Load the few-shot dataset registered as ``name`` (see :data:`FEWSHOT_DATASETS`)."""
    return FEWSHOT_DATASETS.get(name)(root=root, download=download, **options)


def class_subset(split: Split, classes: Sequence[int]) -> Split:
    """The images of ``classes`` only, relabelled ``0..len(classes)-1`` in the given order."""
    classes = [int(c) for c in classes]
    lut = torch.full((int(split.labels.max()) + 1 if len(split) else 0,), -1, dtype=torch.int64)
    for i, c in enumerate(classes):
        if c < 0 or c >= len(lut):
            raise ValueError(f"class {c} is not in the split (labels 0..{len(lut) - 1})")
        lut[c] = i
    new = lut[split.labels]
    keep = torch.nonzero(new >= 0).flatten()
    return Split(split.images.index_select(0, keep), new.index_select(0, keep))


def rotate_classes(split: Split, class_names: Sequence[str], rotations: Sequence[int] = (0, 90, 180, 270)) -> tuple[Split, list[str]]:
    """Each rotation of each class as a new class (Vinyals et al. 2016's Omniglot augmentation).

    Args:
        split: square images, labels ``0..C-1``.
        class_names: the C names.
        rotations: angles, multiples of 90 (counter-clockwise).

    Returns:
        ``(split, names)`` with ``len(rotations) * C`` classes: label ``r * C + c`` is class ``c``
        rotated by ``rotations[r]`` (named ``"<name>/rot<angle>"``).
    """
    c = len(class_names)
    imgs, labs, names = [], [], []
    for r, angle in enumerate(rotations):
        if angle % 90:
            raise ValueError(f"rotations must be multiples of 90 degrees, got {angle}")
        imgs.append(torch.rot90(split.images, k=(angle // 90) % 4, dims=(2, 3)))
        labs.append(split.labels + r * c)
        names += [f"{n}/rot{angle}" for n in class_names]
    return Split(torch.cat(imgs).contiguous(), torch.cat(labs)), names


# ----------------------------------------------------------------------------- images
def _decode(data: bytes, size: int | tuple[int, int] | None, mode: str, where: str) -> np.ndarray:
    """A PNG/JPEG decoded by Pillow to uint8 (H,W,C), resized (Lanczos) to ``size`` if given.

    The pixel count is checked from the header before decoding (:func:`aal.data.limits.open_image`).
    """
    with open_image(data, where) as im:
        im = im.convert(mode)
        if size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            if im.size != (hw[1], hw[0]):
                from PIL import Image

                im = im.resize((hw[1], hw[0]), Image.Resampling.LANCZOS)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _stack(images: list[np.ndarray], where: str) -> np.ndarray:
    """``np.stack`` of decoded images; images of different sizes are a :class:`DataError`."""
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"{where}: images of different sizes {sorted(shapes)[:3]}; pass image_size")
    return np.stack(images)


# ----------------------------------------------------------------------------- Omniglot
OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
#: MD5s of the publisher's files (brendenlake/omniglot, python/): the full and the "minimal" splits
OMNIGLOT_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1": "e704a628b5459e08445c13499850abc4",
    "images_background_small2": "b75a71a51d3b13f821f212756fe481fd",
    "all_runs": "e8996daecdf12afeeb4a53a179f06b19",
}


def _skip_member(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return not name.lower().endswith(".png") or any(p.startswith(("__MACOSX", ".")) for p in parts)


def read_omniglot_zip(
    path: str | os.PathLike,
    image_size: int | None = 28,
    invert: bool = True,
    exclude_alphabets: Sequence[str] = (),
) -> tuple[Split, list[str]]:
    """Read an Omniglot images zip (``images_background*.zip`` / ``images_evaluation.zip``).

    Layout inside the zip: ``<zip stem>/<Alphabet>/characterNN/<drawing>_<drawer>.png`` (105x105,
    1-bit). A class is one character of one alphabet, named ``"Alphabet/characterNN"``.

    Args:
        path: the zip file.
        image_size: side of the square output images (Lanczos resampling of the 105x105
            drawings; 28 is the usual few-shot size); ``None`` keeps 105x105.
        invert: make strokes bright (1) on a dark (0) background, like MNIST. The files have
            black strokes on white; inverting puts the *background* at 0, so an additive
            background attack must draw ink to change it (on the un-inverted images a
            background pixel at 1 could only be darkened).
        exclude_alphabets: alphabets to leave out (e.g. those shared with the meta-train zip).

    Returns:
        ``(split, class_names)``: uint8 images (N,1,S,S) and labels ``0..C-1`` in sorted order of
        the class names.

    Raises:
        DataError: unreadable zip, no images, an undecodable image (naming the member), an
            unsafe member name or a member over the size, ratio or pixel limits of
            :mod:`aal.data.limits` (checked before the member is read or decoded).
    """
    path = Path(path)
    exclude = set(exclude_alphabets)
    items: list[tuple[str, str]] = []  # (class name, member)
    with SafeZip(path) as zf:
        for name in zf.namelist():
            if _skip_member(name):
                continue
            parts = PurePosixPath(name).parts
            if len(parts) < 3:
                raise DataError(f"{path}: member {name!r} is not <Alphabet>/<character>/<image>.png")
            alphabet, character = parts[-3], parts[-2]
            if alphabet in exclude:
                continue
            items.append((f"{alphabet}/{character}", name))
        if not items:
            raise DataError(f"{path}: no Omniglot images (<Alphabet>/<character>/*.png) found")
        items.sort()
        classes = sorted({c for c, _ in items})
        index = {c: i for i, c in enumerate(classes)}
        images = _stack([_decode(zf.read(m), image_size, "L", f"{path}:{m}") for _, m in items], str(path))
    if invert:
        images = 255 - images
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.tensor([index[c] for c, _ in items], dtype=torch.int64)
    return Split(x, y), classes


def omniglot_alphabets(class_names: Sequence[str]) -> list[str]:
    """The sorted alphabets of ``"Alphabet/characterNN"`` class names."""
    return sorted({c.split("/")[0] for c in class_names})


def read_omniglot_runs(path: str | os.PathLike, image_size: int | None = 28, invert: bool = True) -> list[Episode]:
    """The 20 official Omniglot one-shot runs (``all_runs.zip``) as 20-way 1-shot episodes.

    Layout: ``runNN/training/classNN.png`` (20 support images, one per class),
    ``runNN/test/itemNN.png`` (20 queries) and ``runNN/class_labels.txt`` whose lines pair a
    test item with its training class (``runNN/test/item01.png runNN/training/class08.png``).
    Support label ``i`` is the i-th training image in sorted order. Images as
    :func:`read_omniglot_zip` (same ``image_size`` and ``invert``).

    Returns:
        one :class:`Episode` per run, in run order (support 20 images, query 20 images).

    Raises:
        DataError: unreadable zip, missing run files, or a malformed ``class_labels.txt`` line
            (naming the file and line).
    """
    path = Path(path)
    runs: list[Episode] = []
    with SafeZip(path) as zf:
        names = [n for n in zf.namelist() if not PurePosixPath(n).name.startswith(".") and "__MACOSX" not in n]
        label_files = sorted(n for n in names if PurePosixPath(n).name == "class_labels.txt")
        if not label_files:
            raise DataError(f"{path}: no runNN/class_labels.txt found; is this Omniglot's all_runs.zip?")
        members = set(names)
        for lf in label_files:
            run_dir = PurePosixPath(lf).parent
            train_files = sorted(n for n in names if PurePosixPath(n).parent == run_dir / "training" and n.endswith(".png"))
            if not train_files:
                raise DataError(f"{path}: {run_dir}/training/ has no images")
            cls = {n: i for i, n in enumerate(train_files)}
            pairs = []
            for lineno, line in enumerate(zf.read(lf).decode("utf-8", "replace").splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.split()
                if len(fields) != 2:
                    raise DataError(f"{path}:{lf} line {lineno}: expected '<test image> <training image>', got {line!r}")
                # paths are relative to the zip root ("run01/test/item01.png"); accept run-relative too
                item, target = (next((c for c in (f, str(run_dir / f)) if c in members), f) for f in fields)
                if item not in members or target not in cls:
                    raise DataError(f"{path}:{lf} line {lineno}: {line.strip()!r} names files not in the run")
                pairs.append((item, cls[target]))
            if not pairs:
                raise DataError(f"{path}:{lf}: no test items listed")
            sx = _stack([_decode(zf.read(m), image_size, "L", f"{path}:{m}") for m in train_files], f"{path}:{run_dir}")
            qx = _stack([_decode(zf.read(m), image_size, "L", f"{path}:{m}") for m, _ in pairs], f"{path}:{run_dir}")
            if invert:
                sx, qx = 255 - sx, 255 - qx
            to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).float().div_(255.0)  # noqa: E731
            runs.append(
                Episode(to_t(sx), torch.arange(len(train_files)), to_t(qx), torch.tensor([c for _, c in pairs]))
            )
    return runs


def _find_file(dirs: Sequence[Path], names: Sequence[str]) -> Path | None:
    for d in dirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _omniglot_file(stem: str, dirs: list[Path], root, download: bool, runs: bool = False) -> Path | None:
    names = ["all_runs.zip", "one-shot-classification/all_runs.zip"] if runs else [f"{stem}.zip"]
    found = _find_file(dirs, names)
    if found is None and download and stem in OMNIGLOT_MD5:
        from aal.data.download import Resource, download_file

        sub = "one-shot-classification/" if runs else ""
        url = f"{OMNIGLOT_URL}{sub}{stem}.zip"
        found = download_file(Resource(f"{stem}.zip", OMNIGLOT_MD5[stem], (url,)), download_dir(root, "omniglot"))
    return found


@FEWSHOT_DATASETS.register("omniglot")
def omniglot(
    root: str | os.PathLike | None = None,
    download: bool = False,
    background: str = "images_background",
    evaluation: str | None = "images_evaluation",
    runs: bool | None = None,
    image_size: int = 28,
    invert: bool = True,
    rotate: bool = False,
    exclude_overlap: bool = True,
) -> FewShotData:
    """Omniglot (Lake et al. 2015) from the publisher's zips: meta-train on ``background``, test on ``evaluation``.

    The official split is ``images_background.zip`` (30 alphabets, 964 characters) for
    meta-training and ``images_evaluation.zip`` (20 alphabets, 659 characters) for testing. The
    publisher's "minimal" splits work too: ``background="images_background_small1"`` (5
    alphabets, 136 characters) with ``evaluation="images_background_small2"``; these two share
    the Greek and Latin alphabets, which ``exclude_overlap`` (default) drops from the test pool
    so that meta-train and meta-test classes stay disjoint (small2 then keeps Japanese
    (katakana), Sanskrit and Tagalog: 106 characters). The 20 official 20-way one-shot runs
    (``all_runs.zip``, from the evaluation alphabets) are loaded as ``FewShotData.runs``.

    Args:
        root: folder holding the zips (or its ``python/`` parent, as in the publisher's
            repository); default ``$AAL_DATA/omniglot``, ``$AAL_DATA`` or ``~/.cache/aal/data/omniglot``.
        download: fetch missing zips from the publisher's GitHub (MD5-checked).
        background: stem of the meta-training zip.
        evaluation: stem of the meta-test zip, or ``None`` (then only the runs evaluate).
        runs: load ``all_runs.zip`` (``None``: if present; ``True``: required; ``False``: never).
        image_size: output side (default 28); see :func:`read_omniglot_zip` for ``invert``.
        rotate: add the 90/180/270-degree rotations of every meta-train class as new classes
            (Vinyals et al. 2016; Snell et al. 2017), 4x the meta-train classes.
        exclude_overlap: drop test alphabets that also appear in the meta-train zip.

    Raises:
        DataError: a zip is missing (the message lists where it looked and how to get it).
    """
    dirs = candidate_dirs(root, "omniglot", subdirs=("python", "omniglot", "omniglot/python"))

    def need(stem: str) -> Path:
        p = _omniglot_file(stem, dirs, root, download)
        if p is None:
            raise DataError(
                f"omniglot: {stem}.zip not found; looked in {', '.join(map(str, dirs))}. Get it from "
                f"{OMNIGLOT_URL}{stem}.zip (or pass download=True), put it in one of those folders or pass "
                "root=<dir>. With only the minimal splits use background='images_background_small1', "
                "evaluation='images_background_small2'."
            )
        return p

    train, train_names = read_omniglot_zip(need(background), image_size, invert)
    test = None
    test_names: list[str] = []
    if evaluation is not None:
        exclude = omniglot_alphabets(train_names) if exclude_overlap else ()
        test, test_names = read_omniglot_zip(need(evaluation), image_size, invert, exclude_alphabets=exclude)
    run_eps = None
    if runs is not False:
        p = _omniglot_file("all_runs", dirs, root, download and runs is True, runs=True)
        if p is None and runs:
            raise DataError(
                f"omniglot: all_runs.zip not found; looked in {', '.join(map(str, dirs))} (and their "
                f"one-shot-classification/ subfolders). Get it from {OMNIGLOT_URL}one-shot-classification/all_runs.zip"
            )
        run_eps = read_omniglot_runs(p, image_size, invert) if p is not None else None
    if rotate:
        train, train_names = rotate_classes(train, train_names)
    return FewShotData(
        "omniglot", train, test, None, tuple(train_names), tuple(test_names), (), run_eps,
        notes=f"meta-train {background}, meta-test {evaluation}, image_size {image_size}, invert {invert}, rotate {rotate}",
    )  # fmt: skip


# ----------------------------------------------------------------------------- CSV layout
CSV_SPLITS = ("train", "val", "test")


def read_csv_split(
    root: str | os.PathLike, split: str = "train", image_size: int | None = 84, images_dir: str = "images"
) -> tuple[Split, list[str]]:
    """One split of Ravi & Larochelle's folder-and-CSV layout (miniImageNet, tieredImageNet).

    Layout: ``root/images/<filename>`` and ``root/<split>.csv`` with a header line
    ``filename,label`` and one row per image (``n0153282900000005.jpg,n01532829``).

    Args:
        root: the dataset folder.
        split: ``"train"``, ``"val"`` or ``"test"`` (the CSV's stem).
        image_size: side of the square RGB output images (84 for miniImageNet), ``None`` to keep
            the files' size (they must then all have the same size).
        images_dir: the images folder inside ``root``.

    Returns:
        ``(split, class_names)``: uint8 (N,3,S,S) images, labels ``0..C-1`` in sorted order of the
        label strings.

    Raises:
        DataError: missing CSV or image, wrong header, a malformed row (naming the file and line).
    """
    root = Path(root)
    path = root / f"{split}.csv"
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found (expected {root}/{{{','.join(CSV_SPLITS)}}}.csv + {images_dir}/)")
    rows: list[tuple[str, str]] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header] != ["filename", "label"]:
            raise DataError(f"{path} line 1: expected the header 'filename,label', got {header!r}")
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{path} line {reader.line_num}: expected 'filename,label', got {','.join(row)!r}")
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise DataError(f"{path}: no rows after the header")
    classes = sorted({lab for _, lab in rows})
    index = {c: i for i, c in enumerate(classes)}
    imgs = []
    for fname, _ in rows:
        p = root / images_dir / check_relative_name(fname, str(path))
        try:
            data = read_file_bounded(p, MAX_IMAGE_FILE_BYTES, "image file")
        except DataError as err:
            raise DataError(f"{path}: image listed in the CSV cannot be read ({err})") from None
        imgs.append(_decode(data, image_size, "RGB", str(p)))
    x = torch.from_numpy(np.ascontiguousarray(_stack(imgs, str(root / images_dir)).transpose(0, 3, 1, 2)))
    y = torch.tensor([index[lab] for _, lab in rows], dtype=torch.int64)
    return Split(x, y), classes


def _csv_dataset(name: str, root, image_size: int | None, how: str) -> FewShotData:
    dirs = candidate_dirs(root, name, subdirs=(name, name.replace("_", "-"), name.replace("_", "")))
    base = next((d for d in dirs if (d / "train.csv").is_file() and (d / "test.csv").is_file()), None)
    if base is None:
        raise DataError(
            f"{name}: train.csv and test.csv (+ images/) not found; looked in {', '.join(map(str, dirs))}. {how}"
        )
    train, tr_names = read_csv_split(base, "train", image_size)
    test, te_names = read_csv_split(base, "test", image_size)
    val, va_names = (read_csv_split(base, "val", image_size) if (base / "val.csv").is_file() else (None, []))
    overlap = set(tr_names) & (set(te_names) | set(va_names))
    if overlap:
        raise DataError(f"{base}: classes {sorted(overlap)[:5]} appear in train.csv and in val/test.csv")
    return FewShotData(name, train, test, val, tuple(tr_names), tuple(te_names), tuple(va_names))


_RAVI_HOW = (
    "These datasets are not downloadable automatically (ImageNet licence): build the layout "
    "(images/ + train.csv, val.csv, test.csv with 'filename,label' rows, Ravi & Larochelle 2017) "
    "and pass root=<dir>."
)


@FEWSHOT_DATASETS.register("mini_imagenet")
def mini_imagenet(root: str | os.PathLike | None = None, download: bool = False, image_size: int = 84) -> FewShotData:
    """miniImageNet (Vinyals et al. 2016; Ravi & Larochelle's 64/16/20-class split) from images/ + CSVs.

    Held in memory as uint8: 38,400 + 9,600 + 12,000 images of 84x84x3 (about 1.5 GB).
    """
    if download:
        raise DataError(f"mini_imagenet cannot be downloaded by aal. {_RAVI_HOW}")
    return _csv_dataset("mini_imagenet", root, image_size, _RAVI_HOW)


@FEWSHOT_DATASETS.register("tiered_imagenet")
def tiered_imagenet(root: str | os.PathLike | None = None, download: bool = False, image_size: int = 84) -> FewShotData:
    """tieredImageNet (Ren et al. 2018; 351/97/160 classes) in the same images/ + CSV layout.

    Held in memory as uint8: about 780k images of 84x84x3 (16 GB): needs a large machine.
    """
    if download:
        raise DataError(f"tiered_imagenet cannot be downloaded by aal. {_RAVI_HOW}")
    return _csv_dataset("tiered_imagenet", root, image_size, _RAVI_HOW)


# ----------------------------------------------------------------------------- Fashion-MNIST
@FEWSHOT_DATASETS.register("fashion_mnist_split")
def fashion_mnist_split(
    root: str | os.PathLike | None = None,
    download: bool = False,
    train_classes: tuple[int, ...] = (0, 1, 2, 3, 4),
) -> FewShotData:
    """A class split of Fashion-MNIST, the embedded default few-shot set (28x28 grey).

    Meta-train: the official *training* images of ``train_classes`` (default 0-4: T-shirt/top,
    Trouser, Pullover, Dress, Coat; 30,000 images); meta-test: the official *test* images of the
    other classes (default 5-9: Sandal, Shirt, Sneaker, Bag, Ankle boot; 5,000 images). With 5
    test classes, every 5-way test episode uses all of them (only the images drawn vary), so
    the benchmark is "5-way on a fixed class set": easier to saturate than Omniglot/miniImageNet
    and only a smoke-scale stand-in for them.
    """
    from aal.data.base import DATASETS

    info, train, test = DATASETS.get("fashion_mnist")(root=root, download=download)
    tr = sorted({int(c) for c in train_classes})
    if not tr or tr[0] < 0 or tr[-1] >= info.num_classes or len(tr) == info.num_classes:
        raise ValueError(f"train_classes must be a proper non-empty subset of 0..{info.num_classes - 1}, got {train_classes}")
    te = [c for c in range(info.num_classes) if c not in tr]
    return FewShotData(
        "fashion_mnist_split", class_subset(train, tr), class_subset(test, te), None,
        tuple(info.classes[c] for c in tr), tuple(info.classes[c] for c in te),
        notes=f"meta-train classes {tr} (train images), meta-test classes {te} (test images)",
    )  # fmt: skip


__all__ = [
    "CSV_SPLITS",
    "Episode",
    "EpisodeBatch",
    "EpisodeLoader",
    "EpisodeSampler",
    "FEWSHOT_DATASETS",
    "FewShotData",
    "episodes_of",
    "OMNIGLOT_MD5",
    "as_episode",
    "class_subset",
    "fashion_mnist_split",
    "load_fewshot",
    "mini_imagenet",
    "omniglot",
    "omniglot_alphabets",
    "read_csv_split",
    "read_omniglot_runs",
    "read_omniglot_zip",
    "rotate_classes",
    "tiered_imagenet",
]
