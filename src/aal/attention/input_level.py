"""Input-level spatial attention (``"cbam_input"``): attention on the image, before the stem.

The paper (seed 001, Sec. 3) places CBAM spatial attention after the network's first
convolution; that is ``attention="cbam"``. One public implementation instead computes the map on
the *input image*: a C->C convolution (3->3 for RGB) followed by CBAM spatial attention. This
module provides that variant:

* :class:`InputSpatialAttention`: ``x -> (x o M, M)`` with ``M = SA(conv3x3_{C->C}(x))`` of
  shape (B,1,H,W), i.e. at the input resolution (so AAL's M^a needs no resizing to become the
  budget mask).
* :class:`aal.models.input_level.InputAttentionNet` and
  :func:`aal.models.input_level.with_input_attention` (the model that moves the slot before the
  stem) live with the models, which build on this package.

Choices (the public code's exact layer is not specified in the paper):

* ``apply_to="image"`` (default): the layer returns the gated image ``x o M``; the C->C conv only
  serves to compute the map. With ``M = 1`` (e.g. an override of ones) the network is exactly
  the attention-free network. ``apply_to="conv"`` returns ``conv(x) o M`` instead (the CBAM
  pattern "features o SA(features)", adding the conv to the network's path).
* Placement: the layer is an ordinary attention-slot layer ``h -> (h o M, M)``. It is
  input-level wherever the slot sees the image: in stem-less models (``resnet12`` with
  ``stem="none"``, whose slot follows an identity stem) and in :class:`~aal.models.input_level.InputAttentionNet`, which
  moves the slot before the stem. For a model with a real first convolution, build it with
  :func:`~aal.models.input_level.with_input_attention` (names in its ``INPUT_LEVEL``); in AttentionNet's usual slot it
  would act on the stem's features, which is not the public code's variant.

Example:
    >>> import torch, aal
    >>> from aal.models.input_level import with_input_attention
    >>> model = with_input_attention(aal.create_model("small_cnn"), "cbam_input")
    >>> logits, m = model(torch.rand(2, 1, 28, 28), return_attention=True)
    >>> m.shape
    torch.Size([2, 1, 28, 28])
"""

from __future__ import annotations

from torch import Tensor, nn

from aal.attention.cbam import SpatialAttention


class InputSpatialAttention(nn.Module):
    """C->C 3x3 convolution, then CBAM spatial attention, applied to the input image.

    Args:
        channels: image channels C (3 for RGB, 1 for grey).
        kernel_size: the spatial attention's convolution size (CBAM: 7).
        apply_to: ``"image"`` (return ``x o M``; default) or ``"conv"`` (return ``conv(x) o M``).
    """

    def __init__(self, channels: int, kernel_size: int = 7, apply_to: str = "image") -> None:
        super().__init__()
        if int(channels) < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if apply_to not in ("image", "conv"):
            raise ValueError(f"apply_to must be 'image' or 'conv', got {apply_to!r}")
        self.channels = int(channels)
        self.apply_to = apply_to
        self.conv = nn.Conv2d(self.channels, self.channels, 3, padding=1)
        self.spatial = SpatialAttention(kernel_size=kernel_size)

    def attention_map(self, x: Tensor) -> Tensor:
        """The map M (B,1,H,W) in (0,1) for a normalised image ``x`` (B,C,H,W)."""
        return self.spatial.attention_map(self.conv(x))

    def forward(self, x: Tensor, override: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(gated, M)`` for a normalised image ``x``; ``override`` (B,1,H,W) replaces M for this call."""
        if x.shape[1] != self.channels:
            raise ValueError(f"input-level attention built for {self.channels} channels got {x.shape[1]}")
        if self.apply_to == "image" and override is not None:
            # the conv only computes the map: not needed when the map is given
            return self.spatial(x, override=override)
        base = self.conv(x)
        if override is None:
            m = self.spatial.attention_map(base)
        else:
            _, m = self.spatial(base, override=override)  # validates the override's shape
        return (x if self.apply_to == "image" else base) * m, m

    def extra_repr(self) -> str:
        return f"channels={self.channels}, apply_to={self.apply_to!r}"


__all__ = ["InputSpatialAttention"]
