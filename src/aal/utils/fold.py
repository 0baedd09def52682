"""BatchNorm folded into the convolution before it, for attack passes in eval mode.

In eval mode a BatchNorm is a per-channel affine map, ``y = a * x + b`` with
``a = gamma / sqrt(running_var + eps)`` and ``b = beta - a * running_mean``; when it directly
follows a convolution whose output nothing else reads, ``bn(conv(x)) == conv'(x)`` with the
weight scaled by ``a`` per output channel and the bias ``a * bias + b``. An attack step is a
forward and an input-gradient backward; on the post-activation ResNet-18 the BatchNorm forward and
backward are ~12 % of that step's time on this CPU (profiler), and a convolution's bias costs
nothing extra (oneDNN adds it in the same kernel). Folding removes that work and changes the
arithmetic by rounding only (see :func:`folded_batchnorm` for the measured difference).

Which pairs fold is read from the data flow of one forward of the attack's batch, not from the
module tree, which says nothing about data flow. A pair ``(conv, bn)`` folds only if the
BatchNorm's input is that convolution's output (the same tensor object), each runs exactly once
per forward, and no other torch call reads the convolution's output nor is it part of the model's
output (counted by a :class:`~torch.overrides.TorchFunctionMode` over that forward; calls that
read metadata only, such as ``dim``, do not count). A second, folded forward must then reproduce
the first (relative :data:`FOLD_RTOL`), or nothing is folded for that model and a warning says
so. Both forwards run without gradients, outside any autocast (in the model's own dtype) and with
the random streams forked, so a randomised model's draws are not used up. The result is cached by
the model's structure (:func:`_signature`; weak references confirm that the modules are still the
same objects), so the analysis runs once per model and mode, not per attack call; the folding
itself, a few per-channel products, is redone on every entry because the weights change between
training steps. In the folded forwards each convolution's weight and bias entries are swapped
and each folded BatchNorm's ``forward`` is an identity on the instance, so a BatchNorm
reached through any reference is skipped alike.

Pre-activation networks (PreAct-ResNet, WRN) fold only the conv -> BN inside each block (their
other BatchNorms read a residual sum). Never folded: a BatchNorm in train mode or without running
statistics, a convolution with parametrizations (weight norm, spectral norm) or a custom forward,
and any ``torch.compile``d model (swapping its modules would force a recompilation per attack).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    >>> x = torch.rand(2, 1, 8, 8)
    >>> with folded_batchnorm(net, x) as fold:
    ...     fold.pairs, type(net[1].forward).__name__
    ([('0', '1')], 'function')
    >>> "forward" in vars(net[1])  # restored
    False
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from aal.utils.modes import uncompiled

FOLD_RTOL = 1e-3
"""The analysis check: folded and unfolded outputs agree within this fraction of the largest |output|."""

_CACHE: dict[tuple, tuple[tuple, list[tuple[str, str]]]] = {}  # signature -> (weakrefs, pairs); oldest first
_CACHE_SIZE = 64

_METADATA = frozenset({"dim", "ndimension", "size", "stride", "numel", "is_contiguous", "is_floating_point", "__get__", "__len__"})
"""Calls that read a tensor's metadata only (BatchNorm's own input check calls ``dim``): not consumers."""


def _plain_conv(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and type(m).forward is nn.Conv2d.forward
        and not parametrize.is_parametrized(m)
        and isinstance(m._parameters.get("weight"), Tensor)
    )


def _foldable_bn(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.BatchNorm2d)
        and type(m).forward is nn.BatchNorm2d.forward
        and "forward" not in m.__dict__
        and not m.training
        and m.running_mean is not None
        and m.running_var is not None
    )


def _stateful(m: nn.Module) -> bool:
    return bool(m._parameters or m._buffers)


def _signature(modules: list[nn.Module]) -> tuple:
    """The model's structure as the cache sees it (``modules``: ``list(model.modules())``): each
    submodule's type and mode, and the identity of those that hold parameters or buffers. A
    wrapper without state created afresh per step (AAL's fixed-map model) therefore hits the cache
    of the model it wraps."""
    return tuple((type(m), m.training, id(m) if _stateful(m) else None) for m in modules)


class _ConsumerCount(TorchFunctionMode):
    """Counts, for each watched tensor, the top-level torch calls that take it as an argument."""

    def __init__(self, watched: dict[int, Tensor]) -> None:
        super().__init__()
        self.watched = watched
        self.count: dict[int, int] = {}

    def visit(self, obj: Any) -> None:
        if isinstance(obj, Tensor):
            if self.watched.get(id(obj)) is obj:
                self.count[id(obj)] = self.count.get(id(obj), 0) + 1
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                self.visit(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                self.visit(o)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) not in _METADATA:
            self.visit(args)
            self.visit(kwargs)
        return func(*args, **kwargs)


def find_conv_bn_pairs(model: nn.Module, x: Tensor) -> list[tuple[str, str]]:
    """Qualified names ``(conv, bn)`` of the foldable pairs, from one no-grad forward of ``x``.

    The forward runs with the random streams forked (a randomised model's draws are not used up)
    and without gradients; the model must already be in the mode the attack uses.
    """
    return _probe(model, x)[0]


def _probe(model: nn.Module, x: Tensor) -> tuple[list[tuple[str, str]], Any]:
    """:func:`find_conv_bn_pairs` and the model's output on ``x`` (``None`` without candidates)."""
    calls: dict[nn.Module, int] = {}
    outputs: dict[int, Tensor] = {}  # id -> conv output, kept alive so ids stay unique
    conv_of: dict[int, nn.Module] = {}
    bn_in: dict[nn.Module, int] = {}

    def on_conv(m, inp, out):
        calls[m] = calls.get(m, 0) + 1
        if isinstance(out, Tensor):
            outputs[id(out)], conv_of[id(out)] = out, m

    def on_bn(m, inp, out):
        calls[m] = calls.get(m, 0) + 1
        if inp and isinstance(inp[0], Tensor) and outputs.get(id(inp[0])) is inp[0]:
            bn_in[m] = id(inp[0])

    hooks = [m.register_forward_hook(on_conv) for m in model.modules() if _plain_conv(m)]
    bn_hooks = [m.register_forward_hook(on_bn) for m in model.modules() if _foldable_bn(m)]
    if not bn_hooks or not hooks:
        for h in hooks + bn_hooks:
            h.remove()
        return [], None
    counter = _ConsumerCount(outputs)
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _no_autocast(x), counter:
            out = model(x)
        counter.visit(out)  # a conv output returned by the model is read by the caller
    finally:
        for h in hooks + bn_hooks:
            h.remove()
    names = {m: n for n, m in model.named_modules()}
    pairs = [
        (names[conv_of[key]], names[bn])
        for bn, key in bn_in.items()
        if calls.get(conv_of[key]) == 1 and calls.get(bn) == 1 and counter.count.get(key, 0) == 1
    ]
    return pairs, out


class Fold:
    """Swaps folded weights and identity BatchNorms in (:meth:`apply`) and back (:meth:`restore`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pairs: list[tuple[str, str]] = []
        self._undo: list[tuple[Any, str, Any]] = []

    def apply(self, pairs: list[tuple[str, str]]) -> None:
        modules = dict(self.model.named_modules())
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            with torch.no_grad():
                a = bn.running_var.add(bn.eps).rsqrt()
                if bn.weight is not None:
                    a = a * bn.weight
                b = -a * bn.running_mean
                if bn.bias is not None:
                    b = b + bn.bias
                if conv.bias is not None:
                    b = b + a * conv.bias
                w = conv.weight
                channels_last = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                w = (w * a.to(w.dtype).view(-1, 1, 1, 1)).contiguous(
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format
                )
            for key, value in (("weight", w), ("bias", b.to(w.dtype))):
                self._undo.append((conv._parameters, key, conv._parameters.get(key)))
                conv._parameters[key] = nn.Parameter(value, requires_grad=False)
            self._undo.append((bn, "forward", None))
            bn.forward = _identity  # on the instance: however the model reaches this BN, it is skipped
        self.pairs = list(pairs)

    def restore(self) -> None:
        for target, key, value in reversed(self._undo):
            if isinstance(target, dict):
                target[key] = value
            else:
                delattr(target, key)
        self._undo.clear()


_ANALYSING = [0]  # > 0 while the analysis forwards run


def analysing() -> bool:
    """True while the fold's own analysis forwards run (no grad, fp32, random streams forked):
    a forward hook that counts or inspects the forwards of an attack can skip them."""
    return _ANALYSING[0] > 0


@contextlib.contextmanager
def _analysis() -> Iterator[None]:
    _ANALYSING[0] += 1
    try:
        yield
    finally:
        _ANALYSING[0] -= 1


def _no_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """The analysis runs in the model's own dtype: under a bf16 autocast the folded and unfolded
    forwards would differ by bf16 rounding, not by a wrong fold."""
    return torch.autocast(x.device.type, enabled=False)


def _checked_pairs(model: nn.Module, x: Tensor) -> list[tuple[str, str]]:
    """:func:`find_conv_bn_pairs`, kept only if a folded forward reproduces the unfolded one."""
    pairs, out = _probe(model, x)
    if not pairs:
        return pairs
    devices = [x.device] if x.device.type == "cuda" else []
    fold, ref = Fold(model), _tensors(out)
    with torch.no_grad():
        try:
            fold.apply(pairs)
            with torch.random.fork_rng(devices=devices), _no_autocast(x):
                got = _tensors(model(x))
        finally:
            fold.restore()
    scale = max((float(r.abs().max()) for r in ref if r.numel() and r.is_floating_point()), default=0.0) or 1.0
    tol = FOLD_RTOL * scale
    same = len(ref) == len(got) and all(
        r.shape == g.shape and (not r.numel() or not r.is_floating_point() or float((r - g).abs().max()) <= tol)
        for r, g in zip(ref, got)
    )
    if not same:
        warnings.warn(
            f"{type(model).__name__}: folding BatchNorm into the convolutions did not reproduce the model's output; "
            "attacks run it unfolded",
            RuntimeWarning,
            stacklevel=4,
        )
        return []
    return pairs


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _identity(x: Tensor) -> Tensor:
    return x


@contextlib.contextmanager
def folded_batchnorm(model: nn.Module, x: Tensor, enabled: bool = True) -> Iterator[Fold]:
    """Fold every eval-mode BatchNorm into the convolution before it, for the block.

    Args:
        model: the network, already in the mode the block runs it in (BatchNorms in train mode
            are never folded). Its parameters should not require gradients (an attack's
            :func:`aal.attacks.base.attack_mode`): the folded weights are new leaf tensors, so
            no gradient reaches the original parameters inside the block.
        x: the batch the block will feed (the analysis forward uses it when the model's
            structure is not cached yet).
        enabled: ``False`` makes the block a no-op.

    Yields:
        A :class:`Fold`; ``fold.pairs`` are the folded ``(conv, bn)`` names.

    The model's parameters, buffers and submodules are exactly the original objects again after
    the block, even if it raises. Numerically, the folded network differs by rounding: on a
    ResNet-18 in fp32 the logits agree to ~2e-6 relative and FGSM's examples in all but ~2e-5 of
    the pixels (a near-zero gradient's sign; ``tests/test_fold.py`` bounds both).
    """
    fold = Fold(model)
    modules = list(model.modules()) if enabled else []
    # a torch.compile'd model (or one containing one) is left alone: swapping its modules would recompile it
    if any(uncompiled(m) is not m for m in modules) or not any(_foldable_bn(m) for m in modules):
        yield fold
        return
    sig = _signature(modules)
    stateful = [m for m in modules if _stateful(m)]
    entry = _CACHE.get(sig)
    # the signature holds ids; the weak references make sure they are still *these* modules (an id
    # can be reused by a new module once the old one is garbage-collected)
    if entry is not None and len(entry[0]) == len(stateful) and all(r() is m for r, m in zip(entry[0], stateful)):
        pairs = entry[1]
    else:
        with _analysis():
            pairs = _checked_pairs(model, x.detach())
        _CACHE.pop(sig, None)
        _CACHE[sig] = (tuple(weakref.ref(m) for m in stateful), pairs)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
    try:
        fold.apply(pairs)
        yield fold
    finally:
        fold.restore()
