"""Image classification as a registered run task (the default ``task``).

The config is :class:`aal.config.RunConfig`; the model a classifier of :data:`aal.models.MODELS`;
the per-epoch and final evaluations are clean and robust accuracy (:func:`aal.eval.evaluate`).
The evaluator lives a layer above the tasks, so it is looked up by name at call time in the
``evaluator`` registry (:data:`aal.eval.EVALUATORS`, filled when :mod:`aal.eval` is imported),
as :mod:`aal.config` looks up the registries above it.

Example:
    >>> import aal
    >>> from aal.tasks.base import task_named
    >>> cfg = task_named("classification").load_config(None, ["epochs=1"])
    >>> cfg.epochs, cfg.method.name
    (1, 'pgd_at')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from aal.config import ConfigError, RunConfig, config_from_dict, method_params
from aal.data import BatchLoader, DataBundle, Split, load_data
from aal.models import create_model
from aal.registry import lookup
from aal.tasks.base import RunTask, TaskExperiment, register_task
from aal.utils import distributed as dist_utils
from aal.utils.runtime import seed_everything


def default_channels_last(model_name: str) -> bool:
    """The memory format used when ``model.channels_last`` is not set: channels_last.

    Measured on this 2-core CPU, side by side: ResNet-18 train/attack steps 1.16-1.29x faster
    (NCHW max-pooling was 12x slower), and PGD-5 on the small CNN (batch 128, one thread)
    1.27x faster. Every registered model is convolutional, so it is the default for all;
    ``model.channels_last=false`` turns it off.
    """
    return True


def _channels_last(cfg: RunConfig) -> bool:
    m = cfg.model
    return default_channels_last(m.name) if m.channels_last is None else m.channels_last


def build_model(cfg: RunConfig, bundle: DataBundle | None = None, info: Any = None) -> nn.Module:
    """The model described by ``cfg.model`` for the dataset's channels, classes and statistics."""
    info = info if info is not None else bundle.info  # type: ignore[union-attr]
    m = cfg.model
    return create_model(
        m.name,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        mean=info.mean if m.normalize else None,
        std=info.std if m.normalize else None,
        attention=None if m.attention == "none" else m.attention,
        channels_last=_channels_last(cfg),
        head=m.head,
        head_scale=m.head_scale,
        **dict(m.options),
    )


def build_method(cfg: RunConfig) -> Any:
    """The training method with its validated hyper-parameters."""
    return lookup("method").create(cfg.method.name, **method_params(cfg))


def _evaluate(*args: Any, **kwargs: Any) -> Any:
    # aal.eval.evaluate, by name: eval sits above the tasks (tests/test_layering.py)
    return lookup("evaluator").get("classification")(*args, **kwargs)


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
        res = _evaluate(model, split, attacks=e.epoch_attacks, eps=e.eps, batch_size=e.batch_size, n=e.epoch_n, seed=e.seed,
                        distributed=True)  # sharded over ranks under torchrun; the usual call otherwise
        return {f"{which}_{k}": v for k, v in res.accuracy.items()}

    return fn


def final_eval(cfg: RunConfig, model: nn.Module, bundle: DataBundle, progress: bool = False) -> Any:
    """The final evaluation (an :class:`aal.eval.EvalResult`) on the test split with full, unmasked attacks."""
    e = cfg.eval
    return _evaluate(
        model, bundle.test, attacks=e.attacks, eps=e.eps, batch_size=e.batch_size, n=e.n, seed=e.seed, progress=progress,
        distributed=True,  # sharded over ranks under torchrun; the usual call otherwise
    )


@dataclass
class Experiment:
    """Everything a classification run needs, built from a config."""

    cfg: RunConfig
    bundle: DataBundle
    model: nn.Module
    method: Any
    loader: BatchLoader


def build_experiment(cfg: RunConfig, device: torch.device | str = "cpu") -> Experiment:
    """Data, model, method and training loader for ``cfg`` (seeded), the model on ``device``.

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
    model = build_model(cfg, bundle).to(device)
    method = build_method(cfg)
    loader = BatchLoader(
        bundle.train, batch_size=batch_size, shuffle=True, drop_last=True, augment=d.augment, padding=d.padding,
        seed=cfg.seed, rank=dist_utils.get_rank(), world_size=world, channels_last=_channels_last(cfg),
    )  # fmt: skip
    return Experiment(cfg, bundle, model, method, loader)


class ClassificationTask(RunTask):
    """Image classification: clean and robust accuracy under attack (the default task)."""

    name = "classification"
    config_type = RunConfig
    distributed = True
    attack_eval = True
    default_device = "cpu"

    def config_from_dict(self, raw: Mapping[str, Any], validate: bool = True) -> RunConfig:
        return config_from_dict(raw, validate=validate)

    def build(self, cfg: RunConfig, device: torch.device) -> TaskExperiment:
        exp = build_experiment(cfg, device)
        bundle = exp.bundle
        return TaskExperiment(
            cfg=cfg, model=exp.model, method=exp.method, loader=exp.loader, native=exp,
            epoch_eval=make_epoch_eval(cfg, bundle),
            final_eval=lambda progress: final_eval(cfg, exp.model, bundle, progress=progress),
            # what the pixels are, e.g. "CIFAR-10 (JPEG-q75 re-encoding)" for the JPEG zip
            result_fields=lambda result: {"eval": result.to_dict(), "dataset_source": bundle.info.description},
            preview=bundle.test, train_seconds_with_eval=False,
        )  # fmt: skip

    def restore(self, cfg: RunConfig, device: torch.device) -> tuple[Any, nn.Module]:
        """``((cfg, model, bundle), model)``: the data as stored (no download, no training subset,
        no loader), the model built for it; nothing seeded."""
        d = cfg.data
        bundle = load_data(d.name, root=d.root, val_fraction=d.val_fraction, seed=cfg.seed, download=False)
        model = build_model(cfg, bundle)
        return (cfg, model, bundle), model

    def format_result(self, result: Any) -> str:
        return result.table()


CLASSIFICATION = register_task(ClassificationTask())

__all__ = [
    "CLASSIFICATION", "ClassificationTask", "Experiment", "build_experiment", "build_method", "build_model",
    "default_channels_last", "final_eval", "make_epoch_eval",
]  # fmt: skip
