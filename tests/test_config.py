"""Config loading, overrides and validation (exit code 2 paths are in test_cli.py)."""

from __future__ import annotations

import pytest

from aal.config import ConfigError, RunConfig, coerce, config_from_dict, dump_config, load_config, parse_float


@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), ("0.1", 0.1), (0.25, 0.25), (3, 3.0), ("1e-3", 1e-3), (" 2 / 4 ", 0.5)])
def test_parse_float_accepts_fractions(text, value):
    assert parse_float(text, "k") == pytest.approx(value)


@pytest.mark.parametrize("bad", ["abc", "1/0", True, None, [1]])
def test_parse_float_rejects(bad):
    with pytest.raises(ConfigError, match="k"):
        parse_float(bad, "k")


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    assert cfg.method.name == "pgd_at" and cfg.data.name == "fashion_mnist"


def test_overrides_are_typed_and_frozen():
    cfg = load_config(None, ["method.name=fgsm_at", "method.eps=8/255", "epochs=3", "eval.attacks=clean,pgd10", "data.batch_size=64"])
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.method.params["eps"] == pytest.approx(8 / 255)
    assert cfg.eval.attacks == ("clean", "pgd10")
    assert cfg.data.batch_size == 64
    with pytest.raises(Exception):
        cfg.epochs = 4  # frozen


def test_yaml_roundtrip(tmp_path):
    cfg = load_config("configs/fashion_mnist/pgd_at.yaml", ["epochs=2", "model.attention=cbam"])
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["bogus=1"], "bogus"),
        (["data.bogus=1"], "data.bogus"),
        (["method.bogus=1"], "method.bogus"),
        (["model.bogus=1"], "model.bogus"),
        (["method.eps=-0.1"], "eps"),
        (["method.steps=0"], "steps"),
        (["data.batch_size=0"], "data.batch_size"),
        (["epochs=-1"], "epochs"),
        (["method.name=nope"], "method.name"),
        (["model.name=nope"], "model.name"),
        (["data.name=nope"], "data.name"),
        (["model.attention=nope"], "model.attention"),
        (["eval.attacks=clean,zzz20"], "eval.attacks"),
        (["epochs=ten"], "epochs"),
        (["data.augment=rotate"], "data.augment"),
        (["optim.lr=0"], "optim.lr"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["epochs"])


def test_every_shipped_config_validates():
    from pathlib import Path

    from aal.cli import task_of

    paths = sorted(Path("configs").rglob("*.yaml"))
    assert len(paths) >= 10
    seen = set()
    for p in paths:
        task = task_of(p)
        assert task.is_config(task.load_config(p))
        seen.add(task.name)
    assert seen == {"classification", "fewshot", "detection"}


def test_coerce_union_and_tuple():
    assert coerce(None, int | None, "k") is None
    assert coerce("5", int | None, "k") == 5
    assert coerce([1, "2"], tuple[int, ...], "k") == (1, 2)
    with pytest.raises(ConfigError):
        coerce("x", int | None, "k")


def test_config_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError):
        config_from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("overrides, key", [(["model.name=resnet18", "model.stem=bogus"], "stem"), (["model.name=wrn34_10", "model.dropout=-1"], "dropout")])
def test_bad_model_options_caught_before_work(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)
