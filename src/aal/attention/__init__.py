"""Attention layers that sit after a model's first convolution, and their registry.

``ATTENTION`` maps a config name (``model.attention=cbam``) to a factory ``f(channels) -> layer``.
Every layer's ``forward(h, override=None)`` returns ``(h_out, M)``.

Also here: the AAL kernels ``k(M^a)`` (:data:`KERNELS`, :mod:`.kernels`), the associative
attention of AAL (:func:`associative_attention`, :mod:`.associative`, seed 001 Eqs. 5-14) and
the input-level attention variant ``"cbam_input"`` (:mod:`.input_level`).
"""

from __future__ import annotations

from torch import nn

from aal.attention.base import NoAttention
from aal.attention.associative import AssocResult, associative_attention, top_fraction
from aal.attention.cbam import SpatialAttention
from aal.attention.input_level import InputSpatialAttention
from aal.attention.kernels import KERNELS, Kernel, apply_kernel, get_kernel
from aal.registry import Registry

ATTENTION: Registry[nn.Module] = Registry("attention")


@ATTENTION.register("none")
def _none(channels: int) -> nn.Module:
    """No attention (the free, empty slot)."""
    return NoAttention()


@ATTENTION.register("cbam")
def _cbam(channels: int) -> nn.Module:
    """CBAM spatial attention as CBAM's reference code: mean+max over channels, 7x7 conv, BatchNorm, sigmoid."""
    return SpatialAttention(kernel_size=7, norm="batch")


@ATTENTION.register("cbam_nobn")
def _cbam_nobn(channels: int) -> nn.Module:
    """CBAM spatial attention without the BatchNorm (a conv bias instead): aal < 0.2's "cbam"; its map saturates."""
    return SpatialAttention(kernel_size=7, norm="none")


@ATTENTION.register("cbam_in")
def _cbam_in(channels: int) -> nn.Module:
    """CBAM spatial attention with per-image standardised logits: a map that stays selective (AAL's default)."""
    return SpatialAttention(kernel_size=7, norm="instance")


@ATTENTION.register("cbam_input")
def _cbam_input(channels: int, apply_to: str = "image") -> nn.Module:
    """Input-level CBAM (public AAL code): C->C conv + spatial attention on the image; see aal.models.input_level."""
    return InputSpatialAttention(channels, kernel_size=7, apply_to=apply_to)


def create_attention(name: str | None, channels: int) -> nn.Module:
    """Build the attention layer ``name`` (``None`` means "none") for ``channels`` feature maps."""
    return ATTENTION.create(name or "none", channels)


__all__ = [
    "ATTENTION",
    "AssocResult",
    "InputSpatialAttention",
    "KERNELS",
    "NoAttention",
    "Kernel",
    "SpatialAttention",
    "apply_kernel",
    "associative_attention",
    "create_attention",
    "get_kernel",
    "top_fraction",
]
