"""Clean and robust accuracy, AutoAttack-style: attack only what is still correct.

:func:`evaluate` measures clean accuracy, then runs each attack *only on the points the model
classifies correctly* (points already wrong count as wrong under every attack, as in
AutoAttack's ``run_standard_evaluation``), and reports, per attack, the accuracy under it and
the per-sample worst case over all attacks (``"robust"``: correct under every attack).

Two modes:

* ``cumulative=False`` (default): every attack runs on all clean-correct points, so each
  attack's number stands on its own (comparable across papers), and ``robust`` is the worst
  case over them.
* ``cumulative=True``: each attack runs only on the points that survived the previous ones
  (AutoAttack's ensemble; cheaper); each attack's number is then the robust accuracy *after*
  it, and ``robust`` equals the last one.

Example:
    >>> import torch, aal
    >>> from aal.eval import evaluate
    >>> model = aal.create_model("small_cnn")
    >>> x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    >>> res = evaluate(model, (x, y), attacks=("clean", "fgsm", "pgd5"), eps=0.1)
    >>> sorted(res.accuracy)
    ['clean', 'fgsm', 'pgd5', 'robust']
    >>> print(res.table())  # doctest: +SKIP
    attack  accuracy %  time s
    clean        9.38     0.0
    ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from aal.attacks import check_images, from_spec
from aal.eval.survivors import attack_survivors, clean_pass, fetcher
from aal.utils.distributed import all_reduce_, get_rank, shard_indices
from aal.utils.modes import eval_mode
from aal.utils.precision import autocast_context, check_precision

AttackFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
AttackSpec = str | AttackFn | tuple[str, AttackFn]


@dataclass
class EvalResult:
    """The outcome of :func:`evaluate`.

    Attributes:
        accuracy: fraction in [0,1] per attack name, plus ``"clean"`` (when evaluated) and
            ``"robust"`` (correct under every attack; present when any attack ran).
        n: number of evaluated points.
        eps: the budget the attacks were built with.
        seconds: wall-clock seconds per entry (``"clean"`` and each attack).
        cumulative: whether attacks ran on the survivors of the previous ones.
        correct: per-sample correctness (bool (n,) tensors) per entry; not part of :meth:`to_dict`.
        precision: the arithmetic the forwards and attacks ran in (``fp32`` unless asked).
    """

    accuracy: dict[str, float]
    n: int
    eps: float
    seconds: dict[str, float]
    cumulative: bool = False
    correct: dict[str, Tensor] = field(default_factory=dict, repr=False)
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no tensors)."""
        return {
            "accuracy": {k: float(v) for k, v in self.accuracy.items()},
            "n": int(self.n),
            "eps": float(self.eps),
            "seconds": {k: float(v) for k, v in self.seconds.items()},
            "cumulative": bool(self.cumulative),
            "precision": self.precision,
        }

    def table(self) -> str:
        """Aligned text table: ``attack | accuracy % | time s`` (``robust`` last)."""
        rows = [("attack", "accuracy %", "time s")]
        for name, acc in self.accuracy.items():
            secs = self.seconds.get(name)
            rows.append((name, f"{100 * acc:.2f}", "" if secs is None else f"{secs:.1f}"))
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}" for r in rows]
        lines.append(f"(n={self.n}, eps={self.eps:.4g}{', cumulative' if self.cumulative else ''}, precision {self.precision})")
        return "\n".join(lines)


