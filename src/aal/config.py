"""Typed, frozen run configuration loaded from YAML with ``key=value`` overrides.

A config file has sections mirroring the dataclasses below::

    seed: 0
    epochs: 10
    data:   {name: fashion_mnist, batch_size: 128}
    model:  {name: small_cnn, attention: none}      # extra keys -> model options (e.g. stem: cifar)
    method: {name: pgd_at, eps: 0.1, steps: 10}     # extra keys -> the method's hyper-parameters
    optim:  {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}
    schedule: {name: cosine}
    eval:   {attacks: [clean, fgsm, pgd20], eps: 0.1}

Overrides use dotted keys: ``method.eps=8/255 optim.lr=0.05 epochs=3``. Every float accepts a
fraction such as ``8/255``. Validation happens before any work starts: unknown keys, unknown
registered names and impossible values raise :class:`ConfigError` with a one-line message that
names the key (the CLI turns it into exit code 2). Method and model hyper-parameters are
validated against the registered factory's signature and type annotations, and the method is
built once as a dry run so that its own checks (e.g. ``steps >= 1``) fire early.

Example:
    >>> from aal.config import load_config
    >>> cfg = load_config(None, ["method.name=fgsm_at", "method.eps=8/255", "epochs=2"])
    >>> cfg.method.name, round(cfg.method.params["eps"], 5), cfg.epochs
    ('fgsm_at', 0.03137, 2)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from aal.data.base import DataError
from aal.data.limits import read_file_bounded
from aal.registry import lookup
from aal.utils.precision import check_precision


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending key."""


#: The longest echo of a user value in an error message (characters); longer values are elided
#: in the middle (reprlib style), so an error about a huge value stays one readable line.
MAX_ECHO = 200
#: The largest config file read (bytes). Real configs are under 2 KB.
MAX_CONFIG_BYTES = 1 << 20

_echo = reprlib.Repr()  # attributes, not keywords: keywords need Python 3.12
_echo.maxlevel, _echo.maxstring, _echo.maxother = 3, MAX_ECHO, MAX_ECHO
_echo.maxlist = _echo.maxtuple = _echo.maxdict = _echo.maxset = 8


