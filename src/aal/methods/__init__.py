"""Training methods: ``method(model, batch) -> Output(loss, logits, logs)`` and their registry.

A method turns one batch into a scalar loss (crafting the adversarial examples it needs) and
never touches the optimizer; one trainer loop serves them all. Constructor keyword arguments
are the hyper-parameters (typed, validated at construction).

Registered (``METHODS.names()``): ``standard`` (clean CE), ``fgsm_at`` (Wong et al. 2020),
``pgd_at`` (Madry et al. 2018), ``trades`` (Zhang et al. 2019), ``awp_pgd_at`` / ``awp_trades``
(adversarial weight perturbation, Wu et al. 2020), ``mart`` (Wang et al. 2020),
``uiat`` / ``uiat_fgsm`` (inverse adversaries, seed 003), ``spat`` (hard-class-pair
reweighting on a cosine head, seed 004), ``atop_pretrain`` / ``atop_finetune`` (purifier
training, seed 002), and ``aal``.

Example:
    >>> import torch, aal
    >>> from aal.methods import create_method
    >>> model = aal.create_model("small_cnn")
    >>> method = create_method("pgd_at", eps=0.1, steps=3)
    >>> out = method(model, (torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))))
    >>> out.loss.backward()
"""

from __future__ import annotations


from aal.methods.adversarial import FGSMAT, PGDAT, AdversarialTraining
from aal.methods.base import METHODS, Method, Output, create_method, split_batch
from aal.methods.standard import Standard
from aal.methods.trades import TRADES, TradesKLAttack
from aal.methods.mart import MART
from aal.methods.uiat import UIAT, UIATFGSM
from aal.methods.spat import SPAT, CosineHead, use_cosine_head
from aal.methods.atop import AToPFinetune, AToPPretrain
from aal.methods.awp import AWPPGDAT, AWPTRADES

__all__ = [
    "AWPPGDAT",
    "AWPTRADES",
    "AToPFinetune",
    "AToPPretrain",
    "AdversarialTraining",
    "CosineHead",
    "FGSMAT",
    "MART",
    "METHODS",
    "Method",
    "Output",
    "PGDAT",
    "SPAT",
    "Standard",
    "TRADES",
    "TradesKLAttack",
    "UIAT",
    "UIATFGSM",
    "create_method",
    "split_batch",
    "use_cosine_head",
]

from aal.methods import aal as _aal  # noqa: E402,F401  (registers aal, aal_fgsm, aal_pgd)
from aal.methods import protonet as _protonet  # noqa: E402,F401  (registers protonet, protonet_aal)
from aal.methods import detection as _detection  # noqa: E402,F401  (registers detection, detection_aal)
from aal.methods import saliency as _saliency  # noqa: E402,F401  (registers saliency_fgsm)
