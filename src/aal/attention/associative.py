"""Associative attention M^a of AAL (seed 001, Sec. 3.2, Eqs. 5-14 and Alg. 1).

From one clean forward pass and one backward pass we get, together, the input gradient
``dG/dx`` (which gives the FGSM perturbation, Eq. 1) and the gradient of the loss with respect
to the attention map ``dG/dM`` (M is an intermediate tensor of the graph). Then:

1. **Gradient step on the map** (Eq. 12): ``M_hat = M - xi1 * dG/dM``.
2. **Trigger** (Eq. 14): backtracking happens only at the pixels where the perturbation is most
   severe: the top-``zeta`` fraction of pixels ranked by ``|dG/d delta|`` (see below).
3. **Backtracking** (Eq. 13): ``M^a = M_hat - xi2 * gamma o M`` at triggered pixels, ``M_hat``
   elsewhere; clipped to [0,1]. The coupling ``gamma`` (the linear kernel
   ``G_hat o d delta / dM`` of Eq. 13) comes in two named flavours, see ``coupling``.
4. ``M^a`` is resized to the input resolution (bilinear) to serve as a per-pixel budget.

Choices (the paper is silent or ambiguous; each is stated where it is made):

* **Gradient scale.** ``G`` is the *sum* of the per-sample losses over the batch, so ``dG/dM``
  and ``dG/dx`` of each sample are that sample's own gradients, independent of the batch size
  (with the batch mean, ``xi1`` would silently shrink with a larger batch).
* **Separate ``xi1``.** The paper calls ``xi1`` both the network's learning rate (Eq. 5) and the
  step of Eq. 12; we use a separate ``xi1 = 0.1`` as in Alg. 1.
* **Direction of delta.** Eq. 1 writes ``sign(-grad G)``; we use ``delta = eps * sign(dG/dx)``,
  the FGSM direction that *increases* the classification loss (what Eq. 1 means: the
  perturbation attacks the model).
* **Which end the trigger takes.** The text says M^a "needs compensation for the attention on
  the severely perturbed areas"; the most severely perturbed pixels are those where the loss is
  most sensitive to delta, i.e. with the *largest* ``|dG/d delta|``. So the trigger selects the
  top-``zeta`` fraction (``round(zeta * h * w)`` pixels per sample) in descending order of
  ``|dG/dx|`` summed over channels; ``zeta`` is the fraction backtracked (a literal
  "percentile > zeta" would backtrack ``1 - zeta`` of the image). Ties are broken
  deterministically by a stable sort: the lower flat (row-major) index wins.
* **Resolution.** The map lives at the attention layer's resolution (h, w), which may differ
  from the input's (H, W) (e.g. 24x24 maps for 28x28 ``small_cnn`` inputs, whose 5x5 stem is
  unpadded; 112x112 for a 224 ResNet stem). The paper does not say how M^a reaches the pixels.
  When the resolutions agree, both directions are the identity. Otherwise, with
  ``align="receptive_field"`` (default) and a model whose ``stem`` is a ``Conv2d`` of known
  geometry (kernel k, stride s, padding p), map pixel i sits at the centre of its receptive
  field, input pixel ``s*i - p + (k-1)/2``: map quantities reach the input by linear
  interpolation between those centres (edge values held), and input quantities (the ranking
  score, the finite-difference coupling) reach the map as the mean over each map pixel's
  receptive field. For ``small_cnn`` this shifts the 24x24 map by 2 pixels onto the 28x28
  image instead of stretching it (a stretch misplaces the budget by up to 2 pixels).
  ``align="resize"`` (the earlier behaviour, and the fall-back when the stem's geometry is
  unknown) uses area interpolation to (h, w) and bilinear interpolation to (H, W).
* **Coupling** ``gamma`` (Eq. 13):

  - ``"indicator"`` (default; the public implementation): ``gamma = 1`` on the top-``rho``
    fraction of pixels by perturbation magnitude ``|dG/d delta|`` (the trigger's ranking), 0
    elsewhere, so triggered pixels get ``M^a = M_hat - xi2 * M``. Costs nothing extra. Note that
    with the same ranking, the backtracked set is the top-``min(zeta, rho)`` fraction. The
    public code's preset is ``rho = 0.01``, ``xi2 = 0.05``.
  - ``"finite-difference"`` (the paper's Eq. 13 with ``d delta/dM ~ Delta delta / Delta M``):
    ``delta_hat`` is recomputed with the attention overridden by ``M_hat`` (one extra forward
    and backward: ``model(x, attention_map=M_hat)``); ``G_hat = (dG/d delta) / M`` (Eq. 6) and
    ``gamma = sum_channels G_hat o (delta_hat - delta) / (M_hat - M)`` at the input resolution,
    then area-pooled to (h, w). Divisions are safe: a pixel where the denominator is (nearly)
    zero contributes 0 (no measurable change of M, no finite-difference estimate). Because
    ``delta`` is a sign, ``Delta delta`` is 0 or ``+-2 eps`` and the estimate is coarse; the
    [0,1] clip bounds its effect.

Example:
    >>> import torch, aal
    >>> from aal.attention import associative_attention
    >>> model = aal.create_model("small_cnn", attention="cbam")
    >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    >>> r = associative_attention(model, x, y, eps=0.1)
    >>> r.m.shape, r.m_a.shape, r.m_a_input.shape
    (torch.Size([4, 1, 24, 24]), torch.Size([4, 1, 24, 24]), torch.Size([4, 1, 28, 28]))
    >>> bool(((r.m_a >= 0) & (r.m_a <= 1)).all())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aal.attacks.base import LossFn, attack_mode, ce_loss
from aal.utils.modes import uncompiled

COUPLINGS = ("indicator", "finite-difference")
"""Named coupling options for ``gamma`` of Eq. 13."""
ALIGNS = ("receptive_field", "resize")
"""How the map is placed on the input when their resolutions differ (see the module doc)."""

_TINY = 1e-12  # denominators below this are "zero" in the safe divisions of the FD coupling


@dataclass
class AssocResult:
    """Everything :func:`associative_attention` computes (all tensors detached).

    Attributes:
        m: clean attention map M, (B,1,h,w).
        grad_m: ``dG/dM``, (B,1,h,w).
        m_hat: ``M - xi1 * dG/dM`` (Eq. 12), (B,1,h,w), not clipped.
        gamma: the coupling of Eq. 13, (B,1,h,w).
        trigger: bool (B,1,h,w), pixels where backtracking happens (Eq. 14).
        m_a: associative attention M^a in [0,1], (B,1,h,w) (usable as an ``attention_map``).
        m_a_input: M^a resized to the input resolution, (B,1,H,W), in [0,1].
        grad_x: ``dG/dx`` = ``dG/d delta`` at delta = 0, (B,C,H,W).
        delta: ``eps * sign(dG/dx)`` (Eq. 1, ascending the loss), (B,C,H,W).
        score: the trigger's ranking score ``sum_c |dG/dx|`` at the map resolution, (B,1,h,w).
        logits: clean logits (B,K).
        loss: clean per-sample loss (B,).
        has_attention: False for the degenerate case of a model without attention (M = 1).
    """

    m: Tensor
    grad_m: Tensor
    m_hat: Tensor
    gamma: Tensor
    trigger: Tensor
    m_a: Tensor
    m_a_input: Tensor
    grad_x: Tensor
    delta: Tensor
    score: Tensor
    logits: Tensor
    loss: Tensor
    has_attention: bool = True


def to_size(t: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Resize (B,C,*,*) ``t`` to ``size`` with ``"area"`` or ``"bilinear"``; identity if equal."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    if mode == "area":
        return F.adaptive_avg_pool2d(t, size)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


class MapGrid:
    """Moves quantities between the map's (h, w) grid and the input's (H, W) grid.

    Args:
        map_size: (h, w) of the attention map.
        input_size: (H, W) of the images.
        geometry: ``(kernel, stride, padding)`` of the stem convolution, or None (unknown).
        align: ``"receptive_field"`` or ``"resize"`` (see the module doc).
    """

    def __init__(
        self, map_size: tuple[int, int], input_size: tuple[int, int], geometry: tuple[int, int, int] | None,
        align: str = "receptive_field",
    ) -> None:
        if align not in ALIGNS:
            raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
        self.map_size, self.input_size = tuple(map_size), tuple(input_size)
        fits = geometry is not None and all(
            (n + 2 * geometry[2] - geometry[0]) // geometry[1] + 1 == m for n, m in zip(self.input_size, self.map_size)
        )
        # the receptive-field placement needs the stem's geometry to explain the map's size
        self.geometry = geometry if (align == "receptive_field" and fits) else None

    @property
    def identity(self) -> bool:
        return self.map_size == self.input_size

    def to_map(self, t: Tensor) -> Tensor:
        """(B,C,H,W) -> (B,C,h,w): the mean over each map pixel's receptive field (or area pooling)."""
        if self.identity:
            return t
        if self.geometry is None:
            return to_size(t, self.map_size, "area")
        k, s, p = self.geometry
        return F.avg_pool2d(t, k, s, p, count_include_pad=False)

    def to_input(self, t: Tensor) -> Tensor:
        """(B,C,h,w) -> (B,C,H,W): linear between receptive-field centres (or a bilinear stretch)."""
        if self.identity:
            return t
        if self.geometry is None:
            return to_size(t, self.input_size, "bilinear")
        k, s, p = self.geometry
        offset = (k - 1) / 2 - p  # input position of map pixel 0's receptive-field centre
        for dim, (n_in, n_map) in zip((-2, -1), zip(self.input_size, self.map_size)):
            f = ((torch.arange(n_in, dtype=t.dtype, device=t.device) - offset) / s).clamp(0, n_map - 1)
            i0 = f.floor().long()
            i1 = (i0 + 1).clamp(max=n_map - 1)
            w = (f - i0.to(t.dtype)).view(-1, 1) if dim == -2 else (f - i0.to(t.dtype))
            t = t.index_select(dim, i0) * (1 - w) + t.index_select(dim, i1) * w
        return t


