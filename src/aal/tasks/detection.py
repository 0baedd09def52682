"""Object detection as an :mod:`aal` task (AAL paper, seed 001, Sec. 4.2): SSD on a VOC-layout dataset.

A task says two things, nothing more (DEVELOPERS.md): **what loss the attack maximises** and
**what metric is reported**. For detection:

* the attacked loss is SSD's multibox loss of each image's own targets, per image (B,)
  (:meth:`DetectionTask.attack_loss`, a ``loss_fn(outputs, targets) -> (B,)`` that every
  attack of :mod:`aal.attacks` and :func:`aal.attention.associative_attention` accept);
* the metric is VOC mAP@0.5 with per-class AP (:meth:`DetectionTask.evaluate`,
  :mod:`aal.eval.detection_metrics`) on clean images ("the clean validation set is used for
  testing", Sec. 4.2).

Also here: the experiment builder for YAML configs (``configs/detection/*.yaml``):
:func:`load_detection_config`, :func:`build_detection_experiment`, :func:`train_detection`,
and the figure :func:`detection_grid` (image with ground-truth boxes, x', M, M^a, k(M^a), |x'-x|).

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
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from aal.data.voc import BCCD_CLASSES, DETECTION_AUGMENTATIONS, VOC_CLASSES, DetectionLoader, DetectionSplit, load_voc
from aal.eval.detection_metrics import DetectionMAP, DetectionMetrics
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
            :class:`~aal.eval.detection_metrics.DetectionMetrics` (``.map``, ``.ap``,
            ``.as_dict()`` -> ``{"map50": ..., "ap50/<class>": ...}``).
        """
        det = detector_of(model)
        if isinstance(data, DetectionSplit):
            class_names = class_names or data.classes
            data = DetectionLoader(data, batch_size, device=next(model.parameters()).device)
        metric = DetectionMAP(det.num_classes, self.eval_iou, class_names)
        was_training = model.training
        model.eval()
        try:
            for images, targets in data:
                if transform is not None:
                    images = transform(images, targets)
                metric.update(self.detect(model, images), targets)
        finally:
            model.train(was_training)
        return metric.compute()


