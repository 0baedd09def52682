"""ResNet-12, the few-shot backbone of MetaOptNet (Lee et al., CVPR 2019) and RFS (Tian et al., ECCV 2020).

Four residual blocks; each block is three conv3x3-BN layers with LeakyReLU(0.1) between them, a
(1x1 conv + BN) shortcut, the sum, LeakyReLU(0.1) and a 2x2 max-pool. Widths 64-160-320-640;
global average pooling gives 640-d features (84x84 miniImageNet images: 84 -> 42 -> 21 -> 10 -> 5).
12.4M parameters. DropBlock (RFS' regulariser) is not implemented; ``dropout`` applies plain
dropout after each block's pooling where RFS would apply it.

**Where the attention goes.** The AAL paper (seed 001, Sec. 3 and 4.3) puts the spatial attention
"after the first convolutional layer" and uses ResNet-12 for few-shot learning, but ResNet-12's
first convolution sits *inside* the first residual block: the block's shortcut reads the block's
input, so an attention layer between conv1 and conv2 would gate only the residual branch and not
be "the map after the first conv" that the rest of the network sees. We therefore offer two
variants as the ``stem`` option:

* ``stem="none"`` (default): the stem is ``nn.Identity`` and the attention acts on the (normalised)
  input image, a (B,1,H,W) map at input resolution (reportedly what the public AAL code does for
  its few-shot backbone). It leaves ResNet-12 exactly as in MetaOptNet/RFS (weights compatible),
  and AAL's background kernel then selects image pixels directly. ``attention="cbam_input"`` (a
  C->C conv before the spatial gate, see :mod:`aal.attention.input_level`) also fits this slot.
* ``stem="conv"``: an added conv3x3(64) (+ BN + LeakyReLU opening the trunk) in front of the
  unchanged four blocks; the attention acts on that conv's 64 feature maps, which is the paper's
  wording taken literally at the cost of one extra layer (+ 40,896 parameters).

Example:
    >>> import torch
    >>> from aal.models.resnet12 import build_resnet12
    >>> backbone = build_resnet12(num_classes=0, attention="cbam")   # 640-d feature extractor
    >>> feats, m = backbone(torch.rand(2, 3, 84, 84), return_attention=True)
    >>> feats.shape, m.shape
    (torch.Size([2, 640]), torch.Size([2, 1, 84, 84]))
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from aal.models.layers import create_attention
from aal.models.base import AttentionNet
from aal.models.layers import check_choice, global_pool, init_weights, make_head, make_normalize

RESNET12_STEMS = ("none", "conv")


class ResNet12Block(nn.Module):
    """conv3x3-BN-LReLU x2, conv3x3-BN, + (1x1 conv + BN) shortcut, LReLU, maxpool2, dropout.

    Shapes: (B, in_planes, H, W) -> (B, planes, floor(H/2), floor(W/2)).
    """

    def __init__(self, in_planes: int, planes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.LeakyReLU(0.1, inplace=True)
        self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, bias=False), nn.BatchNorm2d(planes))
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.relu(out + self.shortcut(x))
        return self.dropout(self.pool(out))


def build_resnet12(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
    stem: str = "none",
    channels: Sequence[int] = (64, 160, 320, 640),
    dropout: float = 0.0,
) -> AttentionNet:
    """ResNet-12 (see the module docstring for the ``stem`` choice).

    Args:
        num_classes: classifier outputs; 0 gives the (B, channels[-1]) feature extractor.
        in_channels, mean, std, attention: as for every zoo model.
        stem: "none" (attention on the input) or "conv" (an added conv3x3(channels[0]) first).
        channels: the four block widths (MetaOptNet/RFS: 64-160-320-640).
        dropout: dropout after each block (RFS uses DropBlock here; not implemented).
    """
    normalize = make_normalize(in_channels, mean, std)  # validate options before building
    check_choice("stem", stem, RESNET12_STEMS)
    channels = tuple(channels)
    if len(channels) != 4 or min(channels) < 1:
        raise ValueError(f"channels must be 4 positive widths, got {channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    blocks, planes = [], in_channels
    opening: list[nn.Module] = []
    if stem == "none":
        stem_mod: nn.Module = nn.Identity()
    else:
        planes = channels[0]
        stem_mod = nn.Conv2d(in_channels, planes, 3, 1, 1, bias=False)
        opening = [nn.BatchNorm2d(planes), nn.LeakyReLU(0.1, inplace=True)]
    attention_channels = planes
    for width in channels:
        blocks.append(ResNet12Block(planes, width, dropout))
        planes = width
    trunk = nn.Sequential(*opening, *blocks, global_pool())
    # RFS: kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu") with the default slope 0
    init_weights(stem_mod, trunk, nonlinearity="leaky_relu")
    return AttentionNet(
        normalize,
        stem_mod,
        create_attention(attention, attention_channels),
        trunk,
        make_head(planes, num_classes),
        num_classes,
        planes,
    )
