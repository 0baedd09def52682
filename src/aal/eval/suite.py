"""Evaluation suites, AutoAttack-style: an ensemble of strong attacks run in sequence.

``run_suite(model, data, "standard", eps=...)`` runs AutoAttack's ``version='standard'``
(Croce & Hein 2020) for L-inf and L2:

    APGD-CE  ->  APGD-T  ->  FAB-T  ->  Square

each attack only on the points still robust after the previous ones (points the model already
gets wrong are never attacked), and reports the accuracy after every stage and the final robust
accuracy (a point counts as robust only if it survived every stage: the per-sample worst case).
The settings are those of AutoAttack's ``set_version('standard')`` for L-inf and L2 (checked
against ``autoattack/autoattack.py``): APGD-CE 100 iterations, 1 restart; APGD-T 100 iterations,
1 restart, 9 target classes; FAB-T 100 iterations, 1 restart, 9 target classes; Square 5000
queries, 1 restart, ``p_init = 0.8``, without rescaling the ``p`` schedule to the number of
queries (``resc_schedule=False``). The result names itself "AutoAttack (standard)" only when it
is exactly that: every stage with these settings (no ``options`` override) and no EOT
(:attr:`SuiteResult.label`).

Suites (:data:`SUITES`):

=========  ===========================================================  ===========================
name       stages                                                       use
=========  ===========================================================  ===========================
standard   APGD-CE, APGD-T, FAB-T (9 targets each), Square (5000)         figures you report
fast       APGD-CE (100 it.), APGD-T (100 it., 9 targets)                 quick checks during work
rand       APGD-CE (100 it.), APGD-DLR (100 it.)                          randomised defences, EOT
=========  ===========================================================  ===========================

``rand`` is AutoAttack's ``version='rand'`` (Croce & Hein 2020, their code's ``rand`` version:
APGD-CE and APGD-DLR with ``eot_iter=20``), the suite its authors run on randomised defences,
where Square's 5000 score queries would each need EOT draws too. Pair it with EOT (the
default ``eot="auto"`` switches it on for a randomised model; ``eot_n`` draws per step).

Details:

* Seeds are fixed: every attack gets ``seed`` (its random starts and Square's proposals are
  repeatable), and randomised models draw from a torch generator seeded with ``seed`` inside
  a forked RNG (the caller's global RNG is left as it was).
* Randomised models (purification defences) are detected (:func:`aal.eval.eot.randomness`)
  and, with ``eot="auto"``, attacked through :class:`~aal.eval.eot.EOTWrapper` (``eot_n``
  draws per step); robustness is judged on the model itself, one draw per check. The result
  says so (``randomized``, ``eot_n``).
* Resumable: with ``state_path``, the per-sample flags (clean, still robust, attacked in the
  current stage) and the per-sample predictions are written (atomically) after every batch, as
  JSON. Rerunning with the same file skips every finished batch and stage; a file written for
  another model, data, eps, norm, suite or seed is refused (``ValueError``), never mixed in.
  A file written by an older definition of the same suite (e.g. the standard suite before FAB-T
  was added: APGD-CE -> APGD-T -> Square) keeps the finished stages the two definitions share
  from the start (there: clean, APGD-CE, APGD-T) and re-runs from the first stage that differs
  (FAB-T, then Square), saying so in the notes.
* Stages are built from the attack registry by name (``ATTACKS``), so the suite uses whatever
  implementation is registered as ``apgd_ce`` / ``apgd_t`` / ``fab_t`` / ``square``.

Example:
    >>> import torch, aal
    >>> from aal.eval.suite import run_suite
    >>> model = aal.create_model("small_cnn")
    >>> x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    >>> res = run_suite(model, (x, y), "fast", eps=0.1)           # doctest: +SKIP
    >>> print(res.table())                                           # doctest: +SKIP
    stage    accuracy %  attacked  time s
    clean         12.50        16     0.0
    apgd_ce        0.00         2     0.3
    apgd_t         0.00         0     0.0
    robust         0.00
    (n=16, eps=0.1, linf, suite fast)
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from aal.eval.eot import EOTWrapper, randomness
from aal.eval.evaluator import _as_tensors, _fraction, model_device
from aal.eval.survivors import PendingStage, StageRecord, SurvivorState, attack_survivors, clean_pass, fetcher
from aal.utils.modes import eval_mode

AttackFn = Callable[[nn.Module, Tensor, Tensor], Tensor]

STATE_FORMAT = "aal-suite-state/1"
AUTOATTACK_STANDARD = "AutoAttack (standard)"


@dataclass(frozen=True)
class Stage:
    """One attack of a suite, built from the attack registry.

    Attributes:
        name: the stage's label in results (e.g. ``"apgd_ce"``).
        attack: registered attack name (``ATTACKS``).
        options: constructor options besides ``eps``, ``norm`` and ``seed``. The generic keys
            ``iterations`` (``steps`` / ``n_iter``), ``queries`` (``n_queries``), ``restarts``
            (``restarts`` / ``n_restarts``) and ``targets`` (``n_target_classes`` /
            ``n_targets``) are mapped to whichever name the attack's constructor uses; any
            other key is passed as is. A key the constructor does not take raises.
    """

    name: str
    attack: str
    options: Mapping[str, Any] = field(default_factory=dict)


SUITES: dict[str, tuple[Stage, ...]] = {
    # AutoAttack's set_version('standard') for L-inf and L2; APGD-CE and APGD-T take their default
    # single restart (the options are part of the state file's fingerprint: kept as they were so
    # that older state files resume their APGD stages)
    "standard": (
        Stage("apgd_ce", "apgd_ce", {"iterations": 100}),
        Stage("apgd_t", "apgd_t", {"iterations": 100, "targets": 9}),
        Stage("fab_t", "fab_t", {"iterations": 100, "restarts": 1, "targets": 9}),
        Stage("square", "square", {"queries": 5000, "rescale_schedule": False}),
    ),
    "fast": (
        Stage("apgd_ce", "apgd_ce", {"iterations": 100}),
        Stage("apgd_t", "apgd_t", {"iterations": 100, "targets": 9}),
    ),
    "rand": (
        Stage("apgd_ce", "apgd_ce", {"iterations": 100}),
        Stage("apgd_dlr", "apgd_dlr", {"iterations": 100}),
    ),
}
"""Named suites (see the module docstring)."""

RAND_NOTE = ("suite rand = AutoAttack's version='rand' for randomised defences: APGD-CE and APGD-DLR, meant to run "
             "with EOT (AutoAttack: 20 draws per step); no APGD-T or Square")
SUITE_NOTES: dict[str, tuple[str, ...]] = {"standard": (), "fast": (), "rand": (RAND_NOTE,)}

_ALIASES: dict[str, tuple[str, ...]] = {
    "iterations": ("steps", "n_iter", "iterations"),
    "queries": ("n_queries", "queries"),
    "restarts": ("restarts", "n_restarts"),
    "targets": ("n_target_classes", "n_targets", "targets"),
}


def _params(factory: Callable[..., Any]) -> tuple[set[str], bool]:
    """Explicit keyword names a factory takes, and whether it also takes ``**kwargs``."""
    names: set[str] = set()
    var_kw = False
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return names, True
    for p in sig.parameters.values():
        if p.kind == p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return names, var_kw


def build_attack(stage: Stage, eps: float, norm: str = "linf", seed: int = 0) -> AttackFn:
    """The attack of ``stage`` from the registry, with ``eps``, ``norm`` and ``seed``.

    Raises:
        ValueError: the attack is not registered.
        TypeError: an option is not accepted by the attack's constructor.
    """
    from aal.attacks import ATTACKS

    if stage.attack not in ATTACKS:
        raise ValueError(
            f"stage {stage.name!r} needs the attack {stage.attack!r}, which is not registered "
            f"(registered: {', '.join(ATTACKS.names())})"
        )
    factory = ATTACKS.get(stage.attack)
    names, var_kw = _params(factory)
    kwargs: dict[str, Any] = {}
    for key, value in dict(stage.options).items():
        if key in _ALIASES:
            match = [a for a in _ALIASES[key] if a in names]
            if not match:
                raise TypeError(
                    f"attack {stage.attack!r} takes none of {', '.join(_ALIASES[key])} (for the suite option {key!r}); "
                    f"its parameters: {', '.join(sorted(names))}"
                )
            kwargs[match[0]] = value
        elif key in names or var_kw:
            kwargs[key] = value
        else:
            raise TypeError(f"attack {stage.attack!r} has no option {key!r}; its parameters: {', '.join(sorted(names))}")
    for key, value in (("norm", norm), ("seed", seed)):
        if key in names or var_kw:
            kwargs[key] = value
        elif key == "norm" and norm != "linf":
            raise TypeError(f"attack {stage.attack!r} takes no norm; it cannot run with norm={norm!r}")
    return ATTACKS.create(stage.attack, eps, **kwargs)


def resolve_suite(suite: str | Sequence[Stage | tuple[str, AttackFn]]) -> tuple[str, list[Stage | tuple[str, AttackFn]], list[str]]:
    """``(suite name, stages, notes)`` for a suite name or an explicit list of stages."""
    if isinstance(suite, str):
        key = suite.strip().lower()
        if key not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
        return key, list(SUITES[key]), list(SUITE_NOTES.get(key, ()))
    stages = list(suite)
    if not stages:
        raise ValueError("a suite needs at least one stage")
    names = []
    for s in stages:
        if isinstance(s, Stage):
            names.append(s.name)
        elif isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str) and callable(s[1]):
            names.append(s[0])
        else:
            raise TypeError(f"a stage must be a Stage or a (name, attack) pair, got {s!r}")
    if len(set(names)) != len(names) or {"clean", "robust"} & set(names):
        raise ValueError(f"stage names must be unique and not 'clean' or 'robust', got {names}")
    return "custom", stages, []


# ----------------------------------------------------------------------------- result
@dataclass
class SuiteResult:
    """The outcome of :func:`run_suite`.

    Attributes:
        suite: suite name (``"standard"``, ``"fast"``, ``"rand"`` or ``"custom"``).
        accuracy: fraction in [0,1]: ``"clean"``, then each stage (accuracy *after* it, i.e. on
            the survivors of every earlier stage), then ``"robust"`` (= the last stage).
        n: number of evaluated points.
        eps: budget.
        norm: ``"linf"`` or ``"l2"``.
        seconds: wall-clock seconds per entry, summed over resumed runs.
        attacked: number of points each stage attacked.
        randomized: whether the model's outputs varied across forward passes.
        eot_n: draws per EOT forward pass when EOT was used, else ``None``.
        notes: what the suite skipped or changed (FAB-T, EOT, resumed work).
        resumed: whether finished work was loaded from a state file.
        correct: per-sample bool (n,) tensors per entry (not in :meth:`to_dict`).
        pred: per-sample prediction at the worst case found (clean prediction for points the
            model already misses, the successful adversarial example's prediction for points
            broken by a stage, the clean prediction (= the label) for robust points), (n,).
        labels: the labels (n,).
        label: what the evaluation was, for tables and reports: ``"AutoAttack (standard)"`` for the
            complete, unmodified standard suite (:func:`suite_label`), else e.g. ``"suite fast"``.
    """

    suite: str
    accuracy: dict[str, float]
    n: int
    eps: float
    norm: str
    seconds: dict[str, float]
    attacked: dict[str, int]
    randomized: bool = False
    eot_n: int | None = None
    notes: list[str] = field(default_factory=list)
    resumed: bool = False
    correct: dict[str, Tensor] = field(default_factory=dict, repr=False)
    pred: Tensor | None = field(default=None, repr=False)
    labels: Tensor | None = field(default=None, repr=False)
    label: str = ""

    @property
    def robust(self) -> float:
        """Final robust accuracy (per-sample worst case over every stage)."""
        return self.accuracy["robust"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no tensors); ``accuracy``/``seconds``/``n``/``eps`` as in
        :meth:`aal.eval.EvalResult.to_dict`."""
        return {
            "suite": self.suite,
            "label": self.label or f"suite {self.suite}",
            "accuracy": {k: float(v) for k, v in self.accuracy.items()},
            "n": int(self.n),
            "eps": float(self.eps),
            "norm": self.norm,
            "seconds": {k: float(v) for k, v in self.seconds.items()},
            "attacked": {k: int(v) for k, v in self.attacked.items()},
            "cumulative": True,
            "randomized": bool(self.randomized),
            "eot_n": self.eot_n,
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """Aligned text table: ``stage | accuracy % | attacked | time s``."""
        rows = [("stage", "accuracy %", "attacked", "time s")]
        for name, acc in self.accuracy.items():
            secs = self.seconds.get(name)
            att = self.attacked.get(name)
            rows.append((name, f"{100 * acc:.2f}", "" if att is None else str(att), "" if secs is None else f"{secs:.1f}"))
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}" for r in rows]
        extra = [f"EOT over {self.eot_n} draws (randomised model)"] if self.eot_n else []
        if self.randomized and not self.eot_n:
            extra.append("randomised model, attacked WITHOUT EOT")
        foot = ", ".join([f"n={self.n}", f"eps={self.eps:.4g}", self.norm, self.label or f"suite {self.suite}", *extra])
        lines.append(f"({foot})")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


