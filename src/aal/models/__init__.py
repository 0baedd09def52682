"""Model registry: ``create_model(name, ...)`` (after timm).

Every registered model is an :class:`~aal.models.base.AttentionNet` taking images in [0,1],
with its normalisation inside and an attention slot after its first convolution.

Example:
    >>> import aal
    >>> {"small_cnn", "resnet18"} <= set(aal.models.MODELS.names())
    True
    >>> model = aal.create_model("small_cnn", num_classes=10, attention="cbam")
"""

from __future__ import annotations

from typing import Sequence


from aal.models.base import AttentionNet, NoAttention, Normalize
from aal.models.heads import use_cosine_head
from aal.models.input_level import INPUT_LEVEL, with_input_attention
from aal.registry import Registry

MODELS: Registry[AttentionNet] = Registry("model")

# importing the zoo registers its models
from aal.models import zoo as _zoo  # noqa: E402,F401


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attention: str | None = None,
    channels_last: bool = False,
    head: str = "linear",
    head_scale: float = 8.0,
    **kwargs,
) -> AttentionNet:
    """Build a registered model.

    Args:
        name: registered name (see ``aal list``).
        num_classes: outputs of the classifier head; 0 returns a feature extractor.
        in_channels: image channels (default: the model's own default, 1 for ``small_cnn``, else 3).
        mean, std: per-channel normalisation applied inside the model (default: identity,
            i.e. mean 0 and std 1 for each channel).
        attention: attention layer after the first convolution (``None``/"none", "cbam", ...).
        channels_last: return the model in ``torch.channels_last`` memory format.
        head: ``"linear"`` (the model's own head) or ``"cosine"``: the head replaced by a
            :class:`aal.models.heads.CosineHead` (``head_scale * cos(features, w_k)``; SPAT).
        head_scale: the cosine head's scale ``s``.
        **kwargs: model-specific options (e.g. ``stem="cifar"`` for ResNets).

    Returns:
        the model, in train mode.
    """
    # input-level attention (the public AAL code's variant) sits before the stem, not in the slot
    input_level = attention is not None and attention.lower() in INPUT_LEVEL
    model = MODELS.create(
        name, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
        attention=None if input_level else attention, **kwargs,
    )
    if input_level:
        model = with_input_attention(model, attention)
    if head == "cosine":
        use_cosine_head(model, head_scale)
    elif head != "linear":
        raise ValueError(f"head must be 'linear' or 'cosine', got {head!r}")
    if channels_last:
        import torch

        model = model.to(memory_format=torch.channels_last)
    return model


__all__ = ["AttentionNet", "MODELS", "NoAttention", "Normalize", "create_model"]
