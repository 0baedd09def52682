"""Per-class analytics on hand-built cases; `aal report`, `aal check` and `aal eval --suite` on two
tiny runs made with `aal train` (in-process, to keep the file fast; test_cli.py covers the
subprocess path)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from aal.cli import main
from aal.eval.analytics import (
    class_report,
    confusion_matrix,
    hardest_pairs,
    per_class_accuracy,
    predict_under_attack,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- analytics
def test_confusion_and_hardest_pairs_hand_built():
    # 4 classes; under attack: 0 <-> 1 confused 3 + 2 times, 2 -> 3 four times, 3 -> 2 never
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3])
    adv = torch.tensor([1, 1, 1, 0, 0, 0, 1, 3, 3, 3, 3, 2, 3, 3])
    c = confusion_matrix(y, adv, 4)
    assert c.tolist() == [[1, 3, 0, 0], [2, 1, 0, 0], [0, 0, 1, 4], [0, 0, 0, 2]]
    assert int(c.sum()) == len(y)
    pairs = hardest_pairs(c, k=5, class_names=["a", "b", "c", "d"])
    assert [(p["a"], p["b"], p["count"], p["a_to_b"], p["b_to_a"]) for p in pairs] == [(0, 1, 5, 3, 2), (2, 3, 4, 4, 0)]
    assert pairs[0]["rate"] == pytest.approx(5 / 7) and pairs[1]["a_name"] == "c" and pairs[1]["b_name"] == "d"
    top = hardest_pairs(c, k=1)
    assert len(top) == 1 and (top[0]["a"], top[0]["b"], top[0]["count"]) == (0, 1, 5) and "a_name" not in top[0]
    assert hardest_pairs(torch.eye(3, dtype=torch.long)) == []  # nothing confused: no pairs
    acc = per_class_accuracy(adv == y, y, 5)  # class 4 absent: NaN
    assert acc[:4].tolist() == pytest.approx([0.25, 1 / 3, 0.2, 1.0]) and math.isnan(acc[4].item())
    rep = class_report(y, y, adv, 5, k=2)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["clean"] == [1.0, 1.0, 1.0, 1.0, None] and d["robust"][4] is None
    assert d["support"] == [4, 3, 5, 2, 0] and d["confusion"][0] == [1, 3, 0, 0, 0]
    assert [p["count"] for p in d["hardest_pairs"]] == [5, 4]
    with pytest.raises(ValueError):
        confusion_matrix(y, adv, 3)  # label 3 out of range
    with pytest.raises(ValueError):
        per_class_accuracy(torch.ones(3, dtype=torch.bool), y, 4)


def test_predict_under_attack_attacks_only_correct_points():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(12, 1, 2, 2)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 3
    seen = []

    def attack(m, xb, yb):
        seen.append(len(xb))
        return torch.zeros_like(xb)  # one image for all: one prediction

    labels, clean, adv = predict_under_attack(model, (x, y), attack, batch_size=5)
    assert sum(seen) == 8 and torch.equal(labels, y)
    assert torch.equal(adv[:4], clean[:4])  # wrong points keep their clean prediction
    with torch.no_grad():
        zero_pred = model(torch.zeros(1, 1, 2, 2)).argmax(1).item()
    assert bool((adv[4:] == zero_pred).all())
    _, c2, a2 = predict_under_attack(model, (x, y), None)
    assert torch.equal(c2, a2)


# ----------------------------------------------------------------------------- CLI on tiny runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not FMNIST.exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("runs")
    tiny = ["epochs=1", "data.train_n=256", "eval.n=100", "eval.epoch_n=0", "eval.attacks=clean,fgsm,pgd10",
            "progress=false", f"out_dir={out}"]
    assert main(["train", "configs/fashion_mnist/standard.yaml", *tiny, "name=a", "--no-malloc-tune"]) == 0
    assert main(["train", "configs/fashion_mnist/pgd_at.yaml", *tiny, "method.steps=2", "name=b", "--no-malloc-tune"]) == 0
    return out / "a", out / "b"


@needs_fmnist
def test_report_writes_markdown_json_and_plots(runs, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "rep"
    assert main(["report", str(a), str(b), "--out", str(out), "--n", "60", "--quiet", "--no-malloc-tune"]) == 0
    assert f"wrote {out / 'report.md'}" in capsys.readouterr().out
    for f in ("report.md", "report.json", "acc_vs_eps.png", "acc_vs_steps.png", "per_class_robust.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
        if f.endswith(".png"):
            assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["a", "b"]
    for r, path in zip(data["runs"], (a, b)):
        comp = r["computed"]
        assert comp["n"] == 60 and comp["eps"] == pytest.approx(0.1)
        assert r["results"] == json.loads((path / "results.json").read_text())  # the run's own numbers, as they are
        eps_acc = comp["eps_curve"]["accuracy"]
        assert comp["eps_curve"]["eps"][0] == 0.0 and eps_acc[0] == pytest.approx(comp["clean"])
        assert eps_acc[-1] <= eps_acc[0]
        steps = comp["steps_curve"]
        assert steps["steps"] == [1, 2, 5, 10, 20, 50] and steps["accuracy"][steps["steps"].index(20)] == pytest.approx(comp["robust"])
        pc = comp["per_class"]
        assert pc["num_classes"] == 10 and len(pc["confusion"]) == 10 and sum(map(sum, pc["confusion"])) == 60
        assert pc["class_names"][0] == "T-shirt/top"
        # per-class accuracies average back to the overall ones (weighted by support)
        sup = pc["support"]
        rob = sum(s * (v or 0.0) for s, v in zip(sup, pc["robust"])) / sum(sup)
        assert rob == pytest.approx(comp["robust"])
    md = (out / "report.md").read_text()
    assert "| a | standard |" in md and "| b | pgd_at |" in md
    assert "![accuracy vs eps](acc_vs_eps.png)" in md and "Hardest class pairs" in md
    res_a = json.loads((a / "results.json").read_text())["eval"]["accuracy"]
    assert f"{100 * res_a['pgd10']:.2f}" in md  # the run's own PGD-10 from results.json
    # a missing run folder: one error line, exit 1, before any work
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1
    assert "aal: error:" in capsys.readouterr().err and not (tmp_path / "x").exists()


@needs_fmnist
def test_cli_check(runs, capsys, monkeypatch):
    a, _ = runs
    rc = main(["check", str(a), "--n", "30", "--square-queries", "20", "--json", "--no-malloc-tune"])
    out = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in out["checks"]][:3] == ["deterministic", "logits", "gradients"]
    assert out["n"] == 30 and out["eps"] == pytest.approx(0.1)
    assert rc == (1 if out["status"] == "fail" else 0)
    assert main(["check", str(a), "--n", "20", "--only", "logits,gradients", "--no-malloc-tune"]) == 0
    text = capsys.readouterr().out
    assert "PASS  logits" in text and "gradients" in text and "eps_growth" not in text
    # any FAIL -> exit 1, after printing the whole table
    import aal.eval.checks as checks
    from aal.eval.checks import CheckReport, CheckResult

    def planted(*args, **kwargs):
        return CheckReport([CheckResult("gradients", "fail", "planted"), CheckResult("logits", "warn", "w")], 1, 0.1, "linf", 0.01, 0.0)

    monkeypatch.setattr(checks, "run_checks", planted)
    assert main(["check", str(a), "--n", "20", "--no-malloc-tune"]) == 1
    assert "FAIL  gradients" in capsys.readouterr().out
    # bad arguments: exit 2, one line
    for bad in (["--n", "0"], ["--only", "nope"], ["--eps", "-1"], ["--eps", "abc"], ["--square-queries", "0"]):
        assert main(["check", str(a), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("aal: error:"), err


@needs_fmnist
def test_cli_eval_suite_fast_and_resume(runs, capsys, tmp_path):
    from aal.attacks import ATTACKS

    a, _ = runs
    args = ["eval", str(a), "--suite", "fast", "--n", "20", "--eps", "0.05", "--json", "--no-malloc-tune"]
    if "apgd_ce" not in ATTACKS or "apgd_t" not in ATTACKS:
        assert main(args) == 2
        assert "not registered" in capsys.readouterr().err
        pytest.skip("apgd_ce / apgd_t not registered yet")
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["suite"] == "fast" and list(out["accuracy"]) == ["clean", "apgd_ce", "apgd_t", "robust"]
    assert out["n"] == 20 and out["eps"] == pytest.approx(0.05) and out["cumulative"]
    state = Path(out["state"])
    assert state.parent == a / "eval" and json.loads(state.read_text())["finished"]
    # a rerun resumes from the state file: nothing is attacked again, the numbers are the same
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["accuracy"] == out["accuracy"] and any("resumed" in n for n in again["notes"])
    # table output, explicit state path, --fresh
    st = tmp_path / "s.json"
    assert main(["eval", str(a), "--suite", "fast", "--n", "10", "--state", str(st), "--no-malloc-tune"]) == 0
    text = capsys.readouterr().out
    assert "apgd_t" in text and "robust" in text and st.is_file()
    # the state file of another evaluation is refused with one line (exit 2) unless --fresh
    bad = ["eval", str(a), "--suite", "fast", "--n", "10", "--eps", "0.2", "--state", str(st), "--no-malloc-tune"]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another evaluation" in err[0]
    assert main([*bad, "--fresh"]) == 0
    capsys.readouterr()
    # --suite full: the standard suite, then the checks; JSON holds both
    rc = main(["eval", str(a), "--suite", "full", "--n", "10", "--check-n", "20", "--square-queries", "20", "--json",
               "--no-malloc-tune"])
    full = json.loads(capsys.readouterr().out)
    assert list(full["suite"]["accuracy"]) == ["clean", "apgd_ce", "apgd_t", "fab_t", "square", "robust"]
    assert full["suite"]["label"] == "AutoAttack (standard)"
    assert full["checks"]["n"] == 10  # --check-n is capped by --n
    assert len(full["checks"]["checks"]) == 8
    assert rc == (1 if full["checks"]["status"] == "fail" else 0)
    # the report picks up finished suite results from RUN/eval/
    from aal.eval.report import _suite_results

    found = _suite_results(a)
    assert any(s["suite"] == "fast" and s["n"] == 20 for s in found)


@needs_fmnist
def test_cli_eval_bad_args(runs, capsys):
    a, _ = runs
    for bad in (["--suite", "fast", "--attacks", "clean"], ["--suite", "fast", "--n", "0"], ["--suite", "full", "--only", "zz"],
                ["--attacks", "clean", "--norm", "l2"]):
        assert main(["eval", str(a), *bad]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("aal: error:"), err
    with pytest.raises(SystemExit) as e:
        main(["eval", str(a), "--suite", "zzz"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["report", str(a)])  # --out is required
    assert e.value.code == 2
    capsys.readouterr()
    # the default path (no --suite) still works as before
    assert main(["eval", str(a), "--attacks", "clean", "--n", "10", "--json", "--no-malloc-tune"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 10


def test_report_labels_suite_results_old_and_new(tmp_path):
    """Suite results in RUN/eval/ carry their label; a finished state file written before results
    had one (and before FAB-T ran in the standard suite) is not passed off as AutoAttack's."""
    from aal.eval.report import _suite_results

    (tmp_path / "eval").mkdir()
    acc_old = {"clean": 0.9, "apgd_ce": 0.5, "apgd_t": 0.4, "square": 0.4, "robust": 0.4}
    acc_new = {"clean": 0.9, "apgd_ce": 0.5, "apgd_t": 0.4, "fab_t": 0.4, "square": 0.4, "robust": 0.4}
    states = {
        "suite-old.json": ({"suite": "standard"}, {"accuracy": acc_old}),
        "suite-new.json": ({"suite": "standard"}, {"accuracy": acc_new, "label": "AutoAttack (standard)"}),
        "suite-fast.json": ({"suite": "fast"}, {"accuracy": {"clean": 0.9, "robust": 0.5}}),
    }
    for name, (fp, result) in states.items():
        (tmp_path / "eval" / name).write_text(json.dumps({"finished": True, "fingerprint": fp, "result": result}))
    labels = {r["file"]: r["label"] for r in _suite_results(tmp_path)}
    assert labels == {"suite-old.json": "standard suite without FAB-T (older aal)",
                      "suite-new.json": "AutoAttack (standard)", "suite-fast.json": "fast suite"}
