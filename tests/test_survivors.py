"""``aal.eval.survivors``: the one "attack the survivors" loop of the evaluator and the suites."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from aal.eval.survivors import attack_survivors, clean_pass, fetcher

N = 30


class Linear(nn.Module):
    """Predicts class 1 iff the first pixel is > 0.5 (else 0): attacks can flip chosen points."""

    def forward(self, x):
        v = x.flatten(1)[:, 0]
        return torch.stack([0.5 - v, v - 0.5], 1)


class Spy:
    """Records the batch sizes and point ids it is given; flips the points whose id is in ``breaks``."""

    def __init__(self, breaks=(), fail_after=None):
        self.breaks, self.sizes, self.ids, self.fail_after = set(breaks), [], [], fail_after

    def __call__(self, model, x, y):
        if self.fail_after is not None and len(self.sizes) >= self.fail_after:
            raise RuntimeError("planted interruption")
        ids = (x.flatten(1)[:, 1] * 1000).round().long().tolist()
        self.sizes.append(len(x))
        self.ids.extend(ids)
        out = x.clone()
        for j, i in enumerate(ids):
            if i in self.breaks:
                out[j, 0, 0, 0] = 1.0 - out[j, 0, 0, 0]  # the other side of 0.5: misclassified
        return out


@pytest.fixture
def data():
    x = torch.zeros(N, 1, 1, 2)
    x[:, 0, 0, 0] = torch.where(torch.arange(N) % 2 == 0, 0.2, 0.8)  # class 0 / 1 alternately
    x[:, 0, 0, 1] = torch.arange(N) / 1000  # pixel 1 tags the point
    y = (torch.arange(N) % 2).long()
    y[:6] = 1 - y[:6]  # points 0..5 are wrong: 24 clean-correct points
    return x, y


def run(data, stages, cumulative=True, state=None, on_update=None, batch_size=4):
    x, y = data
    model, fetch = Linear(), fetcher(x, y, False, torch.device("cpu"))
    state = state or clean_pass(model, fetch, y, torch.arange(N), batch_size)
    return attack_survivors(model, fetch, stages, state, batch_size, cumulative=cumulative, on_update=on_update)


def test_only_survivors_are_attacked_in_batches(data):
    a, b = Spy(breaks=range(6, 16)), Spy(breaks=range(12, 20))
    st = run(data, [("a", a), ("b", b)])
    assert st.clean.sum() == 24 and sorted(a.ids) == list(range(6, N))  # wrong points are never attacked
    assert a.sizes == [4] * 6  # 24 survivors, batches of 4
    assert sorted(b.ids) == list(range(16, N)) and b.sizes == [4, 4, 4, 2]  # only a's survivors
    assert (st.stages["a"].attacked, st.stages["b"].attacked) == (24, 14)
    assert st.stages["a"].robust.sum() == 14 and st.stages["b"].robust.sum() == 10
    assert torch.equal(st.robust, st.stages["b"].robust)
    _, y = data
    broken = torch.arange(6, 20)
    assert bool((st.pred[broken] != y[broken]).all()) and torch.equal(st.pred[st.robust], y[st.robust])


def test_a_stage_with_no_survivors_calls_no_attack(data):
    """Once every point is broken the later stages attack nothing (not one empty batch), and still
    record themselves and report the state."""
    a, b = Spy(breaks=range(N)), Spy()
    seen = []
    st = run(data, [("a", a), ("b", b)], on_update=lambda s: seen.append(set(s.stages)))
    assert st.robust.sum() == 0 and b.sizes == [] and st.stages["b"].attacked == 0
    assert seen[-1] == {"a", "b"}


def test_non_cumulative_attacks_every_clean_point(data):
    a, b = Spy(breaks=range(6, 16)), Spy(breaks=range(12, 20))
    st = run(data, [("a", a), ("b", b)], cumulative=False)
    assert sorted(a.ids) == sorted(b.ids) == list(range(6, N))
    assert st.stages["a"].robust.sum() == 14 and st.stages["b"].robust.sum() == 16  # each on its own
    assert torch.equal(st.robust, st.stages["a"].robust & st.stages["b"].robust)  # the worst case


def test_interrupted_stage_resumes_where_it_stopped(data):
    snapshots = []  # what a caller writes out after every batch and stage

    with pytest.raises(RuntimeError, match="planted"):
        run(data, [("a", Spy(breaks=range(6, 16))), ("b", Spy(breaks=range(12, 20), fail_after=2))],
            on_update=lambda state: snapshots.append(copy.deepcopy(state)))
    ref = run(data, [("a", Spy(breaks=range(6, 16))), ("b", Spy(breaks=range(12, 20)))])
    saved = snapshots[-1]  # after b's second batch: a done, 8 of b's 14 points attacked
    assert list(saved.stages) == ["a"] and saved.current.stage == "b" and int(saved.current.todo.sum()) == 6
    a2, b2 = Spy(breaks=range(6, 16)), Spy(breaks=range(12, 20))
    out = run(data, [("a", a2), ("b", b2)], state=copy.deepcopy(saved))
    assert a2.sizes == [] and b2.sizes == [4, 2]  # nothing finished is attacked again
    assert sorted(b2.ids) == list(range(24, N))
    assert out.stages["b"].attacked == 14 and torch.equal(out.robust, ref.robust) and torch.equal(out.pred, ref.pred)
    with pytest.raises(ValueError, match="cumulative"):  # its per-stage flags were not kept
        run(data, [("a", Spy()), ("b", Spy())], state=copy.deepcopy(saved), cumulative=False)
