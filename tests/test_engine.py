"""Engine: LR schedules, optimizers, safetensors+JSON checkpoints, the trainer, resume."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import aal
from aal.attacks import FGSMRS
from aal.engine import (
    Trainer,
    build_optimizer,
    build_scheduler,
    checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    save_model_weights,
)
from aal.methods.base import Method, Output
from aal.utils import get_rng_state, seed_everything, set_rng_state, tune_malloc


# ----------------------------------------------------------------------------- helpers
pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    """Stands in for a SIGKILL in the middle of an epoch."""


class Loader:
    """Minimal stand-in for aal.data.BatchLoader: order depends only on (seed, epoch)."""

    def __init__(self, x, y, batch_size=64, seed=0, kill_at=None):
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0
        self.kill_at = kill_at  # (epoch, batch index) at which to "die"

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(1000 * self.seed + self.epoch)
        perm = torch.randperm(len(self.x), generator=g)
        for i, idx in enumerate(perm.split(self.batch_size)):
            if self.kill_at == (self.epoch, i):
                raise Killed
            yield self.x[idx], self.y[idx]


class NoisyAT(Method):
    """Test method: CE on FGSM-RS examples (random start draws from the global torch RNG), with state."""

    name = "noisy_at"

    def __init__(self):
        self.attack = FGSMRS(eps=0.1)
        self.calls = torch.zeros((), dtype=torch.int64)

    def __call__(self, model, batch):
        x, y = batch
        logits = model(self.attack(model, x, y))
        loss = F.cross_entropy(logits, y)
        self.calls += 1
        return Output(loss, logits, {"loss_adv": float(loss.detach())})

    def state_dict(self):
        return {"calls": self.calls.clone()}

    def load_state_dict(self, state):
        self.calls = state["calls"].clone()


def toy_data(n=128):
    g = torch.Generator().manual_seed(123)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = (x[:, 0, :14].mean((1, 2)) > x[:, 0, 14:].mean((1, 2))).long()  # learnable labels
    return x, y


def make_run(run_dir, epochs=3, kill_at=None, evaluate_fn=None, init_seed=0, **kw):
    torch.manual_seed(init_seed)
    model = aal.create_model("small_cnn", num_classes=2)
    opt = build_optimizer(model, "sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = toy_data()
    loader = Loader(x, y, batch_size=32, seed=0, kill_at=kill_at)
    sched = build_scheduler(opt, "cosine", epochs=epochs, steps_per_epoch=len(loader), warmup_epochs=1)
    method = NoisyAT()
    trainer = Trainer(model, method, loader, opt, sched, epochs=epochs, run_dir=run_dir, evaluate_fn=evaluate_fn,
                      progress=False, seed=0, config={"name": "toy"}, **kw)
    return trainer


def lrs(sched, opt, steps):
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def sgd(lr=1.0):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


# ----------------------------------------------------------------------------- schedules
def test_cosine_start_half_end_and_no_restart():
    opt = sgd(0.1)
    s = build_scheduler(opt, "cosine", epochs=4, steps_per_epoch=25)
    v = lrs(s, opt, 120)
    assert v[0] == pytest.approx(0.1)
    assert v[50] == pytest.approx(0.05)
    assert v[25] == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert all(a >= b for a, b in zip(v[:100], v[1:100]))  # monotone within the run
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # at and after the end: 0
    assert v[100:] == pytest.approx([0.0] * 20, abs=1e-12)


def test_multistep_drops_at_milestone_epochs():
    opt = sgd(0.1)
    s = build_scheduler(opt, "multistep", epochs=6, steps_per_epoch=10, milestones=(2, 4), gamma=0.1)
    v = lrs(s, opt, 60)
    assert v[0] == v[19] == pytest.approx(0.1)
    assert v[20] == v[39] == pytest.approx(0.01)
    assert v[40] == v[59] == pytest.approx(0.001)


def test_warmup_then_cosine_and_linear():
    opt = sgd(1.0)
    s = build_scheduler(opt, "cosine", epochs=5, steps_per_epoch=10, warmup_epochs=1)
    v = lrs(s, opt, 50)
    assert v[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert v[10] == pytest.approx(1.0)
    assert v[30] == pytest.approx(0.5)  # half-way through the 40 post-warm-up steps
    opt = sgd(1.0)
    v = lrs(build_scheduler(opt, "linear", epochs=2, steps_per_epoch=10, warmup_epochs=1), opt, 20)
    assert v[9] == pytest.approx(1.0) and v[15] == pytest.approx(0.5)
    opt = sgd(0.3)
    assert lrs(build_scheduler(opt, "constant", epochs=2, steps_per_epoch=3), opt, 6) == pytest.approx([0.3] * 6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "cosin"},
        {"name": "multistep"},  # no milestones
        {"name": "multistep", "milestones": (9,)},  # beyond the run
        {"name": "cosine", "milestones": (1,)},  # milestones would be silently ignored
        {"name": "cosine", "warmup_epochs": 5},
        {"name": "cosine", "steps_per_epoch": 0},
    ],
)
def test_scheduler_rejects_bad_arguments(kwargs):
    kw = {"epochs": 3, "steps_per_epoch": 2, **kwargs}
    with pytest.raises(ValueError):
        build_scheduler(sgd(), **kw)


def test_build_optimizer_variants_and_no_decay_groups():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 2))
    opt = build_optimizer(model, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and len(opt.param_groups) == 1
    opt = build_optimizer(model, "sgd", weight_decay=5e-4, wd_exclude_norm_bias=True)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # conv bias, bn w/b, fc bias
    assert isinstance(build_optimizer(model, "adam", lr=1e-3), torch.optim.Adam)
    assert isinstance(build_optimizer(model, "AdamW", lr=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "lion")


# ----------------------------------------------------------------------------- checkpoints
def _trained_objects(opt_name="sgd"):
    torch.manual_seed(0)
    model = aal.create_model("small_cnn", num_classes=2)
    opt = build_optimizer(model, opt_name, lr=0.01)
    sched = build_scheduler(opt, "multistep", epochs=2, steps_per_epoch=2, milestones=(1,))
    method = NoisyAT()
    x, y = toy_data(16)
    for _ in range(3):
        out = method(model, (x, y))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched, method


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path, opt_name):
    model, opt, sched, method = _trained_objects(opt_name)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    rng = get_rng_state()
    ref_opt = opt.state_dict()
    path = save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, scheduler=sched, method=method, epoch=2,
                           extra={"config": {"eps": 0.1, "milestones": (1,)}, "t": torch.arange(3)})

    files = sorted(p.name for p in path.iterdir())
    assert all(f.endswith(".safetensors") or f == "state.json" for f in files), files
    assert {"model.safetensors", "optimizer.safetensors", "method.safetensors", "state.json"} <= set(files)
    json.loads((path / "state.json").read_text())  # plain JSON
    for f in files:
        if f.endswith(".safetensors"):
            load_file(path / f)  # plain safetensors, readable by any tool

    # scramble everything, then restore
    model2, opt2, sched2, method2 = _trained_objects(opt_name)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    method2.calls.fill_(-1)
    random.random(), np.random.rand(), torch.rand(3)
    meta = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, method=method2)

    assert meta["epoch"] == 2 and meta["extra"]["config"] == {"eps": 0.1, "milestones": (1,)}
    assert torch.equal(meta["extra"]["t"], torch.arange(3))
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    got = opt2.state_dict()
    assert got["param_groups"] == ref_opt["param_groups"]  # types too (Adam's betas tuple)
    for i, st in ref_opt["state"].items():
        for k, v in st.items():
            assert torch.equal(got["state"][i][k], v) if isinstance(v, torch.Tensor) else got["state"][i][k] == v
    assert sched2.state_dict() == sched.state_dict()
    assert int(method2.calls) == int(method.calls) == 3
    assert random.random() == (set_rng_state(rng), random.random())[1]
    set_rng_state(rng)
    a = (np.random.rand(), torch.rand(2))
    load_checkpoint(path, model=model2)
    assert np.random.rand() == a[0] and torch.equal(torch.rand(2), a[1])


def test_channels_last_and_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = aal.create_model("small_cnn", channels_last=True)
    save_checkpoint(tmp_path / "cl", model=model, epoch=0, rng=False)
    other = aal.create_model("small_cnn", channels_last=True)
    load_model_weights(tmp_path / "cl", other)
    assert other.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(other.stem.weight, model.stem.weight)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

    tied = Tied()
    save_model_weights(tmp_path / "tied.safetensors", tied)
    save_checkpoint(tmp_path / "tied", model=tied, epoch=0, rng=False)
    for src in (tmp_path / "tied.safetensors", tmp_path / "tied"):
        fresh = Tied()
        load_model_weights(src, fresh)
        assert torch.equal(fresh.a.weight, tied.a.weight) and fresh.b.weight is fresh.a.weight


def test_unstorable_state_is_refused_and_leaves_nothing(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="no pickling"):
        save_checkpoint(tmp_path / "ck", model=model, epoch=0, extra={"fn": object()})
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched, method = _trained_objects()
    path = tmp_path / "last"
    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, method=method, epoch=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0)

    def crash(*_a, **_k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "_write_json", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, method=method, epoch=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no half-written temp dir left
    meta = load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, method=method)
    assert meta["epoch"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # a crash between "move old aside" and "move new in" leaves only .last.old: still loadable
    os.replace(path, tmp_path / ".last.old")
    assert load_checkpoint(tmp_path / "last", model=model, restore_rng=False)["epoch"] == 1
    save_checkpoint(path, model=model, epoch=3)  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert load_checkpoint(path, model=model)["epoch"] == 3


def test_missing_parts_raise(tmp_path):
    model = nn.Linear(2, 2)
    save_checkpoint(tmp_path / "ck", model=model, epoch=0, rng=False)
    with pytest.raises(ValueError, match="no optimizer"):
        load_checkpoint(tmp_path / "ck", model=model, optimizer=sgd(), restore_rng=False)
    with pytest.raises(ValueError, match="RNG"):
        load_checkpoint(tmp_path / "ck", model=model)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing", model=model)


# ----------------------------------------------------------------------------- trainer
RECORD_KEYS = {"epoch", "step", "lr", "train_loss", "train_acc", "grad_norm", "logs", "eval", "epoch_time",
               "eval_time", "images", "img_per_s"}


def test_kill_and_resume_gives_identical_weights(tmp_path):
    straight = make_run(tmp_path / "a")
    rec_a = straight.fit()

    killed = make_run(tmp_path / "b", kill_at=(2, 2))  # dies in the middle of the 3rd epoch
    with pytest.raises(Killed):
        killed.fit()
    assert json.loads((tmp_path / "b/checkpoints/last/state.json").read_text())["epoch"] == 2

    fresh = make_run(None, init_seed=99)  # new process: different init, nothing shared
    rec_b = fresh.resume(tmp_path / "b")
    assert fresh.run_dir == tmp_path / "b" and [r["epoch"] for r in rec_b] == [3]
    for (k, a), b in zip(straight.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert rec_b[0]["train_loss"] == rec_a[2]["train_loss"]
    assert int(fresh.method.calls) == int(straight.method.calls) == 12

    lines = [json.loads(s) for s in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert set(lines[0]) == RECORD_KEYS and lines[0]["logs"].keys() == {"loss_adv"}
    assert lines[2]["step"] == 12 and lines[2]["images"] == 128 and lines[2]["img_per_s"] > 0
    assert 0.0 <= lines[2]["train_acc"] <= 1.0 and lines[2]["lr"] < lines[0]["lr"]


def test_evaluation_never_changes_training_and_resume_truncates_metrics(tmp_path):
    def noisy_eval(model):
        torch.rand(100), random.random()  # consumes the RNGs training uses
        return {"val_acc": torch.tensor(0.5)}

    with_eval = make_run(tmp_path / "a", epochs=2, evaluate_fn=noisy_eval)
    recs = with_eval.fit()
    plain = make_run(None, epochs=2)
    plain.fit()
    assert all(torch.equal(a, b) for a, b in zip(with_eval.model.parameters(), plain.model.parameters()))
    assert recs[0]["eval"] == {"val_acc": 0.5} and recs[0]["eval_time"] >= 0

    # lines of epochs after the checkpoint are dropped on resume (they are re-run)
    metrics = tmp_path / "a/metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"epoch": 3}) + "\n" + '{"epoch": 4, "trunc')
    again = make_run(tmp_path / "a", epochs=2)
    assert again.resume(tmp_path / "a/checkpoints/last") == []  # nothing left to run
    assert [json.loads(s)["epoch"] for s in metrics.read_text().splitlines()] == [1, 2]


def test_checkpoint_every_grad_clip_log_fn_and_nan(tmp_path):
    lines = []
    t = make_run(tmp_path / "r", epochs=3, checkpoint_every=2, grad_clip=1.0, log_fn=lines.append)
    calls = []
    real_save = t.save_checkpoint
    t.save_checkpoint = lambda epoch, rec=None: (calls.append(epoch), real_save(epoch, rec))[1]
    recs = t.fit()
    assert calls == [2, 3]  # every 2nd epoch and at the end
    assert all(r["grad_norm"] > 0 for r in recs)
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3") and "img/s" in lines[0]

    bad = make_run(tmp_path / "r", epochs=4)
    bad.load(tmp_path / "r")
    bad.method = lambda model, batch: Output(model(batch[0]).sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="nan"):
        bad.fit()
    assert json.loads((tmp_path / "r/checkpoints/last/state.json").read_text())["epoch"] == 3


def test_trainer_under_single_process_distributed(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        recs = make_run(tmp_path / "d", epochs=1).fit()
        assert recs[0]["images"] == 128 and (tmp_path / "d/checkpoints/last/state.json").is_file()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- runtime
def test_seed_everything_and_rng_snapshot():
    seed_everything(11)
    a = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(11)
    snap = get_rng_state()
    assert (random.random(), np.random.rand()) == a[:2] and torch.equal(torch.rand(3), a[2])
    set_rng_state(snap)
    assert random.random() == a[0]


def test_tune_malloc_switches(monkeypatch):
    monkeypatch.setenv("AAL_NO_MALLOC_TUNE", "1")
    assert tune_malloc() is False
    monkeypatch.delenv("AAL_NO_MALLOC_TUNE")
    assert tune_malloc(enable=False) is False
    applied = tune_malloc()
    import platform

    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
