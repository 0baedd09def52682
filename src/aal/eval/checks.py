"""Gradient-masking checks: does a robustness number reflect robustness, or a broken attack?

A defence can look robust because gradient-based attacks fail on it (shattered, vanishing or
random gradients, saturated outputs), not because it is. Carlini et al. (2019), "On Evaluating
Adversarial Robustness" (Sec. 5, "sanity checks"), list symptoms; AutoAttack's ``checks.py``
automates a few (randomness, probability outputs, zero gradients, Square stronger than the
white-box attacks). :func:`run_checks` runs these on a model and reports each as
``pass`` / ``warn`` / ``fail`` (or ``skip``) with the numbers behind it:

====================  =========================================================================
check                 what it measures (``tol`` = paired-noise tolerance, default max(1%, 2/n))
====================  =========================================================================
deterministic         two forward passes agree; else warn (attacks then use EOT automatically)
logits                outputs are logits: rows summing to 1 with values in [0,1] (probabilities)
                      or to one constant with values >= 0 (scaled softmax) -> warn
gradients             input gradients of the CE and of the (unclamped) margin loss, at x and at
                      a random point of the ball: any non-finite -> fail; zero for > 10% of
                      points -> fail; for any point -> warn
single_vs_iterative   FGSM vs the strongest PGD run: PGD accuracy above FGSM's + tol -> fail;
                      FGSM breaks > tol of points that no PGD run breaks -> warn
steps_restarts        PGD-a vs PGD-b vs PGD-b x r (default 10, 50, 50x3): accuracy rising with
                      steps or restarts by > tol -> fail; restarts still lowering it by > 5 pp
                      -> warn (the attack has not converged)
eps_growth            PGD at eps x (0.5, 1, 2, 4, 8) and an unbounded eps (1 for L-inf, the
                      image-cube diameter for L2): accuracy rising with eps by > tol -> fail;
                      unbounded accuracy above 10% -> fail, above tol -> warn
noise_vs_attack       random noise on the ball's surface (L-inf: random corners; ``noise_draws``
                      draws, worst case) vs the strongest PGD run: as single_vs_iterative
whitebox_vs_blackbox  Square (score-based, ``square_queries``) vs the strongest PGD run: as
                      single_vs_iterative; ``skip`` if no ``square`` attack is registered
====================  =========================================================================

Attack results are per-sample and paired (the same points, the same seeds), so the tolerances
are small. Accuracies count clean-misclassified points as wrong, as everywhere in aal.

Example:
    >>> import torch, aal
    >>> from aal.eval.checks import run_checks
    >>> model = aal.create_model("small_cnn")
    >>> x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    >>> report = run_checks(model, (x, y), eps=0.1, steps=(2, 4), restarts=2, sweep_steps=4,
    ...                     square_queries=20)                              # doctest: +SKIP
    >>> print(report.table())                                               # doctest: +SKIP
    PASS  deterministic         5 passes agree (max output diff 0)
    ...
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from aal.attacks import ATTACKS, FGSM, PGD
from aal.attacks.base import THREATS, attack_mode, ce_loss
from aal.eval.eot import EOTWrapper, randomness
from aal.eval.evaluator import EvalResult, _as_tensors, evaluate, model_device
from aal.eval.suite import Stage, build_attack
from aal.utils.modes import eval_mode

STATUSES = ("pass", "warn", "fail", "skip")
_RANK = {"skip": 0, "pass": 1, "warn": 2, "fail": 3}


@dataclass
class CheckResult:
    """One check's verdict.

    Attributes:
        name: the check (one of :data:`CHECKS`).
        status: ``"pass"``, ``"warn"``, ``"fail"`` or ``"skip"``.
        message: one line saying what was found, with the key numbers.
        numbers: the measurements (JSON-able: floats, ints, lists, dicts).
    """

    name: str
    status: str
    message: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "message": self.message, "numbers": self.numbers}


@dataclass
class CheckReport:
    """All checks of one :func:`run_checks` call.

    Attributes:
        checks: the results, in :data:`CHECKS` order.
        n, eps, norm: what was evaluated.
        tol: the tolerance used.
        seconds: wall-clock time of the whole run.
        eot_n: EOT draws used by the attacks (randomised model), else ``None``.
    """

    checks: list[CheckResult]
    n: int
    eps: float
    norm: str
    tol: float
    seconds: float
    eot_n: int | None = None

    @property
    def status(self) -> str:
        """The worst status (``fail`` > ``warn`` > ``pass``; ``skip`` counts as pass)."""
        worst = max((_RANK[c.status] for c in self.checks), default=_RANK["pass"])
        return "pass" if worst <= _RANK["pass"] else next(k for k, v in _RANK.items() if v == worst)

    def __getitem__(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def by_status(self, status: str) -> list[CheckResult]:
        return [c for c in self.checks if c.status == status]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "n": int(self.n),
            "eps": float(self.eps),
            "norm": self.norm,
            "tol": float(self.tol),
            "seconds": float(self.seconds),
            "eot_n": self.eot_n,
            "checks": [c.to_dict() for c in self.checks],
        }

    def table(self) -> str:
        """One line per check: ``STATUS  name  message``, then a summary line."""
        w = max((len(c.name) for c in self.checks), default=4)
        lines = [f"{c.status.upper():<4}  {c.name:<{w}}  {c.message}" for c in self.checks]
        counts = {s: len(self.by_status(s)) for s in STATUSES}
        lines.append(
            f"({counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail, {counts['skip']} skip; "
            f"n={self.n}, eps={self.eps:.4g}, {self.norm}, tol={100 * self.tol:.1f} pp, {self.seconds:.1f} s)"
        )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers
def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Unclamped margin ``max_{j != y} z_j - z_y`` per sample (B,).

    Unlike :func:`aal.attacks.cw_loss` it is not clamped at ``-kappa``: a clamp would zero the
    gradient of confidently classified points and raise false alarms.
    """
    other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - logits.gather(1, y[:, None]).squeeze(1)


