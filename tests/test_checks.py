"""Gradient-masking checks: planted masking models are flagged, a normally trained model is not.

The trained model is a small CNN fitted for 200 steps on real Fashion-MNIST (skipped cleanly
when the data are absent); the planted models wrap the same network so that only the masking
differs: input quantisation without a straight-through gradient (Athalye et al. 2018's
"shattered gradients") and a softmax scaled by 1e4 (saturated outputs, vanishing CE gradients).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import Noisy
from aal.attacks import ATTACKS
from aal.eval.checks import CHECKS, CheckReport, CheckResult, RandomNoise, margin_loss, run_checks

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
EPS = 0.03  # a standard-trained model keeps ~60% accuracy here: every check has something to see
# cheap settings (defaults are PGD 10/50/50x3, sweep 20 steps, Square 1000 queries, n=500)
FAST = dict(n=100, steps=(5, 20), restarts=2, sweep_steps=10, square_queries=100, noise_draws=10, batch_size=100)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(fmnist_small_cnn):
    """(model, test data): the shared small CNN (conftest), first 200 test images."""
    model, test = fmnist_small_cnn
    return model, (test.images[:200], test.labels[:200])


class Quantised(nn.Module):
    """Rounds its input to 5 grey levels before the network: the gradient is zero almost everywhere."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


class Saturated(nn.Module):
    """1e4 * softmax(logits): the same predictions, saturated outputs, CE gradients exactly zero."""

    def __init__(self, net: nn.Module, scale: float = 1e4) -> None:
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x):
        return self.scale * torch.softmax(self.net(x), 1)


def test_normal_model_is_not_flagged(trained):
    model, data = trained
    report = run_checks(model, data, eps=EPS, **FAST)
    assert [c.name for c in report.checks] == list(CHECKS)
    flagged = [c for c in report.checks if c.status in ("warn", "fail")]
    assert not flagged, report.table()
    assert report.status == "pass"
    if "square" not in ATTACKS:
        assert report["whitebox_vs_blackbox"].status == "skip"
    # the numbers behind the verdicts are real measurements, consistent with each other
    sweep = report["eps_growth"].numbers
    assert sweep["accuracy"][-1] == 0.0 and sweep["eps"][-1] == 1.0
    assert 0.3 < report["steps_restarts"].numbers["acc_pgd20"] < sweep["clean"]
    json.dumps(report.to_dict())


def test_quantised_input_is_flagged(trained):
    model, data = trained
    report = run_checks(Quantised(model), data, eps=EPS, which=["gradients", "eps_growth", "whitebox_vs_blackbox"], **FAST)
    assert report.status == "fail", report.table()
    g = report["gradients"]
    assert g.status == "fail" and g.numbers["zero_frac_ce"] == 1.0 and g.numbers["zero_frac_margin"] == 1.0
    assert report["eps_growth"].status in ("warn", "fail")
    assert report["eps_growth"].numbers["accuracy"][-1] > 0.05  # PGD cannot move: far from ~0 even at eps=1
    if "square" in ATTACKS:  # the black box walks past the masked gradients
        assert report["whitebox_vs_blackbox"].status == "fail", report.table()


def test_saturated_softmax_is_flagged(trained):
    model, data = trained
    report = run_checks(Saturated(model), data, eps=EPS, which=["logits", "gradients", "eps_growth"], **FAST)
    assert report["logits"].status == "warn" and "scaled probabilities" in report["logits"].message
    assert report["gradients"].status == "fail" and report["gradients"].numbers["zero_frac_ce"] > 0.5
    assert report["eps_growth"].status in ("warn", "fail")
    assert report.status == "fail"


def test_probabilities_and_randomness_are_reported(trained):
    model, data = trained
    probs = nn.Sequential(model, nn.Softmax(dim=1))
    r = run_checks(probs, data, eps=EPS, which=["logits"], n=50)
    assert r["logits"].status == "warn" and "probabilities" in r["logits"].message
    r = run_checks(Noisy(model), data, eps=EPS, which=["deterministic", "gradients"], n=20, eot_n=2)
    assert r["deterministic"].status == "warn" and r.eot_n == 2
    assert r["deterministic"].numbers["max_output_diff"] > 0
    assert r["gradients"].status == "pass"  # gradients through the EOT wrapper are fine


