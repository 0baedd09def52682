"""Training methods: the contract every registered method keeps, and each baseline's maths.

Contract tests are parametrised over ``METHODS.names()`` (timm-style), so a newly registered
method is checked without touching this file.
"""

from __future__ import annotations

import doctest
import gzip
import inspect
import math
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aal
from aal.attacks import PGD
from aal.methods import METHODS, Output, create_method

# methods on (x, y) batches; episodic (few-shot) and detection methods have their own contract
# tests in test_fewshot.py / test_detection.py
NAMES = [n for n in METHODS.names() if getattr(METHODS.get(n), "batch_type", "classification") == "classification"]
ADVERSARIAL = ["fgsm_at", "pgd_at", "trades", "awp_pgd_at", "awp_trades"]


def build(name: str, **overrides) -> object:
    """Method ``name`` with cheap settings: eps 0.1 and 2 steps where it takes them."""
    params = inspect.signature(METHODS.get(name)).parameters
    kw = {k: v for k, v in (("eps", 0.1), ("steps", 2)) if k in params}
    kw.update(overrides)
    try:
        return create_method(name, **kw)
    except ValueError:
        if "steps" not in kw or "steps" in overrides:
            raise
        # a method whose default attack is single-step (e.g. AAL with FGSM) rejects ``steps``
        del kw["steps"]
        return create_method(name, **kw)


def small_model(seed: int = 0) -> nn.Module:
    # cbam: attention-based methods (AAL) need a map; for the others it is one more layer
    torch.manual_seed(seed)
    return aal.create_model("small_cnn", attention="cbam")


def model_for(name: str, seed: int = 0) -> nn.Module:
    """The small model method ``name`` trains: the cbam small_cnn, with a cosine head for ``spat``,
    or behind a small purifier (classifier frozen) for the AToP stages."""
    model = small_model(seed)
    if name == "spat":
        from aal.methods.spat import use_cosine_head

        return use_cosine_head(model)
    if name.startswith("atop"):
        from aal.models.purifier import build_atop_model

        return build_atop_model(model, "purifier_ae", in_channels=1, purifier_options={"width": 8})
    return model


def batch(b: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)


# ----------------------------------------------------------------------------- contract
def test_builtins_registered():
    assert {"standard", "fgsm_at", "pgd_at", "trades"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
    model, (x, y) = model_for(name), batch()
    x0 = x.clone()
    method = build(name)
    assert method.name == name
    repr(method)
    model.train()
    modes = [m.training for m in model.modules()]  # all True, except a frozen AToP classifier
    trainable = [p.requires_grad for p in model.parameters()]  # likewise
    assert all(p.grad is None for p in model.parameters())

    out = method(model, (x, y))

    assert isinstance(out, Output)
    assert out.loss.dim() == 0 and math.isfinite(out.loss.item())
    assert out.logits is None or out.logits.shape == (8, 10)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.logs.values())
    assert torch.equal(x, x0), "the method modified its input"
    assert [m.training for m in model.modules()] == modes, "train mode not preserved"
    assert [p.requires_grad for p in model.parameters()] == trainable, "requires_grad not restored"
    assert all(p.grad is None for p in model.parameters()), "crafting left parameter gradients"

    out.loss.backward()
    for pname, p in model.named_parameters():
        if not p.requires_grad:  # a frozen classifier (AToP) must get none
            assert p.grad is None, f"{pname} is frozen but got a gradient"
            continue
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_preserved(name):
    model, (x, y) = model_for(name), batch()
    model.eval()
    build(name)(model, (x, y))
    assert not any(m.training for m in model.modules())


_SIMPLE = {float, int, bool, str}


