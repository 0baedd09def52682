"""The cosine classifier head of SPAT (Self-Paced Adversarial Training, Sec. 3.1).

SPAT's model classifies by ``s * cos(features, w_k)``: L2-normalised features against
L2-normalised class weights, scaled by ``s``. It is a model layer (configs choose it with
``model.head: cosine``), so it lives with the models; :mod:`aal.methods.spat` trains with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CosineHead(nn.Module):
    """Cosine-similarity classifier: ``scale * cos(f, w_k)`` for every class ``k``.

    Args:
        in_features: feature width F.
        num_classes: number of classes K (>= 1).
        scale: the logit scale ``s`` (> 0; SPAT uses 8).

    Shapes: features (B, F) -> logits (B, K) in ``[-scale, scale]``.

    Example:
        >>> head = CosineHead(16, 3, scale=8.0)
        >>> head(torch.randn(5, 16)).shape
        torch.Size([5, 3])
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 8.0) -> None:
        super().__init__()
        if int(in_features) < 1 or int(num_classes) < 1:
            raise ValueError(f"CosineHead needs in_features >= 1 and num_classes >= 1, got {in_features}, {num_classes}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.in_features, self.out_features, self.scale = int(in_features), int(num_classes), float(scale)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init; the norm is divided out

    def cosine(self, features: Tensor) -> Tensor:
        """The unscaled cosines ``z`` (B, K) in [-1, 1]."""
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()

    def forward(self, features: Tensor) -> Tensor:
        return self.scale * self.cosine(features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


def use_cosine_head(model: nn.Module, scale: float = 8.0) -> nn.Module:
    """Replace ``model.head`` (a linear classifier) by a :class:`CosineHead`, in place; returns ``model``.

    Works for every :class:`aal.models.AttentionNet` (``num_features``, ``num_classes`` and a
    ``head``); build the model first, then call this before creating the optimizer.

    Raises:
        ValueError: the model has no classifier head (``num_classes == 0``) or no ``head``.
    """
    head = getattr(model, "head", None)
    num_features, num_classes = getattr(model, "num_features", None), getattr(model, "num_classes", None)
    if head is None or num_features is None or num_classes is None:
        raise ValueError("use_cosine_head needs a model with .head, .num_features and .num_classes (an AttentionNet)")
    if int(num_classes) < 1:
        raise ValueError("use_cosine_head: the model is a feature extractor (num_classes=0); it has no classifier head")
    ref = next(iter(head.parameters()), None)
    new = CosineHead(num_features, num_classes, scale)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    model.head = new
    return model


def find_cosine_head(model: nn.Module) -> CosineHead:
    """The :class:`CosineHead` of ``model`` (its ``head``, else the last one among its modules)."""
    head = getattr(model, "head", None)
    if isinstance(head, CosineHead):
        return head
    found = [m for m in model.modules() if isinstance(m, CosineHead)]
    if not found:
        raise ValueError(
            "spat needs a model with a cosine head: build it with aal.methods.spat.use_cosine_head(model) "
            "(config: model.head=cosine)"
        )
    return found[-1]


__all__ = ["CosineHead", "find_cosine_head", "use_cosine_head"]