# ----------------------------------------------------------------------------- figure
def detection_grid(
    model: nn.Module,
    images: Tensor,
    targets: Targets,
    out_path: str | Path,
    *,
    method: Any = None,
    n: int = 4,
    class_names: Sequence[str] | None = None,
    show_detections: bool = True,
    score_threshold: float = 0.5,
    max_detections: int = 20,
    title: str | None = None,
    dpi: int = 100,
    **method_params: Any,
) -> Path:
    """PNG of AAL for detection: one row per image, columns

    ``image + GT boxes | x' (selective) | M | M^a | k(M^a) | |x' - x|`` (+ ``detections`` on x).

    Ground-truth boxes are drawn on the image and on the three maps (whose resolution is the
    attention layer's, stretched over the image's square), so one sees whether the foreground
    kernel puts the budget on the objects. Maps share the [0,1] colour scale; the perturbation
    uses [0, eps]. Matplotlib's object API with the Agg canvas (no display, no pyplot state).

    Args:
        model: an SSD with an attention layer.
        images: (B,3,S,S) in [0,1]; targets: B target dicts (normalised boxes).
        out_path: PNG path (parents created).
        method: a :class:`aal.methods.detection.DetectionAAL` (default: one built from
            ``method_params``, e.g. ``eps=2/255``).
        n: rows.
        class_names: for the box labels.
        show_detections: add a column with the model's detections (score >= ``score_threshold``,
            at most ``max_detections`` per image).

    Returns:
        the path written.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from aal.methods.detection import DetectionAAL
    from aal.viz import finish_grid, map_styles

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if method is None:
        method = DetectionAAL(**method_params)
    elif method_params:
        raise ValueError("give either a method or its parameters, not both")
    n = min(n, images.shape[0])
    x, tg = images[:n].detach(), list(targets[:n])
    x_adv, res, mask = method.craft(model, x, tg)
    pert = (x_adv - x).abs().amax(1, keepdim=True)
    dets = None
    if show_detections:
        was = model.training
        model.eval()
        try:
            dets = DetectionTask(score_threshold=score_threshold, top_k=max_detections).detect(model, x)
        finally:
            model.train(was)
    columns = ["image + GT", "x' (selective)", "M", "M^a", "k(M^a)", "|x' - x|"] + (["detections"] if dets else [])
    ncols = len(columns)
    fig = Figure(figsize=(1.7 * ncols + 0.9, 1.7 * n + (0.5 if title else 0.3)), dpi=dpi)
    axes = fig.subplots(n, ncols, squeeze=False)
    ext = (0.0, 1.0, 1.0, 0.0)  # normalised coordinates: boxes overlay every panel directly
    map_kw, pert_kw = map_styles(method.eps, extent=ext)
    colours = ["tab:red", "tab:cyan", "tab:orange", "tab:green", "tab:pink", "tab:olive"]

    def boxes(ax, bx: Tensor, labels: Tensor, scores: Tensor | None = None) -> None:
        # ground truth: solid; detections: dashed, with class and score
        for k, (b, lab) in enumerate(zip(bx.tolist(), labels.tolist())):
            col = colours[int(lab) % len(colours)]
            ls = "-" if scores is None else "--"
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec=col, lw=0.8, ls=ls))
            if scores is not None:
                name = class_names[int(lab)] if class_names else str(int(lab))
                ax.text(b[0], b[1], f"{name} {float(scores[k]):.2f}", color=col, fontsize=5, va="bottom")

    def image(t: Tensor):
        return t.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()

    map_im = pert_im = None
    for i in range(n):
        row = axes[i]
        gt_boxes, gt_labels = tg[i]["boxes"].cpu(), tg[i]["labels"].cpu()
        row[0].imshow(image(x[i]), extent=ext)
        row[1].imshow(image(x_adv[i]), extent=ext)
        for j, m in ((2, res.m[i]), (3, res.m_a[i]), (4, mask[i])):
            map_im = row[j].imshow(m[0].float().cpu().numpy(), **map_kw)
        pert_im = row[5].imshow(pert[i, 0].float().cpu().numpy(), **pert_kw)
        for j in (0, 2, 3, 4):
            boxes(row[j], gt_boxes, gt_labels)
        if dets:
            row[6].imshow(image(x[i]), extent=ext)
            d = dets[i]
            boxes(row[6], d["boxes"].cpu(), d["labels"].cpu(), d["scores"].cpu())
        row[0].set_ylabel(f"{len(gt_labels)} objects", fontsize=8)
        for ax in row:
            ax.set_xlim(0, 1)
            ax.set_ylim(1, 0)
            ax.set_xticks([])
            ax.set_yticks([])
    for j, name in enumerate(columns):
        axes[0, j].set_title(name, fontsize=9)
    if class_names:
        key = ", ".join(f"{c}: {colours[k % len(colours)].removeprefix('tab:')}" for k, c in enumerate(class_names))
        fig.text(0.03, 0.003, f"boxes (GT solid, detections dashed): {key}", fontsize=6, va="bottom")
    return finish_grid(fig, map_im, pert_im, out_path, title=title, dpi=dpi, right=0.88, space=0.05)


# ----------------------------------------------------------------------------- configs and runs
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
class DetectionRunConfig:
    """A detection training run (``task: detection`` in the YAML).

    The ``model``, ``method``, ``optim`` and ``schedule`` sections are those of
    :class:`aal.config.RunConfig`; ``data`` and ``eval`` are the detection ones above.
    """

    task: str = "detection"
    seed: int = 0
    epochs: int = 24
    out_dir: str = "runs"
    name: str | None = None
    progress: bool = True
    threads: int | None = None
    checkpoint_every: int = 1
    grad_clip: float | None = None
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    model: Any = None
    method: Any = None
    optim: Any = None
    schedule: Any = None
    eval: DetectionEvalConfig = field(default_factory=DetectionEvalConfig)

    def to_dict(self) -> dict[str, Any]:
        from aal.config import config_to_dict

        return config_to_dict(self)


def detection_config_from_dict(raw: Mapping[str, Any]) -> DetectionRunConfig:
    """Build and validate a :class:`DetectionRunConfig` from a nested dict (a loaded YAML).

    Raises:
        aal.config.ConfigError: unknown keys or names, or impossible values (the message names the key).
    """
    from aal.config import ConfigError, MethodConfig, ModelConfig, OptimConfig, ScheduleConfig, _build_section, check_kwargs, clip, coerce, short
    from aal.methods import METHODS
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
    if cfg.epochs < 1:
        raise ConfigError(f"epochs: must be > 0, got {cfg.epochs}")
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
    """Load a detection YAML config and apply ``key=value`` overrides (e.g. ``data.image_size=300``)."""
    from aal.config import ConfigError, _merge, parse_overrides, read_yaml_file

    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml_file(p) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a config must be a mapping at the top level")
        raw = loaded
    return detection_config_from_dict(_merge(raw, parse_overrides(overrides)))


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
    from aal.methods import create_method
    from aal.models import create_model
    from aal.utils.runtime import resolve_device, seed_everything

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
    from aal.engine.run import build_optimization, machine_description
    from aal.engine.rundir import fit_or_resume, history_seconds, prepare_run_dir, run_guard, run_history
    from aal.engine.trainer import Trainer

    exp = build_detection_experiment(cfg, device)
    cfg = exp.cfg
    optimizer, scheduler = build_optimization(cfg, exp.model, steps_per_epoch=len(exp.loader))
    run_dir, created = prepare_run_dir(cfg, run_dir, resume, log)  # after every check that needs no folder
    with run_guard(run_dir, created):
        trainer = Trainer(
            exp.model, exp.method, exp.loader, optimizer, scheduler, epochs=cfg.epochs, run_dir=run_dir,
            evaluate_fn=exp.epoch_eval(), eval_every=cfg.eval.every, checkpoint_every=cfg.checkpoint_every,
            progress=cfg.progress, grad_clip=cfg.grad_clip, seed=cfg.seed, config=cfg.to_dict(),
            log_fn=log if cfg.progress else None,
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
        }
        if run_dir is not None:
            (run_dir / "results.json").write_text(json.dumps(_plain_json(results), indent=2))
    return run_dir, results


def is_detection_config(raw: Any) -> bool:
    """Whether a loaded YAML mapping (or a config object) describes a detection run (``task: detection``)."""
    if isinstance(raw, DetectionRunConfig):
        return True
    return isinstance(raw, Mapping) and raw.get("task") == "detection"


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
    from aal.engine.checkpoint import load_model_weights
    from aal.engine.run import find_run_files

    cfg_path, ckpt = find_run_files(path)
    exp = build_detection_experiment(load_detection_config(cfg_path), device)
    load_model_weights(ckpt, exp.model)
    exp.model.eval()
    return exp


def detection_grid_for_run(
    exp: DetectionExperiment, *, n: int = 4, out_path: str | Path = "detection.png", seed: int = 0, **method_params: Any
) -> Path:
    """:func:`detection_grid` for a (trained) run: ``n`` test images drawn with ``seed``.

    The run's own ``detection_aal`` method makes the selective attack when it was trained with
    one; otherwise ``DetectionAAL(**method_params)`` (defaults: eps 2/255, kernel M^a o M^a).

    Raises:
        aal.config.ConfigError: the model has no attention layer (nothing to visualise).
    """
    from aal.config import ConfigError
    from aal.methods.detection import DetectionAAL

    if not detector_of(exp.model).has_attention:
        raise ConfigError("aal viz needs a model with an attention layer; this run used model.attention=none")
    if n < 1:
        raise ConfigError(f"--n: must be >= 1, got {n}")
    idx = torch.randperm(len(exp.test), generator=torch.Generator().manual_seed(seed))[:n]
    split = exp.test.subset(idx)
    method = exp.method if isinstance(exp.method, DetectionAAL) and not method_params else DetectionAAL(**method_params)
    return detection_grid(
        exp.model, split.images.float() / 255.0, split.targets, out_path, method=method, n=n, class_names=split.classes,
        title=f"{exp.cfg.method.name} on {exp.cfg.data.name}",
    )  # fmt: skip


def _plain_json(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain_json(x) for x in v]
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


__all__ = [
    "DATASET_CLASSES", "DetectionDataConfig", "DetectionEvalConfig", "DetectionExperiment", "DetectionRunConfig",
    "DetectionTask", "build_detection_experiment", "detection_config_from_dict", "detection_grid",
    "detection_grid_for_run", "detector_of", "is_detection_config", "load_detection_config", "load_detection_run",
    "train_detection",
]  # fmt: skip
