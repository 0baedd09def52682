"""MART (Wang et al. 2020): misclassification-aware adversarial training.

Paper: Wang, Zou, Yi, Bailey, Ma & Gu, "Improving Adversarial Robustness Requires Revisiting
Misclassified Examples", ICLR 2020; details from the official ``mart_loss``
(github.com/YisenWang/MART), re-implemented here:

    L = BCE(f(x'), y) + beta * (1/B) * sum_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i))
    BCE(f(x'), y) = CE(f(x'), y) - log(1 - max_{k != y} p_k(x'))

* the **BCE** term is the boosted cross-entropy on the adversarial example: the usual CE plus
  ``-log(1 - p_j(x'))`` for the most probable *wrong* class ``j`` (the runner-up when the top
  class is ``y``), which pushes the strongest wrong class down;
* the **KL** consistency term between clean and adversarial predictions is weighted per sample
  by ``1 - p_y(x)``: examples the model already misclassifies (small ``p_y``) count more;
* the official code adds ``1e-4`` inside ``log(1.0001 - p)``, ``1e-12`` inside the logs and
  ``1e-7`` to the weight (``1.0000001 - p_y``) for numerical safety; kept here;
* the inner maximisation is PGD on the *cross-entropy* (not on the MART loss), from
  ``x + 0.001 * N(0, 1)``, with the model in eval mode (official code); ``start="uniform"``
  starts uniformly in the ball instead (Madry et al.);
* gradients flow through both the clean and the adversarial forward passes (as in the
  official code; the weight ``1 - p_y(x)`` is *not* detached).

Defaults follow the official CIFAR-10 setting (eps 8/255, 10 steps, beta 6; step 0.007 there,
``2.5 * eps / steps`` here, ~0.0078).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aal.attacks.base import THREATS, IterativeAttack
from aal.methods.adversarial import (
    check_budget,
    ATTACK_MODES,
    accuracy,
    check_choice,
    check_nonneg,
)
from aal.methods.base import METHODS, Batch, Method, Output, split_batch
from aal.methods.trades import _GaussianStart

STARTS = ("normal", "uniform")
"""Random starts of the inner maximisation: ``0.001 * N(0,1)`` (official) or uniform in the ball."""


def mart_loss(logits: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The MART objective from clean and adversarial logits (official ``mart_loss`` maths).

    Args:
        logits: clean logits (B, K).
        logits_adv: logits on the adversarial examples (B, K).
        y: labels (B,).
        beta: weight of the misclassification-aware KL term.

    Returns:
        ``(loss, parts)`` with ``parts = {"loss_bce", "loss_robust", "weight_mean"}`` (tensors;
        ``loss_robust`` is before ``beta``).

    Example:
        >>> import torch
        >>> loss, parts = mart_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), beta=6.0)
        >>> round(float(parts["loss_robust"]), 6)   # identical predictions: no KL
        0.0
    """
    b = len(y)
    # in fp32 whatever the autocast dtype: in bf16 the official guards vanish (1.0001 rounds to 1, and a
    # confident p rounds to 1). Measured: the ranking study's bf16 MART run (seed 0) went NaN in epoch 1
    # without this cast and not with it; which op produced the first NaN was not traced
    logits, logits_adv = logits.float(), logits_adv.float()
    adv_probs = F.softmax(logits_adv, dim=1)
    # the most probable wrong class: top-1 unless it is y, then top-2
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    loss_bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
    weight = 1.0000001 - true_probs
    loss_robust = (kl * weight).sum() / b
    return loss_bce + beta * loss_robust, {
        "loss_bce": loss_bce,
        "loss_robust": loss_robust,
        "weight_mean": weight.mean(),
    }


@METHODS.register("mart")
class MART(Method):
    """MART: boosted CE on adversarial examples + beta * (1 - p_y(x))-weighted KL (Wang et al. 2020).

    See the module docstring for the formula and what comes from the official code.

    Args:
        eps: budget in [0,1] pixel units (default 8/255; Fashion-MNIST configs use 0.1).
        steps: PGD steps of the inner maximisation (>= 1).
        step_size: PGD step; default ``2.5 * eps / steps``.
        beta: weight of the KL term (>= 0; official 6.0). ``beta=0`` leaves the BCE term alone.
        start: ``"normal"`` (``x + 0.001 * N(0,1)``, official) or ``"uniform"`` (in the ball).
        norm: ``"linf"`` or ``"l2"``.
        attack_mode: model mode while crafting: ``"eval"`` (official) or ``"train"``.

    Logs: ``loss_bce``, ``loss_robust`` (KL term before beta), ``weight_mean`` (mean of
    ``1 - p_y(x)``), ``acc_clean``, ``acc_adv``. ``Output.logits`` are the adversarial logits.

    Shapes: ``x`` (B,C,H,W) in [0,1], ``y`` (B,); ``Output.logits`` (B,K).

    Example:
        >>> import torch, aal
        >>> from aal.methods import create_method
        >>> method = create_method("mart", eps=0.1, steps=3)
        >>> model = aal.create_model("small_cnn")
        >>> out = method(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
        >>> out.loss.backward()
        >>> sorted(out.logs)
        ['acc_adv', 'acc_clean', 'loss_bce', 'loss_robust', 'weight_mean']
    """

    name = "mart"

    def __init__(
        self,
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        beta: float = 6.0,
        start: str = "normal",
        norm: str = "linf",
        attack_mode: str = "eval",
    ) -> None:
        self.eps, self.steps, self.step_size = check_budget(eps, steps, step_size)
        self.beta = check_nonneg("beta", beta)
        self.start = check_choice("start", start, STARTS)
        self.norm = check_choice("norm", norm, tuple(THREATS))
        self.attack_mode = check_choice("attack_mode", attack_mode, ATTACK_MODES)
        self._attack = IterativeAttack(
            self.eps, steps=self.steps, step_size=self.step_size, rand_init=True, norm=self.norm, loss="ce",
            mode=self.attack_mode,
        )
        if self.start == "normal":
            self._attack.threat = _GaussianStart(self._attack.threat, 0.001)

    def craft(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """PGD-CE adversarial examples ``x'`` (B,C,H,W), detached; optional per-pixel ``mask``."""
        return self._attack(model, x, y, mask)

    def compute(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Output:
        """The method on explicit tensors, with an optional selective budget ``mask``."""
        x_adv = self.craft(model, x, y, mask)
        logits = model(x)
        logits_adv = model(x_adv)
        loss, parts = mart_loss(logits, logits_adv, y, self.beta)
        logs = {k: float(v.detach()) for k, v in parts.items()}
        logs.update(acc_clean=accuracy(logits, y), acc_adv=accuracy(logits_adv, y))
        return Output(loss, logits_adv, logs)

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        x, y = split_batch(batch)
        return self.compute(model, x, y)


__all__ = ["MART", "STARTS", "mart_loss"]
