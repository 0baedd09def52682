"""The few-shot task (AAL paper, seed 001, Sec. 4.3): prototypical head, attack loss, metric, runs.

A *task* says what loss the learner minimises, what loss the attack maximises and what metric is
reported; the methods (:mod:`aal.methods.protonet`), attacks, attention and the one trainer loop
are shared with classification. :class:`FewShotTask` is the prototypical-network head of Snell
et al. (NeurIPS 2017):

* prototypes ``c_n = mean_{i: y_i = n} f(x_i)`` over the support embeddings (B_s, F) -> (N, F);
* query logits ``-||f(q) - c_n||^2 / T`` (``metric="euclidean"``, Snell et al.'s squared
  Euclidean distance; ``T = temperature``, 1 in the paper) or ``cos(f(q), c_n) / T``
  (``metric="cosine"``; use ``T`` around 0.1, i.e. a scale of 10, or the softmax is too flat);
* the loss is the cross-entropy of the query logits; the metric is query accuracy.

**What the attack maximises** (``attack_loss``). The AAL paper attacks "the background areas of
images in the support set during training" and then evaluates on the query set, but does not
write the attacked loss down. We offer two, as a named option:

* ``"query"`` (default): the episode's own prototypical loss, the mean cross-entropy of the
  *clean* queries against prototypes built from the *perturbed* support. The attack thus
  perturbs the support in the direction that hurts the episode the learner is trained on.
  Query embeddings are computed once (no grad, in the attack's model mode) and held fixed.
  ``G`` is this one scalar; the attack API wants a per-sample vector ``(B_s,)``, so it is
  returned split evenly over the support images (their sum is ``G``; attacks and
  :func:`aal.attention.associative_attention` only differentiate the sum).
* ``"support"``: each support image's own prototype-classification loss, the cross-entropy of
  its perturbed embedding against the *clean* prototypes (fixed): a genuinely per-sample loss
  like classification's, which also works without queries.

Example:
    >>> import torch
    >>> task = FewShotTask()
    >>> s = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]); sy = torch.tensor([0, 0, 1])
    >>> task.prototypes(s, sy, 2)
    tensor([[1., 0.],
            [0., 4.]])
    >>> task.logits(s, sy, torch.tensor([[1.0, 1.0]]))
    tensor([[ -1., -10.]])
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aal.attacks.base import LossFn, attack_mode
from aal.config import RunConfigBase
from aal.models import create_model
from aal.registry import lookup
from aal.tasks.base import RunTask, TaskExperiment, register_task
from aal.utils.runtime import resolve_device, seed_everything
from aal.data.fewshot import FEWSHOT_DATASETS, Episode, EpisodeLoader, EpisodeSampler, FewShotData, as_episode

METRICS = ("euclidean", "cosine")
ATTACK_LOSSES = ("query", "support")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


@dataclass(frozen=True)
class FewShotTask:
    """Prototypical-network few-shot classification (Snell et al. 2017): loss, attack loss, metric.

    Args:
        metric: ``"euclidean"`` (negative squared distance, the paper's) or ``"cosine"``.
        temperature: logits are divided by it (> 0).
        attack_loss: what a support attack maximises, ``"query"`` or ``"support"`` (module doc).

    Shapes: support embeddings (B_s, F), support labels (B_s,) in ``[0, N)``, query embeddings
    (B_q, F) -> logits (B_q, N).
    """

    metric: str = "euclidean"
    temperature: float = 1.0
    attack_loss: str = "query"

    name: ClassVar[str] = "fewshot"
    metric_name: ClassVar[str] = "acc"

    def __post_init__(self) -> None:
        _check_choice("metric", self.metric, METRICS)
        _check_choice("attack_loss", self.attack_loss, ATTACK_LOSSES)
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")

    # ------------------------------------------------------------------ the head
    @staticmethod
    def prototypes(support_feats: Tensor, support_y: Tensor, n_way: int | None = None) -> Tensor:
        """Class means of the support embeddings, (N, F); every class needs >= 1 support image."""
        n = int(support_y.max()) + 1 if n_way is None else int(n_way)
        onehot = F.one_hot(support_y, n).to(support_feats.dtype)  # (B_s, N)
        counts = onehot.sum(0)
        if bool((counts == 0).any()):
            raise ValueError(f"every class 0..{n - 1} needs a support image; counts {counts.tolist()}")
        return onehot.t().matmul(support_feats) / counts[:, None]

    def logits_to_prototypes(self, query_feats: Tensor, protos: Tensor) -> Tensor:
        """(B_q, N) logits of query embeddings against prototypes."""
        if self.metric == "euclidean":
            # ||q - c||^2 exactly (cdist's matmul trick loses precision for near-equal vectors)
            d2 = (query_feats[:, None, :] - protos[None, :, :]).pow(2).sum(-1)
            return -d2 / self.temperature
        q = F.normalize(query_feats, dim=-1)
        c = F.normalize(protos, dim=-1)
        return q.matmul(c.t()) / self.temperature

    def logits(self, support_feats: Tensor, support_y: Tensor, query_feats: Tensor, n_way: int | None = None) -> Tensor:
        """Query logits (B_q, N) from support and query embeddings."""
        return self.logits_to_prototypes(query_feats, self.prototypes(support_feats, support_y, n_way))

    @staticmethod
    def loss(logits: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy of the query logits (the prototypical loss)."""
        return F.cross_entropy(logits, y)

    @staticmethod
    def accuracy(logits: Tensor, y: Tensor) -> float:
        """Query accuracy, a float in [0, 1] (the reported metric)."""
        return float((logits.detach().argmax(1) == y).float().mean()) if len(y) else float("nan")

    def forward(self, model: nn.Module, episode: Episode, support_x: Tensor | None = None) -> Tensor:
        """Query logits for an episode with one forward pass over support + query images.

        ``support_x`` replaces the episode's support images (e.g. attacked ones). Support and
        query go through the network together, as in Snell et al.'s code, so in train mode
        BatchNorm normalises them with the statistics of the whole episode.
        """
        sx = episode.support_x if support_x is None else support_x
        feats = model(torch.cat([sx, episode.query_x]))
        if feats.dim() != 2:
            raise ValueError(f"the backbone must return (B, F) embeddings, got shape {tuple(feats.shape)}")
        b = sx.shape[0]
        return self.logits(feats[:b], episode.support_y, feats[b:], episode.n_way)

    # ------------------------------------------------------------------ the attack's loss
    def attack_loss_fn(self, model: nn.Module, episode: Episode, mode: str = "eval") -> LossFn:
        """The per-sample loss ``(support_feats (B_s,F), support_y) -> (B_s,)`` a support attack maximises.

        Fixed quantities (query embeddings for ``"query"``, clean prototypes for ``"support"``)
        are computed here once, without gradients, with ``model`` in ``mode`` (as the attack).
        """
        ep = as_episode(episode)
        n = ep.n_way
        with attack_mode(model, mode), torch.no_grad():
            fixed = model(ep.query_x if self.attack_loss == "query" else ep.support_x)
        if self.attack_loss == "query":
            qy = ep.query_y

            def query_loss(support_feats: Tensor, support_y: Tensor) -> Tensor:
                g = F.cross_entropy(self.logits(support_feats, support_y, fixed, n), qy)
                b = support_feats.shape[0]
                return (g / b).expand(b)

            return query_loss
        protos = self.prototypes(fixed, ep.support_y, n)

        def support_loss(support_feats: Tensor, support_y: Tensor) -> Tensor:
            return F.cross_entropy(self.logits_to_prototypes(support_feats, protos), support_y, reduction="none")

        return support_loss


# ============================================================================= evaluation
def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, 1.96 * std / sqrt(n), std)`` with the sample standard deviation (ddof=1)."""
    v = torch.tensor(list(values), dtype=torch.float64)
    n = v.numel()
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    std = float(v.std(unbiased=True)) if n > 1 else 0.0
    return float(v.mean()), 1.96 * std / math.sqrt(n), std


@torch.no_grad()
def evaluate_fewshot(
    model: nn.Module,
    source: EpisodeSampler | Sequence[Episode],
    episodes: int | None = None,
    task: FewShotTask | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean query accuracy over test episodes with its 95% confidence interval.

    Args:
        model: the embedding network (``num_classes=0``); evaluated in eval mode (BatchNorm with
            running statistics), its mode restored afterwards.
        source: an :class:`~aal.data.fewshot.EpisodeSampler` over the meta-test pool (episode
            ``i`` = ``source.episode(i)``, the same episodes for every model) or a fixed list of
            episodes (e.g. Omniglot's 20 one-shot runs).
        episodes: number of sampler episodes (default 600, the usual protocol); for a list, the
            first ``episodes`` (default: all).
        task: the head (default :class:`FewShotTask()`; pass the training method's ``task``).
        device: where to run (default: the model's device).
        progress: tqdm bar.

    Returns:
        ``{"mean", "ci95", "std", "n", "n_way", "k_shot", "n_query"}``: accuracy in [0,1], its
        95% half-width ``1.96 * std / sqrt(n)`` (sample std over episodes), the episode count,
        and the episode shape (of the first episode for a list).

    Example:
        >>> import aal, torch
        >>> from aal.data import Split
        >>> pool = Split(torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8), torch.arange(60) % 6)
        >>> model = aal.create_model("small_cnn", num_classes=0)
        >>> r = evaluate_fewshot(model, EpisodeSampler(pool, 5, 1, 2), episodes=10)
        >>> sorted(r), r["n"]
        (['ci95', 'k_shot', 'mean', 'n', 'n_query', 'n_way', 'std'], 10)
    """
    task = task or FewShotTask()
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    if isinstance(source, EpisodeSampler):
        n = 600 if episodes is None else int(episodes)
        items: Iterable[Episode] = (source.episode(i) for i in range(n))
    else:
        items = list(source)[: episodes if episodes is not None else None]
        n = len(items)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError("evaluate_fewshot needs at least one episode")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    accs, shape = [], None
    try:
        from tqdm.auto import tqdm

        for ep in tqdm(items, total=n, desc="few-shot eval", disable=not progress, leave=False):
            ep = ep.to(device)
            if shape is None:
                k = int((ep.support_y == 0).sum())
                shape = (ep.n_way, k, int((ep.query_y == 0).sum()))
            accs.append(task.accuracy(task.forward(model, ep), ep.query_y))
    finally:
        for m, training in modes:
            m.training = training
    mean, ci, std = mean_ci95(accs)
    return {"mean": mean, "ci95": ci, "std": std, "n": len(accs), "n_way": shape[0], "k_shot": shape[1], "n_query": shape[2]}


