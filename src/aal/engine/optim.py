"""Optimizers and learning-rate schedules, stepped once per *iteration*.

Schedules are :class:`torch.optim.lr_scheduler.LambdaLR` objects whose factor is a pure function
of the global step, so a resumed run reproduces the uninterrupted one exactly (the scheduler's
state is just its step counter). Milestones and warm-up are given in epochs and converted to
steps with ``steps_per_epoch``.

Example:
    >>> import aal
    >>> from aal.engine.optim import build_optimizer, build_scheduler
    >>> model = aal.create_model("small_cnn")
    >>> opt = build_optimizer(model, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    >>> sched = build_scheduler(opt, "cosine", epochs=10, steps_per_epoch=100)
    >>> for _ in range(500):
    ...     opt.step(); sched.step()
    >>> round(opt.param_groups[0]["lr"], 4)   # half-way through cosine: half the peak
    0.05
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "multistep", "linear", "constant")


def param_groups(model: nn.Module, weight_decay: float, exclude_norm_bias: bool = False) -> list[dict]:
    """Trainable parameters of ``model``, split so that biases and norm weights get no decay.

    Args:
        model: the network.
        weight_decay: decay of the decayed group.
        exclude_norm_bias: put every parameter with ``ndim <= 1`` (biases, BatchNorm/LayerNorm
            scales and shifts) in a group with ``weight_decay=0`` (the timm / "bag of tricks"
            convention); otherwise a single group.

    Returns:
        a list of param-group dicts for a torch optimizer (empty groups are dropped).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not exclude_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    wd_exclude_norm_bias: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
) -> Optimizer:
    """The optimizer for ``model``'s trainable parameters.

    Args:
        model: the network (parameters with ``requires_grad=False`` are skipped).
        name: ``"sgd"`` (with ``momentum``/``nesterov``), ``"adam"`` (L2 decay added to the
            gradient, as torch's Adam) or ``"adamw"`` (decoupled decay).
        lr: peak learning rate (schedules scale it).
        momentum: SGD momentum (ignored by Adam; ``betas`` instead).
        weight_decay: L2 / decoupled weight decay.
        nesterov: Nesterov momentum for SGD.
        wd_exclude_norm_bias: no weight decay on biases and normalisation parameters.
        betas: Adam(W) moment coefficients.

    Raises:
        ValueError: unknown ``name`` or invalid hyper-parameters.

    Example:
        >>> import aal
        >>> opt = build_optimizer(aal.create_model("small_cnn"), "adam", lr=1e-3, weight_decay=0.0)
        >>> type(opt).__name__
        'Adam'
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    groups = param_groups(model, weight_decay, wd_exclude_norm_bias)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    if key == "sgd":
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    cls = torch.optim.Adam if key == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def lr_factor_fn(
    name: str,
    total_steps: int,
    warmup_steps: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at global step ``i`` (0-based).

    * warm-up (all schedules): ``(i + 1) / warmup_steps`` for ``i < warmup_steps``;
    * ``cosine``: ``0.5 * (1 + cos(pi * t))`` with ``t`` the progress after warm-up, reaching
      0 at ``total_steps`` and staying there (no restart);
    * ``linear``: ``1 - t`` (with warm-up = half the run it is the triangular "cyclic" schedule
      of Wong et al. 2020's fast FGSM-AT);
    * ``multistep``: ``gamma ** (number of milestones <= i)`` (milestones in steps);
    * ``constant``: 1.

    Args:
        name: schedule name (see :data:`SCHEDULES`).
        total_steps: steps in the whole run.
        warmup_steps: linear warm-up steps.
        milestones: multistep milestones, in steps.
        gamma: multistep decay factor.
    """
    key = name.lower()
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    ms = sorted(int(m) for m in milestones)
    span = max(total_steps - warmup_steps, 1)

    def factor(i: int) -> float:
        if i < warmup_steps:
            return (i + 1) / warmup_steps
        t = min(max((i - warmup_steps) / span, 0.0), 1.0)
        if key == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if key == "linear":
            return 1.0 - t
        if key == "multistep":
            return gamma ** bisect.bisect_right(ms, i)
        return 1.0

    return factor


def build_scheduler(
    optimizer: Optimizer,
    name: str = "cosine",
    epochs: int = 1,
    steps_per_epoch: int = 1,
    milestones: Iterable[float] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0,
) -> LambdaLR:
    """A per-iteration learning-rate schedule (call ``scheduler.step()`` after every ``optimizer.step()``).

    Args:
        optimizer: the optimizer; its current ``lr`` of each group is the peak.
        name: ``"cosine"`` (anneal to 0 at the end, no restart), ``"multistep"`` (multiply by
            ``gamma`` at each milestone), ``"linear"`` (decay to 0) or ``"constant"``.
        epochs: epochs in the run (> 0).
        steps_per_epoch: optimizer steps per epoch (> 0), usually ``len(train_loader)``.
        milestones: multistep milestones in epochs (e.g. ``(100, 150)`` for 200 epochs; floats
            allowed); the drop happens at the first step of that epoch.
        gamma: multistep decay factor.
        warmup_epochs: linear warm-up from ``lr / warmup_steps`` to ``lr`` (floats allowed).

    Returns:
        a :class:`~torch.optim.lr_scheduler.LambdaLR`; its ``state_dict`` holds only counters
        and learning rates (JSON-able), so checkpoints need no pickle.

    Example:
        >>> import aal
        >>> opt = build_optimizer(aal.create_model("small_cnn"), lr=0.1)
        >>> s = build_scheduler(opt, "multistep", epochs=3, steps_per_epoch=2, milestones=[1, 2])
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 6)); opt.step(); s.step()
        >>> lrs
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    """
    if int(epochs) < 1 or int(steps_per_epoch) < 1:
        raise ValueError(f"need epochs >= 1 and steps_per_epoch >= 1, got {epochs} and {steps_per_epoch}")
    if warmup_epochs < 0 or warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs must lie in [0, epochs={epochs}], got {warmup_epochs}")
    milestones = list(milestones)
    if name.lower() == "multistep":
        if not milestones:
            raise ValueError("the multistep schedule needs milestones (in epochs)")
        if any(m <= 0 or m > epochs for m in milestones):
            raise ValueError(f"milestones must lie in (0, epochs={epochs}], got {milestones}")
    elif milestones and name.lower() in SCHEDULES:
        raise ValueError(f"milestones only apply to the multistep schedule, not {name!r}")
    total = int(epochs) * int(steps_per_epoch)
    fn = lr_factor_fn(
        name,
        total_steps=total,
        warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
        milestones=[int(round(m * steps_per_epoch)) for m in milestones],
        gamma=gamma,
    )
    return LambdaLR(optimizer, fn)


__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler", "lr_factor_fn", "param_groups"]
