"""Tasks as registered objects: one interface that the one runner and the CLI ask.

A :class:`RunTask` is what ``task:`` in a run config names (``classification`` when absent). It
turns a config file into a config object, a config object into a :class:`TaskExperiment` (model,
method, training loader, per-epoch and final evaluation, its fields of ``results.json``), and a
run folder back into a trained experiment. Everything else a run does (the run folder, the config
dump, optimizer and schedule, the :class:`~aal.engine.Trainer`, resume, DDP, malloc tuning,
``results.json``) is the same for every task and lives once, in :func:`aal.engine.run.run_task`.

Adding a task: subclass :class:`RunTask`, implement its four abstract methods, and register an
instance with ``TASKS.register("name")`` (CONTRIBUTING.md, "How to add a task").

Example:
    >>> import aal
    >>> from aal.tasks.base import TASKS, task_named
    >>> TASKS.names()
    ['classification', 'detection', 'fewshot']
    >>> task_named("fewshot").name
    'fewshot'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from aal.config import ConfigError, _merge, parse_overrides, read_config_file, short
from aal.registry import Registry

DEFAULT_TASK = "classification"
"""The task of a config without a top-level ``task`` key."""


@dataclass
class TaskExperiment:
    """What the runner needs from a task to train and evaluate one run.

    Attributes:
        cfg: the validated run config (a :class:`aal.config.RunConfigBase` subclass).
        model: the network, on its device.
        method: the training method (:class:`aal.methods.Method`).
        loader: the training loader; ``len(loader)`` is the steps per epoch.
        native: the task's own experiment object (``Experiment``, ``FewShotExperiment``,
            ``DetectionExperiment``), returned by the public ``build_*`` helpers.
        epoch_eval: the trainer's per-epoch evaluation ``fn(model) -> {key: value}`` (or None).
        final_eval: ``fn(progress) -> result``, the evaluation after training.
        result_fields: ``fn(result) -> dict``, the task's own fields of ``results.json`` (the
            runner adds method, dataset, model, epochs, timings, history, machine, processes).
        preview: a few images for the tracker's preview (None: no preview).
        eval_every: run ``epoch_eval`` every this many epochs (and after the last).
        log_epochs: pass the runner's ``log`` to the trainer for its per-epoch summaries.
        train_seconds_with_eval: ``train_seconds`` counts the per-epoch evaluations too.
    """

    cfg: Any
    model: nn.Module
    method: Any
    loader: Any
    native: Any
    epoch_eval: Callable[[nn.Module], dict[str, float]] | None
    final_eval: Callable[[bool], Any]
    result_fields: Callable[[Any], dict[str, Any]]
    preview: Any = None
    eval_every: int = 1
    log_epochs: bool = False
    train_seconds_with_eval: bool = True


class RunTask:
    """A task as the runner sees it. Subclasses set :attr:`name`, :attr:`config_type` and
    implement :meth:`config_from_dict`, :meth:`build` and :meth:`format_result` (and
    :meth:`evaluate` without :attr:`attack_eval`). Reloading a trained run is generic
    (:func:`aal.engine.run.load_task_run`: :meth:`restore`, then the checkpoint's weights).

    Attributes:
        name: the ``task:`` value (registered under it in :data:`TASKS`).
        config_type: the class of its run configs.
        distributed: training under ``torchrun`` (DDP) is supported; otherwise the runner
            refuses ``WORLD_SIZE > 1`` with a one-line :class:`~aal.config.ConfigError`.
        attack_eval: ``aal eval RUN --attacks/--suite`` and ``aal check`` apply (classifiers).
        default_device: where the model goes when neither the config nor the caller says.
    """

    name: str = ""
    config_type: type = object
    distributed: bool = False
    attack_eval: bool = False
    default_device: str = "auto"

    def config_from_dict(self, raw: Mapping[str, Any], validate: bool = True) -> Any:
        """The run config of a loaded YAML mapping (validated unless ``validate=False``)."""
        raise NotImplementedError

    def build(self, cfg: Any, device: torch.device) -> TaskExperiment:
        """Seeded data, model, method and loader of ``cfg``, on ``device``."""
        raise NotImplementedError

    def restore(self, cfg: Any, device: torch.device) -> tuple[Any, nn.Module]:
        """``(native experiment, model)`` of a trained run's config, before its weights are loaded
        (default: :meth:`build`, so the run's data and method come back with it)."""
        exp = self.build(cfg, device)
        return exp.native, exp.model

    def evaluate(self, native: Any, n: int | None = None) -> Any:
        """``aal eval RUN`` for a task without attack evaluation: the final evaluation of the
        first ``n`` test items (default: the config's) of a restored run."""
        raise ConfigError(f"aal eval: {self.name} runs are evaluated with --attacks or --suite")

    def format_result(self, result: Any) -> str:
        """A final evaluation as printed (``aal train``, ``aal eval``)."""
        raise NotImplementedError

    def is_config(self, raw: Any) -> bool:
        """Whether ``raw`` (a config object or a loaded YAML mapping) is one of this task's configs."""
        if type(raw) is self.config_type:  # exactly: another task's config may subclass this one's
            return True
        return isinstance(raw, Mapping) and raw.get("task", DEFAULT_TASK) == self.name

    def device_of(self, cfg: Any) -> str:
        """The device a config asks for (its ``device`` key, else :attr:`default_device`)."""
        return str(getattr(cfg, "device", self.default_device))

    def load_config(self, path: str | os.PathLike | None, overrides: Sequence[str] = (), validate: bool = True) -> Any:
        """Read a YAML config (defaults when ``path`` is None), apply ``key=value`` overrides, build it."""
        raw: dict[str, Any] = {} if self.name == DEFAULT_TASK else {"task": self.name}
        if path is not None:
            raw = read_config_file(path)  # its base: chain resolved
        return self.config_from_dict(_merge(raw, parse_overrides(overrides)), validate=validate)


TASKS: Registry[RunTask] = Registry("task")
"""Every run task by name; an entry's factory is the task object itself (``TASKS.get(name)``)."""


def register_task(task: RunTask) -> RunTask:
    """Register a task object under ``task.name`` (its class docstring is ``aal list``'s summary)."""
    TASKS.register(task.name)(task)  # type: ignore[arg-type]
    return task


def task_named(name: Any) -> RunTask:
    """The registered task ``name``.

    Raises:
        ConfigError: an unknown name, listing the known ones.
    """
    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(f"task: unknown task {short(name)} (known: {', '.join(TASKS.names())})")
    return TASKS.get(name)  # type: ignore[return-value]


def task_of_config(cfg: Any) -> RunTask:
    """The task of a config object, a loaded YAML mapping or a config file path.

    A file or mapping names it with its top-level ``task`` key (``classification`` without one,
    or when the path is None or not a file: the CLI then reports the missing file itself).

    Raises:
        ConfigError: an unknown ``task`` value.
    """
    tasks: list[RunTask] = [TASKS.get(n) for n in TASKS.names()]  # type: ignore[misc]
    # the exact config class first: a task's config may subclass another's (e.g. of RunConfig)
    for match in (lambda t: type(cfg) is t.config_type, lambda t: isinstance(cfg, t.config_type)):
        found = [t for t in tasks if match(t)]
        if found:
            return found[0]
    if cfg is None or isinstance(cfg, (str, os.PathLike)):
        if cfg is None or not Path(cfg).is_file():
            return task_named(DEFAULT_TASK)
        cfg = read_config_file(cfg)  # a base file may name the task
    raw = cfg.get("task", DEFAULT_TASK) if isinstance(cfg, Mapping) else DEFAULT_TASK
    return task_named(raw)


__all__ = ["DEFAULT_TASK", "RunTask", "TASKS", "TaskExperiment", "register_task", "task_named", "task_of_config"]
