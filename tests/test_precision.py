"""Mixed precision (``precision: bf16``): every method trains a step under autocast, weights and
optimizer state stay fp32, evaluation defaults to fp32, the key is validated and recorded.

CPU-only checks: fp16 needs CUDA (refused on CPU); its ``GradScaler`` path through the trainer
is checked here with torch's CPU scaler, which runs the same scale / unscale / step / update calls.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import aal
from aal.attacks import PGD
from aal.config import ConfigError, load_config
from aal.engine import Trainer, build_optimizer
from aal.eval import evaluate
from aal.methods import METHODS, create_method
from aal.utils.precision import PRECISIONS, autocast_context, check_precision, make_grad_scaler

from test_fewshot import feature_model, random_episode
from test_methods import build, model_for

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSIFICATION = [n for n in METHODS.names() if getattr(METHODS.get(n), "batch_type", "classification") == "classification"]
EPISODIC = [n for n in METHODS.names() if getattr(METHODS.get(n), "batch_type", None) == "episode"]
DETECTION = [n for n in METHODS.names() if n not in CLASSIFICATION and n not in EPISODIC]
REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def fixed_batch(b: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)


class AutocastSpy:
    """Forward pre-hook on every convolution: records, per call, (training mode, autocast on);
    the attack's forwards run in eval mode, the training forwards in train mode. (On the
    convolutions, not the model: a method may call a part of it, e.g. AToP's purifier.)"""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[tuple[bool, bool]] = []
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args) -> None:
        from aal.utils.fold import analysing

        if not analysing():  # BatchNorm folding's own structure probe runs in fp32 by design
            self.calls.append((module.training, torch.is_autocast_enabled("cpu")))


def one_bf16_step(model: nn.Module, method, batch) -> tuple[Trainer, dict]:
    """One Trainer step of ``method`` on ``batch`` in bf16; checks what must hold for every method."""
    opt = build_optimizer(model, "sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, method, [batch], opt, epochs=1, progress=False, precision="bf16")
    (record,) = trainer.fit()
    assert math.isfinite(record["train_loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights left fp32"
    for state in opt.state.values():
        assert all(t.dtype == torch.float32 for t in state.values() if isinstance(t, torch.Tensor)), "optimizer state not fp32"
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved, "the step changed no weight"
    return trainer, record


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_bf16_train_step_for_every_classification_method(name):
    model, batch = model_for(name), fixed_batch()
    spy = AutocastSpy(model)
    one_bf16_step(model, build(name), batch)
    assert spy.calls and all(on for _, on in spy.calls), "a forward of the step ran outside autocast"
    if name in ("fgsm_at", "pgd_at", "trades", "mart", "awp_pgd_at"):
        assert any(not training for training, _ in spy.calls), "the attack's forwards were not seen"


@pytest.mark.parametrize("name", EPISODIC)
def test_bf16_train_step_for_fewshot_methods(name):
    torch.manual_seed(0)
    method = create_method(name, **({"eps": 0.1} if name == "protonet_aal" else {}))
    one_bf16_step(feature_model(), method, random_episode())


@pytest.mark.parametrize("name", DETECTION)
def test_bf16_train_step_for_detection_methods(name):
    torch.manual_seed(0)
    model = aal.create_model("ssd_resnet18", num_classes=3, attention="cbam", image_size=64)
    targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.45, 0.5]]), "labels": torch.tensor([k % 3]),
                "difficult": torch.tensor([False])} for k in range(2)]
    method = create_method(name, **({"eps": 8 / 255} if name == "detection_aal" else {}))
    one_bf16_step(model, method, (torch.rand(2, 3, 64, 64), targets))


@pytest.mark.parametrize("name", ["standard", "pgd_at", "trades"])
def test_bf16_loss_matches_fp32_on_a_fixed_batch(name):
    """bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2 %). Measured on this batch: the
    cross-entropy of standard and PGD-AT moves by 6e-6 relative (rounding errors average out in
    the mean), TRADES by 1.0 % (its KL term is a small difference of nearby distributions), so
    the tolerances are 1e-3 and 3e-2; a loss off by more means something ran in the wrong dtype.
    Deterministic attack (no random start); TRADES' start is seeded."""
    params = {"standard": {}, "pgd_at": {"eps": 0.1, "steps": 3, "rand_init": False},
              "trades": {"eps": 0.1, "steps": 3}}[name]
    model, batch = model_for(name), fixed_batch(32)
    model.train()
    torch.manual_seed(0)
    l32 = create_method(name, **params)(model, batch).loss.item()
    torch.manual_seed(0)
    with autocast_context("bf16", "cpu"):
        l16 = create_method(name, **params)(model, batch).loss.item()
    assert l16 == pytest.approx(l32, rel=3e-2 if name == "trades" else 1e-3)
    assert l16 != l32, "bf16 changed nothing: autocast did not apply"


