"""Run folders, checkpoints and resume under hostile or unlucky conditions (issue 15).

Every case goes through the real command line (``aal.cli.main`` in this process when no
signal or resource limit is involved, a ``python -m aal`` subprocess otherwise) and checks the
exit code, a single ``aal: error:`` line without traceback, and that nothing outside the
files the case is about changed (snapshots of the scratch folder before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aal.cli import main

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot" / "python"
BCCD = REPO.parent / "shared" / "data" / "bccd"
if os.environ.get("AAL_DATA"):
    OMNIGLOT = Path(os.environ["AAL_DATA"]) / "omniglot" / "python" if not (OMNIGLOT / "images_background_small1.zip").is_file() else OMNIGLOT
    BCCD = Path(os.environ["AAL_DATA"]) / "bccd" if not (BCCD / "BCCD").is_dir() else BCCD

CONFIG = "configs/fashion_mnist/standard.yaml"
TINY = ["epochs=1", "data.train_n=256", "data.batch_size=64", "eval.n=40", "eval.epoch_n=0", "eval.attacks=clean",
        "progress=false", "threads=1"]


# ----------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: symlinks by target, files by content hash, folders by name."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = "special"
    return out


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``aal ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(err: str, *words: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("aal: "), lines[0]
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def run_aal(*args: str, timeout: float = 240, preexec=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "aal", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO, preexec_fn=preexec)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished one-epoch classification run (copied by each test that alters it)."""
    out = tmp_path_factory.mktemp("base")
    assert main(["train", CONFIG, *TINY, f"out_dir={out}", "name=run", "--no-malloc-tune"]) == 0
    return out / "run"


@pytest.fixture()
def run(base_run, tmp_path):
    dst = tmp_path / "runs" / "run"
    shutil.copytree(base_run, dst, symlinks=True)
    return dst


# ----------------------------------------------------------------------------- 1. run folders are never reused
@needs_fmnist
def test_new_run_never_writes_into_an_existing_run(run, capsys):
    before = snapshot(run.parent.parent)
    code, _, err = cli(capsys, "train", CONFIG, *TINY, f"out_dir={run.parent}", "name=run", "--no-malloc-tune")
    assert code == 2
    assert_one_line_error(err, "already exists", str(run))
    assert snapshot(run.parent.parent) == before


@needs_fmnist
def test_new_run_refuses_names_leaving_out_dir(tmp_path, capsys):
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    runs.mkdir()
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (runs / "link").symlink_to(outside)  # an existing symlink, and a symlinked parent
    before = snapshot(tmp_path)
    for name in ("link", "link/sub", "../escape", str(outside / "abs")):
        code, _, err = cli(capsys, "train", CONFIG, *TINY, f"out_dir={runs}", f"name={name}", "--no-malloc-tune")
        assert code == 2, name
        assert_one_line_error(err, "name")
        assert snapshot(tmp_path) == before, name


# ----------------------------------------------------------------------------- 4, 5. checkpoints
def _header(entries: dict) -> bytes:
    h = json.dumps(entries).encode()
    return struct.pack("<Q", len(h)) + h


