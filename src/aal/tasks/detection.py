"""Object detection as an :mod:`aal` task (AAL paper, seed 001, Sec. 4.2): SSD on a VOC-layout dataset.

A task says two things, nothing more (CONTRIBUTING.md): **what loss the attack maximises** and
**what metric is reported**. For detection:

* the attacked loss is SSD's multibox loss of each image's own targets, per image (B,)
  (:meth:`DetectionTask.attack_loss`, a ``loss_fn(outputs, targets) -> (B,)`` that every
  attack of :mod:`aal.attacks` and :func:`aal.attention.associative_attention` accept);
* the metric is VOC mAP@0.5 with per-class AP (:meth:`DetectionTask.evaluate`,
  :mod:`aal.tasks.detection_metrics`) on clean images ("the clean validation set is used for
  testing", Sec. 4.2).

Also here: the config section for YAML configs (``configs/detection/*.yaml``,
:func:`load_detection_config`) and the registered run task (:func:`build_detection_experiment`,
:class:`DetectionRunTask`); the one runner (:func:`aal.engine.run.run_task`) lives in the engine, the figure
(:func:`aal.viz.detection_grid`: image with ground-truth boxes, x', M, M^a, k(M^a), |x'-x|) in viz.

Example:
    >>> import torch, aal
    >>> from aal.tasks.detection import DetectionTask
    >>> model = aal.create_model("ssd_resnet18", num_classes=3, image_size=64)
    >>> targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.6]]), "labels": torch.tensor([2])}] * 2
    >>> task = DetectionTask()
    >>> x_adv = aal.attacks.PGD(eps=2 / 255, steps=2, loss=task.attack_loss(model))(model, torch.rand(2, 3, 64, 64), targets)
    >>> tuple(x_adv.shape)
    (2, 3, 64, 64)
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from aal.config import ConfigError, RunConfigBase
from aal.registry import lookup
from aal.data.voc import BCCD_CLASSES, DETECTION_AUGMENTATIONS, VOC_CLASSES, DetectionLoader, DetectionSplit, load_voc
from aal.models import create_model
from aal.tasks.base import RunTask, TaskExperiment, register_task
from aal.utils.distributed import get_rank, get_world_size, per_process_batch
from aal.utils.modes import eval_mode
from aal.utils.serialize import jsonable
from aal.utils.runtime import resolve_device, seed_everything
from aal.tasks.detection_metrics import DetectionMAP, DetectionMetrics
from aal.models.ssd import SSD, MultiBoxLossOutput, match_targets, multibox_loss, postprocess

Targets = Sequence[dict[str, Tensor]]


def detector_of(model: nn.Module) -> SSD:
    """The :class:`~aal.models.ssd.SSD` inside ``model`` (itself, or a wrapped submodule).

    Raises:
        TypeError: there is none (a classifier was given to a detection method).
    """
    if isinstance(model, SSD):
        return model
    for m in model.modules():
        if isinstance(m, SSD):
            return m
    raise TypeError(
        f"detection needs an SSD detector (e.g. create_model('ssd_resnet18', ...)); got {type(model).__name__}"
    )


@dataclass(frozen=True)
class DetectionTask:
    """Detection: the multibox loss an attack maximises and the VOC mAP reported.

    Args:
        iou_threshold: default-box matching threshold of the loss (SSD: 0.5).
        neg_pos_ratio: hard negatives per positive (SSD: 3).
        loc_weight: weight of the localisation term (SSD: 1).
        eval_iou: IoU threshold of the metric (0.5: mAP@0.5).
        score_threshold, nms_threshold, top_k: detection output (SSD: 0.01, 0.45, 200).
    """

    iou_threshold: float = 0.5
    neg_pos_ratio: float = 3.0
    loc_weight: float = 1.0
    eval_iou: float = 0.5
    score_threshold: float = 0.01
    nms_threshold: float = 0.45
    top_k: int = 200

    name = "detection"
    metric = "map50"

    def __post_init__(self) -> None:
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must lie in (0, 1], got {self.iou_threshold}")
        if self.neg_pos_ratio < 0 or self.loc_weight < 0:
            raise ValueError(f"neg_pos_ratio and loc_weight must be >= 0, got {self.neg_pos_ratio}, {self.loc_weight}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    # ------------------------------------------------------------------------- the loss
    def match(self, model: nn.Module, targets: Targets) -> tuple[Tensor, Tensor]:
        """Targets matched to the model's default boxes once: ``(loc_t (B,P,4), conf_t (B,P))``."""
        det = detector_of(model)
        return match_targets(targets, det.priors, self.iou_threshold, det.variances)

    def loss(self, model: nn.Module, outputs: Tensor, targets: Targets | tuple[Tensor, Tensor]) -> MultiBoxLossOutput:
        """The multibox loss parts of ``outputs`` (B,P,4+K+1) for ``targets`` (dicts or :meth:`match`'s result)."""
        det = detector_of(model)
        return multibox_loss(
            outputs, targets, det.priors, iou_threshold=self.iou_threshold, neg_pos_ratio=self.neg_pos_ratio,
            loc_weight=self.loc_weight, variances=det.variances,
        )  # fmt: skip

    def attack_loss(self, model: nn.Module) -> Callable[[Tensor, Any], Tensor]:
        """The per-image loss ``(outputs, targets) -> (B,)`` an attack on ``model`` ascends.

        Each image's multibox loss normalised by its own number of positives (so an image's
        gradient does not depend on the rest of the batch). Targets may be the list of dicts or
        :meth:`match`'s pre-matched pair.
        """

        def loss_fn(outputs: Tensor, targets: Any) -> Tensor:
            return self.loss(model, outputs, targets).per_image()

        return loss_fn

    # ------------------------------------------------------------------------- the metric
    def detect(self, model: nn.Module, images: Tensor) -> list[dict[str, Tensor]]:
        """Detections for ``images`` with this task's output settings (model mode unchanged)."""
        det = detector_of(model)
        with torch.no_grad():
            out = model(images)
        return postprocess(out, det.priors, det.variances, self.score_threshold, self.nms_threshold, self.top_k)

    def evaluate(
        self,
        model: nn.Module,
        data: DetectionSplit | Iterable[tuple[Tensor, Targets]],
        *,
        batch_size: int = 32,
        class_names: Sequence[str] | None = None,
        transform: Callable[[Tensor, Targets], Tensor] | None = None,
    ) -> DetectionMetrics:
        """VOC AP per class and mAP of ``model`` on clean (or ``transform``-ed) images, in eval mode.

        Args:
            model: the detector (its mode is restored afterwards).
            data: a :class:`~aal.data.voc.DetectionSplit` or an iterable of ``(images, targets)``.
            batch_size: for a split.
            class_names: names for the report (default: the split's classes).
            transform: optional ``(images, targets) -> images`` applied before detection (e.g.
                an attack, to measure robustness).

        Returns:
            :class:`~aal.tasks.detection_metrics.DetectionMetrics` (``.map``, ``.ap``,
            ``.as_dict()`` -> ``{"map50": ..., "ap50/<class>": ...}``).
        """
        det = detector_of(model)
        if isinstance(data, DetectionSplit):
            class_names = class_names or data.classes
            data = DetectionLoader(data, batch_size, device=next(model.parameters()).device)
        metric = DetectionMAP(det.num_classes, self.eval_iou, class_names)
        with eval_mode(model):  # every submodule's mode restored after, even on an error
            for images, targets in data:
                if transform is not None:
                    images = transform(images, targets)
                metric.update(self.detect(model, images), targets)
        return metric.compute()