def stem_geometry(model: nn.Module) -> tuple[int, int, int] | None:
    """``(kernel, stride, padding)`` of ``model.stem`` if it is a square, undilated ``Conv2d``."""
    stem = getattr(model, "stem", None)
    if not isinstance(stem, nn.Conv2d) or isinstance(stem.padding, str):
        return None
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = stem.kernel_size, stem.stride, stem.padding, stem.dilation
    if kh != kw or sh != sw or ph != pw or dh != 1 or dw != 1:
        return None
    return kh, sh, ph


def _count(frac: float, n: int) -> int:
    """``round(frac * n)`` (half up): the number of entries a fraction selects."""
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"fraction must lie in [0,1], got {frac}")
    return int(math.floor(frac * n + 0.5))


def top_fractions(score: Tensor, fracs: Sequence[float]) -> list[Tensor]:
    """For each fraction, the bool mask of the ``round(frac * n)`` largest entries per sample.

    Args:
        score: (B, ...) scores; each sample's entries are ranked together (NaN-free).
        fracs: fractions in [0,1].

    Returns:
        one bool tensor shaped like ``score`` per fraction. Ties are broken by index: among
        equal scores the lower flat (row-major) index is selected first, so the result is
        deterministic (what a stable descending sort gives).

    One ``topk`` for all fractions gives each k-th largest value ``t``; entries above ``t`` are
    selected and the remaining places go to the entries equal to ``t`` in index order. This is
    several times cheaper than a full stable sort (about 8% of an AAL+FGSM step on small_cnn).
    """
    flat = score.flatten(1)
    n = flat.shape[1]
    ks = [_count(f, n) for f in fracs]
    kmax = max(ks, default=0)
    vals = flat.topk(kmax, dim=1, sorted=True).values if kmax > 0 else None
    out = []
    for k in ks:
        if k == 0:
            sel = torch.zeros_like(flat, dtype=torch.bool)
        elif k == n:
            sel = torch.ones_like(flat, dtype=torch.bool)
        else:
            t = vals[:, k - 1 : k]
            above = flat > t
            tie = flat == t
            need = k - above.sum(1, keepdim=True)
            sel = above | (tie & (tie.cumsum(1) <= need))
        out.append(sel.view_as(score))
    return out