# ============================================================================= config -> run
@dataclass(frozen=True)
class FewShotDataConfig:
    """The ``data:`` section of a few-shot run: the dataset and the meta-training episodes.

    Attributes:
        name: a :data:`~aal.data.fewshot.FEWSHOT_DATASETS` name (``fashion_mnist_split``,
            ``omniglot``, ``mini_imagenet``, ``tiered_imagenet``).
        root: its files' folder (``None``: the dataset's default search path).
        download: allow downloading (Omniglot only).
        options: the dataset factory's keyword arguments (e.g. Omniglot's ``background``).
        n_way, k_shot, n_query: meta-training episodes (Snell et al. train with more ways than
            they test: 60-way on Omniglot, 30/20-way on miniImageNet).
        episodes: training episodes per epoch.
    """

    name: str = "fashion_mnist_split"
    root: str | None = None
    download: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    n_way: int = 5
    k_shot: int = 5
    n_query: int = 15
    episodes: int = 100


@dataclass(frozen=True)
class FewShotEvalConfig:
    """The ``eval:`` section of a few-shot run: the test protocol.

    Attributes:
        n_way, shots, n_query: test episodes, one evaluation per shot count (default 5-way 1-
            and 5-shot with 15 queries per class, the usual protocol).
        episodes: episodes per final evaluation (>= 600 for reported numbers).
        epoch_episodes: episodes of the per-epoch monitoring evaluation (0: off), with the first
            of ``shots``, on the meta-validation pool when the dataset has one, else on the
            meta-test pool (monitoring only: the reported model is the last epoch's).
        seed: base seed of the evaluation episodes (episode ``i`` is drawn from ``(seed, i)``).
        runs: also evaluate on the dataset's fixed runs (Omniglot's 20-way one-shot runs).
    """

    n_way: int = 5
    shots: tuple[int, ...] = (1, 5)
    n_query: int = 15
    episodes: int = 600
    epoch_episodes: int = 100
    seed: int = 0
    runs: bool = True