_MISSING = object()


def suite_label(suite: str, options: Mapping[str, Mapping[str, Any]], eot_n: int | None = None) -> str:
    """The name a suite's result goes by: ``"AutoAttack (standard)"`` only when it is exactly that.

    Exactly AutoAttack's ``version='standard'`` means the named ``standard`` suite with every
    stage at its settings in :data:`SUITES` (an override that changes a value breaks it; one that
    repeats it does not) and no EOT (AutoAttack's standard version has none; its ``rand`` version
    is the one for randomised models).

    Example:
        >>> suite_label("standard", {})
        'AutoAttack (standard)'
        >>> suite_label("standard", {"fab_t": {"targets": 3}})
        'standard suite, not AutoAttack (changed: fab_t targets=3)'
        >>> suite_label("fast", {})
        'suite fast'
    """
    if suite != "standard":
        return f"suite {suite}"
    base = {s.name: dict(s.options) for s in SUITES["standard"]}
    changed = [
        f"{name} {key}={value}"
        for name, opts in options.items()
        for key, value in dict(opts).items()
        if base.get(name, {}).get(key, _MISSING) != value
    ]
    if eot_n:
        changed.append(f"EOT over {eot_n} draws")
    return AUTOATTACK_STANDARD if not changed else f"standard suite, not AutoAttack (changed: {', '.join(changed)})"


