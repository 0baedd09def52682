"""One generic attack loop = a loss + a threat model (init, step, project).

Design (after MadryLab/robustness ``attack_steps.py`` and advertorch):

* Images are in [0,1]; ``x_adv`` is always clipped to [0,1].
* A *per-pixel budget mask* ``mask`` (values in [0,1], broadcastable to ``x``) belongs to the
  threat model, so every attack can be selective. The attack optimises a latent perturbation
  ``u`` in the usual eps-ball and applies ``delta = mask * u``; hence for L-inf
  ``|x_adv - x| <= eps * mask`` elementwise, a zero mask leaves ``x`` unchanged, and with
  ``mask=None`` (or all ones) the attack is the ordinary one. This is exactly AAL's selective
  attack ``x' = x + k(M^a) o delta`` (seed 001, Eq. 3).
* Attacks run the model in eval mode (option ``mode``) with parameter gradients off, and
  restore both afterwards (:func:`attack_mode`); gradients are taken with
  ``torch.autograd.grad`` with respect to the perturbation only (1.46x faster per step here
  than ``loss.backward()``, which also fills weight gradients).
* The input is never modified; parameters' ``.grad`` are never touched.

Example:
    >>> import torch, aal
    >>> model = aal.create_model("small_cnn")
    >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    >>> x_adv = aal.attacks.PGD(eps=0.1, steps=5)(model, x, y)
    >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
    True
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aal.utils.fold import folded_batchnorm
from aal.utils.modes import eval_mode

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(outputs, y) -> (B,)`` per-sample loss the attack ascends (or descends)."""


# ----------------------------------------------------------------------------- model context
_MODES: dict[str, bool | None] = {"eval": False, "train": True, "keep": None}
"""``attack_mode``'s mode names -> :func:`aal.utils.modes.eval_mode`'s ``training`` argument."""


@contextlib.contextmanager
def attack_mode(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """Run an attack on ``model``: set its mode, switch parameter gradients off, restore after.

    Args:
        model: the network.
        mode: ``"eval"`` (default; BatchNorm uses running statistics, dropout off), ``"train"``,
            or ``"keep"`` (leave every submodule's mode as it is).

    The ``requires_grad`` flag of every parameter and the ``training`` flag of every submodule
    are restored exactly, even if the attack raises.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be 'eval', 'train' or 'keep', got {mode!r}")
    with eval_mode(model, training=_MODES[mode], freeze=True):
        yield model


# ----------------------------------------------------------------------------- losses
def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy, shape (B,)."""
    return F.cross_entropy(logits, y, reduction="none")


def cw_loss(logits: Tensor, y: Tensor, kappa: float = 50.0) -> Tensor:
    """Per-sample Carlini-Wagner margin ``max_{j!=y} z_j - z_y``, clamped below at ``-kappa``."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (other - z_y).clamp_min(-kappa)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample margin ``max_{j!=y} z_j - z_y`` without a clamp (Square Attack's loss)."""
    return cw_loss(logits, y, kappa=math.inf)


def _sorted_logits(logits: Tensor, need: int, what: str) -> Tensor:
    if logits.dim() != 2 or logits.shape[1] < need:
        raise ValueError(f"the {what} loss needs (B, C) logits with at least {need} classes, got shape {tuple(logits.shape)}")
    return logits.sort(dim=1).values


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample Difference of Logits Ratio (Croce & Hein 2020, Eq. 6), shape (B,).

    ``DLR(z, y) = -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi1 >= z_pi2 >= ...``
    the sorted logits. Shift- and scale-invariant in the logits; needs at least 3 classes.
    Ascending it moves a point toward misclassification (as the CE).

    Example:
        >>> dlr_loss(torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0]))   # -(3-1)/(3-0)
        tensor([-0.6667])
    """
    srt = _sorted_logits(logits, 3, "DLR")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    # the largest other logit: the runner-up if y is on top, else the top one
    other = torch.where(z_y >= srt[:, -1], srt[:, -2], srt[:, -1])
    return -(z_y - other) / (srt[:, -1] - srt[:, -3] + 1e-12)


def dlr_targeted_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Per-sample targeted DLR (Croce & Hein 2020, Eq. 7), shape (B,); needs at least 4 classes.

    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` for true labels ``y`` and targets
    ``t``; APGD-T *ascends* it (toward ``z_t > z_y``).
    """
    srt = _sorted_logits(logits, 4, "targeted DLR")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (srt[:, -1] - 0.5 * (srt[:, -3] + srt[:, -4]) + 1e-12)


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "cw": cw_loss, "margin": margin_loss, "dlr": dlr_loss}


