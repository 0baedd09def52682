"""BatchNorm folding for attack passes (aal.utils.fold): which pairs fold, exact restore, numerics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aal
from aal.attacks import FGSM, PGD
from aal.utils.fold import folded_batchnorm


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model


def resnet(attention=None, name="resnet18"):
    torch.manual_seed(0)
    return _randomise_bn(aal.create_model(name, num_classes=10, attention=attention, width=8)).eval()


def images(b=4, seed=1):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def n_bn(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def folded_forward(model, x):
    """(reference output, output of a folded forward, pairs)."""
    with torch.no_grad():
        ref = model(x)
        with folded_batchnorm(model, x) as fold:
            got = model(x)
    return ref, got, fold.pairs


class SharedOutput(nn.Module):
    """conv -> BN, but the conv's output is also added after: folding it would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = self.conv(x)
        h = F.relu(self.bn(h)) + h
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


class HiddenBN(nn.Module):
    """Calls its BatchNorm through a reference the module tree does not see."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        object.__setattr__(self, "_bn_ref", self.bn)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(F.relu(self._bn_ref(self.conv(x))).mean((2, 3)))


class ReturnsFeatures(nn.Module):
    """Returns the conv output next to the logits: that output must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(F.relu(self.bn(h)).mean((2, 3))), h


def test_post_activation_resnet_folds_every_pair_and_keeps_the_function():
    ref, got, pairs = folded_forward(resnet(), images())
    assert len(pairs) == 20  # stem + 16 block convs + 3 projection shortcuts: every BN
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_attention_on_the_stem_keeps_that_pair_unfolded():
    model = resnet("cbam")
    ref, got, pairs = folded_forward(model, images())
    assert not any(c == "stem" or c.startswith("stem.") for c, _ in pairs)  # its output feeds the attention too
    assert 0 < len(pairs) < n_bn(model)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_preact_resnet_folds_the_conv_bn_inside_each_block():
    ref, got, pairs = folded_forward(resnet(name="preact_resnet18"), images())
    assert len(pairs) == 8  # conv1 -> bn2 in each of the 8 blocks; every other BN reads a sum or the stem's output
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("cls,expected", [(SharedOutput, [("conv2", "bn2")]), (HiddenBN, [("conv", "bn")]), (ReturnsFeatures, [])])
def test_only_pairs_whose_conv_output_nothing_else_reads_fold(cls, expected):
    torch.manual_seed(0)
    model = _randomise_bn(cls()).eval()
    x = images()
    with torch.no_grad():
        ref = model(x)
        with folded_batchnorm(model, x) as fold:
            got = model(x)
    assert fold.pairs == expected
    for r, g in zip(ref if isinstance(ref, tuple) else [ref], got if isinstance(got, tuple) else [got]):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max()


def test_train_mode_batchnorm_never_folds_and_the_cache_follows_the_mode():
    model, x = resnet(), images()
    assert len(folded_forward(model, x)[2]) == 20
    model.train()
    with folded_batchnorm(model, x) as fold:
        assert fold.pairs == []
    model.eval()
    with folded_batchnorm(model, x) as fold:
        assert len(fold.pairs) == 20


def test_everything_is_the_original_object_again_even_after_an_exception():
    model, x = resnet(), images()
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):  # analysis, then the cached path
        with pytest.raises(RuntimeError, match="inside"):
            with torch.no_grad(), folded_batchnorm(model, x):
                model(x)
                raise RuntimeError("inside")
        assert dict(model.named_modules()) == modules
        assert all(a is b for a, b in zip(dict(model.named_parameters()).values(), params.values()))
        assert not any("forward" in m.__dict__ for m in model.modules())
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_the_analysis_neither_uses_random_draws_nor_gradients_and_is_cached():
    from aal.utils.fold import analysing

    model, x = resnet(), images()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append((torch.is_grad_enabled(), analysing())))
    torch.manual_seed(5)
    with torch.enable_grad(), folded_batchnorm(model, x) as fold:
        after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # the global stream is where it was
    assert calls == [(False, True), (False, True)] and len(fold.pairs) == 20  # analysis + its check, no grad
    assert not analysing()
    with folded_batchnorm(model, x):
        pass
    assert len(calls) == 2  # cached: no more forwards


def test_a_fresh_stateless_wrapper_per_call_hits_the_cache():
    class Wrap(nn.Module):  # like AAL's fixed-map model, built anew each step
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model, x = resnet(), images()
    with folded_batchnorm(Wrap(model), x) as fold:
        assert len(fold.pairs) == 20
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with folded_batchnorm(Wrap(model), x) as fold:
        assert len(fold.pairs) == 20 and not calls


def test_attacks_fold_by_default_and_fold_bn_false_is_the_plain_arithmetic():
    model, x = resnet(), images(8)
    y = torch.arange(8) % 10
    plain = FGSM(8 / 255, fold_bn=False)(model, x, y)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xx), y, reduction="none").sum(), xx)
    assert torch.equal(plain, (x + 8 / 255 * g.sign()).clamp(0, 1))  # unchanged arithmetic: bit-identical
    folded = FGSM(8 / 255)(model, x, y)
    assert torch.equal(FGSM(8 / 255)(model, x, y), folded)  # the first call (analysis) and later ones agree
    assert (folded != plain).float().mean().item() < 1e-3  # rounding only: a few near-zero gradient signs
    a = PGD(8 / 255, steps=3, seed=0)(model, x, y)
    b = PGD(8 / 255, steps=3, seed=0, fold_bn=False)(model, x, y)
    assert (a != b).float().mean().item() < 0.01


def test_compiled_models_are_left_alone():
    model, x = resnet(), images()
    wrapped = nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule holds
    with folded_batchnorm(wrapped, x) as fold:
        assert fold.pairs == []


def test_the_analysis_ignores_an_enclosing_bf16_autocast():
    """Under bf16 training the attack runs inside autocast; the fold is still checked in fp32."""
    import warnings

    model, x = resnet("cbam_in", name="preact_resnet18"), images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16), folded_batchnorm(model, x) as fold:
            out = model(x)
    assert len(fold.pairs) == 8 and out.dtype == torch.bfloat16


def test_a_new_model_at_a_reused_address_is_analysed_afresh(monkeypatch):
    """The cache keys on module ids; a garbage-collected model's ids can come back. The weak
    references in the cache entry must send a new model to a fresh analysis."""
    import aal.utils.fold as fold_mod

    model, x = resnet(), images()
    with folded_batchnorm(model, x):
        pass
    sig = fold_mod._signature(list(model.modules()))
    refs, pairs = fold_mod._CACHE[sig]
    fake = [lambda: None for _ in refs]  # as if every module had died
    fold_mod._CACHE[sig] = (tuple(fake), [("no.such", "module")])
    with folded_batchnorm(model, x) as fold:  # not the stale entry: analysed again
        assert fold.pairs == pairs