DATASET_CLASSES: dict[str, tuple[str, ...]] = {"bccd": BCCD_CLASSES, "voc": VOC_CLASSES}
"""Default class lists of the VOC-layout datasets known by name (others need ``data.classes``)."""


@dataclass(frozen=True)
class DetectionDataConfig:
    """Data of a detection run (VOC layout).

    Attributes:
        name: dataset name (``bccd``, ``voc``, or any name with ``classes`` and ``root`` given).
        root: the VOC folder or its parent (default: ``$AAL_DATA/<name>``).
        classes: class names (default: by ``name``).
        image_size: square input side S (and the SSD's default-box layout).
        train_split, val_split, test_split: ``ImageSets/Main`` names (``val_split`` may be null:
            no per-epoch evaluation).
        batch_size: training batch size.
        augment: ``none``, ``flip``, ``photometric``, ``flip_photometric``.
        train_n, val_n, test_n: read only the first n ids of a split (quick runs).
    """

    name: str = "bccd"
    root: str | None = None
    classes: tuple[str, ...] | None = None
    image_size: int = 160
    train_split: str = "train"
    val_split: str | None = "val"
    test_split: str = "test"
    batch_size: int = 16
    augment: str = "flip_photometric"
    train_n: int | None = None
    val_n: int | None = None
    test_n: int | None = None


@dataclass(frozen=True)
class DetectionEvalConfig:
    """Evaluation of a detection run: VOC mAP on clean images.

    Attributes:
        iou_threshold: the metric's IoU threshold (0.5: mAP@0.5).
        score_threshold, nms_threshold, top_k: detection output (SSD: 0.01, 0.45, 200).
        batch_size: evaluation batch size.
        every: evaluate on the validation split every this many epochs (and after the last).
    """

    iou_threshold: float = 0.5
    score_threshold: float = 0.01
    nms_threshold: float = 0.45
    top_k: int = 200
    batch_size: int = 32
    every: int = 1


