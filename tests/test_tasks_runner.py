"""Tasks as registered objects behind one runner (issue 13, item 1).

* the registry contract, over every registered task: config round trip, build, a one-step run
  into a run folder through :func:`aal.engine.run.run_task`, and :func:`~aal.engine.run.load_task_run`;
* ``aal train --resume`` of a few-shot and a detection run killed mid-run by SIGKILL through the
  real command line gives bit-identical weights to an uninterrupted run;
* malloc tuning is applied for every task (a spy on the runner's call);
* the command line has no per-task branch: a task registered here trains through ``aal train``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import aal  # noqa: F401 (fills every registry)
from aal.cli import main, task_of
from aal.config import ConfigError, RunConfig, RunConfigBase, config_from_dict
from aal.engine import run as run_mod
from aal.engine.run import load_task_run, run_task
from aal.tasks.base import TASKS, RunTask, TaskExperiment, task_named, task_of_config
from aal.tasks.classification import ClassificationTask

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot" / "python"
BCCD = REPO.parent / "shared" / "data" / "bccd"
if os.environ.get("AAL_DATA"):
    OMNIGLOT = Path(os.environ["AAL_DATA"]) / "omniglot" / "python" if not (OMNIGLOT / "images_background_small1.zip").is_file() else OMNIGLOT
    BCCD = Path(os.environ["AAL_DATA"]) / "bccd" if not (BCCD / "BCCD").is_dir() else BCCD
AVAILABLE = {
    "classification": FMNIST.exists(),
    "fewshot": (OMNIGLOT / "images_background_small1.zip").is_file(),
    "detection": (BCCD / "BCCD" / "Annotations").is_dir(),
}


def tiny(task: str, out: Path, name: str = "run", epochs: int = 1, steps: int = 1) -> dict:
    """A config dict of ``task`` with ``steps`` training steps per epoch, seconds to run."""
    top = {"seed": 0, "epochs": epochs, "progress": False, "out_dir": str(out), "name": name, "threads": 1}
    if task == "classification":
        return {**top, "data": {"name": "fashion_mnist", "train_n": 32 * steps, "batch_size": 32},
                "model": {"name": "small_cnn"}, "method": {"name": "fgsm_at", "eps": 0.1},
                "eval": {"n": 20, "epoch_n": 0, "attacks": ["clean"]}}
    if task == "fewshot":
        return {**top, "task": "fewshot",
                "data": {"name": "omniglot", "root": str(OMNIGLOT), "n_way": 3, "k_shot": 1, "n_query": 2, "episodes": steps,
                         "options": {"background": "images_background_small1", "evaluation": "images_background_small2"}},
                "eval": {"n_way": 3, "shots": [1], "n_query": 2, "episodes": 4, "epoch_episodes": 2, "runs": False},
                "model": {"name": "small_cnn", "attention": "cbam"}, "method": {"name": "protonet"},
                "optim": {"name": "sgd", "lr": 0.01}, "schedule": {"name": "constant"}, "grad_clip": 1.0}
    if task == "detection":
        raw = yaml.safe_load((REPO / "configs" / "detection" / "bccd_ssd.yaml").read_text())
        raw.update(top)
        raw["data"] = {**raw.get("data", {}), "root": str(BCCD), "image_size": 64, "batch_size": 2, "train_n": 2 * steps,
                       "val_split": None, "test_n": 2, "augment": "flip"}
        raw["eval"] = {**raw.get("eval", {}), "top_k": 20}
        return raw
    raise AssertionError(task)


def needs(task: str):
    return pytest.mark.skipif(not AVAILABLE.get(task, True), reason=f"{task} data not found")


# ----------------------------------------------------------------------------- the registry contract
def test_registry_lists_the_tasks_and_refuses_unknown_names(tmp_path):
    assert {"classification", "fewshot", "detection"} <= set(TASKS.names())
    with pytest.raises(ConfigError, match=r"unknown task 'segmentation' \(known: classification, detection, fewshot"):
        task_named("segmentation")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: segmentation\n")
    with pytest.raises(ConfigError, match="known: classification"):
        task_of_config(bad)
    plain = tmp_path / "plain.yaml"
    plain.write_text("epochs: 1\n")
    assert task_of_config(plain).name == task_of(plain).name == "classification"


@pytest.mark.parametrize("name", ["classification", "fewshot", "detection"])
def test_every_task_keeps_the_contract(name, tmp_path):
    if not AVAILABLE[name]:
        pytest.skip(f"{name} data not found")
    task = task_named(name)
    raw = tiny(name, tmp_path / "runs")
    cfg = task.config_from_dict(raw)
    assert task.is_config(cfg) and task.is_config(cfg.to_dict()) and isinstance(cfg, RunConfigBase)
    assert task_of_config(cfg) is task and task_of_config(cfg.to_dict()) is task
    assert task.config_from_dict(cfg.to_dict()) == cfg  # the dump loads back to the same config
    others = [t for t in TASKS.names() if t != name]
    assert not any(task_named(t).is_config(cfg) for t in others)

    exp = task.build(cfg, torch.device("cpu"))
    assert isinstance(exp, TaskExperiment) and len(exp.loader) == 1 and exp.cfg == cfg

    out = run_task(cfg, log=lambda _m: None, device="cpu")
    assert out.run_dir == tmp_path / "runs" / "run"
    res = json.loads((out.run_dir / "results.json").read_text())
    for key in ("method", "dataset", "model", "epochs", "train_seconds", "eval_seconds", "history", "machine", "processes"):
        assert key in res, key
    assert [r["epoch"] for r in res["history"]] == [1] and res["processes"] == 1
    assert (out.run_dir / "config.yaml").is_file() and task.is_config(yaml.safe_load((out.run_dir / "config.yaml").read_text()))

    native = load_task_run(out.run_dir, device="cpu")
    restored = native[1] if isinstance(native, tuple) else native.model
    trained = load_file(str(out.run_dir / "checkpoints" / "last" / "model.safetensors"))
    for k, v in restored.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert not restored.training


@needs("fewshot")
def test_library_resume_without_a_folder_raises_instead_of_training_from_scratch(tmp_path):
    from aal.engine.task_runs import train_detection, train_fewshot

    for train, task in ((train_fewshot, "fewshot"), (train_detection, "detection")):
        with pytest.raises(ValueError, match="needs the run folder"):
            train(tiny(task, tmp_path), run_dir=None, resume=True, log=lambda _m: None)
    assert not (tmp_path / "run").exists()


@needs("fewshot")
def test_torchrun_is_refused_in_one_line_for_tasks_without_ddp(tmp_path, monkeypatch):
    cfg = task_named("fewshot").config_from_dict(tiny("fewshot", tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun: fewshot runs train in one process"):
        run_task(cfg)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- malloc tuning for every task
@pytest.mark.parametrize("name", ["classification", "fewshot", "detection"])
def test_aal_train_tunes_malloc_for_every_task(name, tmp_path, monkeypatch, capsys):
    if not AVAILABLE[name]:
        pytest.skip(f"{name} data not found")
    calls: list[bool] = []
    monkeypatch.setattr(run_mod, "tune_malloc", lambda enable=True: calls.append(bool(enable)))
    monkeypatch.delenv("AAL_NO_MALLOC_TUNE", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny(name, tmp_path / "runs")))
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    assert main(["train", str(path), "name=flag_off", "--no-malloc-tune"]) == 0
    assert main(["train", str(path), "name=cfg_off", "malloc_tune=false"]) == 0
    assert calls == [True, False, False]


# ----------------------------------------------------------------------------- the CLI has no per-task branch
@dataclasses.dataclass(frozen=True)
class EchoConfig(RunConfig):
    """A classification config under another task name (only the registry knows it)."""

    task: str = "echo"


class EchoTask(RunTask):
    """A task registered by a test: classification's experiment under the name ``echo``."""

    name = "echo"
    config_type = EchoConfig
    default_device = "cpu"

    def config_from_dict(self, raw, validate=True):
        base = config_from_dict({k: v for k, v in raw.items() if k != "task"}, validate=validate)
        return EchoConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(RunConfig)})

    def build(self, cfg, device):
        return dataclasses.replace(ClassificationTask().build(cfg, device), result_fields=lambda r: {"echo": r.to_dict()})

    def format_result(self, result):
        return "echo " + " ".join(f"{k}={v:.3f}" for k, v in result.accuracy.items())

    def evaluate(self, native, n=None):
        return {"restored": type(native).__name__}