# ----------------------------------------------------------------------------- state file
def _bits(t: Tensor) -> str:
    return "".join("1" if b else "0" for b in t.tolist())


def _unbits(s: str, n: int) -> Tensor:
    if len(s) != n:
        raise ValueError(f"state file holds {len(s)} flags, expected {n}")
    return torch.tensor([c == "1" for c in s], dtype=torch.bool)


def _store(state: dict[str, Any], st: SurvivorState) -> None:
    """Write ``st`` into the JSON state ``state`` (the format of :data:`STATE_FORMAT`)."""
    state.update(clean=_bits(st.clean), robust=_bits(st.robust), pred=st.pred.tolist(), clean_seconds=st.clean_seconds)
    for name, rec in st.stages.items():
        if name not in state["stages"]:  # finished stages never change: encoded once
            state["stages"][name] = {"seconds": rec.seconds, "attacked": rec.attacked, "robust": _bits(rec.robust)}
    cur = st.current
    state["current"] = None if cur is None else {
        "stage": cur.stage, "pending": _bits(cur.todo), "attacked": cur.attacked, "seconds": cur.seconds,
    }


def _restore(state: dict[str, Any], total: int) -> SurvivorState:
    """The :class:`SurvivorState` a JSON state (with its clean pass done) holds."""
    stages = {
        name: StageRecord(float(rec["seconds"]), int(rec["attacked"]), _unbits(rec["robust"], total))
        for name, rec in state["stages"].items()
    }
    cur = state["current"]
    current = None if cur is None else PendingStage(
        cur["stage"], _unbits(cur["pending"], total), int(cur["attacked"]), float(cur["seconds"]))
    return SurvivorState(
        clean=_unbits(state["clean"], total), robust=_unbits(state["robust"], total),
        pred=torch.tensor(state["pred"], dtype=torch.long), clean_seconds=float(state["clean_seconds"]),
        stages=stages, current=current,
    )


