"""Small building blocks shared by the architectures of the zoo.

These helpers keep every factory's contract identical: the same normalisation checks, the same
head for ``num_classes == 0`` (a feature extractor) and the same weight initialisation.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from aal.attention import create_attention as _create_attention
from aal.models.base import Normalize


def make_normalize(in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> Normalize:
    """The input normalisation for ``in_channels`` channels (identity when mean/std are None).

    Raises:
        ValueError: ``in_channels`` < 1, or ``mean``/``std`` do not have one entry per channel.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    mean = [0.0] * in_channels if mean is None else list(mean)
    std = [1.0] * in_channels if std is None else list(std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(
            f"mean/std must have {in_channels} entries (one per input channel), got {len(mean)} and {len(std)}"
        )
    return Normalize(mean, std)


def make_head(num_features: int, num_classes: int, zero_bias: bool = False) -> nn.Module:
    """Linear classifier on the pooled features, or ``nn.Identity`` when ``num_classes == 0``."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if num_classes == 0:
        return nn.Identity()
    head = nn.Linear(num_features, num_classes)
    if zero_bias:
        nn.init.zeros_(head.bias)
    return head


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise raise (no silent default branch)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def init_weights(*modules: nn.Module, nonlinearity: str = "relu", negative_slope: float = 0.0) -> None:
    """He (Kaiming) normal init, fan-out mode, for convolutions; BatchNorm weight 1 and bias 0.

    This is torchvision's ResNet init and TRADES' WRN init (``normal(0, sqrt(2 / (k*k*out)))`` is
    Kaiming fan-out). Linear layers keep PyTorch's default init. Only the given modules are touched,
    so an attention layer keeps its own init.
    """
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=negative_slope, mode="fan_out", nonlinearity=nonlinearity)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def global_pool() -> nn.Sequential:
    """Global average pooling to a (B, C) tensor.

    Adaptive pooling equals the reference code's ``avg_pool2d(out, 4)`` on 32x32 CIFAR inputs and
    also works at other resolutions.
    """
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def create_attention(name: str | None, channels: int) -> nn.Module:
    """The attention layer ``name`` for ``channels`` maps (see :data:`aal.attention.ATTENTION`)."""
    return _create_attention(name, channels)
