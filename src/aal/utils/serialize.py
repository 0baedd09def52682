"""Plain JSON values from what training and evaluation produce (tensors, NumPy scalars, nested dicts)."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def jsonable(obj: Any) -> Any:
    """``obj`` with 1-element tensors and NumPy scalars as Python numbers, larger tensors as lists,
    tuples as lists and dict keys as strings (recursively); other values unchanged.

    Example:
        >>> import torch
        >>> jsonable({"acc": torch.tensor(0.5), 1: (torch.tensor([1, 2]),)})
        {'acc': 0.5, '1': [[1, 2]]}
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):  # NumPy scalar
        return obj.item()
    return obj


__all__ = ["jsonable"]
