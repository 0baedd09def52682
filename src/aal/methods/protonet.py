"""Episodic few-shot training: ProtoNet (Snell et al. 2017) and ProtoNet+AAL (seed 001, Sec. 4.3).

Both are ordinary methods, ``method(model, episode) -> Output(loss, query_logits, logs)``, run by
the one :class:`~aal.engine.Trainer` over an :class:`~aal.data.fewshot.EpisodeLoader`; the model
is an embedding network (``create_model(..., num_classes=0)``, e.g. ResNet-12 with
``attention="cbam"``). The head, the loss the attack maximises and the metric come from the
task, :class:`aal.tasks.FewShotTask`.

* ``protonet``: the prototypical loss of the episode's queries against prototypes of its
  support (one forward over support + query).
* ``protonet_aal``: AAL for few-shot. The paper "selectively attack[s] the background areas of
  images in the support set during training" with the kernel ``k(M^a) = 1 - M^a o M^a``; the
  queries stay clean. One step:

  1. the associative attention M^a of the support images (:func:`aal.attention.associative_attention`,
     Eqs. 5-14) with the task's attack loss (``attack_loss="query"``: the episode's own
     prototypical loss as a function of the perturbed support; see :mod:`aal.tasks.fewshot`);
  2. the selective attack ``S' = clip(S + k(M^a) o delta, 0, 1)`` (FGSM from the same gradient,
     or PGD with the per-pixel budget ``k(M^a)`` and the same loss);
  3. the prototypical loss of the clean queries against prototypes of ``S'``, back-propagated by
     the trainer (optionally mixed with the clean episode's loss, ``clean_weight``).

Example:
    >>> import torch, aal
    >>> from aal.data.fewshot import Episode
    >>> model = aal.create_model("small_cnn", num_classes=0, attention="cbam")
    >>> ep = Episode(torch.rand(5, 1, 28, 28), torch.arange(5), torch.rand(10, 1, 28, 28), torch.arange(5).repeat(2))
    >>> out = aal.methods.create_method("protonet_aal", eps=0.1)(model, ep)
    >>> out.logits.shape, sorted(out.logs)[:3]
    (torch.Size([10, 5]), ['acc', 'backtracked_frac', 'loss_adv'])
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from aal.attacks.base import LossFn
from aal.attention.associative import AssocResult
from aal.data.fewshot import Episode, as_episode, episodes_of
from aal.methods.aal_core import AAL_ATTACKS, MASK_CONTROLS, UsesAALCore, map_diagnostics
from aal.methods.adversarial import check_choice, check_fraction, check_positive
from aal.methods.base import METHODS, Batch, Method, Output, mean_output
from aal.tasks.fewshot import ATTACK_LOSSES, METRICS, FewShotTask

FEWSHOT_ATTACKS = AAL_ATTACKS
FEWSHOT_MASK_CONTROLS = tuple(c for c in MASK_CONTROLS if c != "anti")  # the controls few-shot AAL offers


@METHODS.register("protonet")
class ProtoNet(Method):
    """Prototypical networks (Snell et al., NeurIPS 2017): episodic training on clean episodes.

    Args:
        metric: ``"euclidean"`` (negative squared distance, Snell et al.) or ``"cosine"``.
        temperature: logits are divided by it (cosine: use about 0.1).

    Batch: an :class:`~aal.data.fewshot.Episode` (or a dict with its four keys); ``Output.logits``
    are the (N*Q, N) query logits; logs ``acc`` (query accuracy) and ``loss_clean``.
    """

    name = "protonet"
    batch_type = "episode"  # the trainer feeds Episodes, not (x, y)

    def __call__(self, model: nn.Module, batch: Batch) -> Output:
        # a step is one episode, or a meta-batch of them (EpisodeBatch): the mean of their losses
        return mean_output([self.episode_step(model, ep) for ep in episodes_of(batch)])

    def __init__(self, metric: str = "euclidean", temperature: float = 1.0) -> None:
        check_choice("metric", metric, METRICS)
        self.task = FewShotTask(metric=metric, temperature=check_positive("temperature", temperature))

    def episode_step(self, model: nn.Module, ep: Episode) -> Output:
        """The prototypical loss of one episode's queries (clean support)."""
        logits = self.task.forward(model, ep)
        loss = self.task.loss(logits, ep.query_y)
        return Output(loss, logits, {"acc": self.task.accuracy(logits, ep.query_y), "loss_clean": float(loss.detach())})


