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

from aal.attacks import FGSM, PGD
from aal.eval.eot import EOTWrapper, randomness
from aal.eval.evaluator import _as_tensors, evaluate
from aal.utils.modes import eval_mode

STATUSES = ("pass", "warn", "fail", "skip")
_RANK = {"skip": 0, "pass": 1, "warn": 2, "fail": 3}
CHECKS = (
    "deterministic",
    "logits",
    "gradients",
    "single_vs_iterative",
    "steps_restarts",
    "eps_growth",
    "noise_vs_attack",
    "whitebox_vs_blackbox",
)


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


# ----------------------------------------------------------------------------- the checks
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
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    x_f = x_all.float().div(255) if is_uint8 else x_all.float()
    data_f = (x_f, y_all)
    d = x_f[0].numel()
    unbounded = 1.0 if norm == "linf" else math.sqrt(d)

    results: list[CheckResult] = []
    fork_devices = [device] if device.type == "cuda" else []
    with eval_mode(model):
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            probe = x_f[: min(total, 64)].to(device)
            rnd = randomness(model, probe, n=5)
            use_eot = bool(rnd["randomized"]) if eot == "auto" else bool(eot)
            attack_model: nn.Module = EOTWrapper(model, n=eot_n) if use_eot else model

            def wrap(attack: Callable[..., Tensor]) -> Callable[..., Tensor]:
                # attacks see the EOT model; evaluate() judges the points on the model itself
                return lambda _m, xb, yb: attack(attack_model, xb, yb)

            def robust_under(named: list[tuple[str, Callable[..., Tensor]]]) -> dict[str, Tensor]:
                res = evaluate(model, data_f, attacks=[(k, wrap(a)) for k, a in named], batch_size=batch_size,
                               seed=seed, progress=progress, device=device)
                return res.correct

            cache: dict[str, Tensor] = {}

            def get(keys_attacks: list[tuple[str, Callable[..., Tensor]]]) -> None:
                todo = [(k, a) for k, a in keys_attacks if k not in cache]
                if todo:
                    cache.update({k: v for k, v in robust_under(todo).items() if k != "robust"})

            a, b = steps
            pgd_runs = [
                (f"pgd{a}", PGD(eps, steps=a, norm=norm, seed=seed)),
                (f"pgd{b}", PGD(eps, steps=b, norm=norm, seed=seed)),
                (f"pgd{b}x{restarts}", PGD(eps, steps=b, restarts=restarts, norm=norm, seed=seed)),
            ]

            def strongest() -> Tensor:
                get(pgd_runs)
                out = cache["clean"].clone()
                for k, _ in pgd_runs:
                    out &= cache[k]
                return out

            for name in CHECKS:
                if name not in wanted:
                    continue
                if name == "deterministic":
                    nums = {k: v for k, v in rnd.items() if k != "randomized"}
                    if rnd["randomized"]:
                        how = f"attacks use EOT over {eot_n} draws" if use_eot else "EOT is off: numbers are overestimates"
                        results.append(CheckResult(name, "warn", f"outputs vary across {rnd['passes']} passes "
                                                   f"({rnd['prediction_flips']} predictions flip, max diff {rnd['max_output_diff']:.3g}); {how}", nums))
                    else:
                        results.append(CheckResult(name, "pass", f"{rnd['passes']} passes agree (max output diff {rnd['max_output_diff']:.2g})", nums))
                elif name == "logits":
                    results.append(_check_logits(model, x_f, batch_size, device))
                elif name == "gradients":
                    results.append(_check_gradients(attack_model, x_f, y_all, eps, norm, batch_size, device, seed))
                elif name == "single_vs_iterative":
                    get([("fgsm", FGSM(eps, norm=norm))])
                    results.append(_weaker(name, "pgd", "fgsm", strongest(), cache["fgsm"], tol))
                elif name == "steps_restarts":
                    get(pgd_runs)
                    accs = [cache[k].float().mean().item() for k, _ in pgd_runs]
                    labels = [k for k, _ in pgd_runs]
                    nums = {f"acc_{k}": v for k, v in zip(labels, accs)}
                    rises = [(labels[i], labels[i + 1]) for i in range(2) if accs[i + 1] > accs[i] + tol]
                    trail = ", ".join(f"{k} {_pct(v)}" for k, v in zip(labels, accs))
                    if rises:
                        results.append(CheckResult(name, "fail", f"accuracy rises with more steps/restarts ({trail})", nums))
                    elif accs[0] - accs[2] > max(0.05, tol):
                        results.append(CheckResult(name, "warn", f"more steps/restarts still lower accuracy by "
                                                   f"{100 * (accs[0] - accs[2]):.1f} pp ({trail}): not converged", nums))
                    else:
                        results.append(CheckResult(name, "pass", trail, nums))
                elif name == "eps_growth":
                    results.append(_check_eps_growth(model, data_f, wrap, eps, norm, eps_factors, unbounded, sweep_steps,
                                                     batch_size, seed, progress, device, tol))
                elif name == "noise_vs_attack":
                    get([("noise", RandomNoise(eps, norm, draws=noise_draws, seed=seed))])
                    results.append(_weaker(name, "pgd", "noise", strongest(), cache["noise"], tol))
                elif name == "whitebox_vs_blackbox":
                    from aal.attacks import ATTACKS
                    from aal.eval.suite import Stage, build_attack

                    if "square" not in ATTACKS:
                        results.append(CheckResult(name, "skip", "no 'square' attack registered", {}))
                        continue
                    sq = build_attack(Stage("square", "square", {"queries": square_queries}), eps, norm, seed)
                    get([("square", sq)])
                    r = _weaker(name, "pgd", "square", strongest(), cache["square"], tol)
                    r.numbers["square_queries"] = square_queries
                    results.append(r)
    return CheckReport(results, total, float(eps), norm, tol, time.perf_counter() - t_start, eot_n if use_eot else None)


