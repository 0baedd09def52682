"""AToP training stages (seed 002): purifier pre-training and adversarial fine-tuning.

Both methods train the purifier ``g`` of a :class:`aal.models.purifier.PurifiedClassifier`
``f(g(t(x)))`` (the model ``atop`` of the registry) through the one trainer; the classifier
``f`` is frozen (its parameters have ``requires_grad=False``, checked at every call, so the
optimizer — built over trainable parameters — never sees it, and no gradient reaches it).

* ``atop_pretrain`` (stage 1, RT): ``L = rec(g(t(x)), x)`` — the purifier learns to undo the
  random transform. The public code trains DeepFill-v2 with its L1 losses plus a GAN loss; the
  GAN term is not implemented here (``recon_loss`` is ``"l1"``, default, or ``"mse"``).
* ``atop_finetune`` (stage 2, FT): ``L = rec(g(t(x_rec)), x) + ce_weight * CE(f(g(t(x_adv))), y)``
  (paper: ``lambda`` ~ 0.05-0.1; public code 0.05, added after 2 warm-up epochs:
  ``ce_warmup_epochs``). ``x_rec`` is the clean ``x`` (``recon_input="clean"``, default) or
  ``x_adv`` (``"adversarial"``: denoise the attacked image back to the clean one; then the
  purified adversarial batch is shared by both terms).

``attack_target`` chooses the model the adversarial examples are crafted against:

* ``"pipeline"`` (default): the whole defence ``f(g(t(.)))``, with gradients through the
  purifier and a fresh transform draw at every step — the threat model an honest evaluation
  uses;
* ``"classifier"``: the frozen classifier ``f`` alone, as the public code does (FGSM at
  8/255 there: ``steps=1, rand_init=False``; ``configs/fashion_mnist/atop_finetune_public.yaml``);
  cheaper, but the purifier then only learns to remove perturbations that transfer from the
  classifier. (In the public ``cifar-miss-gau-adv`` notebook the reconstruction target is also
  overwritten by the FGSM image, ``batch_real = batch_adv``; not reproduced here.)

The purifier is a small U-Net or auto-encoder trained with L1 (or MSE) only; the paper's
DeepFill-v2 generator and its GAN loss are not reproduced (what that costs in robustness is not
measured). RT3 (several transform draws combined) is a property of the model
(:meth:`aal.models.purifier.PurifiedClassifier.purify`, ``mix``/``mix_mode``), so both stages and
every evaluation see it.

The attack is PGD on the CE (``steps``, ``step_size``, ``rand_init``), in ``attack_mode``.

Example:
    >>> import torch, aal
    >>> from aal.methods import create_method
    >>> from aal.models.purifier import build_atop_model
    >>> model = build_atop_model(aal.create_model("small_cnn"), "purifier_ae", in_channels=1,
    ...                          purifier_options={"width": 8})
    >>> out = create_method("atop_finetune", eps=0.1, steps=2)(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
    >>> out.loss.backward()
    >>> all(p.grad is None for p in model.classifier.parameters())
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aal.attacks import PGD
from aal.attacks.base import THREATS
from aal.methods.adversarial import (
    ATTACK_MODES,
    accuracy,
    check_choice,
    check_int,
    check_nonneg,
    check_positive,
)
from aal.methods.base import METHODS, Batch, Method, Output, split_batch
from aal.models.purifier import PurifiedClassifier

RECON_LOSSES = ("l1", "mse")
ATTACK_TARGETS = ("pipeline", "classifier")
RECON_INPUTS = ("clean", "adversarial")


def reconstruction_loss(x_hat: Tensor, x: Tensor, kind: str = "l1") -> Tensor:
    """Mean absolute (``"l1"``) or squared (``"mse"``) error between purified and clean images."""
    if kind == "l1":
        return (x_hat - x).abs().mean()
    if kind == "mse":
        return F.mse_loss(x_hat, x)
    raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {kind!r}")


def purified_pipeline(model: nn.Module) -> PurifiedClassifier:
    """``model`` as a :class:`PurifiedClassifier` (unwrapping DDP), with its classifier frozen.

    Raises:
        TypeError: the model is not a purification pipeline.
        ValueError: a classifier parameter requires gradients (AToP's classifier is frozen).
    """
    inner = getattr(model, "module", model)
    if not isinstance(inner, PurifiedClassifier):
        raise TypeError(
            "atop methods train the purifier of a PurifiedClassifier: build the model with "
            "aal.models.purifier.build_atop_model(...) or, in a config, model.name=atop"
        )
    if any(p.requires_grad for p in inner.classifier.parameters()):
        raise ValueError("AToP's classifier must be frozen: its parameters have requires_grad=True")
    return inner


@METHODS.register("atop_pretrain")
class AToPPretrain(Method):
    """AToP stage 1: train the purifier to reconstruct ``x`` from ``t(x)`` (classifier untouched).

    ``loss = rec(g(t(x)), x)``. The frozen classifier only reports the training accuracy on the
    purified images (computed without gradients).

    Args:
        recon_loss: ``"l1"`` (public code) or ``"mse"``.

    Logs: ``loss_rec``, ``acc_purified`` (frozen classifier on ``g(t(x))``).
    ``Output.logits``: the classifier's logits on the purified clean images.

    Example:
        >>> import torch, aal
        >>> from aal.methods import create_method
        >>> from aal.models.purifier import build_atop_model
        >>> model = build_atop_model(aal.create_model("small_cnn"), "purifier_ae", in_channels=1)
        >>> out = create_method("atop_pretrain")(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
        >>> out.loss.backward()
        >>> sorted(out.logs)
        ['acc_purified', 'loss_rec']
    """

    name = "atop_pretrain"

    def __init__(self, recon_loss: str = "l1") -> None:
        self.recon_loss = check_choice("recon_loss", recon_loss, RECON_LOSSES)

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        x, y = split_batch(batch)
        pipe = purified_pipeline(model)
        x_hat = pipe.purify(x)
        loss = reconstruction_loss(x_hat, x, self.recon_loss)
        with torch.no_grad():
            logits = pipe.classifier(x_hat)
        return Output(loss, logits, {"loss_rec": float(loss.detach()), "acc_purified": accuracy(logits, y)})


@METHODS.register("atop_finetune")
class AToPFinetune(Method):
    """AToP stage 2: ``rec(g(t(x)), x) + ce_weight * CE(f(g(t(x_adv))), y)``, ``f`` frozen.

    See the module docstring for the options' meaning and the public code's settings.

    Args:
        eps: budget of the adversarial examples (default 8/255; Fashion-MNIST configs 0.1).
        steps: PGD steps (>= 1; public code: FGSM, i.e. ``steps=1, rand_init=False``).
        step_size: PGD step; default ``2.5 * eps / steps`` (``eps`` when ``steps=1`` without a
            random start, i.e. FGSM).
        rand_init: uniform random start in the ball.
        ce_weight: ``lambda``, weight of the classification term (>= 0; public code 0.05).
        attack_target: ``"pipeline"`` (default) or ``"classifier"``.
        recon_loss: ``"l1"`` or ``"mse"``.
        recon_input: ``"clean"`` (default) or ``"adversarial"``.
        ce_warmup_epochs: epochs at the start with ``ce_weight = 0`` (public code: 2).
        norm: ``"linf"`` or ``"l2"``.
        attack_mode: model mode while crafting, ``"eval"`` or ``"train"``.

    Logs: ``loss_rec``, ``loss_ce``, ``acc_adv`` (the pipeline on ``x_adv``).
    ``Output.logits``: the logits on the purified adversarial examples.

    Shapes: ``x`` (B,C,H,W) in [0,1], ``y`` (B,); ``Output.logits`` (B,K).
    """

    name = "atop_finetune"

    def __init__(
        self,
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        rand_init: bool = True,
        ce_weight: float = 0.05,
        attack_target: str = "pipeline",
        recon_loss: str = "l1",
        recon_input: str = "clean",
        ce_warmup_epochs: int = 0,
        norm: str = "linf",
        attack_mode: str = "eval",
    ) -> None:
        self.eps = check_nonneg("eps", eps)
        self.steps = check_int("steps", steps)
        self.rand_init = bool(rand_init)
        if step_size is None:
            step_size = self.eps if (self.steps == 1 and not self.rand_init) else 2.5 * self.eps / self.steps
        else:
            step_size = check_positive("step_size", step_size)
        self.step_size = float(step_size)
        self.ce_weight = check_nonneg("ce_weight", ce_weight)
        self.attack_target = check_choice("attack_target", attack_target, ATTACK_TARGETS)
        self.recon_loss = check_choice("recon_loss", recon_loss, RECON_LOSSES)
        self.recon_input = check_choice("recon_input", recon_input, RECON_INPUTS)
        self.ce_warmup_epochs = check_int("ce_warmup_epochs", ce_warmup_epochs, low=0)
        self.norm = check_choice("norm", norm, tuple(THREATS))
        self.attack_mode = check_choice("attack_mode", attack_mode, ATTACK_MODES)
        self._attack = PGD(
            self.eps, steps=self.steps, step_size=self.step_size, rand_init=self.rand_init, norm=self.norm,
            mode=self.attack_mode,
        )
        self._epoch = 0

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Remember the epoch for the CE warm-up."""
        self._epoch = int(epoch)

    @property
    def current_ce_weight(self) -> float:
        """``ce_weight``, or 0 during the first ``ce_warmup_epochs`` epochs."""
        return 0.0 if self._epoch < self.ce_warmup_epochs else self.ce_weight

    def craft(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """Adversarial examples against the pipeline or the classifier alone (``attack_target``)."""
        pipe = purified_pipeline(model)
        target = pipe if self.attack_target == "pipeline" else pipe.classifier
        return self._attack(target, x, y, mask)

    def compute(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Output:
        """The method on explicit tensors, with an optional per-pixel budget ``mask``."""
        pipe = purified_pipeline(model)
        x_adv = self.craft(model, x, y, mask)
        x_hat_adv = pipe.purify(x_adv)
        logits_adv = pipe.classifier(x_hat_adv)
        loss_ce = F.cross_entropy(logits_adv, y)
        x_hat = pipe.purify(x) if self.recon_input == "clean" else x_hat_adv
        loss_rec = reconstruction_loss(x_hat, x, self.recon_loss)
        loss = loss_rec + self.current_ce_weight * loss_ce
        logs = {"loss_rec": float(loss_rec.detach()), "loss_ce": float(loss_ce.detach()), "acc_adv": accuracy(logits_adv, y)}
        return Output(loss, logits_adv, logs)

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        x, y = split_batch(batch)
        return self.compute(model, x, y)


__all__ = ["ATTACK_TARGETS", "AToPFinetune", "AToPPretrain", "RECON_INPUTS", "RECON_LOSSES", "purified_pipeline", "reconstruction_loss"]
