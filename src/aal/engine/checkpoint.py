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

Reading is bounded and checked before anything is allocated: every file must be a regular
file (not a FIFO, a device, or a link to one), ``state.json`` at most :data:`MAX_STATE_BYTES`,
and each ``.safetensors`` header at most :data:`MAX_HEADER_BYTES` and consistent with the file's
size (every tensor's byte range matches its dtype and shape, the ranges fill the data section
exactly). Model tensors are compared by name and shape with the model before their data is
read, and the other files may not exceed :func:`section_byte_limit` of the model's size. Any
corrupt or mismatched file raises :class:`CheckpointError` (one line, naming the file).

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
import stat
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from aal.utils.runtime import get_rng_state, set_rng_state

FORMAT = "aal.checkpoint"
VERSION = 1
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"

PathLike = str | os.PathLike

MAX_HEADER_BYTES = 100 * 2**20
"""Largest ``.safetensors`` header read (the safetensors library's own limit)."""
MAX_STATE_BYTES = 64 * 2**20
"""Largest ``state.json`` read (a real one holds RNG states and the config: kilobytes)."""

# safetensors dtype names -> bytes per element
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, implausible, or does not fit the objects it is loaded into."""


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


def decode_metadata(obj: Any, what: str) -> Any:
    """A JSON entry of ``state.json`` decoded without tensors (e.g. the ``extra["config"]`` a
    trainer stores), for checks that must not read the ``.safetensors`` files.

    Raises:
        CheckpointError: the entry refers to tensors, or its tags are corrupt.
    """
    try:
        return _decode(obj, {})
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{what}: corrupt checkpoint metadata ({type(err).__name__})") from None


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


def _regular_file_size(path: Path, max_bytes: int) -> int:
    """``path``'s size after checking that it is a regular file of at most ``max_bytes``.

    Checked before opening: reading a FIFO or a device (``/dev/zero``) never ends.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing from the checkpoint") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, a device or a folder); refusing to read it")
    if st.st_size > max_bytes:
        raise CheckpointError(f"{path}: {st.st_size} bytes, more than the {max_bytes} a checkpoint file of this model may hold")
    return st.st_size


def read_safetensors_header(path: Path, max_bytes: int) -> dict[str, dict[str, Any]]:
    """The tensor entries of a ``.safetensors`` header, checked against the file's size.

    Args:
        path: the file (must be a regular file of at most ``max_bytes``).
        max_bytes: size limit of the whole file.

    Returns:
        ``{name: {"dtype", "shape", "data_offsets"}}`` (the ``__metadata__`` entry left out).

    Raises:
        CheckpointError: not a regular file, too large, a header longer than
            :data:`MAX_HEADER_BYTES` or than the file, not JSON, or tensor byte ranges that do not
            match their dtype and shape or do not tile the data section exactly.
    """
    size = _regular_file_size(path, max_bytes)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    data_bytes, end = size - 8 - n, 0
    for name, e in entries.items():
        ok = isinstance(e, dict) and e.get("dtype") in _DTYPE_BYTES and isinstance(e.get("shape"), list)
        ok = ok and all(isinstance(d, int) and d >= 0 for d in e["shape"]) and isinstance(e.get("data_offsets"), list)
        if ok:
            numel = 1
            for d in e["shape"]:
                numel *= d
            offs = e["data_offsets"]
            ok = len(offs) == 2 and all(isinstance(o, int) for o in offs) and 0 <= offs[0] <= offs[1] <= data_bytes
            ok = ok and offs[1] - offs[0] == numel * _DTYPE_BYTES[e["dtype"]]
        if not ok:
            raise CheckpointError(f"{path}: tensor {str(name)[:80]!r} has an impossible dtype, shape or byte range "
                                  f"for a {size}-byte file (truncated or corrupt)")
        end = max(end, e["data_offsets"][1])
    if end != data_bytes:
        raise CheckpointError(f"{path}: {data_bytes} data bytes, but the header describes {end} (truncated or corrupt)")
    return entries


def _read_tensors(path: Path, aliases: dict[str, str] | None = None, max_bytes: int = MAX_STATE_BYTES) -> dict[str, Tensor]:
    read_safetensors_header(path, max_bytes)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    try:
        tensors = st_load(data)
    except SafetensorError as err:
        raise CheckpointError(f"{path}: corrupt safetensors file ({err})") from None
    try:
        return _unpack(tensors, aliases or {})
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: its alias table names tensors the file does not hold") from None


