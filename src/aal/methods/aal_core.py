"""The one AAL core: associate -> budget -> selective attack, shared by every AAL method.

Paper: "Associative Adversarial Learning Based on Selective Attack" (seed 001), Alg. 1 and
Eqs. 3, 5-14: the associative attention M^a of the clean input (:mod:`aal.attention.associative`),
a kernel ``k(M^a)`` as the per-pixel budget, and the attack ``x' = x + k(M^a) o delta``. The
classification (:class:`aal.methods.aal.AAL`), few-shot (:class:`aal.methods.protonet.ProtoNetAAL`)
and detection (:class:`aal.methods.detection.DetectionAAL`) methods differ only in the loss the
attack maximises (the task's ``loss_fn``) and in how they mix the clean and adversarial losses;
this module is everything else, written once: the settings and their validation, the budget
(kernel, optional binarisation, the ablation controls), the FGSM step from the associative pass's
gradient (:func:`aal.attacks.fgsm_from_grad`, no extra pass) or PGD inside the budget, and the
map diagnostics every method logs.

Example:
    >>> import torch, aal
    >>> core = AALCore(eps=0.1)
    >>> model = aal.create_model("small_cnn", attention="cbam")
    >>> x_adv, diag = core.craft(model, torch.rand(2, 1, 28, 28), torch.tensor([0, 1]))
    >>> bool(((x_adv - diag.x).abs() <= 0.1 + 1e-6).all()), diag.mask.shape
    (True, torch.Size([2, 1, 28, 28]))
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from aal.attacks import PGD, fgsm_from_grad
from aal.attacks.base import LossFn, ce_loss
from aal.attention.associative import ALIGNS, COUPLINGS, AssocResult, associative_attention, top_fraction
from aal.attention.kernels import KERNELS, apply_kernel
from aal.methods.adversarial import ATTACK_MODES, check_choice, check_fraction, check_int, check_nonneg, check_positive
from aal.methods.base import compose_signature

AAL_ATTACKS = ("fgsm", "pgd")
"""The attacks an AAL method can run inside the budget."""
MASK_CONTROLS = ("none", "shuffle", "uniform", "anti")
"""Control budgets for ablations (see :func:`control_mask`)."""


def binarize_mask(mask: Tensor, frac: float) -> Tensor:
    """The top-``frac`` fraction of each image's budget set to 1, the rest to 0.

    Args:
        mask: (B,1,H,W) budget in [0,1].
        frac: fraction in [0,1] of the pixels kept (``round(frac * H * W)`` per image; ties broken
            by index as :func:`aal.attention.top_fraction`).

    Returns:
        a (B,1,H,W) float mask of zeros and ones with mean ``round(frac*H*W)/(H*W)`` per image.
    """
    return top_fraction(mask, frac).to(mask.dtype)


def control_mask(mask: Tensor, control: str) -> Tensor:
    """A control budget with the same per-image mean as ``mask`` but no (or a destroyed) location.

    Args:
        mask: (B,1,H,W) budget in [0,1] (``k(M^a)``).
        control: ``"none"`` (``mask`` unchanged), ``"shuffle"`` (each image's H*W values are
            permuted by an independent random permutation drawn from torch's global RNG: the same
            values, hence the same mean and histogram, at random places), ``"uniform"`` (every
            pixel gets the image's mean: the same mean budget, no selectivity) or ``"anti"``
            (anti-selective: the same values placed in reverse rank order, so the largest budget
            goes where ``mask`` is smallest; ties keep index order).

    Returns:
        a (B,1,H,W) mask in [0,1].

    Example:
        >>> m = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]])
        >>> control_mask(m, "uniform").flatten().tolist()
        [0.5, 0.5, 0.5, 0.5]
        >>> control_mask(m, "anti").flatten().tolist()
        [1.0, 0.0, 0.5, 0.5]
    """
    if control == "none":
        return mask
    flat = mask.flatten(1)
    if control == "uniform":
        return flat.mean(1, keepdim=True).expand_as(flat).reshape(mask.shape).contiguous()
    if control == "shuffle":
        perm = torch.rand(flat.shape, device=mask.device).argsort(dim=1)
        return flat.gather(1, perm).reshape(mask.shape)
    if control == "anti":
        # the pixel of rank r (ascending) receives the value of rank n-1-r
        order = flat.argsort(dim=1, stable=True)
        values = flat.gather(1, order.flip(1))
        return torch.empty_like(flat).scatter_(1, order, values).reshape(mask.shape)
    raise ValueError(f"mask_control must be one of {', '.join(MASK_CONTROLS)}; got {control!r}")


class _FixedMap(nn.Module):
    """``model`` with its attention map held at ``m`` (for the attack's forward passes)."""

    def __init__(self, model: nn.Module, m: Tensor) -> None:
        super().__init__()
        self.model = model
        self.m = m  # a plain attribute: neither a parameter nor a buffer

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, attention_map=self.m)


