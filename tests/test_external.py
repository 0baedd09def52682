"""Evaluating any model (issue 14 item 2): ``aal eval --model PKG.MODULE:FACTORY`` and ``aal.benchmark``.

A throw-away package written by the test holds the factories; every error case must be one
clear line (CLI: ``aal: error: ...`` on stderr, exit 2 for arguments, 1 for files and data).
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import aal
from aal.cli import main
from aal.eval.external import ExternalModelError, benchmark, load_model
from conftest import FMNIST

pytestmark = pytest.mark.usefixtures("one_thread")

FACTORIES = '''
import torch
from torch import nn


def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def five_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))


def not_a_module():
    return 3


NOT_CALLABLE = 3
'''


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """``extmodels.nets`` importable for this test; returns (tmp_path, path of good weights)."""
    (tmp_path / "extmodels").mkdir()
    (tmp_path / "extmodels" / "__init__.py").write_text("")
    (tmp_path / "extmodels" / "nets.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("extmodels.nets:linear")
    with torch.no_grad():
        model[1].weight.mul_(3.0)  # weights that differ from the factory's, to see them loaded
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return tmp_path, weights


def test_load_model_and_weights(pkg):
    tmp, weights = pkg
    model = load_model("extmodels.nets:linear", weights)
    assert not model.training
    torch.testing.assert_close(model[1].weight, 3.0 * load_model("extmodels.nets:linear")[1].weight)


@pytest.mark.parametrize("spec,match", [
    ("extmodels.nets", "expected package.module:factory"),
    ("extmodels.nets:linear()", "expected package.module:factory"),
    ("extmodels.missing:linear", "cannot import 'extmodels.missing'"),
    ("extmodels.nets:nothing", "has no attribute 'nothing'"),
    ("extmodels.nets:NOT_CALLABLE", "not a callable"),
    ("extmodels.nets:not_a_module", "not a torch.nn.Module"),
])
def test_bad_factories_are_one_clear_error(pkg, spec, match):
    with pytest.raises(ExternalModelError, match=match) as info:
        load_model(spec)
    assert info.value.exit_code == 2


def test_weights_that_do_not_fit_name_the_tensor(pkg):
    tmp, weights = pkg
    state = load_model("extmodels.nets:linear").state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "1.bias"}, "'1.bias' is missing"),
        "extra": ({**state, "2.weight": torch.zeros(3)}, "'2.weight' is not in the model"),
        "shape": ({**state, "1.bias": torch.zeros(7)}, r"'1.bias' has shape \(7,\) in the file, \(10,\) in the model"),
    }
    for name, (sd, match) in cases.items():
        path = tmp / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        with pytest.raises(ExternalModelError, match=match) as info:
            load_model("extmodels.nets:linear", path)
        assert info.value.exit_code == 1
    (tmp / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ExternalModelError, match="not a readable safetensors"):
        load_model("extmodels.nets:linear", tmp / "junk.safetensors")
    with pytest.raises(ExternalModelError, match="no such file"):
        load_model("extmodels.nets:linear", tmp / "none.safetensors")


def test_benchmark_checks_outputs_and_inputs(pkg):
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    three_d = nn.Sequential(nn.Flatten(), nn.Linear(784, 5), nn.Unflatten(1, (5, 1)))
    with pytest.raises(ExternalModelError, match=r"outputs of shape \(2, 5, 1\) .* expected logits \(2, C\)"):
        benchmark(three_d, (x, y), eps=0.1)
    with pytest.raises(ExternalModelError, match=r"lie in \[0\.\d+, 255\], not \[0, 1\]"):
        benchmark(load_model("extmodels.nets:linear"), (x * 255, y), eps=0.1)
    with pytest.raises(ExternalModelError, match="NaN"):
        benchmark(load_model("extmodels.nets:linear"), (x.masked_fill(x > 0.99, float("nan")), y), eps=0.1)
    with pytest.raises(ExternalModelError, match="unknown dataset"):
        benchmark(load_model("extmodels.nets:linear"), "imagenet-21k", eps=0.1)
    with pytest.raises(ExternalModelError, match="threat"):
        benchmark(load_model("extmodels.nets:linear"), (x, y), threat="l1", eps=0.1)


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed")
def test_benchmark_by_dataset_name_writes_json(pkg):
    tmp, weights = pkg
    model = load_model("extmodels.nets:linear", weights)
    out = tmp / "res" / "eval.json"
    res = aal.benchmark(model, "fashion_mnist", threat="linf", eps=0.05, n=20, suite="fast", out=out)
    assert list(res.accuracy) == ["clean", "apgd_ce", "apgd_t", "robust"] and res.n == 20
    saved = json.loads(out.read_text())
    assert saved["accuracy"] == pytest.approx(res.to_dict()["accuracy"]) and saved["data"] == "fashion_mnist"
    # the wrong number of classes for the dataset is refused before any attack runs
    with pytest.raises(ExternalModelError, match=r"expected logits \(2, 10\)"):
        aal.benchmark(load_model("extmodels.nets:five_classes"), "fashion_mnist", eps=0.05, n=20, suite="fast")


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed")
def test_cli_eval_model(pkg, capsys):
    tmp, weights = pkg
    out = tmp / "cli.json"
    rc = main(["eval", "--model", "extmodels.nets:linear", "--weights", str(weights), "--data", "fashion_mnist",
               "--eps", "1/20", "--n", "20", "--suite", "fast", "--json", "--out", str(out), "--no-malloc-tune"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["suite"] == "fast" and printed["n"] == 20 and printed["eps"] == pytest.approx(0.05)
    assert json.loads(out.read_text())["accuracy"] == printed["accuracy"]
    direct = aal.benchmark(load_model("extmodels.nets:linear", weights), "fashion_mnist", eps=0.05, n=20, suite="fast")
    assert printed["accuracy"] == pytest.approx(direct.to_dict()["accuracy"])
    cases = [
        (["--model", "extmodels.missing:linear", "--data", "fashion_mnist", "--eps", "0.1"], 2, "cannot import"),
        (["--model", "extmodels.nets:linear", "--weights", str(tmp / "none.safetensors"), "--data", "fashion_mnist",
          "--eps", "0.1"], 1, "no such file"),
        (["--model", "extmodels.nets:five_classes", "--data", "fashion_mnist", "--eps", "0.1", "--n", "4"], 2,
         "expected logits"),
        (["--model", "extmodels.nets:linear", "--eps", "0.1"], 2, "needs --data"),
        (["--model", "extmodels.nets:linear", "--data", "fashion_mnist", "--eps", "0.1", "--attacks", "pgd20"], 2,
         "--suite"),
        (["--data", "fashion_mnist"], 2, "needs a run folder"),
    ]
    for argv, code, match in cases:
        assert main(["eval", *argv, "--no-malloc-tune"]) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("aal: error:") and match in err[0], (argv, err)
