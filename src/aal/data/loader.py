"""In-memory batch loader: index, augment and convert whole batches in torch.

The data already lives in memory as uint8, so a ``torch.utils.data.DataLoader`` with worker
processes would only add per-sample Python overhead; gathering a batch with ``index_select``
and converting it at once is cheaper on this machine's 2 cores and needs no workers.
"""

from __future__ import annotations

from typing import Iterator

import torch

from aal.data.augment import AUGMENTATIONS, augment_batch
from aal.data.base import Split

_MASK64 = (1 << 64) - 1


def _mix_seed(*parts: int) -> int:
    """Hash integers into one 63-bit seed (splitmix64 steps), so that nearby (seed, epoch, rank)
    tuples give unrelated random streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class BatchLoader:
    """Iterates ``(x, y)`` batches over a :class:`Split`: x float32 in [0,1] ``(B, C, H, W)``,
    y int64 ``(B,)``.

    Order and augmentation depend only on ``(seed, epoch, rank, world_size)``: call
    :meth:`set_epoch` before each epoch (as with ``DistributedSampler``), and resuming at
    epoch ``e`` reproduces exactly the batches of epoch ``e``. For convenience each ``iter()``
    also advances the epoch by one afterwards, so a loop that never calls ``set_epoch`` still
    sees a new order every epoch.

    Distributed sharding (``world_size > 1``): each epoch's permutation is split into
    ``world_size`` strided shards of equal length (rank ``r`` takes positions ``r, r+W, ...``),
    as ``DistributedSampler`` does, so every rank runs the same number of steps. With
    ``drop_last=False`` the permutation is padded by repeating its first samples up to a
    multiple of ``world_size`` (at most ``world_size - 1`` samples are seen twice per epoch;
    mind this when summing evaluation metrics over ranks); with ``drop_last=True`` the tail is
    dropped instead (shards are disjoint, at most ``world_size - 1`` samples unseen), and then
    each rank also drops its last incomplete batch.

    Args:
        split: the data.
        batch_size: samples per batch (per rank).
        shuffle: random order each epoch (else the split's order).
        drop_last: drop the last incomplete batch (and the sharding tail, see above).
        augment: ``"none"``, ``"crop"``, ``"flip"`` or ``"crop_flip"`` (see :mod:`aal.data.augment`).
        padding: crop padding in pixels (4 is the CIFAR standard; 2 suits 28x28 images).
        seed: base seed of order and augmentation.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of processes sharing the epoch.
        channels_last: return x in ``torch.channels_last`` memory format.
        device: where batches are put. uint8 batches are moved first and converted there (4x
            less transfer); augmentation runs on the device too.

    Example:
        >>> split = Split(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.arange(10))
        >>> loader = BatchLoader(split, batch_size=4, shuffle=True, augment="crop_flip", padding=2)
        >>> loader.set_epoch(3)
        >>> [tuple(x.shape) for x, y in loader]
        [(4, 1, 28, 28), (4, 1, 28, 28), (2, 1, 28, 28)]
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: str = "none",
        padding: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.padding = padding
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.device = torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next ``iter()`` produces."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n, w = len(self.split), self.world_size
        if w == 1:
            return n
        return n // w if self.drop_last else -(-n // w)

    def __len__(self) -> int:
        m, b = self.num_samples, self.batch_size
        return m // b if self.drop_last else -(-m // b)

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's sample indices for ``epoch`` (default: the current one), int64 ``(num_samples,)``."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.split)
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        w = self.world_size
        if w > 1:
            total = self.num_samples * w
            if total <= n:
                order = order[:total]
            elif n > 0:  # pad by wrapping around (repeat whole copies if n < world_size)
                order = order.repeat(-(-total // n))[:total]
            order = order[self.rank :: w]
        return order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices(epoch)
        # augmentation gets its own stream, distinct per rank, so that ranks do not draw
        # identical crop offsets for their (different) samples
        g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, self.rank, 1))
        non_blocking = self.device.type == "cuda"
        for b in range(len(self)):
            bi = idx[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.split.images.index_select(0, bi).to(self.device, non_blocking=non_blocking)
            y = self.split.labels.index_select(0, bi).to(self.device, non_blocking=non_blocking)
            x = augment_batch(x, self.augment, self.padding, g)
            x = x.float().div_(255.0)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y
