"""Checkpoints as safetensors + JSON: loading never unpickles anything.

A checkpoint is a directory::

    CKPT/
      model.safetensors       model.state_dict() (parameters and buffers)
      optimizer.safetensors   optimizer state tensors (momentum buffers, Adam moments, steps)
      method.safetensors      method.state_dict() tensors (only for stateful methods)
      rng.safetensors         torch CPU / CUDA generator states
      state.json              everything else: epoch, scheduler state, optimizer param_groups,
                              Python / NumPy RNG states, user metadata ("extra"), and the index
                              tying JSON entries to tensors of the .safetensors files

Nested states (an optimizer ``state_dict``, a scheduler's) are split by a small codec: every
tensor goes to a ``.safetensors`` file under its path (``state.3.momentum_buffer``) and is
replaced in the JSON by ``{"__tensor__": "<path>"}``; tuples, non-string dict keys and NumPy
arrays are tagged likewise so they round-trip exactly. Anything else (an arbitrary object) is
refused at save time with the path where it was found.

Saving is atomic: files are written (and fsync'ed) into a temporary directory next to ``CKPT``
and renamed into place; the previous checkpoint is renamed aside first and deleted last, and
:func:`load_checkpoint` falls back to it if a crash happened between the two renames. So a
process killed at any instant leaves a complete checkpoint (the old or the new one).

Tensors are saved contiguous (``channels_last`` weights are stored NCHW; loading into a
``channels_last`` model keeps its memory format because ``load_state_dict`` copies in place).
Tensors that share memory (tied weights) are stored once and re-aliased on load.

Example:
    >>> import tempfile, torch, aal
    >>> from aal.engine.checkpoint import save_checkpoint, load_checkpoint
    >>> model = aal.create_model("small_cnn")
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> d = tempfile.mkdtemp()
    >>> save_checkpoint(f"{d}/last", model=model, optimizer=opt, epoch=3, extra={"note": "hi"})  # doctest: +ELLIPSIS
    PosixPath('.../last')
    >>> meta = load_checkpoint(f"{d}/last", model=model, optimizer=opt)
    >>> meta["epoch"], meta["extra"]["note"]
    (3, 'hi')
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from aal.utils.runtime import get_rng_state, set_rng_state

FORMAT = "aal.checkpoint"
VERSION = 1
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- codec
def _encode(obj: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able copy of ``obj``; tensors are moved into ``tensors`` under their path."""
    if isinstance(obj, Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        sub = lambda k: f"{path}.{k}" if path else str(k)  # noqa: E731
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, sub(k), tensors) for k, v in obj.items()}
        # optimizer states are keyed by int parameter indices; JSON objects only take strings
        return {"__items__": [[_encode(k, "", tensors), _encode(v, sub(k), tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {path!r}: only tensors, numbers, strings, "
                    "lists, tuples, dicts and NumPy arrays are stored (no pickling)")


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _pack(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors ready for safetensors: detached, on CPU, contiguous, no two sharing memory.

    Returns:
        ``(to_store, aliases)``: identical views of one storage (tied weights) are stored once
        and recorded as ``aliases[name] = stored_name``; partially overlapping views are copied.
    """
    out: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "meta" and t.numel() > 0:
            view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
            if view in views:
                aliases[name] = views[view]
                continue
            views[view] = name
        t = t.to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0 and ptr in storages:
            t = t.clone()  # a different view of memory already stored: safetensors needs its own copy
            ptr = t.untyped_storage().data_ptr()
        storages.add(ptr)
        out[name] = t
    return out, aliases


def _unpack(tensors: dict[str, Tensor], aliases: dict[str, str]) -> dict[str, Tensor]:
    full = dict(tensors)
    for name, target in aliases.items():
        full[name] = tensors[target]
    return full


# ----------------------------------------------------------------------------- file IO
def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Write ``tensors`` to a safetensors file; returns the alias table to keep in the JSON."""
    store, aliases = _pack(tensors)
    _fsync_write(path, st_save(store, metadata=metadata))
    return aliases


def _read_tensors(path: Path, aliases: dict[str, str] | None = None) -> dict[str, Tensor]:
    return _unpack(st_load(path.read_bytes()), aliases or {})


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON (fsync'ed). Module-level so tests can make it fail on purpose."""
    _fsync_write(path, json.dumps(obj, indent=1).encode())


def _fsync_dir(path: Path) -> None:
    # make the renames themselves durable; not supported on every OS/filesystem (e.g. Windows)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _aside(path: Path) -> Path:
    """Where the previous checkpoint waits while the new one is renamed into place."""
    return path.with_name(f".{path.name}.old")


def resolve_checkpoint(path: PathLike) -> Path:
    """The checkpoint directory for ``path``: a checkpoint, or a run folder (``RUN/checkpoints/last``).

    If a save was interrupted between its two renames, the previous checkpoint (kept aside as
    ``.NAME.old``) is returned.

    Raises:
        FileNotFoundError: nothing loadable there.
    """
    p = Path(path)
    for cand in (p, p / "checkpoints" / "last"):
        if (cand / STATE_FILE).is_file():
            return cand
        if (_aside(cand) / STATE_FILE).is_file():
            return _aside(cand)
    raise FileNotFoundError(
        f"no aal checkpoint at {p} (expected {p}/{STATE_FILE} or {p}/checkpoints/last/{STATE_FILE})"
    )


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    method: Any | None = None,
    epoch: int,
    rng: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint directory at ``path`` (replacing any previous one).

    Args:
        path: the checkpoint directory to create or replace (e.g. ``RUN/checkpoints/last``).
        model: its ``state_dict`` goes to ``model.safetensors``.
        optimizer: optional; state tensors to ``optimizer.safetensors``, param_groups to JSON.
        scheduler: optional LR scheduler (``state_dict`` must hold only tensors, numbers, strings,
            lists, tuples and dicts, as :func:`~aal.engine.optim.build_scheduler`'s does).
        method: optional training method; its ``state_dict()`` tensors go to ``method.safetensors``.
        epoch: number of completed epochs (the epoch a resumed run starts at).
        rng: store the Python, NumPy, torch CPU and CUDA RNG states.
        extra: JSON-able metadata (config, last metrics, ...); tensors inside are stored too.

    Returns:
        ``Path(path)``.

    Raises:
        TypeError: some state holds an object that cannot be stored without pickling.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        state: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "epoch": int(epoch),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__,
        }
        state["model_aliases"] = _write_tensors(tmp / MODEL_FILE, model.state_dict(), {"format": "pt"})
        sections = {"optimizer": optimizer, "method": method, "scheduler": scheduler}
        for key, obj in sections.items():
            if obj is None:
                continue
            tensors: dict[str, Tensor] = {}
            encoded = _encode(obj.state_dict(), "", tensors)
            state[key] = {"state": encoded}
            if tensors:
                state[key]["aliases"] = _write_tensors(tmp / f"{key}.safetensors", tensors)
        if rng:
            tensors = {}
            state["rng"] = {"state": _encode(get_rng_state(), "", tensors)}
            state["rng"]["aliases"] = _write_tensors(tmp / "rng.safetensors", tensors)
        extra_tensors: dict[str, Tensor] = {}
        state["extra"] = _encode(dict(extra or {}), "", extra_tensors)
        if extra_tensors:
            state["extra_aliases"] = _write_tensors(tmp / "extra.safetensors", extra_tensors)
        # state.json last: a directory without it is never mistaken for a checkpoint
        _write_json(tmp / STATE_FILE, state)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _aside(final)
    if old.exists() and final.exists():
        shutil.rmtree(old)  # a leftover from an earlier crash; `final` is complete
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _read_state(ckpt: Path) -> dict[str, Any]:
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{ckpt} is not an aal checkpoint (format={state.get('format')!r})")
    if int(state.get("version", 0)) > VERSION:
        raise ValueError(f"{ckpt} was written by a newer aal (checkpoint version {state['version']} > {VERSION})")
    return state


def _section(ckpt: Path, state: dict[str, Any], key: str) -> Any:
    sec = state[key]
    file = ckpt / f"{key}.safetensors"
    tensors = _read_tensors(file, sec.get("aliases")) if file.is_file() else {}
    return _decode(sec["state"], tensors)


def _match_tuples(saved_groups: list[dict], current_groups: list[dict]) -> None:
    # param_groups hold tuples (Adam's betas); keep the optimizer's own types after a round trip
    for saved, cur in zip(saved_groups, current_groups):
        for k, v in saved.items():
            if isinstance(cur.get(k), tuple) and isinstance(v, list):
                saved[k] = tuple(v)


def load_checkpoint(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    method: Any | None = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` into live objects.

    Args:
        path: a checkpoint directory, or a run folder (its ``checkpoints/last``).
        model: receives the weights (in place, keeping its device and memory format).
        optimizer, scheduler, method: restored when given; the checkpoint must contain them.
        restore_rng: also restore the Python, NumPy and torch RNG states.
        strict: passed to ``model.load_state_dict``.

    Returns:
        metadata: ``{"epoch": int, "extra": dict, "path": str, "saved_at": str, "torch": str}``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: a requested part (optimizer, scheduler, method state) is not in the checkpoint.
    """
    ckpt = resolve_checkpoint(path)
    state = _read_state(ckpt)
    weights = _read_tensors(ckpt / MODEL_FILE, state.get("model_aliases"))
    model.load_state_dict(weights, strict=strict)
    for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("method", method)):
        if obj is None:
            continue
        if key not in state:
            raise ValueError(f"checkpoint {ckpt} holds no {key} state")
        sd = _section(ckpt, state, key)
        if key == "optimizer":
            _match_tuples(sd["param_groups"], obj.state_dict()["param_groups"])
        obj.load_state_dict(sd)
    if restore_rng:
        if "rng" not in state:
            raise ValueError(f"checkpoint {ckpt} holds no RNG state (saved with rng=False); pass restore_rng=False")
        set_rng_state(_section(ckpt, state, "rng"))
    extra_file = ckpt / "extra.safetensors"
    extra_tensors = _read_tensors(extra_file, state.get("extra_aliases")) if extra_file.is_file() else {}
    return {
        "epoch": int(state["epoch"]),
        "extra": _decode(state.get("extra", {}), extra_tensors),
        "path": str(ckpt),
        "saved_at": state.get("saved_at"),
        "torch": state.get("torch"),
    }


def load_model_weights(path: PathLike, model: nn.Module, strict: bool = True) -> nn.Module:
    """Load only the weights, e.g. for evaluation.

    Args:
        path: a checkpoint directory, a run folder, or a ``.safetensors`` file of a state_dict.
        model: the architecture to fill (in place).
        strict: passed to ``model.load_state_dict``.

    Returns:
        ``model``.

    Example:
        >>> import aal  # doctest: +SKIP
        >>> model = load_model_weights("runs/pgd_at/checkpoints/last", aal.create_model("small_cnn"))  # doctest: +SKIP
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        with safe_open(p, framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aal_aliases", "{}"))
        model.load_state_dict(_read_tensors(p, aliases), strict=strict)
        return model
    ckpt = resolve_checkpoint(p)
    state = _read_state(ckpt)
    model.load_state_dict(_read_tensors(ckpt / MODEL_FILE, state.get("model_aliases")), strict=strict)
    return model


def save_model_weights(path: PathLike, model: nn.Module) -> Path:
    """Write ``model.state_dict()`` to one ``.safetensors`` file (tied weights stored once), atomically.

    The file loads with :func:`load_model_weights`; plain ``safetensors.torch.load_file`` also
    reads it, minus the tied duplicates.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        store, aliases = _pack(model.state_dict())
        _fsync_write(tmp, st_save(store, metadata={"format": "pt", "aal_aliases": json.dumps(aliases)}))
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


__all__ = [
    "load_checkpoint",
    "load_model_weights",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_model_weights",
]
