"""The structure every registered classifier shares, and the attention hook.

Every model in :mod:`aal.models` is an :class:`AttentionNet`:

    x in [0,1] (B,C,H,W) -> Normalize -> stem (the first convolution) -> attention -> trunk -> head

* Images live in [0,1] everywhere (as in RobustBench); the per-channel normalisation is a
  module *inside* the model, so attacks, eps and masks are always expressed in pixel space.
* ``attention`` sits right after the first convolution (AAL paper, Sec. 3: CBAM spatial
  attention after the first conv layer). By default it is :class:`NoAttention`, which is free.
  Any :mod:`aal.attention` layer can be plugged in with ``create_model(..., attention="cbam")``.
* ``forward(x, attention_map=None, return_attention=False)``: ``attention_map`` overrides the
  attention map for exactly this forward pass (used by AAL to run the adversarial pass with the
  associative attention M^a); ``return_attention=True`` also returns the map M (B,1,h,w) that
  was applied (``None`` when the model has no attention).

Example:
    >>> import torch, aal
    >>> model = aal.create_model("small_cnn", attention="cbam")
    >>> logits, m = model(torch.rand(2, 1, 28, 28), return_attention=True)
    >>> logits.shape, m.shape
    (torch.Size([2, 10]), torch.Size([2, 1, 24, 24]))
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from aal.attention.base import NoAttention  # noqa: F401 (models re-export the empty slot)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as a module (buffers follow ``.to()`` and checkpoints).

    Args:
        mean: per-channel means, length C.
        std: per-channel standard deviations, length C (all > 0).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class AttentionNet(nn.Module):
    """Base class: ``normalize -> stem -> attention -> trunk -> head``.

    Subclasses build ``self.stem`` (the first convolution, ending at its output), ``self.trunk``
    (everything up to the pooled feature vector) and ``self.head`` (the classifier, or
    ``nn.Identity`` when ``num_classes == 0`` for feature extractors such as few-shot backbones).

    Args:
        normalize: the input normalisation module.
        stem: the first convolution.
        attention: the attention layer after the stem (``NoAttention()`` for none).
        trunk: the rest of the feature extractor, ending in a (B, F) tensor.
        head: the classifier on top of the features.
        num_classes: number of outputs of ``head`` (0 for a feature extractor).
        num_features: the trunk's output width F.
    """

    def __init__(
        self,
        normalize: nn.Module,
        stem: nn.Module,
        attention: nn.Module,
        trunk: nn.Module,
        head: nn.Module,
        num_classes: int,
        num_features: int,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.stem = stem
        self.attention = attention
        self.trunk = trunk
        self.head = head
        self.num_classes = num_classes
        self.num_features = num_features

    @property
    def has_attention(self) -> bool:
        """Whether an attention layer (not the empty slot) sits after the first convolution."""
        return not isinstance(self.attention, NoAttention)

    def forward_features(self, x: Tensor, attention_map: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Features (B, F) before the head, and the attention map applied (or ``None``)."""
        h = self.stem(self.normalize(x))
        h, m = self.attention(h, override=attention_map)
        return self.trunk(h), m

    def forward(
        self, x: Tensor, attention_map: Tensor | None = None, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Logits for images ``x`` (B,C,H,W) in [0,1].

        Args:
            x: images in [0,1].
            attention_map: optional (B,1,h,w) map that replaces the attention layer's own map for
                this call only.
            return_attention: also return the map that was applied.

        Returns:
            logits (B, num_classes), or ``(logits, map)`` when ``return_attention``.
        """
        feats, m = self.forward_features(x, attention_map)
        logits = self.head(feats)
        return (logits, m) if return_attention else logits
