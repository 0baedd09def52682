"""Run folders: always fresh for a new run, found from any path inside, resumed only as trained.

Used by the one runner of every task (:func:`aal.engine.run.run_task`), so that classification,
few-shot and detection runs behave the same:

* **A new run never writes into an existing folder.** ``out_dir/name`` must not exist (not even
  as a symlink); without ``name`` a timestamped folder gets a ``-1``, ``-2`` ... suffix instead.
  A ``name`` that leaves ``out_dir`` (``..``, an absolute path, a symlinked parent) is refused.
  Everything that can be checked (config, data, batch count, optimizer numbers) is checked
  before the folder is made; a run that fails before its first checkpoint removes the folder
  it made. An interrupted run (Ctrl-C, SIGTERM) keeps it: it resumes.
* **Resume finds the run from any path inside it** (``RUN``, ``RUN/checkpoints``,
  ``RUN/checkpoints/last``, ``RUN/config.yaml``, ...), refuses a run folder whose files are
  symlinks leaving it, and refuses a ``config.yaml`` that differs from the config stored in the
  checkpoint except in :data:`RESUME_MAY_CHANGE`. A run killed before its first checkpoint
  restarts from epoch 1 in the same folder. ``metrics.jsonl`` is cut back to the checkpoint's
  epoch only when the next record is written (so a resume that fails early loses nothing),
  and the temporary folders of a save killed midway are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from aal.config import ConfigError, dump_config
from aal.engine import distributed as dist_utils
from aal.engine.checkpoint import CheckpointError, decode_metadata, read_state, remove_stale_temporaries, resolve_checkpoint

RESUME_MAY_CHANGE = ("epochs", "progress", "threads", "malloc_tune", "checkpoint_every", "out_dir", "name",
                     "data.root", "data.download", "eval", "logger", "compile")
"""Config keys (and whole sections) a resumed run may change: more ``epochs`` extend it (the LR
schedule is recomputed for the new length), the others do not touch the trained weights (the
per-epoch and final evaluations run with the RNG state saved and restored, so ``eval.*`` only
changes what is measured; ``out_dir``/``name``/``data.root`` follow a moved folder; ``logger`` only
adds or drops a mirror of ``metrics.jsonl``; ``compile`` only changes how the same forwards run)."""

ADDED_KEY_DEFAULTS: dict[str, Any] = {"precision": "fp32"}
"""Config keys added after runs were already written, with the value those runs trained with
(so resuming an older run does not see its missing key as a change)."""

RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json", "checkpoints")


class RunFolderError(ValueError):
    """A run folder cannot be used: not a run, a symlink out of it, or an unreadable checkpoints folder."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run; ``run_dir`` is the folder to resume (``aal train --resume``)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def make_run_dir(cfg: Any) -> Path:
    """Create the fresh folder ``out_dir/name`` (or ``out_dir/<method>-<dataset>-<time>[-k]``).

    Raises:
        ConfigError: ``name`` exists already (a finished or running run, a file, a symlink), or it
            leaves ``out_dir``.
    """
    base = Path(cfg.out_dir)
    name = cfg.name or f"{cfg.method.name}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not str(name).strip() or "\0" in str(name):
        raise ConfigError(f"name: not a usable folder name: {str(name)[:80]!r}")
    base.mkdir(parents=True, exist_ok=True)
    root = base.resolve()
    for k in range(10_000):
        path = base / (name if k == 0 else f"{name}-{k}")
        target = path.resolve()  # follows a symlinked parent, `..`, an absolute name
        if not _inside(target, root) or target == root:
            raise ConfigError(f"name: run folder {path} resolves to {target}, outside out_dir {root}; refusing")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            if cfg.name is not None:
                raise ConfigError(
                    f"name: run folder {path} already exists; choose another name (or none, for a fresh "
                    f"timestamped folder), or continue it with `aal train --resume {path}`"
                ) from None
    raise ConfigError(f"name: no free run folder name {name}-k in {base}")


