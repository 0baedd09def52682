"""The input-level attention model (``"cbam_input"``): the attention slot before the stem.

:class:`InputAttentionNet` is an :class:`~aal.models.base.AttentionNet` whose attention slot is
applied to the (normalised) image *before* the stem: ``normalize -> attention -> stem -> trunk
-> head``. Everything else (``attention_map`` override, ``return_attention``) is unchanged, so
AAL and :mod:`aal.viz` work on it as is. :func:`with_input_attention` turns a model built without
attention into one (sharing the modules). The layer itself is
:class:`aal.attention.input_level.InputSpatialAttention`; see that module for the choices.

Example:
    >>> import torch, aal
    >>> model = with_input_attention(aal.create_model("small_cnn"), "cbam_input")
    >>> logits, m = model(torch.rand(2, 1, 28, 28), return_attention=True)
    >>> m.shape
    torch.Size([2, 1, 28, 28])
"""

from __future__ import annotations

from torch import Tensor

from aal.attention import ATTENTION, NoAttention
from aal.models.base import AttentionNet

INPUT_LEVEL: frozenset[str] = frozenset({"cbam_input"})
"""Registered attention names that belong before the stem (built via :func:`with_input_attention`)."""


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


__all__ = ["INPUT_LEVEL", "InputAttentionNet", "with_input_attention"]