class RandomNoise:
    """Random perturbations on the surface of the ball; a point counts as broken if any draw breaks it.

    L-inf: random corners ``eps * sign(u)`` (the largest L-inf noise); L2: a Gaussian direction
    scaled to length ``eps``. Among ``draws`` draws it returns, per sample, the first draw that
    is misclassified (else the last). Seeded: repeatable.
    """

    name = "noise"

    def __init__(self, eps: float, norm: str = "linf", draws: int = 10, seed: int = 0) -> None:
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.eps, self.norm, self.draws, self.seed = float(eps), norm, int(draws), int(seed)

    @torch.no_grad()
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        g = torch.Generator(device=x.device).manual_seed(self.seed)
        best = x.clone()
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.draws):
            if self.norm == "linf":
                d = self.eps * (torch.rand(x.shape, generator=g, device=x.device) * 2 - 1).sign()
            else:
                d = torch.randn(x.shape, generator=g, device=x.device)
                d = d * (self.eps / d.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *([1] * (x.dim() - 1)))
            xn = (x + d).clamp(0, 1)
            hit = (model(xn).argmax(1) != y) & ~found
            best[hit] = xn[hit]
            found |= hit
            if bool(found.all()):
                break
            keep = ~found
            best[keep] = xn[keep]
        return best


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _weaker(name: str, strong_name: str, weak_name: str, strong: Tensor, weak: Tensor, tol: float) -> CheckResult:
    """``weak`` (per-sample robust flags) should never beat ``strong``."""
    n = len(strong)
    a_s, a_w = strong.float().mean().item(), weak.float().mean().item()
    extra = int((~weak & strong).sum())
    numbers = {f"acc_{strong_name}": a_s, f"acc_{weak_name}": a_w, f"only_{weak_name}_breaks": extra, "n": n}
    if a_s > a_w + tol:
        return CheckResult(name, "fail", f"{weak_name} {_pct(a_w)} beats {strong_name} {_pct(a_s)}: gradients are likely masked", numbers)
    if extra / max(n, 1) > tol:
        return CheckResult(
            name, "warn", f"{weak_name} breaks {extra} points {strong_name} does not ({strong_name} {_pct(a_s)}, {weak_name} {_pct(a_w)})", numbers
        )
    return CheckResult(name, "pass", f"{strong_name} {_pct(a_s)} <= {weak_name} {_pct(a_w)} (only {weak_name} breaks {extra})", numbers)


