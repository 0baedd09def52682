"""CBAM spatial attention (Woo et al., ECCV 2018), as a layer that returns its map.

AAL (seed 001, Sec. 3) computes a spatial attention map M after the first convolution of the
network on the clean image. CBAM's spatial gate pools the feature map over channels with the
mean and the max, convolves the two resulting planes with a 7x7 kernel and squashes with a
sigmoid: M = sigmoid(conv7x7([mean_c(h); max_c(h)])), shape (B,1,h,w), values in (0,1).

Choice (``norm``, a named option): CBAM's reference code follows the 7x7 conv with BatchNorm
(``norm="batch"``, registered as ``"cbam"``); ``norm="none"`` keeps a conv bias instead
(``"cbam_nobn"``); ``norm="instance"`` standardises each image's pre-sigmoid logits to zero mean
and unit variance, with no learned scale (``"cbam_in"``). Why it matters for AAL, which uses M
as a per-pixel budget: trained through AAL's adversarial loss, the gate without normalisation
saturates within a few dozen SGD steps (mean M -> 0.996 on Fashion-MNIST), so k(M^a) ~ 1
everywhere; with BatchNorm the batch mean stays mid-range but, on CIFAR-10, the map goes flat
*within* each image (per-image std of M 0.12 -> 0.02 in three epochs), so the budget is again
uniform per image. Per-image standardisation keeps the contrast fixed (per-image std of M about
0.2) and leaves the gate to learn only *where* to attend: a map that can be selective by
construction. The AAL study compares the three (``benchmarks/aal_study.py``). In eval mode
(where AAL computes M^a) ``"batch"`` uses its running statistics; ``"none"`` and ``"instance"``
are per-image in every mode.

Example:
    >>> import torch
    >>> from aal.attention import SpatialAttention
    >>> layer = SpatialAttention()
    >>> h = torch.randn(2, 16, 8, 8)
    >>> out, m = layer(h)
    >>> out.shape, m.shape
    (torch.Size([2, 16, 8, 8]), torch.Size([2, 1, 8, 8]))
    >>> out2, m2 = layer(h, override=torch.ones(2, 1, 8, 8))   # map replaced for this call only
    >>> torch.equal(out2, h)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SpatialAttention(nn.Module):
    """CBAM spatial attention: ``h -> (h * M, M)``.

    Args:
        kernel_size: size of the convolution over the pooled planes (CBAM: 7).
        norm: what follows the convolution: ``"batch"`` (BatchNorm, CBAM's reference code),
            ``"none"`` (a conv bias) or ``"instance"`` (per-image standardisation, no learned scale).
    """

    NORMS = ("batch", "none", "instance")

    def __init__(self, kernel_size: int = 7, norm: str = "batch") -> None:
        super().__init__()
        if kernel_size % 2 != 1 or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if norm not in self.NORMS:
            raise ValueError(f"norm must be one of {self.NORMS}, got {norm!r}")
        self.norm = norm
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=norm == "none")
        self.bn = nn.BatchNorm2d(1) if norm == "batch" else nn.Identity()

    def attention_map(self, h: Tensor) -> Tensor:
        """The map M (B,1,h,w) in (0,1) for features ``h`` (B,C,h,w)."""
        pooled = torch.cat([h.mean(dim=1, keepdim=True), h.amax(dim=1, keepdim=True)], dim=1)
        z = self.bn(self.conv(pooled))
        if self.norm == "instance":
            # per image: zero mean, unit variance (a flat image gets a flat map, not a NaN)
            z = (z - z.mean(dim=(2, 3), keepdim=True)) / (z.std(dim=(2, 3), keepdim=True, unbiased=False) + 1e-5)
        return torch.sigmoid(z)

    def forward(self, h: Tensor, override: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Apply attention. ``override`` (B,1,h,w) replaces the computed map for this call."""
        if override is None:
            m = self.attention_map(h)
        else:
            if override.dim() != 4 or override.shape[1] != 1 or override.shape[-2:] != h.shape[-2:]:
                raise ValueError(
                    f"attention override must have shape (B,1,{h.shape[-2]},{h.shape[-1]}), "
                    f"got {tuple(override.shape)}"
                )
            m = override.to(dtype=h.dtype)
        return h * m, m
