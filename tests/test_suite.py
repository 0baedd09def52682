"""Evaluation suites: cumulative stages, bookkeeping, resumable state, EOT for randomised models,
and the suite's strength against PGD with restarts on a small model trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import Noisy
from aal.attacks import ATTACKS, PGD
from aal.eval import EOTWrapper, SUITES, Stage, SuiteResult, evaluate, is_randomized, randomness, run_suite
from aal.eval.suite import SuiteStateError, build_attack, model_digest

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))


def tagged(x):
    """Pixel 0 of point i holds i / 1000, so stand-in attacks can tell points apart."""
    x = x.clone()
    x[:, 0, 0, 0] = torch.arange(len(x)) / 1000
    return x


@pytest.fixture
def setup():
    model = tiny()
    g = torch.Generator().manual_seed(1)
    x = tagged(torch.rand(40, 3, 4, 4, generator=g))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:8] = (y[:8] + 1) % 5  # exactly 32 of 40 clean-correct
    return model, x, y


class ByIndex:
    """A deterministic stand-in attack: points whose tag is in ``breaks`` become a fixed image the
    model misclassifies; the others come back unchanged. Counts calls; can raise after some."""

    def __init__(self, model, y_all, breaks, fail_after=None):
        self.breaks, self.calls, self.fail_after, self.seen = set(breaks), 0, fail_after, []
        self.model, self.y_all = model, y_all

    def __call__(self, model, x, y):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("planted interruption")
        idx = (x[:, 0, 0, 0] * 1000).round().long()
        self.seen.extend(idx.tolist())
        out = x.clone()
        for j, i in enumerate(idx.tolist()):
            if i in self.breaks:
                out[j] = self.adversary(x[j], y[j])
        return out

    def adversary(self, x, y):
        g = torch.Generator().manual_seed(0)
        for _ in range(200):  # a random image of the unbounded ball that the model gets wrong
            cand = torch.rand(x.shape, generator=g)
            with torch.no_grad():
                if self.model(cand[None]).argmax(1).item() != int(y):
                    return cand
        raise AssertionError("no misclassified image found")


def test_stages_are_cumulative_and_bookkept(setup, tmp_path):
    model, x, y = setup
    clean = evaluate(model, (x, y), attacks=("clean",)).correct["clean"]
    ok = clean.nonzero().flatten().tolist()
    a = ByIndex(model, y, breaks=ok[:10])
    b = ByIndex(model, y, breaks=ok[5:15])  # overlaps a: only ok[10:15] are new
    res = run_suite(model, (x, y), [("a", a), ("b", b)], eps=1.0, batch_size=7)
    assert isinstance(res, SuiteResult) and list(res.accuracy) == ["clean", "a", "b", "robust"]
    assert sorted(a.seen) == ok  # a attacks every clean-correct point, and only those
    assert sorted(b.seen) == ok[10:]  # b only the survivors of a
    assert res.attacked == {"a": 32, "b": 22}
    assert res.accuracy["clean"] == pytest.approx(32 / 40)
    assert res.accuracy["a"] == pytest.approx(22 / 40) and res.accuracy["b"] == pytest.approx(17 / 40)
    assert res.robust == res.accuracy["b"]
    assert torch.equal(res.correct["robust"], clean & ~torch.isin(torch.arange(40), torch.tensor(ok[:15])))
    # predictions: the successful adversarial prediction for broken points, the label for robust ones
    broken = torch.tensor(ok[:15])
    assert bool((res.pred[broken] != y[broken]).all())
    assert torch.equal(res.pred[res.correct["robust"]], y[res.correct["robust"]])
    d = json.loads(json.dumps(res.to_dict()))
    assert d["suite"] == "custom" and d["cumulative"] and d["attacked"] == {"a": 32, "b": 22} and not d["randomized"]
    assert set(d["seconds"]) == {"clean", "a", "b"}
    table = res.table()
    for word in ("stage", "accuracy %", "attacked", "a", "b", "robust", f"{100 * res.robust:.2f}"):
        assert word in table


def _reference_and_interrupted(model, x, y, ok, state):
    """An uninterrupted two-stage suite in batches of 5, and the same suite stopped in stage b after its
    first two batches (state in ``state``); returns the reference result and the stopped stage-b attack."""
    ref = run_suite(model, (x, y), [("a", ByIndex(model, y, ok[:10])), ("b", ByIndex(model, y, ok[12:20]))], eps=1.0, batch_size=5)
    a, b = ByIndex(model, y, ok[:10]), ByIndex(model, y, ok[12:20], fail_after=2)
    with pytest.raises(RuntimeError, match="planted"):
        run_suite(model, (x, y), [("a", a), ("b", b)], eps=1.0, batch_size=5, state_path=state)
    return ref, b


def test_resume_skips_finished_stages_and_batches(setup, tmp_path):
    model, x, y = setup
    ok = evaluate(model, (x, y), attacks=("clean",)).correct["clean"].nonzero().flatten().tolist()
    state = tmp_path / "state.json"
    ref, b = _reference_and_interrupted(model, x, y, ok, state)
    saved = json.loads(state.read_text())
    assert set(saved["stages"]) == {"a"} and saved["current"]["stage"] == "b"
    seen_b = list(b.seen)
    assert len(seen_b) == 10

    a2, b2 = ByIndex(model, y, ok[:10]), ByIndex(model, y, ok[12:20])
    res = run_suite(model, (x, y), [("a", a2), ("b", b2)], eps=1.0, batch_size=5, state_path=state)
    assert a2.calls == 0  # stage a is not recomputed
    assert sorted(b2.seen + seen_b) == ok[10:] and not set(b2.seen) & set(seen_b)  # nor b's finished batches
    assert res.resumed and any("resumed" in note for note in res.notes)
    assert res.accuracy == ref.accuracy and torch.equal(res.correct["robust"], ref.correct["robust"])
    assert torch.equal(res.pred, ref.pred)

    # finished: a rerun attacks nothing and gives the same numbers
    a3, b3 = ByIndex(model, y, ok[:10]), ByIndex(model, y, ok[12:20])
    again = run_suite(model, (x, y), [("a", a3), ("b", b3)], eps=1.0, batch_size=5, state_path=state)
    assert a3.calls == b3.calls == 0 and again.accuracy == ref.accuracy
    assert again.seconds["a"] == res.seconds["a"]

    # a state file of another evaluation is refused, never mixed in
    for kwargs in ({"eps": 0.5}, {"eps": 1.0, "seed": 1}, {"eps": 1.0, "n": 30}):
        with pytest.raises(SuiteStateError, match="another evaluation"):
            run_suite(model, (x, y), [("a", a3), ("b", b3)], batch_size=5, state_path=state, **kwargs)
    other = tiny()
    with torch.no_grad():
        other[1].weight.add_(0.01)
    with pytest.raises(SuiteStateError, match="model"):
        run_suite(other, (x, y), [("a", a3), ("b", b3)], eps=1.0, state_path=state)
    state.write_text("{not json")
    with pytest.raises(SuiteStateError):
        run_suite(model, (x, y), [("a", a3)], eps=1.0, state_path=state)


def test_a_suite_resumes_with_another_batch_size(setup, tmp_path):
    """The batch size only decides how often the state is saved (the study scripts' ``--suite-batch``):
    a suite stopped in batches of 5 and resumed in batches of 3 attacks each point once, as one run does."""
    model, x, y = setup
    ok = evaluate(model, (x, y), attacks=("clean",)).correct["clean"].nonzero().flatten().tolist()
    state = tmp_path / "state.json"
    ref, b = _reference_and_interrupted(model, x, y, ok, state)
    a2, b2 = ByIndex(model, y, ok[:10]), ByIndex(model, y, ok[12:20])
    res = run_suite(model, (x, y), [("a", a2), ("b", b2)], eps=1.0, batch_size=3, state_path=state)
    assert res.resumed and a2.calls == 0
    assert sorted(b2.seen + b.seen) == ok[10:] and not set(b2.seen) & set(b.seen)
    assert b2.calls == -(-(len(ok) - 10 - 10) // 3)  # the rest in batches of 3
    assert res.accuracy == ref.accuracy and torch.equal(res.correct["robust"], ref.correct["robust"])


def test_budget_violations_are_refused(setup):
    model, x, y = setup
    with pytest.raises(RuntimeError, match="outside"):
        run_suite(model, (x, y), [("cheat", lambda m, xb, yb: (xb + 0.5).clamp(0, 1))], eps=0.1)
    with pytest.raises(RuntimeError, match="outside"):
        run_suite(model, (x, y), [("cheat", lambda m, xb, yb: torch.where(xb < 0.05, xb - 0.01, xb))], eps=0.1)


def test_named_suites_and_stage_building(monkeypatch):
    # AutoAttack's set_version('standard') (autoattack/autoattack.py), in its order
    assert [(s.name, s.attack, dict(s.options)) for s in SUITES["standard"]] == [
        ("apgd_ce", "apgd_ce", {"iterations": 100}),
        ("apgd_t", "apgd_t", {"iterations": 100, "targets": 9}),
        ("fab_t", "fab_t", {"iterations": 100, "restarts": 1, "targets": 9}),
        ("square", "square", {"queries": 5000, "rescale_schedule": False}),
    ]
    built = {s.name: build_attack(s, 0.1, "l2", seed=0) for s in SUITES["standard"]}
    assert (built["apgd_ce"].steps, built["apgd_ce"].restarts) == (100, 1)
    assert (built["apgd_t"].steps, built["apgd_t"].restarts, built["apgd_t"].n_target_classes) == (100, 1, 9)
    assert (built["fab_t"].steps, built["fab_t"].restarts, built["fab_t"].n_target_classes) == (100, 1, 9)
    assert (built["fab_t"].alpha_max, built["fab_t"].eta, built["fab_t"].beta) == (0.1, 1.05, 0.9)
    assert (built["square"].n_queries, built["square"].restarts, built["square"].p_init) == (5000, 1, 0.8)
    assert not built["square"].rescale_schedule and all(a.norm == "l2" for a in built.values())
    assert [s.name for s in SUITES["fast"]] == ["apgd_ce", "apgd_t"]
    assert [(s.name, dict(s.options)) for s in SUITES["rand"]] == [("apgd_ce", {"iterations": 100}),
                                                                    ("apgd_dlr", {"iterations": 100})]
    with pytest.raises(ValueError, match="unknown suite"):
        run_suite(tiny(), (torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)), "zzz", eps=0.1)
    with pytest.raises(ValueError, match="not registered"):
        build_attack(Stage("x", "no_such_attack"), 0.1)
    with pytest.raises(TypeError, match="bogus"):
        build_attack(Stage("p", "pgd", {"bogus": 1}), 0.1)
    with pytest.raises(TypeError, match="none of"):
        build_attack(Stage("f", "fgsm", {"iterations": 3}), 0.1)
    bn = nn.BatchNorm2d(3)  # 0-dim buffers (num_batches_tracked) hash too, and every value counts
    before = model_digest(bn)
    bn.running_mean[1] = 0.5
    assert model_digest(bn) != before
    atk = build_attack(Stage("p", "pgd", {"iterations": 7, "restarts": 2}), 0.1, "l2", seed=3)
    assert (atk.steps, atk.restarts, atk.norm, atk.seed) == (7, 2, "l2", 3)


class StandIn(PGD):
    """A 3-step PGD registered under a suite attack's name; records its constructor options."""

    made: list = []

    def __init__(self, eps, steps=100, n_target_classes=9, n_queries=None, restarts=1, rescale_schedule=None, **kw):
        StandIn.made.append((steps, n_target_classes, n_queries, restarts, rescale_schedule))
        super().__init__(eps, steps=3, **kw)


def _stand_ins(monkeypatch, names=("apgd_ce", "apgd_t", "fab_t", "square"), cls=None):
    from aal.attacks import ATTACKS as REG

    StandIn.made = []
    for name in names:
        monkeypatch.setitem(REG._entries, name, type(REG._entries["pgd"])(name, cls or StandIn, ""))


def test_standard_suite_is_autoattack_and_uses_registry(monkeypatch, setup):
    """The named suite with stand-ins registered under the APGD/FAB/Square names (so this test
    does not depend on their implementations): names, options and the label are wired through."""
    _stand_ins(monkeypatch)
    model, x, y = setup
    res = run_suite(model, (x, y), "standard", eps=0.2)
    assert list(res.accuracy) == ["clean", "apgd_ce", "apgd_t", "fab_t", "square", "robust"]
    # (steps, targets, queries, restarts, rescale): every stage as AutoAttack's standard version
    assert StandIn.made == [(100, 9, None, 1, None), (100, 9, None, 1, None), (100, 9, None, 1, None), (100, 9, 5000, 1, False)]
    assert res.label == "AutoAttack (standard)" and res.to_dict()["label"] == "AutoAttack (standard)"
    assert "AutoAttack (standard)" in res.table() and not any("FAB" in note for note in res.notes)
    assert res.accuracy["robust"] <= res.accuracy["fab_t"] <= res.accuracy["apgd_t"] <= res.accuracy["apgd_ce"] <= res.accuracy["clean"]
    # any change of a stage's settings: no longer AutoAttack's standard suite, and it says what changed
    changed = run_suite(model, (x, y), "standard", eps=0.2, options={"apgd_t": {"targets": 3}})
    assert StandIn.made[-3] == (100, 3, None, 1, None)
    assert "AutoAttack (standard)" not in changed.table() and "apgd_t targets=3" in changed.label
    same = run_suite(model, (x, y), "standard", eps=0.2, options={"fab_t": {"targets": 9}})  # repeats a value
    assert same.label == "AutoAttack (standard)"
    assert run_suite(model, (x, y), "fast", eps=0.2).label == "suite fast"
    with pytest.raises(ValueError, match="unknown stages"):
        run_suite(model, (x, y), "fast", eps=0.2, options={"square": {"queries": 10}})


class Recording(PGD):
    """A deterministic 2-step PGD that records (its registered name, points attacked) per call."""

    stage = ""
    calls: list = []

    def __init__(self, eps, steps=100, n_target_classes=9, n_queries=None, restarts=1, rescale_schedule=None, **kw):
        super().__init__(eps, steps=2, step_size=eps / 2, rand_init=False, **kw)

    def __call__(self, model, xb, yb, mask=None):
        Recording.calls.append((self.stage, len(xb)))
        return super().__call__(model, xb, yb, mask)


def test_old_standard_state_resumes_from_fab_t(monkeypatch, setup, tmp_path):
    """A state file of the standard suite before FAB-T (APGD-CE -> APGD-T -> Square, finished)
    keeps its clean pass and APGD stages and re-runs FAB-T and Square on the points APGD-T left,
    giving exactly the numbers of a fresh run; a state of another evaluation is still refused."""
    from aal.attacks import ATTACKS as REG
    from aal.eval import suite as suite_mod

    model, x, y = setup
    entry = type(REG._entries["pgd"])
    for name in ("apgd_ce", "apgd_t", "fab_t", "square"):
        monkeypatch.setitem(REG._entries, name, entry(name, type(name, (Recording,), {"stage": name}), ""))
    old_def = (*SUITES["standard"][:2], Stage("square", "square", {"queries": 5000}))  # the definition before FAB-T
    monkeypatch.setitem(suite_mod.SUITES, "standard", old_def)
    state, eps = tmp_path / "state.json", 0.15
    Recording.calls = []
    old = run_suite(model, (x, y), "standard", eps=eps, state_path=state, batch_size=16)
    assert [c[0] for c in Recording.calls][:3] == ["apgd_ce", "apgd_ce", "apgd_t"]
    monkeypatch.undo()  # back to the current suite definition; re-register the stand-ins
    for name in ("apgd_ce", "apgd_t", "fab_t", "square"):
        monkeypatch.setitem(REG._entries, name, entry(name, type(name, (Recording,), {"stage": name}), ""))

    Recording.calls = []
    res = run_suite(model, (x, y), "standard", eps=eps, state_path=state, batch_size=16)
    assert {c[0] for c in Recording.calls} <= {"fab_t", "square"} and Recording.calls[0][0] == "fab_t"
    assert sum(n for stage, n in Recording.calls if stage == "fab_t") == round(old.accuracy["apgd_t"] * len(y))
    assert any("older definition" in note and "running fab_t, square" in note for note in res.notes)
    assert list(res.accuracy) == ["clean", "apgd_ce", "apgd_t", "fab_t", "square", "robust"]
    assert res.accuracy["apgd_t"] == old.accuracy["apgd_t"] and res.seconds["apgd_ce"] == old.seconds["apgd_ce"]
    fresh = run_suite(model, (x, y), "standard", eps=eps, batch_size=16)
    assert fresh.accuracy == res.accuracy and torch.equal(fresh.pred, res.pred)
    assert res.label == "AutoAttack (standard)"
    # the upgraded file now resumes as a finished evaluation of the new definition
    Recording.calls = []
    again = run_suite(model, (x, y), "standard", eps=eps, state_path=state, batch_size=16)
    assert not Recording.calls and again.accuracy == res.accuracy
    with pytest.raises(SuiteStateError, match="another evaluation"):
        run_suite(model, (x, y), "standard", eps=0.3, state_path=state)


# ----------------------------------------------------------------------------- randomised models
def test_randomness_detection_and_eot_wrapper():
    net = tiny()
    x = torch.rand(8, 3, 4, 4)
    assert not is_randomized(net, x)
    info = randomness(Noisy(net), x)
    assert info["randomized"] and info["max_output_diff"] > 1e-4
    # EOT's forward is the mean of per-draw logits, its gradient the mean of per-draw gradients
    noisy = Noisy(net, sigma=0.3)
    eot = EOTWrapper(noisy, n=4)
    xr = x.clone().requires_grad_(True)
    torch.manual_seed(5)
    out = eot(xr)
    (g,) = torch.autograd.grad(out[:, 0].sum(), xr)
    torch.manual_seed(5)
    outs, grads = [], []
    for _ in range(4):
        xi = x.clone().requires_grad_(True)
        o = noisy(xi)
        outs.append(o.detach())
        grads.append(torch.autograd.grad(o[:, 0].sum(), xi)[0])
    assert torch.allclose(out.detach(), torch.stack(outs).mean(0), atol=1e-6)
    assert torch.allclose(g, torch.stack(grads).mean(0), atol=1e-6)
    with pytest.raises(ValueError):
        EOTWrapper(net, n=0)
    assert EOTWrapper(noisy, n=5, chunk=2)(x).shape == (8, 5)


@pytest.fixture(scope="module")
def trained(fmnist_small_cnn):
    """(model, test data): the shared small CNN (conftest), first 100 test images."""
    model, test = fmnist_small_cnn
    return model, (test.images[:100], test.labels[:100])


def test_eot_is_used_automatically_and_is_stronger(trained):
    model, data = trained
    noisy = Noisy(model, sigma=0.1)
    stage = [("pgd5", PGD(0.05, steps=5, seed=0))]
    plain = run_suite(noisy, data, stage, eps=0.05, eot=False, seed=0)
    auto = run_suite(noisy, data, stage, eps=0.05, eot_n=8, seed=0)
    assert plain.randomized and plain.eot_n is None and any("EOT switched off" in m for m in plain.notes)
    assert auto.randomized and auto.eot_n == 8 and "EOT over 8 draws" in auto.table()
    assert auto.to_dict()["eot_n"] == 8
    assert auto.accuracy["clean"] == plain.accuracy["clean"]  # same seed: the same clean draws
    assert auto.robust < plain.robust, (auto.robust, plain.robust)
    # repeatable: the model's draws come from the seeded, forked RNG
    before = torch.random.get_rng_state()
    again = run_suite(noisy, data, stage, eps=0.05, eot_n=8, seed=0)
    assert again.accuracy == auto.accuracy
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    det = run_suite(model, data, stage, eps=0.05)
    assert not det.randomized and det.eot_n is None


def test_rand_suite_runs_apgd_ce_then_dlr_with_eot(trained):
    """AutoAttack's version='rand': APGD-CE -> APGD-DLR, EOT switched on by itself for a
    randomised model, no stronger than the clean accuracy and each stage cumulative."""
    model, data = trained
    noisy = Noisy(model, sigma=0.1)
    res = run_suite(noisy, data, "rand", eps=0.05, eot_n=4, seed=0,
                    options={"apgd_ce": {"iterations": 10}, "apgd_dlr": {"iterations": 10}})
    assert list(res.accuracy) == ["clean", "apgd_ce", "apgd_dlr", "robust"]
    assert res.randomized and res.eot_n == 4 and any("version='rand'" in m for m in res.notes)
    assert res.accuracy["clean"] >= res.accuracy["apgd_ce"] >= res.accuracy["apgd_dlr"] == res.robust
    assert res.accuracy["apgd_ce"] < res.accuracy["clean"]  # the attack does something at this eps


def test_suite_at_least_as_strong_as_pgd_with_restarts(trained):
    if "apgd_ce" not in ATTACKS or "apgd_t" not in ATTACKS:
        pytest.skip("apgd_ce / apgd_t not registered yet")
    model, data = trained
    eps = 0.03  # mid-range for this model: both attacks have points to fight over
    pgd = evaluate(model, data, attacks=["pgd20x3"], eps=eps, seed=0)
    res = run_suite(model, data, "fast", eps=eps, options={"apgd_ce": {"iterations": 50}, "apgd_t": {"iterations": 25, "targets": 3}})
    assert 0.2 < pgd.accuracy["robust"] < pgd.accuracy["clean"]
    assert res.accuracy["clean"] == pgd.accuracy["clean"]
    assert res.robust <= pgd.accuracy["robust"], (res.robust, pgd.accuracy["robust"])