def short(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` capped at ``limit`` characters, for error messages.

    Containers show their first elements only (``reprlib``), and whatever is still longer is cut
    in the middle, so the cost is bounded whatever the value's size or nesting.

    Example:
        >>> short("x" * 1000)[:12], len(short("x" * 1000)) <= MAX_ECHO
        ("'xxxxxxxxxxx", True)
        >>> short(list(range(100)))
        '[0, 1, 2, 3, 4, 5, 6, 7, ...]'
    """
    return clip(_echo.repr(value), limit)


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` cut in the middle to at most ``limit`` characters (for messages that embed other messages)."""
    text = str(text)
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


class _AliasRefused(yaml.composer.ComposerError):
    """An alias to a defined anchor: refused (see :class:`_NoAliasLoader`)."""


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader with aliases (``*name``) refused.

    An alias shares a node; nested aliases expand exponentially when the loaded value is walked
    or printed (the "billion laughs": 1 KB of YAML, gigabytes once rendered). A config never needs
    them, so the composer refuses the first alias of a defined anchor instead of bounding the
    expansion (an undefined alias stays PyYAML's own error).
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent) and self.peek_event().anchor in self.anchors:
            event = self.peek_event()
            raise _AliasRefused(
                None, None, f"alias *{clip(event.anchor, 40)} is not allowed (aal configs refuse YAML aliases)",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """``line:col: problem`` of a PyYAML error (one line; its own message spans 4-8)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err)
    where = f"{mark.line + 1}:{mark.column + 1}: " if mark is not None else ""
    return f"{where}{' '.join(str(problem).split())}"


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML with the safe loader, no aliases; errors as one-line :class:`ConfigError`.

    Args:
        text: the document.
        source: what to name in errors (a file path, or the override being parsed).

    Raises:
        ConfigError: ``"<source>:<line>:<col>: <problem>"`` for invalid YAML or an alias;
            a document nested too deeply for the parser.

    Example:
        >>> parse_yaml("a: {b: 1}")
        {'a': {'b': 1}}
        >>> parse_yaml("a: &x [1]\\nb: *x", "c.yaml")
        Traceback (most recent call last):
        ...
        aal.config.ConfigError: c.yaml:2:4: alias *x is not allowed (aal configs refuse YAML aliases)
    """
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}:{_yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML (nested too deeply)") from None


def read_yaml_file(path: str | Path) -> Any:
    """Read and parse a YAML file (see :func:`parse_yaml`); at most :data:`MAX_CONFIG_BYTES`.

    Raises:
        ConfigError: missing or not a regular file, too large, not UTF-8, or not valid YAML
            (one line naming the file).
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:  # a regular file of at most MAX_CONFIG_BYTES, read with a bound
        data = read_file_bounded(p, MAX_CONFIG_BYTES, "config file")
    except DataError as err:
        raise ConfigError(str(err)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_yaml(text, str(p))


_FRACTION = re.compile(r"^\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*/\s*(\d*\.?\d+(?:[eE][-+]?\d+)?)\s*$")


def parse_float(value: Any, key: str) -> float:
    """A float from a number or a string such as ``"0.1"`` or ``"8/255"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {short(value)}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _FRACTION.match(value)
        if m:
            den = float(m[2])
            if den == 0:
                raise ConfigError(f"{key}: division by zero in {short(value)}")
            return float(m[1]) / den
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number (e.g. 0.1 or 8/255), got {short(value)}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` (int, float, bool, str, Optional, tuple, Literal)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {short(value)} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, args))}, got {short(value)}")
        return value
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {short(value)}")
        inner = args[0] if args else Any
        return tuple(coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {short(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {short(value)}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
            raise ConfigError(f"{key}: expected an integer, got {short(value)}")
        return int(value)
    if tp is float:
        return parse_float(value, key)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {short(value)}")
        return value
    return value


# ----------------------------------------------------------------------------- the sections
@dataclass(frozen=True)
class DataConfig:
    """Dataset and loader settings.

    Attributes:
        name: registered dataset (``aal list``).
        root: directory of the official files (default: the dataset's own default, if any).
        val_fraction: fraction of the training set held out for per-epoch validation.
        batch_size: training batch size (global; divided across processes when distributed).
        augment: ``none``, ``crop`` or ``crop_flip`` (batched, in torch, seeded).
        padding: zero padding of the random crop.
        download: allow downloading the official files (with checksums) if missing.
        train_n: train on the first ``train_n`` training images only (quick runs, tests).
    """

    name: str = "fashion_mnist"
    root: str | None = None
    val_fraction: float = 0.0
    batch_size: int = 128
    augment: str = "none"
    padding: int = 4
    download: bool = False
    train_n: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Model settings.

    Attributes:
        name: registered model.
        attention: attention layer after the first convolution (``none``, ``cbam``, ...).
        normalize: put the dataset's mean/std normalisation inside the model.
        channels_last: memory format; ``None`` picks the default measured faster for the model
            (channels_last for convolutional nets with pooling, see :func:`aal.utils.runtime`).
        head: classifier head: ``linear`` (the model's own) or ``cosine`` (L2-normalised features
            and weights, scaled by ``head_scale``; SPAT needs it).
        head_scale: scale ``s`` of the cosine head.
        options: model-specific keyword arguments (any other key of the ``model`` section).
    """

    name: str = "small_cnn"
    attention: str = "none"
    normalize: bool = True
    channels_last: bool | None = None
    head: str = "linear"
    head_scale: float = 8.0
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodConfig:
    """Training method: its registered name and hyper-parameters (every other key)."""

    name: str = "pgd_at"
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer (SGD with momentum by default, as in the AAL paper and Madry et al.)."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule, stepped every iteration.

    Attributes:
        name: ``cosine`` (to 0, no restart), ``multistep`` or ``constant``.
        milestones: epochs at which ``multistep`` multiplies the LR by ``gamma``.
        gamma: multistep factor.
        warmup_epochs: linear warm-up length.
    """

    name: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings.

    Attributes:
        attacks: final evaluation attacks (specs such as ``clean``, ``fgsm``, ``pgd20``, ``pgd50x5``).
        eps: evaluation budget (L-inf unless a spec says ``-l2``); always full, unmasked attacks.
        n: evaluate on the first ``n`` test images (``None``: the whole test set).
        batch_size: evaluation batch size.
        epoch_attacks: attacks run at the end of every epoch on the validation data.
        epoch_n: number of validation (or test, if no validation split) images used per epoch.
        seed: seed of the attacks' random starts.
        suite: after training, ``aal train`` also runs this evaluation suite (:mod:`aal.eval.suite`:
            ``standard`` is AutoAttack's standard version, ``fast``, ``rand``) at ``eps`` (L-inf) on
            the first ``suite_n`` test images, resumable, with its state in ``RUN/eval/`` (the file
            ``aal eval RUN --suite ...`` uses); ``none`` (default): no suite.
        suite_n: test images of that suite (``None``: all).
        report: after training (and the suite), ``aal train`` writes the Markdown report of the run
            into ``RUN/report/`` (``aal report``: tables, plots, and the attention figure for AAL
            runs) and prints its path.
        report_n: test images of the report's own PGD measurements.
    """

    attacks: tuple[str, ...] = ("clean", "fgsm", "pgd20")
    eps: float = 0.1
    n: int | None = None
    batch_size: int = 500
    epoch_attacks: tuple[str, ...] = ("clean", "pgd10")
    epoch_n: int = 1000
    seed: int = 0
    suite: str = "none"
    suite_n: int | None = 1000
    report: bool = False
    report_n: int = 500


SUITE_NAMES = ("none", "fast", "standard", "rand")
"""Values of ``eval.suite``: ``none`` or a suite of :data:`aal.eval.suite.SUITES` (a test keeps them equal)."""


@dataclass(frozen=True)
class RunConfigBase:
    """The run-level keys every task's run config shares (classification, few-shot, detection).

    One definition and one validation (:func:`check_run_fields`): a key added here is accepted,
    dumped and checked the same way for every task, and the one runner
    (:func:`aal.engine.run.run_task`) reads only these and the ``optim``/``schedule`` sections.

    Attributes:
        seed: seed of everything (weights, data order, augmentation, random starts).
        epochs: training epochs.
        out_dir: parent directory of run folders.
        name: run folder name (default: ``<method>-<dataset>-<timestamp>``).
        progress: show progress bars.
        malloc_tune: tune glibc malloc at process start (see :func:`aal.utils.runtime.tune_malloc`);
            ``aal train`` applies it for every task.
        threads: torch intra-op threads (``None``: torch's default).
        checkpoint_every: save a checkpoint every this many epochs (and at the end).
        grad_clip: clip the gradient norm (``None``: off).
        logger: experiment tracking besides ``metrics.jsonl`` (always written): ``none``
            (default) or ``tensorboard`` (event files in ``RUN/tensorboard/``, needs the
            ``tensorboard`` package: ``pip install "aal[tensorboard]"``); see :mod:`aal.engine.tracking`.
        precision: training arithmetic: ``fp32`` (default), ``bf16`` (autocast over the whole
            training step, attacks included; CPU or CUDA) or ``fp16`` (CUDA only, with a loss
            scaler); see :mod:`aal.utils.precision`. Evaluation runs in fp32 whatever this says.
        compile: train through ``torch.compile(model)`` (default off; see :class:`aal.engine.Trainer`).
    """

    seed: int = 0
    epochs: int = 10
    out_dir: str = "runs"
    name: str | None = None
    progress: bool = True
    malloc_tune: bool = True
    threads: int | None = None
    checkpoint_every: int = 1
    grad_clip: float | None = None
    logger: str = "none"
    precision: str = "fp32"
    compile: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-able nested dict in the file layout (flattened params/options)."""
        return config_to_dict(self)


@dataclass(frozen=True)
class RunConfig(RunConfigBase):
    """A whole classification training run: :class:`RunConfigBase` and the sections below.

    Attributes:
        device: where the model trains: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or
            ``"auto"`` (cuda when available). Batches move to the model's device; under torchrun
            a ``cuda`` run uses nccl and one GPU per process.
    """

    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A frozen run config (classification, few-shot or detection) as a plain nested dict.

    The layout is the YAML file's: the model's ``options`` and the method's ``params`` are
    flattened into their sections, tuples become lists, so ``load`` of the dump gives ``cfg`` back.
    """
    names = [f.name for f in dataclasses.fields(cfg)]
    # ``task`` first (a few-shot or detection file opens with it), then the fields in order
    d = {n: getattr(cfg, n) for n in sorted(names, key=lambda n: n != "task")}
    for key, value in d.items():
        if dataclasses.is_dataclass(value):
            d[key] = dataclasses.asdict(value)
    d["model"] = {k: v for k, v in d["model"].items() if k != "options"} | dict(cfg.model.options)
    d["method"] = {"name": cfg.method.name} | dict(cfg.method.params)
    return _plain(d)


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "method": MethodConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "eval": EvalConfig,
}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_section(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping, got {short(raw)}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        if cls is ModelConfig and key not in names:
            extra[key] = value
            continue
        if cls is MethodConfig and key != "name":
            extra[key] = value
            continue
        # ModelConfig.options / MethodConfig.params collect the extra keys: never given by name
        collected = ("options", "params") if cls in (ModelConfig, MethodConfig) else ()
        if key not in names or key in collected:
            known = [n for n in names if n not in collected]
            raise ConfigError(f"unknown key '{prefix}.{clip(key, 60)}' (known: {', '.join(known)})")
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}")
    if cls is ModelConfig:
        kwargs["options"] = extra
    if cls is MethodConfig:
        kwargs["params"] = extra
    return cls(**kwargs)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {short(dotted)}: {short(p)} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=8/255"]`` -> nested dict; values parsed as YAML scalars (strings kept)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {short(item)} must look like key=value (e.g. method.eps=8/255)")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override {short(item)} has an empty key")
        if key == "base":  # resolved when the file is read, before any override applies
            raise ConfigError(f"override {short(item)}: base is named inside a config file, not as an override")
        try:
            value = yaml.load(text, Loader=_NoAliasLoader) if text.strip() else ""  # noqa: S506
        except _AliasRefused as err:
            raise ConfigError(f"override {short(key)}: {_yaml_problem(err)}") from None
        except (yaml.YAMLError, RecursionError):  # not YAML: the text itself is the value
            value = text
        _set_dotted(out, key, value)
    return out