def map_diagnostics(res: AssocResult, mask: Tensor, xi2: float) -> dict[str, float]:
    """The per-batch diagnostics of an AAL step (see :class:`AAL`'s "Logs").

    ``mask_std`` and ``m_std`` are per-image standard deviations (over pixels) averaged over the
    batch: a budget can have a mid-range mean and still be uniform within each image.
    """
    moved = res.trigger & (res.gamma != 0) if xi2 > 0 else torch.zeros_like(res.trigger)
    return {
        "mask_mean": float(mask.mean()),
        "mask_std": float(mask.flatten(1).std(dim=1, unbiased=False).mean()),
        "m_mean": float(res.m.mean()),
        "m_std": float(res.m.flatten(1).std(dim=1, unbiased=False).mean()),
        "m_a_mean": float(res.m_a.mean()),
        "trigger_frac": float(res.trigger.float().mean()),
        "backtracked_frac": float(moved.float().mean()),
    }


def check_association(
    xi1: float, xi2: float, zeta: float, rho: float, coupling: str, kernel: str
) -> tuple[float, float, float, float, str, str]:
    """Validated associative-attention settings ``(xi1, xi2, zeta, rho, coupling, kernel)``.

    Shared by every AAL method (classification, few-shot, detection); the kernel name is
    returned lower-cased (the registry is case-insensitive).
    """
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS.names())} (case-insensitive); got {kernel!r}")
    return (
        check_nonneg("xi1", xi1), check_nonneg("xi2", xi2), check_fraction("zeta", zeta), check_fraction("rho", rho),
        check_choice("coupling", coupling, COUPLINGS), kernel.lower(),
    )  # fmt: skip


def check_selective_attack(
    attack: str, eps: float, rand_init: bool | None, alpha: float | None, steps: int | None, step_size: float | None
) -> tuple[bool, float | None, int, float | None]:
    """``(rand_init, alpha, attack_steps, step_size)`` of an AAL method's FGSM or PGD attack.

    FGSM takes ``alpha`` (default ``1.25 * eps`` with a random start, else ``eps``) and one step;
    PGD takes ``steps`` (default 10) and ``step_size`` (default ``2.5 * eps / steps``). Giving an
    argument of the other attack raises ``ValueError``. ``rand_init=None``: on for PGD only.
    """
    rand_init = (attack == "pgd") if rand_init is None else bool(rand_init)
    if attack == "fgsm":
        for arg, value in (("steps", steps), ("step_size", step_size)):
            if value is not None:
                raise ValueError(f"{arg} applies to attack='pgd' only (got {arg}={value!r} with attack='fgsm')")
        default_alpha = 1.25 * eps if rand_init else eps
        return rand_init, default_alpha if alpha is None else check_nonneg("alpha", alpha), 1, None
    if alpha is not None:
        raise ValueError(f"alpha applies to attack='fgsm' only (use step_size for PGD); got alpha={alpha!r}")
    attack_steps = 10 if steps is None else check_int("steps", steps)
    default_step = 2.5 * eps / attack_steps
    return rand_init, None, attack_steps, default_step if step_size is None else check_positive("step_size", step_size)


@dataclass
class AALDiagnostics:
    """What :meth:`AALCore.craft` computed besides ``x'``.

    Attributes:
        x: the clean input (B,C,H,W), detached.
        res: the associative attention (M, M^a, trigger, the clean gradient, ...).
        mask: the budget ``k(M^a)`` (B,1,H,W) in [0,1], after binarisation / control.
        xi2: the backtracking rate (``backtracked_frac`` is 0 when it is 0).
    """

    x: Tensor
    res: AssocResult
    mask: Tensor
    xi2: float

    def logs(self) -> dict[str, float]:
        """The per-batch map diagnostics (:func:`map_diagnostics`)."""
        return map_diagnostics(self.res, self.mask, self.xi2)


