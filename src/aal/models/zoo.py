"""Registered architectures.

Every factory has the signature
``f(num_classes=10, in_channels=None, mean=None, std=None, attention=None, **options) -> AttentionNet``
where ``options`` are the model's own keyword arguments (an unknown option raises ``TypeError``,
an unknown option *value* raises ``ValueError``; nothing falls through to a default silently).

=================  ==============================================  =====================================
name               architecture                                    options
=================  ==============================================  =====================================
small_cnn          2-conv MNIST CNN (TRADES/Madry), 28x28, 1 ch    -
preact_resnet18    PreActResNet-18 (He et al. 2016b), 32x32         -
resnet18/34        ResNet, BasicBlock (He et al. 2016a)             stem, zero_init_residual
resnet50           ResNet, Bottleneck (v1.5)                        stem, zero_init_residual
wrn34_10           WideResNet-34-10 (TRADES/MART)                   dropout
wide_resnet        WideResNet-d-k (Zagoruyko & Komodakis 2016)      depth=28, widen_factor=10, dropout
resnet12           ResNet-12 few-shot backbone (MetaOptNet/RFS)     stem="none"|"conv", channels, dropout
=================  ==============================================  =====================================

Example:
    >>> import torch, aal
    >>> model = aal.create_model("resnet18", num_classes=100, stem="imagenet", attention="cbam")
    >>> logits, m = model(torch.rand(2, 3, 64, 64), return_attention=True)
    >>> logits.shape, m.shape
    (torch.Size([2, 100]), torch.Size([2, 1, 32, 32]))
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from aal.models.layers import create_attention
from aal.models import MODELS
from aal.models.base import AttentionNet
from aal.models.layers import make_head, make_normalize
from aal.models.resnet import build_preact_resnet18, build_resnet
from aal.models.resnet12 import build_resnet12
from aal.models.wrn import build_wide_resnet
from aal.models import purifier as _purifier  # noqa: E402,F401  (registers purifier_ae, purifier_unet, atop)


def _channels(in_channels: int | None, default: int = 3) -> int:
    return default if in_channels is None else in_channels


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
    c = _channels(in_channels, 1)
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
    head = make_head(1024, num_classes)
    normalize = make_normalize(c, mean, std)
    return AttentionNet(normalize, stem, create_attention(attention, 32), trunk, head, num_classes, 1024)


@MODELS.register("preact_resnet18")
def preact_resnet18(
    num_classes: int = 10,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
    *,
    width: int = 64,
) -> AttentionNet:
    """PreActResNet-18 (He et al. 2016, identity mappings), the robust-overfitting/fast-AT 32x32 net.

    conv3x3(64) stem (the attention map is HxW), pre-activation blocks [2,2,2,2] of widths
    64-128-256-512, final BN-ReLU, global average pooling, linear. 11.2M parameters.

    Options:
        width: stem and first-stage channels (64); stages are ``width * (1, 2, 4, 8)``.
            ``width=16`` (0.7M parameters, ~1/16 of the FLOPs) is the CPU-scale CIFAR-10 model.
    """
    return build_preact_resnet18(num_classes, _channels(in_channels), mean, std, attention, width)


_RESNET_OPTIONS = """

    Options:
        stem: "cifar" (default; conv3x3 stride 1, no max-pool: the attention map is HxW) or
            "imagenet" (conv7x7 stride 2, then BN-ReLU-maxpool in the trunk: the map is H/2 x W/2).
        zero_init_residual: zero the last BN weight of every block (torchvision's option).
        width: stem and first-stage channels (64); stages are ``width * (1, 2, 4, 8)``.
    """


def _register_resnet(name: str, block: str, layers: tuple[int, ...], summary: str) -> None:
    # One factory per depth, with the full explicit signature the config validator reads.
    def factory(
        num_classes: int = 10,
        in_channels: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        attention: str | None = None,
        *,
        stem: str = "cifar",
        zero_init_residual: bool = False,
        width: int = 64,
    ) -> AttentionNet:
        c = _channels(in_channels)
        return build_resnet(block, layers, num_classes, c, mean, std, attention, stem, zero_init_residual, width)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = summary + _RESNET_OPTIONS
    MODELS.register(name)(factory)


_register_resnet("resnet18", "basic", (2, 2, 2, 2), "ResNet-18 (He et al. 2016), BasicBlock [2,2,2,2]; 512-d features.")
_register_resnet("resnet34", "basic", (3, 4, 6, 3), "ResNet-34 (He et al. 2016), BasicBlock [3,4,6,3]; 512-d features.")
_register_resnet(
    "resnet50", "bottleneck", (3, 4, 6, 3), "ResNet-50 (He et al. 2016), Bottleneck v1.5 [3,4,6,3]; 2048-d features."
)


@MODELS.register("wide_resnet")
def wide_resnet(
    num_classes: int = 10,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
    *,
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> AttentionNet:
    """WideResNet-depth-k (Zagoruyko & Komodakis 2016), TRADES' block; default WRN-28-10.

    Options:
        depth: 6n+4 (16, 28, 34, 40, ...).
        widen_factor: k; features are 64k-d.
        dropout: between each block's convolutions (0 = off).
    """
    return build_wide_resnet(depth, widen_factor, dropout, num_classes, _channels(in_channels), mean, std, attention)


@MODELS.register("wrn34_10")
def wrn34_10(
    num_classes: int = 10,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
    *,
    dropout: float = 0.0,
) -> AttentionNet:
    """WideResNet-34-10 of TRADES/MART (and AAL's Table 2): 46.2M parameters, 640-d features."""
    return build_wide_resnet(34, 10, dropout, num_classes, _channels(in_channels), mean, std, attention)


@MODELS.register("resnet12")
def resnet12(
    num_classes: int = 10,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
    *,
    stem: str = "none",
    channels: Sequence[int] = (64, 160, 320, 640),
    dropout: float = 0.0,
) -> AttentionNet:
    """ResNet-12 few-shot backbone (MetaOptNet/RFS), 64-160-320-640; num_classes=0 gives 640-d features.

    Options:
        stem: "none" (default; attention on the input image, map HxW, architecture exactly
            MetaOptNet/RFS) or "conv" (an added conv3x3(64) whose output the attention gates,
            the paper's "after the first conv" taken literally). See :mod:`aal.models.resnet12`.
        channels: the four block widths.
        dropout: after each block (RFS' DropBlock is not implemented).
    """
    return build_resnet12(num_classes, _channels(in_channels), mean, std, attention, stem, channels, dropout)


from aal.models import ssd as _ssd  # noqa: E402,F401  (registers the detectors ssd_resnet18, ssd_resnet34)