def _merge(base: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def config_from_dict(raw: Mapping[str, Any], validate: bool = True) -> RunConfig:
    """Build and (optionally) validate a :class:`RunConfig` from a nested dict."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(raw).__name__}")
    hints = _hints(RunConfig)
    kwargs: dict[str, Any] = {}
    top = [f.name for f in dataclasses.fields(RunConfig)]
    for key, value in raw.items():
        if key in _SECTIONS:
            kwargs[key] = _build_section(_SECTIONS[key], value or {}, key)
        elif key in top:
            kwargs[key] = coerce(value, hints[key], key)
        else:
            raise ConfigError(f"unknown key '{clip(key, 60)}' (known: {', '.join(top)})")
    cfg = RunConfig(**kwargs)
    if validate:
        cfg = validate_config(cfg)
    return cfg


#: The longest ``base:`` chain (a file, its base, the base's base, ...); real ones have one link.
MAX_BASE_DEPTH = 8


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping, with its ``base:`` chain resolved.

    ``base: standard.yaml`` (a path relative to the file's own folder) reads that file first,
    resolved the same way, and merges this file's keys over it as overrides merge over a file:
    a section merges key by key into the base's section (``model: {attention: cbam_in}`` keeps
    the base's model name and options), any other value replaces the base's. So a recipe is
    written once and each method's file states what differs; the run folder's ``config.yaml``
    holds the resolved config, never a ``base`` key.

    Raises:
        ConfigError: what :func:`read_yaml_file` raises for either file; a top level that is not a
            mapping; a ``base`` that is not a non-empty string, is missing, forms a cycle, or
            chains deeper than :data:`MAX_BASE_DEPTH` (one line naming the including file).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "recipe.yaml").write_text("epochs: 3\\nmethod: {name: pgd_at, eps: 0.1}\\n")
        >>> _ = (d / "run.yaml").write_text("base: recipe.yaml\\nmethod: {steps: 5}\\n")
        >>> read_config_file(d / "run.yaml")
        {'epochs': 3, 'method': {'name': 'pgd_at', 'eps': 0.1, 'steps': 5}}
    """
    return _read_config_chain(Path(path), ())


def _read_config_chain(p: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    loaded = read_yaml_file(p)
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: a config must be a mapping at the top level")
    if "base" not in loaded:
        return loaded
    base = loaded.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{p}: base: expected a config file path (relative to {p.parent}), got {short(base)}")
    target = p.parent / base
    chain = (*chain, p.resolve())
    if (key := target.resolve()) in chain:
        names = " -> ".join(c.name for c in (*chain, key))
        raise ConfigError(f"{p}: base: {short(base)} makes a cycle ({names})")
    if len(chain) > MAX_BASE_DEPTH:
        raise ConfigError(f"{p}: base: chains deeper than {MAX_BASE_DEPTH} files")
    if not target.exists():
        raise ConfigError(f"{p}: base: config file not found: {target}")
    return _merge(_read_config_chain(target, chain), loaded)


def load_config(path: str | Path | None, overrides: Sequence[str] = (), validate: bool = True) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None; ``base:`` chains resolved, see
    :func:`read_config_file`) and apply overrides."""
    raw = read_config_file(path) if path is not None else {}
    raw = _merge(raw, parse_overrides(overrides))
    return config_from_dict(raw, validate=validate)


# ----------------------------------------------------------------------------- validation
def check_kwargs(factory: Any, params: Mapping[str, Any], prefix: str, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Validate ``params`` against ``factory``'s keyword arguments and annotations; return coerced copies."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target)
    except (NameError, TypeError):
        hints = {}
    accepted = {
        n: p for n, p in sig.parameters.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in skip or (key not in accepted and not has_var_kw):
            known = [n for n in accepted if n not in skip]
            raise ConfigError(f"unknown key '{prefix}.{clip(key, 60)}' (known: {', '.join(known) or 'none'})")
        out[key] = coerce(value, hints.get(key, Any), f"{prefix}.{key}")
    return out


def _positive(value: float | int | None, key: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


LOGGERS = ("none", "tensorboard")
"""Values of a run config's ``logger`` key (:mod:`aal.engine.tracking` implements them)."""


def check_logger(name: Any) -> None:
    """Refuse an unknown ``logger`` value, and ``tensorboard`` when its package is missing.

    Checked with the rest of the config, before any data is read or folder made.

    Raises:
        ConfigError: naming the key (and, for a missing package, how to install it).
    """
    if name not in LOGGERS:
        raise ConfigError(f"logger: must be one of {', '.join(LOGGERS)}; got {short(name)}")
    if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError('logger: tensorboard needs the tensorboard package, which is not installed '
                          '(pip install "aal[tensorboard]", or pip install tensorboard)')


def check_precision_key(precision: Any, device: Any = "cpu") -> None:
    """Refuse an unknown ``precision`` (listing :data:`aal.utils.precision.PRECISIONS`), and ``fp16`` off CUDA.

    ``device`` is the run's (``cpu``, ``cuda[:N]``, or ``auto``: CUDA when available).

    Raises:
        ConfigError: naming the key.
    """
    try:
        check_precision(precision, device)
    except ValueError as err:
        raise ConfigError(clip(str(err))) from None


def check_run_fields(cfg: Any) -> None:
    """Validate the keys of :class:`RunConfigBase` and the ``optim``/``schedule`` sections of any
    task's run config (one check for every task, so none accepts what another refuses).

    Raises:
        ConfigError: naming the key.
    """
    _positive(cfg.epochs, "epochs")
    _positive(cfg.checkpoint_every, "checkpoint_every")
    _positive(cfg.threads, "threads")
    _positive(cfg.grad_clip, "grad_clip")
    check_logger(cfg.logger)
    # a task without a device key trains where its runner puts it ("auto": CUDA when available)
    device = getattr(cfg, "device", "auto")
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", str(device)):  # before precision, which reads it
        raise ConfigError(f"device: must be cpu, cuda, cuda:N or auto; got {str(device)[:80]!r}")
    check_precision_key(cfg.precision, device)
    o = cfg.optim
    if o.name not in ("sgd", "adam"):
        raise ConfigError(f"optim.name: must be sgd or adam, got {short(o.name)}")
    _positive(o.lr, "optim.lr")
    _positive(o.weight_decay, "optim.weight_decay", allow_zero=True)
    _positive(o.momentum, "optim.momentum", allow_zero=True)
    s = cfg.schedule
    if s.name not in ("cosine", "multistep", "constant"):
        raise ConfigError(f"schedule.name: must be cosine, multistep or constant, got {short(s.name)}")
    _positive(s.warmup_epochs, "schedule.warmup_epochs", allow_zero=True)


def validate_config(cfg: RunConfig) -> RunConfig:
    """Check names against the registries and values for sanity; build the method as a dry run.

    Returns:
        the config with the method's and model's parameters coerced to their annotated types.
    """
    # looked up by name at call time: config sits below the packages that own these registries
    from_spec = lookup("attack").from_spec
    ATTENTION, DATASETS, METHODS, MODELS = (lookup(k) for k in ("attention", "dataset", "method", "model"))

    check_run_fields(cfg)
    d = cfg.data
    if d.name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {short(d.name)} (known: {', '.join(DATASETS.names())})")
    _positive(d.batch_size, "data.batch_size")
    _positive(d.padding, "data.padding", allow_zero=True)
    _positive(d.train_n, "data.train_n")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    if d.augment not in ("none", "crop", "crop_flip"):
        raise ConfigError(f"data.augment: must be one of none, crop, crop_flip; got {short(d.augment)}")
    m = cfg.model
    if m.name not in MODELS:
        raise ConfigError(f"model.name: unknown model {short(m.name)} (known: {', '.join(MODELS.names())})")
    if m.attention not in ATTENTION:
        raise ConfigError(f"model.attention: unknown attention {short(m.attention)} (known: {', '.join(ATTENTION.names())})")
    if m.head not in ("linear", "cosine"):
        raise ConfigError(f"model.head: must be linear or cosine, got {short(m.head)}")
    _positive(m.head_scale, "model.head_scale")
    options = check_kwargs(
        MODELS.get(m.name), m.options, "model", skip=("num_classes", "in_channels", "mean", "std", "attention")
    )
    try:  # dry run on the meta device: option values are checked without allocating weights
        import torch

        with torch.device("meta"):
            MODELS.create(m.name, attention=None if m.attention == "none" else m.attention, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model ({m.name}): {clip(err)}") from err
    if cfg.method.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {short(cfg.method.name)} (known: {', '.join(METHODS.names())})")
    params = check_kwargs(METHODS.get(cfg.method.name), cfg.method.params, "method")
    try:
        METHODS.create(cfg.method.name, **params)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method ({cfg.method.name}): {clip(err)}") from err
    e = cfg.eval
    _positive(e.eps, "eval.eps", allow_zero=True)
    _positive(e.n, "eval.n")
    _positive(e.batch_size, "eval.batch_size")
    _positive(e.epoch_n, "eval.epoch_n", allow_zero=True)
    if e.suite not in SUITE_NAMES:
        raise ConfigError(f"eval.suite: must be one of {', '.join(SUITE_NAMES)}; got {short(e.suite)}")
    _positive(e.suite_n, "eval.suite_n")
    _positive(e.report_n, "eval.report_n")
    for key, specs in (("eval.attacks", e.attacks), ("eval.epoch_attacks", e.epoch_attacks)):
        for spec in specs:
            if spec == "clean":
                continue
            try:
                from_spec(spec, e.eps)
            except ValueError as err:
                raise ConfigError(f"{key}: {clip(err)}") from err
    # the validated config carries typed values (e.g. eps "8/255" -> 0.0313...)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(m, options=options),
        method=dataclasses.replace(cfg.method, params=params),
    )


def method_params(cfg: RunConfig) -> dict[str, Any]:
    """The method's hyper-parameters, coerced to their annotated types."""
    return check_kwargs(lookup("method").get(cfg.method.name), cfg.method.params, "method")


def config_yaml(cfg: Any) -> str:
    """The resolved config (any task's) as YAML text, loadable again by its task's ``load_config``."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    Path(path).write_text(config_yaml(cfg))
