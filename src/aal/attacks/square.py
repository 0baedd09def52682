"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): score-based, black-box.

Paper: "Square Attack: a query-efficient black-box adversarial attack via random search"
(arXiv:1912.00049); reference code: ``max-andr/square-attack`` (``attack.py``, NumPy) and its
PyTorch port in ``autoattack/square.py``. Written from the paper and checked against that code.

A random search that only *queries* the model (forward passes under ``torch.no_grad``, no
gradient): per sample, propose a change of the current perturbation inside a random square
window, keep it if the loss improves (or the point becomes misclassified), stop querying a
sample as soon as it is broken.

* L-inf: start from vertical stripes (each column of each channel ``+-eps``); a proposal sets a
  random ``s x s`` window of every channel to ``+-eps`` (one sign per channel).
* L2: start from a 5x5 grid of "pseudo-Gaussian" blocks with random signs, scaled to norm eps;
  a proposal moves the mass of a second random window into the first one, reshaped as the
  paper's ``eta`` pattern, and rescales the whole perturbation to norm eps.
* Window size: ``s = round(sqrt(p * h * w))`` (at least 1; L2: at least 3 and odd), with ``p``
  starting at ``p_init = 0.8`` (AutoAttack's value) and halved after iterations 10, 50, 200,
  500, 1000, 2000, 4000, 6000, 8000 of a 10000-iteration scale, rescaled to ``n_queries``
  (``rescale_schedule=True``, the reference's default; ``False`` uses the raw iteration).
* Loss: the margin ``max_{j!=y} z_j - z_y`` (untargeted, maximised) or the cross-entropy toward
  the target (``targeted``), as the reference.
* Cost: ``n_queries + 1`` forward passes per sample at most, per restart.

Selective attacks: the search runs on a latent ``u`` (L-inf: ``|u| <= eps``; L2:
``||u||_2 <= eps``) and the image is ``clip(x + mask * u, 0, 1)``, so ``|delta| <= eps * mask``.
For L2 the latent is zero where ``mask == 0`` (mass there would be wasted) and kept
box-feasible (as the reference keeps ``x_best - x``, the *clipped* perturbation).

Differences from the reference implementations:

* Square positions (and the L2 pattern's orientation) are drawn per image, as in the original
  ``max-andr/square-attack`` code and the paper; AutoAttack's port draws one position per
  iteration for the whole batch. Positions are uniform over all ``h - s + 1`` offsets (both
  references draw from ``0 .. h - s - 1``, never touching the last row/column offset).
* L-inf: a proposal that would leave the image unchanged (the window already has the drawn
  signs, or is clipped) is redrawn, at most 10 times, as the original code's ``while`` loop
  (AutoAttack's port spends a query on it). Signs are ``+-1`` with probability 1/2 each
  (AutoAttack's ``sign(2 U - 1)`` can return 0 with probability ~2^-24).
* ``s`` is capped at ``min(h, w)``, and the L2 grid start uses blocks of ``max(h // 5, 1)``
  (the reference divides by zero for images smaller than 5 pixels).
* Success is ``argmax != y`` (targeted: ``argmax == y``); the reference uses ``margin <= 0``
  (they differ only on exact ties). With ``minimize`` there is no success: all queries are spent.
* A sample never broken gets the perturbation with the best loss (the reference returns the
  clean image); restarts (fresh starts) attack only the samples not yet broken, as the reference.
* Random draws come from a generator seeded with ``seed``; they are drawn for the samples still
  attacked, so unlike the gradient attacks a sample's result depends on the rest of its batch.

Example:
    >>> import torch, aal
    >>> model = aal.create_model("small_cnn")
    >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    >>> x_adv = aal.attacks.Square(eps=0.1, n_queries=100, seed=0)(model, x, y)
    >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
    True
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor, nn

from aal.attacks.apgd import _bview, _eps_vector, _rows
from aal.attacks.base import Attack, LossFn, ThreatModel

# p is halved after each of these iterations (of a 10000-iteration run)
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, it: int, n_queries: int, rescale: bool = True) -> float:
    """Fraction of pixels a proposal changes at iteration ``it`` (0-based), piecewise halved.

    Example:
        >>> [p_selection(0.8, i, 10000) for i in (0, 10, 11, 51, 8001)]
        [0.8, 0.8, 0.4, 0.2, 0.0015625]
    """
    if rescale:
        it = int(it / n_queries * 10000)
    halvings = sum(it > t for t in P_SCHEDULE)
    return p_init / 2**halvings


@lru_cache(maxsize=64)
def _eta_rectangles(a: int, b: int) -> Tensor:
    """The reference's nested-rectangles pattern of shape (a, b), unit L2 norm (float64)."""
    delta = torch.zeros(a, b, dtype=torch.float64)
    ca, cb = a // 2 + 1, b // 2 + 1
    r0, c0 = ca - 1, cb - 1
    for k in range(max(ca, cb)):
        delta[max(r0, 0) : min(r0 + 2 * k + 1, a), max(c0, 0) : min(c0 + 2 * k + 1, b)] += 1.0 / (k + 1) ** 2
        r0 -= 1
        c0 -= 1
    return delta / delta.norm().clamp_min(1e-12)


@lru_cache(maxsize=64)
def _eta(s: int) -> Tensor:
    """The reference's ``eta(s)``: a positive and a negative half, unit L2 norm, (s, s) float64."""
    delta = torch.zeros(s, s, dtype=torch.float64)
    if s // 2:
        delta[: s // 2] = _eta_rectangles(s // 2, s)
    delta[s // 2 :] = -_eta_rectangles(s - s // 2, s)
    return delta / delta.norm().clamp_min(1e-12)


class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020): score-based random search, L-inf and L2.

    Args:
        eps: budget (float or per-sample (B,) tensor) in [0,1] pixel units.
        n_queries: iterations (one query per sample each) after the start (default 5000, as
            AutoAttack's standard suite).
        p_init: initial fraction of pixels changed (0.8, AutoAttack's value).
        restarts: fresh starts, each on the samples not yet broken (1).
        rescale_schedule: rescale the p schedule to ``n_queries`` (True, the reference class's
            default; AutoAttack's standard suite runs 5000 queries with ``False``).
        norm: ``"linf"`` or ``"l2"``.
        loss: ``None`` (default: ``"margin"`` untargeted, ``"ce"`` targeted, as the reference),
            a name of :data:`aal.attacks.LOSSES` or a callable ``(logits, y) -> (B,)``.
        targeted, minimize, mode, seed: see :class:`aal.attacks.base.Attack`.

    Example:
        >>> import torch, aal
        >>> m = aal.create_model("small_cnn")
        >>> x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 4])
        >>> x_adv = aal.attacks.Square(eps=0.5, norm="l2", n_queries=50, seed=0)(m, x, y)
    """

    name = "square"

    def __init__(
        self,
        eps: float | Tensor,
        n_queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        rescale_schedule: bool = True,
        norm: str = "linf",
        loss: str | LossFn | None = None,
        targeted: bool = False,
        minimize: bool = False,
        mode: str = "eval",
        seed: int | None = None,
    ) -> None:
        if loss is None:
            loss = "ce" if targeted else "margin"
        super().__init__(eps, norm=norm, loss=loss, targeted=targeted, minimize=minimize, mode=mode, seed=seed)
        if int(n_queries) < 0:
            raise ValueError(f"n_queries must be >= 0, got {n_queries}")
        if int(restarts) < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        if not 0.0 < p_init <= 1.0:
            raise ValueError(f"p_init must lie in (0,1], got {p_init}")
        self.n_queries = int(n_queries)
        self.p_init = float(p_init)
        self.restarts = int(restarts)
        self.rescale_schedule = bool(rescale_schedule)

    # ------------------------------------------------------------------ helpers
    def _query(self, model: nn.Module, x: Tensor, u: Tensor, mask: Tensor | None, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(objective, success)`` at ``clip(x + mask * u)``: one forward pass, no gradient."""
        obj, out = self.objective(model, ThreatModel.apply(x, u, mask), y)
        return obj, self.success(out, y)

    @staticmethod
    def _signs(shape: tuple[int, ...], g: torch.Generator | None, like: Tensor) -> Tensor:
        return torch.randint(0, 2, shape, generator=g, device=like.device).to(like.dtype) * 2 - 1

    @staticmethod
    def _window(b: int, h: int, w: int, s: int, g: torch.Generator | None, device) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image top-left corners (B,), (B,) and the (B,1,h,w) boolean window."""
        vh = torch.randint(0, h - s + 1, (b,), generator=g, device=device)
        vw = torch.randint(0, w - s + 1, (b,), generator=g, device=device)
        rows = torch.arange(h, device=device)
        cols = torch.arange(w, device=device)
        in_r = (rows[None] >= vh[:, None]) & (rows[None] < vh[:, None] + s)
        in_c = (cols[None] >= vw[:, None]) & (cols[None] < vw[:, None] + s)
        return vh, vw, (in_r[:, :, None] & in_c[:, None, :])[:, None]

    @staticmethod
    def _flat_index(vh: Tensor, vw: Tensor, s: int, w: int) -> Tensor:
        """(B, s*s) flat pixel indices of each image's window, row-major."""
        r = vh[:, None] + torch.arange(s, device=vh.device)[None]
        c = vw[:, None] + torch.arange(s, device=vh.device)[None]
        return (r[:, :, None] * w + c[:, None, :]).flatten(1)

    def _pattern(self, b: int, s: int, g: torch.Generator | None, like: Tensor) -> Tensor:
        """(B,1,s,s) ``eta(s)``, transposed for a random half of the images."""
        eta = _eta(s).to(device=like.device, dtype=like.dtype)
        flip = torch.randint(0, 2, (b,), generator=g, device=like.device).bool()
        return torch.where(flip[:, None, None], eta.t()[None], eta[None])[:, None]

    # ------------------------------------------------------------------ starts
    def _start_linf(self, x: Tensor, eps: Tensor, g) -> Tensor:
        b, c, h, w = x.shape
        return (self._signs((b, c, 1, w), g, x) * _bview(eps, x)).expand(b, c, h, w).contiguous()

    def _start_l2(self, x: Tensor, eps: Tensor, g) -> Tensor:
        b, c, h, w = x.shape
        delta = torch.zeros((b, c, h, w), device=x.device, dtype=x.dtype)
        s = max(h // 5, 1)
        sp = (h - 5 * s) // 2
        vh = sp
        for _ in range(h // s):
            vw = sp
            for _ in range(w // s):
                pat = self._pattern(b, s, g, x) * self._signs((b, c, 1, 1), g, x)
                r0, c0 = max(vh, 0), max(vw, 0)
                r1, c1 = min(vh + s, h), min(vw + s, w)
                if r1 > r0 and c1 > c0:
                    delta[:, :, r0:r1, c0:c1] += pat[:, :, r0 - vh : r1 - vh, c0 - vw : c1 - vw]
                vw += s
            vh += s
        return delta / _l2(delta).clamp_min(1e-12) * _bview(eps, x)

    # ------------------------------------------------------------------ proposals
    def _propose_linf(self, x, u, mask, eps, s, g) -> Tensor:
        b, c, h, w = x.shape
        _, _, win = self._window(b, h, w, s, g, x.device)
        new = torch.where(win, self._signs((b, c, 1, 1), g, x) * _bview(eps, x), u)
        todo = torch.arange(b, device=x.device)
        for _ in range(10):  # redraw proposals that would not change the image (original code)
            xs, ms = x[todo], _rows(mask, todo)
            change = ThreatModel.apply(xs, new[todo], ms) - ThreatModel.apply(xs, u[todo], ms)
            todo = todo[(change.abs() < 1e-7).flatten(1).all(1)]
            if todo.numel() == 0:
                break
            signs = self._signs((todo.numel(), c, 1, 1), g, x) * _bview(eps[todo], x)
            new[todo] = torch.where(win[todo], signs, u[todo])
        return new

    def _propose_l2(self, x, u, mask, eps, s, g) -> Tensor:
        b, c, h, w = x.shape
        delta = u.contiguous().clone()
        vh, vw, win1 = self._window(b, h, w, s, g, x.device)
        vh2, vw2, win2 = self._window(b, h, w, s, g, x.device)
        idx1 = self._flat_index(vh, vw, s, w)[:, None].expand(b, c, s * s)
        flat = delta.view(b, c, h * w)
        old = flat.gather(2, idx1)  # (B,C,s*s) window 1 of every channel
        norm_w1 = old.norm(dim=2, keepdim=True)
        norm_img = _l2(delta)
        norm_wins = _l2(delta * (win1 | win2))
        new = (self._pattern(b, s, g, x) * self._signs((b, c, 1, 1), g, x)).reshape(b, c, s * s)
        new = new + old / (norm_w1 + 1e-12)
        budget = ((_bview(eps, x) ** 2 - norm_img**2).clamp_min(0.0) / c + norm_wins**2).sqrt()
        new = new / (new.norm(dim=2, keepdim=True) + 1e-12) * budget.view(b, 1, 1)
        delta = torch.where(win2, torch.zeros((), dtype=x.dtype, device=x.device), delta)
        delta.view(b, c, h * w).scatter_(2, idx1, new)
        return self._feasible_l2(x, delta / (_l2(delta) + 1e-12) * _bview(eps, x), mask)

    @staticmethod
    def _feasible_l2(x: Tensor, u: Tensor, mask: Tensor | None) -> Tensor:
        if mask is not None:
            u = torch.where(mask > 0, u, torch.zeros((), dtype=u.dtype, device=u.device))
        return ThreatModel.box(x, u, mask)

    # ------------------------------------------------------------------ the attack
    def _run(self, model, x, y, mask, eps, g) -> tuple[Tensor, Tensor, Tensor]:
        """One Square run: ``(u, success, objective)`` per sample."""
        b, c, h, w = x.shape
        if self.norm == "linf":
            u = self._start_linf(x, eps, g)
        else:
            u = self._feasible_l2(x, self._start_l2(x, eps, g), mask)
        obj, succ = self._query(model, x, u, mask, y)
        n_features = c * h * w
        for i in range(self.n_queries):
            idx = (~succ).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            p = p_selection(self.p_init, i, self.n_queries, self.rescale_schedule)
            s = max(int(round(math.sqrt(p * n_features / c))), 1)
            xa, ua, ma, ea = x[idx], u[idx], _rows(mask, idx), eps[idx]
            if self.norm == "linf":
                new = self._propose_linf(xa, ua, ma, ea, min(s, h, w), g)
            else:
                s = max(s, 3)
                s = min(s + 1 if s % 2 == 0 else s, h, w)
                new = self._propose_l2(xa, ua, ma, ea, s, g)
            o, sc = self._query(model, xa, new, ma, y[idx])
            improved = o > obj[idx]
            accept = improved | sc
            u[idx[accept]] = new[accept]
            obj[idx[improved]] = o[improved]
            succ[idx] = sc
        return u, succ, obj

    def perturb(self, model, x, y, mask, generator) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"Square needs images (B,C,H,W), got shape {tuple(x.shape)}")
        eps = _eps_vector(self.eps, x)
        b = x.shape[0]
        x = x.contiguous()
        mask = None if mask is None else mask.contiguous()
        u_all = torch.zeros_like(x)
        succ_all = torch.zeros(b, dtype=torch.bool, device=x.device)
        obj_all = torch.full((b,), -math.inf, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            for r in range(self.restarts):
                idx = (~succ_all).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                g = generator if r == 0 else self._generator(x, r)
                u, succ, obj = self._run(model, x[idx], y[idx], _rows(mask, idx), eps[idx], g)
                take = succ | (obj > obj_all[idx])
                u_all[idx[take]] = u[take]
                obj_all[idx[take]] = obj[take]
                succ_all[idx] = succ
        return u_all


def _l2(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
