"""Contract tests for every registered attack (after advertorch's test suite).

Each property is checked for every name in ``ATTACKS.names()`` and, where it applies, for both
norms: the input is never modified, the budget (with and without a per-pixel mask, scalar or
per-sample eps) is respected, the model's state is restored, a batch gives the same result as its
samples one by one, and the attacks actually work (against closed-form optima on linear models and
a small trained network).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aal
from aal.attacks import ATTACKS, BIM, FGSM, FGSMRS, PGD, cw_loss, from_spec

NAMES = ATTACKS.names()
NORMS = ("linf", "l2")
CASES = [(name, norm) for name in NAMES for norm in NORMS]
RANDOM_START = {"fgsm_rs", "pgd", "apgd_ce", "apgd_dlr", "apgd_t"}  # attacks that draw a random start by default
SELF_TARGETED = {"apgd_t", "fab", "fab_t"}  # break the true label by construction: take no targeted / minimize
# minimum-norm attacks (FAB): no loss; a point comes back moved iff it is broken within eps (see MIN_NORM tests)
MIN_NORM = {"fab", "fab_t"}
EPS = {"linf": 0.1, "l2": 0.5}
# test-sized schedules (the defaults run 100 APGD steps or 5000 Square queries)
SCHEDULES = {
    "pgd": {"steps": 3},
    "bim": {"steps": 3},
    "apgd_ce": {"steps": 5},
    "apgd_dlr": {"steps": 5},
    "apgd_t": {"steps": 4, "n_target_classes": 2},
    "square": {"n_queries": 20},
    "fab": {"steps": 5},
    "fab_t": {"steps": 5, "n_target_classes": 2},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, eps=None, norm: str = "linf", **kwargs):
    """A registered attack with few steps (tests stay fast) and a fixed seed."""
    schedule = SCHEDULES.get(name, {})
    if "steps" not in schedule:  # single-step attacks and Square (queries) take no steps
        kwargs.pop("steps", None)
    for key, value in schedule.items():
        kwargs.setdefault(key, value)
    kwargs.setdefault("seed", 0)
    return ATTACKS.create(name, EPS[norm] if eps is None else eps, norm=norm, **kwargs)


class TinyNet(nn.Module):
    """conv - BatchNorm - ReLU - Dropout - linear on (B,C,8,8): mode-dependent layers on purpose."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 8 * 8, num_classes)
        with torch.no_grad():  # non-trivial running statistics, so eval and train really differ
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x)))).flatten(1))


def tiny(in_channels=1, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return TinyNet(in_channels).to(dtype).eval()


def batch(b=6, c=1, hw=8, dtype=torch.float32, seed=1, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, hw, hw, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (b,), generator=g)
    return x, y


def random_mask(x, seed=2, shape=None):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape or x.shape, generator=g, dtype=x.dtype)


def ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def labels_for(name, model, x, y):
    """``y``, or for a minimum-norm attack the model's predictions: FAB leaves a point the model
    already misclassifies unchanged (its minimal perturbation is 0), so a test that needs points
    to move gives it correctly classified ones."""
    if name not in MIN_NORM:
        return y
    with torch.no_grad():
        return model(x).argmax(1)


def assert_moved(name, model, x, x_adv, y, size):
    """Every point moved (``size > 0``); for a minimum-norm attack, exactly the points it broke
    moved (the others come back unchanged, as AutoAttack's FAB), and at least one did."""
    if name not in MIN_NORM:
        assert (size > 0).all()
        return
    with torch.no_grad():
        broken = model(x_adv).argmax(1) != y
    assert torch.equal(size > 0, broken) and broken.any()


