"""The standard suite built from an independent implementation, to cross-check ours.

:func:`torchattacks_standard` chains torchattacks' own APGD-CE, APGD-T and Square in its
``MultiAttack`` (what its ``AutoAttack`` wraps: each attack only on the points the previous ones
left robust), with the iterations, targets and queries of aal's ``standard`` suite read from
:data:`aal.eval.suite.SUITES`, one restart each, seed 0.

Why not ``torchattacks.AutoAttack(version="standard")`` itself: it imports and runs without
torchvision, but it is a different evaluation. It adds FAB-T (not implemented in aal) and never
passes ``steps`` to APGD, APGD-T and FAB, which then run torchattacks' default of 10 iterations
where the reference AutoAttack (Croce & Hein 2020) and our suite run 100.

torchattacks is an optional dependency (``pip install --no-deps torchattacks``: its metadata asks
for torchvision, which these attacks do not import).

Example:
    >>> import torch, aal
    >>> from aal.eval.reference import torchattacks_standard
    >>> model = aal.create_model("small_cnn").eval()
    >>> attack = torchattacks_standard(model, eps=0.1)  # doctest: +SKIP
    >>> x_adv = attack(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from torch import nn


def torchattacks_standard(model: nn.Module, eps: float, num_classes: int = 10) -> Any:
    """torchattacks' ``MultiAttack`` of APGD-CE -> APGD-T -> Square with our suite's settings (L-inf).

    Args:
        model: the classifier (images in [0,1], logits out), in eval mode.
        eps: L-inf budget.
        num_classes: number of classes (torchattacks' APGD-T needs it).

    Returns:
        a torchattacks attack: ``attack(x, y) -> x_adv``. Its attacks reseed torch's global RNG;
        wrap calls in ``torch.random.fork_rng()`` to leave the caller's stream alone.

    Raises:
        ImportError: torchattacks is not installed.
        RuntimeError: aal's standard suite no longer is APGD-CE -> APGD-T -> Square.
    """
    import torchattacks

    from aal.eval.suite import SUITES

    stages = {s.name: dict(s.options) for s in SUITES["standard"]}
    if list(stages) != ["apgd_ce", "apgd_t", "square"]:
        raise RuntimeError(f"aal's standard suite changed ({list(stages)}): update this cross-check")
    apgd_t = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=stages["apgd_t"]["iterations"], n_restarts=1,
                                n_classes=num_classes, seed=0)
    apgd_t.n_target_classes = stages["apgd_t"]["targets"]  # its constructor only takes n_classes (targets = n - 1)
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, norm="Linf", eps=eps, steps=stages["apgd_ce"]["iterations"], n_restarts=1, loss="ce",
                          seed=0),
        apgd_t,
        torchattacks.Square(model, norm="Linf", eps=eps, n_queries=stages["square"]["queries"], n_restarts=1, seed=0),
    ])


__all__ = ["torchattacks_standard"]