# ----------------------------------------------------------------------------- the context
@dataclass
class CheckContext:
    """What every check reads: the model, the data, the budget, the settings, shared attack results.

    Built once by :func:`run_checks` (with the model in eval mode and the RNG seeded); the checks
    share :meth:`robust_under`'s cache, so an attack two checks compare against (the PGD runs)
    runs once.

    Attributes:
        model: the classifier; robustness is judged on it.
        attack_model: what the attacks see (an EOT wrapper of a randomised model, else ``model``).
        x: float images in [0,1] (N,C,H,W), on the CPU.
        y: labels (N,).
        eps, norm, tol, batch_size, seed, progress, device: as :func:`run_checks`.
        randomness: :func:`aal.eval.eot.randomness` of the model on the first points.
        eot_n: EOT draws the attacks use, ``None`` without EOT.
        steps, restarts, eps_factors, sweep_steps, square_queries, noise_draws: as :func:`run_checks`.
        cache: per-point robust flags by attack key (``"clean"`` included), filled on demand.
    """

    model: nn.Module
    attack_model: nn.Module
    x: Tensor
    y: Tensor
    eps: float
    norm: str
    tol: float
    batch_size: int
    seed: int
    progress: bool
    device: torch.device
    randomness: dict[str, Any]
    eot_n: int | None
    steps: tuple[int, int] = (10, 50)
    restarts: int = 3
    eps_factors: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0)
    sweep_steps: int = 20
    square_queries: int = 1000
    noise_draws: int = 10
    cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def evaluate(self, named: list[tuple[str, Callable[..., Tensor]]]) -> EvalResult:
        """:func:`aal.eval.evaluate` of ``named`` attacks: they attack ``attack_model``, ``model`` judges."""

        def wrap(attack: Callable[..., Tensor]) -> Callable[..., Tensor]:
            return lambda _m, xb, yb: attack(self.attack_model, xb, yb)

        return evaluate(self.model, (self.x, self.y), attacks=[(k, wrap(a)) for k, a in named],
                        batch_size=self.batch_size, seed=self.seed, progress=self.progress, device=self.device)

    def robust_under(self, named: list[tuple[str, Callable[..., Tensor]]]) -> dict[str, Tensor]:
        """Per-point robust flags under each of ``named`` (and ``"clean"``), each attack run once."""
        todo = [(k, a) for k, a in named if k not in self.cache]
        if todo:
            self.cache.update({k: v for k, v in self.evaluate(todo).correct.items() if k != "robust"})
        return {k: self.cache[k] for k in ["clean", *(k for k, _ in named)]}

    def pgd_runs(self) -> list[tuple[str, Callable[..., Tensor]]]:
        """PGD-a, PGD-b and PGD-b with restarts (``steps = (a, b)``), seeded."""
        a, b = self.steps
        return [
            (f"pgd{a}", PGD(self.eps, steps=a, norm=self.norm, seed=self.seed)),
            (f"pgd{b}", PGD(self.eps, steps=b, norm=self.norm, seed=self.seed)),
            (f"pgd{b}x{self.restarts}", PGD(self.eps, steps=b, restarts=self.restarts, norm=self.norm, seed=self.seed)),
        ]

    def strongest(self) -> Tensor:
        """Per-point flags robust under every PGD run (the per-sample worst case)."""
        flags = self.robust_under(self.pgd_runs())
        out = flags["clean"].clone()
        for k, _ in self.pgd_runs():
            out &= flags[k]
        return out


# ----------------------------------------------------------------------------- the checks
CheckFn = Callable[[CheckContext], CheckResult]
CHECK_FUNCTIONS: dict[str, CheckFn] = {}
"""The checks by name, in the order they run (and :data:`CHECKS` lists them)."""


def register_check(fn: CheckFn) -> CheckFn:
    """Register ``check_<name>(ctx) -> CheckResult`` under ``<name>`` (AutoAttack's ``checks.py`` layout).

    Raises:
        ValueError: a function not named ``check_*``, or a name already registered.
    """
    if not fn.__name__.startswith("check_"):
        raise ValueError(f"a check must be named check_<name>, got {fn.__name__!r}")
    name = fn.__name__[len("check_"):]
    if name in CHECK_FUNCTIONS:
        raise ValueError(f"check {name!r} is already registered")
    CHECK_FUNCTIONS[name] = fn
    return fn


