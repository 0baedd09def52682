"""The README's main job (issue 14 item 4): one ``aal train`` trains, runs the standard suite on a
stated number of test images and leaves the report with its plots (and, for AAL, the attention
figure) in the run folder, printing where it is.

The real main config runs with a tiny override (1 epoch on 256 images, suite on 20 test images,
report on 40) through the command line in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from aal.cli import main
from aal.config import SUITE_NAMES, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
MAIN = "configs/fashion_mnist/main.yaml"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

TINY = ["epochs=1", "data.train_n=256", "data.batch_size=64", "eval.n=40", "eval.epoch_n=0", "eval.attacks=clean",
        "eval.suite_n=20", "eval.report_n=40", "progress=false", "threads=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """``(run folder, stdout)`` of the main config under the tiny override."""
    out = tmp_path_factory.mktemp("main")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["train", MAIN, *TINY, f"out_dir={out}", "name=run", "--no-malloc-tune"]) == 0
    return out / "run", buf.getvalue()


def test_readme_main_command_is_the_main_config():
    readme = (REPO / "README.md").read_text()
    assert f"bash scripts/install.sh && aal train {MAIN}" in readme
    cfg = load_config(REPO / MAIN)
    assert cfg.eval.suite == "standard" and cfg.eval.report and cfg.data.name == "fashion_mnist"
    assert cfg.method.name.startswith("aal") and cfg.model.attention != "none"  # so the report has the attention figure
    # the README states the number of suite images the config uses
    assert re.search(rf"standard suite[^.]*first {cfg.eval.suite_n} test images", readme)


@needs_fmnist
def test_main_job_leaves_suite_report_plots_and_attention_figure(main_run):
    run, out = main_run
    m = re.search(r"^report: (\S+)", out, re.M)
    assert m, out[-2000:]
    report = Path(m.group(1))
    assert report == run / "report" / "report.md" and report.is_file()
    files = {p.name for p in report.parent.iterdir()}
    plots = {"acc_vs_eps.png", "acc_vs_steps.png", "per_class_robust.png", "attention_run.png"}
    assert plots <= files and "report.json" in files
    text = report.read_text()
    for png in plots:
        assert f"]({png})" in text, png  # every plot is shown in the report
        assert (report.parent / png).stat().st_size > 1000
    # the suite ran on the stated number of test images, into the state file `aal eval --suite` uses
    state = json.loads((run / "eval" / "suite-standard-linf-eps0.1-n20-seed0.json").read_text())
    assert state["finished"] and state["fingerprint"]["n"] == 20
    assert list(state["result"]["accuracy"]) == ["clean", "apgd_ce", "apgd_t", "fab_t", "square", "robust"]
    assert "AutoAttack (standard)" in out and "| AutoAttack (standard) |" in text
    assert f"{100 * state['result']['accuracy']['robust']:.2f} (n=20, eps=0.1)" in text
    payload = json.loads((report.parent / "report.json").read_text())
    assert payload["settings"]["n"] == 40 and payload["runs"][0]["computed"]["n"] == 40


@needs_fmnist
def test_eval_suite_reuses_the_main_jobs_state(main_run, capsys):
    run, _ = main_run
    state = run / "eval" / "suite-standard-linf-eps0.1-n20-seed0.json"
    before = state.read_text()
    assert main(["eval", str(run), "--suite", "standard", "--n", "20", "--no-malloc-tune"]) == 0
    out = capsys.readouterr().out
    assert f"state: {state}" in out and state.read_text() == before  # finished: nothing recomputed


@needs_fmnist
def test_suite_and_report_are_off_by_default(tmp_path, capsys):
    assert main(["train", "configs/fashion_mnist/standard.yaml", *TINY, f"out_dir={tmp_path}", "name=run",
                 "--no-malloc-tune"]) == 0
    out = capsys.readouterr().out
    assert "report:" not in out and not (tmp_path / "run" / "report").exists() and not (tmp_path / "run" / "eval").exists()


def test_suite_names_are_the_suites_and_bad_values_are_refused():
    from aal.eval.suite import SUITES

    assert set(SUITE_NAMES) == {"none", *SUITES}
    for override, key in (("eval.suite=autoattack", "eval.suite"), ("eval.suite_n=0", "eval.suite_n"),
                          ("eval.report_n=0", "eval.report_n"), ("eval.report=maybe", "eval.report")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(REPO / MAIN, [override])
