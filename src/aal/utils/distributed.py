"""Process-group primitives with no training state: rank, world size, all-reduce, sharding.

Every function works without a process group (one process: rank 0, world size 1, no-op
reductions). They sit below the evaluator and the engine alike, which both shard and reduce;
:mod:`aal.engine.distributed` adds the rest (init/shutdown, DDP wrapping, broadcasts, RNG state).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_initialized() -> bool:
    """True when a ``torch.distributed`` process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def per_process_batch(global_batch: int, world_size: int) -> int:
    """``global_batch // world_size``; ``ValueError`` (naming both) when it does not divide.

    Example:
        >>> per_process_batch(128, 2)
        64
    """
    if world_size < 1 or global_batch % world_size:
        raise ValueError(
            f"data.batch_size={global_batch} is the global batch and must be divisible by the number of "
            f"processes ({world_size}); choose e.g. data.batch_size={max(1, global_batch // world_size) * world_size}"
        )
    return global_batch // world_size


# ----------------------------------------------------------------------------- collectives
def _comm_device() -> torch.device:
    # nccl moves CUDA tensors only; gloo works on CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce over ranks (``"sum"``, ``"mean"``, ``"max"``, ``"min"``); a no-op on one process.

    Works for tensors on any device, any dtype the backend supports (bool is reduced as uint8:
    ``"sum"``/``"max"`` is a logical or, ``"min"`` a logical and).
    """
    if get_world_size() == 1:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    dev = _comm_device()
    buf = tensor.detach().to(dev, dtype=torch.uint8 if tensor.dtype == torch.bool else None).contiguous()
    dist.all_reduce(buf, ops[op])
    if tensor.dtype == torch.bool:
        buf = buf > 0
    elif op == "mean":
        buf = buf / get_world_size() if buf.is_floating_point() else buf // get_world_size()
    with torch.no_grad():
        tensor.copy_(buf)
    return tensor


def shard_indices(total: int, rank: int | None = None, world_size: int | None = None) -> Tensor:
    """This rank's strided shard ``rank, rank + W, ...`` of ``range(total)`` (all of it on one process)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return torch.arange(total)[rank::world_size]


__all__ = ["all_reduce_", "get_rank", "get_world_size", "is_initialized", "per_process_batch", "shard_indices"]