@dataclass(frozen=True)
class DetectionRunConfig(RunConfigBase):
    """A detection training run (``task: detection`` in the YAML).

    The top-level keys are :class:`aal.config.RunConfigBase`'s (24 epochs by default); the
    ``model``, ``method``, ``optim`` and ``schedule`` sections are those of
    :class:`aal.config.RunConfig`; ``data`` and ``eval`` are the detection ones above.
    """

    epochs: int = 24
    task: str = "detection"
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    model: Any = None
    method: Any = None
    optim: Any = None
    schedule: Any = None
    eval: DetectionEvalConfig = field(default_factory=DetectionEvalConfig)


def detection_config_from_dict(raw: Mapping[str, Any]) -> DetectionRunConfig:
    """Build and validate a :class:`DetectionRunConfig` from a nested dict (a loaded YAML).

    Raises:
        aal.config.ConfigError: unknown keys or names, or impossible values (the message names the key).
    """
    from aal.config import (ConfigError, MethodConfig, ModelConfig, OptimConfig, ScheduleConfig, _build_section, check_kwargs,
                            check_run_fields, clip, coerce, short)
    METHODS = lookup("method")  # late lookup: the methods build on the tasks (see tests/test_layering.py)
    from aal.models import MODELS

    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(raw).__name__}")
    sections = {
        "data": DetectionDataConfig, "eval": DetectionEvalConfig, "model": ModelConfig, "method": MethodConfig,
        "optim": OptimConfig, "schedule": ScheduleConfig,
    }  # fmt: skip
    hints = typing.get_type_hints(DetectionRunConfig)
    # sections (or their names) left out get the detection defaults, not the classification ones
    defaults = {"model": {"name": "ssd_resnet18", "attention": "cbam"}, "method": {"name": "detection"}, "optim": {"lr": 0.01}}
    raw = {**{k: {} for k in sections}, **raw}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in sections:
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a mapping, got {short(value)}")
            kwargs[key] = _build_section(sections[key], {**defaults.get(key, {}), **(value or {})}, key)
        elif key in hints:
            kwargs[key] = coerce(value, hints[key], key)
        else:
            raise ConfigError(f"unknown key '{clip(key, 60)}' (known: {', '.join(hints)})")
    cfg = DetectionRunConfig(**kwargs)
    if cfg.task != "detection":
        raise ConfigError(f"task: a detection config must say task: detection, got {short(cfg.task)}")
    check_run_fields(cfg)
    d = cfg.data
    if d.classes is None and d.name not in DATASET_CLASSES:
        raise ConfigError(f"data.classes: dataset {short(d.name)} has no default class list (known: {', '.join(DATASET_CLASSES)})")
    if d.augment not in DETECTION_AUGMENTATIONS:
        raise ConfigError(f"data.augment: must be one of {', '.join(DETECTION_AUGMENTATIONS)}; got {short(d.augment)}")
    if d.image_size < 32:
        raise ConfigError(f"data.image_size: must be >= 32, got {d.image_size}")
    if d.batch_size < 1:
        raise ConfigError(f"data.batch_size: must be > 0, got {d.batch_size}")
    m = cfg.model
    if m.name not in MODELS or getattr(MODELS.get(m.name), "task", None) != "detection":
        dets = [n for n in MODELS.names() if getattr(MODELS.get(n), "task", None) == "detection"]
        raise ConfigError(f"model.name: {short(m.name)} is not a detector (detectors: {', '.join(dets)})")
    options = check_kwargs(MODELS.get(m.name), m.options, "model", skip=("num_classes", "in_channels", "mean", "std", "attention", "image_size"))
    if cfg.method.name not in METHODS or getattr(METHODS.get(cfg.method.name), "batch_type", None) != "detection":
        ms = [n for n in METHODS.names() if getattr(METHODS.get(n), "batch_type", None) == "detection"]
        raise ConfigError(f"method.name: {short(cfg.method.name)} is not a detection method (known: {', '.join(ms)})")
    params = check_kwargs(METHODS.get(cfg.method.name), cfg.method.params, "method")
    try:
        METHODS.create(cfg.method.name, **params)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method ({cfg.method.name}): {err}") from err
    if m.attention == "none" and str(params.get("kernel", "m2")).lower() != "one" and cfg.method.name == "detection_aal":
        raise ConfigError("model.attention: detection_aal needs an attention map (e.g. model.attention=cbam), got none")
    if cfg.eval.every < 1:
        raise ConfigError(f"eval.every: must be > 0, got {cfg.eval.every}")
    return dataclasses.replace(
        cfg, model=dataclasses.replace(m, options=options), method=dataclasses.replace(cfg.method, params=params)
    )


