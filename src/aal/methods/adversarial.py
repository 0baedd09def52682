"""Adversarial training baselines: FGSM-AT (Wong et al. 2020) and PGD-AT (Madry et al. 2018).

Both are "craft adversarial examples with an :mod:`aal.attacks` attack, then minimise the
cross-entropy on them". The attack runs inside :func:`aal.attacks.base.attack_mode` (model in
``attack_mode``, parameter gradients off, both restored), so crafting never leaves gradients
on the parameters and never changes the caller's train/eval mode; the training loss is then
computed with the model in whatever mode the caller (the trainer) put it in.

Every adversarial method also offers :meth:`AdversarialTraining.compute` with an optional
per-pixel budget ``mask`` (B,1,H,W) in [0,1], so a selective attack (AAL) can reuse it.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from aal.attacks import PGD
from aal.attacks.base import THREATS, Attack
from aal.methods.base import METHODS, Batch, Method, Output, split_batch

ATTACK_MODES = ("eval", "train")
"""Model modes allowed while crafting: ``"eval"`` (default) or ``"train"``."""


# ----------------------------------------------------------------------------- validation
# Hyper-parameters arrive from YAML configs; a wrong value must fail at construction with the
# argument's name, not deep inside the first training step.
def check_nonneg(name: str, value: float) -> float:
    """``value`` as a float, or ``ValueError`` if it is negative or not finite."""
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_positive(name: str, value: float) -> float:
    """``value`` as a float, or ``ValueError`` if it is not finite and > 0."""
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_fraction(name: str, value: float) -> float:
    """``value`` as a float in [0, 1], or ``ValueError`` naming ``name``."""
    v = check_nonneg(name, value)
    if v > 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return v


def check_budget(eps: float, steps: int, step_size: float | None) -> tuple[float, int, float]:
    """Validated ``(eps, steps, step_size)`` of a PGD-style inner loop.

    ``step_size=None`` gives ``2.5 * eps / steps`` (Madry et al. 2018), i.e. 2/255 for PGD-10 at
    eps 8/255.
    """
    eps = check_nonneg("eps", eps)
    steps = check_int("steps", steps)
    return eps, steps, 2.5 * eps / steps if step_size is None else check_positive("step_size", step_size)


def check_int(name: str, value: int, low: int = 1) -> int:
    """``value`` as an int, or ``ValueError`` if it is not an integer >= ``low``."""
    if isinstance(value, bool) or int(value) != value or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of ``argmax(logits) == y`` as a float (for logs)."""
    return float((logits.detach().argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------- shared base
class AdversarialTraining(Method):
    """Base of "CE on adversarial examples" methods; subclasses set ``self._attack``.

    ``loss = (1 - clean_weight) * CE(f(x'), y) + clean_weight * CE(f(x), y)``, where
    ``x' = attack(model, x, y, mask)``. ``clean_weight = 0`` (default) is pure adversarial
    training (Madry et al. 2018; Wong et al. 2020); ``0.5`` is the mixed objective of Goodfellow
    et al. 2015 (Eq. 6, ``alpha = 0.5``). The clean term uses a separate forward pass, so a
    BatchNorm model sees clean and adversarial batches separately, as in that paper's setup.

    Logs: ``loss_adv``, ``acc_adv`` and, when ``clean_weight > 0``, ``loss_clean``,
    ``acc_clean``. ``Output.logits`` are the logits on ``x'``.
    """

    name = "adversarial"
    _attack: Attack

    def __init__(self, clean_weight: float = 0.0, attack_mode: str = "eval") -> None:
        self.clean_weight = check_nonneg("clean_weight", clean_weight)
        if self.clean_weight > 1:
            raise ValueError(f"clean_weight must lie in [0, 1], got {clean_weight!r}")
        self.attack_mode = check_choice("attack_mode", attack_mode, ATTACK_MODES)

    def craft(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """Adversarial examples ``x'`` (B,C,H,W) in [0,1], detached, for images ``x`` and labels ``y``.

        ``mask`` is an optional per-pixel budget in [0,1] broadcastable to ``x`` (e.g. (B,1,H,W)).
        """
        return self._attack(model, x, y, mask)

    def compute(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Output:
        """The method on explicit tensors, with an optional selective budget ``mask``."""
        return self.objective(model, x, self.craft(model, x, y, mask), y)

    def objective(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Output:
        """The training loss on already crafted examples ``x_adv`` (what :meth:`compute` minimises).

        ``model`` is any callable ``x -> logits`` (AWP evaluates it on perturbed weights).
        """
        logits_adv = model(x_adv)
        loss_adv = F.cross_entropy(logits_adv, y)
        logs = {"loss_adv": float(loss_adv.detach()), "acc_adv": accuracy(logits_adv, y)}
        loss = loss_adv
        if self.clean_weight > 0:
            logits_clean = model(x)
            loss_clean = F.cross_entropy(logits_clean, y)
            loss = (1.0 - self.clean_weight) * loss_adv + self.clean_weight * loss_clean
            logs.update(loss_clean=float(loss_clean.detach()), acc_clean=accuracy(logits_clean, y))
        return Output(loss, logits_adv, logs)

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        x, y = split_batch(batch)
        return self.compute(model, x, y)


# ----------------------------------------------------------------------------- FGSM-AT
@METHODS.register("fgsm_at")
class FGSMAT(AdversarialTraining):
    """FGSM adversarial training; by default "FGSM-RS" of Wong, Rice & Kolter 2020.

    Paper: Wong, Rice & Kolter, "Fast is better than free: revisiting adversarial training",
    ICLR 2020 (Alg. 3): ``delta ~ U[-eps, eps]``, ``delta <- delta + alpha * sign(grad)`` with
    ``alpha = 1.25 * eps``, project onto the eps-ball (and the [0,1] box), train on ``x + delta``.
    The paper warns that larger steps (``alpha >= 2 * eps``) lead to catastrophic overfitting;
    the trainer's robust-accuracy early stopping is the paper's other safeguard.

    ``rand_init=False`` is the classic FGSM-AT of Goodfellow et al. 2015 (one step from ``x``);
    there the default step is ``eps`` (for both norms a longer step is projected back to
    ``eps``, so ``alpha`` only matters with the random start).

    Args:
        eps: budget in [0,1] pixel units (default 8/255, the CIFAR-10 standard; (Fashion-)MNIST
            configs use 0.1-0.3).
        alpha: step size; default ``1.25 * eps`` with ``rand_init``, else ``eps``.
        rand_init: uniform random start in the eps-ball (Wong et al. 2020).
        norm: ``"linf"`` or ``"l2"``.
        clean_weight: weight of the clean CE in ``(1 - w) * CE_adv + w * CE_clean``, in [0,1].
        attack_mode: model mode while crafting, ``"eval"`` or ``"train"`` (Wong et al.'s code
            crafts in train mode).

    Shapes: ``x`` (B,C,H,W) in [0,1], ``y`` (B,); ``Output.logits`` (B,K) on the FGSM examples.

    Example:
        >>> import torch, aal
        >>> from aal.methods import create_method
        >>> method = create_method("fgsm_at", eps=0.1)
        >>> model = aal.create_model("small_cnn")
        >>> out = method(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
        >>> out.loss.backward()
        >>> sorted(out.logs)
        ['acc_adv', 'loss_adv']
    """

    name = "fgsm_at"

    def __init__(
        self,
        eps: float = 8 / 255,
        alpha: float | None = None,
        rand_init: bool = True,
        norm: str = "linf",
        clean_weight: float = 0.0,
        attack_mode: str = "eval",
    ) -> None:
        super().__init__(clean_weight=clean_weight, attack_mode=attack_mode)
        self.eps = check_nonneg("eps", eps)
        self.rand_init = bool(rand_init)
        if alpha is None:
            alpha = 1.25 * self.eps if self.rand_init else self.eps
        self.alpha = check_nonneg("alpha", alpha)
        self.norm = check_choice("norm", norm, tuple(THREATS))
        # one projected step = FGSM (no random start) or FGSM-RS; the shared loop also boxes
        # the start and the result into [0,1], as Wong et al.'s code does.
        self._attack = PGD(
            self.eps, steps=1, step_size=self.alpha, rand_init=self.rand_init, norm=self.norm, mode=self.attack_mode
        )


# ----------------------------------------------------------------------------- PGD-AT
@METHODS.register("pgd_at")
class PGDAT(AdversarialTraining):
    """PGD adversarial training (Madry et al. 2018).

    Paper: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018: ``min_theta E max_{|delta| <= eps} CE(f(x + delta), y)``,
    the inner maximum approximated by PGD from a uniform random start.

    Step size: the paper uses 40 x 0.01 for MNIST (eps 0.3) and 7 x 2/255 for CIFAR-10
    (eps 8/255). The default here is ``2.5 * eps / steps`` (the MadryLab ``robustness``
    library's rule, which lets PGD cross the ball from any start); with ``steps=10`` and
    ``eps=8/255`` it is 2/255, the common public PGD-10 setting (Rice et al. 2020). Pass
    ``step_size`` and ``steps`` for a paper-exact run.

    Args:
        eps: budget in [0,1] pixel units (default 8/255).
        steps: PGD iterations (>= 1).
        step_size: step length; default ``2.5 * eps / steps``.
        rand_init: uniform random start in the ball (paper: yes).
        norm: ``"linf"`` or ``"l2"``.
        clean_weight: weight of the clean CE in ``(1 - w) * CE_adv + w * CE_clean``, in [0,1]
            (0 = the paper).
        attack_mode: model mode while crafting: ``"eval"`` (default; advertorch, TRADES) or
            ``"train"`` (as the public Madry/Rice et al. PyTorch code does: BatchNorm uses the
            adversarial batch's statistics and its running statistics are updated by the steps).

    Shapes: ``x`` (B,C,H,W) in [0,1], ``y`` (B,); ``Output.logits`` (B,K) on the PGD examples.

    Example:
        >>> import torch, aal
        >>> from aal.methods import create_method
        >>> method = create_method("pgd_at", eps=0.1, steps=3)
        >>> model = aal.create_model("small_cnn")
        >>> out = method(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
        >>> out.loss.backward()
    """

    name = "pgd_at"

    def __init__(
        self,
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        rand_init: bool = True,
        norm: str = "linf",
        clean_weight: float = 0.0,
        attack_mode: str = "eval",
    ) -> None:
        super().__init__(clean_weight=clean_weight, attack_mode=attack_mode)
        self.eps, self.steps, self.step_size = check_budget(eps, steps, step_size)
        self.rand_init = bool(rand_init)
        self.norm = check_choice("norm", norm, tuple(THREATS))
        self._attack = PGD(
            self.eps,
            steps=self.steps,
            step_size=self.step_size,
            rand_init=self.rand_init,
            norm=self.norm,
            mode=self.attack_mode,
        )


__all__ = ["ATTACK_MODES", "AdversarialTraining", "FGSMAT", "PGDAT"]