def _as_tensors(data: Any, n: int | None) -> tuple[Tensor, Tensor, bool]:
    """``(images, labels, is_uint8)`` restricted to the first ``n`` points."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    elif hasattr(data, "images") and hasattr(data, "labels"):
        x, y = data.images, data.labels
    else:
        raise TypeError("data must be an (x, y) pair of tensors or have .images (uint8 N,C,H,W) and .labels")
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        x, y = x[:n], y[:n]
    if x.dtype == torch.uint8:
        return x, y.long(), True
    if not x.is_floating_point():
        raise TypeError(f"images must be float in [0,1] or uint8, got {x.dtype}")
    return x, y.long(), False


def model_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else where the model's parameters live (the CPU for a parameter-free model)."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    return torch.device(device)


def _fraction(flags: Tensor) -> float:
    """Fraction of True flags; 0 for no points (an empty evaluation has no accuracy to report)."""
    return flags.float().mean().item() if len(flags) else 0.0


def _named_attacks(attacks: Sequence[AttackSpec], eps: float, seed: int) -> list[tuple[str, AttackFn | None]]:
    out: list[tuple[str, AttackFn | None]] = []
    for a in attacks:
        if isinstance(a, str):
            name, fn = a.strip().lower(), None if a.strip().lower() == "clean" else from_spec(a, eps, seed=seed)
        elif isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], str) and callable(a[1]):
            name, fn = a
        elif callable(a):
            name, fn = getattr(a, "name", type(a).__name__), a
        else:
            raise TypeError(f"an attack must be a spec string, an attack object or a (name, attack) pair, got {a!r}")
        if name in [o[0] for o in out] or name == "robust":
            raise ValueError(f"attack name {name!r} is repeated or reserved; pass (name, attack) pairs to rename")
        out.append((name, fn))
    return out


def evaluate(
    model: nn.Module,
    data: Any,
    attacks: Sequence[AttackSpec] = ("clean", "fgsm", "pgd20"),
    eps: float = 0.1,
    batch_size: int = 256,
    n: int | None = None,
    seed: int = 0,
    progress: bool = False,
    device: str | torch.device | None = None,
    cumulative: bool = False,
    distributed: bool = False,
    precision: str = "fp32",
) -> EvalResult:
    """Clean accuracy, accuracy under each attack, and the per-sample worst case.

    Args:
        model: classifier taking images in [0,1]; put in eval mode during the call and every
            submodule's mode restored after.
        data: ``(x, y)`` with ``x`` float (N,C,H,W) in [0,1] (or uint8) and ``y`` (N,) labels,
            or a split with ``.images`` uint8 (N,C,H,W) and ``.labels`` (N,). uint8 images are
            converted to [0,1] floats batch by batch.
        attacks: attack specs for :func:`aal.attacks.from_spec` (``"fgsm"``, ``"pgd20"``,
            ``"pgd50x5"``, ``"cw20"``, ...), ``"clean"`` (clean accuracy is always measured,
            listing it only places its row), attack objects (named by their ``name``
            attribute) or ``(name, attack)`` pairs; an attack is any
            ``attack(model, x, y) -> x_adv``.
        eps: budget for attacks built from specs.
        batch_size: points per forward / attack call.
        n: evaluate the first ``n`` points only (a fixed subset, identical across calls).
        seed: seed of the attacks' random starts (results are repeatable for a fixed seed).
        progress: show a tqdm bar per attack.
        device: where batches go (default: the device of the model's parameters).
        cumulative: run each attack only on the survivors of the previous ones (see module doc).
        distributed: shard the points across the ``torch.distributed`` processes (rank ``r``
            takes points ``r, r + W, ...``) and combine the per-point results over ranks, so every
            rank returns the full result. Every rank must call it (a collective). Accuracies are
            those of one process up to the attacks' random starts, which depend on the batch
            a point is in; deterministic attacks (FGSM, PGD without random start) give exactly
            the same result. Ignored on one process.
        precision: ``"fp32"`` (default, whatever the model was trained with: a gradient taken in
            lower precision makes a weaker attack, so robustness is measured in fp32 unless asked),
            ``"bf16"`` or ``"fp16"`` (CUDA only): the clean pass and every attack run under that
            autocast (:mod:`aal.utils.precision`). Recorded in the result.

    Returns:
        an :class:`EvalResult`.

    Raises:
        ValueError: images that are not finite, not in [0,1], or whose channel count differs
            from the model's (:func:`aal.attacks.check_images`); an unknown ``precision``.

    Example:
        >>> import torch, aal
        >>> model = aal.create_model("small_cnn")
        >>> x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
        >>> r = evaluate(model, (x, y), attacks=["fgsm"], eps=0.05, n=8)
        >>> r.n, r.accuracy["robust"] <= r.accuracy["clean"]
        (8, True)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x_all, y_all, is_uint8 = _as_tensors(data, n)
    # once, on all points: uint8 images are in range by construction (only their channels are checked)
    check_images(x_all[:1].float().div(255) if is_uint8 else x_all, model, "images")
    named = _named_attacks(attacks, eps, seed)
    device = model_device(model, device)
    check_precision(precision, device)
    total = len(y_all)
    world = torch.distributed.get_world_size() if distributed and torch.distributed.is_initialized() else 1
    if world > 1:
        progress = progress and get_rank() == 0

    batch = fetcher(x_all, y_all, is_uint8, device)
    with eval_mode(model), autocast_context(precision, device):
        # distributed: this rank's shard only; the others' points stay wrong until the reduce
        # below, so every attack pool (derived from the clean flags) is this rank's shard too
        state = clean_pass(model, batch, y_all, torch.arange(total) if world == 1 else shard_indices(total),
                           batch_size, progress)
        attacks_run = [(name, fn) for name, fn in named if fn is not None]
        attack_survivors(model, batch, attacks_run, state, batch_size, cumulative=cumulative, progress=progress)
    seconds = {"clean": state.clean_seconds, **{k: r.seconds for k, r in state.stages.items()}}
    correct = {"clean": state.clean, **{k: r.robust for k, r in state.stages.items()}}
    if attacks_run:
        correct["robust"] = state.robust
    if world > 1:  # the shards are disjoint: a logical or of the per-point results is their union
        for c in correct.values():
            all_reduce_(c, "max")
        t = all_reduce_(torch.tensor(list(seconds.values()), dtype=torch.float64), "max")
        seconds = dict(zip(seconds, t.tolist()))  # the slowest rank's wall time
    accuracy = {k: _fraction(c) for k, c in correct.items()}
    return EvalResult(accuracy, total, float(eps), seconds, cumulative, correct, precision)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Clean accuracy (fraction in [0,1]) of ``model`` on ``x`` (N,C,H,W) in [0,1] (or uint8), ``y`` (N,).

    The model runs in eval mode; its modes are restored after.

    Example:
        >>> import torch, aal
        >>> acc = accuracy(aal.create_model("small_cnn"), torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
        >>> 0.0 <= acc <= 1.0
        True
    """
    return evaluate(model, (x, y), attacks=("clean",), batch_size=batch_size).accuracy["clean"]


__all__ = ["EvalResult", "accuracy", "evaluate"]