@METHODS.register("protonet_aal")
class ProtoNetAAL(UsesAALCore, ProtoNet):
    """ProtoNet + AAL: meta-train on episodes whose support background is selectively attacked.

    Paper (seed 001, Sec. 4.3): "we selectively attack the background areas of images in the
    support set during training", kernel ``k(M^a) = 1 - M^a o M^a``, ResNet-12, ``xi1 = xi2 =
    zeta = 0.1``. Choices (not in the paper; named options):

    * ``attack_loss="query"``: the attack maximises the episode's prototypical loss on the clean
      queries (``"support"``: each support image's own loss against the clean prototypes);
      see :mod:`aal.tasks.fewshot`.
    * The training pass recomputes the attention on the attacked support (Alg. 1's second
      inference is an ordinary forward), and support + query go through the network together
      so BatchNorm sees the whole episode. (The classification method's ``adv_attention="fixed"``
      is not offered: holding the support's map at M^a would need the queries' maps in the same
      pass.)
    * The associative pass and the attack run in ``attack_mode`` (default eval: BatchNorm with
      running statistics, as the attacks), the training pass in train mode.
    * ``mask_control`` (``"uniform"``: the budget's per-image mean everywhere; ``"shuffle"``: its
      pixels permuted) is the control that separates *where* AAL attacks from *how much*.

    Args:
        eps: L-inf budget in [0,1] pixel units (default 8/255; 28x28 grey configs use 0.1).
        attack: ``"fgsm"`` (one step from the associative pass's gradient, no extra pass) or ``"pgd"``.
        xi1, xi2, zeta, coupling, rho: the associative attention's (:class:`aal.methods.aal.AAL`).
        kernel: budget kernel, default ``"1-m2"`` (background); ``"m2"`` (foreground) and
            ``"one"`` (non-selective: FGSM/PGD on the whole support) for ablations.
        rand_init, alpha: FGSM random start and step (as :class:`~aal.methods.aal.AAL`).
        steps, step_size: PGD iterations and step (PGD only; default 10 and ``2.5 * eps / steps``).
        clean_weight: weight ``w`` of the clean episode's loss: ``(1-w) * L(S') + w * L(S)``.
        attack_mode: model mode while computing M^a and crafting (``"eval"`` or ``"train"``).
        attack_loss: ``"query"`` or ``"support"``.
        mask_control: ``"none"``, ``"uniform"`` or ``"shuffle"``.
        metric, temperature: the prototypical head (:class:`ProtoNet`).

    Logs: ``acc`` and ``loss_adv`` (queries vs attacked support), the map diagnostics of
    :func:`aal.methods.aal_core.map_diagnostics` (``mask_mean``, ``mask_std``, ``m_mean``,
    ``m_std``, ``m_a_mean``, ``trigger_frac``, ``backtracked_frac``); ``loss_clean``/``acc_clean``
    when ``clean_weight > 0``. The associate -> budget -> attack step is
    :class:`aal.methods.aal_core.AALCore`; this class adds the episode's loss and the mix.
    """

    name = "protonet_aal"

    # the core's settings (eps, attack, xi1, ...) are its own list, with few-shot's background kernel;
    # few-shot offers neither the anti-selective control nor binarisation, and places M^a by receptive field
    core_defaults = {"kernel": "1-m2"}
    core_fixed = {"mask_binarize": None, "align": "receptive_field", "attacks": FEWSHOT_ATTACKS,
                  "mask_controls": FEWSHOT_MASK_CONTROLS}  # fmt: skip

    def __init__(
        self, clean_weight: float = 0.0, attack_loss: str = "query", metric: str = "euclidean",
        temperature: float = 1.0, **core: Any,
    ) -> None:  # fmt: skip
        check_choice("metric", metric, METRICS)
        check_choice("attack_loss", attack_loss, ATTACK_LOSSES)
        self.task = FewShotTask(metric, check_positive("temperature", temperature), attack_loss)
        self.core = self.make_core(core)
        self.clean_weight = check_fraction("clean_weight", clean_weight)

    # ------------------------------------------------------------------ pieces
    def associate(self, model: nn.Module, ep: Episode, loss_fn: LossFn | None = None) -> AssocResult:
        """M^a of the support images under the task's attack loss (``loss_fn``, built if not given)."""
        loss_fn = loss_fn or self.task.attack_loss_fn(model, ep, self.attack_mode)
        return self.core.associate(model, ep.support_x, ep.support_y, loss_fn)

    def budget(self, res: AssocResult) -> Tensor:
        """The per-pixel budget ``k(M^a)`` (B_s,1,H,W) in [0,1] (after the control, if any)."""
        return self.core.budget(res)

    def perturb(
        self, model: nn.Module, ep: Episode, res: AssocResult, mask: Tensor, loss_fn: LossFn | None = None
    ) -> Tensor:
        """The selectively attacked support ``S'`` (B_s,C,H,W) in [0,1], detached."""
        if loss_fn is None and self.attack == "pgd":  # FGSM needs no loss: it steps on the associative gradient
            loss_fn = self.task.attack_loss_fn(model, ep, self.attack_mode)
        return self.core.perturb(model, ep.support_x, ep.support_y, res, mask, loss_fn)

    def craft(self, model: nn.Module, batch: Batch) -> tuple[Tensor, AssocResult, Tensor]:
        """``(S', associative result, budget k(M^a))`` for an episode (training and visualisation)."""
        ep = as_episode(batch)
        loss_fn = self.task.attack_loss_fn(model, ep, self.attack_mode)  # fixed query/prototype embeddings
        s_adv, diag = self.core.craft(model, ep.support_x, ep.support_y, loss_fn)
        return s_adv, diag.res, diag.mask

    # ------------------------------------------------------------------ the method
    def episode_step(self, model: nn.Module, ep: Episode) -> Output:
        """One episode's step: the queries' loss against prototypes of the selectively attacked support."""
        s_adv, res, mask = self.craft(model, ep)
        logits = self.task.forward(model, ep, support_x=s_adv)
        loss_adv = self.task.loss(logits, ep.query_y)
        logs = {
            "acc": self.task.accuracy(logits, ep.query_y),
            "loss_adv": float(loss_adv.detach()),
            **map_diagnostics(res, mask, self.xi2),
        }
        loss = loss_adv
        if self.clean_weight > 0:
            logits_clean = self.task.forward(model, ep)
            loss_clean = self.task.loss(logits_clean, ep.query_y)
            loss = (1.0 - self.clean_weight) * loss_adv + self.clean_weight * loss_clean
            logs.update(loss_clean=float(loss_clean.detach()), acc_clean=self.task.accuracy(logits_clean, ep.query_y))
        return Output(loss, logits, logs)


__all__ = ["FEWSHOT_ATTACKS", "ProtoNet", "ProtoNetAAL"]
