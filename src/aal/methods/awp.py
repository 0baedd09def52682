"""AWP: adversarial weight perturbation on top of PGD-AT and TRADES (Wu, Xia & Wang 2020).

Paper: Wu, Xia & Wang, "Adversarial Weight Perturbation Helps Robust Generalization",
NeurIPS 2020. The training objective is ``min_w max_{v in V} L(w + v)``, where ``L`` is the inner
method's adversarial loss on examples crafted at ``w`` and ``V`` bounds each layer's perturbation
relative to its weights: ``||v_l|| <= gamma * ||w_l||``. One step (the paper's and the official
code's default, ``AdvWeightPerturb`` / ``TradesAWP`` in ``utils_awp.py``):

* craft ``x'`` at ``w`` with the inner method's attack;
* ``g = grad_w L(w; x', y)`` (the inner method's own training loss: CE on ``x'`` for PGD-AT,
  ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` for TRADES, as in the official ``calc_awp``);
* ``v_l = gamma * ||w_l|| * g_l / ||g_l||`` for every weight matrix / kernel (``dim > 1``,
  named ``weight``: conv and linear weights; biases and BatchNorm affine parameters, which are
  1-D, are never perturbed, as in the official ``diff_in_weights``);
* train on ``L(w + v)``: the gradient is taken at ``w + v`` and applied to ``w``.

The official code takes the ascent step on a proxy copy of the network (so BatchNorm running
statistics of the real model are not touched by it); here the proxy is the same module called
with :func:`torch.func.functional_call` on detached weight copies and *cloned* buffers, which
computes the same gradient without a second model in memory. The official proxy uses one SGD
step whose learning rate cancels in the normalisation; ``awp_steps > 1`` takes several
normalised ascent steps of relative length ``awp_step_size`` (default ``gamma``), each projected
back onto ``||v_l|| <= gamma * ||w_l||`` (the paper's Algorithm 1).

The method never touches the optimizer. :meth:`AWPMixin.compute` adds ``v`` to the weights in
place and returns the loss at ``w + v``; the trainer back-propagates it and then calls
:meth:`AWPMixin.after_backward`, which copies the saved ``w`` back (bit-exact, not ``w + v - v``),
before gradient clipping and ``optimizer.step()``. So the update is ``w <- w - lr * grad L(w+v)``.
The official loop instead restores after ``optimizer.step()``; with plain SGD, momentum or Adam
the two are identical, and with coupled weight decay they differ only by ``lr * wd * v`` per
step (the decay term is taken at ``w`` here, at ``w + v`` there).

Warm-up: the official AT-AWP (``AT_AWP/train_cifar10.py``) applies AWP from the first epoch
(``awp_warmup=0``, ``gamma=0.01``); TRADES-AWP (``trades_AWP/train_trades_cifar.py``) uses
``gamma=0.005`` and ``if epoch >= 10`` in a 1-based epoch loop, i.e. 9 epochs without AWP.
Here ``awp_warmup`` is the number of leading (0-based) epochs trained without AWP; the trainer
tells the method the epoch through ``on_epoch_start``, so a resumed run needs no extra state.

Distributed (DDP): the ascent gradient is averaged over ranks (``all_reduce``) before it is
normalised, so every rank adds the same ``v``, the one a single process would compute on the
global batch; the proxy forwards run on the plain module (never through DDP's reducer); the
weights are restored on every rank before DDP's averaged gradients are applied.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from aal.methods.adversarial import PGDAT, check_int, check_nonneg, check_positive
from aal.methods.base import METHODS, Output, compose_signature
from aal.methods.trades import TRADES

_EPS = 1e-20  # the official code's guard in ||w|| / (||d|| + EPS); a zero gradient gives v = 0


def perturbed_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters AWP perturbs: trainable ``weight`` tensors with ``dim > 1`` (conv, linear).

    Names are those of ``model.named_parameters()``; biases and BatchNorm/LayerNorm scales
    (1-D) are left alone, as in the official ``diff_in_weights``.
    """
    return {
        name: p for name, p in model.named_parameters()
        if p.requires_grad and p.dim() > 1 and name.rsplit(".", 1)[-1] == "weight"
    }