@pytest.fixture()
def echo_task():
    TASKS.register("echo")(EchoTask())
    try:
        yield TASKS.get("echo")
    finally:
        TASKS._entries.pop("echo")  # registries have no removal: a test's task must not outlive it


@needs("classification")
def test_a_task_registered_elsewhere_trains_resumes_and_evaluates_through_the_cli(echo_task, tmp_path, capsys):
    path = tmp_path / "echo.yaml"
    path.write_text(yaml.safe_dump({**tiny("classification", tmp_path / "runs", name="e"), "task": "echo"}))
    assert main(["train", str(path), "--no-malloc-tune"]) == 0
    out = capsys.readouterr().out
    assert "echo clean=" in out and "run folder:" in out
    run = tmp_path / "runs" / "e"
    assert yaml.safe_load((run / "config.yaml").read_text())["task"] == "echo"
    assert "echo" in json.loads((run / "results.json").read_text())
    assert main(["train", "--resume", str(run), "--no-malloc-tune"]) == 0  # nothing left: evaluates again
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0  # no attack evaluation declared: the task's own
    assert json.loads(capsys.readouterr().out) == {"restored": "Experiment"}
    assert main(["list"]) == 0
    assert "echo" in capsys.readouterr().out


# ----------------------------------------------------------------------------- kill -9 mid-run, resume: bit-identical
def _aal(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen([sys.executable, "-m", "aal", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


def _epoch(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoints" / "last" / "state.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("name", ["fewshot", "detection"])
def test_cli_resume_after_sigkill_is_bit_identical(name, tmp_path, capsys):
    if not AVAILABLE[name]:
        pytest.skip(f"{name} data not found")
    epochs, steps = 3, 6
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny(name, tmp_path / "runs", epochs=epochs, steps=steps)))
    assert main(["train", str(path), "name=straight", "--no-malloc-tune"]) == 0, capsys.readouterr().err

    run = tmp_path / "runs" / "cut"
    p = _aal("train", str(path), "name=cut", "--no-malloc-tune")
    deadline = time.monotonic() + 120
    while _epoch(run) < 1 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    cut_at = _epoch(run)
    assert 1 <= cut_at < epochs, f"the run was not cut mid-way (checkpoint epoch {cut_at})"
    assert not (run / "results.json").exists()

    assert main(["train", "--resume", str(run), "--no-malloc-tune"]) == 0, capsys.readouterr().err
    a = load_file(str(tmp_path / "runs" / "straight" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.loads((tmp_path / "runs" / "straight" / "results.json").read_text())
    rb = json.loads((run / "results.json").read_text())
    assert [r["epoch"] for r in rb["history"]] == list(range(1, epochs + 1))  # the whole run, across processes
    assert [r["train_loss"] for r in rb["history"]] == [r["train_loss"] for r in ra["history"]]
    key = "fewshot" if name == "fewshot" else "test"
    assert rb[key] == ra[key]
