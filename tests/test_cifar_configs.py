"""Every CIFAR-10 recipe (paper scale and CPU scale) builds and trains two steps on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aal.config import load_config
from aal.engine.run import train_run

ROOT = Path(__file__).resolve().parents[1]
ALL = sorted((ROOT / "configs" / "cifar10").glob("*.yaml")) + sorted((ROOT / "configs" / "cifar10_cpu").glob("*.yaml"))
CONFIGS = [p for p in ALL if not p.stem.startswith("atop_")]  # AToP's stages need a trained run: their own test
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def cifar_zip(tmp_path_factory):
    from test_cifar_jpeg import write_zip

    root = tmp_path_factory.mktemp("cifar")
    return write_zip(root / "cifar10_jpeg.zip", classes=CLASSES, n_train=1, n_test=1)


def two_steps(path: Path, cifar_zip: Path, out: Path, name: str = "run", *extra: str):
    cfg = load_config(path, [
        f"data.root={cifar_zip}", "epochs=1", "data.train_n=4", "data.batch_size=2", "eval.n=2",
        "eval.attacks=[clean]", "eval.epoch_n=0", "progress=false", "threads=1", f"out_dir={out}", f"name={name}",
        "schedule.name=cosine", "schedule.milestones=[]",  # the paper's multistep milestones lie beyond a one-epoch test
        "compile=false",  # ~40 s of compilation per config; the shipped compile=true has its own slow test
        *extra,
    ])  # fmt: skip
    return train_run(cfg, log=lambda _m: None)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_two_training_steps_on_cpu(path, cifar_zip, tmp_path, monkeypatch):
    monkeypatch.setenv("AAL_CACHE_DIR", str(tmp_path / "cache"))
    run_dir, result = two_steps(path, cifar_zip, tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2  # two optimizer steps (one per batch of two)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["dataset_source"] == "CIFAR-10 (JPEG-q75 re-encoding)"
    assert 0.0 <= result.accuracy["clean"] <= 1.0


def test_the_cpu_atop_stages_chain_on_the_cpu_recipe(cifar_zip, tmp_path, monkeypatch):
    """AToP on the CPU recipe: standard classifier -> purifier pre-training -> fine-tuning, two steps each."""
    monkeypatch.setenv("AAL_CACHE_DIR", str(tmp_path / "cache"))
    cpu = ROOT / "configs" / "cifar10_cpu"
    std, _ = two_steps(cpu / "standard.yaml", cifar_zip, tmp_path, "standard")
    pre, _ = two_steps(cpu / "atop_pretrain.yaml", cifar_zip, tmp_path, "pre", f"model.classifier_run={std}")
    fine, result = two_steps(cpu / "atop_finetune.yaml", cifar_zip, tmp_path, "fine", f"model.classifier_run={std}",
                             f"model.purifier_run={pre}")
    results = json.loads((fine / "results.json").read_text())
    assert [json.loads(x)["step"] for x in (fine / "metrics.jsonl").read_text().splitlines()][-1] == 2
    assert 0.0 <= result.accuracy["clean"] <= 1.0 and results["dataset_source"] == "CIFAR-10 (JPEG-q75 re-encoding)"


@pytest.mark.slow  # torch.compile: ~40 s
def test_the_cpu_recipe_trains_as_shipped_in_bf16_and_compiled(cifar_zip, tmp_path, monkeypatch):
    monkeypatch.setenv("AAL_CACHE_DIR", str(tmp_path / "cache"))
    path = ROOT / "configs" / "cifar10_cpu" / "fgsm_at.yaml"
    cfg = load_config(path, [f"data.root={cifar_zip}", "epochs=1", "data.train_n=4", "data.batch_size=2", "eval.n=2",
                             "eval.attacks=[clean]", "eval.epoch_n=0", "progress=false", f"out_dir={tmp_path}", "name=run"])
    assert cfg.precision == "bf16" and cfg.compile is True
    run_dir, _ = train_run(cfg, log=lambda _m: None)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["precision"] == {"train": "bf16", "eval": "fp32"}


def test_device_option_is_validated_before_any_work(tmp_path):
    from aal.cli import main
    from aal.config import ConfigError

    with pytest.raises(ConfigError, match="device"):
        load_config(CONFIGS[0], ["device=gpu"])
    if not __import__("torch").cuda.is_available():
        code = main(["train", str(ROOT / "configs" / "cifar10_cpu" / "fgsm_at.yaml"), f"out_dir={tmp_path}",
                     "data.root=/nonexistent", "--device", "cuda"])
        assert code == 2 and not any(tmp_path.iterdir())  # refused before data, model or run folder
