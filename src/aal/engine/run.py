"""From a :class:`~aal.config.RunConfig` to a trained, evaluated run folder.

A run folder holds::

    config.yaml          the resolved config (re-loadable: ``aal train RUN/config.yaml``)
    metrics.jsonl        one JSON line per epoch, written as training goes
    checkpoints/last/    model + optimizer + scheduler + method state + RNG (safetensors + JSON)
    results.json         the final evaluation (clean / robust accuracy per attack)

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from aal.config import ConfigError, RunConfig, load_config, method_params
from aal.data import BatchLoader, DataBundle, Split, load_data
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
from aal.eval import EvalResult, evaluate
from aal.methods import Method, create_method
from aal.models import create_model
from aal.models.purifier import RUN_READERS
from aal.utils.precision import precision_record
from aal.utils.runtime import seed_everything

def default_channels_last(model_name: str) -> bool:
    """The memory format used when ``model.channels_last`` is not set: channels_last.

    Measured on this 2-core CPU, side by side: ResNet-18 train/attack steps 1.16-1.29x faster
    (NCHW max-pooling was 12x slower), and PGD-5 on the small CNN (batch 128, one thread)
    1.27x faster. Every registered model is convolutional, so it is the default for all;
    ``model.channels_last=false`` turns it off.
    """
    return True


def build_model(cfg: RunConfig, bundle: DataBundle | None = None, info: Any = None) -> nn.Module:
    """The model described by ``cfg.model`` for the dataset's channels, classes and statistics."""
    info = info if info is not None else bundle.info  # type: ignore[union-attr]
    m = cfg.model
    channels_last = default_channels_last(m.name) if m.channels_last is None else m.channels_last
    return create_model(
        m.name,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        mean=info.mean if m.normalize else None,
        std=info.std if m.normalize else None,
        attention=None if m.attention == "none" else m.attention,
        channels_last=channels_last,
        head=m.head,
        head_scale=m.head_scale,
        **dict(m.options),
    )


def build_method(cfg: RunConfig) -> Method:
    """The training method with its validated hyper-parameters."""
    return create_method(cfg.method.name, **method_params(cfg))


def _eval_split(bundle: DataBundle) -> Split:
    return bundle.val if bundle.val is not None and len(bundle.val) > 0 else bundle.test


def make_epoch_eval(cfg: RunConfig, bundle: DataBundle) -> Callable[[nn.Module], dict[str, float]] | None:
    """Per-epoch evaluation on the validation split (or the first test images if there is none)."""
    e = cfg.eval
    if e.epoch_n == 0 or not e.epoch_attacks:
        return None
    split = _eval_split(bundle)
    which = "val" if split is bundle.val else "test"

    def fn(model: nn.Module) -> dict[str, float]:
        res = evaluate(model, split, attacks=e.epoch_attacks, eps=e.eps, batch_size=e.batch_size, n=e.epoch_n, seed=e.seed,
                       distributed=True)  # sharded over ranks under torchrun; the usual call otherwise
        return {f"{which}_{k}": v for k, v in res.accuracy.items()}

    return fn


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


@dataclass
class Experiment:
    """Everything a run needs, built from a config."""

    cfg: RunConfig
    bundle: DataBundle
    model: nn.Module
    method: Method
    loader: BatchLoader


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
    """Data, model, method and training loader for ``cfg`` (seeded).

    Under ``torch.distributed`` (initialise it first, e.g. :func:`~aal.engine.distributed.init_distributed`)
    the loader yields this rank's shard with ``data.batch_size / world_size`` images per batch;
    the model is initialised from the same seed on every rank.
    """
    seed_everything(cfg.seed)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    d = cfg.data
    world = dist_utils.get_world_size()
    try:  # data.batch_size is the global batch; checked before the data is loaded
        batch_size = dist_utils.per_process_batch(d.batch_size, world)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    bundle = load_data(d.name, root=d.root, val_fraction=d.val_fraction, seed=cfg.seed, download=d.download)
    if d.train_n is not None:
        bundle.train = bundle.train.subset(d.train_n)
    if len(bundle.train) < d.batch_size:  # drop_last: not one full batch per epoch
        raise ConfigError(f"data.batch_size: {d.batch_size} is larger than the {len(bundle.train)} training images "
                          f"of {d.name}{f' (data.train_n={d.train_n})' if d.train_n is not None else ''}")
    model = build_model(cfg, bundle).to(resolve_device(cfg.device))
    method = build_method(cfg)
    channels_last = default_channels_last(cfg.model.name) if cfg.model.channels_last is None else cfg.model.channels_last
    loader = BatchLoader(
        bundle.train,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        augment=d.augment,
        padding=d.padding,
        seed=cfg.seed,
        rank=dist_utils.get_rank(),
        world_size=world,
        channels_last=channels_last,
    )
    return Experiment(cfg, bundle, model, method, loader)