def section_byte_limit(model: nn.Module) -> int:
    """Size limit of a checkpoint's other files (optimizer, method, RNG, extra state) for ``model``:
    four times the model's tensor bytes plus 64 MiB (Adam keeps two moments per parameter; the
    RNG and method states are small), so a file cannot claim memory out of proportion to the run."""
    return 4 * _state_bytes(model) + 64 * 2**20


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, Tensor))


def _check_model_header(path: Path, model: nn.Module, aliases: dict[str, str], strict: bool) -> None:
    """Names and shapes of ``path``'s tensors against ``model.state_dict()``, before reading the data."""
    header = read_safetensors_header(path, _state_bytes(model) + MAX_HEADER_BYTES + 8)
    if not isinstance(aliases, dict):
        raise CheckpointError(f"{path}: corrupt alias table in state.json")
    expected = model.state_dict()
    missing = [k for k in expected if aliases.get(k, k) not in header]
    wrong = [f"{k} {tuple(header[aliases.get(k, k)]['shape'])} (model {tuple(v.shape)})"
             for k, v in expected.items() if aliases.get(k, k) in header and list(v.shape) != header[aliases.get(k, k)]["shape"]]
    extra = [k for k in header if k not in expected and k not in aliases.values()] if strict else []
    for what, names in (("missing tensors", missing if strict else []), ("tensors of the wrong shape", wrong),
                        ("tensors the model does not have", extra)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise CheckpointError(f"{path} does not fit this model: {what}: {', '.join(names[:3])}{more} "
                                  "(a different architecture or config?)")


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


def _tmp_name(final: Path) -> str:
    return f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(final: PathLike) -> list[Path]:
    """Delete the temporary folders ``.NAME.tmp-PID-*`` that killed saves of ``final`` left behind.

    A folder is stale when the process that wrote it (the PID in its name) is gone; one of this
    process or of a live process is kept. Nothing else is touched.

    Returns:
        the folders removed.
    """
    final = Path(final)
    prefix = f".{final.name}.tmp-"
    removed = []
    try:
        entries = list(final.parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        pid = entry.name[len(prefix):].split("-", 1)[0] if entry.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def resolve_checkpoint(path: PathLike) -> Path:
    """The checkpoint directory for ``path``: a checkpoint, or a run folder (``RUN/checkpoints/last``).

    If a save was interrupted between its two renames, the previous checkpoint (kept aside as
    ``.NAME.old``) is returned.

    Raises:
        FileNotFoundError: nothing loadable there.
    """
    p = Path(path)
    for cand in (p, p / "checkpoints" / "last"):
        # lexists, not is_file: a state.json that is a FIFO or a dangling link is a corrupt
        # checkpoint (refused when read), not "no checkpoint" (which would restart the run)
        if os.path.lexists(cand / STATE_FILE):
            return cand
        if os.path.lexists(_aside(cand) / STATE_FILE):
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
    remove_stale_temporaries(final)  # left by a process killed mid-save (tens of MB each)
    tmp = final.with_name(_tmp_name(final))
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


def read_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json`` (bounded, checked), without reading any tensor.

    Raises:
        CheckpointError: not a regular file, larger than :data:`MAX_STATE_BYTES`, not JSON, not
            an aal checkpoint, or written by a newer version.
    """
    path = ckpt / STATE_FILE
    _regular_file_size(path, MAX_STATE_BYTES)
    try:
        state = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (not JSON: {str(err)[:80]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{ckpt} is not an aal checkpoint (format={str(got)[:40]!r})")
    version, epoch = state.get("version", 0), state.get("epoch")
    if not isinstance(version, int) or not isinstance(epoch, int) or epoch < 0:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (version or epoch is not a count)")
    if version > VERSION:
        raise CheckpointError(f"{ckpt} was written by a newer aal (checkpoint version {version} > {VERSION})")
    return state



def _section(ckpt: Path, state: dict[str, Any], key: str, max_bytes: int) -> Any:
    sec = state[key]
    file = ckpt / f"{key}.safetensors"
    tensors = _read_tensors(file, sec.get("aliases"), max_bytes) if os.path.lexists(file) else {}
    return _decode(sec["state"], tensors)


def _check_optimizer_state(ckpt: Path, sd: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    # torch's load_state_dict checks group sizes, not the shapes of momentum buffers or moments:
    # a wrong shape would only fail in the first optimizer step, after training started
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, per_param in sd.get("state", {}).items():
        if not isinstance(idx, int) or not 0 <= idx < len(params):
            raise CheckpointError(f"{ckpt}: optimizer state for parameter {idx!r}, but the optimizer has {len(params)}")
        for name, t in per_param.items():
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape != params[idx].shape:
                raise CheckpointError(f"{ckpt}: optimizer {name} of parameter {idx} has shape {tuple(t.shape)}, "
                                      f"the parameter {tuple(params[idx].shape)}")


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
    state = read_state(ckpt)
    limit = section_byte_limit(model)
    try:
        _load_weights(ckpt, state, model, strict)
        for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("method", method)):
            if obj is None:
                continue
            if key not in state:
                raise CheckpointError(f"checkpoint {ckpt} holds no {key} state")
            sd = _section(ckpt, state, key, limit)
            if key == "optimizer":
                _check_optimizer_state(ckpt, sd, obj)
                _match_tuples(sd["param_groups"], obj.state_dict()["param_groups"])
            obj.load_state_dict(sd)
        if restore_rng:
            if "rng" not in state:
                raise CheckpointError(f"checkpoint {ckpt} holds no RNG state (saved with rng=False); pass restore_rng=False")
            set_rng_state(_section(ckpt, state, "rng", limit))
        extra_file = ckpt / "extra.safetensors"
        extra_tensors = _read_tensors(extra_file, state.get("extra_aliases"), limit) if os.path.lexists(extra_file) else {}
        extra = _decode(state.get("extra", {}), extra_tensors)
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        # a state.json whose entries do not fit the files or the live objects: corrupt or edited
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or does not fit this run ({first})") from None
    return {"epoch": int(state["epoch"]), "extra": extra, "path": str(ckpt), "saved_at": state.get("saved_at"),
            "torch": state.get("torch")}


def _load_weights(ckpt: Path, state: dict[str, Any], model: nn.Module, strict: bool) -> None:
    aliases = state.get("model_aliases") or {}
    _check_model_header(ckpt / MODEL_FILE, model, aliases, strict)
    model.load_state_dict(_read_tensors(ckpt / MODEL_FILE, aliases, _state_bytes(model) + MAX_HEADER_BYTES + 8), strict=strict)


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
    if p.suffix == ".safetensors" and os.path.lexists(p) and not p.is_dir():
        aliases = _file_aliases(p, _state_bytes(model) + MAX_HEADER_BYTES + 8)
        state: dict[str, Any] = {"model_aliases": aliases}
        ckpt, name = p.parent, p.name
    else:
        ckpt = resolve_checkpoint(p)
        state, name = read_state(ckpt), MODEL_FILE
    try:
        _check_model_header(ckpt / name, model, state.get("model_aliases") or {}, strict)
        model.load_state_dict(_read_tensors(ckpt / name, state.get("model_aliases"), _state_bytes(model) + MAX_HEADER_BYTES + 8),
                              strict=strict)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{ckpt / name} does not fit this model ({first})") from None
    return model


def _file_aliases(path: Path, max_bytes: int) -> dict[str, str]:
    """The ``aal_aliases`` table a :func:`save_model_weights` file keeps in its header metadata."""
    read_safetensors_header(path, max_bytes)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__") or {}
    try:
        aliases = json.loads(meta.get("aal_aliases", "{}")) if isinstance(meta, dict) else {}
    except (TypeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt alias table in the header metadata") from None
    if not isinstance(aliases, dict):
        raise CheckpointError(f"{path}: corrupt alias table in the header metadata")
    return aliases


def save_model_weights(path: PathLike, model: nn.Module) -> Path:
    """Write ``model.state_dict()`` to one ``.safetensors`` file (tied weights stored once), atomically.

    The file loads with :func:`load_model_weights`; plain ``safetensors.torch.load_file`` also
    reads it, minus the tied duplicates.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(_tmp_name(p))
    try:
        store, aliases = _pack(model.state_dict())
        _fsync_write(tmp, st_save(store, metadata={"format": "pt", "aal_aliases": json.dumps(aliases)}))
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


__all__ = [
    "CheckpointError",
    "decode_metadata",
    "load_checkpoint",
    "load_model_weights",
    "read_safetensors_header",
    "read_state",
    "remove_stale_temporaries",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_model_weights",
]
