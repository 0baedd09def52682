"""Auto-PGD (APGD) and its targeted version APGD-T (Croce & Hein, ICML 2020).

Paper: F. Croce and M. Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020 (arXiv:2003.01690); reference code: the ``autoattack``
package (``autopgd_base.py``). Written from the paper and checked against that code; where the
two differ, the choice is stated below.

The algorithm (Alg. 1 of the paper), per sample, with ``P`` the projection onto the threat model:

* start at a random point of the ball (L-inf: ``eps * t / ||t||_inf`` for ``t ~ U[-1,1]^d``;
  L2: ``eps * t / ||t||_2`` for ``t ~ N(0, I)``, i.e. on the sphere, as the reference), clipped
  to the image box;
* step size ``eta = 2 eps`` (L-inf and L2);
* ``z = P(x_k + eta * s(grad))`` with ``s`` the steepest-ascent direction of the norm, then
  ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))`` with momentum
  ``alpha = 0.75`` (``alpha = 1`` at the first step);
* checkpoints ``w_j = ceil(p_j N)`` with ``p_0 = 0, p_1 = 0.22,
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (for ``N = 100``: 0, 22, 41, 57, 70, 80,
  87, 93, 99). At each checkpoint the step is halved, and the iterate restarted from the best
  point found so far (with the gradient stored there), when
  (1) at most a fraction ``rho = 0.75`` of the steps since the last checkpoint increased the
  objective, or (2) the step was not halved at the last checkpoint and the best objective has
  not changed since;
* losses: cross-entropy (APGD-CE), DLR (APGD-DLR, :func:`~aal.attacks.base.dlr_loss`) and, for
  APGD-T, the targeted DLR (:func:`~aal.attacks.base.dlr_targeted_loss`) toward each of the
  ``n_target_classes = 9`` classes with the highest clean logits after the top one, one run
  (with its restarts) per target, each on the points not yet broken.

What is kept per sample: the first restart (APGD-T: target / restart) that succeeds (the point
is misclassified, or, with ``targeted``, hits the target), and within a run the successful
iterate of highest objective; a sample never broken gets the iterate of highest objective
(APGD-T: of the run whose answer has the highest margin ``max_{j!=y} z_j - z_y``, since the
targeted objectives of different targets are not comparable). Restarts after the first run
only on the samples not yet broken, as the reference.

Selective attacks: as every aal attack, APGD optimises a latent ``u`` in the ball and applies
``delta = mask * u`` (see :mod:`aal.attacks.base`); the projection ``P`` is onto
``{u: ||u|| <= eps, x + mask * u in [0,1]}`` (exact for L-inf, ball-then-box for L2 as the
reference). With ``mask=None`` this is exactly the reference's iterate.

Differences from the reference implementation (``autoattack/autopgd_base.py``):

* Checkpoints: ``schedule="paper"`` (default) uses ``w_j = ceil(p_j N)`` as the paper; the
  reference's integer recursion (first window ``int(0.22 N)``, shrinking by ``int(0.03 N)`` to
  at least ``int(0.06 N)``) is ``schedule="reference"``. Both give the same checkpoints for
  ``N = 100`` (the default) and differ slightly for other ``N``.
* Condition (1) counts the increases over the window including the first step from the
  checkpoint iterate ``x^{(w_{j-1})}`` (so at the first checkpoint the step from the starting
  point), as the paper's sum; the reference's first window compares the first iterate's loss
  with 0 (an uninitialised slot of its loss history). The comparison is ``<= rho * k`` as in
  the reference (the paper writes ``<``; they differ only when ``rho * k`` is an integer).
* Condition (2) cannot fire at the first checkpoint, as in the reference (which starts with
  "reduced at the last check" set); the paper leaves ``eta^{(w_0)}`` implicit.
* The returned point of a sample never broken is its highest-objective iterate (the reference
  returns the clean image there); of a broken sample, its successful iterate of highest
  objective (the reference keeps the last successful iterate). Robust accuracy is the same.
* Samples misclassified at the start are attacked too (the reference skips them and returns
  them unchanged); evaluation suites attack only the points still correct anyway.
* EOT (``eot_iter > 1``): the gradient *and the objective* are averaged over the draws (the
  reference averages the gradient and uses the last draw's loss); success is judged on the
  last draw, as the reference.
* ``n_target_classes`` is capped at ``C - 1`` for a ``C``-class model (the reference assumes
  at least ``n_target_classes + 1`` classes). The DLR losses need at least 3 (targeted: 4)
  classes and raise otherwise; use ``apgd_ce`` (or APGD-T with ``loss="ce"``) for fewer.
* Random starts come from a generator seeded with ``seed`` (the reference reseeds the global
  RNG); every run draws the start for the whole batch and keeps the rows it attacks, so a
  sample's start does not depend on which other samples are still being attacked.

Example:
    >>> import torch, aal
    >>> model = aal.create_model("small_cnn")
    >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    >>> x_adv = aal.attacks.APGD(eps=0.1, steps=10, seed=0)(model, x, y)
    >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
    True
    >>> x_t = aal.attacks.APGDT(eps=0.1, steps=10, n_target_classes=3, seed=0)(model, x, y)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from aal.attacks.base import THREATS, Attack, LossFn, dlr_targeted_loss, margin_loss

CHECKPOINT_SCHEDULES = ("paper", "reference")


def checkpoints(n_iter: int, schedule: str = "paper") -> list[int]:
    """The iterations ``w_0 = 0 < w_1 < ...`` at which APGD may halve its step.

    Args:
        n_iter: number of iterations ``N``.
        schedule: ``"paper"``: ``w_j = ceil(p_j N)`` with ``p_0 = 0``, ``p_1 = 0.22``,
            ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (duplicates removed, only
            ``w_j <= N``); ``"reference"``: the autoattack code's integer recursion.

    Example:
        >>> checkpoints(100)
        [0, 22, 41, 57, 70, 80, 87, 93, 99]
    """
    n = int(n_iter)
    if n < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    if schedule == "paper":
        p = [0, 22]  # in hundredths, so that the recursion is exact
        while p[-1] + max(p[-1] - p[-2] - 3, 6) <= 100:
            p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
        return sorted({-(-pj * n // 100) for pj in p if -(-pj * n // 100) <= n})
    if schedule == "reference":
        k, decr, k_min = max(int(0.22 * n), 1), max(int(0.03 * n), 1), max(int(0.06 * n), 1)
        w = [0]
        while w[-1] + k <= n:
            w.append(w[-1] + k)
            k = max(k - decr, k_min)
        return w
    raise ValueError(f"unknown checkpoint schedule {schedule!r}; choose from {CHECKPOINT_SCHEDULES}")


def _eps_vector(eps: float | Tensor, x: Tensor) -> Tensor:
    """``eps`` as a (B,) tensor of x's dtype: scalar and per-sample budgets take one code path."""
    b = x.shape[0]
    if isinstance(eps, Tensor) and eps.dim() == 1:
        if eps.shape != (b,):
            raise ValueError(f"per-sample eps must have shape ({b},), got {tuple(eps.shape)}")
        return eps.detach().to(device=x.device, dtype=x.dtype)
    return torch.full((b,), float(eps), device=x.device, dtype=x.dtype)


