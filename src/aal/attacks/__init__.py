"""Attacks: ``attack(model, x, y, mask=None) -> x_adv`` with images in [0,1].

Every attack shares one loop (:class:`~aal.attacks.base.IterativeAttack`) and one threat-model
interface, so every attack accepts a per-pixel budget ``mask`` and can be selective.

Registered names (``aal list``): see ``ATTACKS.names()``. Evaluation specs such as ``"pgd20"``
or ``"pgd50x5"`` (50 steps, 5 restarts) are parsed by :func:`from_spec`.

Example:
    >>> import torch, aal
    >>> model = aal.create_model("small_cnn")
    >>> x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    >>> x_adv = aal.attacks.PGD(eps=0.1, steps=10)(model, x, y)
    >>> x_adv2 = aal.attacks.from_spec("pgd10x2", eps=0.1)(model, x, y)
"""

from __future__ import annotations

import re

from aal.attacks.apgd import APGD, APGDCE, APGDDLR, APGDT, checkpoints
from aal.attacks.base import (
    LOSSES,
    Attack,
    IterativeAttack,
    L2Threat,
    LinfThreat,
    ThreatModel,
    attack_mode,
    ce_loss,
    check_images,
    cw_loss,
    dlr_loss,
    dlr_targeted_loss,
    expected_channels,
    margin_loss,
)
from aal.attacks.fab import FAB, FABT, project_hyperplane_box
from aal.attacks.gradient import BIM, FGSM, FGSMRS, PGD, fgsm_from_grad
from aal.attacks.square import Square
from aal.registry import Registry

ATTACKS: Registry[Attack] = Registry("attack")
ATTACKS.register("fgsm")(FGSM)
ATTACKS.register("fgsm_rs")(FGSMRS)
ATTACKS.register("pgd")(PGD)
ATTACKS.register("bim")(BIM)
ATTACKS.register("apgd_ce")(APGDCE)
ATTACKS.register("apgd_dlr")(APGDDLR)
ATTACKS.register("apgd_t")(APGDT)
ATTACKS.register("square")(Square)
ATTACKS.register("fab")(FAB)
ATTACKS.register("fab_t")(FABT)

_SPEC = re.compile(r"^(?P<name>[a-z_]+?)(?P<steps>\d+)?(?:x(?P<restarts>\d+))?(?:-(?P<norm>linf|l2))?$")


def from_spec(spec: str, eps: float, **kwargs) -> Attack:
    """Build an attack from a short evaluation spec.

    Grammar: ``NAME[STEPS][xRESTARTS][-NORM]``, e.g. ``fgsm``, ``pgd20``, ``pgd50x5``,
    ``pgd20-l2``, ``cw20`` (PGD on the CW margin loss), ``apgd_ce100``, ``apgd_t``,
    ``apgd_dlr100x5-l2``, ``fab_t100``, ``square1000`` (for Square, STEPS is the number of
    queries, ``n_queries``). Names are those of ``ATTACKS`` plus ``cw``.

    Args:
        spec: the spec string.
        eps: budget.
        **kwargs: extra keyword arguments for the attack (e.g. ``seed``).

    Raises:
        ValueError: the spec does not parse or names an unknown attack.
    """
    m = _SPEC.match(spec.strip().lower())
    if m is None:
        raise ValueError(f"cannot parse attack spec {spec!r}; expected e.g. 'fgsm', 'pgd20', 'pgd50x5', 'pgd20-l2'")
    name, steps, restarts, norm = m["name"], m["steps"], m["restarts"], m["norm"]
    if norm:
        kwargs["norm"] = norm
    if name == "cw":
        name, kwargs["loss"] = "pgd", "cw"
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r} in spec {spec!r}; known: {', '.join(ATTACKS.names() + ['cw'])}")
    if name in ("fgsm", "fgsm_rs"):
        if steps or restarts:
            raise ValueError(f"{name} is single-step; spec {spec!r} must not give steps or restarts")
        return ATTACKS.create(name, eps, **kwargs)
    if steps:
        kwargs["n_queries" if name == "square" else "steps"] = int(steps)
    if restarts:
        kwargs["restarts"] = int(restarts)
    return ATTACKS.create(name, eps, **kwargs)


ATTACKS.from_spec = from_spec  # config validation asks aal.registry.lookup("attack") for it

__all__ = [
    "fgsm_from_grad",
    "APGD",
    "APGDCE",
    "APGDDLR",
    "APGDT",
    "ATTACKS",
    "Attack",
    "BIM",
    "FAB",
    "FABT",
    "FGSM",
    "FGSMRS",
    "IterativeAttack",
    "L2Threat",
    "LOSSES",
    "LinfThreat",
    "PGD",
    "Square",
    "ThreatModel",
    "attack_mode",
    "ce_loss",
    "check_images",
    "checkpoints",
    "cw_loss",
    "dlr_loss",
    "dlr_targeted_loss",
    "expected_channels",
    "from_spec",
    "margin_loss",
    "project_hyperplane_box",
]
