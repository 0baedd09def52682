"""Registered architectures. Each factory has the signature
``f(num_classes, in_channels, mean, std, attention, **options) -> AttentionNet``."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from aal.attention import create_attention
from aal.models import MODELS
from aal.models.base import AttentionNet, Normalize


def _normalize(in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> Normalize:
    mean = [0.0] * in_channels if mean is None else list(mean)
    std = [1.0] * in_channels if std is None else list(std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std must have {in_channels} entries (one per input channel)")
    return Normalize(mean, std)


@MODELS.register("small_cnn")
def small_cnn(
    num_classes: int = 10,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
) -> AttentionNet:
    """2-conv + 2-fc CNN of the Madry/TRADES MNIST experiments (28x28 inputs).

    conv5x5(32) - ReLU - maxpool2 - conv5x5(64) - ReLU - maxpool2 - fc(1024) - ReLU - fc(classes).
    Convolutions are unpadded as in TRADES' ``SmallCNN``-free MNIST net; for 28x28 inputs the
    first conv gives 24x24 maps (where the attention map lives) and the trunk a 4x4x64 tensor.
    """
    c = 1 if in_channels is None else in_channels
    stem = nn.Conv2d(c, 32, 5)
    trunk = nn.Sequential(
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 1024),
        nn.ReLU(inplace=True),
    )
    head = nn.Linear(1024, num_classes) if num_classes > 0 else nn.Identity()
    return AttentionNet(_normalize(c, mean, std), stem, create_attention(attention, 32), trunk, head, num_classes, 1024)
