"""Experiment tracking (issue 14 item 3): ``logger: tensorboard`` mirrors ``metrics.jsonl``.

The runs go through the real command line; the event files are read back with TensorBoard's own
reader (``EventAccumulator``) and compared with ``metrics.jsonl`` value by value, and the last
epoch's attention images with the maps of the run's final checkpoint. Skips without the
``tensorboard`` package (``pip install "aal[tensorboard]"``; the ``test`` extra has it).
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aal.cli import main
from aal.config import ConfigError, load_config
from aal.engine.tracking import TENSORBOARD_DIR, attention_images, preview_batch, scalar_tags

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard not installed (pip install 'aal[tensorboard]')")

TINY = ["epochs=2", "data.train_n=256", "data.batch_size=64", "eval.n=40", "eval.epoch_n=50", "eval.attacks=clean",
        "progress=false", "threads=1"]


def _train(out: Path, config: str, *extra: str) -> Path:
    assert main(["train", config, *TINY, f"out_dir={out}", "name=run", *extra, "--no-malloc-tune"]) == 0
    return out / "run"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


# ----------------------------------------------------------------------------- tags (no tensorboard needed)
def test_scalar_tags_name_every_number_of_a_record_and_nothing_else():
    record = {
        "epoch": 3, "step": 30, "lr": 0.01, "train_loss": 0.7, "train_acc": 0.6, "grad_norm": None,
        "logs": {"mask_mean": 0.3, "mask_std": 0.2, "flag": True}, "eval": {"val_clean": 0.8, "val_pgd10": 0.4},
        "epoch_time": 5.0, "eval_time": 1.0, "images": 640, "img_per_s": 128.0, "note": "text", "bad": float("nan"),
    }  # fmt: skip
    assert scalar_tags(record) == {
        "train/step": 30.0, "train/lr": 0.01, "train/loss": 0.7, "train/acc": 0.6,
        "logs/mask_mean": 0.3, "logs/mask_std": 0.2, "eval/val_clean": 0.8, "eval/val_pgd10": 0.4,
        "time/epoch_s": 5.0, "time/eval_s": 1.0, "throughput/images": 640.0, "throughput/img_per_s": 128.0,
    }  # fmt: skip


def test_attention_images_only_for_aal_methods():
    import aal
    from aal.methods import create_method

    torch.manual_seed(0)
    model = aal.create_model("small_cnn", attention="cbam_in").eval()
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    images = attention_images(create_method("aal_fgsm", eps=0.1), model, x, y)
    assert sorted(images) == ["attention/M", "attention/input", "attention/k"]
    assert images["attention/k"].shape == (3, 1, 28, 28) and images["attention/M"].shape == (3, 1, 24, 24)
    assert all(0 <= float(t.min()) and float(t.max()) <= 1 for t in images.values())
    assert attention_images(create_method("fgsm_at", eps=0.1), model, x, y) == {}


# ----------------------------------------------------------------------------- the config key
@needs_fmnist
def test_unknown_logger_is_a_one_line_config_error(tmp_path, capsys):
    code = main(["train", "configs/fashion_mnist/standard.yaml", *TINY, f"out_dir={tmp_path}", "logger=wandb", "--no-malloc-tune"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("aal: error: logger:") and "tensorboard" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # refused before any folder was made


def test_tensorboard_logger_without_the_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger: tensorboard needs the tensorboard package.*pip install"):
        load_config("configs/fashion_mnist/standard.yaml", ["logger=tensorboard"])


@pytest.mark.parametrize("task", ["fewshot", "detection"])
def test_fewshot_and_detection_configs_check_the_logger_too(task):
    from aal.tasks.detection import detection_config_from_dict
    from aal.tasks.fewshot import fewshot_config

    build = fewshot_config if task == "fewshot" else detection_config_from_dict
    with pytest.raises(ConfigError, match="logger: must be one of none, tensorboard"):
        build({"task": task, "logger": "mlflow"})
    assert build({"task": task}).logger == "none"


# ----------------------------------------------------------------------------- the event files
@needs_fmnist
def test_tracking_is_off_by_default(tmp_path):
    run = _train(tmp_path, "configs/fashion_mnist/standard.yaml", "epochs=1", "eval.epoch_n=0")
    assert (run / "metrics.jsonl").is_file()
    assert not (run / TENSORBOARD_DIR).exists()
    assert not list(run.rglob("events.out.tfevents.*"))


@needs_fmnist
@needs_tensorboard
def test_tensorboard_mirrors_metrics_jsonl_and_draws_aal_maps(tmp_path):
    run = _train(tmp_path, "configs/fashion_mnist/aal_fgsm.yaml", "logger=tensorboard")
    records, events = _records(run), _events(run)
    assert [r["epoch"] for r in records] == [1, 2]
    tags = set(events.Tags()["scalars"])
    # the tags a user looks for, each from its metrics.jsonl field
    named = {"train/loss": "train_loss", "train/acc": "train_acc", "train/lr": "lr", "throughput/img_per_s": "img_per_s"}
    for tag, key in named.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in records], tag
    for key in ("mask_mean", "mask_std", "m_mean", "m_std", "backtracked_frac"):  # AAL's map diagnostics
        assert [e.value for e in events.Scalars(f"logs/{key}")] == [pytest.approx(r["logs"][key], rel=1e-6) for r in records]
    assert [e.value for e in events.Scalars("eval/test_pgd10")] == [pytest.approx(r["eval"]["test_pgd10"], rel=1e-6) for r in records]
    # and every other number of every record, nothing more
    expected = {tag for r in records for tag in scalar_tags(r)}
    assert tags == expected
    for r in records:
        for tag, value in scalar_tags(r).items():
            (event,) = [e for e in events.Scalars(tag) if e.step == r["epoch"]]
            assert event.value == pytest.approx(value, rel=1e-6, abs=1e-9), tag

    # one set of images per epoch; the last epoch's maps are the final model's
    assert set(events.Tags()["images"]) == {"attention/M", "attention/k", "attention/input"}
    from aal.engine.run import build_method, load_run

    cfg, model, bundle = load_run(run)
    x, y = preview_batch(bundle.test)
    want = attention_images(build_method(cfg), model, x, y)
    for tag in ("attention/M", "attention/k"):
        shots = events.Images(tag)
        assert [s.step for s in shots] == [1, 2]
        assert not np.array_equal(_decode(shots[0]), _decode(shots[1])), f"{tag}: the map did not change with training"
        grid = _decode(shots[-1])
        n, _, h, w = want[tag].shape
        assert grid.shape == (h, n * w), (tag, grid.shape)  # the n images side by side
        tiles = np.stack([grid[:, i * w:(i + 1) * w] for i in range(n)]) / 255.0
        assert np.abs(tiles - want[tag][:, 0].numpy()).max() <= 2 / 255, tag  # 8-bit PNG


def _decode(image_event) -> np.ndarray:
    """The first channel of a logged PNG as a (H, W) uint8 array (maps are logged grey)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("RGB"))[..., 0]


