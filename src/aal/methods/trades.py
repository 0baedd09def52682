"""TRADES (Zhang et al. 2019): clean cross-entropy + beta * KL(f(x) || f(x')).

The inner maximisation reuses the generic attack loop of :mod:`aal.attacks` (so it accepts a
per-pixel budget ``mask`` and both norms): :class:`TradesKLAttack` is PGD on the per-sample KL
divergence from the clean prediction, started from ``x + 0.001 * N(0, 1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aal.attacks.base import THREATS, IterativeAttack, ThreatModel
from aal.methods.adversarial import (
    check_budget,
    ATTACK_MODES,
    accuracy,
    check_choice,
    check_nonneg,
)
from aal.methods.base import METHODS, Batch, Method, Output, split_batch


def kl_from_clean(logits: Tensor, p_clean: Tensor) -> Tensor:
    """Per-sample ``KL(p_clean || softmax(logits))``, shape (B,); ``p_clean`` (B,K) probabilities."""
    return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="none").sum(1)


class _GaussianStart(ThreatModel):
    """A threat model whose random start is ``sigma * N(0, 1)`` (TRADES), not uniform in the ball.

    Steps and projection are those of the wrapped threat. As in the official code the start is
    not projected onto the ball (it is tiny); the first step's projection takes care of it.
    """

    def __init__(self, base: ThreatModel, sigma: float) -> None:
        super().__init__(base.eps)
        self.base = base
        self.norm = base.norm
        self.sigma = sigma

    def init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def step(self, u: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        return self.base.step(u, grad, step_size)

    def project(self, u: Tensor) -> Tensor:
        return self.base.project(u)


class TradesKLAttack(IterativeAttack):
    """TRADES' inner maximisation: ``max_{x' in B(x, eps)} KL(f(x) || f(x'))``.

    Labels are not used: the clean prediction ``f(x)`` (computed in the attack's model mode,
    without gradients) is the target distribution. The start is ``x + sigma * N(0, 1)``
    (``sigma = 0.001``), then ``steps`` steepest-ascent steps, each projected onto the eps-ball
    and the [0,1] box (official code, ``trades.py``).

    Args:
        eps: budget.
        steps: iterations (>= 1).
        step_size: step length.
        sigma: standard deviation of the Gaussian start.
        norm: ``"linf"`` or ``"l2"``.
        mode: model mode while crafting (see :class:`aal.attacks.base.Attack`).
        seed: optional seed for the start.

    Example:
        >>> import torch, aal
        >>> m = aal.create_model("small_cnn")
        >>> x = torch.rand(2, 1, 28, 28)
        >>> x_adv = TradesKLAttack(eps=0.1, steps=3, step_size=0.03)(m, x, torch.tensor([0, 1]))
    """

    name = "trades_kl"

    def __init__(
        self,
        eps: float | Tensor,
        steps: int = 10,
        step_size: float | Tensor | None = None,
        sigma: float = 0.001,
        norm: str = "linf",
        mode: str = "eval",
        seed: int | None = None,
    ) -> None:
        super().__init__(
            eps, steps=steps, step_size=step_size, rand_init=True, restarts=1, norm=norm, loss=kl_from_clean, mode=mode, seed=seed
        )
        self.threat = _GaussianStart(self.threat, sigma)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        # We are inside attack_mode here, so the target distribution is computed in the same
        # mode as the attack's forward passes (eval by default, as in the official code).
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        return super().perturb(model, x, p_clean, mask, generator)


@METHODS.register("trades")
class TRADES(Method):
    """TRADES: ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` (Zhang et al. 2019).

    Paper: Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled Trade-off
    between Robustness and Accuracy", ICML 2019, Eq. (5); details from the official
    ``trades_loss`` (github.com/yaodongyu/TRADES):

    * ``x'`` is crafted with the model in **eval** mode (``attack_mode``), from
      ``x + 0.001 * N(0, 1)``, by ``steps`` sign-gradient steps of ``step_size`` on
      ``KL(f(x) || f(x'))``, each projected onto the eps-ball and into [0,1];
    * the loss is computed with the model in the caller's (train) mode:
      ``CE(f(x), y) + beta * (1/B) * sum KL(softmax f(x) || softmax f(x'))`` (KL ``batchmean``);
      the gradient flows through both ``f(x)`` and ``f(x')``, as in the official code.

    One difference, for speed and for BatchNorm: the official loss evaluates ``f(x)`` twice
    (for CE and for KL) in train mode; here both terms share one clean forward pass, so
    BatchNorm running statistics are updated once by the clean batch (identical losses for
    models without dropout).

    Defaults follow the official CIFAR-10 setting (eps 8/255 ~ 0.031, 10 steps, beta 6); the
    default step ``2.5 * eps / steps`` (~0.0078) is close to its 0.007. The official MNIST
    setting is eps 0.3, 40 steps of 0.01, beta 1.

    Args:
        eps: budget in [0,1] pixel units.
        steps: inner-maximisation steps (>= 1).
        step_size: inner step; default ``2.5 * eps / steps``.
        beta: weight of the KL (robustness) term (>= 0; 0 is standard training).
        norm: ``"linf"`` or ``"l2"`` (official ``l_2`` uses normalised-gradient steps, as here).
        attack_mode: model mode while crafting: ``"eval"`` (official) or ``"train"``.

    Logs: ``loss_natural`` (clean CE), ``loss_robust`` (the KL term before ``beta``),
    ``acc_clean``, ``acc_adv``. ``Output.logits`` are the clean logits (the CE term's inputs).

    Shapes: ``x`` (B,C,H,W) in [0,1], ``y`` (B,); ``Output.logits`` (B,K).

    Example:
        >>> import torch, aal
        >>> from aal.methods import create_method
        >>> method = create_method("trades", eps=0.1, steps=3, beta=6.0)
        >>> model = aal.create_model("small_cnn")
        >>> out = method(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
        >>> out.loss.backward()
        >>> sorted(out.logs)
        ['acc_adv', 'acc_clean', 'loss_natural', 'loss_robust']
    """

    name = "trades"

    def __init__(
        self,
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        beta: float = 6.0,
        norm: str = "linf",
        attack_mode: str = "eval",
    ) -> None:
        self.eps, self.steps, self.step_size = check_budget(eps, steps, step_size)
        self.beta = check_nonneg("beta", beta)
        self.norm = check_choice("norm", norm, tuple(THREATS))
        self.attack_mode = check_choice("attack_mode", attack_mode, ATTACK_MODES)
        self._attack = TradesKLAttack(self.eps, steps=self.steps, step_size=self.step_size, norm=self.norm, mode=self.attack_mode)

    def craft(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """TRADES adversarial examples ``x'`` (B,C,H,W), detached; optional per-pixel ``mask``."""
        return self._attack(model, x, y, mask)

    def compute(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Output:
        """The method on explicit tensors, with an optional selective budget ``mask``."""
        return self.objective(model, x, self.craft(model, x, y, mask), y)

    def objective(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Output:
        """The TRADES loss on already crafted examples ``x_adv`` (what :meth:`compute` minimises).

        ``model`` is any callable ``x -> logits`` (AWP evaluates it on perturbed weights).
        """
        logits = model(x)
        logits_adv = model(x_adv)
        loss_natural = F.cross_entropy(logits, y)
        # batchmean = (1/B) * sum over the batch, the official normalisation
        loss_robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        loss = loss_natural + self.beta * loss_robust
        logs = {
            "loss_natural": float(loss_natural.detach()),
            "loss_robust": float(loss_robust.detach()),
            "acc_clean": accuracy(logits, y),
            "acc_adv": accuracy(logits_adv, y),
        }
        return Output(loss, logits, logs)

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        x, y = split_batch(batch)
        return self.compute(model, x, y)


__all__ = ["TRADES", "TradesKLAttack", "kl_from_clean"]