# ----------------------------------------------------------------------------- input and output
@pytest.mark.parametrize("name,norm", CASES)
def test_input_unchanged(name, norm):
    model = tiny()
    x, y = batch()
    mask = random_mask(x)
    x0, y0, m0 = x.clone(), y.clone(), mask.clone()
    make(name, norm=norm)(model, x, y, mask=mask)
    make(name, norm=norm)(model, x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(mask, m0)
    assert not x.requires_grad


@pytest.mark.parametrize("mask_kind", ["none", "random", "broadcast"])
@pytest.mark.parametrize("name", NAMES)
def test_linf_budget_with_mask(name, mask_kind):
    model = tiny(in_channels=3)
    x, y = batch(c=3)
    mask = {"none": None, "random": random_mask(x), "broadcast": random_mask(x, shape=(x.shape[0], 1, 8, 8))}[mask_kind]
    eps = 0.1
    y = labels_for(name, model, x, y)
    x_adv = make(name, eps, "linf")(model, x, y, mask=mask)
    bound = eps * (torch.ones_like(x) if mask is None else mask.expand_as(x))
    assert ((x_adv - x).abs() <= bound + 1e-6).all()
    assert (x_adv != x).any()  # it did move
    if name in MIN_NORM:
        assert_moved(name, model, x, x_adv, y, (x_adv - x).flatten(1).abs().amax(1))


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_l2_budget(name, with_mask):
    model = tiny()
    x, y = batch()
    eps = 0.5
    mask = random_mask(x) if with_mask else None
    y = labels_for(name, model, x, y)
    x_adv = make(name, eps, "l2")(model, x, y, mask=mask)
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-5).all()
    assert_moved(name, model, x, x_adv, y, norms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,norm", CASES)
def test_range_shape_dtype(name, norm, dtype):
    model = tiny(dtype=dtype)
    x, y = batch(dtype=dtype)
    x[0] = 0.0  # pixels on both edges of the box
    x[1] = 1.0
    x_adv = make(name, norm=norm, eps=0.3 if norm == "linf" else 2.0)(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == dtype
    assert not x_adv.requires_grad
    assert ((x_adv >= 0) & (x_adv <= 1)).all()


@pytest.mark.parametrize("name,norm", CASES)
def test_channels_last(name, norm):
    model = tiny(in_channels=3).to(memory_format=torch.channels_last)
    x, y = batch(c=3)
    x_cl = x.to(memory_format=torch.channels_last)
    mask = random_mask(x, shape=(x.shape[0], 1, 8, 8))
    x_adv = make(name, norm=norm)(model, x_cl, y, mask=mask)
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert ((x_adv >= 0) & (x_adv <= 1)).all()
    if norm == "linf":
        assert ((x_adv - x).abs() <= EPS[norm] * mask + 1e-6).all()
    # the memory format only changes the layout, not the result
    ref = make(name, norm=norm)(model, x, y, mask=mask)
    torch.testing.assert_close(x_adv, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,norm", CASES)
def test_zero_mask_is_identity(name, norm):
    model = tiny()
    x, y = batch()
    x_adv = make(name, norm=norm)(model, x, y, mask=torch.zeros_like(x))
    assert torch.equal(x_adv, x)
    x_adv = make(name, norm=norm)(model, x, y, mask=torch.zeros(x.shape[0], 1, 8, 8))
    assert torch.equal(x_adv, x)


def test_mask_zero_region_untouched_and_one_is_plain_attack():
    model = tiny()
    x, y = batch()
    mask = torch.zeros(x.shape[0], 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    x_adv = make("pgd", steps=5)(model, x, y, mask=mask)
    outside = mask.expand_as(x) == 0
    assert torch.equal(x_adv[outside], x[outside])
    assert (x_adv[~outside] != x[~outside]).any()
    assert torch.equal(make("pgd")(model, x, y, mask=torch.ones_like(x)), make("pgd")(model, x, y))


# ----------------------------------------------------------------------------- model state
def _snapshot(model):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _assert_same_state(model, snap):
    modes, flags, grads, state = snap
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    for k, v in model.state_dict().items():  # BatchNorm running stats included
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
@pytest.mark.parametrize("name,norm", CASES)
def test_model_state_restored(name, norm, start):
    model = tiny()
    model.train(start != "eval")
    if start == "mixed":
        model.drop.eval()
        model.conv.weight.grad = torch.randn_like(model.conv.weight)  # a pre-set grad must survive
        model.fc.bias.requires_grad_(False)  # a frozen parameter must stay frozen
    seen = []
    hook = model.drop.register_forward_hook(lambda m, i, o: seen.append((m.training, model.bn.training)))
    snap = _snapshot(model)
    x, y = batch()
    make(name, norm=norm)(model, x, y)
    hook.remove()
    _assert_same_state(model, snap)
    assert seen and not any(a or b for a, b in seen)  # the attack ran in eval mode


@pytest.mark.parametrize("start", ["train", "eval"])
def test_model_state_restored_when_attack_raises(start):
    model = tiny().train(start == "train")
    model.bn.train(start != "train")
    x, y = batch()
    with torch.no_grad():  # correctly classified points (FAB attacks no other), from a copy in eval mode
        pred = copy.deepcopy(model).eval()(x).argmax(1)
    snap = _snapshot(model)

    def broken_loss(out, y):
        raise RuntimeError("boom")

    def broken_forward(module, inputs, output):
        calls.append(1)
        if len(calls) > limit:  # fails mid-attack (single-step attacks: at their only forward pass)
            raise RuntimeError("boom")

    for name in NAMES:
        if name not in MIN_NORM:
            with pytest.raises(RuntimeError, match="boom"):
                make(name, loss=broken_loss)(model, x, y)
            _assert_same_state(model, snap)
        calls, limit = [], 0 if name in ("fgsm", "fgsm_rs") else 2
        hook = model.fc.register_forward_hook(broken_forward)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                make(name)(model, x, pred if name in MIN_NORM else y)
        finally:
            hook.remove()
        _assert_same_state(model, snap)


def test_mode_keep_and_train():
    model = tiny().train()
    seen = []
    model.drop.register_forward_hook(lambda m, i, o: seen.append(m.training))
    x, y = batch()
    PGD(0.1, steps=2, mode="keep")(model, x, y)
    assert all(seen) and model.training
    model.eval()
    seen.clear()
    PGD(0.1, steps=2, mode="train")(model, x, y)
    assert all(seen) and not model.training


# ----------------------------------------------------------------------------- batch consistency
DETERMINISTIC = [("fgsm", {}), ("bim", {}), ("pgd", {"rand_init": False})]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name,kw", DETERMINISTIC, ids=[d[0] for d in DETERMINISTIC])
def test_batch_equals_single_deterministic(name, kw, norm):
    model = tiny(dtype=torch.float64)
    x, y = batch(dtype=torch.float64)
    mask = random_mask(x, shape=(x.shape[0], 1, 8, 8))
    attack = make(name, norm=norm, seed=None, **kw)
    for m in (None, mask):
        x_adv = attack(model, x, y, mask=m)
        for i in range(x.shape[0]):
            single = attack(model, x[i : i + 1], y[i : i + 1], mask=None if m is None else m[i : i + 1])
            torch.testing.assert_close(x_adv[i : i + 1], single, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name,restarts", [(n, 1) for n in sorted(RANDOM_START)] + [("pgd", 3)])
def test_batch_equals_single_random_start(name, norm, restarts):
    model = tiny(dtype=torch.float64)
    x, y = batch(dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct, and with
    kw = {"restarts": restarts} if restarts > 1 else {}
    # a small budget no restart succeeds, so later restarts decide the result
    attack = make(name, EPS[norm] / 10, norm=norm, seed=123, **kw)
    x_adv = attack(model, x, y)
    torch.testing.assert_close(x_adv[:1], attack(model, x[:1], y[:1]), atol=1e-6, rtol=0)
    # the seed makes calls repeatable; another seed gives another start
    assert torch.equal(attack(model, x, y), x_adv)
    assert not torch.equal(make(name, EPS[norm] / 10, norm=norm, seed=124, **kw)(model, x, y), x_adv)


# ----------------------------------------------------------------------------- per-sample eps
@pytest.mark.parametrize("name,norm", CASES)
def test_scalar_eps_equals_per_sample_eps(name, norm):
    model = tiny(dtype=torch.float64)
    x, y = batch(dtype=torch.float64)
    eps = EPS[norm]
    mask = random_mask(x)
    a = make(name, eps, norm)(model, x, y, mask=mask)
    b = make(name, torch.full((x.shape[0],), eps, dtype=torch.float64), norm)(model, x, y, mask=mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,norm", CASES)
def test_per_sample_eps_respects_each_bound(name, norm):
    model = tiny()
    x, y = batch()
    eps = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.2, 0.3]) * (1 if norm == "linf" else 5)
    y = labels_for(name, model, x, y)
    x_adv = make(name, eps, norm)(model, x, y)
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert torch.equal(x_adv[0], x[0])
    if name in MIN_NORM:
        assert_moved(name, model, x[1:], x_adv[1:], y[1:], size[1:])
    else:
        assert (size[1:] > 0).all()
    if norm == "linf" and name in ("fgsm", "bim", "pgd"):
        # these reach the corners of each sample's own box (unless clipped by [0,1])
        assert (size[1:] >= eps[1:] - 1e-6).all()


def test_per_sample_eps_wrong_length_raises():
    x, y = batch()
    with pytest.raises(ValueError):
        PGD(torch.full((3,), 0.1), steps=1)(tiny(), x, y)


# ----------------------------------------------------------------------------- FGSM reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fgsm_matches_reference(dtype):
    torch.manual_seed(0)
    model = aal.create_model("small_cnn").to(dtype).eval()
    x, y = torch.rand(4, 1, 28, 28, dtype=dtype), torch.tensor([0, 3, 5, 9])
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    eps = 0.1
    ref = torch.clamp(x + eps * g.sign(), 0, 1)
    assert torch.equal(FGSM(eps)(model, x, y), ref)
    # targeted: a step *down* the loss of the target class
    t = (y + 1) % 10
    (gt,) = torch.autograd.grad(F.cross_entropy(model(xr), t), xr)
    assert torch.equal(FGSM(eps, targeted=True)(model, x, t), torch.clamp(x - eps * gt.sign(), 0, 1))
    # with a mask: x + eps * mask * sign(grad), clipped
    mask = random_mask(x)
    torch.testing.assert_close(FGSM(eps)(model, x, y, mask=mask), torch.clamp(x + eps * mask * g.sign(), 0, 1), atol=1e-6, rtol=0)


def test_pixels_on_the_box_edge_keep_moving():
    """A pixel that a random start puts on the edge of [0,1] must still get a gradient, also when
    a fractional mask makes ``x + mask * u`` round one ulp outside the box: PGD on a linear binary
    model must reach the closed-form optimum (see test_linear_binary_linf_optimum)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 8, 8, generator=g) * 0.1
    x[16:] = 1 - x[16:]  # pixels near 0 and near 1
    y = torch.randint(0, 2, (32,), generator=g)
    mask = 0.1 + 0.9 * torch.rand(x.shape, generator=g)
    w = model[1].weight
    s = (w[y] - w[1 - y]).sign().view_as(x)
    opt = torch.clamp(x - 0.2 * mask * s, 0, 1)
    x_adv = PGD(0.2, steps=20, seed=0)(model, x, y, mask=mask)
    torch.testing.assert_close(x_adv, opt, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- effectiveness
def _linear_binary(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).to(dtype)
    with torch.no_grad():
        model[1].weight.mul_(0.5)
    return model


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", ["fgsm", "bim", "pgd"])
def test_linear_binary_linf_optimum(name, masked):
    """For a linear binary classifier the CE is monotone in the margin, so the worst case in the
    L-inf ball intersected with [0,1] is, pixel by pixel, ``clip(x - eps * m * sign(w_y - w_o))``."""
    model = _linear_binary()
    x, y = batch(dtype=torch.float64, classes=2)
    mask = random_mask(x) if masked else None
    eps = 0.1
    w = model[1].weight
    s = (w[y] - w[1 - y]).sign().view_as(x)
    opt = torch.clamp(x - eps * (1 if mask is None else mask) * s, 0, 1)
    x_adv = make(name, eps, "linf", steps=10)(model, x, y, mask=mask)
    torch.testing.assert_close(x_adv, opt, atol=1e-9, rtol=0)
    assert (ce(model, x_adv, y) > ce(model, x, y)).all()


@pytest.mark.parametrize("name,kw", DETERMINISTIC, ids=[d[0] for d in DETERMINISTIC])
def test_linear_binary_l2_optimum(name, kw):
    """Away from the box edges the L2 worst case of a linear binary classifier is
    ``x - eps * g / ||g||`` with ``g = w_y - w_o``."""
    model = _linear_binary()
    x, y = batch(dtype=torch.float64, classes=2)
    x = 0.3 + 0.4 * x
    eps = 0.5
    w = model[1].weight
    g = (w[y] - w[1 - y]).view_as(x)
    opt = x - eps * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert ((opt > 0) & (opt < 1)).all()
    x_adv = make(name, eps, "l2", steps=10, **kw)(model, x, y)
    torch.testing.assert_close(x_adv, opt, atol=1e-9, rtol=0)
    # a random start converges to the same optimum (up to the remaining orthogonal part)
    x_rs = PGD(eps, norm="l2", steps=40, step_size=eps / 4, seed=0)(model, x, y)
    assert (ce(model, x_rs, y) >= ce(model, opt, y) - 1e-3).all()


@pytest.fixture(scope="module")
def trained():
    """TinyNet trained for 300 Adam steps on 4 well-separated random prototypes (8x8)."""
    g = torch.Generator().manual_seed(0)
    protos = 0.2 + 0.6 * torch.rand(4, 1, 8, 8, generator=g)
    y = torch.arange(4).repeat(64)
    x = (protos[y] + 0.08 * torch.randn(len(y), 1, 8, 8, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95, f"the reference model did not train ({acc:.2f})"
    return model, x[:32], y[:32]


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_beats_fgsm_beats_clean(trained, norm):
    model, x, y = trained
    eps = 0.15 if norm == "linf" else 0.8
    clean = ce(model, x, y).mean()
    fgsm = ce(model, FGSM(eps, norm=norm)(model, x, y), y).mean()
    fgsm_rs = ce(model, FGSMRS(eps, norm=norm, seed=0)(model, x, y), y).mean()
    pgd = ce(model, PGD(eps, norm=norm, steps=10, seed=0)(model, x, y), y).mean()
    assert pgd > fgsm > clean and pgd > fgsm_rs > clean
    with torch.no_grad():
        acc_clean = (model(x).argmax(1) == y).float().mean()
        acc_pgd = (model(PGD(eps, norm=norm, steps=10, seed=0)(model, x, y)).argmax(1) == y).float().mean()
    assert acc_pgd < acc_clean


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("norm", NORMS)
def test_restarts_never_worse(trained, norm, loss):
    """Restart 0 is the single run; each sample keeps a success if any restart has one, else its
    highest objective, so per sample the result is at least as bad for the model."""
    model, x, y = trained
    eps = 0.08 if norm == "linf" else 0.4
    loss_fn = cw_loss if loss == "cw" else (lambda o, t: F.cross_entropy(o, t, reduction="none"))
    one = PGD(eps, norm=norm, steps=3, loss=loss, seed=7)(model, x, y)
    many = PGD(eps, norm=norm, steps=3, loss=loss, restarts=4, seed=7)(model, x, y)
    with torch.no_grad():
        o1, om = model(one), model(many)
    s1, sm = o1.argmax(1) != y, om.argmax(1) != y
    l1, lm = loss_fn(o1, y), loss_fn(om, y)
    assert (sm | ~s1).all()  # never loses a success
    assert (lm[~sm] >= l1[~sm] - 1e-6).all()  # without success, never a lower objective
    assert (lm >= l1 - 1e-6).any() and ((lm > l1 + 1e-6) | (sm & ~s1)).any()  # and restarts helped somewhere


@pytest.mark.parametrize("name", NAMES)
def test_targeted_decreases_target_loss(trained, name):
    if name in SELF_TARGETED:
        pytest.skip(f"{name} takes no given target: it breaks the true label (tested in test_apgd.py / test_fab.py)")
    model, x, y = trained
    t = (y + 1) % 4
    x_adv = make(name, 0.15, "linf", targeted=True, steps=10)(model, x, t)
    before, after = ce(model, x, t), ce(model, x_adv, t)
    assert after.mean() < before.mean()
    if name in ("pgd", "bim"):
        assert (after < before).all()
        with torch.no_grad():
            hit = (model(x_adv).argmax(1) == t).float().mean()
        assert hit > 0.2


@pytest.mark.parametrize("name,norm", CASES)
def test_minimize_decreases_true_loss(trained, name, norm):
    if name in SELF_TARGETED:
        pytest.skip(f"{name} breaks the true label by construction; it takes no minimize")
    model, x, y = trained
    x_inv = make(name, 0.1 if norm == "linf" else 0.5, norm, minimize=True, steps=5)(model, x, y)
    before, after = ce(model, x, y), ce(model, x_inv, y)
    assert after.mean() < before.mean()
    if name in ("pgd", "bim", "fgsm"):
        assert (after <= before + 1e-7).all()


def test_minimize_with_restarts_keeps_lowest_loss():
    """With minimize there is no 'success' (a misclassified restart must not win): restarts keep
    the lowest loss of the true class, so per sample never above the single run (restart 0)."""
    model = tiny(seed=1)  # untrained: many samples sit near a decision boundary
    x, y = batch(b=64, seed=1)
    one = PGD(0.05, steps=1, minimize=True, seed=3)(model, x, y)
    many = PGD(0.05, steps=1, minimize=True, restarts=5, seed=3)(model, x, y)
    assert (ce(model, many, y) <= ce(model, one, y) + 1e-7).all()


# ----------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("name", NAMES)
def test_invalid_arguments_raise(name):
    with pytest.raises(ValueError):
        ATTACKS.create(name, 0.1, targeted=True, minimize=True)
    with pytest.raises(ValueError):
        ATTACKS.create(name, -0.1)
    with pytest.raises(ValueError):
        ATTACKS.create(name, float("nan"))
    with pytest.raises(ValueError):
        ATTACKS.create(name, torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError):
        ATTACKS.create(name, 0.1, norm="l1")
    with pytest.raises(TypeError if name in MIN_NORM else ValueError):  # FAB takes no loss at all
        ATTACKS.create(name, 0.1, loss="hinge")
    with pytest.raises(ValueError):
        ATTACKS.create(name, 0.1, mode="test")
    model, (x, y) = tiny(), batch()
    attack = make(name)
    bad_masks = [
        torch.full_like(x, 1.5),  # outside [0,1]
        torch.full_like(x, -0.1),
        torch.full_like(x, float("nan")),
        torch.ones(8, 8),  # wrong number of dims
        torch.ones(x.shape[0], 1, 7, 8),  # does not broadcast
        torch.ones(x.shape[0] + 1, 1, 8, 8),
    ]
    for m in bad_masks:
        with pytest.raises(ValueError):
            attack(model, x, y, mask=m)
    with pytest.raises(ValueError):  # a mask that would broadcast x_adv to a bigger shape
        attack(model, x[:1], y[:1], mask=torch.ones(x.shape[0], 1, 8, 8))
    if name not in MIN_NORM:
        with pytest.raises(ValueError):  # losses must be per sample: restarts rank samples by them
            make(name, loss=lambda o, t: F.cross_entropy(o, t))(model, x, y)


@pytest.mark.parametrize("name", ["pgd", "bim"])
def test_invalid_schedule_raises(name):
    with pytest.raises(ValueError):
        ATTACKS.create(name, 0.1, steps=0)
    with pytest.raises(ValueError):
        ATTACKS.create(name, 0.1, step_size=-0.01)
    with pytest.raises(ValueError):
        PGD(0.1, restarts=0)


def test_fgsm_rs_defaults_follow_wong():
    a = FGSMRS(0.1)
    assert a.steps == 1 and a.rand_init and a.step_size == pytest.approx(0.125)
    f = FGSM(0.1)
    assert f.steps == 1 and not f.rand_init and f.step_size == 0.1
    b = BIM(0.1, steps=4)
    assert not b.rand_init and b.step_size == pytest.approx(2.5 * 0.1 / 4)


# ----------------------------------------------------------------------------- from_spec
@pytest.mark.parametrize(
    "spec,cls,steps,restarts,norm,loss",
    [
        ("fgsm", FGSM, 1, 1, "linf", "ce"),
        ("fgsm_rs", FGSMRS, 1, 1, "linf", "ce"),
        ("pgd20", PGD, 20, 1, "linf", "ce"),
        ("PGD50x5", PGD, 50, 5, "linf", "ce"),
        ("pgd20-l2", PGD, 20, 1, "l2", "ce"),
        ("cw10", PGD, 10, 1, "linf", "cw"),
        ("bim7", BIM, 7, 1, "linf", "ce"),
        ("pgd", PGD, 10, 1, "linf", "ce"),
    ],
)
def test_from_spec(spec, cls, steps, restarts, norm, loss):
    a = from_spec(spec, eps=0.1, seed=5)
    assert type(a) is cls
    assert (a.steps, a.restarts, a.norm, a.seed) == (steps, restarts, norm, 5)
    assert a.loss_fn is aal.attacks.LOSSES[loss]
    assert a.eps == 0.1


@pytest.mark.parametrize("spec", ["", "pgd20x", "xyz", "fgsm10", "fgsm_rsx2", "pgd-20", "pgd20-l3", "pgd0", "pgd20x0", "cw10-l1", "20"])
def test_from_spec_garbage_raises(spec):
    with pytest.raises(ValueError):
        from_spec(spec, eps=0.1)


# ----------------------------------------------------------------------------- torchattacks
def test_matches_torchattacks():
    torchattacks = pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    model = aal.create_model("small_cnn").double().eval()
    x, y = torch.rand(4, 1, 28, 28, dtype=torch.float64), torch.tensor([1, 4, 7, 2])
    eps = 0.1
    ref = torchattacks.FGSM(model, eps=eps)(x, y)
    assert torch.equal(FGSM(eps)(model, x, y), ref)
    ref = torchattacks.PGD(model, eps=eps, alpha=0.02, steps=10, random_start=False)(x, y)
    ours = PGD(eps, steps=10, step_size=0.02, rand_init=False)(model, x, y)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("kw", [{}, {"targeted": True}, {"minimize": True}, {"loss": "cw"}])
def test_fgsm_fast_path_equals_the_generic_loop(norm, kw):
    """FGSM without a mask takes its gradient at x itself; the generic loop (latent u = 0,
    straight-through clip) must give bit-identical examples for images in [0,1]."""
    from aal.attacks.base import IterativeAttack

    model = tiny()
    x, y = batch()
    eps = EPS[norm]
    fast = FGSM(eps, norm=norm, **kw)(model, x, y)
    generic = IterativeAttack(eps, steps=1, step_size=eps, rand_init=False, norm=norm, **kw)(model, x, y)
    assert torch.equal(fast, generic)
    assert not torch.equal(fast, x)
