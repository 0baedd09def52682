"""Process-level runtime settings: seeding, RNG snapshots, glibc malloc tuning, threads, ranks.

Nothing here runs at import time; every function changes process state only when called
(the CLI calls :func:`tune_malloc` and :func:`seed_everything` at start-up).

Example:
    >>> from aal.utils.runtime import seed_everything, tune_malloc
    >>> seed_everything(0)
    0
    >>> applied = tune_malloc()   # True on glibc Linux, False elsewhere (never raises)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import random
from typing import Any

import numpy as np
import torch

# ----------------------------------------------------------------------------- seeding / RNG


def seed_everything(seed: int, deterministic: bool = False) -> int:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device).

    Args:
        seed: the seed (any non-negative int).
        deterministic: also ask torch for deterministic kernels
            (``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN non-benchmark).
            CPU training in aal is already bitwise repeatable for a fixed thread count without it.

    Returns:
        ``seed``.

    Example:
        >>> import torch
        >>> _ = seed_everything(3); a = torch.rand(2)
        >>> _ = seed_everything(3); bool((a == torch.rand(2)).all())
        True
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's legacy seeding only takes 32-bit seeds
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return seed


def get_rng_state() -> dict[str, Any]:
    """A snapshot of every global RNG aal's training touches.

    Returns:
        ``{"python": random.getstate(), "numpy": np.random.get_state(), "torch": ByteTensor,
        "cuda": [ByteTensor per device]}`` (``cuda`` empty when CUDA is not initialised, so a
        snapshot never initialises CUDA as a side effect).
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot from :func:`get_rng_state` (keys that are absent are left alone).

    CUDA states are restored only when this process sees the same number of devices; restoring
    a GPU run's state on a CPU-only machine silently keeps the CPU part, which is all it uses.
    """
    if "python" in state:
        py = state["python"]
        # JSON round trips turn the inner tuple into a list; random.setstate wants tuples
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda])


# ----------------------------------------------------------------------------- malloc tuning

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
_M_MMAP_MAX = -4
_MALLOC_TUNED = False


def tune_malloc(enable: bool = True, trim_threshold: int = 2**30) -> bool:
    """Keep large tensors on glibc's heap instead of fresh ``mmap`` s (1.4-1.6x faster steps here).

    Why: glibc serves every allocation above its mmap threshold (it grows up to 32 MiB) with its
    own ``mmap`` and gives it back with ``munmap`` on free. A training step allocates and frees
    the same big activation and gradient buffers every iteration, so each step page-faults all
    of that memory in again (the kernel zeroes every page). On this project's 2-core machine
    ResNet-18 steps ran 1.4-1.6x faster after
    ``mallopt(M_MMAP_MAX, 0)`` (never mmap; reuse heap memory) and
    ``mallopt(M_TRIM_THRESHOLD, trim_threshold)`` (do not hand freed heap back to the OS
    below that much free memory at the top of the heap).

    Cost: memory freed by tensors stays in the process (peak RSS is not returned to the OS
    until exit); fine for a training or evaluation process, worth knowing for a long-lived
    server. It affects allocations made *after* the call, so call it once at start-up.

    Switch it off with ``enable=False`` or the environment variable ``AAL_NO_MALLOC_TUNE=1``.

    Args:
        enable: apply the tuning (``False`` only reports that nothing was done).
        trim_threshold: bytes of free memory at the top of the heap kept before trimming.

    Returns:
        True if both ``mallopt`` calls succeeded; False (never an error) when disabled, on
        non-Linux or non-glibc platforms (macOS, musl, Windows), or if glibc refused.

    Example:
        >>> import os; os.environ["AAL_NO_MALLOC_TUNE"] = "1"
        >>> tune_malloc()
        False
        >>> del os.environ["AAL_NO_MALLOC_TUNE"]
    """
    global _MALLOC_TUNED
    if not enable or os.environ.get("AAL_NO_MALLOC_TUNE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if _MALLOC_TUNED:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, int(min(trim_threshold, 2**31 - 1))) == 1
    _MALLOC_TUNED = ok
    return ok


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` was applied in this process."""
    return _MALLOC_TUNED


# ----------------------------------------------------------------------------- threads, devices, ranks


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op thread count (``None`` keeps the current one); returns the count in use."""
    if num_threads is not None:
        if int(num_threads) < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        torch.set_num_threads(int(num_threads))
    return torch.get_num_threads()


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """This CPU as Linux's ``/proc/cpuinfo`` describes its first core: ``name``, ``id`` and ``flags``.

    ``id`` is ``"<vendor> family <f> model <m> stepping <s>"``: two machines both called "AMD EPYC"
    can be a Zen 1 (AVX2) and a Zen 4 (AVX-512 with bf16), which differ by ~40x in bf16 training
    speed and give different floating-point results; ``flags`` is the set of instruction-set
    flags. Off Linux (no ``/proc/cpuinfo``) ``name`` is ``platform.processor()`` and the others
    are ``None``.

    Args:
        cpuinfo: the file's text (default: read it), for tests.

    Example:
        >>> info = cpu_info("vendor_id : AuthenticAMD\\ncpu family : 23\\nmodel : 1\\nmodel name : AMD EPYC\\n"
        ...                 "stepping : 2\\nflags : fpu avx2\\n")
        >>> info["name"], info["id"], sorted(info["flags"])
        ('AMD EPYC', 'AuthenticAMD family 23 model 1 stepping 2', ['avx2', 'fpu'])
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return {"name": platform.processor() or None, "id": None, "flags": None}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first core's block ends here
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    ident = " ".join(f"{label} {fields[k]}".strip() for label, k in (("", "vendor_id"), ("family", "cpu family"),
                                                                      ("model", "model"), ("stepping", "stepping"))
                     if k in fields)
    return {"name": fields.get("model name") or platform.processor() or None, "id": ident or None,
            "flags": set(fields["flags"].split()) if "flags" in fields else None}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> ``cuda`` when available else ``cpu``; anything else -> ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_main_process() -> bool:
    """True unless ``torch.distributed`` is initialised and this process is not rank 0.

    Only the main process writes files (metrics, checkpoints) and shows progress bars.
    """
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    """Number of processes in the default ``torch.distributed`` group (1 when not distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


__all__ = [
    "configure_threads",
    "cpu_info",
    "get_rng_state",
    "is_main_process",
    "malloc_tuned",
    "resolve_device",
    "seed_everything",
    "set_rng_state",
    "tune_malloc",
    "world_size",
]