def _corrupt(run: Path, how: str) -> None:
    ck = run / "checkpoints" / "last"
    model = ck / "model.safetensors"
    data = model.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    if how == "truncated":
        model.write_bytes(data[: len(data) // 2])
    elif how == "random":
        model.write_bytes(os.urandom(len(data)))
    elif how == "huge_header":  # claims 2**60 header bytes
        model.write_bytes(struct.pack("<Q", 2**60) + data[8:])
    elif how == "huge_tensor":  # a tensor of 2**40 floats in a small file
        header[first]["shape"] = [2**20, 2**20]
        header[first]["data_offsets"] = [header[first]["data_offsets"][0], header[first]["data_offsets"][0] + 4 * 2**40]
        model.write_bytes(_header(header) + data[8 + n :])
    elif how in ("wrong_shape", "missing_tensor"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(model))
        if how == "wrong_shape":
            tensors[first] = tensors[first].flatten()[:-1].clone()
        else:
            del tensors[first]
        model.unlink()
        save_file(tensors, str(model), metadata={"format": "pt"})
    elif how == "bad_json":
        (ck / "state.json").write_text('{"format": "aal.checkpoint", "epoch": 1,')
    elif how == "optimizer_shape":  # a momentum buffer of the wrong shape: would fail mid-step
        from safetensors.torch import load_file, save_file

        opt = ck / "optimizer.safetensors"
        tensors = load_file(str(opt))
        key = next(iter(tensors))
        tensors[key] = tensors[key].flatten()[:1].clone()
        opt.unlink()
        save_file(tensors, str(opt))
    elif how == "dev_zero":
        model.unlink()
        model.symlink_to("/dev/zero")
    elif how == "fifo":
        model.unlink()
        os.mkfifo(model)
    elif how == "checkpoints_is_a_file":  # stands in for an unreadable checkpoints/ (we run as root)
        shutil.rmtree(run / "checkpoints")
        (run / "checkpoints").write_text("not a folder")
    else:
        raise AssertionError(how)


CORRUPTIONS = ["truncated", "random", "huge_header", "huge_tensor", "wrong_shape", "missing_tensor", "bad_json",
               "optimizer_shape", "checkpoints_is_a_file"]


@needs_fmnist
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_checkpoint_is_a_one_line_error_and_resume_keeps_every_record(run, capsys, how):
    _corrupt(run, how)
    before = snapshot(run.parent.parent)
    code, _, err = cli(capsys, "train", "--resume", str(run), "--no-malloc-tune")
    assert code == 1
    assert_one_line_error(err, "error:")
    assert snapshot(run.parent.parent) == before  # metrics.jsonl, results.json, checkpoint: untouched
    if how not in ("checkpoints_is_a_file", "optimizer_shape"):  # evaluation (weights only) refuses it the same way
        code, _, err = cli(capsys, "eval", str(run), "--attacks", "clean", "--n", "10", "--no-malloc-tune")
        assert code == 1
        assert_one_line_error(err, "error:")


@needs_fmnist
@pytest.mark.parametrize("how", ["dev_zero", "fifo"])
def test_checkpoint_that_is_a_device_or_fifo_is_refused_quickly(run, how):
    """Read whole, /dev/zero fills memory and a FIFO blocks forever: both must be refused unopened."""
    _corrupt(run, how)
    before = snapshot(run.parent.parent)
    t0 = time.monotonic()
    r = run_aal("eval", str(run), "--attacks", "clean", "--n", "10", timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert_one_line_error(r.stderr, "not a regular file")
    assert time.monotonic() - t0 < 120
    assert snapshot(run.parent.parent) == before


# ----------------------------------------------------------------------------- 5. failures after work started
@needs_fmnist
@pytest.mark.parametrize("override, key", [("optim.lr=nan", "optim.lr"), ("data.batch_size=512", "data.batch_size"),
                                           ("grad_clip=nan", "grad_clip")])
def test_failures_after_start_leave_no_run_folder(tmp_path, capsys, override, key):
    code, _, err = cli(capsys, "train", CONFIG, *TINY, override, f"out_dir={tmp_path}", "name=r", "--no-malloc-tune")
    assert code == 2
    assert_one_line_error(err, key)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 6. resume checks the config
@needs_fmnist
@pytest.mark.parametrize("edit, key", [({"method": {"name": "fgsm_at", "eps": 0.1}}, "method.name"),
                                       ({"model": {"name": "preact_resnet18"}}, "model.name"),
                                       ({"seed": 7}, "seed")])
def test_resume_refuses_an_edited_config(run, capsys, edit, key):
    cfg_file = run / "config.yaml"
    raw = yaml.safe_load(cfg_file.read_text())
    for k, v in edit.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) else v
    cfg_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    before = snapshot(run.parent.parent)
    code, _, err = cli(capsys, "train", "--resume", str(run), "--no-malloc-tune")
    assert code == 2
    assert_one_line_error(err, key, "trained with")
    assert snapshot(run.parent.parent) == before


@needs_fmnist
def test_resume_may_extend_epochs_and_results_cover_the_whole_run(run, capsys):
    first = json.loads((run / "results.json").read_text())
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["epochs"], raw["eval"]["n"] = 2, 30  # allowed: more epochs, a different final evaluation
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    code, out, err = cli(capsys, "train", "--resume", str(run / "checkpoints" / "last"), "--no-malloc-tune")
    assert code == 0, err
    assert f"run folder: {run.resolve()}" in out
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    res = json.loads((run / "results.json").read_text())
    assert res["eval"]["n"] == 30
    assert res["train_seconds"] == pytest.approx(sum(r["epoch_time"] for r in records))
    assert res["train_seconds"] > first["train_seconds"]


# ----------------------------------------------------------------------------- 8. resume edge cases
@needs_fmnist
@pytest.mark.parametrize("inside", ["checkpoints", "checkpoints/last", "config.yaml"])
def test_resume_from_any_path_inside_the_run(run, capsys, inside):
    (run / "checkpoints" / ".last.tmp-999999999-deadbeef").mkdir()  # left by a save killed midway
    (run / "checkpoints" / ".last.tmp-999999999-deadbeef" / "model.safetensors").write_bytes(b"x" * 1000)
    code, out, err = cli(capsys, "train", "--resume", str(run / inside), "--no-malloc-tune")
    assert code == 0, err
    assert f"run folder: {run.resolve()}" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last"]  # nothing nested, temp removed
    assert sorted(p.name for p in (run / "checkpoints" / "last").iterdir()) == sorted(
        ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"])
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]


@needs_fmnist
def test_resume_refuses_files_symlinked_out_of_the_run(run, tmp_path, capsys):
    outside = tmp_path / "outside.jsonl"
    outside.write_text("not yours\n")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "train", "--resume", str(run), "--no-malloc-tune")
    assert code == 1
    assert_one_line_error(err, "symlink", "metrics.jsonl")
    assert snapshot(tmp_path) == before


@needs_fmnist
def test_save_that_fails_on_a_full_disk_is_one_line_and_keeps_the_checkpoint(run):
    """RLIMIT_FSIZE makes every write past the limit fail with EFBIG, as a full disk fails with ENOSPC."""
    size = (run / "checkpoints" / "last" / "model.safetensors").stat().st_size
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["epochs"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    old = (run / "checkpoints" / "last" / "model.safetensors").read_bytes()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    r = run_aal("train", "--resume", str(run), preexec=limit)
    assert r.returncode == 1, r.stderr[-2000:]
    assert_one_line_error(r.stderr, "cannot save the checkpoint")
    assert (run / "checkpoints" / "last" / "model.safetensors").read_bytes() == old
    assert json.loads((run / "checkpoints" / "last" / "state.json").read_text())["epoch"] == 1
    assert not [p for p in (run / "checkpoints").iterdir() if p.name != "last"]


def test_ctrl_c_while_starting_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for delay in (0.3, 0.8):
        p = subprocess.Popen([sys.executable, "-m", "aal", "train", CONFIG, *TINY, f"out_dir={tmp_path}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130, err[-2000:]
        assert_one_line_error(err, "interrupted")


@needs_fmnist
def test_sigterm_stops_cleanly_names_the_run_and_resumes(tmp_path):
    args = ["train", CONFIG, "epochs=3", "data.train_n=3000", "eval.n=40", "eval.epoch_n=0", "eval.attacks=clean",
            "progress=false", "threads=1", f"out_dir={tmp_path}", "name=cut"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "aal", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, cwd=REPO)
    state = tmp_path / "cut" / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None and not state.exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert_one_line_error(err, "SIGTERM", f"aal train --resume {tmp_path / 'cut'}")
    r = run_aal("train", "--resume", str(tmp_path / "cut"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["epoch"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ----------------------------------------------------------------------------- 8. every task resumes alike
def _fewshot_yaml(tmp_path: Path) -> Path:
    cfg = {"task": "fewshot", "seed": 0, "epochs": 1, "progress": False, "out_dir": str(tmp_path / "runs"), "name": "fs",
           "data": {"name": "omniglot", "root": str(OMNIGLOT), "n_way": 5, "k_shot": 1, "n_query": 3, "episodes": 3,
                    "options": {"background": "images_background_small1", "evaluation": "images_background_small2"}},
           "eval": {"shots": [1], "episodes": 10, "epoch_episodes": 5, "runs": False},
           "model": {"name": "small_cnn", "attention": "cbam"}, "method": {"name": "protonet"},
           "optim": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "constant"}}
    path = tmp_path / "fewshot.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _detection_yaml(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "detection" / "bccd_ssd.yaml").read_text())
    cfg.update({"epochs": 1, "progress": False, "out_dir": str(tmp_path / "runs"), "name": "det", "threads": 1})
    cfg["data"] = {**cfg.get("data", {}), "root": str(BCCD), "image_size": 64, "batch_size": 2, "train_n": 2,
                   "val_split": None, "test_n": 2}
    cfg["eval"] = {**cfg.get("eval", {}), "top_k": 20}
    path = tmp_path / "detection.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


TASKS = {
    "fewshot": (_fewshot_yaml, "fs", (OMNIGLOT / "images_background_small1.zip").is_file()),
    "detection": (_detection_yaml, "det", (BCCD / "BCCD" / "Annotations").is_dir()),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_fewshot_and_detection_resume_like_classification(tmp_path, capsys, task):
    """Killed before the first checkpoint: restarts in the same folder; extended on resume:
    results.json holds every epoch's record and their seconds; a second new run is refused."""
    make, name, available = TASKS[task]
    if not available:
        pytest.skip(f"{task} data not found")
    cfg = make(tmp_path)
    run = tmp_path / "runs" / name
    code, _, err = cli(capsys, "train", str(cfg), "--no-malloc-tune")
    assert code == 0, err
    code, _, err = cli(capsys, "train", str(cfg), "--no-malloc-tune")  # the same name again
    assert code == 2
    assert_one_line_error(err, "already exists")

    # as if killed during epoch 1: the folder holds its config and a cut metrics line only
    shutil.rmtree(run / "checkpoints")
    (run / "results.json").unlink()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "trunc')
    code, _, err = cli(capsys, "train", "--resume", str(run), "--no-malloc-tune")
    assert code == 0, err
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]

    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["epochs"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    code, _, err = cli(capsys, "train", "--resume", str(run / "checkpoints" / "last"), "--no-malloc-tune")
    assert code == 0, err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    res = json.loads((run / "results.json").read_text())
    assert [r["epoch"] for r in records] == [r["epoch"] for r in res["history"]] == [1, 2]
    assert res["train_seconds"] == pytest.approx(sum(r["epoch_time"] + r["eval_time"] for r in records))