def resolve_loss(loss: str | LossFn) -> LossFn:
    """A loss given by name (a key of :data:`LOSSES`) or as a callable."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; choose from {sorted(LOSSES)} or pass a callable")
    return LOSSES[loss]


def misclassified(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample success of an untargeted attack on a classifier: argmax != y."""
    return logits.argmax(1) != y


# ----------------------------------------------------------------------------- threat models
def _per_sample(v: float | Tensor, x: Tensor) -> Tensor | float:
    """Broadcast a scalar or a (B,) tensor of budgets against ``x`` (B,...)."""
    if isinstance(v, Tensor):
        if v.dim() == 0:
            return float(v)
        if v.shape != (x.shape[0],):
            raise ValueError(f"per-sample eps must have shape ({x.shape[0]},), got {tuple(v.shape)}")
        return v.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return float(v)


class ThreatModel:
    """The set of allowed perturbations: an ``eps``-ball of a norm, scaled per pixel by ``mask``.

    Subclasses implement ``init`` (random start), ``step`` (steepest ascent for the norm) and
    ``project`` (back onto the ball). All work on the *latent* ``u``; the applied perturbation is
    ``mask * u`` and :meth:`apply` clips the result to [0,1].
    """

    norm: str = ""

    def __init__(self, eps: float | Tensor) -> None:
        if isinstance(eps, Tensor):
            if eps.dim() > 1:
                raise ValueError(f"eps must be a number or a per-sample (B,) tensor, got shape {tuple(eps.shape)}")
            if bool((eps < 0).any()) or not bool(torch.isfinite(eps).all()):
                raise ValueError("eps must be finite and non-negative")
        elif eps < 0 or not math.isfinite(eps):
            raise ValueError(f"eps must be a non-negative number, got {eps}")
        self.eps = eps

    def init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def step(self, u: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        raise NotImplementedError

    def project(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def apply(x: Tensor, u: Tensor, mask: Tensor | None) -> Tensor:
        """``clip(x + mask * u, 0, 1)``."""
        delta = u if mask is None else mask * u
        return (x + delta).clamp_(0.0, 1.0)

    @staticmethod
    def box(x: Tensor, u: Tensor, mask: Tensor | None) -> Tensor:
        """Make ``x + mask * u`` lie in [0,1] by moving ``u`` (exact per pixel where mask > 0)."""
        if mask is None:
            return torch.max(torch.min(u, 1.0 - x), -x)
        safe = mask.clamp_min(1e-12)
        lo, hi = -x / safe, (1.0 - x) / safe
        return torch.where(mask > 0, torch.max(torch.min(u, hi), lo), u)


class LinfThreat(ThreatModel):
    """L-inf ball: ``|u| <= eps``; steps along ``sign(grad)``."""

    norm = "linf"

    def init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        eps = _per_sample(self.eps, x)
        r = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * r - 1) * eps

    def step(self, u: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        return u + _per_sample(step_size, u) * grad.sign()

    def project(self, u: Tensor) -> Tensor:
        eps = _per_sample(self.eps, u)
        if isinstance(eps, Tensor):
            return torch.max(torch.min(u, eps), -eps)
        return u.clamp(-eps, eps)


def _l2_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


class L2Threat(ThreatModel):
    """L2 ball: ``||u||_2 <= eps`` per sample; steps along ``grad / ||grad||``."""

    norm = "l2"

    def init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        # A Gaussian direction scaled to a uniform radius (as torchattacks' PGDL2). All draws for
        # sample i come from row i of one uniform (B, N+1) draw, turned Gaussian by the inverse
        # normal CDF: on CPU ``rand`` fills serially, so sample 0 gets the same start whatever the
        # batch size (``randn`` followed by a second ``rand`` for the radii would not).
        eps = _per_sample(self.eps, x)
        b, n = x.shape[0], x[0].numel()
        v = torch.rand((b, n + 1), generator=generator, device=x.device, dtype=torch.float64)
        d = torch.special.ndtri(v[:, :n].clamp_min(2.0**-53)).to(x.dtype).view(x.shape)
        r = v[:, n].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return d / _l2_norm(d).clamp_min(1e-12) * r * eps

    def step(self, u: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        return u + _per_sample(step_size, u) * grad / _l2_norm(grad).clamp_min(1e-12)

    def project(self, u: Tensor) -> Tensor:
        eps = _per_sample(self.eps, u)
        factor = (eps / _l2_norm(u).clamp_min(1e-12)).clamp(max=1.0)
        return u * factor


THREATS: dict[str, type[ThreatModel]] = {"linf": LinfThreat, "l2": L2Threat}


def check_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    """Validate a budget mask: values in [0,1], broadcastable to ``x``; returned as x's dtype."""
    if mask is None:
        return None
    if mask.dim() != x.dim():
        raise ValueError(f"mask must have {x.dim()} dims (e.g. (B,1,H,W)), got shape {tuple(mask.shape)}")
    try:
        shape = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError as err:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x {tuple(x.shape)}") from err
    if shape != x.shape:  # e.g. a (B,1,H,W) mask with a (1,C,H,W) x would grow x_adv
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x {tuple(x.shape)}")
    mask = mask.detach().to(device=x.device, dtype=x.dtype)
    if not bool(((mask >= 0) & (mask <= 1)).all()):  # also rejects NaN
        raise ValueError("mask values must lie in [0,1]")
    return mask


# ----------------------------------------------------------------------------- input checks
#: Slack of the [0,1] range check: images computed in float (e.g. resized) may overshoot by rounding.
RANGE_TOLERANCE = 1e-5


def expected_channels(model: nn.Module) -> int | None:
    """The input channel count ``model`` declares, or ``None`` when it declares none.

    Read from the model's input normalisation (``model.normalize.mean``, shape (1,C,1,1), as
    every :class:`aal.models.AttentionNet` has) or an integer ``model.in_channels``; wrappers
    exposing ``.module`` (DistributedDataParallel) are looked through. Duck-typed: the attacks
    sit above the models and do not import them.
    """
    for m in (model, getattr(model, "module", None)):
        if m is None:
            continue
        mean = getattr(getattr(m, "normalize", None), "mean", None)
        if isinstance(mean, Tensor) and mean.dim() == 4:
            return int(mean.shape[1])
        c = getattr(m, "in_channels", None)
        if isinstance(c, int) and not isinstance(c, bool):
            return c
    return None


def check_images(x: Tensor, model: nn.Module | None = None, what: str = "x") -> None:
    """Refuse images an attack (or an evaluation) cannot handle, with a clear ``ValueError``.

    Checks: a floating-point tensor, every value finite and in [0,1] (up to
    :data:`RANGE_TOLERANCE`), and for 4-d images a channel count equal to
    :func:`expected_channels` of ``model`` when the model declares one. Without these, a NaN
    image "survives" every attack (the argmax of NaN logits is class 0), images in [0,255]
    give adversarial examples hundreds away from ``x`` after the [0,1] clip, and a 1-channel
    batch is silently broadcast through a 3-channel normalisation.

    The cost is one ``aminmax`` pass over ``x`` and one host sync per call (measured overhead in
    the README, "Guarantees under hostile input").

    Raises:
        ValueError: naming the problem (how many NaN/inf values, the range found, the channels).
    """
    if not x.is_floating_point():
        raise ValueError(f"{what} must be float images in [0,1], got dtype {x.dtype} (divide uint8 images by 255)")
    if x.numel():
        lo, hi = torch.aminmax(x.detach())
        # one sync; NaN fails both comparisons, so the common (valid) case costs one reduction
        if not bool((lo >= -RANGE_TOLERANCE) & (hi <= 1.0 + RANGE_TOLERANCE)):
            xd = x.detach()
            n_nan, n_inf = int(torch.isnan(xd).sum()), int(torch.isinf(xd).sum())
            if n_nan or n_inf:
                raise ValueError(f"{what} has {n_nan} NaN and {n_inf} infinite values; images must be finite, in [0,1]")
            raise ValueError(
                f"{what} has values in [{float(lo):.4g}, {float(hi):.4g}]; images must lie in [0,1] "
                "(divide uint8 images by 255; undo any normalisation: models normalise inside)"
            )
    c = expected_channels(model) if model is not None and x.dim() == 4 else None
    if c is not None and x.shape[1] != c:
        raise ValueError(f"{what} has {x.shape[1]} channels (shape {tuple(x.shape)}), but the model expects {c}")


# ----------------------------------------------------------------------------- the loop
class Attack:
    """Base class of every attack: ``attack(model, x, y, mask=None) -> x_adv``.

    Subclasses set the threat model and the schedule in :meth:`perturb`. The public call handles
    the context (eval mode, no parameter grads), validation and restarts.

    Args:
        eps: budget (float or per-sample (B,) tensor) in pixel units of [0,1] images.
        norm: ``"linf"`` or ``"l2"``.
        loss: a name in :data:`LOSSES` (``"ce"``, ``"cw"``, ``"margin"``, ``"dlr"``) or a callable
            ``(outputs, y) -> (B,)``.
        targeted: ``y`` holds target classes; the attack *descends* the loss toward them.
        minimize: descend the loss of the true labels (inverse adversarial examples, UIAT).
        mode: model mode during the attack (``"eval"``, ``"train"``, ``"keep"``).
        seed: if given, random starts use a generator seeded with it on every call (repeatable).
        fold_bn: in eval mode, fold each BatchNorm into the convolution before it for the attack's
            passes (:func:`aal.utils.fold.folded_batchnorm`; same function up to rounding, 1.09x
            faster PGD steps on ResNet-18 here, measured on a quiet machine); ``False`` runs the model exactly as it is.
    """

    name = "attack"

    def __init__(
        self,
        eps: float | Tensor,
        norm: str = "linf",
        loss: str | LossFn = "ce",
        targeted: bool = False,
        minimize: bool = False,
        mode: str = "eval",
        seed: int | None = None,
        fold_bn: bool = True,
    ) -> None:
        if norm not in THREATS:
            raise ValueError(f"unknown norm {norm!r}; choose from {sorted(THREATS)}")
        if targeted and minimize:
            raise ValueError("targeted=True already descends the loss (toward the target); do not set minimize too")
        if mode not in ("eval", "train", "keep"):
            raise ValueError(f"mode must be 'eval', 'train' or 'keep', got {mode!r}")
        self.threat = THREATS[norm](eps)
        self.eps = eps
        self.norm = norm
        self.loss_fn = resolve_loss(loss)
        self.targeted = targeted
        self.minimize = minimize
        self.mode = mode
        self.seed = seed
        self.fold_bn = bool(fold_bn)

    # ascent (+1) or descent (-1) of the loss
    @property
    def direction(self) -> float:
        return -1.0 if (self.targeted or self.minimize) else 1.0

    def _generator(self, x: Tensor, restart: int = 0) -> torch.Generator | None:
        """The generator for random starts of restart ``restart`` (``None`` without a seed).

        Restart 0 is seeded with ``seed``; restart k > 0 with a seed derived from ``(seed, k)``
        only, not from the state left by earlier restarts (which depends on the batch size), so
        a sample's result does not depend on the other samples of its batch (on CPU).
        """
        if self.seed is None:
            return None
        seed = self.seed
        if restart:
            seeds = torch.randint(0, 2**62, (restart,), generator=torch.Generator().manual_seed(self.seed))
            seed = int(seeds[-1])
        g = torch.Generator(device=x.device)
        g.manual_seed(seed)
        return g

    def success(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-sample success: misclassified (untargeted) or predicted as the target (targeted).

        With ``minimize`` (or non-classifier outputs) there is no success criterion: restarts are
        ranked by the objective alone (counting a misclassification as success would pick the
        restart that fails the aim of an inverse attack).
        """
        if out.dim() != 2 or self.minimize:
            return torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
        pred = out.argmax(1)
        return pred == y if self.targeted else pred != y

    def objective(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(direction * loss (B,), outputs)`` at ``x``."""
        out = model(x)
        loss = self.loss_fn(out, y)
        if loss.shape != (x.shape[0],):
            raise ValueError(f"the attack loss must be per-sample, shape ({x.shape[0]},); got {tuple(loss.shape)}")
        return self.direction * loss, out

    def grad(self, model: nn.Module, x: Tensor, u: Tensor, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Gradient of the objective w.r.t. the latent ``u`` only; also the objective and outputs.

        The [0,1] clip is passed straight through in the backward pass: :meth:`ThreatModel.box`
        already keeps ``x + mask * u`` in [0,1] up to rounding, and a pixel that rounds one ulp
        outside (frequent with a fractional mask) would otherwise get a zero gradient and stay
        stuck on the boundary. The gradient is thus ``mask * dL/dx_adv``, as in Madry et al.
        """
        u = u.detach().requires_grad_(True)
        delta = u if mask is None else mask * u
        x_adv = x + delta
        x_adv = x_adv.detach().clamp(0.0, 1.0) + (x_adv - x_adv.detach())
        obj, out = self.objective(model, x_adv, y)
        (g,) = torch.autograd.grad(obj.sum(), u)
        return g, obj.detach(), out.detach()

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """Return the latent perturbation ``u`` for one run (one restart). Override in subclasses."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """Adversarial examples for ``x`` (B,C,H,W) in [0,1] with labels (or targets) ``y`` (B,).

        Args:
            model: a module mapping images to outputs (logits for classification).
            x: clean images in [0,1]; never modified. Checked by :func:`check_images` (finite,
                in [0,1], the model's channel count): ``ValueError`` otherwise.
            y: true labels, or target labels when ``targeted``.
            mask: optional per-pixel budget in [0,1], broadcastable to ``x`` (e.g. (B,1,H,W)).

        Returns:
            ``x_adv`` with the same shape, dtype and memory format as ``x``, detached.
        """
        x = x.detach()
        check_images(x, model)
        mask = check_mask(mask, x)
        with attack_mode(model, self.mode), folded_batchnorm(model, x, self.fold_bn), torch.enable_grad():
            u = self.perturb(model, x, y, mask, self._generator(x))
            # under autocast (bf16/fp16 training, aal.utils.precision) a perturbation may come back
            # in the low dtype: the example is returned in the input's dtype whatever ran inside
            return self.threat.apply(x, u.detach().to(x.dtype), mask).detach()


class IterativeAttack(Attack):
    """Projected steepest ascent (PGD / BIM / FGSM) with optional random start and restarts.

    Each restart runs ``steps`` iterations of ``u <- project(box(step(u, grad)))`` and returns its
    last iterate; across restarts, each sample keeps the first restart whose example succeeds
    (misclassified / hits the target), otherwise the one with the highest objective.

    Args:
        eps: budget.
        steps: iterations per restart (>= 1).
        step_size: step length; default ``2.5 * eps / steps`` (Madry et al. 2018).
        rand_init: start from a uniform (L-inf) or uniform-radius (L2) point of the ball.
        restarts: independent runs per sample (>= 1).
        **kwargs: see :class:`Attack`.
    """

    name = "pgd"

    def __init__(
        self,
        eps: float | Tensor,
        steps: int = 10,
        step_size: float | Tensor | None = None,
        rand_init: bool = True,
        restarts: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(eps, **kwargs)
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if int(restarts) < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        if step_size is not None:
            bad = bool((step_size < 0).any()) if isinstance(step_size, Tensor) else not (0 <= step_size < math.inf)
            if bad:
                raise ValueError(f"step_size must be finite and non-negative, got {step_size}")
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.rand_init = bool(rand_init)
        self.step_size = 2.5 * eps / self.steps if step_size is None else step_size

    def _one_run(self, model, x, y, mask, generator) -> Tensor:
        u = self.threat.init(x, generator) if self.rand_init else torch.zeros_like(x)
        u = self.threat.box(x, u, mask)
        for _ in range(self.steps):
            g, _, _ = self.grad(model, x, u, y, mask)
            u = self.threat.project(self.threat.step(u, g, self.step_size))
            u = self.threat.box(x, u, mask)
        return u

    def perturb(self, model, x, y, mask, generator) -> Tensor:
        if self.restarts == 1:
            return self._one_run(model, x, y, mask, generator)
        best_u = None
        best_obj = best_succ = None
        for k in range(self.restarts):
            u = self._one_run(model, x, y, mask, generator if k == 0 else self._generator(x, k))
            with torch.no_grad():
                obj, out = self.objective(model, self.threat.apply(x, u, mask), y)
                succ = self.success(out, y)
            if best_u is None:
                best_u, best_obj, best_succ = u, obj, succ
                continue
            better = (succ & ~best_succ) | ((succ == best_succ) & ~best_succ & (obj > best_obj))
            sel = better.view(-1, *([1] * (x.dim() - 1)))
            best_u = torch.where(sel, u, best_u)
            best_obj = torch.where(better, obj, best_obj)
            best_succ = best_succ | succ
        return best_u
