"""What a training method is: ``method(model, batch) -> Output(loss, logits, logs)``.

After timm's ``task/`` objects and TRADES' ``trades_loss``: a method turns one batch into a
scalar loss (crafting whatever adversarial examples it needs); it never touches the optimizer,
the scheduler or the data. One trainer loop (:mod:`aal.engine.trainer`) serves every method.

Stateful methods (e.g. a class-wise universal perturbation, running statistics) keep their
state in tensors returned by :meth:`Method.state_dict`, so it is checkpointed with the model.

Example:
    >>> import torch, aal
    >>> model = aal.create_model("small_cnn")
    >>> method = aal.methods.create_method("pgd_at", eps=0.1, steps=3)
    >>> out = method(model, (torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))))
    >>> out.loss.backward()
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn

Batch = Any
"""A batch as yielded by the data loader; for classification ``(x (B,C,H,W) in [0,1], y (B,))``."""


@dataclass
class Output:
    """The result of one method call.

    Attributes:
        loss: scalar loss to back-propagate.
        logits: logits on the inputs the loss was computed on (for running train accuracy), or
            ``None``.
        logs: scalar diagnostics (floats) averaged per epoch by the trainer, e.g.
            ``{"loss_clean": ..., "mask_mean": ...}``.
    """

    loss: Tensor
    logits: Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)


def mean_output(outs: list[Output]) -> Output:
    """One :class:`Output` for several sub-steps taken as one step: the mean loss and logs.

    Used for a meta-batch of episodes: the gradient of the mean loss is the mean of the
    episodes' gradients, which is what DDP computes when each process takes one of them.
    Logits are concatenated when every sub-step has logits of the same width (else ``None``).
    """
    if len(outs) == 1:
        return outs[0]
    loss = torch.stack([o.loss for o in outs]).mean()
    logits = None
    if all(o.logits is not None for o in outs) and len({o.logits.shape[1:] for o in outs}) == 1:
        logits = torch.cat([o.logits for o in outs])
    keys = [k for k in outs[0].logs if all(k in o.logs for o in outs)]
    return Output(loss, logits, {k: sum(float(o.logs[k]) for o in outs) / len(outs) for k in keys})


class Method:
    """Base class of training methods. Subclasses implement :meth:`__call__`.

    ``name`` is the registered name; constructor keyword arguments are the method's
    hyper-parameters (validated from configs by their type annotations).
    """

    name: str = "method"

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        raise NotImplementedError

    def updates(self, model: nn.Module, batch: Batch) -> Iterator[Output]:
        """The optimizer steps this method takes on one batch, yielded lazily.

        The trainer runs ``zero_grad -> backward -> step`` after each yielded output, so a method
        that needs several sequential updates per batch (e.g. AAL's public code: a clean step,
        then an adversarial step computed with the *updated* weights) overrides this; the default
        is one step with :meth:`__call__`. No per-method branch in the trainer.
        """
        yield self(model, batch)

    # -- optional hooks -------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Called by the trainer before each epoch (0-based); e.g. for warm-ups."""

    def after_backward(self, model: nn.Module) -> None:
        """Called by the trainer after each ``loss.backward()``, before clipping and ``optimizer.step()``.

        For methods that evaluate their loss at temporarily changed weights (AWP: ``w + v``): the
        gradient must be taken there, but the optimizer must step from ``w``, so the weights are put
        back here. The default does nothing.
        """

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that must survive checkpoint/resume (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        if state:
            raise ValueError(f"method {self.name!r} is stateless but got state keys {sorted(state)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def split_batch(batch: Batch) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from a classification batch, with a clear error otherwise."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
        raise TypeError("classification methods expect a batch (x, y) of two tensors")
    return batch[0], batch[1]


def compose_signature(
    init: Any, inner: Any, defaults: dict[str, Any] | None = None, exclude: Any = ()
) -> None:
    """Make ``init(self, <own args>, **inner_args)`` advertise ``inner``'s arguments as its own.

    A method that wraps or builds on another callable (AWP on PGD-AT, an AAL method on
    :class:`~aal.methods.aal_core.AALCore`) writes only its own arguments and forwards the rest
    as ``**kwargs``; this sets ``init.__signature__`` (and ``__annotations__``) to its own
    arguments followed by ``inner``'s, keyword-only, with ``defaults`` overriding ``inner``'s
    defaults and ``exclude`` left out. The config validator, ``help()`` and IDEs read that
    signature, so the argument list is written once, where it is used.

    Args:
        init: the ``__init__`` function to annotate (it must take ``**kwargs``).
        inner: the callable whose arguments it forwards (a function or ``cls.__init__``).
        defaults: defaults that differ from ``inner``'s.
        exclude: names of ``inner``'s arguments the method fixes (not settable).
    """
    # the function's own signature and annotations, kept from the first call (a subclass may compose again)
    sig, own_hints = init.__dict__.setdefault("_own_signature", (inspect.signature(init), dict(init.__annotations__)))
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        raise TypeError(f"{init.__qualname__} must take **kwargs to forward {inner.__qualname__}'s arguments")
    own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    defaults = defaults or {}
    forwarded = [
        p.replace(kind=p.KEYWORD_ONLY, default=defaults.get(n, p.default))
        for n, p in inspect.signature(inner).parameters.items()
        if n != "self" and n not in exclude and n not in sig.parameters and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]  # fmt: skip
    init.__signature__ = sig.replace(parameters=[*own, *forwarded])
    hints = getattr(inner, "__annotations__", {})
    init.__annotations__ = {**{p.name: hints[p.name] for p in forwarded if p.name in hints}, **own_hints}


# The registry lives here (not in __init__) so every method module can register itself without
# import cycles; ``aal.methods`` imports the built-in method modules.
from aal.registry import Registry  # noqa: E402

METHODS: Registry[Method] = Registry("method")


def create_method(name: str, **params: Any) -> Method:
    """Build the training method registered as ``name`` with its hyper-parameters."""
    return METHODS.create(name, **params)
