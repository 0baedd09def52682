"""Multi-process training on PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel``.

``torchrun --nproc_per_node=N -m aal train CONFIG ...`` runs N copies of the same command;
torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and
:func:`aal.engine.run.train_run` calls :func:`init_distributed` which reads them. What each
piece does in distributed mode:

* **Process group**: gloo for CPU training, nccl for CUDA (:func:`init_distributed`).
* **Data**: ``data.batch_size`` is the *global* batch; each process gets
  ``batch_size // world_size`` (:func:`per_process_batch`, an error if it does not divide) and a
  disjoint strided shard of each epoch's permutation (:class:`aal.data.BatchLoader`'s
  ``rank`` / ``world_size``, like ``DistributedSampler``). Batch ``b`` of all ranks together is
  exactly batch ``b`` of a single-process run with the same seed and global batch.
* **Model**: the trainer wraps it in :class:`DDPModel` (below): DDP for training forwards, the
  plain module for attack forwards. Weights are the same on all ranks (same seed, and DDP
  broadcasts rank 0's at construction); gradients are averaged over ranks, so with per-rank
  batch ``B/N`` the update equals the single-process update on the global batch ``B``.
* **BatchNorm**: as in plain DDP, each rank normalises with its own ``B/N`` batch statistics and
  DDP broadcasts rank 0's running statistics before every training forward; the trainer also
  broadcasts them after each epoch, so evaluation and checkpoints use the same buffers everywhere.
  (Bitwise equality with one process therefore holds only for models without BatchNorm.)
* **Randomness**: model initialisation uses the config seed on every rank; the training streams
  (random starts of attacks, dropout) are seeded per rank with :func:`rank_seed` (rank 0 keeps
  the seed itself), so ranks do not draw the same noise for different images. Checkpoints store
  every rank's RNG state, so a resumed distributed run continues each rank's stream.
* **Files**: only rank 0 writes (logs, checkpoints, ``results.json``); the run folder must be on
  a file system every process can read (resume reads the checkpoint on every rank).
* **Evaluation**: :func:`aal.eval.evaluate` with ``distributed=True`` attacks a strided shard of
  the points on each rank and sums the per-point correctness over ranks (:func:`all_reduce_`).
* **Method state**: a method's ``state_dict()`` tensors are broadcast from rank 0 when training
  starts or resumes (:func:`broadcast_method_state`). A method whose state is *updated from the
  data* during training (running per-class statistics such as SPAT's, a universal perturbation
  such as UIAT's) must reduce its update over ranks itself, e.g.
  ``all_reduce_(counts)`` / ``all_reduce_(delta, op="mean")`` (no-ops without a process group),
  so that every rank keeps the same state. AAL, FGSM-AT, PGD-AT and TRADES have no state.

Why :class:`DDPModel` routes forwards. Methods compute their training loss themselves
(``model(x_adv)``, ``model(x, attention_map=...)``), so the model handed to a method must be
the DDP wrapper for gradients to be averaged. But the same model is also called by attacks
(:func:`aal.attacks.base.attack_mode`: parameter gradients off, input gradients only), and a
DDP forward with gradients enabled does reducer bookkeeping and, for models with buffers, a
broadcast of rank 0's buffers before *every* call, which is wasted work for an attack step
(and in ``attack_mode="train"`` would overwrite the statistics the attack is updating). So
:class:`DDPModel` sends a forward through DDP only when it can produce parameter gradients
(grad mode on and some parameter requires grad); every other forward (attacks, ``no_grad``
evaluation) calls the plain module. No method or attack needs to know it runs distributed.

``find_unused_parameters=True`` by default, because a method may leave parameters out of a
step's loss: AAL with ``adv_attention="fixed"`` replaces the attention map, so the attention
layer gets no gradient in the adversarial step. The cost is one traversal of the autograd graph
per step (and a one-time DDP warning for methods that use every parameter). One caveat of DDP
with several training forwards before one backward: the *last* forward must use every parameter
that any of them uses (true for every built-in method).

Example (two CPU processes)::

    torchrun --nproc_per_node=2 -m aal train configs/fashion_mnist/pgd_at.yaml epochs=5
    torchrun --nproc_per_node=2 -m aal train --resume runs/pgd_at-fashion_mnist-20260101-120000
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from aal.data.loader import _mix_seed  # the splitmix hash the loader seeds its streams with
from aal.utils.distributed import (  # noqa: F401 (re-exported: the primitives the evaluator shares)
    _comm_device,
    all_reduce_,
    get_rank,
    get_world_size,
    is_initialized,
    per_process_batch,
    shard_indices,
)
from aal.utils.runtime import get_rng_state, seed_everything, set_rng_state


# ----------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node),
    the collective ``backend`` (None when not distributed), and whether :func:`init_distributed`
    created the process group (then :func:`shutdown` destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    created: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_main_rank() -> bool:
    """Rank 0 of the process group, or of the launcher (``RANK``) when no group exists (yet / any more).

    Use it to print once per job, e.g. after :func:`aal.engine.run.train_run` returned.
    """
    if is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def init_distributed(device: str | torch.device | None = None, backend: str | None = None) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Does nothing (a single-process :class:`DistContext`) when ``WORLD_SIZE`` is unset or 1, and
    returns the existing group's context when one is already initialised.

    Args:
        device: where this process trains: ``"cpu"`` (gloo), ``"cuda"`` (nccl; the process is
            bound to ``cuda:LOCAL_RANK``) or ``None`` (cuda when available).
        backend: override the backend (``"gloo"``, ``"nccl"``).

    Raises:
        RuntimeError: ``WORLD_SIZE > 1`` but torch was built without distributed support.
    """
    if is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0),
                           dist.get_backend(), created=False)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)  # before the group: nccl binds to the current device
    # Import dynamo *before* the group exists. DistributedDataParallel's constructor imports it
    # lazily (``torch._dynamo.utils.get_optimize_ddp_mode()``), and importing it while a group
    # exists leaves references to that group that ``destroy_process_group`` does not drop
    # (measured on torch 2.13: the refcount of ``group.WORLD`` goes 10 -> 20 on the import). The
    # group then outlives ``shutdown``, its gloo threads (``gloo_tcp_loop``, ``pt_gloo_runloop``)
    # run into interpreter finalisation, and a rank can die with "terminate called without an
    # active exception" (SIGABRT) after the run has finished: issue 15 item 9.
    # tests/test_distributed.py::test_shutdown_joins_gloo_threads checks the threads are gone.
    importlib.import_module("torch._dynamo")  # the import is the point (~1.5 s, distributed runs only)

    dist.init_process_group(backend=backend)  # env:// rendezvous (RANK, WORLD_SIZE, MASTER_ADDR/PORT)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, created=True)


