"""Inverse adversarial training (UIAT, seed 003): pull adversarial outputs toward inverse adversaries.

Paper: Dong, Moosavi-Dezfooli, Lai & Xie, "The Enemy of My Enemy is My Friend: Exploring Inverse
Adversaries for Improving Adversarial Training", CVPR 2023 (seed ``003``; public facts in
``shared/seeds/README.md``).

* An **inverse adversarial example** ``x_inv`` *minimises* the classification loss of the true
  label inside its own (smaller) ball ``||x_inv - x|| <= eps_inv``: the model's most confident
  neighbour of ``x``. It is crafted by the same attack loop as every adversary, with
  ``minimize=True`` (:class:`aal.attacks.base.Attack`).
* The training loss pulls the output on the adversarial example toward the inverse one::

      L = CE(f(x_adv), y) + beta * KL(f(x_adv) || f(x_inv))          (batch mean of the KL)

  so that, unlike TRADES, a *misclassified* clean example is not used as the target.
* **Universal inverse perturbation** (single-step variant): instead of a per-sample inverse
  attack, one perturbation ``delta_c`` per class ``c`` is kept across batches,
  ``x_inv = clip(x + delta_y, 0, 1)``, and updated after each batch by a signed descent step of
  the class-averaged input gradient of ``CE(f(x_inv), y)``, projected to ``eps_inv``. It costs
  one input-gradient pass per batch, which makes FGSM-based training with inverse adversaries
  cheap (``uiat_fgsm``).

What the seed text leaves open, and what is chosen here (each a named option):

* ``kl_direction``: the README writes ``KL(f(x_adv) || f(x_inv))`` (``"adv_inv"``, default);
  ``"inv_adv"`` is ``KL(f(x_inv) || f(x_adv))`` (the inverse output as the target
  distribution, TRADES' argument order).
* ``detach_inverse``: whether the inverse branch receives gradients. Default ``False``
  (gradients through both branches, as TRADES does for its clean branch).
* ``eps_inv`` defaults to ``eps / 2`` (the README's 4/255 for eps 8/255), the inverse attack to
  the adversarial attack's number of steps (README: 10) with step ``2.5 * eps_inv / steps``.
* ``beta``: the seed does not give its value; the default here is 1.0.
* ``uiat_fgsm``'s universal update: signed step of size ``universal_step`` (default
  ``eps_inv / 4``) on the class-summed gradient at the current inverse examples (model in
  ``attack_mode``), classes absent from the batch unchanged; ``delta`` starts at zero.
  ``adv_init`` picks the FGSM start: ``"random"`` (uniform in the eps-ball, FGSM-RS of Wong et
  al. 2020, default) or ``"inverse"`` (start at the class's universal inverse perturbation).

Special case (tested): ``beta=0`` gives exactly the adversarial base (``pgd_at`` for ``uiat``,
``fgsm_at`` for ``uiat_fgsm`` with ``adv_init="random"``) for the same random state, because
the adversarial example is crafted first, with the base's own attack.

Example:
    >>> import torch, aal
    >>> from aal.methods import create_method
    >>> model = aal.create_model("small_cnn")
    >>> method = create_method("uiat_fgsm", eps=0.1)
    >>> out = method(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
    >>> out.loss.backward()
    >>> tuple(method.universal.shape)    # one inverse perturbation per class, sized lazily
    (10, 1, 28, 28)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aal.attacks import PGD
from aal.attacks.base import THREATS, IterativeAttack, ThreatModel, attack_mode
from aal.methods.adversarial import (
    check_budget,
    ATTACK_MODES,
    accuracy,
    check_choice,
    check_int,
    check_nonneg,
    check_positive,
)
from aal.methods.base import METHODS, Batch, Method, Output, split_batch

KL_DIRECTIONS = ("adv_inv", "inv_adv")
"""``"adv_inv"``: ``KL(f(x_adv) || f(x_inv))`` (README); ``"inv_adv"``: ``KL(f(x_inv) || f(x_adv))``."""

ADV_INITS = ("random", "inverse")
"""FGSM start of ``uiat_fgsm``: uniform in the ball (FGSM-RS) or the universal inverse perturbation."""


def consistency_kl(logits_adv: Tensor, logits_inv: Tensor, direction: str = "adv_inv") -> Tensor:
    """Batch-mean KL divergence between the adversarial and the inverse predictions.

    Args:
        logits_adv: logits on the adversarial examples (B, K).
        logits_inv: logits on the inverse adversarial examples (B, K).
        direction: ``"adv_inv"`` for ``KL(p_adv || p_inv)``, ``"inv_adv"`` for ``KL(p_inv || p_adv)``.

    Returns:
        a scalar: ``(1/B) * sum_i KL_i``.
    """
    lp_adv, lp_inv = F.log_softmax(logits_adv, 1), F.log_softmax(logits_inv, 1)
    if direction == "adv_inv":
        return F.kl_div(lp_inv, lp_adv, reduction="batchmean", log_target=True)
    if direction == "inv_adv":
        return F.kl_div(lp_adv, lp_inv, reduction="batchmean", log_target=True)
    raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, got {direction!r}")


class _UIATBase(Method):
    """The shared loss: ``CE(f(x_adv), y) + beta * KL`` between adversarial and inverse outputs."""

    def _common(self, beta: float, kl_direction: str, detach_inverse: bool, norm: str, attack_mode: str) -> None:
        self.beta = check_nonneg("beta", beta)
        self.kl_direction = check_choice("kl_direction", kl_direction, KL_DIRECTIONS)
        self.detach_inverse = bool(detach_inverse)
        self.norm = check_choice("norm", norm, tuple(THREATS))
        self.attack_mode = check_choice("attack_mode", attack_mode, ATTACK_MODES)

    def objective(self, model: nn.Module, x_adv: Tensor, x_inv: Tensor, y: Tensor) -> Output:
        """The training loss for given adversarial and inverse examples (model in the caller's mode)."""
        logits_adv = model(x_adv)
        loss_adv = F.cross_entropy(logits_adv, y)
        if self.detach_inverse:
            with torch.no_grad():
                logits_inv = model(x_inv)
        else:
            logits_inv = model(x_inv)
        loss_inv = consistency_kl(logits_adv, logits_inv, self.kl_direction)
        loss = loss_adv + self.beta * loss_inv
        logs = {
            "loss_adv": float(loss_adv.detach()),
            "loss_inverse": float(loss_inv.detach()),
            "acc_adv": accuracy(logits_adv, y),
            "acc_inverse": accuracy(logits_inv, y),
        }
        return Output(loss, logits_adv, logs)


# ----------------------------------------------------------------------------- UIAT (per sample)
@METHODS.register("uiat")
class UIAT(_UIATBase):
    """UIAT: PGD adversaries pulled toward per-sample inverse adversaries (Dong et al. 2023).

    ``x_adv = PGD(x, y; eps)`` maximises the CE; ``x_inv = PGD(x, y; eps_inv, minimize=True)``
    minimises it; ``loss = CE(f(x_adv), y) + beta * KL(f(x_adv) || f(x_inv))``. See the module
    docstring for the choices made where the paper's text is not available here.

    Args:
        eps: adversarial budget in [0,1] pixel units (default 8/255).
        steps: PGD steps of the adversary (>= 1).
        step_size: adversary's step; default ``2.5 * eps / steps``.
        eps_inv: inverse budget; default ``eps / 2``.
        inv_steps: steps of the inverse attack; default ``steps``.
        inv_step_size: inverse step; default ``2.5 * eps_inv / inv_steps``.
        beta: weight of the KL term (>= 0; 0 is PGD-AT).
        kl_direction: ``"adv_inv"`` (README) or ``"inv_adv"``.
        detach_inverse: stop gradients through the inverse branch.
        norm: ``"linf"`` or ``"l2"``.
        attack_mode: model mode while crafting, ``"eval"`` or ``"train"``.

    Logs: ``loss_adv``, ``loss_inverse`` (KL before beta), ``acc_adv``, ``acc_inverse``.
    ``Output.logits`` are the adversarial logits.

    Shapes: ``x`` (B,C,H,W) in [0,1], ``y`` (B,); ``Output.logits`` (B,K).

    Example:
        >>> import torch, aal
        >>> from aal.methods import create_method
        >>> method = create_method("uiat", eps=0.1, steps=3, beta=1.0)
        >>> model = aal.create_model("small_cnn")
        >>> out = method(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
        >>> out.loss.backward()
        >>> sorted(out.logs)
        ['acc_adv', 'acc_inverse', 'loss_adv', 'loss_inverse']
    """

    name = "uiat"

    def __init__(
        self,
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        eps_inv: float | None = None,
        inv_steps: int | None = None,
        inv_step_size: float | None = None,
        beta: float = 1.0,
        kl_direction: str = "adv_inv",
        detach_inverse: bool = False,
        norm: str = "linf",
        attack_mode: str = "eval",
    ) -> None:
        self._common(beta, kl_direction, detach_inverse, norm, attack_mode)
        self.eps, self.steps, self.step_size = check_budget(eps, steps, step_size)
        self.eps_inv = self.eps / 2 if eps_inv is None else check_nonneg("eps_inv", eps_inv)
        self.inv_steps = self.steps if inv_steps is None else check_int("inv_steps", inv_steps)
        self.inv_step_size = (
            2.5 * self.eps_inv / self.inv_steps if inv_step_size is None else check_positive("inv_step_size", inv_step_size)
        )
        self._attack = PGD(self.eps, steps=self.steps, step_size=self.step_size, norm=self.norm, mode=self.attack_mode)
        self._inverse = PGD(
            self.eps_inv, steps=self.inv_steps, step_size=self.inv_step_size, norm=self.norm, minimize=True,
            mode=self.attack_mode,
        )

    def craft(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """Adversarial examples (PGD on the CE), detached; optional per-pixel budget ``mask``."""
        return self._attack(model, x, y, mask)

    def craft_inverse(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """Inverse adversarial examples (PGD *descending* the CE within ``eps_inv``), detached."""
        return self._inverse(model, x, y, mask)

    def compute(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Output:
        """The method on explicit tensors; ``mask`` (optional) limits both attacks' budgets."""
        x_adv = self.craft(model, x, y, mask)  # first: beta=0 then matches pgd_at's random stream
        x_inv = self.craft_inverse(model, x, y, mask)
        return self.objective(model, x_adv, x_inv, y)

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        x, y = split_batch(batch)
        return self.compute(model, x, y)


# ----------------------------------------------------------------------------- UIAT-FGSM (universal)
class _FixedStart(ThreatModel):
    """A threat model whose "random" start is a given tensor (the universal inverse perturbation)."""

    def __init__(self, base: ThreatModel, start: Tensor) -> None:
        super().__init__(base.eps)
        self.base, self.norm, self.start = base, base.norm, start

    def init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.base.project(self.start.to(dtype=x.dtype, device=x.device))

    def step(self, u: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        return self.base.step(u, grad, step_size)

    def project(self, u: Tensor) -> Tensor:
        return self.base.project(u)


@METHODS.register("uiat_fgsm")
class UIATFGSM(_UIATBase):
    """UIAT with FGSM adversaries and a universal, class-wise inverse perturbation (Dong et al. 2023).

    Per batch: ``x_adv`` = FGSM-RS (Wong et al. 2020) or FGSM from the inverse start
    (``adv_init``); ``x_inv = clip(x + delta[y], 0, 1)`` with the universal perturbation
    ``delta`` (K, C, H, W); loss ``CE(f(x_adv), y) + beta * KL(f(x_adv) || f(x_inv))``; then
    ``delta[c] <- clip(delta[c] - universal_step * sign(sum_{i: y_i = c} grad_x CE(f(x_inv_i), y_i)),
    -eps_inv, eps_inv)`` for every class ``c`` in the batch (L-inf; for ``norm="l2"`` the step is
    along the normalised gradient and the projection onto the L2 ball).

    ``delta`` is method state (:meth:`state_dict`, saved in checkpoints with the model); under
    ``torch.distributed`` the class sums are all-reduced, so every process keeps the same. Its size
    is inferred from the first batch (``K`` from the logits, ``C,H,W`` from the images) unless
    ``num_classes`` is given; it starts at zero.

    Args:
        eps: adversarial budget (default 8/255).
        alpha: FGSM step; default ``1.25 * eps`` (Wong et al. 2020).
        eps_inv: universal inverse budget; default ``eps / 2``.
        universal_step: step of the universal update; default ``eps_inv / 4``.
        beta: weight of the KL term (>= 0; 0 is FGSM-AT with ``adv_init="random"``).
        kl_direction: ``"adv_inv"`` (README) or ``"inv_adv"``.
        detach_inverse: stop gradients through the inverse branch.
        adv_init: ``"random"`` (FGSM-RS start) or ``"inverse"`` (start at ``delta[y]``).
        num_classes: size of ``delta``'s first axis (0: infer from the first batch's logits).
        norm: ``"linf"`` or ``"l2"``.
        attack_mode: model mode while crafting and computing the universal gradient.

    Logs: ``loss_adv``, ``loss_inverse``, ``acc_adv``, ``acc_inverse``, ``universal_linf`` (mean
    over the batch's classes of ``max |delta_c|``).

    Example:
        >>> import torch, aal
        >>> from aal.methods import create_method
        >>> method = create_method("uiat_fgsm", eps=0.1, num_classes=10)
        >>> model = aal.create_model("small_cnn")
        >>> out = method(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
        >>> float(method.universal.abs().max()) <= 0.05 + 1e-7   # projected to eps_inv = eps / 2
        True
    """

    name = "uiat_fgsm"

    def __init__(
        self,
        eps: float = 8 / 255,
        alpha: float | None = None,
        eps_inv: float | None = None,
        universal_step: float | None = None,
        beta: float = 1.0,
        kl_direction: str = "adv_inv",
        detach_inverse: bool = False,
        adv_init: str = "random",
        num_classes: int = 0,
        norm: str = "linf",
        attack_mode: str = "eval",
    ) -> None:
        self._common(beta, kl_direction, detach_inverse, norm, attack_mode)
        self.eps = check_nonneg("eps", eps)
        self.alpha = 1.25 * self.eps if alpha is None else check_nonneg("alpha", alpha)
        self.eps_inv = self.eps / 2 if eps_inv is None else check_nonneg("eps_inv", eps_inv)
        self.universal_step = self.eps_inv / 4 if universal_step is None else check_nonneg("universal_step", universal_step)
        self.adv_init = check_choice("adv_init", adv_init, ADV_INITS)
        self.num_classes = check_int("num_classes", num_classes, low=0)
        # FGSM-RS exactly as fgsm_at builds it, so beta=0 reproduces fgsm_at
        self._attack = PGD(self.eps, steps=1, step_size=self.alpha, rand_init=True, norm=self.norm, mode=self.attack_mode)
        self._universal_threat = THREATS[self.norm](self.eps_inv)
        self._universal: Tensor | None = None

    # -- the universal perturbation ----------------------------------------------------------
    @property
    def universal(self) -> Tensor | None:
        """The class-wise universal inverse perturbation (K, C, H, W), or ``None`` before the first batch."""
        return self._universal

    def _ensure_universal(self, x: Tensor, num_classes: int) -> Tensor:
        shape = (num_classes, *x.shape[1:])
        if self._universal is None:
            self._universal = torch.zeros(shape, dtype=x.dtype, device=x.device)
        elif tuple(self._universal.shape) != shape:
            raise ValueError(
                f"uiat_fgsm: the universal perturbation has shape {tuple(self._universal.shape)} but this batch "
                f"needs {shape} (classes, C, H, W); set num_classes or start a fresh method"
            )
        elif self._universal.device != x.device or self._universal.dtype != x.dtype:
            self._universal = self._universal.to(device=x.device, dtype=x.dtype)
        return self._universal

    def inverse_examples(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """``clip(x + mask * delta[y], 0, 1)``, detached (requires an initialised ``universal``)."""
        if self.universal is None:
            raise RuntimeError("the universal inverse perturbation is not initialised yet (call the method on a batch)")
        if int(y.max()) >= self.universal.shape[0]:
            raise ValueError(f"label {int(y.max())} out of range for {self.universal.shape[0]} classes")
        return self._universal_threat.apply(x, self.universal[y], mask).detach()

    @torch.no_grad()
    def _update_universal(self, model: nn.Module, x_inv: Tensor, y: Tensor, mask: Tensor | None) -> None:
        with attack_mode(model, self.attack_mode), torch.enable_grad():
            xi = x_inv.detach().requires_grad_(True)
            loss = F.cross_entropy(model(xi), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, xi)
        if mask is not None:
            g = g * mask
        delta = self.universal
        assert delta is not None
        summed = torch.zeros_like(delta).index_add_(0, y, g)
        counts = torch.bincount(y, minlength=delta.shape[0])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every process sees a shard of the batch: sum over all of them, so that the
            # universal perturbation stays identical on every rank
            torch.distributed.all_reduce(summed)
            torch.distributed.all_reduce(counts)
        present = counts > 0
        # descent (minimise the CE), then back onto the eps_inv ball
        stepped = self._universal_threat.project(self._universal_threat.step(delta, -summed, self.universal_step))
        self._universal = torch.where(present.view(-1, *([1] * (delta.dim() - 1))), stepped, delta)

    # -- the method --------------------------------------------------------------------------
    def craft(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """FGSM adversarial examples (random or inverse start), detached."""
        if self.adv_init == "random" or self._universal is None:
            return self._attack(model, x, y, mask)
        start = self._universal[y]
        attack = IterativeAttack(self.eps, steps=1, step_size=self.alpha, rand_init=True, norm=self.norm, mode=self.attack_mode)
        attack.threat = _FixedStart(attack.threat, start)
        return attack(model, x, y, mask)

    def compute(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Output:
        """The method on explicit tensors; ``mask`` limits the adversary and the inverse perturbation."""
        k = self.num_classes or (self._universal.shape[0] if self._universal is not None else self._infer_classes(model, x))
        self._ensure_universal(x, k)
        x_adv = self.craft(model, x, y, mask)  # first: beta=0 then matches fgsm_at's random stream
        x_inv = self.inverse_examples(x, y, mask)
        out = self.objective(model, x_adv, x_inv, y)
        self._update_universal(model, x_inv, y, mask)
        present = torch.unique(y)
        out.logs["universal_linf"] = float(self.universal[present].flatten(1).abs().amax(1).mean())  # type: ignore[index]
        return out

    @torch.no_grad()
    def _infer_classes(self, model: nn.Module, x: Tensor) -> int:
        # one forward on one image, once: the number of outputs sizes the universal perturbation
        with attack_mode(model, self.attack_mode):
            return int(model(x[:1]).shape[1])

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        x, y = split_batch(batch)
        return self.compute(model, x, y)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """``{"universal": (K,C,H,W)}`` once initialised, else ``{}``."""
        return {} if self.universal is None else {"universal": self.universal.detach().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (an empty state resets to "not initialised")."""
        unknown = set(state) - {"universal"}
        if unknown:
            raise ValueError(f"uiat_fgsm: unexpected state keys {sorted(unknown)}")
        u = state.get("universal")
        if u is not None and (u.dim() < 2 or (self.num_classes and u.shape[0] != self.num_classes)):
            raise ValueError(f"uiat_fgsm: universal perturbation of shape {tuple(u.shape)} does not fit num_classes={self.num_classes}")
        self._universal = None if u is None else u.detach().clone()


__all__ = ["ADV_INITS", "KL_DIRECTIONS", "UIAT", "UIATFGSM", "consistency_kl"]
