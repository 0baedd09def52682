"""Associative Adversarial Learning (AAL, seed 001): training on selectively attacked inputs.

One training step (Alg. 1, ``schedule="joint"``):

1. *First inference + back-propagation* (one clean forward, one backward w.r.t. the input and
   the attention map only; no parameter gradients): the clean map M, ``dG/dx`` and ``dG/dM``,
   hence the associative attention M^a (Eqs. 12-14, :func:`aal.attention.associative_attention`).
2. *Selective attack* (Eq. 3): ``x' = clip(x + k(M^a) o delta, 0, 1)`` with the kernel ``k``
   (:data:`aal.attention.KERNELS`). For ``attack="fgsm"``, ``delta = eps * sign(dG/dx)`` is
   taken from the *same* clean backward (no extra pass); for ``attack="pgd"``, ``delta`` comes
   from :class:`aal.attacks.PGD` run with the per-pixel budget ``mask = k(M^a)``.
3. *Second inference + back-propagation*: cross-entropy on ``x'`` (Eq. 4), which the trainer
   back-propagates to update the weights.

So AAL+FGSM costs what FGSM-AT costs (one input-gradient pass, one training pass) plus a sort
of ``h*w`` scores per image; ``coupling="finite-difference"`` adds one input-gradient pass.

Registered names: ``"aal"`` (with ``attack="fgsm"|"pgd"``), and the presets ``"aal_fgsm"`` and
``"aal_pgd"`` (the same class with ``attack`` fixed).

Example:
    >>> import torch, aal
    >>> from aal.methods import create_method
    >>> model = aal.create_model("small_cnn", attention="cbam")
    >>> method = create_method("aal_fgsm", eps=0.1)
    >>> out = method(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
    >>> out.loss.backward()
    >>> sorted(out.logs)
    ['acc_adv', 'backtracked_frac', 'loss_adv', 'm_a_mean', 'm_mean', 'm_std', 'mask_mean', 'mask_std', 'trigger_frac']
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from aal.attention.associative import AssocResult
from aal.methods.adversarial import accuracy, check_choice, check_fraction
from aal.methods.aal_core import (  # noqa: F401 (binarize_mask, control_mask: re-exported)
    AAL_ATTACKS,
    MASK_CONTROLS,
    UsesAALCore,
    binarize_mask,
    control_mask,
    map_diagnostics,
)
from aal.methods.base import METHODS, Batch, Method, Output, compose_signature, split_batch

ADV_ATTENTION = ("recompute", "fixed")
SCHEDULES = ("joint", "clean_then_adv")


@METHODS.register("aal")
class AAL(UsesAALCore, Method):
    """Associative Adversarial Learning: adversarial training on attention-selective attacks.

    Paper: "Associative Adversarial Learning Based on Selective Attack" (seed 001), Sec. 3 and
    Alg. 1: ``x' = x + k(M^a) o delta`` (Eq. 3) with the associative attention M^a (Eqs. 5-14),
    then the cross-entropy on ``x'``. The model needs a spatial attention layer
    (``create_model(..., attention="cbam")``: CBAM after the first convolution, as the paper).

    Choices (paper vs. here; the associative-attention choices are documented in
    :mod:`aal.attention.associative`):

    * ``coupling="indicator"`` by default: it is what the public implementation runs, costs no
      extra pass (AAL+FGSM stays at FGSM-AT's cost) and is numerically stable; the paper's
      finite-difference reading of Eq. 13 is ``coupling="finite-difference"`` (one extra
      input-gradient pass; a sign perturbation makes its estimate coarse).
    * ``adv_attention="recompute"`` by default: Alg. 1's second inference is an ordinary forward
      pass on ``x'``, so the attention layer is trained by the adversarial loss. ``"fixed"``
      (the public code) holds the map at M^a in the adversarial passes (training pass and, for
      PGD, the attack's passes) via ``attention_map``; the attention layer then gets gradients
      only from a clean term, so ``fixed`` with ``schedule="joint"`` and ``clean_weight=0``
      warns that the attention layer is never trained.
    * ``schedule="joint"`` (Alg. 1: one weight update per batch). ``"clean_then_adv"`` is the
      public code's schedule: :meth:`steps` yields a clean step (CE on ``x``) and then an
      adversarial step, two optimizer updates per batch. M^a (and FGSM's ``delta``) are
      computed before the clean update, from the same weights as the public code's clean
      backward (here by a separate input-gradient pass in ``attack_mode``); PGD runs after
      the clean update.
    * ``rand_init`` with FGSM (off by default, as Alg. 1): ``u0 ~ U[-eps, eps]``, then
      ``u = clip(u0 + alpha * sign(dG/dx), -eps, eps)`` with the gradient of the *clean* pass
      (no extra pass; Wong et al.'s FGSM-RS takes the gradient at the random start instead),
      then ``x' = x + k o u``.
    * The clean term follows :class:`~aal.methods.adversarial.AdversarialTraining`:
      ``loss = (1 - w) * CE(f(x'), y) + w * CE(f(x), y)``.
    * Controls (not in the paper; to attribute a gain to *where* AAL attacks rather than to
      attacking less, since ``k(M^a)`` shrinks the mean budget): ``mask_control="uniform"``
      replaces the budget by its per-image mean (same mean budget, no selectivity) and
      ``"shuffle"`` permutes its pixels at random within each image (same values and mean,
      location destroyed; the permutation comes from torch's global RNG, so a seeded run is
      reproducible). Only the budget mask changes: M^a (and the ``"fixed"`` map override) is
      untouched. ``mask_binarize=f`` turns the budget into a binary mask: the top ``f``
      fraction of pixels of ``k(M^a)`` at the full ``eps``, the rest unattacked; it is applied
      before the control (so ``mask_binarize=f, mask_control="uniform"`` is ``f * eps``
      everywhere).
    * Public code preset: ``schedule="clean_then_adv", adv_attention="fixed", kernel="M",
      coupling="indicator", rho=0.01, xi2=0.05, attack_mode="train"`` (its gradients come from
      the clean training step, in train mode).

    Args:
        eps: L-inf budget in [0,1] pixel units (default 8/255; Fashion-MNIST configs use 0.1).
        attack: ``"fgsm"`` (AAL+FGSM) or ``"pgd"`` (AAL+PGD).
        xi1: step of the map's gradient descent, Eq. 12 (Alg. 1: 0.1).
        xi2: backtracking rate, Eq. 13 (paper: 0.1; public code: 0.05).
        zeta: fraction of pixels (the most perturbed) where backtracking triggers, Eq. 14.
        coupling: ``"indicator"`` or ``"finite-difference"``.
        rho: indicator coupling's top fraction (public code: 0.01).
        kernel: registered kernel name: ``"M2"`` (default; classification/detection), ``"M"``,
            ``"1-M2"`` (background; few-shot), ``"one"`` (non-selective ablation).
        rand_init: random start (default: False for FGSM, True for PGD).
        alpha: FGSM step with ``rand_init`` (default ``1.25 * eps``; ``eps`` without).
        steps: PGD iterations (default 10; PGD only).
        step_size: PGD step (default ``2.5 * eps / steps``; PGD only).
        adv_attention: ``"recompute"`` or ``"fixed"`` (see above).
        clean_weight: weight ``w`` in [0,1] of the clean CE (``schedule="joint"`` only).
        schedule: ``"joint"`` or ``"clean_then_adv"``.
        attack_mode: model mode while computing M^a and crafting: ``"eval"`` or ``"train"``.
        mask_control: ``"none"`` (default), ``"shuffle"`` or ``"uniform"`` (control budgets, see
            above and :func:`control_mask`).
        mask_binarize: ``None`` (default) or a fraction in (0,1]: keep the top fraction of
            ``k(M^a)`` at 1 (full ``eps``) and set the rest to 0 (:func:`binarize_mask`).
        align: how M^a is placed on the input when the map's resolution differs from the
            image's: ``"receptive_field"`` (default) or ``"resize"`` (a bilinear stretch); see
            :mod:`aal.attention.associative`.

    Logs (averaged per epoch by the trainer; they tell whether a run tested selectivity at all):
    ``loss_adv``, ``acc_adv``, ``mask_mean`` (mean of the budget ``k(M^a)``), ``mask_std``
    (per-image standard deviation of the budget, averaged over images: 0 for a uniform budget),
    ``m_mean``, ``m_std`` (per-image std of the clean map M), ``m_a_mean``, ``trigger_frac``
    (fraction of map pixels where the trigger fires) and ``backtracked_frac`` (fraction of map
    pixels that backtracking actually moved: triggered, non-zero coupling and ``xi2 > 0``);
    ``loss_clean``/``acc_clean`` when a clean term is used.

    Shapes: ``x`` (B,C,H,W) in [0,1], ``y`` (B,); ``Output.logits`` (B,K) on ``x'``.
    """

    name = "aal"

    def __init__(
        self, adv_attention: str = "recompute", clean_weight: float = 0.0, schedule: str = "joint", **core: Any
    ) -> None:
        # the settings of the AAL step itself (eps, attack, xi1, ... align: AALCore's list, which the
        # signature shows; read as self.eps, self.kernel, ...: UsesAALCore)
        self.core = self.make_core(core)
        self.adv_attention = check_choice("adv_attention", adv_attention, ADV_ATTENTION)
        self.clean_weight = check_fraction("clean_weight", clean_weight)
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        if self.schedule == "clean_then_adv" and self.clean_weight > 0:
            raise ValueError("clean_weight applies to schedule='joint' only: 'clean_then_adv' already takes a clean step")
        if self.adv_attention == "fixed" and self.schedule == "joint" and self.clean_weight == 0:
            warnings.warn(
                "AAL with adv_attention='fixed', schedule='joint' and clean_weight=0: the attention layer gets no "
                "gradient (its map is replaced by M^a in every training pass) and keeps its initial weights; use "
                "schedule='clean_then_adv' (public code), clean_weight > 0 or adv_attention='recompute'",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------------- pieces
    def associate(self, model: nn.Module, x: Tensor, y: Tensor) -> AssocResult:
        """The associative attention of ``x`` (:meth:`AALCore.associate`, cross-entropy)."""
        return self.core.associate(model, x, y)

    def budget(self, res: AssocResult) -> Tensor:
        """The per-pixel budget ``k(M^a)`` (B,1,H,W) in [0,1] (binarized / controlled if asked)."""
        return self.core.budget(res)

    def _map(self, res: AssocResult) -> Tensor | None:
        """The ``attention_map`` override of the adversarial passes (None: recompute)."""
        # a model without attention (kernel "one" only) has no map to hold fixed
        return res.m_a if (self.adv_attention == "fixed" and res.has_attention) else None

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, res: AssocResult, mask: Tensor) -> Tensor:
        """The selectively attacked ``x'`` (B,C,H,W) in [0,1], detached, given M^a's budget ``mask``."""
        return self.core.perturb(model, x, y, res, mask, attention_map=self._map(res))

    def craft(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, AssocResult, Tensor]:
        """``(x', associative result, mask k(M^a))`` for clean ``x`` (used by training and :mod:`aal.viz`)."""
        x_adv, diag = self.core.craft(model, x, y, hold_map=self.adv_attention == "fixed")
        return x_adv, diag.res, diag.mask

    def _map_logs(self, res: AssocResult, mask: Tensor) -> dict[str, float]:
        return map_diagnostics(res, mask, self.xi2)

    def _adversarial(self, model: nn.Module, x_adv: Tensor, y: Tensor, res: AssocResult) -> tuple[Tensor, Tensor]:
        logits = model(x_adv, attention_map=self._map(res))
        return F.cross_entropy(logits, y), logits

    # ------------------------------------------------------------------------- the method
    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        if self.schedule != "joint":
            raise RuntimeError(
                "AAL with schedule='clean_then_adv' takes two optimizer steps per batch: use method.updates()"
            )
        x, y = split_batch(batch)
        x_adv, res, mask = self.craft(model, x, y)
        loss_adv, logits_adv = self._adversarial(model, x_adv, y, res)
        logs = {"loss_adv": float(loss_adv.detach()), "acc_adv": accuracy(logits_adv, y), **self._map_logs(res, mask)}
        loss = loss_adv
        if self.clean_weight > 0:
            logits_clean = model(x)
            loss_clean = F.cross_entropy(logits_clean, y)
            loss = (1.0 - self.clean_weight) * loss_adv + self.clean_weight * loss_clean
            logs.update(loss_clean=float(loss_clean.detach()), acc_clean=accuracy(logits_clean, y))
        return Output(loss, logits_adv, logs)

    def updates(self, model: nn.Module, batch: Batch) -> Iterator[Output]:
        """One step (``"joint"``) or a clean step then an adversarial step (``"clean_then_adv"``)."""
        if self.schedule == "joint":
            yield self(model, batch)
            return
        x, y = split_batch(batch)
        res = self.associate(model, x, y)  # before the clean update, like the public code
        mask = self.budget(res)
        logits_clean = model(x)
        loss_clean = F.cross_entropy(logits_clean, y)
        logs = {"loss_clean": float(loss_clean.detach()), "acc_clean": accuracy(logits_clean, y)}
        yield Output(loss_clean, logits_clean, logs)
        # the trainer has now updated the weights; PGD (if used) runs against the updated model
        x_adv = self.perturb(model, x, y, res, mask)
        loss_adv, logits_adv = self._adversarial(model, x_adv, y, res)
        logs = {"loss_adv": float(loss_adv.detach()), "acc_adv": accuracy(logits_adv, y), **self._map_logs(res, mask)}
        yield Output(loss_adv, logits_adv, logs)


def _preset(attack: str, registered: str, doc: str) -> type[AAL]:
    """A subclass of :class:`AAL` with ``attack`` fixed; its signature (for config validation) omits it."""

    def __init__(self, **params: Any) -> None:
        if "attack" in params:
            raise ValueError(f"{registered!r} fixes attack={attack!r}; use method 'aal' to choose the attack")
        AAL.__init__(self, **params)

    body = {"__init__": __init__, "name": registered, "__doc__": doc, "__module__": __name__,
            "core_fixed": {"attack": attack}}  # fmt: skip
    cls = type(f"AAL{attack.upper()}", (AAL,), body)
    compose_signature(cls.__init__, AAL.__init__, exclude=("attack",))  # AAL's arguments without the fixed attack
    return METHODS.register(registered)(cls)


AALFGSM = _preset(
    "fgsm",
    "aal_fgsm",
    """AAL+FGSM (seed 001, Table 2): AAL with a single FGSM step from the clean gradient.

    :class:`AAL` with ``attack="fgsm"`` fixed; all other arguments as :class:`AAL`.

    Example:
        >>> import torch, aal
        >>> model = aal.create_model("small_cnn", attention="cbam")
        >>> out = AALFGSM(eps=0.1)(model, (torch.rand(2, 1, 28, 28), torch.tensor([0, 1])))
    """,
)
AALPGD = _preset(
    "pgd",
    "aal_pgd",
    """AAL+PGD (seed 001, Tables 2-3): AAL with PGD restricted to the budget k(M^a).

    :class:`AAL` with ``attack="pgd"`` fixed; all other arguments as :class:`AAL`.

    Example:
        >>> import torch, aal
        >>> model = aal.create_model("small_cnn", attention="cbam")
        >>> out = AALPGD(eps=0.1, steps=3)(model, (torch.rand(2, 1, 28, 28), torch.tensor([0, 1])))
    """,
)

__all__ = [
    "AAL", "AALFGSM", "AALPGD", "ADV_ATTENTION", "AAL_ATTACKS", "MASK_CONTROLS", "SCHEDULES", "binarize_mask",
    "control_mask", "map_diagnostics",
]  # fmt: skip