def load_detection_config(path: str | Path | None, overrides: Sequence[str] = ()) -> DetectionRunConfig:
    """Load a detection YAML config and apply ``key=value`` overrides (e.g. ``data.image_size=300``);
    :meth:`aal.tasks.base.RunTask.load_config` of :data:`DETECTION`."""
    return DETECTION.load_config(path, overrides)


@dataclass
class DetectionExperiment:
    """Everything a detection run needs (built by :func:`build_detection_experiment`)."""

    cfg: DetectionRunConfig
    train: DetectionSplit
    val: DetectionSplit | None
    test: DetectionSplit
    model: nn.Module
    method: Any
    task: DetectionTask
    loader: DetectionLoader

    def evaluate(self, split: DetectionSplit, n: int | None = None) -> dict[str, float]:
        """``{"map50": ..., "ap50/<class>": ...}`` of the model on (the first ``n`` images of) ``split``, clean."""
        if n is not None:
            split = split.subset(n)
        return self.task.evaluate(self.model, split, batch_size=self.cfg.eval.batch_size).as_dict()

    def final_eval(self, n: int | None = None) -> dict[str, float]:
        """Test-split VOC mAP@0.5 and per-class AP (the first ``n`` test images; default all)."""
        return self.evaluate(self.test, n)

    def epoch_eval(self) -> Callable[[nn.Module], dict[str, float]] | None:
        """The trainer's ``evaluate_fn``: mAP on the validation split (None without one)."""
        if self.val is None:
            return None
        return lambda model: {f"val_{k}": v for k, v in self.evaluate(self.val).items()}  # type: ignore[arg-type]


def is_detection_config(raw: Any) -> bool:
    """Whether a loaded YAML mapping (or a config object) describes a detection run (``task: detection``)."""
    if isinstance(raw, DetectionRunConfig):
        return True
    return isinstance(raw, Mapping) and raw.get("task") == "detection"


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
    method = lookup("method").create(cfg.method.name, **dict(cfg.method.params))  # methods build on the tasks
    e = cfg.eval
    task = DetectionTask(
        eval_iou=e.iou_threshold, score_threshold=e.score_threshold, nms_threshold=e.nms_threshold, top_k=e.top_k
    )
    world = get_world_size()
    try:  # data.batch_size is the global batch: each process takes its share (DetectionLoader)
        per_process = per_process_batch(d.batch_size, world)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    loader = DetectionLoader(
        train, per_process, shuffle=True, drop_last=len(train) >= 2 * d.batch_size, augment=d.augment, seed=cfg.seed,
        device=dev, channels_last=bool(m.channels_last), rank=get_rank(), world_size=world,
    )  # fmt: skip
    return DetectionExperiment(cfg, train, val, test, model, method, task, loader)


class DetectionRunTask(RunTask):
    """Object detection: SSD on a VOC-layout dataset, VOC mAP@0.5 (AAL paper, Sec. 4.2)."""

    name = "detection"
    config_type = DetectionRunConfig
    distributed = True  # each process takes its share of every global batch (DetectionLoader)

    def config_from_dict(self, raw: Mapping[str, Any], validate: bool = True) -> DetectionRunConfig:
        # a detection config is always validated: its builder needs the coerced values
        return detection_config_from_dict(raw)

    def build(self, cfg: DetectionRunConfig, device: torch.device) -> TaskExperiment:
        exp = build_detection_experiment(cfg, device)
        c = exp.cfg
        return TaskExperiment(
            cfg=c, model=exp.model, method=exp.method, loader=exp.loader, native=exp, epoch_eval=exp.epoch_eval(),
            final_eval=lambda progress: exp.final_eval(),
            result_fields=lambda test: jsonable({
                "test": test, "image_size": c.data.image_size, "seed": c.seed, "train_images": len(exp.train),
                "test_images": len(exp.test),
            }),
            eval_every=c.eval.every, log_epochs=c.progress,
        )  # fmt: skip

    def evaluate(self, native: DetectionExperiment, n: int | None = None) -> dict[str, float]:
        return native.final_eval(n=n)

    def format_result(self, result: Mapping[str, Any]) -> str:
        return "\n".join(f"{key:<24} {value}" for key, value in result.items())


DETECTION = register_task(DetectionRunTask())


__all__ = [
    "DETECTION", "DetectionRunTask", "build_detection_experiment",
    "DATASET_CLASSES", "DetectionDataConfig", "DetectionEvalConfig", "DetectionExperiment", "DetectionRunConfig",
    "DetectionTask", "detection_config_from_dict", "detector_of", "is_detection_config", "load_detection_config",
]  # fmt: skip