@pytest.mark.parametrize("name", NAMES)
def test_signature_is_config_friendly(name):
    """The config system validates YAML against the constructor: keyword args, simple types, defaults."""
    factory = METHODS.get(name)
    hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    for pname, p in inspect.signature(factory).parameters.items():
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY), f"{name}.{pname}: no *args/**kwargs"
        assert p.default is not p.empty, f"{name}.{pname} needs a default"
        hint = hints.get(pname)
        args = set(typing.get_args(hint)) - {type(None)} if isinstance(hint, types.UnionType) else {hint}
        assert args and args <= _SIMPLE, f"{name}.{pname} has annotation {hint!r}"


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "name, kwargs, arg",
    [
        ("fgsm_at", {"eps": -0.1}, "eps"),
        ("fgsm_at", {"eps": float("nan")}, "eps"),
        ("fgsm_at", {"alpha": -0.1}, "alpha"),
        ("fgsm_at", {"norm": "l3"}, "norm"),
        ("fgsm_at", {"clean_weight": 1.5}, "clean_weight"),
        ("fgsm_at", {"attack_mode": "test"}, "attack_mode"),
        ("pgd_at", {"steps": 0}, "steps"),
        ("pgd_at", {"steps": 2.5}, "steps"),
        ("pgd_at", {"step_size": 0.0}, "step_size"),
        ("pgd_at", {"clean_weight": -0.1}, "clean_weight"),
        ("pgd_at", {"eps": float("inf")}, "eps"),
        ("trades", {"beta": -1.0}, "beta"),
        ("trades", {"steps": 0}, "steps"),
        ("trades", {"eps": -1.0}, "eps"),
        ("trades", {"step_size": -0.01}, "step_size"),
        ("trades", {"attack_mode": "Train"}, "attack_mode"),
    ],
)
def test_invalid_hyperparameters(name, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        create_method(name, **kwargs)


def test_bad_batch_is_a_type_error():
    with pytest.raises(TypeError):
        create_method("standard")(small_model(), torch.rand(2, 1, 28, 28))


# ----------------------------------------------------------------------------- the maths
def test_standard_is_clean_ce():
    model, (x, y) = small_model(), batch()
    out = create_method("standard")(model, (x, y))
    assert torch.allclose(out.loss, F.cross_entropy(model(x), y))


def test_fgsm_at_without_random_start_is_ce_at_fgsm_examples():
    model, (x, y) = small_model(), batch()
    eps = 0.1
    xr = x.clone().requires_grad_(True)
    model.eval()  # the attack runs in eval mode (CBAM's gate has a BatchNorm)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    model.train()
    x_fgsm = (x + eps * g.sign()).clamp(0, 1)

    method = create_method("fgsm_at", eps=eps, rand_init=False)
    assert method.alpha == eps
    assert torch.allclose(method.craft(model, x, y), x_fgsm, atol=1e-6)
    out = method(model, (x, y))
    assert torch.allclose(out.loss, F.cross_entropy(model(x_fgsm), y), atol=1e-6)
    assert torch.allclose(out.logits, model(x_fgsm), atol=1e-5)


def test_fgsm_at_random_start_defaults_to_wong_step():
    method = create_method("fgsm_at", eps=0.1)
    assert method.rand_init and method.alpha == pytest.approx(0.125)


def test_clean_weight_mixes_clean_and_adversarial_ce():
    model, (x, y) = small_model(), batch()
    out = create_method("fgsm_at", eps=0.1, rand_init=False, clean_weight=0.5)(model, (x, y))
    expected = 0.5 * out.logs["loss_adv"] + 0.5 * F.cross_entropy(model(x), y).item()
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert {"loss_clean", "acc_clean"} <= set(out.logs)


def test_pgd_at_default_step_size():
    assert create_method("pgd_at", eps=8 / 255).step_size == pytest.approx(2 / 255)


def test_pgd_at_loss_exceeds_standard_loss():
    # statistically (fixed seeds): PGD maximises the CE, so it must beat the clean CE on every
    # trial; several models and batches make a lucky pass unlikely.
    for seed in range(3):
        model, (x, y) = small_model(seed), batch(16, seed + 10)
        torch.manual_seed(seed)
        adv = create_method("pgd_at", eps=0.1, steps=5)(model, (x, y)).loss.item()
        clean = create_method("standard")(model, (x, y)).loss.item()
        assert adv > clean + 1e-3


def test_trades_beta_zero_is_clean_ce():
    model, (x, y) = small_model(), batch()
    out = create_method("trades", eps=0.1, steps=2, beta=0.0)(model, (x, y))
    assert torch.allclose(out.loss, F.cross_entropy(model(x), y))
    assert out.logs["loss_robust"] > 0  # the KL is still measured, just not trained on


def test_trades_kl_vanishes_without_budget():
    model, (x, y) = small_model(), batch()
    method = create_method("trades", eps=0.0, steps=2, beta=6.0)
    assert torch.equal(method.craft(model, x, y), x)
    out = method(model, (x, y))
    assert abs(out.logs["loss_robust"]) < 1e-6
    assert out.loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), abs=1e-5)


def test_trades_loss_is_ce_plus_beta_batchmean_kl():
    model, (x, y) = small_model(), batch()
    torch.manual_seed(0)
    method = create_method("trades", eps=0.1, steps=3, beta=6.0)
    x_adv = method.craft(model, x, y)
    torch.manual_seed(0)
    out = method(model, (x, y))
    p = F.softmax(model(x), 1)
    kl = (p * (p.log() - F.log_softmax(model(x_adv), 1))).sum() / x.shape[0]
    assert out.logs["loss_robust"] == pytest.approx(kl.item(), rel=1e-4, abs=1e-7)
    assert out.loss.item() == pytest.approx(F.cross_entropy(model(x), y).item() + 6.0 * kl.item(), rel=1e-5)