def top_fraction(score: Tensor, frac: float) -> Tensor:
    """Bool mask of the ``round(frac * n)`` largest entries of each sample of ``score``.

    Ties are broken by index (the lower flat index first); see :func:`top_fractions`.
    """
    return top_fractions(score, [frac])[0]


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    """``a / b`` where ``|b| > tiny``, else 0."""
    ok = b.abs() > _TINY
    return torch.where(ok, a / torch.where(ok, b, torch.ones_like(b)), torch.zeros_like(a))


def associative_attention(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    xi1: float = 0.1,
    xi2: float = 0.1,
    zeta: float = 0.1,
    coupling: str = "indicator",
    rho: float = 0.01,
    loss_fn: LossFn = ce_loss,
    mode: str = "eval",
    require_attention: bool = True,
    align: str = "receptive_field",
) -> AssocResult:
    """Associative attention M^a for images ``x`` (seed 001, Eqs. 5-14; see the module doc).

    Runs one forward pass with ``return_attention=True`` and one backward pass
    (``torch.autograd.grad(G, [x, M])``; no parameter gradients are computed) in the model mode
    ``mode``, restoring modes and ``requires_grad`` flags afterwards, as the attacks do.
    ``coupling="finite-difference"`` adds one forward/backward with the map overridden by M_hat.

    Args:
        model: an :class:`~aal.models.base.AttentionNet` (``model(x, attention_map=None,
            return_attention=False)``) with an attention layer.
        x: clean images (B,C,H,W) in [0,1]; not modified.
        y: labels (B,).
        eps: L-inf budget of ``delta = eps * sign(dG/dx)``.
        xi1: step of the map's gradient descent (Eq. 12; Alg. 1: 0.1).
        xi2: backtracking rate (Eq. 13; paper 0.1, public code 0.05).
        zeta: fraction of pixels where backtracking is triggered (Eq. 14; top end, see module doc).
        coupling: ``"indicator"`` or ``"finite-difference"`` (see module doc).
        rho: fraction of pixels with ``gamma = 1`` for the indicator coupling (public code: 0.01).
        loss_fn: per-sample loss ``(logits, y) -> (B,)``; ``G`` is its sum over the batch.
        mode: model mode for these passes: ``"eval"`` (default, like the attacks), ``"train"``
            or ``"keep"``.
        require_attention: if False, a model without attention is accepted and treated as having
            the constant map M = 1 at the input resolution, with ``dG/dM = 0``, nothing
            triggered and ``M^a = 1`` (the degenerate case used by kernel ``"one"``).
        align: ``"receptive_field"`` (default) or ``"resize"``: how the map is placed on the
            input when their resolutions differ (see the module doc).

    Returns:
        an :class:`AssocResult`.

    Raises:
        ValueError: the model returns no attention map (and ``require_attention``), or an
            argument is out of range.
    """
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    if align not in ALIGNS:
        raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
    for name, v in (("eps", eps), ("xi1", xi1), ("xi2", xi2)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    for name, v in (("zeta", zeta), ("rho", rho)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must lie in [0,1], got {v!r}")

    x = x.detach()
    H, W = x.shape[-2:]
    model = uncompiled(model)  # dG/dM is taken w.r.t. the map the model returns: eager only
    with attack_mode(model, mode), torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        logits, m = model(xr, return_attention=True)
        loss = loss_fn(logits, y)
        if m is None:
            if require_attention:
                raise ValueError(
                    "associative attention needs a spatial attention map, but this model has no attention "
                    "layer: build it with an attention layer, e.g. create_model(..., attention='cbam')"
                )
            (grad_x,) = torch.autograd.grad(loss.sum(), xr)
            ones = torch.ones(x.shape[0], 1, H, W, dtype=x.dtype, device=x.device)
            zeros = torch.zeros_like(ones)
            return AssocResult(
                m=ones, grad_m=zeros, m_hat=ones, gamma=zeros, trigger=zeros.bool(), m_a=ones, m_a_input=ones,
                grad_x=grad_x, delta=eps * grad_x.sign(), score=grad_x.abs().sum(1, keepdim=True),
                logits=logits.detach(), loss=loss.detach(), has_attention=False,
            )  # fmt: skip
        # G = sum of per-sample losses: per-sample gradients, independent of the batch size
        grad_x, grad_m = torch.autograd.grad(loss.sum(), [xr, m])
        m = m.detach()
        size = tuple(m.shape[-2:])
        grid = MapGrid(size, (H, W), stem_geometry(model), align)
        delta = eps * grad_x.sign()  # Eq. 1, in the direction that increases the loss
        m_hat = m - xi1 * grad_m  # Eq. 12

        # Eq. 14: rank pixels by |dG/d delta| (= |dG/dx|), summed over channels, at the map's
        # resolution; backtrack the top-zeta fraction (the most severely perturbed pixels)
        score = grid.to_map(grad_x.abs().sum(1, keepdim=True))
        if coupling == "indicator":
            trigger, top_rho = top_fractions(score, [zeta, rho])  # one ranking for both
            gamma = top_rho.to(m.dtype)
        else:  # finite-difference: Eq. 13 with d delta / dM ~ (delta_hat - delta) / (M_hat - M)
            trigger = top_fraction(score, zeta)
            xr2 = x.detach().requires_grad_(True)
            loss2 = loss_fn(model(xr2, attention_map=m_hat), y)
            (grad_x_hat,) = torch.autograd.grad(loss2.sum(), xr2)
            delta_hat = eps * grad_x_hat.sign()
            m_up = grid.to_input(m)
            dm_up = grid.to_input(m_hat - m)
            g_hat = _safe_div(grad_x, m_up)  # Eq. 6
            gamma_in = (g_hat * _safe_div(delta_hat - delta, dm_up)).sum(1, keepdim=True)
            gamma = grid.to_map(gamma_in)

    # Eqs. 13-14: M^a = M_hat - xi2 * gamma o M where triggered, M_hat elsewhere; a map is in [0,1]
    m_a = torch.where(trigger, m_hat - xi2 * gamma * m, m_hat).clamp(0.0, 1.0)
    m_a_input = grid.to_input(m_a).clamp(0.0, 1.0)
    return AssocResult(
        m=m, grad_m=grad_m.detach(), m_hat=m_hat.detach(), gamma=gamma.detach(), trigger=trigger,
        m_a=m_a.detach(), m_a_input=m_a_input.detach(), grad_x=grad_x.detach(), delta=delta.detach(),
        score=score.detach(), logits=logits.detach(), loss=loss.detach(),
    )  # fmt: skip


__all__ = [
    "ALIGNS", "AssocResult", "COUPLINGS", "MapGrid", "associative_attention", "stem_geometry", "to_size", "top_fraction",
    "top_fractions",
]  # fmt: skip
