"""The one runner: from any registered task's config to a trained, evaluated run folder.

:func:`run_task` owns what every task's run shares (run folder, config dump, optimizer and
schedule, :class:`~aal.engine.Trainer`, resume, DDP, malloc tuning, ``results.json``); the task
(:mod:`aal.tasks.base`) builds the experiment. :func:`train_run` is its classification entry.

A run folder holds::

    config.yaml          the resolved config (re-loadable: ``aal train RUN/config.yaml``)
    metrics.jsonl        one JSON line per epoch, written as training goes
    checkpoints/last/    model + optimizer + scheduler + method state + RNG (safetensors + JSON)
    results.json         the final evaluation (the task's fields: clean / robust accuracy per
                         attack, few-shot accuracy +- CI, mAP) and the whole run's history

Example:
    >>> from aal.config import load_config
    >>> from aal.engine.run import train_run
    >>> cfg = load_config("configs/fashion_mnist/pgd_at.yaml", ["epochs=1"])   # doctest: +SKIP
    >>> run_dir, result = train_run(cfg)                                        # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from aal.config import ConfigError, RunConfig, load_config
from aal.data import DataBundle
from aal.engine import distributed as dist_utils
from aal.engine.checkpoint import STATE_FILE, load_checkpoint, load_model_weights
from aal.engine.optim import build_optimizer, build_scheduler
from aal.engine.rundir import (
    find_run_dir,
    fit_or_resume,
    history_seconds,
    make_run_dir,
    prepare_run_dir,
    run_guard,
    run_history,
)
from aal.engine.tracking import preview_batch
from aal.engine.trainer import Trainer
from aal.eval import EvalResult
from aal.models.purifier import RUN_READERS
from aal.tasks.base import TASKS, RunTask, task_of_config
from aal.tasks.classification import (  # noqa: F401 (re-exported: their home before the task registry)
    Experiment,
    build_method,
    build_model,
    default_channels_last,
    final_eval,
    make_epoch_eval,
)
from aal.tasks.classification import build_experiment as _build_experiment
from aal.utils.precision import native_bf16, precision_record
from aal.utils.runtime import cpu_info, tune_malloc

def check_training_numbers(cfg: Any) -> None:
    """Refuse NaN or infinite optimizer numbers and gradient clipping before anything runs (a NaN
    learning rate passes ``lr > 0`` checks written as ``lr <= 0`` and ruins the first epoch).

    Raises:
        ConfigError: naming the key.
    """
    o = cfg.optim
    for key, value, low in (("optim.lr", o.lr, "> 0"), ("optim.momentum", o.momentum, ">= 0"),
                            ("optim.weight_decay", o.weight_decay, ">= 0"), ("grad_clip", cfg.grad_clip, "> 0")):
        if value is None and key == "grad_clip":
            continue
        ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0)
        if not ok:
            raise ConfigError(f"{key}: must be a finite number {low}, got {value}")


def build_optimization(cfg: Any, model: nn.Module, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and per-iteration LR schedule of a run config's ``optim`` and ``schedule``
    sections (shared by the classification, few-shot and detection runs)."""
    o, s = cfg.optim, cfg.schedule
    check_training_numbers(cfg)
    optimizer = build_optimizer(
        model, o.name, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
    )
    scheduler = build_scheduler(
        optimizer, s.name, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
        milestones=s.milestones, gamma=s.gamma, warmup_epochs=s.warmup_epochs,
    )  # fmt: skip
    return optimizer, scheduler


def resolve_device(name: str, bind: bool = True) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available) as a device.

    With ``bind``, a plain ``cuda`` means the current GPU (under torchrun, the process's own
    ``cuda:LOCAL_RANK``, which :func:`~aal.engine.distributed.init_distributed` selects).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} asked for, but this torch has no CUDA device (torch {torch.__version__})")
    if name == "cuda" and bind:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def build_experiment(cfg: RunConfig) -> Experiment:
    """Data, model, method and training loader for ``cfg`` (seeded), on ``cfg.device``
    (:func:`aal.tasks.classification.build_experiment`)."""
    return _build_experiment(cfg, resolve_device(cfg.device))


class TaskRun(NamedTuple):
    """What :func:`run_task` returns: the folder, the task's final result and ``results.json``'s payload."""

    run_dir: Path | None
    result: Any
    payload: dict[str, Any]


