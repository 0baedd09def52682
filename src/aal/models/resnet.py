"""ResNets (He et al., CVPR 2016) and the pre-activation ResNet-18 (He et al., ECCV 2016).

Both are split as :class:`~aal.models.base.AttentionNet` expects: the *stem* is the first
convolution only, and its BatchNorm/ReLU (and, for the ImageNet stem, the max-pool) open the
*trunk*, so that the attention slot acts on the first conv's output as in the AAL paper
(Sec. 3, "attention after the first convolutional layer").

* :func:`build_resnet`: BasicBlock (ResNet-18/34) or Bottleneck (ResNet-50) networks, with a
  CIFAR stem (conv3x3 stride 1, no max-pool: the ``kuangliu/pytorch-cifar`` ResNet used by most
  robustness papers) or the ImageNet stem (conv7x7 stride 2, BN-ReLU, maxpool3x3 stride 2;
  torchvision's layout, the stride of a Bottleneck on its 3x3 conv, "ResNet v1.5").
* :func:`build_preact_resnet18`: the PreActResNet-18 of the robust-overfitting / fast-AT
  literature (Rice et al. 2020, Wong et al. 2020): conv3x3(64) stem, pre-activation blocks
  [2,2,2,2] with a bare 1x1-conv shortcut on the pre-activated input, a final BN-ReLU, global
  average pooling and a linear layer.

Example:
    >>> import torch
    >>> from aal.models.resnet import build_resnet
    >>> model = build_resnet("basic", (2, 2, 2, 2), num_classes=10, stem="imagenet")
    >>> model(torch.rand(2, 3, 64, 64)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import Tensor, nn

from aal.models.layers import create_attention
from aal.models.base import AttentionNet
from aal.models.layers import check_choice, global_pool, init_weights, make_head, make_normalize

RESNET_STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN-ReLU and a (1x1-conv + BN) projection shortcut when the shape changes.

    Shapes: (B, in_planes, H, W) -> (B, planes, H/stride, W/stride).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as torchvision's v1.5), 1x1 expand by 4; BN after each.

    Shapes: (B, in_planes, H, W) -> (B, 4*planes, H/stride, W/stride).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    # Identity when shapes agree, else the "option B" projection of He et al. (1x1 conv + BN).
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut.

    As in the reference PreActResNet-18 (kuangliu / Rice et al.), when the shape changes the
    shortcut is a bare 1x1 convolution applied to the *pre-activated* input ``relu(bn1(x))``;
    otherwise it is the identity on ``x``.

    Shapes: (B, in_planes, H, W) -> (B, planes, H/stride, W/stride).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride, bias=False) if stride != 1 or in_planes != planes else None
        )

    def forward(self, x: Tensor) -> Tensor:
        # not in-place: x may be the attention layer's output or the previous block's sum
        pre = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


def stage_widths(width: int) -> tuple[int, int, int, int]:
    """The four stage widths ``width * (1, 2, 4, 8)`` of a ResNet whose first stage has ``width``."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    return (width, 2 * width, 4 * width, 8 * width)


def _stage(block: type, in_planes: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    layers = []
    for s in [stride] + [1] * (blocks - 1):
        layers.append(block(in_planes, planes, s))
        in_planes = planes * getattr(block, "expansion", 1)
    return nn.Sequential(*layers), in_planes


def build_resnet(
    block: str,
    layers: Sequence[int],
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
    stem: str = "cifar",
    zero_init_residual: bool = False,
    width: int = 64,
) -> AttentionNet:
    """A ResNet of ``block`` ("basic" or "bottleneck") with ``layers`` blocks in each of 4 stages.

    Args:
        block: "basic" (ResNet-18/34) or "bottleneck" (ResNet-50/101/152).
        layers: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        num_classes: classifier outputs; 0 gives the (B, 512*expansion) feature extractor.
        in_channels: image channels.
        mean, std: per-channel normalisation inside the model (identity by default).
        attention: attention layer after the first conv (``None``, "cbam", ...).
        stem: "cifar" (conv3x3 stride 1, no max-pool; the attention map has the input's size) or
            "imagenet" (conv7x7 stride 2 then BN-ReLU-maxpool; the map is H/2 x W/2).
        zero_init_residual: zero the last BN of every block (Goyal et al. 2017), as torchvision's
            option; off by default.
        width: channels of the stem and the first stage (64 in the paper); the stages have
            ``width * (1, 2, 4, 8)`` channels, so ``width=16`` costs about 1/16 of the FLOPs.

    Returns:
        the :class:`AttentionNet`, ``num_features = 8 * width * expansion``.
    """
    normalize = make_normalize(in_channels, mean, std)  # validate options before building
    widths = stage_widths(width)
    check_choice("stem", stem, RESNET_STEMS)
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[check_choice("block", block, ("basic", "bottleneck"))]
    if len(layers) != 4:
        raise ValueError(f"a ResNet has 4 stages, got layers={tuple(layers)}")
    if stem == "cifar":
        stem_conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        opening = [("bn1", nn.BatchNorm2d(width)), ("relu", nn.ReLU(inplace=True))]
    else:
        stem_conv = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        opening = [
            ("bn1", nn.BatchNorm2d(width)),
            ("relu", nn.ReLU(inplace=True)),
            ("maxpool", nn.MaxPool2d(3, 2, 1)),
        ]
    stages, planes = [], width
    for i, (w, n) in enumerate(zip(widths, layers)):
        stage, planes = _stage(block_cls, planes, w, n, 1 if i == 0 else 2)
        stages.append((f"layer{i + 1}", stage))
    trunk = nn.Sequential(OrderedDict(opening + stages + [("pool", global_pool())]))
    head = make_head(planes, num_classes)
    init_weights(stem_conv, trunk)
    if zero_init_residual:
        for m in trunk.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.last_bn().weight)
    return AttentionNet(
        normalize,
        stem_conv,
        create_attention(attention, width),
        trunk,
        head,
        num_classes,
        planes,
    )


def build_preact_resnet18(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
    width: int = 64,
) -> AttentionNet:
    """PreActResNet-18 for 32x32 images (the stem is the conv3x3(width); see the module docstring).

    ``width`` (64 in the paper) sets the stem and first stage; stages have ``width * (1, 2, 4, 8)``.
    """
    normalize = make_normalize(in_channels, mean, std)
    widths = stage_widths(width)
    stem_conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    stages, planes = [], width
    for i, w in enumerate(widths):
        stage, planes = _stage(PreActBlock, planes, w, 2, 1 if i == 0 else 2)
        stages.append((f"layer{i + 1}", stage))
    trunk = nn.Sequential(
        OrderedDict(
            stages + [("bn", nn.BatchNorm2d(planes)), ("relu", nn.ReLU(inplace=True)), ("pool", global_pool())]
        )
    )
    init_weights(stem_conv, trunk)
    return AttentionNet(
        normalize,
        stem_conv,
        create_attention(attention, width),
        trunk,
        make_head(planes, num_classes),
        num_classes,
        planes,
    )
