"""The few-shot and detection entry points of the one runner (:func:`aal.engine.run.run_task`).

Thin wrappers kept for their callers (tests, benchmarks, notebooks): the tasks
(:mod:`aal.tasks.fewshot`, :mod:`aal.tasks.detection`) build the experiment, the runner trains it
into a run folder, :func:`aal.engine.run.load_task_run` reloads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from aal.data.fewshot import FewShotData
from aal.engine.run import load_task_run, run_task
from aal.tasks.base import task_of_config
from aal.tasks.detection import (  # noqa: F401 (re-exported: their home before the task registry)
    DetectionExperiment,
    DetectionRunConfig,
    build_detection_experiment,
    detection_config_from_dict,
)
from aal.tasks.fewshot import FewShotExperiment, FewShotRunConfig, build_fewshot_experiment, fewshot_config  # noqa: F401


def _train(cfg: Any, run_dir: str | Path | None, resume: bool, log: Callable[[str], None],
           device: str | torch.device | None, data: Any = None) -> tuple[Path | None, dict[str, Any]]:
    if resume and run_dir is None:  # never train from scratch when a resume was asked for
        raise ValueError("resume=True needs the run folder as run_dir")
    out = run_task(cfg, resume=run_dir if resume else None, log=log, run_dir=None if resume else run_dir,
                   device=device, data=data)
    log(task_of_config(cfg).format_result(out.result))
    return out.run_dir, out.payload


def train_fewshot(
    cfg: FewShotRunConfig | Mapping[str, Any],
    run_dir: str | Path | None = None,
    data: FewShotData | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    device: str | torch.device | None = "auto",
) -> tuple[Path | None, dict[str, Any]]:
    """Meta-train a few-shot config with the one runner, then evaluate; write ``results.json``.

    Args:
        cfg: a :class:`FewShotRunConfig` or a config dict (``task: fewshot``).
        run_dir: the run folder; ``"auto"``: ``out_dir/name`` or a timestamped folder (as
            ``aal train``); ``None`` writes nothing. A new run needs a fresh folder.
        data: a loaded dataset to reuse.
        resume: continue the run holding ``run_dir`` (which must be given) from its last
            checkpoint, or from epoch 1 when it has none yet.
        log: receives one-line messages.
        device: where the model trains (``"auto"``: CUDA when available).

    Returns:
        ``(run_dir, results)`` where ``results["fewshot"]`` maps ``"5way1shot"`` etc. (and
        ``"runs_20way1shot"`` for Omniglot's runs) to :func:`~aal.tasks.fewshot.evaluate_fewshot`'s dicts.
    """
    cfg = cfg if isinstance(cfg, FewShotRunConfig) else fewshot_config(cfg)
    return _train(cfg, run_dir, resume, log, device, data)


def load_fewshot_run(path: str | Path, device: str | torch.device | None = "auto") -> FewShotExperiment:
    """The experiment of a few-shot run folder with the trained weights loaded (:func:`~aal.engine.run.load_task_run`)."""
    return load_task_run(path, device)


def train_detection(
    cfg: DetectionRunConfig | Mapping[str, Any],
    run_dir: str | Path | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    device: str | torch.device | None = "auto",
) -> tuple[Path | None, dict[str, Any]]:
    """Train a detection config with the one runner, then evaluate on the clean test split; write ``results.json``.

    Args: as :func:`train_fewshot` (no ``data``).

    Returns:
        ``(run_dir, results)``: ``results["test"]`` is ``{"map50": ..., "ap50/<class>": ...}``;
        also ``method``, ``dataset``, ``model``, ``image_size``, ``epochs``, ``seed``, image counts,
        ``train_seconds``, ``eval_seconds``, ``history`` (the per-epoch records) and ``machine``.
    """
    cfg = cfg if isinstance(cfg, DetectionRunConfig) else detection_config_from_dict(cfg)
    return _train(cfg, run_dir, resume, log, device)


def load_detection_run(path: str | Path, device: str | torch.device | None = "auto") -> DetectionExperiment:
    """Rebuild a trained detection run (data, model with its weights, method, task) from its folder."""
    return load_task_run(path, device)


__all__ = [
    "build_detection_experiment",
    "build_fewshot_experiment",
    "load_detection_run",
    "load_fewshot_run",
    "train_detection",
    "train_fewshot",
]
