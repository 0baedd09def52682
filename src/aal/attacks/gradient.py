"""FGSM, FGSM with random start, and PGD (L-inf and L2): all one loop, see :mod:`.base`."""

from __future__ import annotations

import torch
from torch import Tensor

from aal.attacks.base import IterativeAttack, LinfThreat


def fgsm_from_grad(
    x: Tensor, grad: Tensor, eps: float, mask: Tensor | None = None, rand_init: bool = False, alpha: float | None = None
) -> Tensor:
    """One L-inf FGSM step from a gradient that was already computed (no model call).

    Methods that get ``dG/dx`` from a pass they need anyway (AAL's associative pass, a saliency
    map) take their FGSM step here; it makes the same threat-model calls as :class:`FGSM` (and
    :class:`FGSMRS` with ``rand_init``), so it reproduces them exactly given the same gradient.

    Args:
        x: clean images (B,C,H,W) in [0,1].
        grad: the loss gradient at ``x`` (B,C,H,W) (at ``x``, not at the random start: with
            ``rand_init`` this is the cheap variant that needs no extra pass).
        eps: L-inf budget.
        mask: per-pixel budget (B or 1, 1 or C, H, W) in [0,1], or None.
        rand_init: start uniformly in the (masked) ball (torch's global RNG).
        alpha: step size (default ``eps``; FGSM-RS uses ``1.25 * eps``).

    Returns:
        ``x'`` (B,C,H,W) in [0,1], detached.
    """
    threat = LinfThreat(eps)
    x = x.detach()
    grad = grad.to(x.dtype)  # a gradient taken under autocast may be bf16: the example keeps x's dtype
    u = threat.init(x, None) if rand_init else torch.zeros_like(x)
    u = threat.box(x, u, mask)
    u = threat.project(threat.step(u, grad, eps if alpha is None else alpha))
    u = threat.box(x, u, mask)
    return threat.apply(x, u, mask).detach()


class FGSM(IterativeAttack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of size eps from x.

    ``x_adv = clip(x + eps * mask * sign(grad), 0, 1)``. With ``norm="l2"`` it is the
    fast gradient method (one normalised-gradient step of length eps).

    Example:
        >>> import torch, aal
        >>> m = aal.create_model("small_cnn")
        >>> x_adv = aal.attacks.FGSM(eps=0.1)(m, torch.rand(2, 1, 28, 28), torch.tensor([3, 4]))
    """

    name = "fgsm"

    def __init__(self, eps: float | Tensor, **kwargs) -> None:
        super().__init__(eps, steps=1, step_size=eps, rand_init=False, restarts=1, **kwargs)

    def perturb(self, model, x, y, mask, generator) -> Tensor:
        """One step from ``x``. Without a mask the gradient is taken at ``x`` itself (a leaf),
        skipping the latent ``u = 0`` and its straight-through clip, which are the identity there:
        1.1x less time per call on the small CNN, the same examples (``x`` is in [0,1])."""
        if mask is not None:
            return super().perturb(model, x, y, mask, generator)
        xx = x.detach().requires_grad_(True)
        obj, _ = self.objective(model, xx, y)
        (g,) = torch.autograd.grad(obj.sum(), xx)
        u = self.threat.project(self.threat.step(torch.zeros_like(x), g, self.step_size))
        return self.threat.box(x, u, None)


class FGSMRS(IterativeAttack):
    """FGSM with a random start (Wong, Rice & Kolter 2020, "Fast is better than free").

    Start uniformly in the eps-ball, take one signed step of ``alpha`` (default ``1.25 * eps``)
    and project back onto the ball.
    """

    name = "fgsm_rs"

    def __init__(self, eps: float | Tensor, alpha: float | Tensor | None = None, **kwargs) -> None:
        alpha = 1.25 * eps if alpha is None else alpha
        super().__init__(eps, steps=1, step_size=alpha, rand_init=True, restarts=1, **kwargs)


class PGD(IterativeAttack):
    """Projected Gradient Descent (Madry et al. 2018), L-inf or L2, with restarts.

    Args:
        eps: budget.
        steps: iterations (default 10).
        step_size: default ``2.5 * eps / steps``.
        rand_init: uniform random start in the ball (default True).
        restarts: independent restarts; each sample keeps its worst case.
        norm, loss, targeted, minimize, mode, seed: see :class:`aal.attacks.base.Attack`.

    Example:
        >>> import torch, aal
        >>> m = aal.create_model("small_cnn")
        >>> x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 4])
        >>> x_adv = aal.attacks.PGD(eps=0.1, steps=20, restarts=2)(m, x, y)
        >>> mask = torch.zeros(2, 1, 28, 28); mask[..., 7:21, 7:21] = 1   # attack the centre only
        >>> x_sel = aal.attacks.PGD(eps=0.1, steps=5)(m, x, y, mask=mask)
        >>> bool((x_sel[..., :7, :] == x[..., :7, :]).all())
        True
    """

    name = "pgd"


class BIM(IterativeAttack):
    """Basic Iterative Method (Kurakin et al. 2016): PGD without the random start."""

    name = "bim"

    def __init__(self, eps: float | Tensor, steps: int = 10, step_size: float | Tensor | None = None, **kwargs) -> None:
        super().__init__(eps, steps=steps, step_size=step_size, rand_init=False, **kwargs)