def test_trades_attack_increases_kl():
    model, (x, y) = small_model(), batch()
    method = create_method("trades", eps=0.1, steps=5)
    p = F.softmax(model(x), 1)
    kl = lambda xa: F.kl_div(F.log_softmax(model(xa), 1), p, reduction="batchmean").item()  # noqa: E731
    noise = (x + 0.1 * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
    assert kl(method.craft(model, x, y)) > kl(noise)


# ----------------------------------------------------------------------------- threat model
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_craft_respects_budget_and_mask(name):
    model, (x, y) = small_model(), batch()
    method = build(name, eps=0.1)
    x_adv = method.craft(model, x, y)
    assert ((x_adv - x).abs() <= 0.1 + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)

    assert torch.equal(method.craft(model, x, y, mask=torch.zeros(8, 1, 28, 28)), x)
    mask = torch.zeros(8, 1, 28, 28)
    mask[..., 7:21, 7:21] = 1
    x_sel = method.craft(model, x, y, mask=mask)
    assert torch.equal(x_sel[..., :7, :], x[..., :7, :]) and not torch.equal(x_sel, x)
    out = method.compute(model, x, y, mask=mask)
    assert math.isfinite(out.loss.item())


class _Recorder(nn.Module):
    """BatchNorm+dropout net whose BN layer records (training, params require grad) per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * 26 * 26, 10)
        )
        self.calls: list[tuple[bool, bool]] = []
        self.net[1].register_forward_hook(
            lambda m, i, o: self.calls.append((m.training, m.weight.requires_grad))
        )

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("name", ADVERSARIAL)
@pytest.mark.parametrize("attack_mode", ["eval", "train"])
def test_attack_mode_is_used_while_crafting_only(name, attack_mode):
    torch.manual_seed(0)
    model, (x, y) = _Recorder(), batch()
    model.train()
    out = build(name, attack_mode=attack_mode)(model, (x, y))
    crafting = [t for t, grads in model.calls if not grads]
    training = [t for t, grads in model.calls if grads]
    assert crafting and all(t == (attack_mode == "train") for t in crafting)
    assert training and all(training), "the loss must be computed in the caller's (train) mode"
    assert all(m.training for m in model.modules())
    out.loss.backward()


# ----------------------------------------------------------------------------- docs
@pytest.mark.parametrize("module", ["aal.methods", "aal.methods.standard", "aal.methods.adversarial", "aal.methods.trades", "aal.methods.awp"])
def test_docstring_examples(module):
    mod = __import__(module, fromlist=["_"])
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# ----------------------------------------------------------------------------- real data
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _idx(path: Path) -> np.ndarray:
    """A tiny reader for the IDX format of the official (Fashion-)MNIST files."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fmnist(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = FMNIST / f"{split}-images-idx3-ubyte.gz", FMNIST / f"{split}-labels-idx1-ubyte.gz"
    if not (images.exists() and labels.exists()):
        pytest.skip(f"Fashion-MNIST not found in {FMNIST} (apt-get install dataset-fashion-mnist)")
    x = torch.from_numpy(_idx(images)[:n].astype(np.float32) / 255.0)[:, None]
    y = torch.from_numpy(_idx(labels)[:n].astype(np.int64))
    return x, y


def _train_and_attack(name: str, epochs: int = 4, **kw) -> tuple[float, float]:
    """Train small_cnn on 2000 Fashion-MNIST images; (clean, PGD-10 eps 0.1) accuracy on 500 test images."""
    xtr, ytr = _fmnist("train", 2000)
    xte, yte = _fmnist("t10k", 500)
    torch.manual_seed(0)
    model = aal.create_model("small_cnn")
    method = create_method(name, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr)).split(100):
            out = method(model, (xtr[idx], ytr[idx]))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
    model.eval()
    x_adv = PGD(eps=0.1, steps=10, seed=0)(model, xte, yte)
    with torch.no_grad():
        clean = (model(xte).argmax(1) == yte).float().mean().item()
        robust = (model(x_adv).argmax(1) == yte).float().mean().item()
    return clean, robust


@pytest.fixture(scope="module")
def standard_fmnist() -> tuple[float, float]:
    return _train_and_attack("standard")


@pytest.mark.parametrize(
    "name, kw",
    [
        ("pgd_at", {"eps": 0.1, "steps": 5}),  # ~10 s on an idle 2-core machine
        pytest.param("fgsm_at", {"eps": 0.1}, marks=pytest.mark.slow),
        pytest.param("trades", {"eps": 0.1, "steps": 5, "beta": 6.0}, marks=pytest.mark.slow),
    ],
)
def test_adversarial_training_beats_standard_under_pgd(name, kw, standard_fmnist):
    std_clean, std_robust = standard_fmnist
    clean, robust = _train_and_attack(name, **kw)
    # measured here (2 CPU cores, 4 epochs): standard ~0.79 clean / ~0.32 PGD; PGD-AT ~0.69 / ~0.54
    assert std_clean > 0.6 and clean > 0.6, "training did not learn"
    assert robust > std_robust + 0.15, f"{name}: PGD acc {robust:.3f} vs standard {std_robust:.3f}"
