"""FAB and its targeted version FAB-T (Croce & Hein, ICML 2020): minimum-norm adversarial examples.

Paper: F. Croce and M. Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", ICML 2020 (arXiv:1907.02044); reference code: the ``autoattack`` package
(``fab_base.py``, ``fab_pt.py``, ``fab_projections.py``), whose FAB-T is the third attack of
AutoAttack's standard suite. Written from the paper and checked against that code (and against
torchattacks' port, ``torchattacks/attacks/fab.py``); where they differ, the choice is stated.

FAB looks for the *smallest* perturbation that changes the decision, not for the worst point of a
ball. Per sample, with ``x`` the clean image, ``y`` its label and ``x_i`` the iterate:

* linearise the decision boundary at ``x_i``: for the class ``s`` the boundary between ``y`` and
  ``s`` is the hyperplane ``f_s(x_i) + <grad f_s(x_i), z - x_i> = 0`` with ``f_s = z_s - z_y``
  (logits). FAB (untargeted) takes the ``s != y`` whose hyperplane is closest in the norm,
  ``|f_s| / ||grad f_s||_q`` (``q`` the dual norm: L1 for L-inf, L2 for L2); FAB-T takes the
  target class ``t`` (the only hyperplane it looks at);
* project both ``x_i`` and ``x`` onto the intersection of that hyperplane with the image box
  ``[0,1]^d`` in the norm (:func:`project_hyperplane_box`; where they do not intersect, the box
  point closest to the hyperplane), giving steps ``d_1`` and ``d_2``;
* step ``x_{i+1} = clip((1 - a)(x_i + eta d_1) + a (x + eta d_2))`` with the *adaptive* weight
  ``a = min(||d_1|| / (||d_1|| + ||d_2||), alpha_max)`` (toward the clean image when the boundary
  is close to it), overshoot ``eta = 1.05``, ``alpha_max = 0.1``;
* when ``x_{i+1}`` is misclassified (any class but ``y``, also for FAB-T): keep it if it is the
  smallest adversarial so far, then move back toward ``x``: ``x_{i+1} = x + beta (x_{i+1} - x)``,
  ``beta = 0.9``.

Runs: ``steps = 100`` iterations. The first run starts at ``x`` itself; every further restart
starts at a random point at distance ``eps / 2`` (L-inf: ``t / ||t||_inf``, ``t ~ U[-1,1]^d``;
L2: a Gaussian direction), clipped to the box. FAB-T does one run (with its restarts) per target
class: the classes with the 2nd, 3rd, ... highest clean logits, ``n_target_classes`` of them
(9 in AutoAttack), each on the points not yet broken. AutoAttack's ``version='standard'`` runs
FAB-T with ``n_iter=100``, ``n_restarts=1``, ``n_target_classes=9`` (``set_version``; a single run
per target, so FAB-T there draws no random number at all).

The final check (the reference's ``perturb``): a point counts as broken only if the smallest
adversarial example found has norm ``<= eps``; only the other points are attacked again (next
restart / target).

What is returned: points broken within ``eps`` get their smallest adversarial example; every
other point comes back unchanged (as AutoAttack's FAB): a minimum-norm attack has no "best effort"
inside the ball, and counting a point it did not break (for instance its adversarial example
clipped into the ball) would make FAB-T's stage stronger than AutoAttack's. So the attack moves a
point only where it breaks it; points the model already misclassifies are returned unchanged too
(their minimal perturbation is zero), as the reference.

Selective attacks (``mask``): as every aal attack, FAB works on a latent ``u`` and applies
``delta = mask * u`` (:mod:`aal.attacks.base`). FAB minimises ``||u||`` (L-inf: the largest
``|delta_i| / mask_i``; L2: the L2 norm of ``delta / mask`` over the pixels where ``mask > 0``)
subject to ``x + mask * u`` in ``[0,1]``, a linear box in ``u``; the projections take the exact
per-coordinate bounds ``-x / mask <= u <= (1 - x) / mask``, and coordinates where ``mask == 0``
stay 0. The eps test is on ``||u||``, so the returned point satisfies ``|delta| <= eps * mask``
(L-inf) and ``||delta||_2 <= eps`` (L2), exactly the budget of every aal attack. With
``mask=None`` (or all ones) this is exactly the reference's algorithm.

Differences from the reference implementation (``autoattack``):

* The projection onto hyperplane-and-box is computed by sorting the breakpoints of the piecewise
  linear function ``lambda -> <w, d(lambda)>`` and counting those below the target value, not by
  the reference's bisection; same minimiser (the reference's, up to float rounding), written for
  a general box so that the mask's bounds are exact.
* The gradients are those of the logits at ``clip(x + mask * u)`` with the clip passed straight
  through (as every aal attack); identical to the reference inside the box.
* Random starts come from a generator seeded with ``seed`` (the reference reseeds torch's global
  RNG); each restart draws the start of the *whole* batch and keeps the rows it attacks, so a
  sample's start does not depend on the other samples of its batch.
* ``n_target_classes`` is capped at ``C - 1``; computation is in the input's dtype (the reference
  casts to float32).

torchattacks' port (3.5.1) follows the reference; its quirks: its ``FAB`` has no
``n_target_classes`` argument, it runs ``n_classes - 1`` targets with ``multi_targeted=True``
(so ``n_classes=10`` gives AutoAttack's 9), and its ``AutoAttack`` never passes ``steps``, so FAB
there runs its default of 10 iterations instead of 100. Its ``targeted`` mode
(``set_mode_targeted_*``) is a different attack (one given target per point), not FAB-T.

Example:
    >>> import torch, aal
    >>> model = aal.create_model("small_cnn")
    >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    >>> x_adv = aal.attacks.FABT(eps=0.1, steps=10, n_target_classes=3)(model, x, y)
    >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
    True
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from aal.attacks.apgd import _bview, _eps_vector, _rows, random_direction
from aal.attacks.base import Attack

Hyperplane = Callable[[Tensor], tuple[Tensor, Tensor]]
"""``u -> (f, g)``: the chosen boundary's value ``f`` (B,) and gradient ``g`` (B, d) at ``u``."""