@register_check
def check_deterministic(ctx: CheckContext) -> CheckResult:
    """Two forward passes agree; else warn (attacks then use EOT automatically)."""
    rnd = ctx.randomness
    nums = {k: v for k, v in rnd.items() if k != "randomized"}
    if rnd["randomized"]:
        how = f"attacks use EOT over {ctx.eot_n} draws" if ctx.eot_n else "EOT is off: numbers are overestimates"
        return CheckResult("deterministic", "warn", f"outputs vary across {rnd['passes']} passes "
                           f"({rnd['prediction_flips']} predictions flip, max diff {rnd['max_output_diff']:.3g}); {how}", nums)
    return CheckResult("deterministic", "pass", f"{rnd['passes']} passes agree (max output diff {rnd['max_output_diff']:.2g})", nums)


@register_check
@torch.no_grad()
def check_logits(ctx: CheckContext) -> CheckResult:
    """Outputs are logits, not probabilities (rows summing to 1) or scaled probabilities (one constant sum)."""
    outs = torch.cat([ctx.model(xb.to(ctx.device)).float().cpu() for xb in ctx.x[:1024].split(ctx.batch_size)])
    sums = outs.sum(1)
    lo, hi = float(outs.min()), float(outs.max())
    s_mean, s_std = float(sums.mean()), float(sums.std()) if len(sums) > 1 else 0.0
    nums = {"min": lo, "max": hi, "row_sum_mean": s_mean, "row_sum_std": s_std}
    if not math.isfinite(lo) or not math.isfinite(hi):
        return CheckResult("logits", "fail", "outputs contain inf/NaN", nums)
    if lo >= -1e-5 and hi <= 1 + 1e-5 and bool(((sums - 1).abs() < 1e-4).all()):
        return CheckResult("logits", "warn", "outputs are probabilities (rows sum to 1, all in [0,1]): attack the logits", nums)
    if lo >= 0 and s_mean > 0 and bool(((sums - s_mean).abs() <= 1e-4 * abs(s_mean)).all()):
        return CheckResult("logits", "warn", f"outputs are >= 0 and every row sums to {s_mean:.4g}: scaled probabilities, "
                           "not logits (saturating softmax)", nums)
    return CheckResult("logits", "pass", f"logits in [{lo:.3g}, {hi:.3g}], row sums vary ({s_mean:.3g} +- {s_std:.3g})", nums)


@register_check
def check_gradients(ctx: CheckContext) -> CheckResult:
    """Input gradients of the CE and the margin at x and at a random point of the ball: finite and non-zero."""
    threat = THREATS[ctx.norm](ctx.eps)
    g = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    zero = {"ce": 0, "margin": 0}
    mean_abs = {"ce": 0.0, "margin": 0.0}
    nonfinite = 0
    with attack_mode(ctx.attack_model), torch.enable_grad():
        for xb, yb in zip(ctx.x.split(ctx.batch_size), ctx.y.split(ctx.batch_size)):
            xb, yb = xb.to(ctx.device), yb.to(ctx.device)
            for xs in (xb, threat.apply(xb, threat.box(xb, threat.init(xb, g), None), None)):
                for key, loss_fn in (("ce", ce_loss), ("margin", margin_loss)):
                    xi = xs.detach().clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(loss_fn(ctx.attack_model(xi), yb).sum(), xi)
                    flat = grad.flatten(1)
                    finite = torch.isfinite(flat).all(1)
                    nonfinite += int((~finite).sum())
                    zero[key] += int(((flat.abs().sum(1) == 0) & finite).sum())
                    mean_abs[key] += float(flat[finite].abs().mean(1).sum()) if bool(finite.any()) else 0.0
    points = 2 * len(ctx.x)  # clean + random start
    frac = {k: v / points for k, v in zero.items()}
    nums = {
        "points": points, "nonfinite": nonfinite, "zero_frac_ce": frac["ce"], "zero_frac_margin": frac["margin"],
        "mean_abs_grad_ce": mean_abs["ce"] / points, "mean_abs_grad_margin": mean_abs["margin"] / points,
    }
    msg = f"zero gradients: CE {_pct(frac['ce'])}, margin {_pct(frac['margin'])} of {points} points; non-finite: {nonfinite}"
    worst = max(frac.values())
    if nonfinite:
        return CheckResult("gradients", "fail", msg, nums)
    if worst > 0.1:
        return CheckResult("gradients", "fail", msg + " (vanishing/shattered gradients)", nums)
    return CheckResult("gradients", "warn" if worst > 0 else "pass", msg, nums)