def _digest(tensors: Sequence[Tensor]) -> str:
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """SHA-1 of a model's state dict (names, shapes, dtypes, values)."""
    sd = model.state_dict()
    h = hashlib.sha1()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(_digest([sd[k]]).encode())
    return h.hexdigest()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)  # atomic: an interruption leaves the previous state intact


# ----------------------------------------------------------------------------- the runner
def run_suite(
    model: nn.Module,
    data: Any,
    suite: str | Sequence[Stage | tuple[str, AttackFn]] = "standard",
    *,
    eps: float,
    norm: str = "linf",
    n: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
    state_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    eot: bool | str = "auto",
    eot_n: int = 20,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> SuiteResult:
    """Run an evaluation suite: each attack only on the points that survived the previous ones.

    Args:
        model: classifier on images in [0,1] returning logits; eval mode during the call, every
            submodule's mode restored after.
        data: ``(x, y)`` (float in [0,1] or uint8 images, labels) or a split with ``.images``
            (uint8 N,C,H,W) and ``.labels``.
        suite: ``"standard"``, ``"fast"`` (see :data:`SUITES`), or a list of :class:`Stage`
            and ``(name, attack)`` pairs.
        eps: budget (pixel units of [0,1] images).
        norm: ``"linf"`` or ``"l2"``.
        n: the first ``n`` points only.
        batch_size: points per attack call.
        seed: seed of every attack and of a randomised model's draws.
        progress: a tqdm bar per stage.
        state_path: JSON file for resumable state (see module doc); ``None``: no state.
        device: where batches go (default: the device of the model's parameters).
        eot: ``"auto"`` (EOT iff the model is randomised), ``True`` or ``False``.
        eot_n: EOT draws per forward pass.
        options: per-stage option overrides, e.g. ``{"apgd_ce": {"iterations": 20}}``.

    Returns:
        a :class:`SuiteResult`.

    Raises:
        ValueError: unknown suite / unregistered attack / a state file of another evaluation.

    Example:
        >>> import torch, aal
        >>> model = aal.create_model("small_cnn")
        >>> x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
        >>> pgd = aal.attacks.PGD(0.1, steps=5, seed=0)
        >>> res = run_suite(model, (x, y), [("pgd5", pgd)], eps=0.1)
        >>> list(res.accuracy)
        ['clean', 'pgd5', 'robust']
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if eot not in (True, False, "auto"):
        raise ValueError(f"eot must be True, False or 'auto', got {eot!r}")
    suite_name, stages, notes = resolve_suite(suite)
    options = dict(options or {})
    built, spec = _build_stages(stages, options, eps, norm, seed)
    x_all, y_all, is_uint8 = _as_tensors(data, n)
    total = len(y_all)
    device = model_device(model, device)
    batch = fetcher(x_all, y_all, is_uint8, device)
    path = Path(state_path) if state_path is not None else None
    fork_devices = [device] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        rnd = randomness(model, batch(torch.arange(min(total, 64)))[0]) if total else {"randomized": False}
        use_eot = bool(rnd["randomized"]) if eot == "auto" else bool(eot)
        attack_model: nn.Module = EOTWrapper(model, n=eot_n) if use_eot else model
        if use_eot:
            notes.append(f"randomised model detected: attacks use EOT over {eot_n} draws; robustness judged on single draws")
        elif rnd["randomized"]:
            notes.append("randomised model detected but EOT switched off: robust accuracy is likely overestimated")
        fingerprint = {
            "suite": suite_name, "stages": spec, "eps": float(eps), "norm": norm, "n": total, "seed": int(seed),
            "eot_n": eot_n if use_eot else None,
            "data": _digest([x_all, y_all]), "model": model_digest(model),
        }
        state, resumed = _open_state(path, fingerprint, y_all, notes)

        def save(st: SurvivorState) -> None:
            _store(state, st)
            if path is not None:
                _write_json(path, state)

        if state["clean"] is None:  # one draw for randomised models
            save(clean_pass(model, batch, y_all, torch.arange(total), batch_size))
        st = attack_survivors(model, batch, built, _restore(state, total), batch_size, attack_model=attack_model,
                              check=lambda name, x_adv, x: _check_budget(name, x_adv, x, eps, norm),
                              progress=progress, on_update=save)
        seconds = {"clean": st.clean_seconds, **{k: st.stages[k].seconds for k, _ in built}}
        attacked = {k: st.stages[k].attacked for k, _ in built}
        correct = {"clean": st.clean, **{k: st.stages[k].robust for k, _ in built}, "robust": st.robust.clone()}
        accuracy = {k: _fraction(c) for k, c in correct.items()}
        label = suite_label(suite_name, options, eot_n if use_eot else None)
        state["finished"] = True
        state["result"] = {
            "accuracy": accuracy, "seconds": seconds, "attacked": attacked, "randomized": bool(rnd["randomized"]),
            "label": label,
        }
        save(st)
    return SuiteResult(
        suite=suite_name, accuracy=accuracy, n=total, eps=float(eps), norm=norm, seconds=seconds, attacked=attacked,
        randomized=bool(rnd["randomized"]), eot_n=eot_n if use_eot else None, notes=notes, resumed=resumed,
        correct=correct, pred=st.pred, labels=y_all.clone(),
        label=label,
    )


def _build_stages(stages: list[Stage | tuple[str, AttackFn]], options: dict[str, Mapping[str, Any]], eps: float,
                  norm: str, seed: int) -> tuple[list[tuple[str, AttackFn]], list[dict[str, Any]]]:
    """``(name, attack)`` per stage (with the ``options`` overrides) and the stages' fingerprint spec."""
    stage_names = [s.name if isinstance(s, Stage) else s[0] for s in stages]
    unknown = set(options) - set(stage_names)
    if unknown:
        raise ValueError(f"options for unknown stages {sorted(unknown)}; stages: {stage_names}")
    built: list[tuple[str, AttackFn]] = []
    for s in stages:
        if isinstance(s, Stage):
            if s.name in options:
                s = Stage(s.name, s.attack, {**dict(s.options), **dict(options[s.name])})
            built.append((s.name, build_attack(s, eps, norm, seed)))
        else:
            built.append(s)
    spec = [
        {"name": s.name, "attack": s.attack, "options": {**dict(s.options), **dict(options.get(s.name, {}))}}
        if isinstance(s, Stage) else {"name": s[0], "attack": repr(type(s[1]).__name__)}
        for s in stages
    ]
    return built, spec


def _open_state(path: Path | None, fingerprint: dict[str, Any], labels: Tensor,
                notes: list[str]) -> tuple[dict[str, Any], bool]:
    """The JSON state to continue (from ``path``, upgraded if an older suite wrote it) or a fresh one,
    and whether finished work was loaded; says so in ``notes``."""
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as read back from the file
    state = _load_state(path, fingerprint)
    if state is not None and state["fingerprint"] != fingerprint:
        notes.append(_upgrade_state(state, fingerprint, labels, path))
    resumed = state is not None and (state.get("clean") is not None)
    if state is None:
        state = {"format": STATE_FORMAT, "fingerprint": fingerprint, "clean": None, "stages": {}, "current": None}
    if resumed:
        notes.append(f"resumed from {path}")
    return state, resumed


def _check_budget(name: str, x_adv: Tensor, x: Tensor, eps: float, norm: str) -> None:
    """Refuse an attack's output outside [0,1] or the eps-ball (a buggy attack must not count)."""
    if x_adv.shape != x.shape:
        raise RuntimeError(f"stage {name!r} returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}")
    d = (x_adv.detach().float() - x.float()).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    tol = 1e-5 * max(1.0, eps)
    if bool((size > eps + tol).any()) or bool((x_adv < -1e-6).any()) or bool((x_adv > 1 + 1e-6).any()):
        raise RuntimeError(
            f"stage {name!r} returned points outside the {norm} ball of radius {eps:.4g} (largest {float(size.max()):.4g}) "
            "or outside [0,1]; its numbers would be invalid"
        )


class SuiteStateError(ValueError):
    """A state file that cannot be resumed (unreadable, or written for another evaluation)."""


def _load_state(path: Path | None, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SuiteStateError(f"cannot read the suite state file {path}: {err}; delete it to start afresh") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SuiteStateError(f"{path} is not an aal suite state file ({STATE_FORMAT}); delete it or pick another path")
    old = state.get("fingerprint", {})
    if old != fingerprint:
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if diff != ["stages"] or not isinstance(old.get("stages"), list):
            raise SuiteStateError(
                f"the suite state file {path} was written for another evaluation (differs in: {', '.join(diff)}); "
                "delete it or pick another path"
            )
    return state


def _upgrade_state(state: dict[str, Any], fingerprint: dict[str, Any], labels: Tensor, path: Path | None) -> str:
    """Resume a state file of an older definition of the same suite (only its stages differ).

    Keeps the clean pass and the finished stages the old and new stage lists share from the start
    (same names, attacks and options, in order), rolls the per-sample flags back to the last kept
    stage, and leaves the rest to be run: the new stages must see exactly the points the kept
    ones left robust. Returns the note saying so.
    """
    old, new = state["fingerprint"]["stages"], fingerprint["stages"]
    common = 0
    while common < min(len(old), len(new)) and old[common] == new[common]:
        common += 1
    keep = [s["name"] for s in new[:common] if s["name"] in state["stages"]]
    current = state.get("current")
    if current is None or current.get("stage") not in [s["name"] for s in new[:common]]:
        # roll back to the flags after the last kept stage (or the clean pass)
        robust = state["stages"][keep[-1]]["robust"] if keep else state.get("clean")
        if robust is not None:
            flags = _unbits(robust, len(labels))
            pred = torch.tensor(state["pred"], dtype=torch.long)
            pred[flags] = labels[flags]  # robust points: the clean prediction is the label
            state.update(robust=robust, pred=pred.tolist())
        state["current"] = None
    state["stages"] = {name: state["stages"][name] for name in keep}
    state["fingerprint"] = fingerprint
    state.pop("finished", None)
    state.pop("result", None)
    rerun = [s["name"] for s in new if s["name"] not in keep]
    return (f"{path} was written by an older definition of this suite ({' -> '.join(s['name'] for s in old)}): "
            f"kept {', '.join(['clean', *keep]) if state.get('clean') is not None else 'nothing'}; "
            f"running {', '.join(rerun) if rerun else 'nothing'}")


__all__ = [
    "AUTOATTACK_STANDARD",
    "SUITES",
    "Stage",
    "SuiteResult",
    "SuiteStateError",
    "build_attack",
    "model_digest",
    "resolve_suite",
    "run_suite",
    "suite_label",
]