def shutdown(ctx: DistContext, completed: bool = True) -> None:
    """Destroy the process group if ``ctx`` says :func:`init_distributed` created it, once, after
    a barrier when every rank ``completed`` (after a failure the others may never arrive).

    The barrier keeps every rank in the group until all are done with it (rank 0 writes
    ``results.json`` after the last collective while the others returned at once). It is *not*
    what fixed the rare SIGABRT at exit of issue 15 item 9: that was the group outliving this call
    (its gloo threads still running at interpreter exit) because ``torch._dynamo`` had been
    imported while the group existed; :func:`init_distributed` imports it before creating the
    group, and after this call no gloo thread is left (tested).
    """
    if not (ctx.created and is_initialized()):
        return
    if completed and get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def rank_seed(seed: int, rank: int | None = None) -> int:
    """The seed of ``rank``'s training RNG streams: ``seed`` itself on rank 0 (so a one-process run
    is unchanged), an unrelated 63-bit seed derived from ``(seed, rank)`` on the others."""
    rank = get_rank() if rank is None else rank
    if rank == 0:
        return int(seed)
    return _mix_seed(int(seed), int(rank), 0x5EED)


# ----------------------------------------------------------------------------- collectives
def broadcast_tensors_(tensors: list[Tensor], src: int = 0) -> None:
    """Overwrite every tensor in place with rank ``src``'s value (any memory format or device)."""
    if get_world_size() == 1:
        return
    dev = _comm_device()
    with torch.no_grad():
        for t in tensors:
            # collectives need dense contiguous buffers: channels_last weights are copied through one
            buf = t.detach().to(dev).contiguous()
            dist.broadcast(buf, src)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled in memory between our own processes)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` on one process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics)."""
    broadcast_tensors_(list(unwrap_model(model).buffers()), src)


def broadcast_model_state(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers."""
    m = unwrap_model(model)
    broadcast_tensors_([*m.parameters(), *m.buffers()], src)


def broadcast_method_state(method: Any, src: int = 0) -> None:
    """Give every rank rank ``src``'s method state (``state_dict()`` tensors), if it has any."""
    if get_world_size() == 1 or not hasattr(method, "state_dict"):
        return
    state = method.state_dict()
    if not state:
        return
    keys = broadcast_object(sorted(state), src)
    if keys != sorted(state):
        raise RuntimeError(f"method state keys differ across ranks: {sorted(state)} vs rank {src}'s {keys}")
    broadcast_tensors_([state[k] for k in keys], src)
    method.load_state_dict(state)


def gather_rng_states() -> list[dict[str, Any]] | None:
    """Every rank's RNG snapshot (:func:`aal.utils.runtime.get_rng_state`), or None on one process."""
    if get_world_size() == 1:
        return None
    return all_gather_object(get_rng_state())


def restore_rank_rng(states: list[dict[str, Any]] | None, fallback_seed: int | None = None) -> None:
    """Restore this rank's RNG from a checkpoint's per-rank snapshots.

    If the checkpoint was written by a different number of processes (or a one-process run),
    ranks cannot continue their own streams: rank 0 keeps the checkpoint's global state and the
    other ranks reseed with :func:`rank_seed` of ``fallback_seed`` (a warning says so).
    """
    world, rank = get_world_size(), get_rank()
    if world == 1:
        return
    if states is not None and len(states) == world:
        set_rng_state(states[rank])
        return
    if rank == 0:
        warnings.warn(
            f"resuming with {world} processes from a checkpoint written by "
            f"{len(states) if states else 1}: random streams (not weights) differ from the uninterrupted run",
            stacklevel=2,
        )
    if rank != 0:
        seed_everything(rank_seed(fallback_seed or 0, rank))


# ----------------------------------------------------------------------------- the model wrapper
class DDPModel(nn.Module):
    """A model for methods under DDP: training forwards go through DDP, all others do not.

    A forward goes through :class:`~torch.nn.parallel.DistributedDataParallel` when it can produce
    parameter gradients (``torch.is_grad_enabled()`` and some parameter requires grad); attack
    forwards (inside :func:`aal.attacks.base.attack_mode`, parameters frozen) and ``no_grad``
    forwards call the wrapped module directly (see the module docstring for why). Attributes
    that are not its own (e.g. a model's ``num_classes``) are looked up on the wrapped module.

    Args:
        module: the model, or an existing ``DistributedDataParallel`` around it.
        find_unused_parameters: passed to DDP (see the module docstring).
        **ddp_kwargs: more DDP arguments (``bucket_cap_mb``, ``gradient_as_bucket_view``, ...).

    Shapes: whatever the module takes and returns (``model(x, attention_map=..., return_attention=...)``
    is passed through unchanged).
    """

    def __init__(self, module: nn.Module, find_unused_parameters: bool = True, **ddp_kwargs: Any) -> None:
        super().__init__()
        if isinstance(module, DistributedDataParallel):
            self.ddp = module
        else:
            p = next(module.parameters(), None)
            if p is not None and p.device.type == "cuda":
                ddp_kwargs.setdefault("device_ids", [p.device.index])
            self.ddp = DistributedDataParallel(module, find_unused_parameters=find_unused_parameters, **ddp_kwargs)

    @property
    def module(self) -> nn.Module:
        """The wrapped plain model (what is saved, evaluated and attacked)."""
        return self.ddp.module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.ddp.module.parameters()):
            return self.ddp(*args, **kwargs)
        return self.ddp.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules ("ddp")
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if "ddp" not in modules:  # half-built (copy, unpickling): no fallback
                raise
            return getattr(modules["ddp"].module, name)


def wrap_model(model: nn.Module, **kwargs: Any) -> nn.Module:
    """``model`` wrapped in :class:`DDPModel` when more than one process runs, else ``model`` itself."""
    if get_world_size() == 1 or isinstance(model, DDPModel):
        return model
    return DDPModel(model, **kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside :class:`DDPModel` / ``DistributedDataParallel`` (else ``model``)."""
    while isinstance(model, (DDPModel, DistributedDataParallel)):
        model = model.module
    return model


__all__ = [
    "DDPModel",
    "DistContext",
    "all_gather_object",
    "all_reduce_",
    "broadcast_buffers",
    "broadcast_method_state",
    "broadcast_model_state",
    "broadcast_object",
    "broadcast_tensors_",
    "gather_rng_states",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_initialized",
    "is_main_rank",
    "per_process_batch",
    "rank_seed",
    "restore_rank_rng",
    "shard_indices",
    "shutdown",
    "unwrap_model",
    "wrap_model",
]
