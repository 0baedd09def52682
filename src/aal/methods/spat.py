"""SPAT (seed 004): self-paced hard-class-pair reweighting on cosine logits.

Paper: Hou, Han & Li, "Improving Adversarial Robustness with Self-Paced Hard-Class Pair
Reweighting", AAAI 2023 (arXiv 2210.15068); details from the public facts in
``shared/seeds/README.md`` and the official code (github.com/puerrrr/Self-Paced-Adversarial-Training,
``spat.py``), re-implemented here.

The model has a **cosine head** (:class:`CosineHead`): L2-normalised features against
L2-normalised class weights, ``z_k = cos(f(x), w_k)`` in [-1, 1], scaled by ``s`` (8). The
method recovers ``z = logits / s`` from the head's own ``scale``.

* **Self-paced logits** (:func:`sp_logits`, the "hard-class pair reweighting"): the true
  class's logit becomes ``s * (1 + m - z_y) * z_y`` and every other ``s * (z_k + m) * z_k``
  (``m = 0.2``). The factors depend on the model's current confidence: a wrong class close to
  the sample (large ``z_k``: a hard pair) gets a larger weight, a well-separated one a smaller.
* **Reweighted consistency** (:func:`spat_kl`): the elementwise KL terms between
  ``softmax(s z(x))`` and ``softmax(s z(x'))`` are reweighted as ``KL * (KL + n)`` (``n = 0.2``)
  before summing over classes, so classes that move most under attack count more.
* **Loss**: ``CE(sp_logits(z(x)), y) + beta * (1/B) sum_i sum_k KL_ik (KL_ik + n)`` (beta 6).
* **Inner maximisation**: sign-gradient ascent of the same reweighted KL, from
  ``x + 0.001 * N(0, 1)``, model in eval mode, projected to the eps-ball and [0,1] (10 steps of
  0.007 at eps 0.031 in the paper's CIFAR setting).

Switches (tested): ``sp_logits=False`` uses plain ``s * z`` in the CE, ``kl_reweight=False`` the
plain KL; with both off SPAT *is* TRADES on the cosine model (same attack start, same loss).

Choices where the official code differs from a literal cosine head:

* the official WRN normalises the features, re-normalises the ``fc`` weight rows in place at
  every forward, keeps the ``fc`` bias and outputs unscaled ``z`` (the scale is applied inside
  the loss). Here :class:`CosineHead` normalises both functionally (gradients through the
  normalisation), has no bias (so ``z`` is exactly a cosine) and outputs ``s * z``, so that the
  evaluator and every attack see the logits the loss uses.
* the official loss does not detach the self-paced factors; neither does this one.

State: SPAT's loss needs no running statistics (the self-paced weights come from the current
batch). The method keeps, as checkpointed state, the *adversarial confusion matrix* of the
training batches (``confusion[y, argmax f(x')]``, counts), the statistic the paper uses to
exhibit hard class pairs; :meth:`SPAT.hard_pairs` lists them. ``track_confusion=False`` turns it
off. It is diagnostic only and never enters the loss.

Example:
    >>> import torch, aal
    >>> from aal.methods import create_method
    >>> from aal.methods.spat import use_cosine_head
    >>> model = use_cosine_head(aal.create_model("small_cnn"), scale=8.0)
    >>> out = create_method("spat", eps=0.1, steps=3)(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
    >>> out.loss.backward()
    >>> bool(model(torch.rand(2, 1, 28, 28)).abs().max() <= 8.0)
    True
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aal.attacks.base import THREATS
from aal.methods.adversarial import (
    check_budget,
    ATTACK_MODES,
    accuracy,
    check_choice,
    check_nonneg,
)
from aal.methods.base import METHODS, Batch, Method, Output, split_batch
from aal.methods.trades import TradesKLAttack
from aal.models.heads import CosineHead, find_cosine_head, use_cosine_head  # noqa: F401 (re-exported)


# ----------------------------------------------------------------------------- the maths
def sp_logits(z: Tensor, y: Tensor, scale: float, m: float = 0.2) -> Tensor:
    """Self-paced logits: ``s * (1 + m - z_y) * z_y`` for the true class, ``s * (z_k + m) * z_k`` otherwise.

    Args:
        z: cosine logits (B, K) in [-1, 1] (unscaled).
        y: labels (B,).
        scale: ``s``.
        m: margin ``m``.

    Returns:
        (B, K) logits for the cross-entropy.
    """
    onehot = F.one_hot(y, z.shape[1]).to(z.dtype)
    factor = onehot * (1.0 + m - z) + (1.0 - onehot) * (z + m)
    return scale * factor * z


def spat_kl(logits: Tensor, logits_adv: Tensor, n: float = 0.2, reweight: bool = True) -> Tensor:
    """Per-sample consistency ``sum_k KL_k * (KL_k + n)`` (or ``sum_k KL_k`` without ``reweight``).

    ``KL_k = p_k (log p_k - log q_k)`` with ``p = softmax(logits)`` (clean, the target) and
    ``q = softmax(logits_adv)``; ``logits`` are the *scaled* cosine logits ``s * z``.

    Returns:
        (B,) per-sample values.
    """
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="none")
    return (kl * (kl + n)).sum(1) if reweight else kl.sum(1)


class SPATAttack(TradesKLAttack):
    """SPAT's inner maximisation: ascend :func:`spat_kl` from ``x + 0.001 * N(0,1)``.

    Same start, steps and projection as :class:`aal.methods.trades.TradesKLAttack` (the clean
    prediction, computed in the attack's mode without gradients, is the target); only the
    per-sample loss differs. ``reweight=False`` is exactly the TRADES attack.

    Args:
        eps, steps, step_size, sigma, norm, mode, seed: see :class:`TradesKLAttack`.
        n: the reweighting offset ``n``.
        reweight: use ``KL * (KL + n)`` (else the plain KL).
    """

    name = "spat_kl"

    def __init__(self, eps, steps: int = 10, step_size=None, n: float = 0.2, reweight: bool = True, **kwargs) -> None:
        super().__init__(eps, steps=steps, step_size=step_size, **kwargs)
        self.n, self.reweight = float(n), bool(reweight)

        def loss(logits_adv: Tensor, p_clean: Tensor) -> Tensor:
            kl = F.kl_div(F.log_softmax(logits_adv, dim=1), p_clean, reduction="none")
            return (kl * (kl + self.n)).sum(1) if self.reweight else kl.sum(1)

        self.loss_fn = loss


# ----------------------------------------------------------------------------- the method
@METHODS.register("spat")
class SPAT(Method):
    """SPAT: ``CE(sp_logits(z(x)), y) + beta * mean_i sum_k KL_ik (KL_ik + n)`` on a cosine head.

    See the module docstring for the formulas, the official code's details and the choices.

    Args:
        eps: budget in [0,1] pixel units (default 8/255; paper 0.031).
        steps: inner-maximisation steps (>= 1; paper 10).
        step_size: inner step; default ``2.5 * eps / steps`` (paper 0.007 at eps 0.031).
        beta: weight of the consistency term (>= 0; paper 6).
        m: margin of the self-paced logits (paper 0.2).
        n: offset of the KL reweighting ``KL * (KL + n)`` (paper 0.2).
        sp_logits: use the self-paced logits in the CE (``False``: plain ``s * z``).
        kl_reweight: reweight the KL (``False``: plain KL, in the loss and in the attack).
        track_confusion: keep the adversarial confusion matrix as (checkpointed) state.
        norm: ``"linf"`` or ``"l2"``.
        attack_mode: model mode while crafting, ``"eval"`` (official) or ``"train"``.

    The model must have a :class:`CosineHead` (``use_cosine_head``); its ``scale`` is ``s``.

    Logs: ``loss_natural`` (the CE), ``loss_robust`` (consistency before beta), ``acc_clean``,
    ``acc_adv``. ``Output.logits`` are the clean logits ``s * z(x)``.

    Shapes: ``x`` (B,C,H,W) in [0,1], ``y`` (B,); ``Output.logits`` (B,K).

    Example:
        >>> import torch, aal
        >>> from aal.methods import create_method
        >>> model = use_cosine_head(aal.create_model("small_cnn"))
        >>> method = create_method("spat", eps=0.1, steps=2)
        >>> out = method(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
        >>> out.loss.backward()
        >>> int(method.confusion.sum())     # one adversarial prediction per training image
        4
    """

    name = "spat"

    def __init__(
        self,
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        beta: float = 6.0,
        m: float = 0.2,
        n: float = 0.2,
        sp_logits: bool = True,
        kl_reweight: bool = True,
        track_confusion: bool = True,
        norm: str = "linf",
        attack_mode: str = "eval",
    ) -> None:
        self.eps, self.steps, self.step_size = check_budget(eps, steps, step_size)
        self.beta = check_nonneg("beta", beta)
        self.m = check_nonneg("m", m)
        self.n = check_nonneg("n", n)
        self.sp_logits = bool(sp_logits)
        self.kl_reweight = bool(kl_reweight)
        self.track_confusion = bool(track_confusion)
        self.norm = check_choice("norm", norm, tuple(THREATS))
        self.attack_mode = check_choice("attack_mode", attack_mode, ATTACK_MODES)
        self._attack = SPATAttack(
            self.eps, steps=self.steps, step_size=self.step_size, n=self.n, reweight=self.kl_reweight, norm=self.norm,
            mode=self.attack_mode,
        )
        self._confusion: Tensor | None = None

    @property
    def confusion(self) -> Tensor | None:
        """Counts (K, K) of (true class, adversarial prediction) over training batches so far."""
        return self._confusion

    def hard_pairs(self, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` most confused ordered pairs ``(true, predicted, rate)`` under attack.

        ``rate`` is the fraction of class ``true``'s adversarial examples predicted as
        ``predicted`` (off-diagonal entries only).
        """
        if self._confusion is None:
            return []
        c = self._confusion.double()
        rates = c / c.sum(1, keepdim=True).clamp_min(1)
        rates.fill_diagonal_(-1)
        top = rates.flatten().topk(min(k, rates.numel()))
        kk = c.shape[1]
        return [(int(i) // kk, int(i) % kk, float(v)) for v, i in zip(top.values, top.indices) if v > 0]

    def craft(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """SPAT adversarial examples (ascent of the reweighted KL), detached; optional ``mask``."""
        return self._attack(model, x, y, mask)

    def compute(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Output:
        """The method on explicit tensors, with an optional selective budget ``mask``."""
        scale = find_cosine_head(model).scale
        x_adv = self.craft(model, x, y, mask)
        logits = model(x)
        logits_adv = model(x_adv)
        ce_logits = sp_logits(logits / scale, y, scale, self.m) if self.sp_logits else logits
        loss_natural = F.cross_entropy(ce_logits, y)
        loss_robust = spat_kl(logits, logits_adv, self.n, self.kl_reweight).mean()
        loss = loss_natural + self.beta * loss_robust
        if self.track_confusion:
            self._count(y, logits_adv.detach().argmax(1), logits.shape[1])
        logs = {
            "loss_natural": float(loss_natural.detach()),
            "loss_robust": float(loss_robust.detach()),
            "acc_clean": accuracy(logits, y),
            "acc_adv": accuracy(logits_adv, y),
        }
        return Output(loss, logits, logs)

    def _count(self, y: Tensor, pred: Tensor, k: int) -> None:
        if self._confusion is None:
            self._confusion = torch.zeros(k, k, dtype=torch.int64)
        if self._confusion.shape != (k, k):
            raise ValueError(f"spat: confusion matrix is {tuple(self._confusion.shape)} but the model has {k} classes")
        flat = (y.detach().cpu() * k + pred.cpu()).long()
        self._confusion += torch.bincount(flat, minlength=k * k).view(k, k)

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        x, y = split_batch(batch)
        return self.compute(model, x, y)

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """``{"confusion": (K, K) int64}`` once a batch was seen (and tracking is on), else ``{}``."""
        return {} if self._confusion is None else {"confusion": self._confusion.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        unknown = set(state) - {"confusion"}
        if unknown:
            raise ValueError(f"spat: unexpected state keys {sorted(unknown)}")
        c = state.get("confusion")
        if c is not None and (c.dim() != 2 or c.shape[0] != c.shape[1]):
            raise ValueError(f"spat: confusion matrix must be square, got shape {tuple(c.shape)}")
        self._confusion = None if c is None else c.detach().to("cpu", torch.int64).clone()


__all__ = ["CosineHead", "SPAT", "SPATAttack", "find_cosine_head", "sp_logits", "spat_kl", "use_cosine_head"]