def final_eval(cfg: RunConfig, model: nn.Module, bundle: DataBundle, progress: bool = False) -> EvalResult:
    """The final evaluation on the test split with full, unmasked attacks."""
    e = cfg.eval
    return evaluate(
        model, bundle.test, attacks=e.attacks, eps=e.eps, batch_size=e.batch_size, n=e.n, seed=e.seed, progress=progress,
        distributed=True,  # sharded over ranks under torchrun; the usual call otherwise
    )


def train_run(cfg: RunConfig, resume: str | Path | None = None, log: Callable[[str], None] = print) -> tuple[Path, EvalResult]:
    """Train ``cfg`` (or resume the run folder ``resume``), evaluate, write ``results.json``.

    Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) it joins the process group
    (gloo: training runs on the CPU) and trains with DDP (:mod:`aal.engine.distributed`); every
    rank returns the same ``(run_dir, result)``, rank 0 alone logs and writes files.
    """
    # a no-op outside torchrun; it binds a cuda process to its GPU before the model is built
    ctx = dist_utils.init_distributed(device="cuda" if resolve_device(cfg.device, bind=False).type == "cuda" else "cpu")
    try:
        out = _train_run(cfg, resume, log if dist_utils.is_main_rank() else (lambda _msg: None))
    except BaseException:
        dist_utils.shutdown(ctx, completed=False)  # only if this call created the group
        raise
    dist_utils.shutdown(ctx)  # every rank waits there until rank 0 has written results.json
    return out


def _train_run(cfg: RunConfig, resume: str | Path | None, log: Callable[[str], None]) -> tuple[Path, EvalResult]:
    main = dist_utils.is_main_rank()
    exp = build_experiment(cfg)  # config, data and batch count checked before any folder exists
    optimizer, scheduler = build_optimization(cfg, exp.model, steps_per_epoch=len(exp.loader))
    # rank 0 names and creates (or finds) the folder (names carry a timestamp); the others are told
    run_dir, created = prepare_run_dir(cfg, "auto" if resume is None else resume, resume is not None, log) if main else (None, False)
    run_dir = Path(dist_utils.broadcast_object(str(run_dir) if main else None))
    with run_guard(run_dir, created):
        trainer = Trainer(
            exp.model, exp.method, exp.loader, optimizer, scheduler, epochs=cfg.epochs, run_dir=run_dir,
            evaluate_fn=make_epoch_eval(cfg, exp.bundle), checkpoint_every=cfg.checkpoint_every,
            progress=cfg.progress, grad_clip=cfg.grad_clip, seed=cfg.seed, config=cfg.to_dict(),
            logger=cfg.logger, preview=preview_batch(exp.bundle.test), precision=cfg.precision,
            compile=cfg.compile,
        )
        fit_or_resume(trainer, run_dir, resume is not None, log)
        t0 = time.perf_counter()
        result = final_eval(cfg, exp.model, exp.bundle, progress=cfg.progress and main)
        if main:
            _write_results(cfg, run_dir, result, time.perf_counter() - t0, run_history(run_dir, trainer),
                           exp.bundle.info.description)
    return run_dir, result


def _write_results(
    cfg: RunConfig, run_dir: Path, result: EvalResult, eval_seconds: float, history: list[dict], source: str
) -> None:
    payload = {
        "eval": result.to_dict(),
        "eval_seconds": eval_seconds,
        "method": cfg.method.name,
        "dataset": cfg.data.name,
        # what the pixels are, e.g. "CIFAR-10 (JPEG-q75 re-encoding)" for the JPEG zip
        "dataset_source": source,
        "model": cfg.model.name,
        "epochs": cfg.epochs,
        "train_seconds": history_seconds(history) if history else None,  # every epoch, across resumes
        "machine": machine_description(),
        "processes": dist_utils.get_world_size(),  # DDP processes that trained and evaluated
        "precision": precision_record(cfg.precision, result.precision),
    }
    (run_dir / "results.json").write_text(json.dumps(payload, indent=2))


def machine_description() -> dict[str, Any]:
    """Where a figure was measured: CPU model, cores, torch version and threads."""
    import os
    import platform

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
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
        "cpu": cpu,
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


def load_run(path: str | Path) -> tuple[RunConfig, nn.Module, DataBundle]:
    """Rebuild a trained model from a run folder (or a checkpoint inside one) and its data."""
    cfg_path, ckpt = find_run_files(path)
    cfg = load_config(cfg_path, validate=False)
    d = cfg.data
    bundle = load_data(d.name, root=d.root, val_fraction=d.val_fraction, seed=cfg.seed, download=False)
    model = build_model(cfg, bundle)
    load_model_weights(ckpt, model)
    model.eval()
    return cfg, model, bundle


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
    "build_optimization",
    "check_training_numbers",
    "make_run_dir",
    "train_run",
]