@register_check
def check_single_vs_iterative(ctx: CheckContext) -> CheckResult:
    """FGSM must not beat the strongest PGD run."""
    fgsm = ctx.robust_under([("fgsm", FGSM(ctx.eps, norm=ctx.norm))])["fgsm"]
    return _weaker("single_vs_iterative", "pgd", "fgsm", ctx.strongest(), fgsm, ctx.tol)


@register_check
def check_steps_restarts(ctx: CheckContext) -> CheckResult:
    """Accuracy must not rise with more PGD steps or restarts; a still-falling one has not converged."""
    runs = ctx.pgd_runs()
    flags = ctx.robust_under(runs)
    labels = [k for k, _ in runs]
    accs = [flags[k].float().mean().item() for k in labels]
    nums = {f"acc_{k}": v for k, v in zip(labels, accs)}
    trail = ", ".join(f"{k} {_pct(v)}" for k, v in zip(labels, accs))
    if any(accs[i + 1] > accs[i] + ctx.tol for i in range(2)):
        return CheckResult("steps_restarts", "fail", f"accuracy rises with more steps/restarts ({trail})", nums)
    if accs[0] - accs[2] > max(0.05, ctx.tol):
        return CheckResult("steps_restarts", "warn", f"more steps/restarts still lower accuracy by "
                           f"{100 * (accs[0] - accs[2]):.1f} pp ({trail}): not converged", nums)
    return CheckResult("steps_restarts", "pass", trail, nums)


@register_check
def check_eps_growth(ctx: CheckContext) -> CheckResult:
    """Accuracy must fall with eps and reach ~0 at an unbounded eps."""
    unbounded = 1.0 if ctx.norm == "linf" else math.sqrt(ctx.x[0].numel())  # the image cube's L-inf / L2 diameter
    budgets = sorted({min(float(f) * ctx.eps, unbounded) for f in ctx.eps_factors if f > 0})
    budgets = [e for e in budgets if e < unbounded] + [unbounded]
    named = [(f"eps={e:.4g}", PGD(e, steps=ctx.sweep_steps, norm=ctx.norm, seed=ctx.seed)) for e in budgets]
    res = ctx.evaluate(named)
    accs = [res.accuracy[k] for k, _ in named]
    nums = {"eps": budgets, "accuracy": accs, "steps": ctx.sweep_steps, "clean": res.accuracy["clean"]}
    trail = ", ".join(f"{e:.3g}: {_pct(a)}" for e, a in zip(budgets, accs))
    if any(accs[i + 1] > accs[i] + ctx.tol for i in range(len(accs) - 1)):
        return CheckResult("eps_growth", "fail", f"accuracy rises with eps ({trail})", nums)
    left = f"unbounded eps={unbounded:.3g} leaves {_pct(accs[-1])} accuracy ({trail})"
    if accs[-1] > 0.1:
        return CheckResult("eps_growth", "fail", left, nums)
    if accs[-1] > ctx.tol:
        return CheckResult("eps_growth", "warn", left, nums)
    return CheckResult("eps_growth", "pass", trail, nums)


@register_check
def check_noise_vs_attack(ctx: CheckContext) -> CheckResult:
    """Random noise on the ball's surface must not beat the strongest PGD run."""
    noise = ctx.robust_under([("noise", RandomNoise(ctx.eps, ctx.norm, draws=ctx.noise_draws, seed=ctx.seed))])["noise"]
    return _weaker("noise_vs_attack", "pgd", "noise", ctx.strongest(), noise, ctx.tol)


@register_check
def check_whitebox_vs_blackbox(ctx: CheckContext) -> CheckResult:
    """The score-based Square attack must not beat the strongest PGD run; skipped without a ``square`` attack."""
    if "square" not in ATTACKS:
        return CheckResult("whitebox_vs_blackbox", "skip", "no 'square' attack registered", {})
    sq = build_attack(Stage("square", "square", {"queries": ctx.square_queries}), ctx.eps, ctx.norm, ctx.seed)
    square = ctx.robust_under([("square", sq)])["square"]
    r = _weaker("whitebox_vs_blackbox", "pgd", "square", ctx.strongest(), square, ctx.tol)
    r.numbers["square_queries"] = ctx.square_queries
    return r