def test_attacks_under_autocast_return_the_input_dtype_in_range():
    model, (x, y) = model_for("standard"), fixed_batch()
    with autocast_context("bf16", "cpu"):
        x_adv = PGD(eps=0.1, steps=3)(model, x, y)
    assert x_adv.dtype == x.dtype == torch.float32
    assert 0 <= x_adv.min() and x_adv.max() <= 1 and (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_evaluation_defaults_to_fp32_and_says_which_precision_ran():
    model, (x, y) = model_for("standard"), fixed_batch(16)
    seen: list[tuple[bool, torch.dtype]] = []

    def spy_attack(m, xb, yb):
        seen.append((torch.is_autocast_enabled("cpu"), m(xb).dtype))  # what an attack step sees
        return xb

    res = evaluate(model, (x, y), attacks=[("spy", spy_attack)])
    assert seen and all(s == (False, torch.float32) for s in seen) and res.precision == "fp32"
    assert res.to_dict()["precision"] == "fp32" and "precision fp32" in res.table()
    seen.clear()
    res = evaluate(model, (x, y), attacks=[("spy", spy_attack)], precision="bf16")
    assert seen and all(s == (True, torch.bfloat16) for s in seen)
    assert res.to_dict()["precision"] == "bf16" and "precision bf16" in res.table()
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        evaluate(model, (x, y), attacks=["fgsm"], precision="fp8")


def test_invalid_precisions_are_refused_for_every_task():
    from aal.tasks.detection import detection_config_from_dict
    from aal.tasks.fewshot import fewshot_config

    assert PRECISIONS == ("fp32", "bf16", "fp16")
    assert load_config(None, ["precision=bf16"]).precision == "bf16"
    assert load_config(None).precision == "fp32"
    with pytest.raises(ConfigError, match="precision: must be one of fp32, bf16, fp16; got 'fp8'"):
        load_config(None, ["precision=fp8"])
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        load_config(None, ["precision=fp16", "device=cpu"])
    assert fewshot_config({"task": "fewshot", "precision": "bf16"}).precision == "bf16"
    assert detection_config_from_dict({"task": "detection", "precision": "bf16"}).precision == "bf16"
    for build_cfg in (lambda p: fewshot_config({"task": "fewshot", "precision": p}),
                      lambda p: detection_config_from_dict({"task": "detection", "precision": p})):
        with pytest.raises(ConfigError, match="fp32, bf16, fp16"):
            build_cfg("half")
    with pytest.raises(ValueError, match="CUDA"):
        check_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        Trainer(nn.Linear(2, 2), create_method("standard"), [], torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1),
                precision="fp16")
    assert make_grad_scaler("bf16", "cpu") is None and make_grad_scaler("fp32", "cpu") is None


def test_grad_scaler_path_scales_unscales_before_clipping_and_keeps_awp_working():
    """The fp16 path (scale -> backward -> after_backward -> unscale -> clip -> step -> update)
    with torch's CPU scaler and fp32 arithmetic: the step must equal the unscaled one."""
    batch = fixed_batch()
    weights = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        torch.manual_seed(0)
        model = aal.create_model("small_cnn")
        opt = build_optimizer(model, "sgd", lr=0.05, momentum=0.9)
        method = create_method("awp_pgd_at", eps=0.1, steps=2, rand_init=False, gamma=0.01)
        trainer = Trainer(model, method, [batch], opt, epochs=1, progress=False, grad_clip=0.5)
        trainer.scaler = scaler  # what make_grad_scaler gives for fp16 on CUDA
        (record,) = trainer.fit()
        assert record["grad_norm"] > 0.5  # clipped, and the logged norm is the unscaled one
        weights.append(model.state_dict())
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-5, atol=1e-6)


