"""Experiment tracking besides ``metrics.jsonl``: the optional TensorBoard writer.

``metrics.jsonl`` is always written by the :class:`~aal.engine.Trainer` (one JSON line per
epoch). A run config's ``logger`` key adds a *mirror* of it:

* ``none`` (default): nothing else.
* ``tensorboard``: event files in ``RUN/tensorboard/`` written with
  ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package, the
  ``tensorboard`` extra: ``pip install "aal[tensorboard]"``); view with
  ``tensorboard --logdir RUN/tensorboard``.

Every numeric field of an epoch record becomes a scalar at global step = the record's ``epoch``
(1-based, as in ``metrics.jsonl``), with the same value. Tags (stable; :func:`scalar_tags`)::

    train_loss -> train/loss        train_acc -> train/acc      grad_norm -> train/grad_norm
    lr -> train/lr                  step -> train/step
    img_per_s -> throughput/img_per_s                           images -> throughput/images
    epoch_time -> time/epoch_s      eval_time -> time/eval_s
    eval.<key> -> eval/<key>        (per-epoch evaluation, e.g. eval/test_pgd10)
    logs.<key> -> logs/<key>        (the method's logs, e.g. AAL's map diagnostics
                                     logs/mask_mean, logs/mask_std, logs/m_mean, logs/m_std, ...)

Other numeric keys keep their own name (nested keys joined by ``/``); ``None``, strings and
lists are not scalars and are left out.

For an AAL run (a :class:`aal.methods.aal.AAL` method: ``aal``, ``aal_fgsm``, ``aal_pgd``) with
a preview batch (the runner gives the first 8 test images), each epoch also gets images: the
clean attention map M (``attention/M``, at the attention layer's resolution), the per-pixel
budget k(M^a) that AAL attacks with (``attention/k``, at the input's) and the images themselves
(``attention/input``), all on [0,1], as ``aal viz`` draws them. The few-shot and detection AAL
methods log their scalars only.

On resume the writer drops (``purge_step``) the events of the epochs the run trains again, as
the trainer drops their ``metrics.jsonl`` lines. Tracking never changes training: the images are
computed with the RNG state saved and restored (by the trainer) and the model's mode kept.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from aal.config import LOGGERS, ConfigError, check_logger
from aal.methods.aal import AAL

TENSORBOARD_DIR = "tensorboard"
"""Folder of the TensorBoard event files inside a run folder."""

PREVIEW_N = 8
"""Test images whose attention maps are logged per epoch."""

_TAGS = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "step": "train/step",
    "img_per_s": "throughput/img_per_s",
    "images": "throughput/images",
    "epoch_time": "time/epoch_s",
    "eval_time": "time/eval_s",
}


class MetricsLogger(Protocol):
    """What the trainer calls besides writing ``metrics.jsonl`` (main process only)."""

    def log_epoch(self, record: dict[str, Any], model: nn.Module, method: Any) -> None:
        """Record one epoch (the dict just written to ``metrics.jsonl``)."""

    def close(self) -> None:
        """Flush and release files (called when :meth:`aal.engine.Trainer.fit` returns or fails)."""


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of an epoch record under their TensorBoard tags (see the module doc).

    Example:
        >>> scalar_tags({"epoch": 2, "train_loss": 0.5, "lr": 0.1, "train_acc": None,
        ...              "eval": {"test_clean": 0.8}, "logs": {"mask_mean": 0.3}})
        {'train/loss': 0.5, 'train/lr': 0.1, 'eval/test_clean': 0.8, 'logs/mask_mean': 0.3}
    """
    out: dict[str, float] = {}

    def walk(value: Any, tag: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{tag}/{k}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[tag] = float(value)

    for key, value in record.items():
        if key != "epoch":  # the global step, not a scalar
            walk(value, _TAGS.get(key, key))
    return out


def attention_images(method: Any, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """AAL's clean map M and budget k(M^a) for ``x`` (B,C,H,W) in [0,1], as (B,1,h,w) images in [0,1].

    Returns ``{}`` when ``method`` is not an :class:`~aal.methods.aal.AAL` (no map to show). The
    same computation as a training step's (:meth:`AAL.associate` then :meth:`AAL.budget`, in the
    method's ``attack_mode``, which restores the model's mode); needs gradients, so it runs
    outside ``torch.no_grad``.
    """
    if not isinstance(method, AAL):
        return {}
    with torch.enable_grad():
        res = method.associate(model, x, y)
        k = method.budget(res)
    images = {"attention/input": x, "attention/k": k}
    if res.has_attention:  # kernel "one" on a model without attention: the budget alone
        images["attention/M"] = res.m
    return {tag: t.detach().float().clamp(0, 1).cpu() for tag, t in images.items()}


def preview_batch(split: Any, n: int = PREVIEW_N) -> tuple[Tensor, Tensor]:
    """The first ``n`` images of a :class:`~aal.data.Split` as floats in [0,1], with their labels."""
    n = min(int(n), len(split))
    return split.images[:n].float().div(255.0), split.labels[:n]


class TensorBoardLogger:
    """Mirror of ``metrics.jsonl`` in TensorBoard event files (plus AAL's maps as images).

    Args:
        log_dir: folder of the event files (created).
        preview: ``(x, y)`` whose attention maps are logged each epoch (AAL methods only).

    Raises:
        ConfigError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | Path, preview: tuple[Tensor, Tensor] | None = None) -> None:
        check_logger("tensorboard")
        self.log_dir, self.preview = Path(log_dir), preview
        self._writer: Any = None

    def _open(self, first_epoch: int) -> Any:
        from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is optional

        # a resumed run trains first_epoch again: hide what an earlier process logged for it and later
        resumed = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
        return SummaryWriter(str(self.log_dir), purge_step=first_epoch if resumed else None)

    def log_epoch(self, record: dict[str, Any], model: nn.Module, method: Any) -> None:
        step = int(record["epoch"])
        if self._writer is None:
            self._writer = self._open(step)
        for tag, value in scalar_tags(record).items():
            self._writer.add_scalar(tag, value, step)
        if self.preview is not None:
            device = next(model.parameters()).device
            x, y = (t.to(device) for t in self.preview)
            for tag, images in attention_images(method, model, x, y).items():
                self._writer.add_images(tag, images, step, dataformats="NCHW")
        self._writer.flush()  # a killed run keeps its epochs, as metrics.jsonl does

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def create_logger(name: str, run_dir: str | Path, preview: tuple[Tensor, Tensor] | None = None) -> MetricsLogger | None:
    """The logger a run config's ``logger`` names, writing into ``run_dir`` (``None`` for ``none``).

    Raises:
        ConfigError: an unknown name, or ``tensorboard`` without its package.
    """
    check_logger(name)
    if name == "tensorboard":
        return TensorBoardLogger(Path(run_dir) / TENSORBOARD_DIR, preview=preview)
    if name == "none":
        return None
    raise ConfigError(f"logger: {name!r} is accepted by the config but has no writer (known: {', '.join(LOGGERS)})")


__all__ = [
    "MetricsLogger",
    "PREVIEW_N",
    "TENSORBOARD_DIR",
    "TensorBoardLogger",
    "attention_images",
    "create_logger",
    "preview_batch",
    "scalar_tags",
]