def lp_norm(v: Tensor, norm: str) -> Tensor:
    """Per-sample L-inf or L2 norm of ``v`` (B, ...), shape (B,)."""
    flat = v.reshape(v.shape[0], -1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def project_hyperplane_box(t: Tensor, w: Tensor, b: Tensor, lo: Tensor, hi: Tensor, norm: str) -> Tensor:
    """The step ``d`` of least ``||d||_p`` with ``<w, t + d> = b`` and ``lo <= t + d <= hi``.

    The projection FAB needs (Croce & Hein 2020, Sec. 3.1; ``projection_linf`` and
    ``projection_l2`` of the reference) onto the intersection of a hyperplane with a box, row by
    row. Orient ``w`` so that the hyperplane lies on the side where ``<w, d>`` grows, ``c = |b -
    <w, t>|``; a minimiser then moves each coordinate along ``sign(w_i)``, as far as its room
    ``r_i`` to the box allows: ``d_i = sign(w_i) min(lambda v_i, r_i)`` with ``v_i = 1`` for
    L-inf (all free coordinates move by the same amount: the L-inf ball's corner) and
    ``v_i = |w_i|`` for L2 (the KKT point of the box-constrained least-norm problem). The smallest
    ``lambda`` with ``<w, d(lambda)> = c`` is found exactly: ``<w, d(lambda)>`` is piecewise linear
    and nondecreasing with breakpoints ``r_i / v_i``. Where the hyperplane misses the box
    (``c`` beyond the largest reachable value), ``d`` goes to the box corner closest to it.

    Args:
        t: points (B, d), inside ``[lo, hi]``.
        w: hyperplane normals (B, d).
        b: offsets (B,).
        lo, hi: the box (B, d), ``lo <= hi``.
        norm: ``"linf"`` or ``"l2"``.

    Returns:
        the steps ``d`` (B, d); 0 where ``w`` is 0.

    Example:
        >>> t, w = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])
        >>> box = (torch.full((1, 2), -1.0), torch.full((1, 2), 0.3))
        >>> project_hyperplane_box(t, w, torch.tensor([0.4]), *box, "linf")  # both move 0.2
        tensor([[0.2000, 0.2000]])
        >>> project_hyperplane_box(t, w, torch.tensor([0.8]), *box, "linf")  # capped at 0.3: the corner
        tensor([[0.3000, 0.3000]])
    """
    c = b - (w * t).sum(1)
    w = torch.where((c < 0)[:, None], -w, w)  # orient: now <w, d> must rise by |c|
    c = c.abs()
    room = torch.where(w > 0, hi - t, t - lo).clamp_min(0.0)
    aw = w.abs()
    v = torch.ones_like(aw) if norm == "linf" else aw
    free = v > 0
    # breakpoint of coordinate i: lambda at which it reaches the box; +inf where it never moves
    bp = torch.where(free, room / torch.where(free, v, torch.ones_like(v)), torch.full_like(v, math.inf))
    bp, order = bp.sort(1)
    aw_s, room_s, v_s = aw.gather(1, order), room.gather(1, order), v.gather(1, order)
    saturated = (aw_s * room_s).cumsum(1)  # sum over the first k+1 (saturated) coordinates
    slope_all = (aw * v).sum(1, keepdim=True)
    slope = slope_all - (aw_s * v_s).cumsum(1)  # rate of the coordinates after the k-th
    value = saturated + torch.where(slope > 0, bp * slope, torch.zeros_like(slope))  # <w, d(bp_k)>
    k = (value <= c[:, None]).sum(1)  # breakpoints passed at the solution
    n = t.shape[1]
    prev = (k - 1).clamp_min(0)[:, None]
    sat_prev = torch.where(k > 0, saturated.gather(1, prev).squeeze(1), torch.zeros_like(c))
    slope_prev = torch.where(k > 0, slope.gather(1, prev).squeeze(1), slope_all.squeeze(1))
    reachable = (k < n) & (slope_prev > 0)
    lam = torch.where(reachable, (c - sat_prev) / torch.where(reachable, slope_prev, torch.ones_like(c)), math.inf)
    move = torch.where(free, torch.minimum(lam[:, None] * torch.where(free, v, torch.ones_like(v)), room), torch.zeros_like(v))
    return w.sign() * move


class FAB(Attack):
    """FAB (Croce & Hein 2020), untargeted: the smallest perturbation to the closest boundary.

    See the module docstring for the algorithm, what is returned and every difference from the
    reference. FAB optimises no loss (it follows the logit differences), so it takes no ``loss``,
    and it breaks the true label by construction, so it takes no ``targeted`` / ``minimize``.

    Args:
        eps: budget (float or per-sample (B,) tensor): the final check (only adversarial examples
            of norm ``<= eps`` count; the other points come back unchanged) and the radius
            ``eps / 2`` of random restarts.
        steps: iterations per run (100, as AutoAttack).
        restarts: runs per sample; the first starts at ``x``, the others at random points; each
            only on the points not yet broken within ``eps`` (1).
        norm: ``"linf"`` or ``"l2"``.
        alpha_max: largest weight of the step toward the clean image's projection (0.1).
        eta: overshoot of the projection steps (1.05).
        beta: backward step after an adversarial iterate, ``x + beta (x_adv - x)`` (0.9).
        mode, seed: see :class:`aal.attacks.base.Attack`.

    Example:
        >>> import torch, aal
        >>> m = aal.create_model("small_cnn")
        >>> x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 4])
        >>> x_adv = aal.attacks.FAB(eps=0.5, norm="l2", steps=10)(m, x, y)
    """

    name = "fab"

    def __init__(
        self,
        eps: float | Tensor,
        steps: int = 100,
        restarts: int = 1,
        norm: str = "linf",
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        targeted: bool = False,
        minimize: bool = False,
        mode: str = "eval",
        seed: int | None = None,
    ) -> None:
        if targeted or minimize:
            raise ValueError(
                f"{self.name} breaks the true label y (any class counts) and takes no targeted/minimize; "
                "for a given target use pgd or apgd_ce with targeted=True"
            )
        super().__init__(eps, norm=norm, mode=mode, seed=seed)
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if int(restarts) < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        if not 0.0 <= alpha_max <= 1.0:
            raise ValueError(f"alpha_max must lie in [0,1], got {alpha_max}")
        if not eta > 0.0:
            raise ValueError(f"eta must be > 0, got {eta}")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must lie in (0,1], got {beta}")
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.alpha_max = float(alpha_max)
        self.eta = float(eta)
        self.beta = float(beta)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _bounds(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Box of the latent ``u`` (B, d): ``x + mask * u`` in [0,1]; ``[0, 0]`` where mask is 0."""
        b = x.shape[0]
        if mask is None:
            return (-x).reshape(b, -1), (1.0 - x).reshape(b, -1)
        m = mask.expand_as(x).reshape(b, -1)
        xf = x.reshape(b, -1)
        on = m > 0
        safe = torch.where(on, m, torch.ones_like(m))
        zero = torch.zeros_like(xf)
        return torch.where(on, -xf / safe, zero), torch.where(on, (1.0 - xf) / safe, zero)

    @staticmethod
    def _logits(model: nn.Module, x: Tensor, u: Tensor, mask: Tensor | None) -> Tensor:
        """Logits at ``clip(x + mask * u)``, the clip passed straight through in the backward pass."""
        x_adv = x + (u if mask is None else mask * u)
        x_adv = x_adv.detach().clamp(0.0, 1.0) + (x_adv - x_adv.detach())
        out = model(x_adv)
        if out.dim() != 2:
            raise ValueError(f"FAB needs (B, C) logits, got shape {tuple(out.shape)}")
        return out

    def _closest_boundary(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None) -> Hyperplane:
        """FAB: the boundary ``z_s - z_y`` with the smallest linearised distance, ``s != y``."""
        dual = "l1" if self.norm == "linf" else "l2"

        def plane(u: Tensor) -> tuple[Tensor, Tensor]:
            u = u.detach().requires_grad_(True)
            out = self._logits(model, x, u, mask)
            rows = torch.arange(len(y), device=y.device)
            grads = []
            for k in range(out.shape[1]):  # one backward pass per class (the reference does the same)
                (g,) = torch.autograd.grad(out[:, k].sum(), u, retain_graph=k + 1 < out.shape[1])
                grads.append(g.reshape(len(y), -1))
            g_all = torch.stack(grads, 1)  # (B, C, d)
            out = out.detach()
            f = out - out[rows, y][:, None]
            g = g_all - g_all[rows, y][:, None]
            size = g.abs().sum(2) if dual == "l1" else g.norm(dim=2)
            dist = f.abs() / (size + 1e-12)
            dist[rows, y] = math.inf  # the reference sets f_y = 1e10
            s = dist.argmin(1)
            return f[rows, s], g[rows, s]

        return plane

    @staticmethod
    def _target_boundary(model: nn.Module, x: Tensor, y: Tensor, target: Tensor, mask: Tensor | None) -> Hyperplane:
        """FAB-T: the boundary ``z_t - z_y`` of the target ``t``."""

        def plane(u: Tensor) -> tuple[Tensor, Tensor]:
            u = u.detach().requires_grad_(True)
            out = FAB._logits(model, x, u, mask)
            f = out.gather(1, target[:, None]).squeeze(1) - out.gather(1, y[:, None]).squeeze(1)
            (g,) = torch.autograd.grad(f.sum(), u)
            return f.detach(), g.reshape(len(y), -1)

        return plane

    def _run(
        self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None, u: Tensor, plane: Hyperplane
    ) -> tuple[Tensor, Tensor]:
        """One FAB run from ``u``: the smallest adversarial ``u`` found and its norm (inf if none)."""
        b = x.shape[0]
        lo, hi = self._bounds(x, mask)
        u = torch.max(torch.min(u.reshape(b, -1), hi), lo)
        best_u = torch.zeros_like(u)
        best = torch.full((b,), math.inf, dtype=x.dtype, device=x.device)
        origin = torch.zeros_like(u)
        lo2, hi2 = torch.cat((lo, lo)), torch.cat((hi, hi))
        for _ in range(self.steps):
            f, g = plane(u.view(x.shape))
            offset = (g * u).sum(1) - f  # the linearised boundary: <g, z> = <g, u> - f
            d = project_hyperplane_box(torch.cat((u, origin)), torch.cat((g, g)), torch.cat((offset, offset)), lo2, hi2, self.norm)
            d1, d2 = d[:b], d[b:]
            a1 = lp_norm(d1, self.norm).clamp_min(1e-8)
            a2 = lp_norm(d2, self.norm).clamp_min(1e-8)
            alpha = (a1 / (a1 + a2)).clamp(0.0, self.alpha_max)[:, None]
            u = (1.0 - alpha) * (u + self.eta * d1) + alpha * (self.eta * d2)
            u = torch.max(torch.min(u, hi), lo)
            with torch.no_grad():
                adv = self._logits(model, x, u.view(x.shape), mask).argmax(1) != y
            size = lp_norm(u, self.norm)
            better = adv & (size < best)
            best_u = torch.where(better[:, None], u, best_u)
            best = torch.where(better, size, best)
            u = torch.where(adv[:, None], self.beta * u, u)  # back toward x: x + beta (x_adv - x)
        return best_u.view(x.shape), best

    def _planes(self, model: nn.Module, x: Tensor, y: Tensor, clean: Tensor) -> list[Callable[[Tensor], Tensor | None]]:
        """Per run family, a function of the attacked rows giving their target (``None``: untargeted)."""
        return [lambda idx: None]

    # ------------------------------------------------------------------ the attack
    def perturb(self, model, x, y, mask, generator) -> Tensor:
        eps = _eps_vector(self.eps, x)
        b = x.shape[0]
        with torch.no_grad():
            clean = model(x)
        if clean.dim() != 2:
            raise ValueError(f"{self.name} needs (B, C) logits, got shape {tuple(clean.shape)}")
        todo = clean.argmax(1) == y  # already misclassified: their minimal perturbation is 0
        best_u = torch.zeros_like(x)
        best = torch.full((b,), math.inf, dtype=x.dtype, device=x.device)
        broken = torch.zeros(b, dtype=torch.bool, device=x.device)
        draws = 0
        for target_of in self._planes(model, x, y, clean):
            for r in range(self.restarts):
                idx = (todo & ~broken).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                if r == 0:
                    start = torch.zeros_like(x)
                else:
                    g = generator if draws == 0 else self._generator(x, draws)
                    draws += 1
                    start = 0.5 * random_direction(x, self.norm, g, mask) * _bview(eps, x)
                xa, ya, ma = x[idx], y[idx], _rows(mask, idx)
                target = target_of(idx)
                if target is None:
                    plane = self._closest_boundary(model, xa, ya, ma)
                else:
                    plane = self._target_boundary(model, xa, ya, target, ma)
                u, size = self._run(model, xa, ya, ma, start[idx], plane)
                better = size < best[idx]
                best_u[idx[better]] = u[better]
                best[idx[better]] = size[better]
                broken[idx] = broken[idx] | (size <= eps[idx])  # the final check: only within eps counts
        return torch.where(_bview(broken, x), best_u, torch.zeros_like(best_u))


class FABT(FAB):
    """FAB-T (Croce & Hein 2020): FAB toward each of the top ``n_target_classes`` other classes.

    The targeted version AutoAttack's standard suite runs (third, after APGD-T). ``attack(model,
    x, y)`` takes the *true* labels ``y``: for ``k = 2 .. n_target_classes + 1`` the target is the
    class with the ``k``-th highest clean logit and FAB follows the boundary ``z_t - z_y`` only,
    on the points not yet broken within ``eps``. Success is misclassification (any class), as in
    AutoAttack.

    Args:
        eps, steps, restarts, norm, alpha_max, eta, beta, mode, seed: see :class:`FAB`
            (restarts are per target).
        n_target_classes: number of targets (9, as AutoAttack); capped at ``C - 1``.

    Example:
        >>> import torch, aal
        >>> m = aal.create_model("small_cnn")
        >>> x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 4])
        >>> x_adv = aal.attacks.FABT(eps=0.1, steps=10, n_target_classes=3)(m, x, y)
    """

    name = "fab_t"

    def __init__(self, eps: float | Tensor, steps: int = 100, restarts: int = 1, n_target_classes: int = 9, **kwargs) -> None:
        super().__init__(eps, steps=steps, restarts=restarts, **kwargs)
        if int(n_target_classes) < 1:
            raise ValueError(f"n_target_classes must be >= 1, got {n_target_classes}")
        self.n_target_classes = int(n_target_classes)

    def _planes(self, model, x, y, clean) -> list[Callable[[Tensor], Tensor | None]]:
        order = clean.argsort(dim=1)  # ascending: column -k is the k-th highest clean logit
        n_targets = min(self.n_target_classes, clean.shape[1] - 1)
        return [lambda idx, k=k: order[idx, -k] for k in range(2, n_targets + 2)]


__all__ = ["FAB", "FABT", "lp_norm", "project_hyperplane_box"]
