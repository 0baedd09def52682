"""The empty attention slot shared by every model and the attention registry's ``"none"``."""

from __future__ import annotations

from torch import Tensor, nn


class NoAttention(nn.Module):
    """The empty attention slot: returns its input unchanged and no map."""

    def forward(self, h: Tensor, override: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if override is not None:
            raise ValueError("this model has no attention layer; an attention map cannot be overridden")
        return h, None


__all__ = ["NoAttention"]