@torch.no_grad()
def _check_logits(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> CheckResult:
    outs = torch.cat([model(xb.to(device)).float().cpu() for xb in x[:1024].split(batch_size)])
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


def _check_gradients(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, batch_size: int,
                     device: torch.device, seed: int) -> CheckResult:
    from aal.attacks.base import THREATS, attack_mode, ce_loss

    threat = THREATS[norm](eps)
    g = torch.Generator(device=device).manual_seed(seed)
    zero = {"ce": 0, "margin": 0}
    nonfinite = 0
    count = 0
    mean_abs = {"ce": 0.0, "margin": 0.0}
    with attack_mode(model), torch.enable_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            xb, yb = xb.to(device), yb.to(device)
            starts = [xb, threat.apply(xb, threat.box(xb, threat.init(xb, g), None), None)]
            for xs in starts:
                for key, loss_fn in (("ce", ce_loss), ("margin", margin_loss)):
                    xi = xs.detach().clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(loss_fn(model(xi), yb).sum(), xi)
                    flat = grad.flatten(1)
                    finite = torch.isfinite(flat).all(1)
                    nonfinite += int((~finite).sum())
                    zero[key] += int(((flat.abs().sum(1) == 0) & finite).sum())
                    mean_abs[key] += float(flat[finite].abs().mean(1).sum()) if bool(finite.any()) else 0.0
            count += len(xb)
    points = 2 * count  # clean + random start
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
    if worst > 0:
        return CheckResult("gradients", "warn", msg, nums)
    return CheckResult("gradients", "pass", msg, nums)


def _check_eps_growth(model, data_f, wrap, eps, norm, factors, unbounded, steps, batch_size, seed, progress, device, tol) -> CheckResult:
    budgets = sorted({min(float(f) * eps, unbounded) for f in factors if f > 0})
    budgets = [e for e in budgets if e < unbounded] + [unbounded]
    named = [(f"eps={e:.4g}", wrap(PGD(e, steps=steps, norm=norm, seed=seed))) for e in budgets]
    res = evaluate(model, data_f, attacks=named, batch_size=batch_size, seed=seed, progress=progress, device=device)
    accs = [res.accuracy[k] for k, _ in named]
    nums = {"eps": budgets, "accuracy": accs, "steps": steps, "clean": res.accuracy["clean"]}
    trail = ", ".join(f"{e:.3g}: {_pct(a)}" for e, a in zip(budgets, accs))
    rises = [budgets[i + 1] for i in range(len(accs) - 1) if accs[i + 1] > accs[i] + tol]
    if rises:
        return CheckResult("eps_growth", "fail", f"accuracy rises with eps ({trail})", nums)
    if accs[-1] > 0.1:
        return CheckResult("eps_growth", "fail", f"unbounded eps={unbounded:.3g} leaves {_pct(accs[-1])} accuracy ({trail})", nums)
    if accs[-1] > tol:
        return CheckResult("eps_growth", "warn", f"unbounded eps={unbounded:.3g} leaves {_pct(accs[-1])} accuracy ({trail})", nums)
    return CheckResult("eps_growth", "pass", trail, nums)


__all__ = ["CHECKS", "CheckReport", "CheckResult", "RandomNoise", "margin_loss", "run_checks"]