def find_run_dir(path: str | os.PathLike) -> Path:
    """The run folder (resolved) holding ``path``: the folder itself or any path inside it.

    A folder counts as a run when it holds ``config.yaml``; a path *inside* it only when it also
    holds ``checkpoints/`` or ``metrics.jsonl`` (so an unrelated ``config.yaml`` further up is
    never taken for a run).

    Raises:
        FileNotFoundError: nothing at ``path``, or no run folder holds it.
    """
    p = Path(path)
    if not os.path.lexists(p):
        raise FileNotFoundError(f"no run folder or checkpoint at {p}")
    q = p.resolve()
    for cand in (q, *q.parents):
        if (cand / "config.yaml").is_file():
            if cand == q or os.path.lexists(cand / "checkpoints") or os.path.lexists(cand / "metrics.jsonl"):
                return cand
            break
    raise FileNotFoundError(f"no run folder at {p} (no config.yaml in it or in the run folders above it); "
                            "pass a folder made by `aal train`")


def check_run_files(run_dir: Path) -> None:
    """Refuse a run folder whose entries (or those of its ``checkpoints/``) are symlinks leaving it:
    a resume writes ``metrics.jsonl``, ``results.json`` and checkpoints through them."""
    root = run_dir.resolve()
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_symlink() and not _inside(entry.resolve(), root):
                raise RunFolderError(f"{entry} is a symlink to {entry.resolve()}, outside the run folder {root}; refusing to write through it")


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir/checkpoints`` holds a checkpoint (``last`` or a save's ``.last.old``).

    ``False`` only when there is positively none (no ``checkpoints`` entry, or only the
    temporary folder of a first save that was killed): then the run restarts from epoch 1.

    Raises:
        RunFolderError: ``checkpoints`` is not a folder.
        OSError: it cannot be listed (permissions): never taken for "no checkpoint".
    """
    ck = run_dir / "checkpoints"
    if not os.path.lexists(ck):
        return False
    if not ck.is_dir():
        raise RunFolderError(f"{ck} is not a folder; the run's checkpoints cannot be read")
    names = set(os.listdir(ck))
    return bool(names & {"last", ".last.old"})


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], may_change: tuple[str, ...] = RESUME_MAY_CHANGE) -> list[str]:
    """Dotted keys whose values differ between two config dicts, except ``may_change`` (keys or sections)."""
    norm = lambda d: _flat(json.loads(json.dumps(d, default=str)))  # noqa: E731  (tuples -> lists)
    # a checkpoint written before a key existed was trained with that key's default
    a, b = {**ADDED_KEY_DEFAULTS, **norm(saved)}, {**ADDED_KEY_DEFAULTS, **norm(current)}
    free = lambda k: any(k == m or k.startswith(m + ".") for m in may_change)  # noqa: E731
    return sorted(k for k in a.keys() | b.keys() if not free(k) and a.get(k, "<absent>") != b.get(k, "<absent>"))


def check_resume_config(run_dir: Path, config: dict[str, Any] | None) -> None:
    """Refuse to resume when ``config`` differs from the one the checkpoint was trained with.

    Raises:
        ConfigError: a key outside :data:`RESUME_MAY_CHANGE` differs (the first three named).
        CheckpointError: the checkpoint's metadata cannot be read.
    """
    state = read_state(resolve_checkpoint(run_dir))
    extra = state.get("extra")
    saved = decode_metadata(extra.get("config"), f"{run_dir} checkpoint config") if isinstance(extra, dict) else None
    if saved is None or config is None:
        return  # written without a config (library use): nothing to compare
    if not isinstance(saved, dict):
        raise CheckpointError(f"{run_dir}: corrupt checkpoint metadata (the stored config is not a mapping)")
    diffs = config_differences(saved, config)
    if diffs:
        fs, fc = _flat(json.loads(json.dumps(saved, default=str))), _flat(json.loads(json.dumps(config, default=str)))
        shown = "; ".join(f"{k}: {_short(fc.get(k, '<absent>'))} (trained with {_short(fs.get(k, '<absent>'))})" for k in diffs[:3])
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise ConfigError(
            f"--resume: {run_dir / 'config.yaml'} differs from the config its checkpoint was trained with: {shown}{more}; "
            f"only {', '.join(RESUME_MAY_CHANGE)} may change on resume (start a new run for anything else)"
        )


def _short(v: Any, n: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def prepare_run_dir(cfg: Any, run_dir: str | os.PathLike | None, resume: bool, log: Callable[[str], None],
                    dump: Callable[[Any, Path], None] | None = None) -> tuple[Path | None, bool]:
    """The run folder of a run about to train, and whether this call created it.

    Args:
        cfg: the validated run config (``out_dir``, ``name``, ``method.name``, ``data.name``).
        run_dir: ``"auto"`` (a fresh ``out_dir/name`` folder), a folder path (a fresh one for a new
            run, any path inside the run to resume), or ``None`` (no files).
        resume: continue the run at ``run_dir``.
        log: receives ``run folder: PATH`` for a new folder.
        dump: writes the config into a new folder (default :func:`aal.config.dump_config`).

    Raises:
        ConfigError: a new run's folder exists or leaves ``out_dir``.
        FileNotFoundError, RunFolderError: nothing to resume at ``run_dir``.
    """
    if run_dir is None:
        if resume:
            raise ValueError("resume=True needs the run folder as run_dir")
        return None, False
    if resume:
        root = find_run_dir(run_dir)
        check_run_files(root)
        return root, False
    if isinstance(run_dir, str) and run_dir == "auto":
        path = make_run_dir(cfg)
    else:
        path = Path(run_dir)
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            raise ConfigError(f"run folder {path} already exists; a new run needs a fresh folder") from None
    log(f"run folder: {path}")
    try:
        (dump or dump_config)(cfg, path / "config.yaml")
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path, True


def fit_or_resume(trainer: Any, run_dir: Path | None, resume: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Train: from the run's checkpoint when resuming (its config checked first), else from epoch 1.

    A resumed run without a checkpoint (killed before the first one) restarts from epoch 1 in the
    same folder; its old ``metrics.jsonl`` lines are dropped when the first new one is written.
    """
    if not resume or run_dir is None:
        return trainer.fit()
    if dist_utils.is_main_rank():
        remove_stale_temporaries(run_dir / "checkpoints" / "last")
    if has_checkpoint(run_dir):
        check_resume_config(run_dir, trainer.config)
        trainer.load(run_dir)
    else:
        log("no checkpoint in the run folder yet (killed before its first checkpoint): starting from epoch 1")
        trainer.keep_metrics = 0
    return trainer.fit()


@contextmanager
def run_guard(run_dir: Path | None, created: bool) -> Iterator[None]:
    """Around a run's training and evaluation: an interrupt names the folder to resume
    (:class:`RunInterrupted`); any other failure before the first checkpoint removes the
    folder when this run created it (nothing was trained, nothing is left behind)."""
    try:
        yield
    except RunInterrupted:
        raise
    except KeyboardInterrupt as err:
        if run_dir is None:
            raise
        raise RunInterrupted(run_dir) from err
    except BaseException:
        if created and run_dir is not None and _no_checkpoint(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _no_checkpoint(run_dir: Path) -> bool:
    try:
        return not has_checkpoint(run_dir)
    except (OSError, RunFolderError):
        return False  # cannot tell: keep the folder


def run_history(run_dir: Path | None, trainer: Any) -> list[dict[str, Any]]:
    """Every epoch's record of the whole run (``metrics.jsonl``, across resumes); the trainer's
    own records when the run has no folder."""
    path = run_dir / "metrics.jsonl" if run_dir is not None else None
    if path is None or not path.is_file():
        return list(trainer.history)
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def history_seconds(history: list[dict[str, Any]], include_eval: bool = False) -> float:
    """Training seconds of a run's epochs (``epoch_time``, plus ``eval_time`` when ``include_eval``)."""
    keys = ("epoch_time", "eval_time") if include_eval else ("epoch_time",)
    return float(sum(float(r.get(k) or 0.0) for r in history for k in keys))


__all__ = [
    "RESUME_MAY_CHANGE",
    "RunFolderError",
    "RunInterrupted",
    "check_resume_config",
    "check_run_files",
    "config_differences",
    "find_run_dir",
    "fit_or_resume",
    "has_checkpoint",
    "history_seconds",
    "make_run_dir",
    "prepare_run_dir",
    "run_guard",
    "run_history",
]
