"""Evaluate any model: a factory by import path, optional safetensors weights, a dataset by name.

The question robustness repositories answer most is "how do I evaluate *my* model". Here a
model is any ``nn.Module`` mapping images in [0,1] (B, C, H, W) to logits (B, num_classes), with
its normalisation inside (as RobustBench's models); it need not come from ``aal train``.

* :func:`load_model`: ``"package.module:factory"`` -> the module the factory returns, with
  weights from a ``.safetensors`` file loaded strictly (``aal eval --model ... --weights ...``).
* :func:`benchmark`: the evaluation suite (AutoAttack's standard version by default) of a model
  on a dataset given by name (or as tensors), returning the :class:`~aal.eval.suite.SuiteResult`
  (per-stage accuracies) and writing its JSON, the same JSON ``aal eval RUN --suite ... --json``
  prints for a run.

Every way this goes wrong that is the caller's to fix is one clear :class:`ExternalModelError`:
a factory that cannot be imported (or is not callable, or does not return an ``nn.Module``),
weights that do not fit (naming the first missing, unexpected or mis-shaped tensor), outputs of
the wrong shape for the dataset, inputs outside [0,1].

Example:
    >>> import torch, aal
    >>> from aal.eval.external import benchmark
    >>> model = aal.create_model("small_cnn")
    >>> x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    >>> res = benchmark(model, (x, y), threat="linf", eps=0.1, suite="fast")  # doctest: +SKIP
    >>> sorted(res.accuracy)  # doctest: +SKIP
    ['apgd_ce', 'apgd_t', 'clean', 'robust']
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from aal.eval.evaluator import model_device
from aal.eval.suite import SuiteResult, run_suite
from aal.utils.modes import eval_mode


class ExternalModelError(ValueError):
    """A model, its weights or its data cannot be evaluated; the message says what and why.

    Attributes:
        exit_code: for the CLI: 2 for a wrong argument (factory, shapes), 1 for a bad file
            (weights) or bad data.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``"package.module:factory"`` (imported, never ``eval``-ed).

    Raises:
        ExternalModelError: the spec is malformed, the module cannot be imported, it has no such
            attribute, or the attribute is not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or not all(p.isidentifier() for p in [*module_name.split("."), *attr.split(".")]):
        raise ExternalModelError(f"--model {spec!r}: expected package.module:factory (e.g. mypkg.models:make_net)")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:  # ModuleNotFoundError included; the module's own import errors too
        raise ExternalModelError(f"--model {spec!r}: cannot import {module_name!r}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ExternalModelError(f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ExternalModelError(f"--model {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable factory")
    return obj


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a ``.safetensors`` state dict into ``model`` strictly, or say which tensor does not fit.

    Raises:
        ExternalModelError (exit code 1): the file is missing or not safetensors, or a tensor is
            missing, unexpected or of another shape (the first one in sorted order is named).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ExternalModelError(f"--weights {path}: no such file", exit_code=1)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExternalModelError(f"--weights {path}: not a readable safetensors file ({err})", exit_code=1) from err
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing:
        raise ExternalModelError(f"--weights {path}: the model's tensor {missing[0]!r} is missing from the file "
                                 f"({len(missing)} missing)", exit_code=1)
    if unexpected:
        raise ExternalModelError(f"--weights {path}: the file's tensor {unexpected[0]!r} is not in the model "
                                 f"({len(unexpected)} unexpected)", exit_code=1)
    if shapes:
        k = shapes[0]
        raise ExternalModelError(f"--weights {path}: tensor {k!r} has shape {tuple(state[k].shape)} in the file, "
                                 f"{tuple(own[k].shape)} in the model", exit_code=1)
    model.load_state_dict(state, strict=True)


def load_model(spec: str, weights: str | os.PathLike | None = None) -> nn.Module:
    """``factory()`` for ``spec = "package.module:factory"``, with ``weights`` loaded, in eval mode.

    Raises:
        ExternalModelError: see :func:`load_factory` and :func:`load_weights`; also when the
            factory does not return an ``nn.Module``.
    """
    factory = load_factory(spec)
    model = factory()
    if not isinstance(model, nn.Module):
        raise ExternalModelError(f"--model {spec!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def check_images(x: Tensor) -> None:
    """Refuse float images outside [0,1] (or not finite): aal models take [0,1] inputs.

    Raises:
        ExternalModelError (exit code 1): with the range found.
    """
    if x.dtype == torch.uint8 or x.numel() == 0:
        return
    if not bool(torch.isfinite(x).all()):
        raise ExternalModelError("the images contain NaN or infinite values", exit_code=1)
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ExternalModelError(
            f"the images lie in [{lo:.4g}, {hi:.4g}], not [0, 1]: pass images in [0,1] (or uint8) and put the "
            "normalisation inside the model", exit_code=1)


def check_outputs(model: nn.Module, x: Tensor, num_classes: int | None) -> None:
    """One forward pass on ``x``: the model must return (B, num_classes) logits.

    Raises:
        ExternalModelError: another shape or type (with the shape expected).
    """
    with eval_mode(model), torch.no_grad():
        out = model(x)
    want = f"({x.shape[0]}, {num_classes})" if num_classes else f"({x.shape[0]}, C)"
    if not isinstance(out, Tensor):
        raise ExternalModelError(f"the model returned a {type(out).__name__} for a batch {tuple(x.shape)}; "
                                 f"expected a logits tensor {want}")
    if out.dim() != 2 or out.shape[0] != x.shape[0] or (num_classes and out.shape[1] != num_classes):
        raise ExternalModelError(f"the model returned outputs of shape {tuple(out.shape)} for a batch {tuple(x.shape)}; "
                                 f"expected logits {want}")


def _resolve_data(data: Any, data_root: str | os.PathLike | None) -> tuple[Any, str, int | None]:
    """``(test split or (x, y), data name, number of classes or None)`` for a name or tensors."""
    if isinstance(data, str):
        from aal.data import DATASETS, load_data

        if data not in DATASETS:
            raise ExternalModelError(f"--data {data!r}: unknown dataset; choose from {', '.join(DATASETS.names())}")
        bundle = load_data(data, root=data_root)
        return bundle.test, data, int(bundle.info.num_classes)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x = data[0]
        if isinstance(x, Tensor):
            check_images(x)
        return data, "tensors", None
    if hasattr(data, "images") and hasattr(data, "labels"):
        return data, type(data).__name__, None
    raise ExternalModelError(f"data must be a dataset name, an (images, labels) pair or a split; got {type(data).__name__}")


def benchmark(
    model: nn.Module,
    data: Any,
    threat: str = "linf",
    eps: float = 8 / 255,
    n: int | None = 1000,
    suite: str = "standard",
    *,
    data_root: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    state_path: str | os.PathLike | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
    device: str | torch.device | None = None,
    eot: bool | str = "auto",
    eot_n: int = 20,
) -> SuiteResult:
    """The robustness of any classifier: an evaluation suite on a dataset, AutoAttack's by default.

    Args:
        model: images in [0,1] (B, C, H, W) -> logits (B, classes); normalisation inside.
        data: a dataset name (``"cifar10"``, ``"fashion_mnist"``, ... of :data:`aal.data.DATASETS`;
            its official test set) or ``(images, labels)`` (float in [0,1] or uint8).
        threat: ``"linf"`` or ``"l2"``.
        eps: budget in [0,1] pixel units (e.g. 8/255).
        n: the first ``n`` test points (``None``: all).
        suite: ``"standard"`` (AutoAttack's standard version), ``"fast"`` or ``"rand"``.
        data_root: where the dataset's files are (see :func:`aal.data.load_data`).
        out: write the result's JSON here (what ``aal eval RUN --suite ... --json`` prints).
        state_path: resumable state file (see :func:`aal.eval.run_suite`).
        batch_size, seed, progress, device, eot, eot_n: see :func:`aal.eval.run_suite`.

    Returns:
        the :class:`~aal.eval.suite.SuiteResult`: ``accuracy`` holds the clean accuracy, the
        accuracy after each stage and the final robust accuracy.

    Raises:
        ExternalModelError: unknown dataset, images outside [0,1], outputs that are not
            (B, classes) logits.
        aal.data.DataError: the dataset's files are missing.

    Example:
        >>> import aal
        >>> res = aal.benchmark(model, "cifar10", threat="linf", eps=8 / 255, n=1000)  # doctest: +SKIP
        >>> res.label, res.robust  # doctest: +SKIP
        ('AutoAttack (standard)', 0.5312)
    """
    if threat not in ("linf", "l2"):
        raise ExternalModelError(f"threat must be 'linf' or 'l2', got {threat!r}")
    split, name, num_classes = _resolve_data(data, data_root)
    x = split[0] if isinstance(split, (tuple, list)) else split.images
    probe = x[: min(len(x), 2)]
    probe = probe.float().div(255) if probe.dtype == torch.uint8 else probe.float()
    probe = probe.to(model_device(model, device))
    check_outputs(model, probe, num_classes)
    result = run_suite(model, split, suite, eps=eps, norm=threat, n=n, batch_size=batch_size, seed=seed,
                       progress=progress, state_path=state_path, device=device, eot=eot, eot_n=eot_n)
    if out is not None:
        payload = {**result.to_dict(), "data": name}
        if state_path is not None:
            payload["state"] = str(state_path)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(payload, indent=2))
    return result


__all__ = ["ExternalModelError", "benchmark", "check_images", "check_outputs", "load_factory", "load_model", "load_weights"]
