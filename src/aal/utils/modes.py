"""The model's train/eval mode, set for a block and restored exactly after it.

Evaluation, attacks and checks all need the same thing: run a network in eval mode (BatchNorm on
running statistics, dropout off) for a while, maybe with its parameters frozen, and give it back
exactly as it was, every submodule's ``training`` flag and every parameter's ``requires_grad``
included, even when the block raises. ``model.train(was_training)`` is not enough: it resets every
submodule to the top module's flag, erasing a deliberately frozen BatchNorm.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).train()
    >>> with eval_mode(net):
    ...     net.training, net[1].training
    (False, False)
    >>> net.training, net[1].training
    (True, True)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, training: bool | None = False, freeze: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block; restore every submodule's mode after.

    Args:
        model: the network.
        training: the mode set for the block: ``False`` (eval, the default), ``True`` (train) or
            ``None`` (leave every submodule's mode as it is).
        freeze: also switch every parameter's ``requires_grad`` off for the block (attacks take
            gradients with respect to the input only); the flags are restored after.

    Yields:
        ``model`` itself.

    The ``training`` flag of every submodule (and, with ``freeze``, the ``requires_grad`` flag of
    every parameter) is restored exactly, even if the block raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()] if freeze else []
    try:
        if training is not None:
            model.train(training)
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, was in modes:
            m.training = was


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (``model`` itself when it is not compiled).

    Differentiating with respect to an *intermediate* the model returns (AAL's attention map,
    ``model(x, return_attention=True)``) needs the eager module: a compiled graph returns such a
    tensor as a separate output that the loss does not depend on in autograd's view.
    """
    return getattr(model, "_orig_mod", model)


__all__ = ["eval_mode", "uncompiled"]