CHECKS: tuple[str, ...] = tuple(CHECK_FUNCTIONS)
"""The checks' names, in the order they run."""


# ----------------------------------------------------------------------------- the driver
def run_checks(
    model: nn.Module,
    data: Any,
    *,
    eps: float,
    norm: str = "linf",
    n: int | None = 500,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
    device: str | torch.device | None = None,
    tol: float | None = None,
    steps: tuple[int, int] = (10, 50),
    restarts: int = 3,
    eps_factors: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
    sweep_steps: int = 20,
    square_queries: int = 1000,
    noise_draws: int = 10,
    eot: bool | str = "auto",
    eot_n: int = 20,
    which: Sequence[str] | None = None,
) -> CheckReport:
    """Run the gradient-masking checks (see the module docstring) on the first ``n`` points.

    Args:
        model: classifier on images in [0,1] (logits); eval mode during the call, modes restored.
        data: ``(x, y)`` or a split with ``.images``/``.labels`` (as :func:`aal.eval.evaluate`).
        eps: the budget the robustness claim is made at.
        norm: ``"linf"`` or ``"l2"``.
        n: points used (first ``n``; ``None``: all). 500 gives a tolerance of 1 pp.
        batch_size, seed, progress, device: as :func:`aal.eval.evaluate`.
        tol: tolerance for paired accuracy differences (default ``max(0.01, 2 / n)``).
        steps: ``(a, b)``: PGD-a vs PGD-b vs PGD-b with ``restarts`` restarts.
        restarts: restarts of the last PGD run (>= 2).
        eps_factors: multiples of ``eps`` for the eps sweep (an unbounded eps is added).
        sweep_steps: PGD steps in the eps sweep.
        square_queries: Square's query budget.
        noise_draws: random-noise draws per point.
        eot: ``"auto"`` (EOT iff the model is randomised), ``True`` or ``False``.
        eot_n: EOT draws.
        which: run only these checks (names from :data:`CHECKS`).

    Returns:
        a :class:`CheckReport`; ``report.status`` is the worst verdict.
    """
    t_start = time.perf_counter()
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be > 0, got {eps}")
    if len(steps) != 2 or not 1 <= steps[0] < steps[1]:
        raise ValueError(f"steps must be (a, b) with 1 <= a < b, got {steps}")
    if restarts < 2:
        raise ValueError(f"restarts must be >= 2, got {restarts}")
    wanted = list(CHECKS) if which is None else [w.strip().lower() for w in which]
    bad = [w for w in wanted if w not in CHECKS]
    if bad:
        raise ValueError(f"unknown checks {bad}; choose from {', '.join(CHECKS)}")
    x_all, y_all, is_uint8 = _as_tensors(data, n)
    total = len(y_all)
    if total == 0:
        raise ValueError("no data to check")
    tol = max(0.01, 2.0 / total) if tol is None else float(tol)
    device = model_device(model, device)
    x_f = x_all.float().div(255) if is_uint8 else x_all.float()
    fork_devices = [device] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        rnd = randomness(model, x_f[: min(total, 64)].to(device), n=5)
        use_eot = bool(rnd["randomized"]) if eot == "auto" else bool(eot)
        ctx = CheckContext(
            model=model, attack_model=EOTWrapper(model, n=eot_n) if use_eot else model, x=x_f, y=y_all, eps=float(eps),
            norm=norm, tol=tol, batch_size=batch_size, seed=seed, progress=progress, device=device, randomness=rnd,
            eot_n=eot_n if use_eot else None, steps=(steps[0], steps[1]), restarts=restarts, eps_factors=eps_factors,
            sweep_steps=sweep_steps, square_queries=square_queries, noise_draws=noise_draws,
        )
        results = [CHECK_FUNCTIONS[name](ctx) for name in CHECKS if name in wanted]
    return CheckReport(results, total, float(eps), norm, tol, time.perf_counter() - t_start, ctx.eot_n)


__all__ = [
    "CHECKS",
    "CHECK_FUNCTIONS",
    "CheckContext",
    "CheckReport",
    "CheckResult",
    "RandomNoise",
    "margin_loss",
    "register_check",
    "run_checks",
]
