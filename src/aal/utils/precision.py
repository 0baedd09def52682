"""Mixed precision: the ``precision`` run-config key (``fp32``, ``bf16``, ``fp16``) as autocast + scaler.

What is chosen, and why:

* ``fp32`` (default) runs everything in float32: no autocast, no scaler.
* ``bf16`` runs the training step (the method's clean forward, its attack steps, the adversarial
  forward and the loss) under ``torch.autocast(device, torch.bfloat16)``. Master weights, the
  optimizer state and the backward/step stay fp32 (autocast casts per op; nothing is converted).
  bf16 has fp32's exponent range, so no loss scaling is needed. It works on CPU and CUDA.
* ``fp16`` is CUDA only: CPU autocast to float16 covers few ops and is slow or unsupported for
  convolutions, so it is refused with a clear message instead of silently running in fp32. On
  CUDA fp16's narrow exponent range needs dynamic loss scaling: :func:`make_grad_scaler` gives a
  ``torch.amp.GradScaler``.

Evaluation stays in fp32 unless asked (``aal eval --precision``): a lower-precision gradient is a
weaker attack, and a robustness number should not depend on how the model was trained.

Example:
    >>> import torch
    >>> from aal.utils.precision import autocast_context, make_grad_scaler
    >>> lin = torch.nn.Linear(4, 2)
    >>> with autocast_context("bf16", "cpu"):
    ...     y = lin(torch.rand(3, 4))
    >>> y.dtype, lin.weight.dtype, make_grad_scaler("bf16", "cpu")
    (torch.bfloat16, torch.float32, None)
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from aal.utils.runtime import cpu_info

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
"""Values of a run config's ``precision`` key."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _device_type(device: Any) -> str:
    """``"cpu"`` or ``"cuda"`` (the autocast device type) of a device, a device string or ``"auto"``."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def check_precision(precision: Any, device: Any = "cpu") -> str:
    """Refuse an unknown precision, and fp16 where it is not supported (anything but CUDA).

    Args:
        precision: the value to check.
        device: where the model trains (a device, ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``).

    Returns:
        ``precision`` itself.

    Raises:
        ValueError: naming the choices, or why fp16 is refused.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}; got {str(precision)[:80]!r}")
    kind = _device_type(device)
    if precision == "fp16" and kind != "cuda":
        raise ValueError(
            f"precision: fp16 needs a CUDA device (this run is on {kind}: CPU autocast to float16 is "
            "slow or unsupported for convolutions); use precision=bf16 on CPU"
        )
    return precision


# the instruction-set flags (Linux's names) with which a CPU computes bf16 dot products itself
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def native_bf16(device: Any = "cpu") -> bool:
    """Whether ``device`` computes bf16 in hardware, so that ``precision=bf16`` can pay off.

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: the AVX512-BF16 or AMX-BF16 instructions
    (:data:`BF16_FLAGS` in ``/proc/cpuinfo``; off Linux, oneDNN's own bf16 check). Without them
    torch still runs bf16 autocast, converting around fp32 kernels, and training is *slower* than
    fp32: small-CNN PGD-10-AT train steps (batch 128, one thread) took 10x fp32's time on an AVX2
    AMD EPYC (``benchmarks/results/precision_speed_avx2.txt``), where an AVX-512 machine with AMX
    ran them 2.7x *faster* than fp32 (``precision_speed.txt``).
    """
    if _device_type(device) == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    flags = cpu_info()["flags"]
    if flags is not None:
        return bool(BF16_FLAGS & flags)
    try:  # a private op, hence the guard; it answers for oneDNN's kernels
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_context(precision: str, device: Any) -> ContextManager[Any]:
    """The context a training step (or an attack) runs in for ``precision`` on ``device``.

    ``fp32``: a no-op context. ``bf16``/``fp16``: ``torch.autocast`` with that dtype, so
    parameters stay fp32 and only the ops autocast lists (convolutions, matmuls) run low.

    Raises:
        ValueError: see :func:`check_precision`.
    """
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    # cache off: autocast caches the low-precision copy of each weight for the whole region, and
    # a method may change weights in place inside one step (AWP evaluates its loss at w + v):
    # with the cache the second forward would silently use the stale copy of w
    return torch.autocast(device_type=_device_type(device), dtype=_DTYPES[precision], cache_enabled=False)


def make_grad_scaler(precision: str, device: Any) -> "torch.amp.GradScaler | None":
    """A dynamic loss scaler for fp16 on CUDA; ``None`` otherwise (fp32 and bf16 need none)."""
    check_precision(precision, device)
    if precision != "fp16":
        return None
    return torch.amp.GradScaler("cuda")


def precision_record(train: str, eval: str = "fp32") -> dict[str, str]:
    """What ``config.yaml``'s readers and ``results.json`` record: ``{"train": ..., "eval": ...}``."""
    return {"train": train, "eval": eval}


__all__ = ["BF16_FLAGS", "PRECISIONS", "autocast_context", "check_precision", "make_grad_scaler", "native_bf16",
           "precision_record"]
