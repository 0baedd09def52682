"""Attack the survivors: the one loop behind :func:`aal.eval.evaluate` and :func:`aal.eval.run_suite`.

AutoAttack's ``run_standard_evaluation`` (Croce & Hein 2020) never attacks a point the model
already gets wrong (it counts as wrong under every attack) and runs each attack of its ensemble
only on the points every earlier attack left correct: the per-sample worst case over the
ensemble, at the cost of attacking only the survivors. This module is that loop, once:

* :func:`clean_pass` classifies every point once and starts a :class:`SurvivorState`;
* :func:`attack_survivors` runs the stages in order, batch by batch, and records per stage the
  points attacked, its wall time and which points are still correct after it, and per point the
  prediction at the worst case found.

Two pools, as :func:`aal.eval.evaluate` offers them: ``cumulative=True`` (AutoAttack; what the
suites run) attacks the survivors of every earlier stage, so a stage's flags are the robust
points *after* it; ``cumulative=False`` attacks every clean-correct point in every stage, so a
stage's flags stand on their own. Either way :attr:`SurvivorState.robust` is the per-sample worst
case over the stages run so far.

Resumable: the state holds a stage in progress (:class:`PendingStage`, the points still to
attack) and ``on_update`` is called after every batch and every finished stage, so a caller can
write the state out (the suites do, to their JSON state file) and continue an interrupted run by
passing the state back: finished stages are skipped, the stage in progress attacks only the
points it had not reached.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> x, y = torch.rand(6, 1, 2, 2), torch.zeros(6, dtype=torch.long)
    >>> fetch = lambda idx: (x[idx], y[idx])
    >>> state = clean_pass(model, fetch, y, torch.arange(6), batch_size=4)
    >>> state = attack_survivors(model, fetch, [("same", lambda m, xb, yb: xb)], state, batch_size=4)
    >>> torch.equal(state.stages["same"].robust, state.clean), state.stages["same"].attacked == int(state.clean.sum())
    (True, True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

AttackFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
Fetch = Callable[[Tensor], tuple[Tensor, Tensor]]
"""``fetch(indices) -> (images, labels)``: one batch, on the device, images as float in [0,1]."""


@dataclass
class StageRecord:
    """A finished stage.

    Attributes:
        seconds: wall time spent attacking and judging (summed over resumed runs).
        attacked: points the stage attacked (its pool when it started).
        robust: (N,) bool, the points correct after the stage (see the module doc for the pools).
    """

    seconds: float
    attacked: int
    robust: Tensor


@dataclass
class PendingStage:
    """The stage in progress: its name, the points it has still to attack, its bookkeeping so far."""

    stage: str
    todo: Tensor
    attacked: int
    seconds: float = 0.0


@dataclass
class SurvivorState:
    """Per-point state of a survivors run (what a resumable caller writes out).

    Attributes:
        clean: (N,) bool, correct on the clean input.
        robust: (N,) bool, correct under every stage run so far (the per-sample worst case).
        pred: (N,) long, the prediction at the worst case found: the clean prediction, replaced
            by the adversarial one at the first stage that breaks the point.
        clean_seconds: wall time of the clean pass.
        stages: the finished stages, in order.
        current: the stage in progress, if one was interrupted (or is running).
    """

    clean: Tensor
    robust: Tensor
    pred: Tensor
    clean_seconds: float
    stages: dict[str, StageRecord] = field(default_factory=dict)
    current: PendingStage | None = None


def fetcher(x: Tensor, y: Tensor, is_uint8: bool, device: torch.device) -> Fetch:
    """The :data:`Fetch` of a dataset held as tensors: rows to ``device``, uint8 images to [0,1] floats.

    Converting batch by batch keeps a uint8 dataset at a quarter of the float32 memory.
    """

    def fetch(idx: Tensor) -> tuple[Tensor, Tensor]:
        xb = x[idx].to(device, non_blocking=True)
        return (xb.float().div_(255) if is_uint8 else xb.float()), y[idx].to(device)

    return fetch


def _bar(total: int, done: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, initial=done, desc=desc, unit="img", leave=False, disable=True if not progress else None)


@torch.no_grad()
def clean_pass(model: nn.Module, fetch: Fetch, labels: Tensor, indices: Tensor, batch_size: int,
               progress: bool = False) -> SurvivorState:
    """Classify the points ``indices`` once; the others stay wrong (``clean`` False, ``pred`` 0).

    Args:
        model: the classifier (its mode is the caller's business: see :func:`aal.utils.eval_mode`).
        fetch: batch loader (:data:`Fetch`).
        labels: (N,) labels on the CPU.
        indices: the points to classify (all of them, or this process's shard).
        batch_size: points per forward pass.
        progress: a tqdm bar.

    Returns:
        a fresh :class:`SurvivorState` with ``robust == clean``.
    """
    t0 = time.perf_counter()
    total = len(labels)
    clean = torch.zeros(total, dtype=torch.bool)
    pred = torch.zeros(total, dtype=torch.long)
    bar = _bar(len(indices), 0, "clean", progress)
    for idx in _batches(indices, batch_size):
        xb, _ = fetch(idx)
        p = model(xb).argmax(1).cpu()
        pred[idx], clean[idx] = p, p == labels[idx]
        bar.update(len(idx))
    bar.close()
    return SurvivorState(clean=clean, robust=clean.clone(), pred=pred, clean_seconds=time.perf_counter() - t0)


def _batches(indices: Tensor, batch_size: int) -> tuple[Tensor, ...]:
    """``indices`` in batches; none for no indices (``split`` gives one empty batch there)."""
    return indices.split(batch_size) if len(indices) else ()


def attack_survivors(
    model: nn.Module,
    fetch: Fetch,
    stages: Sequence[tuple[str, AttackFn]],
    state: SurvivorState,
    batch_size: int,
    *,
    cumulative: bool = True,
    attack_model: nn.Module | None = None,
    check: Callable[[str, Tensor, Tensor], None] | None = None,
    progress: bool = False,
    on_update: Callable[[SurvivorState], None] | None = None,
) -> SurvivorState:
    """Run ``stages`` in order, each only on the points still correct; update ``state`` in place.

    Args:
        model: the classifier that judges every adversarial example (one forward pass each).
        fetch: batch loader (:data:`Fetch`); its labels decide correctness.
        stages: ``(name, attack)`` pairs, ``attack(model, x, y) -> x_adv``.
        state: from :func:`clean_pass`, or one written out by ``on_update`` to resume.
        batch_size: points per attack call.
        cumulative: attack the survivors of every earlier stage (True) or every clean-correct
            point in every stage (False; such a run cannot resume a stage in progress).
        attack_model: what the attacks see instead of ``model`` (e.g. an EOT wrapper of a
            randomised model); robustness is still judged on ``model``.
        check: ``check(name, x_adv, x)`` refuses an attack's output (raises) before it is judged.
        progress: a tqdm bar per stage.
        on_update: called after every batch and every finished stage (to write the state out).

    Returns:
        ``state``, with every stage in :attr:`SurvivorState.stages`.

    Raises:
        ValueError: a stage in progress to resume with ``cumulative=False``.
    """
    victim = model if attack_model is None else attack_model
    for name, attack in stages:
        if name in state.stages:  # finished in an earlier run
            continue
        cur = state.current
        if cur is not None and cur.stage == name and not cumulative:
            raise ValueError("only a cumulative run can resume a stage in progress")
        if cur is None or cur.stage != name:
            pool = state.robust if cumulative else state.clean
            cur = state.current = PendingStage(name, pool.clone(), int(pool.sum()))
        # the stage's flags: the running worst case itself (cumulative), or its own from the clean points
        survived = state.robust if cumulative else state.clean.clone()
        todo = cur.todo.nonzero().flatten()
        bar = _bar(cur.attacked, cur.attacked - len(todo), name, progress)
        for idx in _batches(todo, batch_size):
            t0 = time.perf_counter()
            xb, yb = fetch(idx)
            x_adv = attack(victim, xb, yb)
            if check is not None:
                check(name, x_adv, xb)
            with torch.no_grad():
                p = model(x_adv).argmax(1)
            wrong = (p != yb).cpu()
            broken = idx[wrong]
            first = state.robust[broken]  # broken here for the first time: the worst case so far
            state.pred[broken[first]] = p.cpu()[wrong][first]
            survived[broken] = False
            state.robust[broken] = False
            cur.todo[idx] = False
            cur.seconds += time.perf_counter() - t0
            if on_update is not None:
                on_update(state)
            bar.update(len(idx))
        bar.close()
        state.stages[name] = StageRecord(cur.seconds, cur.attacked, survived.clone())
        state.current = None
        if on_update is not None:
            on_update(state)
    return state


__all__ = ["PendingStage", "StageRecord", "SurvivorState", "attack_survivors", "clean_pass", "fetcher"]