@needs_fmnist
@needs_tensorboard
def test_resume_drops_the_events_of_epochs_trained_again(tmp_path, capsys):
    """A run that goes back to an earlier checkpoint logs the epochs it trains again once, as in metrics.jsonl."""
    import shutil

    import yaml

    run = _train(tmp_path, "configs/fashion_mnist/standard.yaml", "logger=tensorboard", "epochs=1", "eval.epoch_n=0")
    shutil.copytree(run / "checkpoints" / "last", tmp_path / "after_epoch_1")
    cfg_path = run / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["epochs"] = 2
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--resume", str(run), "--no-malloc-tune"]) == 0  # epoch 2
    # as if epoch 2's checkpoint had been lost (killed while saving): epoch 2 is trained again
    shutil.rmtree(run / "checkpoints" / "last")
    shutil.copytree(tmp_path / "after_epoch_1", run / "checkpoints" / "last")
    assert main(["train", "--resume", str(run), "--no-malloc-tune"]) == 0
    capsys.readouterr()
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) >= 2  # each process wrote its own file
    losses = [(e.step, e.value) for e in _events(run).Scalars("train/loss")]
    assert losses == [(r["epoch"], pytest.approx(r["train_loss"], rel=1e-6)) for r in _records(run)]
    assert [step for step, _ in losses] == [1, 2]
