"""End-to-end CLI tests: `aal train` on a tiny config, `aal eval` on the result, bad configs,
and kill-and-resume of a real `aal train` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

TINY = [
    "epochs=1", "data.train_n=512", "eval.n=200", "eval.epoch_n=100", "eval.attacks=clean,fgsm,pgd5",
    "eval.epoch_attacks=clean,fgsm", "method.steps=2", "progress=false",
]


def run_aal(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "aal", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(
    "override, key",
    [("method.eps=-1", "eps"), ("method.steps=0", "steps"), ("data.batch_size=0", "data.batch_size"), ("nope=1", "nope"), ("method.name=zzz", "method.name")],
)
def test_bad_config_exits_2_with_one_line(override, key, tmp_path):
    r = run_aal("train", "configs/fashion_mnist/pgd_at.yaml", override, f"out_dir={tmp_path}")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and key in lines[0] and lines[0].startswith("aal: error:")
    assert not any(tmp_path.iterdir())  # nothing was started


def test_list_shows_registries():
    r = run_aal("list")
    assert r.returncode == 0, r.stderr
    for name in ("small_cnn", "preact_resnet18", "pgd", "fgsm", "pgd_at", "trades", "fashion_mnist", "cifar10"):
        assert name in r.stdout


@needs_fmnist
def test_train_then_eval(tmp_path):
    r = run_aal("train", "configs/fashion_mnist/pgd_at.yaml", *TINY, f"out_dir={tmp_path}", "name=run")
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "run"
    assert "run folder:" in r.stdout and str(run) in r.stdout
    for f in ("config.yaml", "metrics.jsonl", "results.json"):
        assert (run / f).is_file(), f
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["epoch"] in (0, 1)
    res = json.loads((run / "results.json").read_text())
    acc = res["eval"]["accuracy"]
    assert set(acc) >= {"clean", "fgsm", "pgd5"}
    assert 0.0 <= acc["pgd5"] <= acc["clean"] <= 1.0
    assert acc["clean"] > 0.3  # 512 images, one epoch: well above chance (0.1)

    e = run_aal("eval", str(run), "--attacks", "clean,fgsm", "--n", "100", "--json")
    assert e.returncode == 0, e.stderr[-2000:]
    out = json.loads(e.stdout)
    assert out["n"] == 100 and set(out["accuracy"]) >= {"clean", "fgsm"}
    t = run_aal("eval", str(run), "--attacks", "clean", "--n", "50")
    assert t.returncode == 0 and "clean" in t.stdout
    bad = run_aal("eval", str(run), "--attacks", "clean,zzz9")
    assert bad.returncode == 2


@needs_fmnist
def test_kill_and_resume_gives_same_weights(tmp_path):
    from safetensors.torch import load_file

    args = ["configs/fashion_mnist/fgsm_at.yaml", "epochs=3", "data.train_n=3000", "eval.epoch_n=0",
            "eval.n=50", "eval.attacks=clean", "progress=false"]
    ref = run_aal("train", *args, f"out_dir={tmp_path}", "name=ref")
    assert ref.returncode == 0, ref.stderr[-2000:]

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "aal", "train", *args, f"out_dir={tmp_path}", "name=cut"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    state = tmp_path / "cut" / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if state.exists():  # the first epoch's checkpoint is on disk: kill during the second
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = metrics.read_text().count("\n") if metrics.exists() else 0
    assert done >= 1, proc.stderr.read() if proc.stderr else ""

    res = run_aal("train", "--resume", str(tmp_path / "cut"))
    assert res.returncode == 0, res.stderr[-2000:]
    a = load_file(str(tmp_path / "ref" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines][-1] == json.loads((tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"]


@needs_fmnist
def test_viz_writes_a_png_for_an_aal_run(tmp_path):
    r = run_aal("train", "configs/fashion_mnist/aal_fgsm.yaml", "epochs=1", "data.train_n=256", "eval.n=50",
                "eval.epoch_n=0", "eval.attacks=clean", "progress=false", f"out_dir={tmp_path}", "name=a")
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "grid.png"
    v = run_aal("viz", str(tmp_path / "a"), "--n", "3", "--out", str(out))
    assert v.returncode == 0, v.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


@needs_fmnist
def test_viz_refuses_a_model_without_attention(tmp_path):
    r = run_aal("train", "configs/fashion_mnist/standard.yaml", "epochs=1", "data.train_n=128", "eval.n=20",
                "eval.epoch_n=0", "eval.attacks=clean", "progress=false", f"out_dir={tmp_path}", "name=s")
    assert r.returncode == 0, r.stderr[-2000:]
    v = run_aal("viz", str(tmp_path / "s"), "--out", str(tmp_path / "x.png"))
    assert v.returncode == 2 and "attention" in v.stderr
