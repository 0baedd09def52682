"""The standard suite built from an independent implementation, to cross-check ours.

:func:`torchattacks_standard` chains torchattacks' own APGD-CE, APGD-T, FAB-T and Square in its
``MultiAttack`` (what its ``AutoAttack`` wraps: each attack only on the points the previous ones
left robust), with the iterations, restarts, targets and queries of aal's ``standard`` suite
(= AutoAttack's ``version='standard'``) read from :data:`aal.eval.suite.SUITES`, seed 0.

Why not ``torchattacks.AutoAttack(version="standard")`` itself: it imports and runs without
torchvision, but it is a different evaluation: it never passes ``steps`` to APGD, APGD-T and
FAB, which then run torchattacks' default of 10 iterations where the reference AutoAttack (Croce
& Hein 2020) and our suite run 100, and its Square rescales the ``p`` schedule to the number of
queries where AutoAttack's standard version does not (``resc_schedule=False``).

torchattacks' quirks this works around: its ``APGDT`` and ``FAB`` take ``n_classes`` and run
``n_classes - 1`` targets (``n_target_classes`` is set after construction instead); FAB-T is its
``FAB`` with ``multi_targeted=True`` (its ``targeted`` mode is another attack: one given target
per point).

torchattacks is a test dependency (``scripts/install.sh`` installs it with ``pip install
--no-deps``: its metadata asks for torchvision, which these attacks never import).

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

STANDARD_STAGES = ["apgd_ce", "apgd_t", "fab_t", "square"]
_NORMS = {"linf": "Linf", "l2": "L2"}


def torchattacks_fab_t(model: nn.Module, eps: float, norm: str = "linf", steps: int = 100, restarts: int = 1,
                       targets: int = 9) -> Any:
    """torchattacks' FAB as FAB-T (``multi_targeted``) with ``targets`` target classes, seed 0.

    Raises:
        ImportError: torchattacks is not installed.
    """
    import torchattacks

    fab = torchattacks.FAB(model, norm=_NORMS[norm], eps=eps, steps=steps, n_restarts=restarts, multi_targeted=True,
                           n_classes=targets + 1, seed=0)
    fab.n_target_classes = targets  # its constructor only takes n_classes (targets = n - 1)
    return fab


def torchattacks_standard(model: nn.Module, eps: float, num_classes: int = 10, norm: str = "linf") -> Any:
    """torchattacks' ``MultiAttack`` of APGD-CE -> APGD-T -> FAB-T -> Square with our suite's settings.

    Args:
        model: the classifier (images in [0,1], logits out), in eval mode.
        eps: budget.
        num_classes: number of classes (torchattacks' APGD-T needs it).
        norm: ``"linf"`` or ``"l2"``.

    Returns:
        a torchattacks attack: ``attack(x, y) -> x_adv``. Its attacks reseed torch's global RNG;
        wrap calls in ``torch.random.fork_rng()`` to leave the caller's stream alone.

    Raises:
        ImportError: torchattacks is not installed.
        RuntimeError: aal's standard suite no longer is APGD-CE -> APGD-T -> FAB-T -> Square.
    """
    import torchattacks

    from aal.eval.suite import SUITES

    stages = {s.name: dict(s.options) for s in SUITES["standard"]}
    if list(stages) != STANDARD_STAGES:
        raise RuntimeError(f"aal's standard suite changed ({list(stages)}): update this cross-check")
    tnorm = _NORMS[norm]
    ce, apgd_t, fab_t, square = (stages[name] for name in STANDARD_STAGES)
    apgd_t_attack = torchattacks.APGDT(model, norm=tnorm, eps=eps, steps=apgd_t["iterations"],
                                       n_restarts=apgd_t.get("restarts", 1), n_classes=num_classes, seed=0)
    apgd_t_attack.n_target_classes = apgd_t["targets"]  # its constructor only takes n_classes (targets = n - 1)
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, norm=tnorm, eps=eps, steps=ce["iterations"], n_restarts=ce.get("restarts", 1),
                          loss="ce", seed=0),
        apgd_t_attack,
        torchattacks_fab_t(model, eps, norm, steps=fab_t["iterations"], restarts=fab_t["restarts"],
                           targets=fab_t["targets"]),
        torchattacks.Square(model, norm=tnorm, eps=eps, n_queries=square["queries"], n_restarts=square.get("restarts", 1),
                            resc_schedule=square["rescale_schedule"], seed=0),
    ])


__all__ = ["torchattacks_fab_t", "torchattacks_standard"]
