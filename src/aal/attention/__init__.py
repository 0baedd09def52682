"""Attention layers that sit after a model's first convolution, and their registry.

``ATTENTION`` maps a config name (``model.attention=cbam``) to a factory ``f(channels) -> layer``.
Every layer's ``forward(h, override=None)`` returns ``(h_out, M)``.
"""

from __future__ import annotations

from torch import nn

from aal.attention.cbam import SpatialAttention
from aal.models.base import NoAttention
from aal.registry import Registry

ATTENTION: Registry[nn.Module] = Registry("attention")


@ATTENTION.register("none")
def _none(channels: int) -> nn.Module:
    """No attention (the free, empty slot)."""
    return NoAttention()


@ATTENTION.register("cbam")
def _cbam(channels: int) -> nn.Module:
    """CBAM spatial attention (mean+max over channels, 7x7 conv, sigmoid) after the first conv."""
    return SpatialAttention(kernel_size=7)


def create_attention(name: str | None, channels: int) -> nn.Module:
    """Build the attention layer ``name`` (``None`` means "none") for ``channels`` feature maps."""
    return ATTENTION.create(name or "none", channels)


__all__ = ["ATTENTION", "SpatialAttention", "create_attention"]
