"""AAL: kernels, associative attention (Eqs. 5-14) by hand, the selective attack, the methods."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aal
from aal.attacks import FGSM, PGD
from aal.attention import (
    KERNELS,
    InputSpatialAttention,
    SpatialAttention,
    apply_kernel,
    associative_attention,
    top_fraction,
)
from aal.methods import METHODS, create_method
from aal.methods.aal import AAL, control_mask
from aal.models.base import AttentionNet, Normalize
from aal.models.input_level import with_input_attention

EPS = 0.1


def _batch(b: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)


@pytest.fixture
def cbam_model():
    torch.manual_seed(0)
    return aal.create_model("small_cnn", attention="cbam")


def tiny_model(head_weight: torch.Tensor, att_weight=(0.0, 0.0), att_bias=0.0, hw=4) -> AttentionNet:
    """x (B,1,hw,hw) -> identity 1x1 stem -> CBAM with a 1x1 conv (known weights) -> flatten -> linear.

    With one channel, mean_c(h) = max_c(h) = x, so M = sigmoid((a1 + a2) x + c) and the logits are
    z = W (x o M) + 0: every gradient has a closed form (see _by_hand).
    """
    stem = nn.Conv2d(1, 1, 1, bias=False)
    att = SpatialAttention(kernel_size=1, norm="none")
    head = nn.Linear(hw * hw, head_weight.shape[0])
    with torch.no_grad():
        stem.weight.fill_(1.0)
        att.conv.weight.copy_(torch.tensor(att_weight).view(1, 2, 1, 1))
        att.conv.bias.fill_(att_bias)
        head.weight.copy_(head_weight)
        head.bias.zero_()
    return AttentionNet(Normalize([0.0], [1.0]), stem, att, nn.Flatten(), head, head_weight.shape[0], hw * hw)


def _by_hand(x, y, wt, a, c, *, eps, xi1, xi2, zeta, rho, override=None):
    """Eqs. 1, 12-14 (indicator coupling) for tiny_model in closed form, float64, no autograd."""
    xf = x.flatten(1)
    s = a[0] + a[1]
    m = torch.sigmoid(s * xf + c) if override is None else override.flatten(1)
    z = (xf * m) @ wt.T
    e = torch.softmax(z, 1) - F.one_hot(y, wt.shape[0]).to(z.dtype)  # dG/dz for G = sum CE
    g_h = e @ wt  # dG/d(x o M)
    g_m = g_h * xf
    dm_dx = m * (1 - m) * s if override is None else torch.zeros_like(m)
    g_x = g_h * (m + xf * dm_dx)
    return m, g_m, g_x


# ----------------------------------------------------------------------------- kernels
def test_kernels_registered_and_values():
    assert {"m", "m2", "1-m2", "one"} <= set(KERNELS.names())
    m = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(apply_kernel("M", m), m)
    assert torch.allclose(apply_kernel("M2", m), torch.tensor([0.0, 0.25, 1.0]))
    assert torch.allclose(apply_kernel("1-M2", m), torch.tensor([1.0, 0.75, 0.0]))
    assert torch.equal(apply_kernel("one", m), torch.ones(3))
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        apply_kernel(lambda t: 2 * t, m)


def test_top_fraction_takes_largest_and_breaks_ties_by_index():
    score = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 0.5, 0.1, 0.2, 0.3]])
    assert top_fraction(score, 0.2).nonzero()[:, 1].tolist() == [1, 2]  # three 3.0s: lowest indices
    assert top_fraction(score, 0.4).nonzero()[:, 1].tolist() == [1, 2, 3, 4]
    assert not top_fraction(score, 0.0).any() and top_fraction(score, 1.0).all()


# ----------------------------------------------------------------------------- by hand
def test_associative_attention_matches_equations_by_hand():
    torch.manual_seed(0)
    wt = torch.randn(3, 16, dtype=torch.float64)
    a, c = (0.7, -0.4), 0.2
    model = tiny_model(wt, a, c).double()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    kw = dict(eps=EPS, xi1=0.3, xi2=0.2, zeta=0.25, rho=0.125)
    r = associative_attention(model, x, y, coupling="indicator", **kw)
    m, g_m, g_x = _by_hand(x, y, wt, a, c, **kw)
    torch.testing.assert_close(r.m.flatten(1), m)
    torch.testing.assert_close(r.grad_m.flatten(1), g_m)
    torch.testing.assert_close(r.grad_x.flatten(1), g_x)
    m_hat = m - 0.3 * g_m  # Eq. 12
    torch.testing.assert_close(r.m_hat.flatten(1), m_hat)
    # Eq. 14: top 25% of |dG/dx| (4 of 16 pixels); indicator gamma: top 12.5% (2 pixels)
    order = g_x.abs().argsort(1, descending=True)
    trig = torch.zeros_like(m, dtype=torch.bool).scatter_(1, order[:, :4], True)
    gamma = torch.zeros_like(m).scatter_(1, order[:, :2], 1.0)
    assert torch.equal(r.trigger.flatten(1), trig)
    torch.testing.assert_close(r.gamma.flatten(1), gamma)
    m_a = torch.where(trig, m_hat - 0.2 * gamma * m, m_hat).clamp(0, 1)  # Eq. 13
    torch.testing.assert_close(r.m_a.flatten(1), m_a)
    torch.testing.assert_close(r.delta.flatten(1), EPS * g_x.sign())  # Eq. 1, ascending G
    assert ((r.m_a >= 0) & (r.m_a <= 1)).all()


def test_finite_difference_coupling_by_hand():
    torch.manual_seed(1)
    wt = torch.randn(3, 16, dtype=torch.float64)
    a, c = (0.7, -0.4), 0.2
    model = tiny_model(wt, a, c).double()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    kw = dict(eps=EPS, xi1=5.0, xi2=0.01, zeta=0.5, rho=0.0)  # large xi1: signs flip somewhere
    r = associative_attention(model, x, y, coupling="finite-difference", **kw)
    m, g_m, g_x = _by_hand(x, y, wt, a, c, **kw)
    m_hat = m - 5.0 * g_m
    _, _, g_x_hat = _by_hand(x, y, wt, a, c, override=m_hat, **kw)  # delta recomputed with M := M_hat
    d_delta = EPS * g_x_hat.sign() - EPS * g_x.sign()
    assert d_delta.abs().sum() > 0
    gamma = (g_x / m) * d_delta / (m_hat - m)  # Eq. 6 and Eq. 13 with d delta/dM ~ Delta delta/Delta M
    torch.testing.assert_close(r.gamma.flatten(1), gamma)
    trig = r.trigger.flatten(1)
    torch.testing.assert_close(r.m_a.flatten(1), torch.where(trig, m_hat - 0.01 * gamma * m, m_hat).clamp(0, 1))


def test_trigger_selects_the_documented_pixels():
    # a1 + a2 = 0: M is constant, so |dG/dx| = |dG/dh| M is proportional to |w| (two classes, rows w and -w)
    w = torch.tensor([0.1, 5.0, 0.2, 0.3, 4.0, 0.4, 4.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3])
    model = tiny_model(torch.stack([w, -w]), (0.5, -0.5), 0.0)
    x = torch.full((1, 1, 4, 4), 0.5)
    r = associative_attention(model, x, torch.tensor([0]), eps=EPS, zeta=0.25, rho=0.125)
    # top 4 of 16: 5.0 (index 1), the tie 4.0 at indices 4 and 6, then 1.3 (index 15)
    assert r.trigger.flatten().nonzero().flatten().tolist() == [1, 4, 6, 15]
    assert r.gamma.flatten().nonzero().flatten().tolist() == [1, 4]


def test_gradient_scale_is_per_sample():
    """G is the batch *sum*: sample 0 gets the same M^a alone as within a batch."""
    torch.manual_seed(0)
    model = aal.create_model("small_cnn", attention="cbam").double()
    x, y = _batch(6)
    x = x.double()
    full = associative_attention(model, x, y, eps=EPS, xi1=50.0)
    one = associative_attention(model, x[:1], y[:1], eps=EPS, xi1=50.0)
    torch.testing.assert_close(full.m_a[:1], one.m_a)
    torch.testing.assert_close(full.grad_m[:1], one.grad_m)


def test_resolutions_and_no_parameter_gradients(cbam_model):
    x, y = _batch(4)
    r = associative_attention(cbam_model, x, y, eps=EPS)
    assert r.m.shape == r.m_a.shape == r.trigger.shape == (4, 1, 24, 24)
    assert r.m_a_input.shape == (4, 1, 28, 28)
    assert r.trigger.flatten(1).sum(1).tolist() == [round(0.1 * 576)] * 4  # top-zeta fraction per sample
    assert all(p.grad is None and p.requires_grad for p in cbam_model.parameters())
    assert cbam_model.training  # mode restored


def test_model_without_attention_is_refused():
    model = aal.create_model("small_cnn")
    x, y = _batch(2)
    with pytest.raises(ValueError, match="attention='cbam'"):
        associative_attention(model, x, y, eps=EPS)
    with pytest.raises(ValueError, match="attention='cbam'"):
        create_method("aal_fgsm", eps=EPS)(model, (x, y))


# ----------------------------------------------------------------------------- AAL reduces to FGSM/PGD-AT
@pytest.mark.parametrize("attention", ["cbam", None])
def test_aal_fgsm_with_zero_steps_and_kernel_one_is_fgsm_at(attention):
    torch.manual_seed(0)
    model = aal.create_model("small_cnn", attention=attention)
    x, y = _batch(8)
    method = create_method("aal_fgsm", eps=EPS, xi1=0.0, xi2=0.0, kernel="one")
    x_aal, _, _ = method.craft(model, x, y)
    x_ref = FGSM(EPS)(model, x, y)
    assert torch.equal(x_aal, x_ref)
    # a training-mode pass updates BatchNorm's running statistics (CBAM's gate has one), which
    # the eval-mode crafting then uses: each training call gets its own copy of the model
    out = method(copy.deepcopy(model), (x, y))
    assert torch.equal(out.loss, F.cross_entropy(copy.deepcopy(model)(x_ref), y))
    if "fgsm_at" in METHODS:
        ref = create_method("fgsm_at", eps=EPS, rand_init=False)
        assert torch.equal(ref.craft(model, x, y), x_aal)
        assert torch.equal(ref(copy.deepcopy(model), (x, y)).loss, out.loss)


@pytest.mark.parametrize("attention", ["cbam", None])
def test_aal_pgd_with_zero_steps_and_kernel_one_is_pgd_at(attention):
    torch.manual_seed(0)
    model = aal.create_model("small_cnn", attention=attention)
    x, y = _batch(8)
    method = create_method("aal_pgd", eps=EPS, steps=3, xi1=0.0, xi2=0.0, kernel="one")
    torch.manual_seed(123)
    x_aal, _, _ = method.craft(model, x, y)
    torch.manual_seed(123)
    x_ref = PGD(EPS, steps=3)(model, x, y)
    assert torch.equal(x_aal, x_ref)
    torch.manual_seed(123)
    out = method(copy.deepcopy(model), (x, y))  # a copy each: training passes move BN statistics
    assert torch.equal(out.loss, F.cross_entropy(copy.deepcopy(model)(x_ref), y))
    if "pgd_at" in METHODS:
        torch.manual_seed(123)
        assert torch.equal(create_method("pgd_at", eps=EPS, steps=3)(copy.deepcopy(model), (x, y)).loss, out.loss)


# ----------------------------------------------------------------------------- the selective attack
@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
@pytest.mark.parametrize("kernel", ["M", "M2", "1-M2"])
def test_perturbation_within_kernel_budget(cbam_model, attack, kernel):
    x, y = _batch(4)
    extra = {"steps": 2} if attack == "pgd" else {}
    method = AAL(eps=EPS, attack=attack, kernel=kernel, **extra)
    x_adv, res, mask = method.craft(cbam_model, x, y)
    assert torch.equal(mask, apply_kernel(kernel, res.m_a_input))
    assert ((x_adv - x).abs() <= EPS * mask + 1e-6).all()
    assert ((x_adv >= 0) & (x_adv <= 1)).all()
    assert (x_adv != x).any()


@pytest.mark.parametrize(
    "params",
    [{"attack": "fgsm", "rand_init": True}, {"attack": "pgd", "steps": 2, "adv_attention": "fixed", "clean_weight": 0.5}],
)
def test_options_stay_within_budget(cbam_model, params):
    x, y = _batch(4)
    method = AAL(eps=EPS, **params)
    x_adv, _, mask = method.craft(cbam_model, x, y)
    assert ((x_adv - x).abs() <= EPS * mask + 1e-6).all()
    out = method(cbam_model, (x, y))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert ("loss_clean" in out.logs) == ("clean_weight" in params)


# ----------------------------------------------------------------------------- controls
def test_control_masks_keep_each_images_mean_and_values():
    from aal.methods.aal import control_mask

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 1, 6, 5, generator=g) ** 2
    mask[1] = 0.0  # an image with nothing to attack stays at nothing
    assert control_mask(mask, "none") is mask
    uni = control_mask(mask, "uniform")
    torch.manual_seed(0)
    shuf = control_mask(mask, "shuffle")
    for m in (uni, shuf):
        assert m.shape == mask.shape
        assert ((m >= 0) & (m <= 1)).all()
        torch.testing.assert_close(m.flatten(1).mean(1), mask.flatten(1).mean(1))
    # uniform: one value per image; shuffle: the same multiset of values at other places
    assert torch.equal(uni.flatten(1).amax(1), uni.flatten(1).amin(1))
    assert torch.equal(shuf.flatten(1).sort(1).values, mask.flatten(1).sort(1).values)
    assert not torch.equal(shuf[0], mask[0]) and not torch.equal(shuf[2], mask[2])
    # the permutation differs per image and is drawn from the (seeded) global RNG
    torch.manual_seed(0)
    assert torch.equal(control_mask(mask, "shuffle"), shuf)
    with pytest.raises(ValueError, match="mask_control"):
        control_mask(mask, "random")


def test_binarized_mask_keeps_the_top_fraction_at_one():
    from aal.methods.aal import binarize_mask

    mask = torch.arange(20.0).view(1, 1, 4, 5) / 19
    b = binarize_mask(mask, 0.25)
    assert set(b.unique().tolist()) == {0.0, 1.0}
    assert int(b.sum()) == 5
    assert b.flatten()[-5:].eq(1).all()  # the 5 largest values


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
@pytest.mark.parametrize(
    "params",
    [{"mask_control": "uniform"}, {"mask_control": "shuffle"}, {"mask_binarize": 0.3},
     {"mask_binarize": 0.3, "mask_control": "shuffle"}],
)  # fmt: skip
def test_control_budgets_in_the_method(cbam_model, attack, params):
    x, y = _batch(4)
    extra = {"steps": 2} if attack == "pgd" else {}
    torch.manual_seed(1)
    method = AAL(eps=EPS, attack=attack, **params, **extra)
    torch.manual_seed(1)
    x_adv, res, mask = method.craft(cbam_model, x, y)
    k = apply_kernel("M2", res.m_a_input)
    assert ((mask >= 0) & (mask <= 1)).all()
    # the budget is respected elementwise, for the control mask actually used
    assert ((x_adv - x).abs() <= EPS * mask + 1e-6).all()
    assert (x_adv != x).any()
    if "mask_binarize" in params:
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        n = mask[0].numel()
        torch.testing.assert_close(mask.flatten(1).sum(1), torch.full((4,), float(round(0.3 * n))))
    else:
        torch.testing.assert_close(mask.flatten(1).mean(1), k.flatten(1).mean(1))
        assert not torch.equal(mask, k)
    out = method(cbam_model, (x, y))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(torch.tensor(out.logs["mask_mean"]), method.budget(res).mean(), atol=0.05, rtol=0)


def test_invalid_mask_options_name_the_argument():
    with pytest.raises(ValueError, match="mask_control"):
        AAL(eps=EPS, mask_control="random")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="mask_binarize"):
            AAL(eps=EPS, mask_binarize=bad)


def test_background_kernel_attacks_the_complement():
    # M = sigmoid(40 x - 20): exactly 1 (float32) on the top half (x = 1), 0.5 on the bottom half (x = 0.5)
    torch.manual_seed(0)
    model = tiny_model(torch.randn(3, 16), (20.0, 20.0), -20.0)
    x = torch.full((2, 1, 4, 4), 0.5)
    x[..., :2, :] = 1.0
    y = torch.tensor([0, 1])
    common = dict(eps=EPS, xi1=0.0, xi2=0.0)
    x_bg, res, mask = AAL(kernel="1-M2", **common).craft(model, x, y)
    assert (res.m_a_input[..., :2, :] == 1).all()
    assert torch.equal(x_bg[..., :2, :], x[..., :2, :])  # M^a = 1: no perturbation
    assert torch.allclose((x_bg - x)[..., 2:, :].abs(), torch.full((2, 1, 2, 4), 0.75 * EPS))
    x_fg, _, _ = AAL(kernel="M2", **common).craft(model, x, y)
    assert torch.allclose((x_fg - x)[..., 2:, :].abs(), torch.full((2, 1, 2, 4), 0.25 * EPS))
    assert (x_fg[..., :2, :] < 1).any()  # the foreground is attacked (downwards from 1)


# ----------------------------------------------------------------------------- attention layers
def test_attention_layers_gradcheck():
    torch.manual_seed(0)
    sa = SpatialAttention(kernel_size=3).double()
    h = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sa(t), (h,))
    inp = InputSpatialAttention(3, kernel_size=3).double()
    assert torch.autograd.gradcheck(lambda t: inp(t), (h,))


def test_map_override_affects_exactly_one_forward(cbam_model):
    x, y = _batch(4)
    cbam_model.eval()
    before = cbam_model(x)
    _, m = cbam_model(x, return_attention=True)
    over, m_over = cbam_model(x, attention_map=torch.zeros_like(m), return_attention=True)
    assert (m_over == 0).all() and not torch.allclose(over, before)
    assert torch.equal(cbam_model(x), before)
    AAL(eps=EPS, adv_attention="fixed", clean_weight=0.5)(cbam_model, (x, y))
    assert torch.equal(cbam_model(x), before)
    assert not cbam_model.training  # AAL restored the caller's mode


# ----------------------------------------------------------------------------- the methods
@pytest.mark.parametrize("name", ["aal_fgsm", "aal_pgd"])
@pytest.mark.parametrize("coupling", ["indicator", "finite-difference"])
def test_methods_finite_loss_and_every_parameter_gets_a_gradient(cbam_model, name, coupling):
    x, y = _batch(8)
    params = {"steps": 2} if name == "aal_pgd" else {}
    out = create_method(name, eps=EPS, coupling=coupling, **params)(cbam_model, (x, y))
    assert torch.isfinite(out.loss) and out.logits.shape == (8, 10)
    assert {"mask_mean", "m_mean", "m_a_mean", "trigger_frac", "loss_adv"} <= set(out.logs)
    assert all(math.isfinite(v) for v in out.logs.values())
    out.loss.backward()
    missing = [n for n, p in cbam_model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_finite_difference_coupling_differs_from_indicator(cbam_model):
    x, y = _batch(8)
    ind = associative_attention(cbam_model, x, y, eps=EPS)
    fd = associative_attention(cbam_model, x, y, eps=EPS, coupling="finite-difference")
    torch.testing.assert_close(ind.m_hat, fd.m_hat)
    assert not torch.allclose(ind.m_a, fd.m_a)


def test_clean_then_adv_schedule_yields_two_steps(cbam_model):
    x, y = _batch(8)
    method = AAL(eps=EPS, schedule="clean_then_adv", adv_attention="fixed", kernel="M", xi2=0.05)
    opt = torch.optim.SGD(cbam_model.parameters(), lr=0.1)
    outs = []
    for out in method.updates(cbam_model, (x, y)):  # what the trainer does
        opt.zero_grad()
        out.loss.backward()
        if not outs:  # the clean step trains the attention layer too
            assert cbam_model.attention.conv.weight.grad is not None
        else:  # M^a is held fixed: the adversarial pass does not reach the attention layer
            assert cbam_model.attention.conv.weight.grad is None
        opt.step()
        outs.append(out)
    assert len(outs) == 2 and "loss_clean" in outs[0].logs and "loss_adv" in outs[1].logs
    with pytest.raises(RuntimeError, match="steps"):
        method(cbam_model, (x, y))


def test_fixed_attention_without_clean_term_warns():
    with pytest.warns(UserWarning, match="attention layer gets no gradient"):
        AAL(eps=EPS, adv_attention="fixed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AAL(eps=EPS, adv_attention="fixed", schedule="clean_then_adv")


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"eps": -1.0}, "eps"),
        ({"xi1": float("nan")}, "xi1"),
        ({"zeta": 1.5}, "zeta"),
        ({"rho": -0.1}, "rho"),
        ({"coupling": "exact"}, "coupling"),
        ({"kernel": "m3"}, "kernel"),
        ({"attack": "cw"}, "attack"),
        ({"steps": 5}, "steps"),
        ({"attack": "pgd", "alpha": 0.1}, "alpha"),
        ({"attack": "pgd", "steps": 0}, "steps"),
        ({"adv_attention": "frozen"}, "adv_attention"),
        ({"schedule": "alternate"}, "schedule"),
        ({"clean_weight": 0.5, "schedule": "clean_then_adv"}, "clean_weight"),
        ({"attack_mode": "test"}, "attack_mode"),
    ],
)
def test_invalid_hyper_parameters_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        AAL(**kwargs)


def test_presets_fix_the_attack():
    assert create_method("aal_pgd", eps=EPS).attack == "pgd" and create_method("aal_fgsm").attack == "fgsm"
    with pytest.raises(ValueError, match="fixes attack"):
        create_method("aal_fgsm", attack="pgd")


# ----------------------------------------------------------------------------- input-level variant
def test_input_level_attention_variant():
    torch.manual_seed(0)
    base = aal.create_model("small_cnn")
    model = with_input_attention(base, "cbam_input")
    x, y = _batch(4)
    logits, m = model(x, return_attention=True)
    assert m.shape == (4, 1, 28, 28) and logits.shape == (4, 10)
    # a map of ones is the attention-free network
    torch.testing.assert_close(model(x, attention_map=torch.ones_like(m)), base(x))
    x_adv, res, mask = AAL(eps=EPS).craft(model, x, y)
    assert res.m_a.shape == res.m_a_input.shape == (4, 1, 28, 28)
    assert ((x_adv - x).abs() <= EPS * mask + 1e-6).all()
    with pytest.raises(ValueError, match="already has an attention"):
        with_input_attention(aal.create_model("small_cnn", attention="cbam"))


# ----------------------------------------------------------------------------- viz
def test_attention_grid_writes_png(cbam_model, tmp_path):
    pytest.importorskip("matplotlib")
    from aal.viz import attention_grid

    x, y = _batch(3)
    path = attention_grid(cbam_model, x, y, eps=EPS, out_path=tmp_path / "grid.png", n=2, kernel="M")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- issue 11: map placement, controls, diagnostics
def test_cbam_default_is_the_reference_gate_with_batchnorm():
    from aal.attention import create_attention

    assert isinstance(create_attention("cbam", 8).bn, torch.nn.BatchNorm2d)
    nobn = create_attention("cbam_nobn", 8)
    assert isinstance(nobn.bn, torch.nn.Identity) and nobn.conv.bias is not None


def test_receptive_field_alignment_shifts_the_unpadded_small_cnn_map():
    from aal.attention.associative import MapGrid, stem_geometry

    model = aal.create_model("small_cnn", attention="cbam")
    assert stem_geometry(model) == (5, 1, 0)
    grid = MapGrid((24, 24), (28, 28), stem_geometry(model))
    m = torch.zeros(1, 1, 24, 24)
    m[0, 0, 10, 3] = 1.0
    up = grid.to_input(m)
    # map pixel (i, j) is the centre of input pixels (i+2, j+2): placed, not stretched
    assert up.shape == (1, 1, 28, 28) and up[0, 0, 12, 5] == 1.0 and up.sum() == 1.0
    edge = torch.arange(24.0).view(1, 1, 1, 24).expand(1, 1, 24, 24)
    assert grid.to_input(edge)[0, 0, 0, :3].tolist() == [0.0, 0.0, 0.0]  # edge values held
    # input -> map: the mean over each map pixel's 5x5 receptive field
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 12, 5] = 25.0
    back = grid.to_map(x)
    assert back.shape == (1, 1, 24, 24) and back[0, 0, 10, 3] == 1.0 and back[0, 0, 8, 1] == 1.0 and back[0, 0, 7, 3] == 0
    # the old stretch is still there by name, and identical resolutions are the identity
    stretched = MapGrid((24, 24), (28, 28), stem_geometry(model), align="resize").to_input(m)
    assert not torch.equal(stretched, up)
    same = MapGrid((8, 8), (8, 8), (3, 1, 1))
    t = torch.rand(2, 1, 8, 8)
    assert torch.equal(same.to_input(t), t) and torch.equal(same.to_map(t), t)
    with pytest.raises(ValueError, match="align"):
        MapGrid((8, 8), (8, 8), None, align="stretch")


def test_strided_stem_places_the_map_on_receptive_field_centres():
    from aal.attention.associative import MapGrid

    grid = MapGrid((16, 16), (32, 32), (7, 2, 3))  # ResNet ImageNet stem: centre of pixel i is 2i
    m = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    row = grid.to_input(m)[0, 0, 0]
    assert row[0] == 0 and row[2] == 1 and row[3] == 1.5 and row[-1] == 15
    assert grid.to_map(torch.rand(1, 1, 32, 32)).shape == (1, 1, 16, 16)


def test_aal_budget_uses_the_alignment(cbam_model):
    x, y = _batch(4)
    r1 = associative_attention(cbam_model, x, y, eps=EPS)
    r2 = associative_attention(cbam_model, x, y, eps=EPS, align="resize")
    assert torch.equal(r1.m, r2.m) and not torch.equal(r1.m_a_input, r2.m_a_input)  # same M, placed differently
    assert torch.equal(r1.m_a_input[..., 2:26, 2:26], r1.m_a)


def test_anti_selective_control_reverses_the_ranks_and_keeps_the_values():
    torch.manual_seed(0)
    mask = torch.rand(3, 1, 6, 6)
    anti = control_mask(mask, "anti")
    assert torch.equal(anti.flatten(1).sort(1).values, mask.flatten(1).sort(1).values)
    flat, aflat = mask.flatten(1), anti.flatten(1)
    top = flat.argmax(1)
    assert torch.equal(aflat.gather(1, top[:, None]).squeeze(1), flat.min(1).values)
    assert torch.equal(control_mask(anti, "anti"), mask)


def test_map_diagnostics_tell_a_selective_budget_from_a_flat_one(cbam_model):
    x, y = _batch(8)
    logs = AAL(eps=EPS)(cbam_model, (x, y)).logs
    assert {"mask_std", "m_std", "backtracked_frac"} <= set(logs)
    assert logs["mask_std"] > 0
    assert AAL(eps=EPS, mask_control="uniform")(cbam_model, (x, y)).logs["mask_std"] < 1e-6
    # indicator coupling: backtracking moves the top-min(zeta, rho) pixels, none when xi2 = 0
    assert AAL(eps=EPS, rho=0.05, zeta=0.1)(cbam_model, (x, y)).logs["backtracked_frac"] == pytest.approx(29 / 576)
    assert AAL(eps=EPS, xi2=0.0)(cbam_model, (x, y)).logs["backtracked_frac"] == 0.0


@pytest.mark.parametrize("profile", ["rank", "binary"])
def test_saliency_placements_share_the_budget_values(cbam_model, profile):
    x, y = _batch(6)
    masks = {}
    for p in ("foreground", "background", "shuffle", "uniform"):
        method = create_method("saliency_fgsm", eps=EPS, placement=p, profile=profile, frac=0.25)
        sal, _ = method.saliency(cbam_model, x, y)
        torch.manual_seed(0)
        masks[p] = method.budget(sal)
        out = method(cbam_model, (x, y))
        assert out.loss.requires_grad and out.logits.shape == (6, 10)
        if p == "foreground":
            assert out.logs["sal_fg_corr"] > 0.5
        if p == "background":
            assert out.logs["sal_fg_corr"] < -0.5
    means = {p: m.flatten(1).mean(1) for p, m in masks.items()}
    for p in ("background", "shuffle", "uniform"):
        assert torch.allclose(means[p], means["foreground"], atol=1e-6)
    assert torch.equal(masks["background"].flatten(1).sort(1).values, masks["foreground"].flatten(1).sort(1).values)
    assert float(masks["uniform"].flatten(1).std(1).max()) < 1e-6
    expected_mean = 0.25 if profile == "binary" else 0.5
    assert torch.allclose(means["foreground"], torch.full((6,), expected_mean), atol=2e-3)


# ----------------------------------------------------------------------------- one list of AAL settings
@pytest.mark.parametrize("name", ["aal", "aal_fgsm", "aal_pgd", "protonet_aal", "detection_aal"])
def test_aal_methods_advertise_the_core_settings_once(name):
    """Every AAL method's signature is its own arguments plus AALCore's settings (minus the ones it fixes),
    with its own defaults; the settings are written once, in AALCore, and reach the core."""
    import inspect

    from aal.methods import METHODS
    from aal.methods.aal_core import core_settings

    cls = METHODS.get(name)
    params = inspect.signature(cls.__init__).parameters
    expected = [n for n in core_settings() if n not in cls.core_fixed]
    assert [n for n in params if n in core_settings()] == expected
    for n in expected:
        assert params[n].default == cls.core_defaults.get(n, core_settings()[n].default), n
    method = cls(eps=0.05, xi2=0.2)
    assert (method.core.eps, method.core.xi2) == (0.05, 0.2)
    for n, v in cls.core_fixed.items():
        if n in core_settings():  # a fixed setting is not settable, not even to its fixed value
            with pytest.raises((TypeError, ValueError)):
                cls(**{n: v})
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_setting'"):
        cls(no_such_setting=1)
