"""Figures of AAL's attention and selective attacks (in the style of seed 001, Fig. 3).

:func:`attention_grid` writes one PNG: one row per sample, columns

    image | adversarial image x' (selective) | M on x | M on x' | M^a | k(M^a) | |x' - x|

* The maps (M, M on x', M^a, k(M^a)) share one colour scale, [0,1], with one colour bar; the
  perturbation column uses [0, eps] with its own colour bar, so rows and runs are comparable.
* Maps are shown at their own resolution (the attention layer's, e.g. 24x24 for ``small_cnn``),
  stretched over the same square as the image; ``|x' - x|`` is the max over channels.
* "M on x'" is the model's own attention recomputed on the adversarial input (eval mode): it
  shows how much the perturbation moves the attention, the coupling AAL backtracks.

Matplotlib is used through its object API with the Agg canvas (no pyplot, no global state, no
display needed).

Example:
    >>> import torch, aal
    >>> from aal.viz import attention_grid
    >>> model = aal.create_model("small_cnn", attention="cbam")
    >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    >>> path = attention_grid(model, x, y, eps=0.1, out_path="/tmp/attention.png", n=4)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from aal.attacks.base import attack_mode
from aal.config import ConfigError
from aal.methods.detection import DetectionAAL
from aal.tasks.detection import DetectionExperiment, DetectionTask, Targets, detector_of
from aal.utils.modes import eval_mode

COLUMNS = ("image", "x' (selective)", "M on x", "M on x'", "M^a", "k(M^a)", "|x' - x|")


def _image(t: Tensor):
    """(C,H,W) in [0,1] -> an array imshow understands (H,W) or (H,W,3)."""
    a = t.detach().float().cpu().clamp(0, 1)
    return a[0].numpy() if a.shape[0] == 1 else a[:3].permute(1, 2, 0).numpy()


def attention_grid(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    out_path: str | Path,
    n: int = 8,
    method: Any = None,
    title: str | None = None,
    dpi: int = 100,
    **method_params: Any,
) -> Path:
    """Write a PNG grid of images, selective adversarial images and attention maps.

    Args:
        model: an attention model (``create_model(..., attention="cbam")``).
        x: images (B,C,H,W) in [0,1]; the first ``n`` are shown.
        y: labels (B,).
        eps: the attack budget.
        out_path: where to write the PNG (parent folders are created).
        n: number of rows (samples), at most B.
        method: an :class:`aal.methods.aal.AAL` to use; default ``AAL(eps=eps, **method_params)``.
        title: optional figure title.
        dpi: resolution of the PNG.
        **method_params: AAL hyper-parameters (``attack``, ``kernel``, ``coupling``, ``xi1``...)
            when ``method`` is not given.

    Returns:
        the path written.
    """
    from matplotlib.figure import Figure  # lazy: plotting is optional at import time

    from aal.methods.aal import AAL

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if method is None:
        method = AAL(eps=eps, **method_params)
    elif method_params:
        raise ValueError("give either a method or its parameters, not both")
    n = min(n, x.shape[0])
    x, y = x[:n].detach(), y[:n]
    x_adv, res, mask = method.craft(model, x, y)
    with attack_mode(model, "eval"), torch.no_grad():
        _, m_adv = model(x_adv, return_attention=True)
    if m_adv is None:
        m_adv = res.m
    pert = (x_adv - x).abs().amax(1, keepdim=True)

    ncols = len(COLUMNS)
    fig = Figure(figsize=(1.55 * ncols + 0.9, 1.55 * n + (0.5 if title else 0.25)), dpi=dpi)
    axes = fig.subplots(n, ncols, squeeze=False)
    map_kw, pert_kw = map_styles(eps)
    img_kw = dict(cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    map_im = pert_im = None
    for i in range(n):
        row = axes[i]
        row[0].imshow(_image(x[i]), **img_kw)
        row[1].imshow(_image(x_adv[i]), **img_kw)
        for j, m in ((2, res.m[i]), (3, m_adv[i]), (4, res.m_a[i]), (5, mask[i])):
            map_im = row[j].imshow(m[0].float().cpu().numpy(), **map_kw)
        pert_im = row[6].imshow(pert[i, 0].float().cpu().numpy(), **pert_kw)
        row[0].set_ylabel(f"y={int(y[i])}", fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for j, name in enumerate(COLUMNS):
        axes[0, j].set_title(name, fontsize=9)
    return finish_grid(fig, map_im, pert_im, out_path, title=title, dpi=dpi, right=0.86, space=0.06)


def map_styles(eps: float, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """imshow keywords of the attention maps (one [0,1] scale) and of ``|x' - x|`` ([0, eps])."""
    map_kw = dict(cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", **extra)
    pert_kw = dict(cmap="magma", vmin=0.0, vmax=max(float(eps), 1e-12), interpolation="nearest", **extra)
    return map_kw, pert_kw


def finish_grid(fig: Any, map_im: Any, pert_im: Any, out_path: str | Path, *, title: str | None, dpi: int,
                right: float, space: float) -> Path:
    """Title, layout, the two colour bars (maps, perturbation) right of the grid, and the PNG."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.03, right=right, bottom=0.02, top=0.93 if title else 0.955, wspace=space, hspace=space)
    for im, name, bottom in ((map_im, "maps", 0.55), (pert_im, "|x'-x|", 0.08)):
        cax = fig.add_axes((right + 0.015, bottom, 0.015, 0.38))
        fig.colorbar(im, cax=cax).ax.tick_params(labelsize=7)
        cax.set_title(name, fontsize=7)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


# ----------------------------------------------------------------------------- detection (AAL paper Sec. 4.2)
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
        with eval_mode(model):
            dets = DetectionTask(score_threshold=score_threshold, top_k=max_detections).detect(model, x)
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
def detection_grid_for_run(
    exp: DetectionExperiment, *, n: int = 4, out_path: str | Path = "detection.png", seed: int = 0, **method_params: Any
) -> Path:
    """:func:`detection_grid` for a (trained) run: ``n`` test images drawn with ``seed``.

    The run's own ``detection_aal`` method makes the selective attack when it was trained with
    one; otherwise ``DetectionAAL(**method_params)`` (defaults: eps 2/255, kernel M^a o M^a).

    Raises:
        aal.config.ConfigError: the model has no attention layer (nothing to visualise).
    """
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


__all__ = ["COLUMNS", "attention_grid", "attention_grid_for_run", "detection_grid", "detection_grid_for_run", "finish_grid",
           "map_styles", "report_figures"]


def attention_grid_for_run(cfg: Any, model: nn.Module, bundle: Any, *, n: int = 8, out_path: str | Path = "attention.png",
                           seed: int = 0) -> Path:
    """:func:`attention_grid` for a trained run: ``n`` test images drawn with ``seed``.

    The run's own AAL method (with its hyper-parameters) makes the selective attack when the run
    was trained with one; otherwise AAL's defaults at the run's evaluation budget are used.

    Raises:
        aal.config.ConfigError: the model has no attention layer (nothing to visualise).
    """
    from aal.config import ConfigError
    from aal.engine.run import build_method
    from aal.methods.aal import AAL

    if not getattr(model, "has_attention", False) and not hasattr(model, "input_attention"):
        raise ConfigError(
            f"aal viz needs a model with an attention layer; this run used model.attention={cfg.model.attention!r}"
        )
    if n < 1:
        raise ConfigError(f"--n: must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(bundle.test), generator=g)[:n]
    split = bundle.test.subset(idx)
    x = split.images.float().div(255.0)
    y = split.labels
    method = build_method(cfg)
    if not isinstance(method, AAL):
        method = None
    return attention_grid(
        model, x, y, eps=cfg.eval.eps, out_path=out_path, n=n, method=method,
        title=f"{cfg.method.name} on {cfg.data.name}",
    )


def report_figures(cfg: Any, model: nn.Module, bundle: Any, out_dir: str | Path, name: str) -> dict[str, str]:
    """The figures ``aal report`` and ``aal train`` (``eval.report``) add to a run's report.

    For a run trained with an AAL method on an attention model: :func:`attention_grid_for_run`
    on 8 test images (seed 0), written to ``out_dir/attention_<name>.png``. Other runs: none.

    Returns:
        ``{caption: file name in out_dir}`` (the ``figures`` hook of :func:`aal.engine.report.make_report`).
    """
    from aal.engine.run import build_method
    from aal.methods.aal import AAL

    if not isinstance(build_method(cfg), AAL) or not getattr(model, "has_attention", False):
        return {}
    path = attention_grid_for_run(cfg, model, bundle, n=8, out_path=Path(out_dir) / f"attention_{name}.png")
    caption = ("AAL's attention on 8 test images: image, selective adversarial x', clean map M, M on x', "
               "associative map M^a, budget k(M^a), |x' - x|")
    return {caption: path.name}
