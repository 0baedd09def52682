"""Wide residual networks (Zagoruyko & Komodakis, BMVC 2016), as used by TRADES and MART.

WRN-d-k for 32x32 inputs: a conv3x3(16) stem, three groups of ``n = (d - 4) / 6`` pre-activation
blocks of widths 16k, 32k, 64k (strides 1, 2, 2), a final BN-ReLU, global average pooling and a
linear layer. WRN-34-10 (n = 5, widths 160-320-640, 46.2M parameters) is the standard robust
CIFAR-10 backbone of TRADES, MART, AWP and the AAL paper (Table 2).

The block follows the TRADES / MART reference code exactly: when a block changes the shape, both
the residual branch and the 1x1-conv shortcut read the *pre-activated* input ``relu(bn1(x))``;
otherwise the shortcut is the identity on ``x``. Dropout (off by default, as in TRADES) sits
between the two convolutions, as in the paper. The stem conv3x3(16) is the first convolution, so
the attention map has the input's spatial size.

Example:
    >>> import torch
    >>> from aal.models.wrn import build_wide_resnet
    >>> model = build_wide_resnet(depth=10, widen_factor=2)
    >>> model(torch.rand(2, 3, 32, 32)).shape, model.num_features
    (torch.Size([2, 10]), 128)
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from aal.models.layers import create_attention
from aal.models.base import AttentionNet
from aal.models.layers import global_pool, init_weights, make_head, make_normalize


class WideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 plus shortcut.

    Shapes: (B, in_planes, H, W) -> (B, out_planes, H/stride, W/stride).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # TRADES: the shortcut exists iff in != out (a stride change always comes with a width change)
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)
            if in_planes != out_planes or stride != 1
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.dropout(self.relu(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def build_wide_resnet(
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
) -> AttentionNet:
    """WRN-``depth``-``widen_factor`` (see the module docstring).

    Args:
        depth: total depth, ``6n + 4`` (e.g. 16, 28, 34, 40).
        widen_factor: width multiplier k (group widths 16k, 32k, 64k).
        dropout: dropout probability between each block's convolutions (0: off, as in TRADES).
        num_classes: classifier outputs; 0 gives the (B, 64k) feature extractor.
        in_channels, mean, std, attention: as for every zoo model.
    """
    normalize = make_normalize(in_channels, mean, std)  # validate options before building
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), got {depth}")
    if widen_factor < 1:
        raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    n = (depth - 4) // 6
    widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    stem_conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
    modules, planes = [], 16
    for width, stride in zip(widths, (1, 2, 2)):
        for i in range(n):
            modules.append(WideBlock(planes, width, stride if i == 0 else 1, dropout))
            planes = width
    trunk = nn.Sequential(
        nn.Sequential(*modules[:n]),
        nn.Sequential(*modules[n : 2 * n]),
        nn.Sequential(*modules[2 * n :]),
        nn.BatchNorm2d(planes),
        nn.ReLU(inplace=True),
        global_pool(),
    )
    init_weights(stem_conv, trunk)
    return AttentionNet(
        normalize,
        stem_conv,
        create_attention(attention, 16),
        trunk,
        make_head(planes, num_classes, zero_bias=True),  # TRADES zeroes the fc bias
        num_classes,
        planes,
    )
