"""Run orchestration of the few-shot and detection tasks: build, train into a run folder, reload.

The tasks (:mod:`aal.tasks.fewshot`, :mod:`aal.tasks.detection`) own their config section, data,
loss and evaluation; wiring them to a model, a method, the :class:`~aal.engine.Trainer` and a run
folder is the engine's job, so it lives here (classification's is :mod:`aal.engine.run`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from aal.config import read_yaml_file
from aal.data.fewshot import FEWSHOT_DATASETS, EpisodeLoader, EpisodeSampler, FewShotData
from aal.data.voc import DetectionLoader, load_voc
from aal.engine.checkpoint import load_model_weights, resolve_checkpoint
from aal.engine.run import build_optimization, find_run_files, machine_description
from aal.engine.rundir import fit_or_resume, history_seconds, prepare_run_dir, run_guard, run_history
from aal.engine.trainer import Trainer
from aal.methods import create_method
from aal.models import create_model
from aal.tasks.detection import (
    DATASET_CLASSES,
    DetectionExperiment,
    DetectionRunConfig,
    DetectionTask,
    detection_config_from_dict,
    load_detection_config,
)
from aal.tasks.fewshot import FewShotExperiment, FewShotRunConfig, fewshot_config
from aal.utils.precision import precision_record
from aal.utils.runtime import resolve_device, seed_everything


# ----------------------------------------------------------------------------- few-shot
def build_fewshot_experiment(
    cfg: FewShotRunConfig | Mapping[str, Any],
    data: FewShotData | None = None,
    device: str | torch.device | None = "auto",
) -> FewShotExperiment:
    """Data, embedding model, episodic method and episode loader for a few-shot config (seeded).

    Args:
        cfg: a :class:`FewShotRunConfig` or a config dict (a loaded YAML with ``task: fewshot``).
        data: an already loaded dataset (skips reading the files again, e.g. across seeds).
        device: where the model and the episodes go (``"auto"``: CUDA when available).

    The model is ``create_model(model.name, num_classes=0, ...)``: the embedding network, with
    the dataset's meta-train mean/std inside it when ``model.normalize``.

    Example:
        >>> exp = build_fewshot_experiment({"task": "fewshot", "data": {"episodes": 2}})  # doctest: +SKIP
        >>> len(exp.loader), exp.method.name                                             # doctest: +SKIP
        (2, 'protonet')
    """
    cfg = cfg if isinstance(cfg, FewShotRunConfig) else fewshot_config(cfg)
    seed_everything(cfg.seed)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    d = cfg.data
    if data is None:
        data = FEWSHOT_DATASETS.get(d.name)(root=d.root, download=d.download, **dict(d.options))
    m = cfg.model
    mean, std = data.stats() if m.normalize else (None, None)
    model = create_model(
        m.name, num_classes=0, in_channels=data.in_channels, mean=mean, std=std,
        attention=None if m.attention == "none" else m.attention, channels_last=bool(m.channels_last), **dict(m.options),
    )  # fmt: skip
    device = resolve_device(device)
    model.to(device)
    method = create_method(cfg.method.name, **dict(cfg.method.params))
    sampler = EpisodeSampler(data.train, d.n_way, d.k_shot, d.n_query, seed=cfg.seed)
    loader = EpisodeLoader(sampler, d.episodes, seed=cfg.seed, device=device)
    return FewShotExperiment(cfg, data, model, method, loader)


def train_fewshot(
    cfg: FewShotRunConfig | Mapping[str, Any],
    run_dir: str | Path | None = None,
    data: FewShotData | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    device: str | torch.device | None = "auto",
) -> tuple[Path | None, dict[str, Any]]:
    """Meta-train with the :class:`~aal.engine.Trainer`, then evaluate; write ``results.json``.

    Args:
        cfg: as :func:`build_fewshot_experiment`.
        run_dir: the run folder (``config.yaml``, ``metrics.jsonl``, ``checkpoints/last``,
            ``results.json``); ``"auto"``: ``out_dir/name``, or ``out_dir/<method>-<dataset>-<time>``
            when the config has no ``name`` (as ``aal train``); ``None`` writes nothing. A new run needs a fresh
            folder (:mod:`aal.engine.rundir`).
        data: a loaded dataset to reuse.
        resume: continue the run holding ``run_dir`` (any path inside it) from its last
            checkpoint, or from epoch 1 when it has none yet; its config must match the
            checkpoint's but for :data:`aal.engine.rundir.RESUME_MAY_CHANGE`.
        log: receives one-line messages.
        device: as :func:`build_fewshot_experiment`.

    Returns:
        ``(run_dir, results)`` where ``results["fewshot"]`` maps ``"5way1shot"`` etc. (and
        ``"runs_20way1shot"`` for Omniglot's runs) to :func:`evaluate_fewshot`'s dicts.
    """
    exp = build_fewshot_experiment(cfg, data, device)
    cfg = exp.cfg
    optimizer, scheduler = build_optimization(cfg, exp.model, steps_per_epoch=len(exp.loader))
    run_dir, created = prepare_run_dir(cfg, run_dir, resume, log)  # after every check that needs no folder
    with run_guard(run_dir, created):
        trainer = Trainer(
            exp.model, exp.method, exp.loader, optimizer, scheduler, epochs=cfg.epochs, run_dir=run_dir,
            evaluate_fn=exp.epoch_eval_fn(), checkpoint_every=cfg.checkpoint_every, progress=cfg.progress,
            grad_clip=cfg.grad_clip, seed=cfg.seed, config=cfg.to_dict(), logger=cfg.logger, precision=cfg.precision,
            compile=cfg.compile,
        )  # fmt: skip
        fit_or_resume(trainer, run_dir, resume, log)
        history = run_history(run_dir, trainer)  # the whole run's epochs, across resumes
        t0 = time.perf_counter()
        results = exp.final_eval(progress=cfg.progress)
        for key, r in results.items():
            log(f"{key}: {100 * r['mean']:.2f} +- {100 * r['ci95']:.2f} % ({r['n']} episodes)")
        payload = {
            "fewshot": results,
            "method": cfg.method.name,
            "dataset": cfg.data.name,
            "model": cfg.model.name,
            "epochs": cfg.epochs,
            "episodes_per_epoch": cfg.data.episodes,
            "train_seconds": history_seconds(history, include_eval=True),
            "eval_seconds": time.perf_counter() - t0,
            "history": history,
            "machine": machine_description(),
            "precision": precision_record(cfg.precision),  # the episodes are evaluated in fp32
        }
        if run_dir is not None:
            (run_dir / "results.json").write_text(json.dumps(payload, indent=2, default=float))
    return run_dir, payload


def load_fewshot_run(path: str | Path, device: str | torch.device | None = "auto") -> FewShotExperiment:
    """The experiment of a few-shot run folder (its ``config.yaml``) with the trained weights loaded.

    Example:
        >>> exp = load_fewshot_run("runs/protonet-omniglot-20250101-000000")  # doctest: +SKIP
        >>> exp.final_eval(episodes=600)                                      # doctest: +SKIP
    """
    p = Path(path)
    folder = next((d for d in [p, *p.parents] if (d / "config.yaml").is_file()), None)
    if folder is None:
        raise FileNotFoundError(f"no config.yaml in {p} or its parents; pass a few-shot run folder")
    raw = read_yaml_file(folder / "config.yaml")
    exp = build_fewshot_experiment(fewshot_config(raw, validate=False), device=device)
    load_model_weights(resolve_checkpoint(p), exp.model)
    exp.model.eval()
    return exp


# ----------------------------------------------------------------------------- detection
def build_detection_experiment(
    cfg: DetectionRunConfig | Mapping[str, Any], device: str | torch.device | None = "auto"
) -> DetectionExperiment:
    """Data, detector, method, task and training loader for a detection config (seeded).

    Args:
        cfg: a :class:`DetectionRunConfig` or the nested dict of a YAML file (``task: detection``).
        device: where the model and the batches go (``"auto"``: CUDA when available).

    The model is ``create_model(model.name, num_classes=len(classes), image_size=data.image_size,
    ...)`` with the training split's per-channel mean/std inside it when ``model.normalize``.

    Example:
        >>> exp = build_detection_experiment({"task": "detection", "data": {"train_n": 4}})  # doctest: +SKIP
        >>> exp.method.name, len(exp.train)                                                   # doctest: +SKIP
        ('detection', 4)
    """
    if not isinstance(cfg, DetectionRunConfig):
        cfg = detection_config_from_dict(cfg)
    seed_everything(cfg.seed)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dev = resolve_device(device)
    d = cfg.data
    classes = d.classes or DATASET_CLASSES[d.name]
    read = dict(classes=classes, image_size=d.image_size, name=d.name)
    train = load_voc(d.root, d.train_split, max_images=d.train_n, **read)
    val = load_voc(d.root, d.val_split, max_images=d.val_n, **read) if d.val_split else None
    test = load_voc(d.root, d.test_split, max_images=d.test_n, **read)
    m = cfg.model
    mean, std = train.channel_stats() if m.normalize else (None, None)
    model = create_model(
        m.name, num_classes=len(classes), mean=mean, std=std, attention=None if m.attention == "none" else m.attention,
        channels_last=bool(m.channels_last), image_size=d.image_size, **dict(m.options),
    ).to(dev)  # fmt: skip
    method = create_method(cfg.method.name, **dict(cfg.method.params))
    e = cfg.eval
    task = DetectionTask(
        eval_iou=e.iou_threshold, score_threshold=e.score_threshold, nms_threshold=e.nms_threshold, top_k=e.top_k
    )
    loader = DetectionLoader(
        train, d.batch_size, shuffle=True, drop_last=len(train) >= 2 * d.batch_size, augment=d.augment, seed=cfg.seed,
        device=dev, channels_last=bool(m.channels_last),
    )  # fmt: skip
    return DetectionExperiment(cfg, train, val, test, model, method, task, loader)


def train_detection(
    cfg: DetectionRunConfig | Mapping[str, Any],
    run_dir: str | Path | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    device: str | torch.device | None = "auto",
) -> tuple[Path | None, dict[str, Any]]:
    """Train with the :class:`~aal.engine.Trainer`, then evaluate on the clean test split; write ``results.json``.

    Args:
        cfg: as :func:`build_detection_experiment`.
        run_dir: the run folder (``config.yaml``, ``metrics.jsonl``, ``checkpoints/last``,
            ``results.json``); ``"auto"``: ``out_dir/name``, or ``out_dir/<method>-<dataset>-<time>``
            without a ``name`` (as ``aal train``); ``None`` writes nothing. A new run needs a fresh
            folder (:mod:`aal.engine.rundir`).
        resume: continue the run holding ``run_dir`` (any path inside it) from its last
            checkpoint, or from epoch 1 when it has none yet; its config must match the
            checkpoint's but for :data:`aal.engine.rundir.RESUME_MAY_CHANGE`.
        log: receives one-line messages (the epoch summaries when ``progress``).
        device: as :func:`build_detection_experiment`.

    Returns:
        ``(run_dir, results)``: ``results["test"]`` is ``{"map50": ..., "ap50/<class>": ...}``;
        also ``method``, ``dataset``, ``model``, ``image_size``, ``epochs``, ``seed``, image counts,
        ``train_seconds``, ``eval_seconds``, ``history`` (the per-epoch records) and ``machine``.
    """
    exp = build_detection_experiment(cfg, device)
    cfg = exp.cfg
    optimizer, scheduler = build_optimization(cfg, exp.model, steps_per_epoch=len(exp.loader))
    run_dir, created = prepare_run_dir(cfg, run_dir, resume, log)  # after every check that needs no folder
    with run_guard(run_dir, created):
        trainer = Trainer(
            exp.model, exp.method, exp.loader, optimizer, scheduler, epochs=cfg.epochs, run_dir=run_dir,
            evaluate_fn=exp.epoch_eval(), eval_every=cfg.eval.every, checkpoint_every=cfg.checkpoint_every,
            progress=cfg.progress, grad_clip=cfg.grad_clip, seed=cfg.seed, config=cfg.to_dict(), logger=cfg.logger,
            log_fn=log if cfg.progress else None, precision=cfg.precision, compile=cfg.compile,
        )  # fmt: skip
        fit_or_resume(trainer, run_dir, resume, log)
        history = run_history(run_dir, trainer)  # the whole run's epochs, across resumes
        t0 = time.perf_counter()
        test = exp.final_eval()
        log("test " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()))
        results = {
            "test": test,
            "method": cfg.method.name,
            "dataset": cfg.data.name,
            "model": cfg.model.name,
            "image_size": cfg.data.image_size,
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "train_images": len(exp.train),
            "test_images": len(exp.test),
            "train_seconds": history_seconds(history, include_eval=True),
            "eval_seconds": time.perf_counter() - t0,
            "history": history,
            "machine": machine_description(),
            "precision": precision_record(cfg.precision),  # the test split is evaluated in fp32
        }
        if run_dir is not None:
            (run_dir / "results.json").write_text(json.dumps(_plain_json(results), indent=2))
    return run_dir, results


def load_detection_run(path: str | Path, device: str | torch.device | None = "auto") -> DetectionExperiment:
    """Rebuild a trained detection run (data, model with its weights, method, task) from its folder.

    Args:
        path: a run folder written by :func:`train_detection` (``config.yaml`` +
            ``checkpoints/last``), or a checkpoint inside one.
        device: as :func:`build_detection_experiment`.

    Example:
        >>> exp = load_detection_run("runs/detection_aal-bccd-20250101-000000")  # doctest: +SKIP
        >>> exp.final_eval()["map50"]                                            # doctest: +SKIP
    """
    cfg_path, ckpt = find_run_files(path)
    exp = build_detection_experiment(load_detection_config(cfg_path), device)
    load_model_weights(ckpt, exp.model)
    exp.model.eval()
    return exp


def _plain_json(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain_json(x) for x in v]
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


__all__ = [
    "build_detection_experiment",
    "build_fewshot_experiment",
    "load_detection_run",
    "load_fewshot_run",
    "train_detection",
    "train_fewshot",
]