def test_steps_restarts_and_single_step_fail_on_planted_attacks(monkeypatch):
    """Paired comparisons trip when an attack gets lost: planted in the attacks, not the model.

    (1) PGD with more than 5 steps is a no-op, so accuracy rises with steps; (2) every PGD run
    is a no-op and "FGSM" is a real PGD-20, so the single-step attack beats the iterative one.
    """
    import aal.eval.checks as checks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x = torch.rand(64, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct
    real_pgd = checks.PGD
    lost_above = {"steps": 5}

    class LostPGD(real_pgd):
        def __call__(self, m, xb, yb, mask=None):
            return xb.clone() if self.steps > lost_above["steps"] else super().__call__(m, xb, yb, mask)

    class StrongFGSM:
        def __init__(self, eps, norm="linf"):
            self.pgd = real_pgd(eps, steps=20, norm=norm, seed=0)

        def __call__(self, m, xb, yb):
            return self.pgd(m, xb, yb)

    monkeypatch.setattr(checks, "PGD", LostPGD)
    monkeypatch.setattr(checks, "FGSM", StrongFGSM)
    kw = dict(eps=0.3, n=None, steps=(5, 20), restarts=2, which=["steps_restarts", "single_vs_iterative"])
    r = run_checks(model, (x, y), **kw)
    nums = r["steps_restarts"].numbers
    assert nums["acc_pgd20"] == 1.0 > nums["acc_pgd5"] + 0.1
    assert r["steps_restarts"].status == "fail", r.table()
    lost_above["steps"] = 0
    r = run_checks(model, (x, y), **kw)
    assert r["single_vs_iterative"].status == "fail", r.table()
    assert r["single_vs_iterative"].numbers["acc_fgsm"] < 0.9
    assert r["steps_restarts"].status == "pass"  # all equal (and useless): this check cannot see it


def test_random_noise_stays_in_budget_and_is_seeded():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(10, 3, 2, 2), torch.randint(0, 3, (10,))
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        noise = RandomNoise(eps, norm, draws=4, seed=1)
        a, b = noise(model, x, y), noise(model, x, y)
        assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
        d = (a - x).flatten(1)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert bool((size <= eps + 1e-6).all())


def test_margin_loss_is_unclamped():
    z = torch.tensor([[100.0, 0.0, -1.0]], requires_grad=True)
    loss = margin_loss(z, torch.tensor([0]))
    assert loss.item() == -100.0
    (g,) = torch.autograd.grad(loss.sum(), z)
    assert g.tolist() == [[-1.0, 1.0, 0.0]]  # a clamp at -kappa would give zeros


def test_report_objects_and_errors():
    ok, warn = CheckResult("a", "pass", "fine", {"x": 1}), CheckResult("b", "warn", "hmm", {})
    rep = CheckReport([ok, warn, CheckResult("c", "skip", "n/a")], n=10, eps=0.1, norm="linf", tol=0.02, seconds=1.0)
    assert rep.status == "warn" and rep["a"] is ok
    table = rep.table()
    assert "PASS  a" in table and "WARN  b" in table and "1 warn" in table
    assert json.loads(json.dumps(rep.to_dict()))["checks"][0] == {"name": "a", "status": "pass", "message": "fine", "numbers": {"x": 1}}
    assert CheckReport([CheckResult("c", "skip", "")], 1, 0.1, "linf", 0.01, 0.0).status == "pass"
    with pytest.raises(ValueError):
        CheckResult("a", "bad", "")
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    data = (torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown checks"):
        run_checks(model, data, eps=0.1, which=["nope"])
    with pytest.raises(ValueError, match="eps"):
        run_checks(model, data, eps=0.0)
    with pytest.raises(ValueError, match="steps"):
        run_checks(model, data, eps=0.1, steps=(5, 5))


def test_check_registry_contract():
    """Every check is a registered ``check_<name>(ctx)`` returning its own named CheckResult, in table order."""
    import aal.eval.checks as checks
    from aal.eval.checks import CHECK_FUNCTIONS, CheckContext, register_check

    assert list(CHECKS) == ["deterministic", "logits", "gradients", "single_vs_iterative", "steps_restarts",
                            "eps_growth", "noise_vs_attack", "whitebox_vs_blackbox"]  # the module doc's table
    assert list(CHECK_FUNCTIONS) == list(CHECKS)
    for name in CHECKS:
        assert f"\n{name} " in checks.__doc__, name  # every check is documented in the table
        assert CHECK_FUNCTIONS[name].__name__ == f"check_{name}" and CHECK_FUNCTIONS[name].__doc__
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()
    x, y = torch.rand(24, 1, 4, 4), torch.randint(0, 4, (24,))
    ctx = CheckContext(model=model, attack_model=model, x=x, y=y, eps=0.1, norm="linf", tol=0.05, batch_size=8, seed=0,
                       progress=False, device=torch.device("cpu"),
                       randomness={"randomized": False, "max_output_diff": 0.0, "prediction_flips": 0, "passes": 2},
                       eot_n=None, steps=(2, 4), restarts=2, sweep_steps=2, square_queries=10, noise_draws=2)
    for name in CHECKS:
        r = CHECK_FUNCTIONS[name](ctx)
        assert isinstance(r, CheckResult) and r.name == name and r.status in ("pass", "warn", "fail", "skip"), name
        json.dumps(r.to_dict())  # JSON-able numbers
    assert {"clean", "pgd2", "pgd4", "pgd4x2", "fgsm", "noise"} <= set(ctx.cache)  # shared results, run once
    with pytest.raises(ValueError, match="check_<name>"):
        register_check(lambda ctx: None)
    with pytest.raises(ValueError, match="already registered"):
        def check_logits(ctx):  # noqa: F811 - a second check of an existing name
            return None
        register_check(check_logits)
    assert list(CHECK_FUNCTIONS) == list(CHECKS)  # refused registrations leave the registry as it was
