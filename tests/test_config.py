"""Config loading, overrides and validation (exit code 2 paths are in test_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aal.config import ConfigError, RunConfig, coerce, config_from_dict, dump_config, load_config, parse_float

REPO = Path(__file__).resolve().parents[1]


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


# ----------------------------------------------------------------------------- base: (a recipe written once)
def _write(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_merges_sections_key_by_key_and_the_file_wins(tmp_path):
    from aal.config import read_config_file

    _write(tmp_path, "recipes/recipe.yaml", "epochs: 7\nmodel: {name: small_cnn, attention: none}\nmethod: {name: pgd_at, eps: 0.1}\n")
    _write(tmp_path, "recipes/mid.yaml", "base: recipe.yaml\nepochs: 3\nmethod: {steps: 4}\n")
    run = _write(tmp_path, "run.yaml", "base: recipes/mid.yaml\nmodel: {attention: cbam_in}\n")  # relative to run.yaml's folder
    assert read_config_file(run) == {
        "epochs": 3, "model": {"name": "small_cnn", "attention": "cbam_in"}, "method": {"name": "pgd_at", "eps": 0.1, "steps": 4},
    }
    cfg = load_config(run, ["method.steps=2"])  # overrides still come last
    assert (cfg.epochs, cfg.model.attention, cfg.method.params["steps"], cfg.method.params["eps"]) == (3, "cbam_in", 2, 0.1)


@pytest.mark.parametrize("files, match", [
    ({"a.yaml": "base: a.yaml\n"}, r"a.yaml: base: 'a.yaml' makes a cycle \(a.yaml -> a.yaml\)"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, r"b.yaml: base: 'a.yaml' makes a cycle \(a.yaml -> b.yaml -> a.yaml\)"),
    ({"a.yaml": "base: nowhere.yaml\n"}, r"a.yaml: base: config file not found: .*nowhere.yaml"),
    ({"a.yaml": "base: [b.yaml]\n"}, r"a.yaml: base: expected a config file path"),
    ({"a.yaml": "base: ''\n"}, r"a.yaml: base: expected a config file path"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "- 1\n"}, r"b.yaml: a config must be a mapping"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "x: [\n"}, r"b.yaml:"),  # the base's YAML error names the base
    ({f"c{i}.yaml": f"base: c{i + 1}.yaml\n" for i in range(12)} | {"c12.yaml": "epochs: 1\n"}, r"chains deeper than 8"),
])  # fmt: skip
def test_a_bad_base_is_one_line_naming_the_file(tmp_path, files, match):
    for name, text in files.items():
        _write(tmp_path, name, text)
    first = tmp_path / next(iter(files))
    with pytest.raises(ConfigError, match=match) as err:
        load_config(first)
    assert "\n" not in str(err.value)


def test_base_is_not_an_override():
    with pytest.raises(ConfigError, match="base is named inside a config file"):
        load_config(None, ["base=configs/fashion_mnist/standard.yaml"])


def test_a_chain_up_to_the_depth_limit_loads(tmp_path):
    from aal.config import MAX_BASE_DEPTH

    for i in range(MAX_BASE_DEPTH - 1):
        _write(tmp_path, f"c{i}.yaml", f"base: c{i + 1}.yaml\n")
    _write(tmp_path, f"c{MAX_BASE_DEPTH - 1}.yaml", "epochs: 5\n")
    assert load_config(tmp_path / "c0.yaml").epochs == 5


def test_the_task_comes_through_the_base(tmp_path):
    from aal.tasks.base import task_of_config

    _write(tmp_path, "plain.yaml", (REPO / "configs" / "fewshot" / "fashion_mnist_protonet.yaml").read_text())
    derived = _write(tmp_path, "derived.yaml", "base: plain.yaml\nepochs: 2\n")
    task = task_of_config(derived)
    assert task.name == "fewshot" and task.load_config(derived).epochs == 2


def test_a_run_folder_stores_the_resolved_config_without_base(tmp_path):
    import yaml

    cfg = load_config(REPO / "configs" / "fashion_mnist" / "aal_fgsm.yaml")
    dump_config(cfg, tmp_path / "config.yaml")
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "base" not in stored and stored["model"]["attention"] == "cbam_in" and stored["optim"]["lr"] == 0.05


SHIPPED_WITH_BASE = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "base:" in p.read_text())


def test_the_shipped_configs_use_bases():
    assert len(SHIPPED_WITH_BASE) >= 30  # every method config states its method over its folder's recipe


@pytest.mark.parametrize("path", SHIPPED_WITH_BASE, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_shipped_config_states_only_what_differs_from_its_base(path):
    """A key repeated with its base's value is a second copy of the recipe (the duplication bases remove)."""
    import yaml

    from aal.config import read_config_file

    own = yaml.safe_load(path.read_text())
    base = read_config_file(path.parent / own.pop("base"))
    own.pop("method", None)  # a method section is written whole: it is what the file is about
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            same = [k for k, v in value.items() if k in base[key] and base[key][k] == v]
            assert not same, f"{path.name}: {key}.{same} repeat the base"
        else:
            assert base.get(key, object()) != value, f"{path.name}: {key} repeats the base"


def test_the_config_module_examples_run():
    import doctest

    import aal.config

    result = doctest.testmod(aal.config, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


@pytest.mark.parametrize("path", ["configs/fashion_mnist/aal_pgd.yaml", "configs/fewshot/omniglot_protonet_aal.yaml"])
def test_print_config_shows_the_resolved_config_and_trains_nothing(path, tmp_path, capsys, monkeypatch):
    import yaml

    from aal.cli import main, task_of

    monkeypatch.chdir(REPO)
    assert main(["train", path, "epochs=2", f"out_dir={tmp_path}", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "base" not in yaml.safe_load(printed) and not any(tmp_path.iterdir())  # no run folder
    (tmp_path / "printed.yaml").write_text(printed)
    task = task_of(path)
    assert task_of(tmp_path / "printed.yaml") is task
    assert task.load_config(tmp_path / "printed.yaml") == task.load_config(path, ["epochs=2", f"out_dir={tmp_path}"])
