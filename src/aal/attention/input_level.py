"""Input-level spatial attention (``"cbam_input"``): attention on the image, before the stem.

The paper (seed 001, Sec. 3) places CBAM spatial attention after the network's first
convolution; that is ``attention="cbam"``. One public implementation instead computes the map on
the *input image*: a C->C convolution (3->3 for RGB) followed by CBAM spatial attention. This
module provides that variant:

* :class:`InputSpatialAttention`: ``x -> (x o M, M)`` with ``M = SA(conv3x3_{C->C}(x))`` of
  shape (B,1,H,W), i.e. at the input resolution (so AAL's M^a needs no resizing to become the
  budget mask).
* :class:`InputAttentionNet`: an :class:`~aal.models.base.AttentionNet` whose attention slot is
  applied to the (normalised) image *before* the stem:
  ``normalize -> attention -> stem -> trunk -> head``. Everything else (``attention_map``
  override, ``return_attention``) is unchanged, so AAL and :mod:`aal.viz` work on it as is.
* :func:`with_input_attention`: turns a model built without attention into an
  :class:`InputAttentionNet` (it shares the modules).

Choices (the public code's exact layer is not specified in the paper):

* ``apply_to="image"`` (default): the layer returns the gated image ``x o M``; the C->C conv only
  serves to compute the map. With ``M = 1`` (e.g. an override of ones) the network is exactly
  the attention-free network. ``apply_to="conv"`` returns ``conv(x) o M`` instead (the CBAM
  pattern "features o SA(features)", adding the conv to the network's path).
* Placement: the layer is an ordinary attention-slot layer ``h -> (h o M, M)``. It is
  input-level wherever the slot sees the image: in stem-less models (``resnet12`` with
  ``stem="none"``, whose slot follows an identity stem) and in :class:`InputAttentionNet`, which
  moves the slot before the stem. For a model with a real first convolution, build it with
  :func:`with_input_attention` (names in :data:`INPUT_LEVEL`); in AttentionNet's usual slot it
  would act on the stem's features, which is not the public code's variant.

Example:
    >>> import torch, aal
    >>> from aal.attention import with_input_attention
    >>> model = with_input_attention(aal.create_model("small_cnn"), "cbam_input")
    >>> logits, m = model(torch.rand(2, 1, 28, 28), return_attention=True)
    >>> m.shape
    torch.Size([2, 1, 28, 28])
"""

from __future__ import annotations

from torch import Tensor, nn

from aal.attention.cbam import SpatialAttention
from aal.models.base import AttentionNet, NoAttention

INPUT_LEVEL: frozenset[str] = frozenset({"cbam_input"})
"""Registered attention names that belong before the stem (built via :func:`with_input_attention`)."""


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


class InputAttentionNet(AttentionNet):
    """``normalize -> attention (on the image) -> stem -> trunk -> head``.

    Same constructor and forward as :class:`~aal.models.base.AttentionNet`; only the place of
    the attention layer differs (it receives the normalised image).
    """

    def forward_features(self, x: Tensor, attention_map: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        h = self.normalize(x)
        h, m = self.attention(h, override=attention_map)
        return self.trunk(self.stem(h)), m


def with_input_attention(model: AttentionNet, name: str = "cbam_input", **options) -> InputAttentionNet:
    """An :class:`InputAttentionNet` sharing ``model``'s modules, with input-level attention ``name``.

    Args:
        model: an :class:`AttentionNet` built *without* attention (``attention=None``).
        name: a registered input-level attention (see :data:`INPUT_LEVEL`).
        **options: passed to the layer (e.g. ``apply_to="conv"``).

    Returns:
        the new model, on ``model``'s device and dtype and in its train/eval mode.

    Raises:
        ValueError: ``model`` already has an attention layer (AAL uses a single map M), or
            ``name`` is not an input-level attention.
    """
    from aal.attention import ATTENTION  # the registry lives in the package __init__

    if name.lower() not in INPUT_LEVEL:
        raise ValueError(f"{name!r} is not an input-level attention; choose from {sorted(INPUT_LEVEL)}")
    if not isinstance(model.attention, NoAttention):
        raise ValueError("the model already has an attention layer; build it with attention=None first")
    channels = int(model.normalize.mean.shape[1]) if hasattr(model.normalize, "mean") else None
    if channels is None:
        raise ValueError("cannot infer the image channels: the model's normalize has no per-channel mean")
    layer = ATTENTION.create(name, channels, **options)
    ref = next(model.parameters(), None)
    if ref is not None:
        layer = layer.to(device=ref.device, dtype=ref.dtype)
    new = InputAttentionNet(
        model.normalize, model.stem, layer, model.trunk, model.head, model.num_classes, model.num_features
    )
    new.train(model.training)
    return new


__all__ = ["INPUT_LEVEL", "InputAttentionNet", "InputSpatialAttention", "with_input_attention"]
