"""AWP (Wu, Xia & Wang 2020) on PGD-AT and TRADES: the paper's formula, the restore, the trainer.

Checked by hand on tiny models: which weights are perturbed and by how much (``||v_l|| = gamma
||w_l||`` along the loss gradient), that the loss is evaluated at ``w + v``, that a full trainer
step gives exactly ``w - lr * grad L(w + v)`` (the perturbation removed before the optimizer
step, weight decay taken at ``w``), that the restore is bit-exact, that BatchNorm statistics are
not touched by the ascent forward, the warm-up, and checkpoint/resume. The generic method
contract runs over every registered method in tests/test_methods.py; 2-process DDP is in
tests/test_distributed.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aal
from aal.engine import Trainer
from aal.methods import create_method
from aal.methods.awp import perturbed_weights

GAMMA = 0.02


class Net(nn.Module):
    """Conv + BatchNorm + linear: weights that AWP perturbs, and 1-D ones (bias, BN) that it must not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def data(b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().train()


def method(name: str, **kw):
    base = {"eps": 0.1, "steps": 2, "gamma": GAMMA}
    if name == "awp_pgd_at":
        base["rand_init"] = False  # deterministic crafting: the hand computation sees the same x'
    base.update(kw)
    return create_method(name, **base)


def inner_loss(name: str, model, x, x_adv, y):
    """The inner method's loss written out by hand (PGD-AT: CE on x'; TRADES: CE + 6 * KL)."""
    if name == "awp_pgd_at":
        return F.cross_entropy(model(x_adv), y)
    logits = model(x)
    kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    return F.cross_entropy(logits, y) + 6.0 * kl


def hand_perturbation(name: str, model, x, x_adv, y, gamma=GAMMA) -> dict[str, torch.Tensor]:
    """v_l = gamma * ||w_l|| * g_l / ||g_l||, g = grad of the inner loss at w, on a copy (BN stats kept)."""
    proxy = copy.deepcopy(model)
    weights = {n: p for n, p in proxy.named_parameters() if p.dim() > 1}
    grads = torch.autograd.grad(inner_loss(name, proxy, x, x_adv, y), list(weights.values()))
    return {n: gamma * w.detach().norm() * g / g.norm() for (n, w), g in zip(weights.items(), grads)}


@pytest.mark.parametrize("name", ["awp_pgd_at", "awp_trades"])
def test_perturbation_is_the_papers_formula_and_loss_is_at_w_plus_v(name):
    model, (x, y) = net(), data()
    m = method(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    x_adv = m.craft(model, x, y)
    v = hand_perturbation(name, model, x, x_adv, y)
    assert set(v) == {"conv.weight", "fc.weight"} == set(perturbed_weights(model))

    torch.manual_seed(0)  # TRADES' Gaussian start: the same x' as above
    out = m(model, (x, y))
    for k, p in model.named_parameters():
        if k in v:
            d = p.detach() - before[k]
            assert d.norm() / before[k].norm() == pytest.approx(GAMMA, rel=1e-4), k
            assert torch.allclose(d, v[k], atol=1e-6, rtol=1e-4), k
        else:
            assert torch.equal(p, before[k]), f"{k} is 1-D (bias/BN) and must not be perturbed"

    at = copy.deepcopy(model)  # model now holds w + v; the loss must be the inner loss there
    assert out.loss.item() == pytest.approx(inner_loss(name, at, x, x_adv, y).item(), rel=1e-5)
    assert out.logs["awp_active"] == 1.0
    out.loss.backward()
    m.after_backward(model)
    for k, t in model.state_dict().items():
        if k in v:
            assert torch.equal(t, before[k]), f"{k} not restored bit-exactly"
    # the diagnostic: loss at w + v minus the loss at w on the same batch, and the ascent made it positive
    at_w = inner_loss(name, copy.deepcopy(model), x, x_adv, y).item()
    assert out.logs["awp_loss_gain"] == pytest.approx(out.loss.item() - at_w, rel=1e-4, abs=1e-6)
    assert out.logs["awp_loss_gain"] > 0


def test_restore_is_bit_identical_and_a_missing_restore_is_an_error():
    torch.manual_seed(0)
    model, (x, y) = aal.create_model("small_cnn", attention="cbam").train(), data(4, 2)
    x = torch.nn.functional.interpolate(x, size=28)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    m = create_method("awp_pgd_at", eps=0.1, steps=2)
    out = m(model, (x, y))
    assert any(not torch.equal(p, params[k]) for k, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="after_backward"):
        m(model, (x, y))  # the second call would save w + v as "w"
    out.loss.backward()
    m.after_backward(model)
    for k, p in model.named_parameters():
        assert torch.equal(p, params[k]), k
    m.after_backward(model)  # idempotent
    assert all(torch.equal(p, params[k]) for k, p in model.named_parameters())


@pytest.mark.parametrize("name", ["awp_pgd_at", "awp_trades"])
def test_trainer_step_is_sgd_on_the_gradient_at_w_plus_v(name):
    """One trainer step = ``w - lr * (grad L(w + v) + wd * w)``: v removed before the step; BN
    running statistics updated once, by the training forward at w + v (not by the ascent)."""
    lr, wd = 0.1, 5e-3
    model, (x, y) = net(), data()
    m = method(name)
    ref = copy.deepcopy(model)
    torch.manual_seed(0)
    x_adv = m.craft(ref, x, y)
    v = hand_perturbation(name, ref, x, x_adv, y)
    with torch.no_grad():
        for k, p in ref.named_parameters():
            if k in v:
                p.add_(v[k])
    grads = torch.autograd.grad(inner_loss(name, ref, x, x_adv, y), list(ref.parameters()))
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    expected = {k: start[k] - lr * (g + wd * start[k]) for (k, _), g in zip(model.named_parameters(), grads)}

    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    trainer = Trainer(model, m, [(x, y)], opt, epochs=1, progress=False, seed=0)
    trainer.fit()  # seeds with 0 as above: TRADES draws the same start
    for k, p in model.named_parameters():
        assert torch.allclose(p, expected[k], rtol=1e-5, atol=1e-7), k
    for k in ("bn.running_mean", "bn.running_var"):
        assert torch.allclose(model.state_dict()[k], ref.state_dict()[k], atol=1e-7), k
    training_forwards = 1 if name == "awp_pgd_at" else 2  # TRADES: f(x) and f(x')
    assert int(model.state_dict()["bn.num_batches_tracked"]) == training_forwards


def test_gamma_zero_and_warmup_are_plain_pgd_at():
    model, (x, y) = net(), data()
    plain = create_method("pgd_at", eps=0.1, steps=2, rand_init=False)(copy.deepcopy(model), (x, y))
    for kw in ({"gamma": 0.0}, {"awp_warmup": 1}):
        out = method("awp_pgd_at", **kw)(copy.deepcopy(model), (x, y))  # fresh BN statistics each time
        assert torch.equal(out.loss, plain.loss) and out.logs["awp_active"] == out.logs["awp_loss_gain"] == 0.0


def _run(run_dir, epochs, name="awp_pgd_at", **kw):
    x, y = data(24, 3)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    params = {"eps": 0.1, "steps": 2, **({"gamma": GAMMA} if name.startswith("awp") else {}), **kw}
    return Trainer(model, create_method(name, **params), batches, opt, epochs=epochs, run_dir=run_dir,
                   progress=False, seed=0)


def test_warmup_epoch_trains_like_pgd_at_and_later_epochs_do_not():
    awp, plain = _run(None, 1, awp_warmup=1), _run(None, 1, name="pgd_at")
    awp.fit(), plain.fit()
    assert all(torch.equal(a, b) for a, b in zip(awp.model.state_dict().values(), plain.model.state_dict().values()))
    active = _run(None, 1, awp_warmup=0)
    active.fit()
    assert not torch.equal(active.model.fc.weight, plain.model.fc.weight)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = _run(tmp_path / "full", 3, awp_warmup=1)
    full.fit()
    assert [r["logs"]["awp_active"] for r in full.history] == [0.0, 1.0, 1.0]
    part = _run(tmp_path / "part", 2, awp_warmup=1)
    part.fit()
    resumed = _run(None, 3, awp_warmup=1)
    resumed.resume(tmp_path / "part")
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.method.state_dict() == {}  # nothing hidden: the epoch comes from on_epoch_start


def test_several_ascent_steps_stay_in_the_relative_ball():
    model, (x, y) = net(), data()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    m = method("awp_pgd_at", awp_steps=3, awp_step_size=GAMMA)
    m(model, (x, y))
    for k in ("conv.weight", "fc.weight"):
        rel = (model.get_parameter(k).detach() - before[k]).norm() / before[k].norm()
        assert rel <= GAMMA * (1 + 1e-5) and rel > 0.5 * GAMMA, (k, float(rel))
    m.restore()
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    single = method("awp_pgd_at")  # the official single step of length gamma
    assert single.awp_step_size == GAMMA and single.awp_steps == 1


@pytest.mark.parametrize(
    "kw, arg",
    [({"gamma": -0.1}, "gamma"), ({"gamma": math.nan}, "gamma"), ({"awp_warmup": -1}, "awp_warmup"),
     ({"awp_steps": 0}, "awp_steps"), ({"awp_step_size": 0.0}, "awp_step_size")],
)
@pytest.mark.parametrize("name", ["awp_pgd_at", "awp_trades"])
def test_invalid_hyperparameters(name, kw, arg):
    with pytest.raises(ValueError, match=arg):
        create_method(name, **kw)


@pytest.mark.parametrize("name, inner", [("awp_pgd_at", "pgd_at"), ("awp_trades", "trades")])
def test_awp_signature_is_its_own_arguments_then_the_inner_methods(name, inner):
    """The inner method's argument list is written once (compose_signature), with the same defaults."""
    import inspect

    from aal.methods import METHODS

    outer = inspect.signature(METHODS.get(name).__init__).parameters
    base = inspect.signature(METHODS.get(inner).__init__).parameters
    assert [n for n in outer if n in base] == list(base)
    assert all(outer[n].default == base[n].default for n in base if n != "self")
    assert {"gamma", "awp_warmup", "awp_steps", "awp_step_size"} <= set(outer)
    with pytest.raises(TypeError):
        METHODS.get(name)(no_such_argument=1)


def test_compose_signature_needs_kwargs():
    from aal.methods.base import compose_signature

    def init(self, a: int = 1) -> None: ...

    with pytest.raises(TypeError, match="must take \\*\\*kwargs"):
        compose_signature(init, lambda b=2: None)