@dataclass(frozen=True)
class FewShotRunConfig(RunConfigBase):
    """A few-shot training run (``task: fewshot`` in the YAML).

    The top-level keys are :class:`aal.config.RunConfigBase`'s; the ``model``, ``method``,
    ``optim`` and ``schedule`` sections those of :class:`aal.config.RunConfig`; ``data`` and
    ``eval`` are the few-shot ones above. The model is built with ``num_classes=0`` (an embedding
    network) and the method must be episodic (``protonet``, ``protonet_aal``).
    """

    task: str = "fewshot"
    data: FewShotDataConfig = field(default_factory=FewShotDataConfig)
    model: Any = None
    method: Any = None
    optim: Any = None
    schedule: Any = None
    eval: FewShotEvalConfig = field(default_factory=FewShotEvalConfig)


def is_fewshot_config(raw: Any) -> bool:
    """Whether a loaded YAML mapping (or a config object) describes a few-shot run (``task: fewshot``)."""
    return isinstance(raw, FewShotRunConfig) or (isinstance(raw, Mapping) and raw.get("task") == "fewshot")


def fewshot_config(raw: Mapping[str, Any], validate: bool = True) -> FewShotRunConfig:
    """Build and validate a :class:`FewShotRunConfig` from a nested dict (a loaded YAML).

    Raises:
        aal.config.ConfigError: unknown keys or names, impossible values, a non-episodic method
            (the message names the key).
    """
    from aal.config import (ConfigError, MethodConfig, ModelConfig, OptimConfig, ScheduleConfig, _build_section, check_kwargs,
                            check_run_fields, clip, coerce, short)

    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(raw).__name__}")
    shared = {"model": ModelConfig, "method": MethodConfig, "optim": OptimConfig, "schedule": ScheduleConfig}
    own = {"data": FewShotDataConfig, "eval": FewShotEvalConfig}
    hints = typing.get_type_hints(FewShotRunConfig)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in shared or key in own:
            kwargs[key] = _build_section({**shared, **own}[key], value or {}, key)
        elif key in hints:
            kwargs[key] = coerce(value, hints[key], key)
        else:
            raise ConfigError(f"unknown key '{clip(key, 60)}' (known: {', '.join(hints)})")
    # sections left out get few-shot defaults (not the classification ones of aal.config)
    kwargs.setdefault("model", ModelConfig(name="small_cnn", attention="cbam"))
    kwargs.setdefault("method", MethodConfig(name="protonet"))
    kwargs.setdefault("optim", OptimConfig(lr=0.01))
    kwargs.setdefault("schedule", ScheduleConfig())
    cfg = FewShotRunConfig(**kwargs)
    if cfg.task != "fewshot":
        raise ConfigError(f"task: a few-shot config must say task: fewshot, got {short(cfg.task)}")
    if not validate:
        return cfg
    from aal.attention import ATTENTION
    METHODS = lookup("method")  # late lookup: the methods build on the tasks (see tests/test_layering.py)
    from aal.models import MODELS

    check_run_fields(cfg)
    d, e = cfg.data, cfg.eval
    if d.name not in FEWSHOT_DATASETS:
        raise ConfigError(f"data.name: unknown few-shot dataset {short(d.name)} (known: {', '.join(FEWSHOT_DATASETS.names())})")
    d = dataclasses.replace(d, options=check_kwargs(FEWSHOT_DATASETS.get(d.name), d.options, "data.options", skip=("root", "download")))
    for prefix, sec, keys in (("data", d, ("n_way", "k_shot", "n_query", "episodes")), ("eval", e, ("n_way", "n_query", "episodes"))):
        for key in keys:
            if getattr(sec, key) < 1:
                raise ConfigError(f"{prefix}.{key}: must be >= 1, got {getattr(sec, key)}")
    if e.epoch_episodes < 0:
        raise ConfigError(f"eval.epoch_episodes: must be >= 0, got {e.epoch_episodes}")
    if not e.shots or min(e.shots) < 1:
        raise ConfigError(f"eval.shots: need shot counts >= 1, got {list(e.shots)}")
    m = cfg.model
    if m.name not in MODELS or getattr(MODELS.get(m.name), "task", None) not in (None, "classification"):
        raise ConfigError(f"model.name: {short(m.name)} is not a registered image-classification backbone")
    if m.attention not in ATTENTION:
        raise ConfigError(f"model.attention: unknown attention {short(m.attention)} (known: {', '.join(ATTENTION.names())})")
    options = check_kwargs(MODELS.get(m.name), m.options, "model", skip=("num_classes", "in_channels", "mean", "std", "attention"))
    name = cfg.method.name
    if name not in METHODS or getattr(METHODS.get(name), "batch_type", None) != "episode":
        ms = [n for n in METHODS.names() if getattr(METHODS.get(n), "batch_type", None) == "episode"]
        raise ConfigError(f"method.name: {short(name)} is not an episodic method (known: {', '.join(ms)})")
    params = check_kwargs(METHODS.get(name), cfg.method.params, "method")
    try:
        METHODS.create(name, **params)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method ({name}): {err}") from err
    return dataclasses.replace(
        cfg, data=d, model=dataclasses.replace(m, options=options), method=dataclasses.replace(cfg.method, params=params)
    )


