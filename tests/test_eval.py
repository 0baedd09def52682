"""Evaluator: clean / per-attack / worst-case accuracy, AutoAttack-style attack pool, bookkeeping."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from aal.attacks import FGSM
from aal.eval import EvalResult, accuracy, evaluate


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model():
    torch.manual_seed(0)
    # dropout + batchnorm: predictions differ between train and eval mode
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(32, 4))


@pytest.fixture
def setup():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[:16] = (y[:16] + 1) % 4  # exactly 48 of 64 correct
    model.train()
    return model, x, y


class Spy:
    """An attack that records what it is asked to attack and perturbs nothing, or everything."""

    def __init__(self, name, flip=False):
        self.name, self.flip, self.seen = name, flip, []

    def __call__(self, model, x, y):
        self.seen.append((x.clone(), y.clone()))
        # flip: move every point far away so that (almost) all get misclassified
        return (1 - x) if self.flip else x.clone()


def test_clean_accuracy_matches_manual(setup):
    model, x, y = setup
    res = evaluate(model, (x, y), attacks=("clean",), batch_size=10)
    assert res.accuracy == {"clean": 0.75} and res.n == 64
    assert accuracy(model, x, y, batch_size=7) == 0.75


def test_robust_below_clean_and_worst_case_below_each(setup):
    model, x, y = setup
    res = evaluate(model, (x, y), attacks=("clean", "fgsm", "pgd10"), eps=0.3, batch_size=16)
    acc = res.accuracy
    assert list(acc) == ["clean", "fgsm", "pgd10", "robust"]
    assert acc["fgsm"] <= acc["clean"] and acc["pgd10"] <= acc["clean"]
    assert acc["robust"] <= min(acc["fgsm"], acc["pgd10"])
    assert acc["pgd10"] < acc["clean"]  # eps=0.3 does break a random linear model
    c = res.correct
    assert torch.equal(c["robust"], c["clean"] & c["fgsm"] & c["pgd10"])
    assert set(res.seconds) == {"clean", "fgsm", "pgd10"}


def test_attacks_only_clean_correct_points(setup):
    model, x, y = setup
    a, b = Spy("a", flip=True), Spy("b")
    res = evaluate(model, (x, y), attacks=[a, b], batch_size=20)
    correct = res.correct["clean"]
    for spy in (a, b):
        xs = torch.cat([s[0] for s in spy.seen])
        assert len(xs) == int(correct.sum()) == 48  # wrong points are never attacked
        assert torch.equal(xs, x[correct])
    assert res.accuracy["b"] == 0.75  # identity attack changes nothing

    # cumulative: b only sees what survived a
    a, b = Spy("a", flip=True), Spy("b")
    res = evaluate(model, (x, y), attacks=[a, b], batch_size=20, cumulative=True)
    n_b = sum(len(s[0]) for s in b.seen)
    assert n_b == int(res.correct["a"].sum()) < 48
    assert res.accuracy["b"] == res.accuracy["robust"] == res.accuracy["a"]


def test_n_subset_split_input_and_determinism(setup):
    model, x, y = setup

    @dataclass
    class Split:
        images: torch.Tensor
        labels: torch.Tensor

    xq = (x * 255).round().to(torch.uint8)
    r1 = evaluate(model, Split(xq, y), attacks=("pgd5",), eps=0.1, n=20, seed=3)
    r2 = evaluate(model, (xq[:20].float() / 255, y[:20]), attacks=("pgd5",), eps=0.1, seed=3)
    r3 = evaluate(model, Split(xq, y), attacks=("pgd5",), eps=0.1, n=20, seed=3)
    assert r1.n == 20 and r1.accuracy == r2.accuracy == r3.accuracy
    assert torch.equal(r1.correct["pgd5"], r3.correct["pgd5"])
    # deterministic attacks do not depend on batching
    f1 = evaluate(model, (x, y), attacks=(FGSM(0.2),), batch_size=5)
    f2 = evaluate(model, (x, y), attacks=(FGSM(0.2),), batch_size=64)
    assert torch.equal(f1.correct["fgsm"], f2.correct["fgsm"])


def test_eval_mode_used_and_restored(setup):
    model, x, y = setup
    model[2].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    seen_modes = []
    hook = model[4].register_forward_pre_hook(lambda m, _: seen_modes.append(m.training))
    evaluate(model, (x, y), attacks=("clean", "fgsm"))
    hook.remove()
    assert seen_modes and not any(seen_modes)
    assert [m.training for m in model.modules()] == before


def test_to_dict_table_and_errors(setup):
    model, x, y = setup
    res = evaluate(model, (x, y), attacks=("clean", "fgsm", ("pgd_strong", FGSM(0.3))), eps=0.1)
    assert isinstance(res, EvalResult)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["n"] == 64 and d["eps"] == pytest.approx(0.1)
    assert set(d["accuracy"]) == {"clean", "fgsm", "pgd_strong", "robust"}
    table = res.table()
    for name in ("clean", "fgsm", "pgd_strong", "robust", "accuracy %", "time s"):
        assert name in table
    assert f"{100 * res.accuracy['fgsm']:.2f}" in table
    with pytest.raises(ValueError, match="repeated"):
        evaluate(model, (x, y), attacks=("fgsm", FGSM(0.1)))
    with pytest.raises(ValueError):
        evaluate(model, (x, y), attacks=("pgdx",))
    with pytest.raises(TypeError):
        evaluate(model, x, attacks=("clean",))
