"""Kernel functions k(M^a) that turn an attention map into a per-pixel attack budget.

AAL (seed 001, Sec. 3.1, Eq. 2) attacks selectively with ``eta = k(M^a) o delta``. The paper
names three kernels: ``k(M) = M`` and ``k(M) = M o M`` favour the foreground (classification,
detection; ``M o M`` is the paper's choice for classification) and ``k(M) = 1 - M o M`` the
background (few-shot learning). We add ``"one"`` (``k = 1``: the ordinary, non-selective attack)
for ablations and for the test that AAL with ``xi1 = xi2 = 0`` and ``k = 1`` *is* FGSM-AT/PGD-AT.

A kernel is one function ``f(m) -> Tensor`` registered in :data:`KERNELS`; it receives a map
with values in [0,1] (any shape) and must return values in [0,1] of the same shape.
Names are case-insensitive (``"M2"`` and ``"m2"`` are the same kernel).

Example:
    >>> import torch
    >>> from aal.attention import KERNELS, apply_kernel
    >>> m = torch.tensor([0.0, 0.5, 1.0])
    >>> apply_kernel("M2", m)
    tensor([0.0000, 0.2500, 1.0000])
    >>> apply_kernel("1-M2", m)
    tensor([1.0000, 0.7500, 0.0000])
    >>> apply_kernel(torch.sqrt, m)          # any callable works; register it to use it by name
    tensor([0.0000, 0.7071, 1.0000])

A new kernel is one function: ``@KERNELS.register("sqrt_m")`` on ``def sqrt_m(m): return m.sqrt()``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from aal.registry import Registry

Kernel = Callable[[Tensor], Tensor]

KERNELS: Registry[Tensor] = Registry("kernel")


@KERNELS.register("m")
def kernel_m(m: Tensor) -> Tensor:
    """k(M) = M: budget proportional to the attention (foreground; the public code's kernel)."""
    return m


@KERNELS.register("m2")
def kernel_m2(m: Tensor) -> Tensor:
    """k(M) = M o M: foreground, sharper than M (paper's choice for classification/detection)."""
    return m * m


@KERNELS.register("1-m2")
def kernel_background(m: Tensor) -> Tensor:
    """k(M) = 1 - M o M: the background (paper's choice for few-shot learning)."""
    return 1.0 - m * m


@KERNELS.register("one")
def kernel_one(m: Tensor) -> Tensor:
    """k(M) = 1: the full-budget, non-selective attack (ablation; AAL reduces to FGSM/PGD-AT)."""
    return torch.ones_like(m)


def get_kernel(kernel: str | Kernel) -> Kernel:
    """A kernel given by registered name (case-insensitive) or as a callable."""
    if callable(kernel):
        return kernel
    return KERNELS.get(kernel)


def apply_kernel(kernel: str | Kernel, m: Tensor) -> Tensor:
    """``k(m)`` for a map ``m`` with values in [0,1], checked to lie in [0,1].

    Raises:
        ValueError: the kernel returned a different shape or values outside [0,1] (a budget
            mask must be a fraction of eps; we refuse rather than silently clip).
    """
    k = get_kernel(kernel)(m)
    if k.shape != m.shape:
        raise ValueError(f"kernel {kernel!r} changed the map's shape {tuple(m.shape)} to {tuple(k.shape)}")
    if not bool(((k >= 0) & (k <= 1)).all()):  # also catches NaN
        raise ValueError(f"kernel {kernel!r} returned values outside [0,1]; a budget mask must lie in [0,1]")
    return k


__all__ = ["KERNELS", "Kernel", "apply_kernel", "get_kernel", "kernel_background", "kernel_m", "kernel_m2", "kernel_one"]