class AALCore:
    """The settings of an AAL step and the step itself (see the module doc).

    Args:
        eps: L-inf budget in [0,1] pixel units.
        attack: one of ``attacks`` (``"fgsm"``: one step from the associative pass's gradient;
            ``"pgd"``: PGD restricted to the budget).
        xi1, xi2, zeta, coupling, rho: the associative attention's
            (:func:`aal.attention.associative_attention`).
        kernel: registered kernel name (``"M2"``, ``"M"``, ``"1-M2"``, ``"one"``: non-selective).
        rand_init, alpha, steps, step_size: the attack's (:func:`check_selective_attack`).
        attack_mode: model mode while computing M^a and crafting (``"eval"`` or ``"train"``).
        mask_control: one of ``mask_controls`` (:func:`control_mask`).
        mask_binarize: ``None`` or a fraction in (0,1] (:func:`binarize_mask`, before the control).
        align: how M^a is placed on the input (:mod:`aal.attention.associative`).
        attacks, mask_controls: the choices a method offers (a subset of the defaults).

    Raises:
        ValueError: on any invalid setting, naming it.
    """

    def __init__(
        self,
        eps: float = 8 / 255,
        attack: str = "fgsm",
        xi1: float = 0.1,
        xi2: float = 0.1,
        zeta: float = 0.1,
        coupling: str = "indicator",
        rho: float = 0.01,
        kernel: str = "M2",
        rand_init: bool | None = None,
        alpha: float | None = None,
        steps: int | None = None,
        step_size: float | None = None,
        attack_mode: str = "eval",
        mask_control: str = "none",
        mask_binarize: float | None = None,
        align: str = "receptive_field",
        attacks: Sequence[str] = AAL_ATTACKS,
        mask_controls: Sequence[str] = MASK_CONTROLS,
    ) -> None:
        self.eps = check_nonneg("eps", eps)
        self.align = check_choice("align", align, ALIGNS)
        self.attack = check_choice("attack", attack, tuple(attacks))
        self.mask_control = check_choice("mask_control", mask_control, tuple(mask_controls))
        if mask_binarize is not None:
            mask_binarize = check_fraction("mask_binarize", mask_binarize)
            if mask_binarize == 0:
                raise ValueError("mask_binarize must lie in (0, 1] (0 would never attack); use None to disable")
        self.mask_binarize = mask_binarize
        self.xi1, self.xi2, self.zeta, self.rho, self.coupling, self.kernel = check_association(
            xi1, xi2, zeta, rho, coupling, kernel
        )
        # attack_steps: the PGD iteration count (not the optimizer updates of Method.updates)
        self.rand_init, self.alpha, self.attack_steps, self.step_size = check_selective_attack(
            self.attack, self.eps, rand_init, alpha, steps, step_size
        )
        self.attack_mode = check_choice("attack_mode", attack_mode, ATTACK_MODES)

    def associate(self, model: nn.Module, x: Tensor, y: object, loss_fn: LossFn | None = None) -> AssocResult:
        """The associative attention of ``x`` under ``loss_fn`` (default cross-entropy)."""
        return associative_attention(
            model, x, y, eps=self.eps, xi1=self.xi1, xi2=self.xi2, zeta=self.zeta, coupling=self.coupling,
            rho=self.rho, loss_fn=loss_fn or ce_loss, mode=self.attack_mode, align=self.align,
            # kernel "one" ignores the map: a model without attention is the FGSM/PGD-AT special case
            require_attention=self.kernel != "one",
        )  # fmt: skip

    def budget(self, res: AssocResult) -> Tensor:
        """The per-pixel budget ``k(M^a)`` (B,1,H,W) in [0,1] (binarized / controlled if asked)."""
        mask = apply_kernel(self.kernel, res.m_a_input)
        if self.mask_binarize is not None:
            mask = binarize_mask(mask, self.mask_binarize)
        return control_mask(mask, self.mask_control)

    def perturb(
        self, model: nn.Module, x: Tensor, y: object, res: AssocResult, mask: Tensor, loss_fn: LossFn | None = None,
        attention_map: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """The selectively attacked ``x'`` (B,C,H,W) in [0,1], detached, given the budget ``mask``.

        ``attention_map``: hold the model's map at this value in PGD's passes (AAL's ``"fixed"``).
        """
        if self.attack == "fgsm":
            # one signed step with the clean gradient of the associative pass: no extra pass
            # (the same threat-model calls as aal.attacks.FGSM, so kernel "one" reproduces it exactly)
            return fgsm_from_grad(x, res.grad_x, self.eps, mask, self.rand_init, self.alpha)
        target = model if attention_map is None else _FixedMap(model, attention_map)
        pgd = PGD(
            self.eps, steps=self.attack_steps, step_size=self.step_size, rand_init=self.rand_init,
            mode=self.attack_mode, loss=loss_fn or "ce",
        )  # fmt: skip
        return pgd(target, x.detach(), y, mask=mask)

    def craft(
        self, model: nn.Module, x: Tensor, y: object, loss_fn: LossFn | None = None, hold_map: bool = False
    ) -> tuple[Tensor, AALDiagnostics]:
        """``(x', diagnostics)``: associate, budget, attack (``hold_map``: PGD sees M^a, not a recomputed map)."""
        res = self.associate(model, x, y, loss_fn)
        mask = self.budget(res)
        held = res.m_a if (hold_map and res.has_attention) else None
        x_adv = self.perturb(model, x, y, res, mask, loss_fn, held)
        return x_adv, AALDiagnostics(x.detach(), res, mask, self.xi2)

    def __repr__(self) -> str:
        return f"AALCore({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


CHOICE_ARGS = ("attacks", "mask_controls")
"""AALCore arguments that restrict the choices a method offers (set by the method, not by a config)."""


def core_settings() -> dict[str, inspect.Parameter]:
    """AALCore's user-facing settings (``eps`` ... ``align``), in order: the one list of them."""
    params = inspect.signature(AALCore.__init__).parameters
    return {n: p for n, p in params.items() if n != "self" and n not in CHOICE_ARGS}


class UsesAALCore:
    """Mixin of the AAL methods: one list of the core's settings, and those settings read as the method's own.

    A method built on :class:`AALCore` writes only its *own* arguments and takes the core's as
    ``**core``::

        class ProtoNetAAL(UsesAALCore, ProtoNet):
            core_defaults = {"kernel": "1-m2"}               # where its defaults differ
            core_fixed = {"mask_controls": ("none", ...)}   # choices it restricts (not settable)

            def __init__(self, clean_weight=0.0, ..., **core):
                self.core = self.make_core(core)

    Its ``__init__.__signature__`` then lists its own arguments followed by every core setting
    (keyword-only, with the method's defaults; fixed ones left out), so the config validator,
    ``help()`` and IDEs see the whole list while the list itself is written once, in
    :class:`AALCore`. Settings read as attributes of the method (``method.eps``) come from the
    core (``__getattr__``).
    """

    core: AALCore
    core_defaults: ClassVar[dict[str, Any]] = {}
    """Core settings whose default differs for this method (e.g. few-shot's background kernel)."""
    core_fixed: ClassVar[dict[str, Any]] = {}
    """Core arguments this method fixes: not settable, absent from its signature (e.g. ``attack``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and inspect.getfullargspec(init).varkw:
            compose_signature(init, AALCore.__init__, cls.core_defaults, exclude=(*CHOICE_ARGS, *cls.core_fixed))

    def make_core(self, settings: dict[str, Any]) -> AALCore:
        """The :class:`AALCore` of ``settings`` (the ``**core`` of ``__init__``) on this method's defaults.

        Raises:
            TypeError: for a name that is not a core setting this method accepts (as Python
                would for an unexpected keyword argument).
            ValueError: for an invalid value (:class:`AALCore` names it).
        """
        allowed = set(core_settings()) - set(self.core_fixed)
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {unknown[0]!r}")
        return AALCore(**{**self.core_defaults, **settings, **self.core_fixed})

    def __getattr__(self, name: str):
        # only called for names the method itself lacks; copy/pickle probe dunders before __dict__ exists
        core = self.__dict__.get("core") if not name.startswith("__") else None
        if core is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(core, name)


__all__ = [
    "AALCore", "AALDiagnostics", "AAL_ATTACKS", "CHOICE_ARGS", "MASK_CONTROLS", "UsesAALCore", "binarize_mask",
    "check_association", "core_settings", "check_selective_attack", "control_mask", "map_diagnostics",
]  # fmt: skip