def random_direction(x: Tensor, norm: str, generator: torch.Generator | None, mask: Tensor | None = None) -> Tensor:
    """A random point on the unit sphere of ``norm`` per sample, shaped as ``x``: the reference's
    random start direction (L-inf: ``t / ||t||_inf`` for ``t ~ U[-1,1]^d``; L2: ``t / ||t||_2`` for
    ``t ~ N(0, I)``).

    The draws for the whole batch come from one call, rows in order (the Gaussian through the
    inverse normal CDF of uniforms), so on CPU sample ``i`` gets the same direction whatever the
    batch size. With a ``mask``, coordinates where it is 0 are zeroed *before* normalising (a
    latent there changes nothing, so it must not use up the norm).
    """
    b, n = x.shape[0], x[0].numel()
    if norm == "linf":
        t = 2 * torch.rand((b, n), generator=generator, device=x.device, dtype=x.dtype) - 1
    else:
        v = torch.rand((b, n), generator=generator, device=x.device, dtype=torch.float64)
        t = torch.special.ndtri(v.clamp_min(2.0**-53)).to(x.dtype)
    if mask is not None:
        t = t * (mask.expand_as(x).reshape(b, n) > 0)
    size = t.abs().amax(1, keepdim=True) if norm == "linf" else t.norm(dim=1, keepdim=True)
    return (t / size.clamp_min(1e-12)).view(x.shape)