def test_grad_scaler_state_is_checkpointed_and_restored(tmp_path):
    """fp16's loss scale survives a checkpoint: a resumed run continues with the scale it had
    (a fresh scaler would restart at 2**16 and skip steps re-learning it). CPU scaler stands in."""
    batch = fixed_batch()

    def trainer_with(scaler, run_dir):
        torch.manual_seed(0)
        model = aal.create_model("small_cnn")
        opt = build_optimizer(model, "sgd", lr=0.05)
        t = Trainer(model, create_method("fgsm_at", eps=0.1), [batch], opt, epochs=1, progress=False, run_dir=run_dir)
        t.scaler = scaler
        return t

    first = trainer_with(torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=1), tmp_path / "run")
    first.fit()
    first.scaler.update(2.0**7)  # a scale no fresh scaler would have
    first.save_checkpoint(1)
    resumed = trainer_with(torch.amp.GradScaler("cpu"), None)
    resumed.load(tmp_path / "run")
    assert resumed.scaler.get_scale() == 2.0**7
    assert resumed.scaler.state_dict() == first.scaler.state_dict()


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_precision_round_trips_into_config_and_results_and_aal_eval(tmp_path, capsys):
    from aal.cli import main
    from aal.engine.run import train_run

    cfg = load_config(REPO / "configs/fashion_mnist/fgsm_at.yaml",
                      ["precision=bf16", "epochs=1", "data.train_n=64", "data.batch_size=32", "eval.n=32",
                       "eval.epoch_n=0", "eval.attacks=clean,fgsm", "progress=false", f"out_dir={tmp_path}"])
    run_dir, _ = train_run(cfg, log=lambda _m: None)
    assert load_config(run_dir / "config.yaml").precision == "bf16"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["precision"] == {"train": "bf16", "eval": "fp32"} and results["eval"]["precision"] == "fp32"
    assert main(["eval", str(run_dir), "--attacks", "clean,fgsm", "--n", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "fp32"  # the default, whatever the run trained in
    assert main(["eval", str(run_dir), "--attacks", "clean,fgsm", "--n", "16", "--precision", "bf16"]) == 0
    assert "precision bf16" in capsys.readouterr().out


COMPILE_METHODS = {  # method -> (kwargs, attention): the attack inside the step is compiled too
    "pgd_at": ({"eps": 0.1, "steps": 2, "rand_init": False}, None),
    "trades": ({"eps": 0.1, "steps": 2}, None),
    "mart": ({"eps": 0.1, "steps": 2}, None),
    "aal_fgsm": ({"eps": 0.1}, "cbam"),
}


@pytest.mark.slow  # torch.compile: 30-40 s of compilation per method (inductor, CPU) measured here
@pytest.mark.parametrize("name", sorted(COMPILE_METHODS))
def test_compile_option_trains_a_step_like_eager(name):
    from aal.config import load_config

    assert load_config(None).compile is False and load_config(None, ["compile=true"]).compile is True
    kwargs, attention = COMPILE_METHODS[name]
    batch, weights = fixed_batch(), []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = aal.create_model("small_cnn", attention=attention)
        opt = build_optimizer(model, "sgd", lr=0.05, momentum=0.9)
        method = create_method(name, **kwargs)
        trainer = Trainer(model, method, [batch], opt, epochs=1, progress=False, compile=compiled, seed=0)
        assert (trainer.train_model is not model) == compiled and trainer.model is model
        trainer.fit()
        weights.append(model.state_dict())
    for k in weights[0]:  # the same step up to the compiler's float reassociation
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-3, atol=1e-5)


def test_native_bf16_follows_the_cpus_bf16_flags_and_bf16_training_on_others_warns(monkeypatch):
    """Without AVX512-BF16/AMX torch emulates bf16 (slower than fp32): the trainer says so, since a
    user who chose bf16 chose it for speed; fp32 and native bf16 say nothing."""
    import warnings

    import aal.engine.trainer
    import aal.utils.precision as precision

    def cpu(flags):
        return lambda: {"name": "Test CPU", "id": "x", "flags": set(flags)}

    monkeypatch.setattr(precision, "cpu_info", cpu(["avx2", "avx512f"]))
    assert precision.native_bf16("cpu") is False
    monkeypatch.setattr(precision, "cpu_info", cpu(["avx512f", "avx512_bf16"]))
    assert precision.native_bf16("cpu") is True
    monkeypatch.setattr(precision, "cpu_info", cpu(["amx_bf16"]))
    assert precision.native_bf16("cpu") is True

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(aal.engine.trainer, "native_bf16", lambda device: False)
    with pytest.warns(UserWarning, match="precision=bf16 on a cpu without native bf16 .*slower than fp32"):
        Trainer(model, create_method("standard"), [], opt, epochs=1, progress=False, precision="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(model, create_method("standard"), [], opt, epochs=1, progress=False, precision="fp32")
        monkeypatch.setattr(aal.engine.trainer, "native_bf16", lambda device: True)
        Trainer(model, create_method("standard"), [], opt, epochs=1, progress=False, precision="bf16")