def _plain_module(model: nn.Module) -> nn.Module:
    """The module whose parameters ``model`` trains: ``model.module`` for DDP-style wrappers.

    The ascent forwards must not run through DistributedDataParallel (its reducer expects every
    forward to be followed by a ``backward``), and layers below the engine cannot import it, so
    the PyTorch wrapper convention is used: a ``module`` attribute holding the very same
    parameters.
    """
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and {id(p) for p in inner.parameters()} == {id(p) for p in model.parameters()}:
        return _plain_module(inner)
    return model


def _mean_over_ranks(grads: list[Tensor]) -> None:
    """Average ``grads`` in place over the process group (no-op on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for g in grads:
            dist.all_reduce(g)
            g.div_(world)


class AWPMixin:
    """Adds AWP to a method with ``craft(model, x, y, mask)`` and ``objective(model, x, x_adv, y)``.

    Subclasses call :meth:`_init_awp` in their constructor. State between the call and
    :meth:`after_backward`: the saved weights (transient; always empty at epoch ends, when
    checkpoints are written).
    """

    craft: Callable[..., Tensor]
    objective: Callable[..., Output]

    def _init_awp(self, gamma: float, awp_warmup: int, awp_steps: int, awp_step_size: float | None) -> None:
        self.gamma = check_nonneg("gamma", gamma)
        self.awp_warmup = check_int("awp_warmup", awp_warmup, low=0)
        self.awp_steps = check_int("awp_steps", awp_steps)
        self.awp_step_size = self.gamma if awp_step_size is None else check_positive("awp_step_size", awp_step_size)
        self._epoch = 0
        self._saved: list[tuple[Tensor, Tensor]] = []
        self._loss_at_w = torch.zeros(())

    # -- hooks called by the trainer ------------------------------------------------------
    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Remember the epoch: AWP is active from epoch ``awp_warmup`` (0-based) on."""
        self._epoch = int(epoch)

    def after_backward(self, model: nn.Module) -> None:
        """Put the weights back to ``w`` (a copy, bit-exact) before the optimizer steps."""
        self.restore()

    # -- the perturbation -----------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether the current epoch perturbs the weights (after the warm-up, ``gamma > 0``)."""
        return self.gamma > 0 and self._epoch >= self.awp_warmup

    def weight_perturbation(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``v`` per perturbed weight (names of ``model.named_parameters()``), from ``awp_steps``
        normalised ascent steps on the inner objective, each layer within ``gamma * ||w_l||``.

        Runs the module with substituted weights and cloned buffers: the model's parameters,
        gradients and BatchNorm statistics are left as they were.
        """
        plain = _plain_module(model)
        weights = perturbed_weights(plain)
        names = list(weights)
        w = [weights[n].detach() for n in names]
        norms = [t.norm() for t in w]
        v = [torch.zeros_like(t) for t in w]
        buffers = {n: b.clone() for n, b in plain.named_buffers()}
        for step in range(self.awp_steps):
            probe = [(t + d).requires_grad_(True) for t, d in zip(w, v)]
            params = dict(zip(names, probe))

            def proxy(inp: Tensor, params: dict[str, Tensor] = params) -> Tensor:
                return functional_call(plain, {**params, **buffers}, (inp,))

            loss = self.objective(proxy, x, x_adv, y).loss
            if step == 0:  # v = 0: the loss at w itself, kept for compute's diagnostic
                self._loss_at_w = loss.detach()
            grads = list(torch.autograd.grad(loss, probe, allow_unused=True))
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(probe, grads)]
            _mean_over_ranks(grads)
            with torch.no_grad():
                for i, g in enumerate(grads):
                    v[i] = v[i] + self.awp_step_size * norms[i] * g / (g.norm() + _EPS)
                    if self.awp_steps > 1:  # projection onto ||v_l|| <= gamma * ||w_l|| (no host sync)
                        v[i] = v[i] * (self.gamma * norms[i] / (v[i].norm() + _EPS)).clamp(max=1.0)
        return dict(zip(names, v))

    def perturb(self, model: nn.Module, v: dict[str, Tensor]) -> None:
        """``w <- w + v`` in place, saving ``w`` for :meth:`restore`."""
        if self._saved:
            raise RuntimeError(
                f"{type(self).__name__}: the weights are still perturbed from the previous call; the training "
                "loop must call method.after_backward(model) after loss.backward() (aal's Trainer does)"
            )
        params = dict(_plain_module(model).named_parameters())
        with torch.no_grad():
            for name, d in v.items():
                p = params[name]
                self._saved.append((p, p.detach().clone()))
                p.add_(d)

    def restore(self) -> None:
        """Copy the saved weights back (no-op when nothing is perturbed)."""
        with torch.no_grad():
            for p, w in self._saved:
                p.copy_(w)
        self._saved = []

    def compute(self, model: nn.Module, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Output:
        """Craft ``x'`` at ``w``; return the inner objective at ``w + v`` (weights left perturbed
        until :meth:`after_backward`). Logs the inner method's logs, ``awp_active`` and
        ``awp_loss_gain``: the training loss at ``w + v`` minus the loss at ``w`` on the same batch,
        the evidence that the perturbation did something (0 when inactive; it stays positive only
        while ``v`` survives the arithmetic, e.g. the rounding of ``w + v`` to bf16 under autocast)."""
        x_adv = self.craft(model, x, y, mask)
        active = self.active
        if active:
            self.perturb(model, self.weight_perturbation(model, x, x_adv, y))
        out = self.objective(model, x, x_adv, y)
        out.logs["awp_active"] = float(active)
        out.logs["awp_loss_gain"] = float(out.loss.detach() - self._loss_at_w) if active else 0.0
        return out


@METHODS.register("awp_pgd_at")
class AWPPGDAT(AWPMixin, PGDAT):
    """PGD-AT with adversarial weight perturbation (AT-AWP, Wu et al. 2020); see the module docstring.

    Args:
        eps, steps, step_size, rand_init, norm, clean_weight, attack_mode: as :class:`PGDAT`.
        gamma: relative size of the weight perturbation per layer (official AT-AWP on CIFAR-10:
            0.01; 0 is plain PGD-AT).
        awp_warmup: leading epochs (0-based) trained without AWP (official AT-AWP: 0).
        awp_steps: ascent steps for ``v`` (paper and official code: 1).
        awp_step_size: relative length of each ascent step; default ``gamma``.

    Example:
        >>> import torch, aal
        >>> from aal.methods import create_method
        >>> method = create_method("awp_pgd_at", eps=0.1, steps=2, gamma=0.01)
        >>> model = aal.create_model("small_cnn")
        >>> out = method(model, (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
        >>> out.loss.backward()
        >>> method.after_backward(model)  # the trainer calls it before optimizer.step()
    """

    name = "awp_pgd_at"

    def __init__(
        self, gamma: float = 0.01, awp_warmup: int = 0, awp_steps: int = 1, awp_step_size: float | None = None,
        **pgd_at: Any,
    ) -> None:  # fmt: skip
        super().__init__(**pgd_at)
        self._init_awp(gamma, awp_warmup, awp_steps, awp_step_size)


compose_signature(AWPPGDAT.__init__, PGDAT.__init__)  # its arguments: AWP's, then PGD-AT's


@METHODS.register("awp_trades")
class AWPTRADES(AWPMixin, TRADES):
    """TRADES with adversarial weight perturbation (TRADES-AWP, Wu et al. 2020); see the module docstring.

    The ascent loss is the TRADES loss itself (official ``TradesAWP.calc_awp``), and the trained
    loss is the TRADES loss at ``w + v``.

    Args:
        eps, steps, step_size, beta, norm, attack_mode: as :class:`TRADES`.
        gamma: relative size of the weight perturbation per layer (official TRADES-AWP: 0.005).
        awp_warmup: leading epochs (0-based) trained without AWP (official: 9 of its 1-based
            ``epoch >= 10``; default 0 here so that short runs use AWP; the CIFAR-10 config sets 9).
        awp_steps: ascent steps for ``v`` (1 in the paper and code).
        awp_step_size: relative length of each ascent step; default ``gamma``.
    """

    name = "awp_trades"

    def __init__(
        self, gamma: float = 0.005, awp_warmup: int = 0, awp_steps: int = 1, awp_step_size: float | None = None,
        **trades: Any,
    ) -> None:  # fmt: skip
        super().__init__(**trades)
        self._init_awp(gamma, awp_warmup, awp_steps, awp_step_size)


compose_signature(AWPTRADES.__init__, TRADES.__init__)  # its arguments: AWP's, then TRADES's


__all__ = ["AWPMixin", "AWPPGDAT", "AWPTRADES", "perturbed_weights"]