def _rows(t: Tensor | None, idx: Tensor) -> Tensor | None:
    """Rows ``idx`` of a per-sample tensor (a batch-1 broadcast mask is shared as is)."""
    if t is None or t.shape[0] == 1:
        return t
    return t[idx]


def _bview(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


Objective = Callable[[Tensor], Tensor]


class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020): step-size-free PGD with momentum and checkpoints.

    See the module docstring for the algorithm and every difference from the reference.

    Args:
        eps: budget (float or per-sample (B,) tensor) in [0,1] pixel units.
        steps: iterations per run ``N`` (default 100, as AutoAttack).
        restarts: runs with fresh random starts; restarts after the first attack only the
            samples not yet broken (default 1).
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"`` (APGD-CE, default), ``"dlr"`` (APGD-DLR), any name of
            :data:`aal.attacks.LOSSES` or a callable ``(logits, y) -> (B,)``.
        rho: fraction of increasing steps below which the step is halved (0.75).
        momentum: ``alpha`` of the momentum step (0.75).
        eot_iter: gradients averaged over this many forward passes (for randomised models).
        rand_init: random start (the reference always starts randomly); ``False`` starts at x.
        schedule: checkpoints, ``"paper"`` (default) or ``"reference"`` (see :func:`checkpoints`).
        targeted, minimize, mode, seed: see :class:`aal.attacks.base.Attack`.

    Example:
        >>> import torch, aal
        >>> m = aal.create_model("small_cnn")
        >>> x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 4])
        >>> x_adv = aal.attacks.APGD(eps=8 / 255, steps=20, loss="dlr", seed=0)(m, x, y)
    """

    name = "apgd"

    def __init__(
        self,
        eps: float | Tensor,
        steps: int = 100,
        restarts: int = 1,
        norm: str = "linf",
        loss: str | LossFn = "ce",
        rho: float = 0.75,
        momentum: float = 0.75,
        eot_iter: int = 1,
        rand_init: bool = True,
        schedule: str = "paper",
        targeted: bool = False,
        minimize: bool = False,
        mode: str = "eval",
        seed: int | None = None,
    ) -> None:
        super().__init__(eps, norm=norm, loss=loss, targeted=targeted, minimize=minimize, mode=mode, seed=seed)
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if int(restarts) < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        if int(eot_iter) < 1:
            raise ValueError(f"eot_iter must be >= 1, got {eot_iter}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must lie in [0,1], got {rho}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must lie in (0,1], got {momentum}")
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.eot_iter = int(eot_iter)
        self.rand_init = bool(rand_init)
        self.schedule = schedule
        self.checkpoints = checkpoints(self.steps, schedule)

    # ------------------------------------------------------------------ pieces
    def _start(self, x: Tensor, eps: Tensor, generator: torch.Generator | None) -> Tensor:
        """The reference's random start for the *whole* batch (rows drawn in order)."""
        if not self.rand_init:
            return torch.zeros_like(x)
        return random_direction(x, self.norm, generator) * _bview(eps, x)

    def _grad(self, model: nn.Module, x: Tensor, u: Tensor, mask: Tensor | None, objective: Objective) -> tuple[Tensor, Tensor, Tensor]:
        """Gradient of the objective w.r.t. ``u`` (EOT-averaged), the objective and the logits.

        As :meth:`Attack.grad`: the [0,1] clip is passed straight through in the backward pass.
        """
        g_sum = obj_sum = out = None
        for _ in range(self.eot_iter):
            u_ = u.detach().requires_grad_(True)
            x_adv = x + (u_ if mask is None else mask * u_)
            x_adv = x_adv.detach().clamp(0.0, 1.0) + (x_adv - x_adv.detach())
            out = model(x_adv)
            obj = objective(out)
            if obj.shape != (x.shape[0],):
                raise ValueError(f"the attack loss must be per-sample, shape ({x.shape[0]},); got {tuple(obj.shape)}")
            (g,) = torch.autograd.grad(obj.sum(), u_)
            g_sum = g if g_sum is None else g_sum + g
            obj_sum = obj.detach() if obj_sum is None else obj_sum + obj.detach()
        if self.eot_iter > 1:
            g_sum, obj_sum = g_sum / self.eot_iter, obj_sum / self.eot_iter
        return g_sum, obj_sum, out.detach()

    def _run(
        self,
        model: nn.Module,
        x: Tensor,
        mask: Tensor | None,
        eps: Tensor,
        u: Tensor,
        objective: Objective,
        success: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One APGD run from the start ``u``: ``(u, success, objective, logits)`` of the answer."""
        threat = THREATS[self.norm](eps)

        def proj(v: Tensor) -> Tensor:
            return threat.box(x, threat.project(v), mask)

        u = threat.box(x, u, mask)
        g, obj, out = self._grad(model, x, u, mask, objective)
        succ = success(out)
        best_u, best_obj, best_g = u, obj, g  # highest objective: where a halving restarts
        ans_u, ans_obj, ans_succ, ans_out = u, obj, succ, out  # the answer (success first)
        step = 2.0 * eps  # (B,)
        u_prev = u
        hist = [obj]  # objective of x^(0), x^(1), ...
        cps = self.checkpoints
        j = 1  # next checkpoint index
        last_best = best_obj.clone()
        reduced_last = torch.ones_like(succ)  # the reference: condition (2) is off at w_1
        for i in range(self.steps):
            a = self.momentum if i > 0 else 1.0
            z = proj(threat.step(u, g, step))
            u, u_prev = proj(u + a * (z - u) + (1.0 - a) * (u - u_prev)), u
            g, obj, out = self._grad(model, x, u, mask, objective)
            succ = success(out)
            hist.append(obj)

            better = obj > best_obj
            sel = _bview(better, x)
            best_u, best_g = torch.where(sel, u, best_u), torch.where(sel, g, best_g)
            best_obj = torch.where(better, obj, best_obj)

            take = (succ & ~ans_succ) | ((succ == ans_succ) & (obj > ans_obj))
            sel = _bview(take, x)
            ans_u = torch.where(sel, u, ans_u)
            ans_obj = torch.where(take, obj, ans_obj)
            ans_out = torch.where(take[:, None], out, ans_out) if out.dim() == 2 else ans_out
            ans_succ = ans_succ | succ

            if j < len(cps) and i + 1 == cps[j]:
                k = cps[j] - cps[j - 1]
                increases = sum((hist[t + 1] > hist[t]).to(x.dtype) for t in range(i + 1 - k, i + 1))
                halve = (increases <= self.rho * k) | (~reduced_last & (last_best >= best_obj))
                reduced_last = halve
                last_best = best_obj.clone()
                step = torch.where(halve, step / 2.0, step)
                sel = _bview(halve, x)
                u, g = torch.where(sel, best_u, u), torch.where(sel, best_g, g)
                j += 1
        return ans_u, ans_succ, ans_obj, ans_out

    def _objective(self, y: Tensor) -> Objective:
        return lambda out: self.direction * self.loss_fn(out, y)

    # ------------------------------------------------------------------ the attack
    def perturb(self, model, x, y, mask, generator) -> Tensor:
        eps = _eps_vector(self.eps, x)
        b = x.shape[0]
        u_all = torch.zeros_like(x)
        succ_all = torch.zeros(b, dtype=torch.bool, device=x.device)
        obj_all = torch.full((b,), -math.inf, dtype=x.dtype, device=x.device)
        for r in range(self.restarts):
            idx = (~succ_all).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            start = self._start(x, eps, generator if r == 0 else self._generator(x, r))
            ya = y[idx]
            u, succ, obj, _ = self._run(
                model, x[idx], _rows(mask, idx), eps[idx], start[idx], self._objective(ya), lambda o, ya=ya: self.success(o, ya)
            )
            take = succ | (obj > obj_all[idx])
            u_all[idx[take]] = u[take].to(u_all.dtype)
            obj_all[idx[take]] = obj[take]
            succ_all[idx] = succ_all[idx] | succ
        return u_all


class APGDCE(APGD):
    """APGD on the cross-entropy (APGD-CE, Croce & Hein 2020): the first attack of AutoAttack.

    Same arguments as :class:`APGD` (``loss="ce"`` by default).
    """

    name = "apgd_ce"


class APGDDLR(APGD):
    """APGD on the Difference of Logits Ratio loss (APGD-DLR, Croce & Hein 2020).

    Same arguments as :class:`APGD`, with ``loss="dlr"`` by default (needs >= 3 classes).
    """

    name = "apgd_dlr"

    def __init__(self, eps: float | Tensor, steps: int = 100, restarts: int = 1, norm: str = "linf", loss: str | LossFn = "dlr", **kwargs) -> None:
        super().__init__(eps, steps=steps, restarts=restarts, norm=norm, loss=loss, **kwargs)


class APGDT(APGD):
    """Targeted APGD on the targeted DLR loss over the top classes (APGD-T, Croce & Hein 2020).

    ``attack(model, x, y)`` takes the *true* labels ``y``: for each ``k = 2 .. n_target_classes
    + 1`` the target is the class with the ``k``-th highest clean logit, and APGD ascends the
    targeted DLR ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2)`` from a fresh start (``restarts``
    runs per target), on the points not yet misclassified. Success is misclassification (any
    class), as in AutoAttack.

    Args:
        eps: budget.
        steps: iterations per run (100).
        restarts: runs per target class (1).
        n_target_classes: number of targets (9, as AutoAttack); capped at ``C - 1``.
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"dlr"`` (the targeted DLR, default, needs >= 4 classes), or any other loss of
            :data:`aal.attacks.LOSSES` / callable ``(logits, target) -> (B,)``, *descended*
            toward each target (``loss="ce"`` is the reference's ``ce-targeted``).
        **kwargs: ``rho``, ``momentum``, ``eot_iter``, ``rand_init``, ``schedule``, ``mode``,
            ``seed`` as :class:`APGD`. ``targeted`` and ``minimize`` are refused: APGD-T picks
            its own targets and breaks the true label.

    Example:
        >>> import torch, aal
        >>> m = aal.create_model("small_cnn")
        >>> x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 4])
        >>> x_adv = aal.attacks.APGDT(eps=0.1, steps=10, n_target_classes=3, seed=0)(m, x, y)
    """

    name = "apgd_t"

    def __init__(
        self,
        eps: float | Tensor,
        steps: int = 100,
        restarts: int = 1,
        n_target_classes: int = 9,
        norm: str = "linf",
        loss: str | LossFn = "dlr",
        targeted: bool = False,
        minimize: bool = False,
        **kwargs,
    ) -> None:
        if targeted or minimize:
            raise ValueError(
                "apgd_t chooses its own target classes and breaks the true label y; it takes no targeted/minimize "
                "(for a given target use apgd_ce or apgd_dlr with targeted=True)"
            )
        self.targeted_dlr = isinstance(loss, str) and loss == "dlr"
        super().__init__(eps, steps=steps, restarts=restarts, norm=norm, loss=loss, **kwargs)
        if int(n_target_classes) < 1:
            raise ValueError(f"n_target_classes must be >= 1, got {n_target_classes}")
        self.n_target_classes = int(n_target_classes)

    def perturb(self, model, x, y, mask, generator) -> Tensor:
        eps = _eps_vector(self.eps, x)
        b = x.shape[0]
        with torch.no_grad():
            clean = model(x)
        if clean.dim() != 2:
            raise ValueError(f"apgd_t needs (B, C) logits, got shape {tuple(clean.shape)}")
        n_targets = min(self.n_target_classes, clean.shape[1] - 1)
        order = clean.argsort(dim=1)  # ascending: column -k is the k-th highest logit
        u_all = torch.zeros_like(x)
        succ_all = torch.zeros(b, dtype=torch.bool, device=x.device)
        margin_all = torch.full((b,), -math.inf, dtype=x.dtype, device=x.device)
        run = 0
        for k in range(2, n_targets + 2):
            for _ in range(self.restarts):
                idx = (~succ_all).nonzero().squeeze(1)
                if idx.numel() == 0:
                    return u_all
                start = self._start(x, eps, generator if run == 0 else self._generator(x, run))
                run += 1
                ya, ta = y[idx], order[idx, -k]
                if self.targeted_dlr:
                    objective = lambda out, ya=ya, ta=ta: dlr_targeted_loss(out, ya, ta)
                else:
                    objective = lambda out, ta=ta: -self.loss_fn(out, ta)
                u, succ, _, out = self._run(
                    model, x[idx], _rows(mask, idx), eps[idx], start[idx], objective, lambda o, ya=ya: o.argmax(1) != ya
                )
                margin = margin_loss(out, ya)
                take = succ | (margin > margin_all[idx])
                u_all[idx[take]] = u[take].to(u_all.dtype)
                margin_all[idx[take]] = margin[take]
                succ_all[idx] = succ_all[idx] | succ
        return u_all