def merge_config(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively with ``new`` (nested mappings merged, other values replaced)."""
    from aal.config import _merge

    return _merge(dict(base), new)


def load_fewshot_config(path: str | Path | None, overrides: Sequence[str] = (), validate: bool = True) -> FewShotRunConfig:
    """Read a few-shot YAML config and apply ``key=value`` overrides (e.g. ``data.k_shot=1``);
    :meth:`aal.tasks.base.RunTask.load_config` of :data:`FEWSHOT`."""
    return FEWSHOT.load_config(path, overrides, validate=validate)


@dataclass
class FewShotExperiment:
    """Everything a few-shot run needs (built by :func:`build_fewshot_experiment`)."""

    cfg: FewShotRunConfig
    data: FewShotData
    model: nn.Module
    method: Any  # an episodic aal.methods.Method, with a ``task`` attribute
    loader: EpisodeLoader

    @property
    def task(self) -> FewShotTask:
        """The head the method trains (and evaluation uses)."""
        return self.method.task

    def test_samplers(self, pool: str = "test") -> dict[str, EpisodeSampler]:
        """``{"5way1shot": sampler, ...}`` over the meta-test (or ``"val"``) pool, one per eval shot."""
        e = self.cfg.eval
        split = self.data.val if pool == "val" else self.data.test
        if split is None:
            return {}
        return {f"{e.n_way}way{k}shot": EpisodeSampler(split, e.n_way, k, e.n_query, seed=e.seed) for k in e.shots}

    def epoch_eval_fn(self) -> Callable[[nn.Module], dict[str, float]] | None:
        """The trainer's per-epoch monitoring evaluation (``None`` when ``eval.epoch_episodes == 0``)."""
        e = self.cfg.eval
        pool = "val" if self.data.val is not None else "test"
        samplers = self.test_samplers(pool)
        if e.epoch_episodes == 0 or not samplers:
            return None
        key, sampler = next(iter(samplers.items()))

        def fn(model: nn.Module) -> dict[str, float]:
            r = evaluate_fewshot(model, sampler, e.epoch_episodes, self.task)
            return {f"{pool}_{key}_acc": r["mean"], f"{pool}_{key}_ci95": r["ci95"]}

        return fn

    def final_eval(self, episodes: int | None = None, progress: bool = False) -> dict[str, dict[str, Any]]:
        """Accuracy ± 95% CI on ``eval.episodes`` meta-test episodes per shot count, and on the runs."""
        n = self.cfg.eval.episodes if episodes is None else episodes
        out = {k: evaluate_fewshot(self.model, s, n, self.task, progress=progress) for k, s in self.test_samplers().items()}
        if self.cfg.eval.runs and self.data.runs:
            r = self.data.runs[0]
            key = f"runs_{r.n_way}way{int((r.support_y == 0).sum())}shot"
            out[key] = evaluate_fewshot(self.model, self.data.runs, task=self.task)
        return out


def build_fewshot_experiment(
    cfg: FewShotRunConfig | Mapping[str, Any],
    data: FewShotData | None = None,
    device: str | torch.device | None = "auto",
) -> FewShotExperiment:
    """Data, embedding model, episodic method and episode loader for a few-shot config (seeded).

    Args:
        cfg: a :class:`FewShotRunConfig` or a config dict (a loaded YAML with ``task: fewshot``).
        data: an already loaded dataset (skips reading the files again, e.g. across seeds).
        device: where the model and the episodes go (``"auto"``: CUDA when available).

    The model is ``create_model(model.name, num_classes=0, ...)``: the embedding network, with
    the dataset's meta-train mean/std inside it when ``model.normalize``.

    Example:
        >>> exp = build_fewshot_experiment({"task": "fewshot", "data": {"episodes": 2}})  # doctest: +SKIP
        >>> len(exp.loader), exp.method.name                                             # doctest: +SKIP
        (2, 'protonet')
    """
    cfg = cfg if isinstance(cfg, FewShotRunConfig) else fewshot_config(cfg)
    seed_everything(cfg.seed)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    d = cfg.data
    if data is None:
        data = FEWSHOT_DATASETS.get(d.name)(root=d.root, download=d.download, **dict(d.options))
    m = cfg.model
    mean, std = data.stats() if m.normalize else (None, None)
    model = create_model(
        m.name, num_classes=0, in_channels=data.in_channels, mean=mean, std=std,
        attention=None if m.attention == "none" else m.attention, channels_last=bool(m.channels_last), **dict(m.options),
    )  # fmt: skip
    device = resolve_device(device)
    model.to(device)
    method = lookup("method").create(cfg.method.name, **dict(cfg.method.params))  # methods build on the tasks
    sampler = EpisodeSampler(data.train, d.n_way, d.k_shot, d.n_query, seed=cfg.seed)
    loader = EpisodeLoader(sampler, d.episodes, seed=cfg.seed, device=device)
    return FewShotExperiment(cfg, data, model, method, loader)


def format_fewshot_results(results: Mapping[str, Any]) -> str:
    """One line per evaluation: ``5way1shot  xx.xx % +- y.yy  (n=600 episodes)``."""
    return "\n".join(f"{key:<24} {100 * r['mean']:6.2f} % +- {100 * r['ci95']:.2f}  (n={r['n']} episodes)"
                     for key, r in results.items())


class FewShotRunTask(RunTask):
    """Few-shot learning: prototypical episodes, accuracy +- 95% CI (AAL paper, Sec. 4.3)."""

    name = "fewshot"
    config_type = FewShotRunConfig

    def config_from_dict(self, raw: Mapping[str, Any], validate: bool = True) -> FewShotRunConfig:
        return fewshot_config(raw, validate=validate)

    def build(self, cfg: FewShotRunConfig, device: torch.device, data: FewShotData | None = None) -> TaskExperiment:
        exp = build_fewshot_experiment(cfg, data, device)
        return TaskExperiment(
            cfg=exp.cfg, model=exp.model, method=exp.method, loader=exp.loader, native=exp,
            epoch_eval=exp.epoch_eval_fn(), final_eval=lambda progress: exp.final_eval(progress=progress),
            result_fields=lambda results: {"fewshot": results, "episodes_per_epoch": exp.cfg.data.episodes},
        )  # fmt: skip

    def evaluate(self, native: FewShotExperiment, n: int | None = None) -> dict[str, dict[str, Any]]:
        return native.final_eval(episodes=n)

    def format_result(self, result: Mapping[str, Any]) -> str:
        return format_fewshot_results(result)


FEWSHOT = register_task(FewShotRunTask())


__all__ = [
    "ATTACK_LOSSES",
    "FEWSHOT",
    "FewShotRunTask",
    "build_fewshot_experiment",
    "format_fewshot_results",
    "FewShotDataConfig",
    "FewShotEvalConfig",
    "FewShotExperiment",
    "FewShotRunConfig",
    "FewShotTask",
    "METRICS",
    "evaluate_fewshot",
    "fewshot_config",
    "is_fewshot_config",
    "load_fewshot_config",
    "mean_ci95",
    "merge_config",
]
