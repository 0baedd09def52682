"""The premise of selective attacks, tested without CBAM: FGSM-AT with a saliency-placed budget.

AAL's claim rests on a premise: *where* a fixed amount of perturbation budget goes matters for
adversarial training. AAL tests it through a learned attention map (CBAM), so a null result
could come from the premise or from the map. This method tests the premise alone: the budget
follows a saliency map that needs no attention layer, and four placements share exactly the
same per-image budget values:

* saliency ``s``: the magnitude of the clean loss gradient ``|dG/dx|`` summed over channels,
  smoothed by a Gaussian (``sigma`` pixels), per image: the "smoothed clean-gradient
  magnitude". It comes from the same backward pass that FGSM needs, so it costs nothing.
* budget profile: ``"rank"`` (default) gives each pixel ``rank(s) / (n - 1)``, values spread
  evenly over [0,1] (mean 0.5), identical for every image; ``"binary"`` sets the top ``frac``
  of pixels by saliency to 1 and the rest to 0.
* ``placement``: ``"foreground"`` (largest budget on the most salient pixels), ``"background"``
  (the same values on the least salient pixels: reversed ranks), ``"shuffle"`` (the same values at random places) or
  ``"uniform"`` (every pixel at the image's mean budget). All four have the same per-image mean
  budget; foreground, background and shuffle the same histogram.

Then ``x' = clip(x + k o eps * sign(dG/dx), 0, 1)`` and the loss is the cross-entropy on
``x'``, as AAL+FGSM. Logs ``mask_mean``, ``mask_std`` and ``sal_fg_corr`` (the per-image
correlation between budget and saliency: +1 foreground, -1 background, ~0 shuffle) to show
which placement ran.

Example:
    >>> import torch, aal
    >>> from aal.methods import create_method
    >>> model = aal.create_model("small_cnn")
    >>> out = create_method("saliency_fgsm", eps=0.1, placement="background")(
    ...     model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
    >>> round(out.logs["mask_mean"], 3)
    0.5
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aal.attacks.base import attack_mode, ce_loss
from aal.attacks.gradient import fgsm_from_grad
from aal.methods.aal_core import binarize_mask, control_mask
from aal.methods.adversarial import ATTACK_MODES, accuracy, check_choice, check_fraction, check_nonneg
from aal.methods.base import METHODS, Batch, Method, Output, split_batch

PLACEMENTS = ("foreground", "background", "shuffle", "uniform")
PROFILES = ("rank", "binary")
_CONTROL = {"foreground": "none", "background": "none", "shuffle": "shuffle", "uniform": "uniform"}


def gaussian_blur(t: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B,1,H,W) ``t`` (reflect padding); identity for ``sigma = 0``."""
    if sigma <= 0:
        return t
    r = max(1, math.ceil(2 * sigma))
    g = torch.exp(-(torch.arange(-r, r + 1, dtype=t.dtype, device=t.device) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    r_h, r_w = min(r, t.shape[-2] - 1), min(r, t.shape[-1] - 1)  # reflect needs padding < size
    t = F.pad(t, (r_w, r_w, r_h, r_h), mode="reflect") if min(r_h, r_w) > 0 else t
    t = F.conv2d(t, g[r - r_h : r + r_h + 1].view(1, 1, -1, 1))
    return F.conv2d(t, g[r - r_w : r + r_w + 1].view(1, 1, 1, -1))


def rank_profile(score: Tensor) -> Tensor:
    """Per image, each pixel's rank of ``score`` divided by ``n - 1`` (ties by index): values in [0,1]."""
    flat = score.flatten(1)
    n = flat.shape[1]
    ranks = torch.empty_like(flat)
    order = flat.argsort(dim=1, stable=True)
    ranks.scatter_(1, order, torch.arange(n, dtype=flat.dtype, device=flat.device).expand_as(flat).contiguous())
    return (ranks / max(n - 1, 1)).view_as(score)


def _corr(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return float(((a * b).sum(1) / den).mean())


@METHODS.register("saliency_fgsm")
class SaliencyFGSM(Method):
    """FGSM-AT whose per-pixel budget is placed by a smoothed clean-gradient saliency map.

    See the module docstring. Not from the seed papers: the CBAM-free control for AAL's premise.

    Args:
        eps: L-inf budget in [0,1] pixel units.
        placement: ``"foreground"``, ``"background"``, ``"shuffle"`` or ``"uniform"``.
        profile: ``"rank"`` or ``"binary"``.
        frac: fraction of pixels at full budget for ``profile="binary"``.
        sigma: Gaussian smoothing of the saliency, in pixels (0: none).
        attack_mode: model mode for the gradient pass (``"eval"``, as the attacks).
    """

    name = "saliency_fgsm"

    def __init__(
        self,
        eps: float = 8 / 255,
        placement: str = "foreground",
        profile: str = "rank",
        frac: float = 0.5,
        sigma: float = 1.0,
        attack_mode: str = "eval",
    ) -> None:
        self.eps = check_nonneg("eps", eps)
        self.placement = check_choice("placement", placement, PLACEMENTS)
        self.profile = check_choice("profile", profile, PROFILES)
        self.frac = check_fraction("frac", frac)
        self.sigma = check_nonneg("sigma", sigma)
        self.attack_mode = check_choice("attack_mode", attack_mode, ATTACK_MODES)

    def saliency(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(saliency (B,1,H,W), dG/dx (B,C,H,W))`` of the clean images (one input-gradient pass)."""
        with attack_mode(model, self.attack_mode), torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(ce_loss(model(xr), y).sum(), xr)
        return gaussian_blur(grad.abs().sum(1, keepdim=True), self.sigma), grad

    def budget(self, sal: Tensor) -> Tensor:
        """The placed budget (B,1,H,W) in [0,1] for saliency ``sal``."""
        # the background is the profile of the *least* salient pixels (for "rank", the reversed ranks)
        score = -sal if self.placement == "background" else sal
        placed = rank_profile(score) if self.profile == "rank" else binarize_mask(score, self.frac)
        return control_mask(placed, _CONTROL[self.placement])

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        x, y = split_batch(batch)
        sal, grad = self.saliency(model, x, y)
        mask = self.budget(sal)
        x_adv = fgsm_from_grad(x, grad, self.eps, mask)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        logs = {
            "loss_adv": float(loss.detach()),
            "acc_adv": accuracy(logits, y),
            "mask_mean": float(mask.mean()),
            "mask_std": float(mask.flatten(1).std(dim=1, unbiased=False).mean()),
            "sal_fg_corr": _corr(mask, sal),
        }
        return Output(loss, logits, logs)


__all__ = ["PLACEMENTS", "PROFILES", "SaliencyFGSM", "gaussian_blur", "rank_profile"]
