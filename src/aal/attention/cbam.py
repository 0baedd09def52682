"""CBAM spatial attention (Woo et al., ECCV 2018), as a layer that returns its map.

AAL (seed 001, Sec. 3) computes a spatial attention map M after the first convolution of the
network on the clean image. CBAM's spatial gate pools the feature map over channels with the
mean and the max, convolves the two resulting planes with a 7x7 kernel and squashes with a
sigmoid: M = sigmoid(conv7x7([mean_c(h); max_c(h)])), shape (B,1,h,w), values in (0,1).

Choice: CBAM's reference implementation follows the 7x7 conv with BatchNorm; we keep a bias
and no BatchNorm by default (``batch_norm=False``) so that M depends on one image only (no
batch statistics couple the clean and adversarial passes). ``batch_norm=True`` restores CBAM's.

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
        batch_norm: add BatchNorm after the convolution, as CBAM's reference code does.
    """

    def __init__(self, kernel_size: int = 7, batch_norm: bool = False) -> None:
        super().__init__()
        if kernel_size % 2 != 1 or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(1) if batch_norm else nn.Identity()

    def attention_map(self, h: Tensor) -> Tensor:
        """The map M (B,1,h,w) in (0,1) for features ``h`` (B,C,h,w)."""
        pooled = torch.cat([h.mean(dim=1, keepdim=True), h.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))

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