def run_task(
    cfg: Any,
    resume: str | Path | None = None,
    log: Callable[[str], None] = print,
    run_dir: str | Path | None = "auto",
    device: str | torch.device | None = None,
    malloc_tune: bool = False,
    data: Any = None,
) -> TaskRun:
    """Train any registered task's config into a run folder (or resume one), evaluate, write ``results.json``.

    The one runner: the task (:func:`aal.tasks.base.task_of_config`) builds the experiment; the
    run folder, config dump, optimizer and schedule, :class:`~aal.engine.Trainer`, resume, DDP
    and ``results.json`` are the same for every task.

    Args:
        cfg: a validated run config of a registered task.
        resume: continue the run holding this path (any path inside it) from its last
            checkpoint, or from epoch 1 when it was killed before its first one; its config must
            match the checkpoint's but for :data:`aal.engine.rundir.RESUME_MAY_CHANGE`.
        log: receives one-line messages (rank 0 only).
        run_dir: for a new run, ``"auto"`` (``out_dir/name``, or a timestamped folder), a fresh
            folder path, or ``None`` (no files).
        device: overrides the config's device (``"auto"``: CUDA when available).
        malloc_tune: tune glibc malloc first when ``cfg.malloc_tune`` too (``aal train`` sets it;
            ``AAL_NO_MALLOC_TUNE=1`` in the environment turns it off).
        data: an already loaded dataset, for the tasks whose builder takes one (few-shot).

    Under ``torchrun`` (``WORLD_SIZE > 1``) a task with :attr:`~aal.tasks.base.RunTask.distributed`
    trains with DDP (every rank returns the same result, rank 0 alone logs and writes files);
    the others are refused.

    Raises:
        ConfigError: the config, a new run's folder, or ``torchrun`` for a task without DDP.
    """
    task = task_of_config(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not task.distributed:
        ddp = ", ".join(n for n in TASKS.names() if TASKS.get(n).distributed)
        raise ConfigError(f"torchrun: {task.name} runs train in one process (DDP is supported for: {ddp})")
    tune_malloc(malloc_tune and cfg.malloc_tune and os.environ.get("AAL_NO_MALLOC_TUNE", "") not in ("1", "true", "yes"))
    name = task.device_of(cfg) if device is None else device
    dev = name if isinstance(name, torch.device) else resolve_device(name, bind=False)
    # a no-op outside torchrun; it binds a cuda process to its GPU before the model is built
    ctx = dist_utils.init_distributed(device="cuda" if dev.type == "cuda" else "cpu")
    try:
        out = _run(task, cfg, resume, log if dist_utils.is_main_rank() else (lambda _msg: None), run_dir,
                   _bind(dev), data)
    except BaseException:
        dist_utils.shutdown(ctx, completed=False)  # only if this call created the group
        raise
    dist_utils.shutdown(ctx)  # every rank waits there until rank 0 has written results.json
    return out


def _bind(dev: torch.device) -> torch.device:
    # a plain cuda means the current GPU (under torchrun, this process's own cuda:LOCAL_RANK)
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def _run(task: RunTask, cfg: Any, resume: str | Path | None, log: Callable[[str], None], run_dir: str | Path | None,
         device: torch.device, data: Any) -> TaskRun:
    main = dist_utils.is_main_rank()
    exp = task.build(cfg, device) if data is None else task.build(cfg, device, data=data)  # type: ignore[call-arg]
    cfg = exp.cfg  # config, data and batch count checked before any folder exists
    optimizer, scheduler = build_optimization(cfg, exp.model, steps_per_epoch=len(exp.loader))
    # rank 0 names and creates (or finds) the folder (names carry a timestamp); the others are told
    where = run_dir if resume is None else resume
    folder, created = prepare_run_dir(cfg, where, resume is not None, log) if main else (None, False)
    folder = dist_utils.broadcast_object(None if folder is None else str(folder) if main else None)
    folder = None if folder is None else Path(folder)
    with run_guard(folder, created):
        trainer = Trainer(
            exp.model, exp.method, exp.loader, optimizer, scheduler, epochs=cfg.epochs, run_dir=folder,
            evaluate_fn=exp.epoch_eval, eval_every=exp.eval_every, checkpoint_every=cfg.checkpoint_every,
            progress=cfg.progress, grad_clip=cfg.grad_clip, seed=cfg.seed, config=cfg.to_dict(), logger=cfg.logger,
            preview=None if exp.preview is None else preview_batch(exp.preview), log_fn=log if exp.log_epochs else None,
            precision=cfg.precision, compile=cfg.compile,
        )  # fmt: skip
        fit_or_resume(trainer, folder, resume is not None, log)
        history = run_history(folder, trainer)  # the whole run's epochs, across resumes and processes
        t0 = time.perf_counter()
        result = exp.final_eval(cfg.progress and main)
        payload = {
            **exp.result_fields(result),
            "method": cfg.method.name,
            "dataset": cfg.data.name,
            "model": cfg.model.name,
            "epochs": cfg.epochs,
            "train_seconds": history_seconds(history, include_eval=exp.train_seconds_with_eval) if history else None,
            "eval_seconds": time.perf_counter() - t0,
            "history": history,
            "machine": machine_description(),
            "processes": dist_utils.get_world_size(),  # DDP processes that trained and evaluated
            # training arithmetic, and the final evaluation's (fp32 unless a task's evaluation says otherwise)
            "precision": precision_record(cfg.precision, getattr(result, "precision", "fp32")),
        }
        if main and folder is not None:
            (folder / "results.json").write_text(json.dumps(payload, indent=2, default=float))
    return TaskRun(folder, result, payload)


def train_run(cfg: RunConfig, resume: str | Path | None = None, log: Callable[[str], None] = print) -> tuple[Path, EvalResult]:
    """Train a classification ``cfg`` (or resume the run folder ``resume``), evaluate, write ``results.json``.

    :func:`run_task` for classification; under ``torchrun`` it trains with DDP (every rank returns
    the same ``(run_dir, result)``, rank 0 alone logs and writes files).
    """
    out = run_task(cfg, resume=resume, log=log)
    return out.run_dir, out.result  # type: ignore[return-value]


def cpu_identity() -> dict[str, Any]:
    """The machine record's CPU fields: its name and ``cpu_id`` (vendor, family, model, stepping), what
    decides whether a run trained elsewhere can be reproduced bit for bit here."""
    cpu = cpu_info()
    return {"cpu": cpu["name"] or "", "cpu_id": cpu["id"]}


def machine_description() -> dict[str, Any]:
    """Where a figure was measured: CPU (name, family/model, torch's kernel level, native bf16),
    cores, torch version and threads. The CPU's identity matters beyond its name: two "AMD EPYC"
    can differ 40x in bf16 speed and round differently (a run re-trained elsewhere is not
    bit-identical)."""
    commit = None
    try:
        import subprocess

        here = Path(__file__).resolve().parent
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        commit = r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "aal_commit": commit,
        **cpu_identity(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": native_bf16("cpu"),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def find_run_files(path: str | Path) -> tuple[Path, Path]:
    """``(config.yaml, checkpoint)`` for a run folder or a checkpoint path inside one."""
    p = Path(path)
    root = find_run_dir(p)
    # a checkpoint folder or a weights file inside the run is used as given; otherwise the run's last
    own = os.path.lexists(p / STATE_FILE) or (p.suffix == ".safetensors" and not p.is_dir())
    return root / "config.yaml", p if own else root


def load_task_run(path: str | Path, device: str | torch.device | None = None) -> Any:
    """The task's experiment of a trained run folder (or a checkpoint inside one), weights loaded, in eval mode.

    The task comes from the run's ``config.yaml`` (its ``task`` key), which is read unvalidated
    (a run stays loadable when a later version tightens a check); :meth:`RunTask.restore
    <aal.tasks.base.RunTask.restore>` rebuilds it, the checkpoint gives the weights.
    """
    cfg_path, ckpt = find_run_files(path)
    task = task_of_config(cfg_path)
    cfg = task.load_config(cfg_path, validate=False)
    name = task.device_of(cfg) if device is None else device
    native, model = task.restore(cfg, name if isinstance(name, torch.device) else resolve_device(name))
    load_model_weights(ckpt, model)
    model.eval()
    return native


def load_run(path: str | Path) -> tuple[RunConfig, nn.Module, DataBundle]:
    """Rebuild a trained classifier from a run folder (or a checkpoint inside one) and its data."""
    cfg_path, _ = find_run_files(path)
    if task_of_config(cfg_path).name != "classification":
        raise ConfigError(f"{cfg_path}: not a classification run (use aal.engine.run.load_task_run)")
    return load_task_run(path, device="cpu")


@RUN_READERS.register("classifier")
def load_classifier(path: str | os.PathLike, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
    """A trained classifier from an ``aal train`` run folder (or a checkpoint inside one), in eval mode.

    The architecture comes from the run's ``config.yaml``, the weights (normalisation buffers
    included) from its checkpoint. With ``num_classes`` and ``in_channels`` given, the dataset is
    not loaded; otherwise :func:`aal.engine.run.load_run` reads its metadata from the data files.
    """
    if num_classes is None or in_channels is None:
        _, model, _ = load_run(path)
        return model.eval()
    cfg_path, ckpt = find_run_files(path)
    cfg = load_config(cfg_path, validate=False)
    # mean/std are buffers of the model's Normalize layer: the checkpoint restores the real ones
    info = SimpleNamespace(num_classes=int(num_classes), in_channels=int(in_channels),
                           mean=(0.0,) * int(in_channels), std=(1.0,) * int(in_channels))
    model = build_model(cfg, info=info)
    load_model_weights(ckpt, model)
    return model.eval()


@RUN_READERS.register("weights")
def load_run_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Load the checkpoint of the run at ``path`` into ``model`` (strict: the same architecture)."""
    _, ckpt = find_run_files(path)
    load_model_weights(ckpt, model)


__all__ = [
    "load_classifier",
    "load_run_weights",
    "Experiment",
    "build_experiment",
    "build_method",
    "build_model",
    "default_channels_last",
    "final_eval",
    "find_run_files",
    "load_checkpoint",
    "load_run",
    "machine_description",
    "cpu_identity",
    "build_optimization",
    "check_training_numbers",
    "load_task_run",
    "make_epoch_eval",
    "make_run_dir",
    "resolve_device",
    "run_task",
    "TaskRun",
    "train_run",
]
