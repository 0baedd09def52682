"""The AAL study's rules: the degeneracy rule, paired tests, and run keys that follow the resolved config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
aal_study = pytest.importorskip("aal_study")


@pytest.fixture(autouse=True)
def _no_carried_runs_of_this_checkout(tmp_path_factory, monkeypatch):
    """``train`` and ``suite`` restore the runs carried by earlier sessions: never this checkout's into the real cache."""
    monkeypatch.setattr(aal_study, "CARRY", tmp_path_factory.mktemp("carry"))
    monkeypatch.setattr(aal_study, "OUT", tmp_path_factory.mktemp("out"))


def _rec(arm, k=0.3, std=0.2):
    return {"arm": arm, "last_epoch": {"mask_mean": k, "mask_std": std}}


def test_degeneracy_rule():
    assert aal_study.degenerate(_rec("aal_fgsm")) is None
    assert "map degenerate" in aal_study.degenerate(_rec("aal_fgsm", k=0.97, std=0.02))  # saturated map
    assert "map degenerate" in aal_study.degenerate(_rec("aal_fgsm", k=0.4, std=0.01))  # flat within images
    assert "map degenerate" in aal_study.degenerate(_rec("aal_fgsm", k=0.1, std=0.2))  # almost no budget
    assert aal_study.degenerate(_rec("fgsm_at", k=0.97, std=0.0)) is None  # not an AAL arm
    assert aal_study.degenerate({"arm": "fgsm_at", "last_epoch": {}}) is None


def test_paired_tests():
    assert aal_study.paired_t([1.0]) is None
    assert aal_study.paired_t([1.0, 1.1, 0.9]) < 0.01
    assert aal_study.paired_t([1.0, -1.0, 0.5, -0.5]) > 0.5
    a = np.array([True] * 60 + [False] * 40)
    assert aal_study.mcnemar(a, a) == 1.0
    b = a.copy()
    b[:30] = False  # 30 discordant pairs, all one way
    assert aal_study.mcnemar(a, b) < 1e-6


def test_run_key_follows_the_resolved_config():
    over = aal_study.overrides_for("fashion_mnist", "aal_fgsm", 0)
    a = aal_study.run_dir_for("fashion_mnist", "aal_fgsm", 0, over)
    assert a == aal_study.run_dir_for("fashion_mnist", "aal_fgsm", 0, list(over))
    assert a != aal_study.run_dir_for("fashion_mnist", "aal_fgsm", 0, over + ["method.xi2=0.05"])
    cfg = aal_study.config_for("fashion_mnist", "aal_fgsm_anti", aal_study.overrides_for("fashion_mnist", "aal_fgsm_anti", 0))
    assert cfg.method.params["mask_control"] == "anti" and cfg.model.attention == "cbam_in" and cfg.eval.n is None


def test_flat_controls_are_not_flagged():
    assert aal_study.degenerate(_rec("aal_fgsm_uniform", k=0.38, std=0.0)) is None  # flat by design
    assert "map degenerate" in aal_study.degenerate(_rec("aal_fgsm_shuffle", k=0.38, std=0.0))


def test_plot_draws_every_run(tmp_path):
    """The report's figure: one per dataset, written where asked, drawn from runs with and without map diagnostics."""
    pytest.importorskip("matplotlib")

    def run(arm, seed, diag=True):
        per_epoch = {"mask_mean": [0.3, 0.28], "mask_std": [0.2, 0.19]} if diag else {}
        return {"arm": arm, "seed": seed, "epochs": 2, "per_epoch": per_epoch,
                "epoch_eval": [{"test_clean": 0.6, "test_pgd10": 0.3}, {"test_clean": 0.7, "test_pgd10": 0.35}],
                "accuracy": {"clean": 0.7 + seed / 100, "pgd20": 0.3}}

    recs = {("fgsm_at", 0): run("fgsm_at", 0, diag=False), ("aal_fgsm", 0): run("aal_fgsm", 0),
            ("aal_fgsm", 1): run("aal_fgsm", 1)}
    out = aal_study.plot("fashion_mnist", recs, out_dir=tmp_path)
    assert out == tmp_path / "aal_study_fashion_mnist.png" and out.stat().st_size > 10_000


def test_published_run_found_by_content_not_by_folder_hash(tmp_path, monkeypatch):
    """A published run is reused when its stored config is today's config, even if the schema has gained
    keys since (its folder hash is then stale) or the data lives elsewhere; a changed setting is not reused."""
    import yaml

    monkeypatch.setattr(aal_study, "RECORDS", tmp_path)
    over = aal_study.overrides_for("fashion_mnist", "aal_fgsm", 0)
    cfg = aal_study.config_for("fashion_mnist", "aal_fgsm", over).to_dict()
    cfg["eval"].pop("report_n", None)  # as written before the key existed
    cfg["data"]["root"] = "/somewhere/else"
    run = tmp_path / "fashion_mnist" / "aal_fgsm-s0-00000000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "study.json").write_text("{}")
    assert aal_study.finished_record("fashion_mnist", "aal_fgsm", 0, over) == run
    assert aal_study.finished_record("fashion_mnist", "aal_fgsm", 0, [*over, "method.xi2=0.2"]) is None
    assert aal_study.finished_record("fashion_mnist", "aal_fgsm", 1, aal_study.overrides_for("fashion_mnist", "aal_fgsm", 1)) is None


def test_a_run_trained_under_another_config_is_left_out_and_named(tmp_path, monkeypatch):
    """A published run whose stored config is no longer its arm's (a config file changed while it
    trained, e.g. bf16 + compile where the arm pins fp32 eager) is not pooled with that arm: collect()
    leaves it out and says how it differs; the run that matches stays."""
    import yaml

    monkeypatch.setattr(aal_study, "RECORDS", tmp_path)
    monkeypatch.setattr(aal_study, "OUT", tmp_path / "out")
    monkeypatch.setattr(aal_study, "load_record", lambda d, a, s, run_dir=None: {"arm": a, "seed": s})
    for seed, precision in ((0, "bf16"), (1, "fp32")):
        cfg = aal_study.config_for("fashion_mnist", "fgsm_at", aal_study.overrides_for("fashion_mnist", "fgsm_at", seed))
        cfg = cfg.to_dict()
        cfg["precision"] = precision
        run = tmp_path / "fashion_mnist" / f"fgsm_at-s{seed}-0000000{seed}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run / "study.json").write_text('{"dataset": "fashion_mnist", "arm": "fgsm_at", "seed": %d}' % seed)
    excluded = []
    recs = aal_study.collect(excluded)
    assert set(recs["fashion_mnist"]) == {("fgsm_at", 1)}
    assert excluded == [("fashion_mnist", "fgsm_at", 0, "precision bf16 (the arm's: fp32)")]


def test_the_current_record_is_the_run_of_todays_config_not_the_last_folder(tmp_path, monkeypatch):
    """Two published runs of one arm and seed (one trained under an older config, left out of the
    report): the matched eps, a pipeline's input run and the suite phase read the one trained under
    the arm's config today, even when the other's folder sorts last."""
    import json

    import yaml

    monkeypatch.setattr(aal_study, "RECORDS", tmp_path)
    monkeypatch.setattr(aal_study, "OUT", tmp_path / "out")
    over = aal_study.overrides_for("fashion_mnist", "aal_fgsm", 0)
    for folder, precision, k in (("aal_fgsm-s0-00000000", "fp32", 0.25), ("aal_fgsm-s0-ffffffff", "bf16", 0.75)):
        cfg = aal_study.config_for("fashion_mnist", "aal_fgsm", over).to_dict()
        cfg["precision"] = precision
        run = tmp_path / "fashion_mnist" / folder
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run / "study.json").write_text("{}")
        (run / "results.json").write_text(json.dumps({"eval": {"accuracy": {"clean": 0.9}, "n": 10}}))
        (run / "metrics.jsonl").write_text(json.dumps({"logs": {"mask_mean": k, "mask_std": 0.2}}) + "\n")
    rec = aal_study.current_record("fashion_mnist", "aal_fgsm", 0)
    assert rec["run_dir"].endswith("aal_fgsm-s0-00000000") and rec["last_epoch"]["mask_mean"] == 0.25
    matched = aal_study.overrides_for("fashion_mnist", "fgsm_at_matched", 0)
    assert "method.eps=0.025000" in matched  # eps 0.1 x the fp32 run's mean k, not the bf16 run's
    assert aal_study.current_record("fashion_mnist", "aal_fgsm", 1) is None


def test_comparisons_cover_the_suite_column_where_both_runs_have_it(tmp_path):
    """The suite column is compared on the seeds where both arms ran it (same first n images): McNemar on
    the per-image suite outcomes with one such seed; seeds without a suite leave it out."""
    rng = np.random.default_rng(0)

    def run(arm, seed, clean, robust, suite_robust=None):
        d = tmp_path / f"{arm}-s{seed}"
        d.mkdir()
        np.savez(d / "correct.npz", clean=rng.random(400) < clean, pgd20=rng.random(400) < robust)
        suite = None
        if suite_robust is not None:
            outcome = np.zeros(200, dtype=bool)
            outcome[: int(200 * suite_robust)] = True
            np.savez(d / "suite_correct.npz", robust=outcome)
            suite = {"n": 200, "accuracy": {"robust": float(outcome.mean())}}
        return {"arm": arm, "seed": seed, "run_dir": str(d), "accuracy": {"clean": clean, "pgd20": robust}, "suite": suite}

    recs = {("fgsm_at", 0): run("fgsm_at", 0, 0.6, 0.35), ("aal_fgsm", 0): run("aal_fgsm", 0, 0.75, 0.15),
            ("fgsm_at", 1): run("fgsm_at", 1, 0.61, 0.34, 0.30), ("aal_fgsm", 1): run("aal_fgsm", 1, 0.76, 0.16, 0.10)}
    c = aal_study.compare("cifar10", "aal_fgsm", "fgsm_at", recs)
    assert c["seeds"] == [0, 1] and c["suite"]["seeds"] == [1] and c["suite"]["n"] == 200
    assert c["suite"]["mean_diff"] == pytest.approx(-20.0) and c["suite"]["p_mcnemar"] < 1e-6
    text = aal_study.verdict(c)
    assert "suite -20.00 pt (McNemar, 1 seed, first 200 images, seeds [1]" in text and "paired t over 2 seeds" in text
    recs[("aal_fgsm", 1)]["suite"] = None  # no suite on one side: no suite comparison at all
    assert "suite" not in aal_study.compare("cifar10", "aal_fgsm", "fgsm_at", recs)


def test_then_suite_runs_each_suite_right_after_its_run(monkeypatch):
    """``train --then-suite``: the suite of each run follows it in the same process (its checkpoint is only
    on the machine that trained it); without the flag no suite runs."""
    calls = []
    acc = {"accuracy": {"clean": 0.5, "pgd20": 0.2}, "last_epoch": {}}
    monkeypatch.setattr(aal_study, "train_one", lambda d, a, s, checkpoint=False, supersede_unrecoverable=False:
                        calls.append(("train", a, s) + (("supersede",) if supersede_unrecoverable else ())) or acc)
    monkeypatch.setattr(aal_study, "suite_one", lambda d, a, s, n, **kw: calls.append(("suite", a, s, n, kw)))
    monkeypatch.setattr(aal_study, "suite_missing", lambda d, a, s: True)
    aal_study.main(["train", "--dataset", "fashion_mnist", "--arms", "fgsm_at,aal_fgsm", "--seeds", "1",
                    "--then-suite", "--suite-n", "300", "--suite-threads", "2"])
    kw = {"threads": 2, "batch_size": 256}
    assert calls == [("train", "fgsm_at", 1), ("suite", "fgsm_at", 1, 300, kw), ("train", "aal_fgsm", 1),
                     ("suite", "aal_fgsm", 1, 300, kw)]
    calls.clear()
    aal_study.main(["train", "--dataset", "fashion_mnist", "--arms", "fgsm_at", "--seeds", "0"])
    assert calls == [("train", "fgsm_at", 0)]
    calls.clear()
    aal_study.main(["train", "--dataset", "fashion_mnist", "--arms", "fgsm_at", "--seeds", "0", "--supersede-unrecoverable"])
    assert calls == [("train", "fgsm_at", 0, "supersede")]


def test_a_run_claimed_by_another_process_is_skipped_not_trained_twice(tmp_path, monkeypatch, capsys):
    """Two processes given the same list share it: the one that finds a run claimed goes on with the
    next; a claim is an flock (two open file descriptions conflict even within one process)."""
    import types

    import aal.engine.run

    monkeypatch.setattr(aal_study, "OUT", tmp_path / "out")
    monkeypatch.setattr(aal_study, "RECORDS", tmp_path / "records")
    trained = []

    def fake_train_run(cfg, resume=None, log=None):
        trained.append(cfg.name)
        (Path(cfg.out_dir) / cfg.name).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / cfg.name / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        return None, types.SimpleNamespace(correct={})

    monkeypatch.setattr(aal.engine.run, "train_run", fake_train_run)
    monkeypatch.setattr(aal_study, "load_record", lambda d, a, s, run_dir=None: {
        "accuracy": {"clean": 0.5, "pgd20": 0.2}, "last_epoch": {}})
    held = aal_study.run_dir_for("fashion_mnist", "fgsm_at", 1, aal_study.overrides_for("fashion_mnist", "fgsm_at", 1))
    with aal_study.claimed(held):
        with pytest.raises(aal_study.Claimed, match="claimed by another process"), aal_study.claimed(held):
            pass
        aal_study.main(["train", "--dataset", "fashion_mnist", "--arms", "fgsm_at,aal_fgsm", "--seeds", "1"])
    assert [n.split("-")[0] for n in trained] == ["aal_fgsm"]
    assert f"{held.name}: claimed by another process; skipped" in capsys.readouterr().out
    aal_study.main(["train", "--dataset", "fashion_mnist", "--arms", "fgsm_at,aal_fgsm", "--seeds", "1"])
    assert [n.split("-")[0] for n in trained] == ["aal_fgsm", "fgsm_at"]  # released: trained; aal_fgsm reused
    queue = tmp_path / "queue.lock"  # --lock: the same flock, blocking (a queue for one core)
    with aal_study._held(str(queue)), pytest.raises(BlockingIOError), aal_study._flocked(queue, blocking=False):
        pass


def test_report_covers_the_aal_arms_of_every_dataset_and_no_ranked_method():
    """PGD-AT, AAL+PGD and AAL+PGD's controls trained in the ranking study's bf16 setting get their own
    section of the AAL report; TRADES (a ranked method only) does not, and no dataset without an AAL arm."""
    recs = {"fashion_mnist": {("aal_fgsm", 0): {}},
            "fashion_mnist_rank": {("pgd_at", 0): {}, ("aal_pgd_anti", 0): {}, ("trades", 0): {}, ("atop", 0): {}},
            "cifar10": {("standard", 0): {}}}
    kept = aal_study.reported(recs)
    assert set(kept) == {"fashion_mnist", "fashion_mnist_rank"}
    assert set(kept["fashion_mnist_rank"]) == {("pgd_at", 0), ("aal_pgd_anti", 0)}


def test_verdict_prints_an_underflowed_p_as_a_bound():
    c = {"seeds": [0], "pgd20": {"mean_diff": -15.9, "std": None, "p_paired_t": None, "p_mcnemar": 0.0}}
    assert "McNemar, 1 seed p < 1e-300: the two models differ" in aal_study.verdict(c)


def test_readme_study_table_is_the_one_generated_from_the_committed_report():
    """The README's table is rendered from aal_study.json, never copied by hand: a hand edit, or a
    report regenerated without updating the README, fails here."""
    import json

    root = Path(__file__).resolve().parents[1]
    doc = json.loads((root / "benchmarks" / "results" / "aal_study.json").read_text())
    assert aal_study.readme_block(doc) in (root / "README.md").read_text()


def test_readme_table_names_seeds_left_out_runs_and_degenerate_maps(tmp_path):
    run = {"source": "cifar10", "suite": None, "accuracy": {"clean": 0.5, "pgd20": 0.25}, "train_seconds": None}
    doc = {"cifar10": {"runs": [
        {**run, "arm": "aal_fgsm", "seed": s, "last_epoch": {"mask_mean": 0.3, "mask_std": 0.2}} for s in (1, 2, 3)
    ] + [
        {**run, "arm": "aal_fgsm_bn", "seed": 0, "last_epoch": {"mask_mean": 0.3, "mask_std": 0.01},
         "suite": {"n": 1000, "accuracy": {"robust": 0.125}}},
    ], "excluded": [{"arm": "aal_fgsm", "seed": 0, "differs": "x"}], "comparisons": [
        {"arm": "aal_fgsm_uniform", "ref": "aal_fgsm", "seeds": [1, 2, 3],
         "clean": {"mean_diff": -0.31, "p_paired_t": 0.34}, "pgd20": {"mean_diff": 3.12, "p_paired_t": 0.001},
         "suite": {"mean_diff": 2.7, "p_paired_t": 0.02, "seeds": [1, 2]}},
        {"arm": "aal_fgsm_fd", "ref": "aal_fgsm", "seeds": [0], "clean": {}, "pgd20": {}},  # one seed: report only
    ]}}
    comps = aal_study.readme_comparisons(doc).splitlines()[2:]
    assert comps == ["| cifar10 | `aal_fgsm_uniform` vs `aal_fgsm` | 1-3 | -0.31 (p 0.34) n.d. | +3.12 (p 0.001) | "
                     "+2.70 (p 0.02; seeds 1, 2) |"]
    table = aal_study.readme_table(doc)
    rows = table.splitlines()[2:]
    assert len(rows) == 2
    assert "| `aal_fgsm`: AAL+FGSM (paper defaults) | 1-3; left out: a seed-0 run under another config | 50.00 ± 0.00 | 25.00 ± 0.00 | - | 0.30 | 0.20 |" in rows[0]
    assert rows[1].endswith("| 0 | 50.00 | 25.00 | 12.50 (1000; 0) | 0.30 | 0.01 (degenerate) |")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{aal_study.README_BEGIN}\nold table\n{aal_study.README_END}\nafter\n")
    assert aal_study.update_readme(doc, readme)
    assert readme.read_text() == f"intro\n{aal_study.readme_block(doc)}\nafter\n"
    (tmp_path / "other.md").write_text("no markers")
    assert not aal_study.update_readme(doc, tmp_path / "other.md")


def test_paired_verdicts_hold_together_after_holm_over_the_datasets_tests():
    """Three paired tests at raw p 0.01, 0.03 and 0.04: only the first survives Holm (0.03, 0.06, 0.06),
    so only it is a difference; one-seed (McNemar) tests are models, outside the family."""
    col = lambda p: {"mean_diff": 2.0, "std": 1.0, "p_paired_t": p}  # noqa: E731
    comps = [{"arm": "a", "ref": "r", "seeds": [0, 1, 2], "clean": col(0.01), "pgd20": col(0.03)},
             {"arm": "b", "ref": "r", "seeds": [0, 1, 2], "clean": col(0.04),
              "pgd20": {"mean_diff": 5.0, "std": None, "p_paired_t": None, "p_mcnemar": 1e-9}}]
    aal_study.adjust(comps)
    assert [comps[0]["clean"]["p_holm"], comps[0]["pgd20"]["p_holm"], comps[1]["clean"]["p_holm"]] == \
        pytest.approx([0.03, 0.06, 0.06])
    assert "p_holm" not in comps[1]["pgd20"]
    assert aal_study._diff_cell(comps[0]["clean"]) == "+2.00 (p 0.01, Holm 0.03)"
    assert aal_study._diff_cell(comps[0]["pgd20"]) == "+2.00 (p 0.03, Holm 0.06) n.d."
    text = aal_study.verdict(comps[0])
    assert "clean +2.00 pt (paired t over 3 seeds p=0.01, Holm 0.03: higher)" in text
    assert "pgd20 +2.00 pt (paired t over 3 seeds p=0.03, Holm 0.06: no difference measured)" in text


FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
TINY = ["epochs=1", "data.train_n=256", "model.attention=cbam_in", "seed=0", "threads=1", "progress=false",
        "checkpoint_every=1", "eval.n=100", "eval.attacks=[clean,pgd20]", "eval.epoch_attacks=[clean]", "eval.epoch_n=100"]


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_a_published_run_is_recovered_only_if_training_it_again_reproduces_it(tmp_path, monkeypatch):
    """A later session has the published record but not the checkpoint: training the run again (one
    thread, same seed) gives back the same run bit for bit, and the folder then holds the published
    files; a record it does not reproduce is set aside, never published over, and stops the study."""
    import shutil

    monkeypatch.setattr(aal_study, "OUT", tmp_path / "out")
    monkeypatch.setattr(aal_study, "RECORDS", tmp_path / "records")
    run_dir = aal_study.run_dir_for("fashion_mnist", "fgsm_at", 0, TINY)
    aal_study._train("fashion_mnist", "fgsm_at", 0, TINY, run_dir)
    published = aal_study.publish(run_dir, "fashion_mnist")
    shutil.rmtree(tmp_path / "out")  # another machine: the checkpoint is gone

    aal_study.recover("fashion_mnist", "fgsm_at", 0, TINY, published)
    assert (run_dir / "checkpoints").is_dir()
    for name in aal_study.PUBLISHED:  # the record's own files (its timings), byte for byte
        if (published / name).exists():
            assert (run_dir / name).read_bytes() == (published / name).read_bytes(), name

    rows = [json.loads(line) for line in (published / "metrics.jsonl").read_text().splitlines()]
    rows[0]["train_loss"] += 1e-9  # a record this training does not reproduce
    (published / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.rmtree(tmp_path / "out")
    with pytest.raises(RuntimeError, match=r"did not reproduce .*epoch 1: train_loss differ"):
        aal_study.recover("fashion_mnist", "fgsm_at", 0, TINY, published)
    assert not run_dir.exists() and (run_dir.parent / f"{run_dir.name}.mismatch" / "checkpoints").is_dir()
    assert json.loads((published / "metrics.jsonl").read_text().splitlines()[0])["train_loss"] == rows[0]["train_loss"]


def test_reproduction_compares_outcomes_and_logs_not_timings(tmp_path):
    def run(name, correct, loss, seconds):
        d = tmp_path / name
        d.mkdir()
        np.savez_compressed(d / "correct.npz", clean=np.array(correct), pgd20=np.array([True, False]))
        (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": loss, "epoch_time": seconds,
                                                     "eval_time": seconds, "img_per_s": 1 / seconds}) + "\n")
        return d

    a = run("a", [True, True], 0.5, 10.0)
    assert aal_study.reproduction_mismatch(a, run("b", [True, True], 0.5, 99.0)) is None  # timings may differ
    assert aal_study.reproduction_mismatch(a, run("c", [True, False], 0.5, 10.0)) == "clean: 1 of 2 per-image outcomes differ"
    assert aal_study.reproduction_mismatch(a, run("d", [True, True], 0.25, 10.0)) == "epoch 1: train_loss differ"


def test_train_recovers_a_checkpoint_only_when_asked_and_absent(tmp_path, monkeypatch):
    """A published run is reused as it is; ``checkpoint=True`` (a stage or a suite needs the model)
    recovers it when this machine lacks it, and not when it is here."""
    monkeypatch.setattr(aal_study, "OUT", tmp_path / "out")
    monkeypatch.setattr(aal_study, "RECORDS", tmp_path / "records")
    pub = tmp_path / "records" / "fashion_mnist" / "fgsm_at-s0-abcdef12"
    monkeypatch.setattr(aal_study, "finished_record", lambda d, a, s, o: pub)
    monkeypatch.setattr(aal_study, "load_record", lambda d, a, s, run_dir: {"run_dir": str(run_dir)})
    recovered = []
    monkeypatch.setattr(aal_study, "recover", lambda d, a, s, o, p: recovered.append((a, s, p)))
    assert aal_study.train_one("fashion_mnist", "fgsm_at", 0) == {"run_dir": str(pub)} and recovered == []
    aal_study.train_one("fashion_mnist", "fgsm_at", 0, checkpoint=True)
    assert recovered == [("fgsm_at", 0, pub)]
    (tmp_path / "out" / "fashion_mnist" / pub.name / "checkpoints").mkdir(parents=True)
    aal_study.train_one("fashion_mnist", "fgsm_at", 0, checkpoint=True)
    assert len(recovered) == 1


def test_a_bf16_setting_is_refused_on_a_cpu_that_emulates_bf16(monkeypatch):
    import aal.utils.precision

    monkeypatch.delenv(aal_study.EMULATED_BF16_OK, raising=False)
    monkeypatch.setattr(aal.utils.precision, "native_bf16", lambda device="cpu": False)
    with pytest.raises(SystemExit, match="no native bf16"):
        aal_study.check_machine("bf16")
    aal_study.check_machine("fp32")  # fp32 settings run anywhere
    monkeypatch.setenv(aal_study.EMULATED_BF16_OK, "1")
    aal_study.check_machine("bf16")  # asked for
    monkeypatch.setattr(aal.utils.precision, "native_bf16", lambda device="cpu": True)
    monkeypatch.delenv(aal_study.EMULATED_BF16_OK)
    aal_study.check_machine("bf16")


def test_a_run_is_recovered_only_on_the_cpu_kind_that_trained_it(tmp_path, monkeypatch):
    """Another CPU kind selects other kernels: it is refused before an hour of training, by the
    record's cpu_id, or by its CPU name where the record predates that field."""
    from aal.engine.run import machine_description

    now = machine_description()
    pub = tmp_path / "run"
    pub.mkdir()

    def record(**machine):
        (pub / "results.json").write_text(json.dumps({"machine": machine}))

    record(cpu=now["cpu"], cpu_id=now["cpu_id"])
    assert aal_study.same_machine_kind(pub) is None
    record(cpu=now["cpu"], cpu_id="GenuineIntel family 6 model 143 stepping 8")
    assert "trained on 'GenuineIntel family 6 model 143" in aal_study.same_machine_kind(pub)
    record(cpu=now["cpu"])  # an older record: the name decides
    assert aal_study.same_machine_kind(pub) is None
    record(cpu="Some Other CPU")
    assert "trained on 'Some Other CPU'" in aal_study.same_machine_kind(pub)
    monkeypatch.setattr(aal_study, "OUT", tmp_path / "out")
    with pytest.raises(RuntimeError, match="cannot be recovered on this machine"):
        aal_study.recover("fashion_mnist", "fgsm_at", 0, TINY, pub)
    assert not (tmp_path / "out" / "fashion_mnist" / "run" / "checkpoints").exists()


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_an_unrecoverable_run_is_superseded_only_when_asked_and_its_record_is_kept(tmp_path, monkeypatch):
    """A published run trained on another CPU kind, whose model a suite needs: without the flag the
    study stops; with it the record moves to superseded/ (why, when, where) and the arm and seed are
    trained again here, published in its place and listed by ``superseded``."""
    import shutil

    monkeypatch.setattr(aal_study, "OUT", tmp_path / "out")
    monkeypatch.setattr(aal_study, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(aal_study, "overrides_for", lambda d, a, s: list(TINY))
    run_dir = aal_study.run_dir_for("fashion_mnist", "fgsm_at", 0, TINY)
    aal_study._train("fashion_mnist", "fgsm_at", 0, TINY, run_dir)
    published = aal_study.publish(run_dir, "fashion_mnist")
    shutil.rmtree(tmp_path / "out")
    res = json.loads((published / "results.json").read_text())
    res["machine"] = {"cpu": "Some Other CPU"}  # trained elsewhere: not recoverable here
    (published / "results.json").write_text(json.dumps(res))
    old = (published / "results.json").read_bytes()

    with pytest.raises(RuntimeError, match="cannot be recovered on this machine"):
        aal_study.train_one("fashion_mnist", "fgsm_at", 0, checkpoint=True)
    assert (published / "results.json").read_bytes() == old and not aal_study.superseded("fashion_mnist")
    assert aal_study.train_one("fashion_mnist", "fgsm_at", 0)["run_dir"]  # not needed: reused as it is

    rec = aal_study.train_one("fashion_mnist", "fgsm_at", 0, checkpoint=True, supersede_unrecoverable=True)
    aside = tmp_path / "records" / "fashion_mnist" / aal_study.SUPERSEDED / published.name
    assert (aside / "results.json").read_bytes() == old  # the old record, kept as it was
    why = json.loads((aside / "superseded.json").read_text())
    assert "cannot be recovered here (trained on 'Some Other CPU'" in why["reason"] and why["machine"]["cpu"]
    assert (run_dir / "checkpoints").is_dir()  # the new model, here for its suite
    new = json.loads((published / "results.json").read_text())  # published in its place, trained on this machine
    assert new["machine"]["cpu"] != "Some Other CPU" and rec["accuracy"] == new["eval"]["accuracy"]
    listed = aal_study.superseded("fashion_mnist")
    assert [(x["arm"], x["seed"], x["run"], x["trained_on"]) for x in listed] == [("fgsm_at", 0, published.name, "Some Other CPU")]
    assert listed[0]["accuracy"] == res["eval"]["accuracy"]
    assert set(aal_study.collect(dataset="fashion_mnist")["fashion_mnist"]) == {("fgsm_at", 0)}  # one run per arm and seed


class _StoredModel:
    """A stand-in for a run's stored config: only its ``model`` section, read from ``model.json``."""

    def __init__(self, run_dir):
        self.model = json.loads((run_dir / "model.json").read_text())

    def to_dict(self):
        return {"model": self.model}


def test_superseding_a_pipeline_stage_sets_aside_the_stages_built_on_it(tmp_path, monkeypatch):
    """A later stage trained on the superseded model is no longer a run of today's chain: it goes too."""
    records = tmp_path / "records" / "fashion_mnist"
    models = {"standard-s0-aaaa": {}, "other-s0-dddd": {},
              "atop_pretrain-s0-bbbb": {"classifier_run": "/old/machine/standard-s0-aaaa"},
              "atop-s0-cccc": {"classifier_run": "/x/standard-s0-aaaa", "purifier_run": "/x/atop_pretrain-s0-bbbb"}}
    for name, model in models.items():
        (records / name).mkdir(parents=True)
        (records / name / "study.json").write_text(json.dumps({"arm": name.split("-")[0], "seed": 0}))
        (records / name / "results.json").write_text(json.dumps({"eval": {"accuracy": {"clean": 0.9}}}))
        (records / name / "model.json").write_text(json.dumps(model))

    monkeypatch.setattr(aal_study, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(aal_study, "stored_config", _StoredModel)
    names = aal_study.supersede("fashion_mnist", records / "standard-s0-aaaa", "a reason")
    assert names[0] == "standard-s0-aaaa" and sorted(names[1:]) == ["atop-s0-cccc", "atop_pretrain-s0-bbbb"]
    assert sorted(p.name for p in records.iterdir()) == ["other-s0-dddd", "superseded"]
    aside = {x["run"]: x["reason"] for x in aal_study.superseded("fashion_mnist")}
    assert aside == {"standard-s0-aaaa": "a reason", "atop_pretrain-s0-bbbb": "built on standard-s0-aaaa, which was superseded",
                     "atop-s0-cccc": "built on standard-s0-aaaa, which was superseded"}


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_a_run_carried_to_a_fresh_machine_resumes_into_the_uninterrupted_run(tmp_path, monkeypatch):
    """A session ends in a run's epoch 2: ``carry`` copies its folder (epoch-1 checkpoint) into the
    committed carry folder; a fresh machine (empty OUT) restores and resumes it, and the run is the
    one trained without a break (every per-image outcome, every logged number); published with its
    suite, its carried copy goes. A run another process holds is not carried."""
    import shutil

    import aal.engine.trainer

    two = [o for o in TINY if not o.startswith("epochs=")] + ["epochs=2"]
    monkeypatch.setattr(aal_study, "OUT", tmp_path / "out")
    monkeypatch.setattr(aal_study, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(aal_study, "CARRY", tmp_path / "carry")
    whole = aal_study.run_dir_for("fashion_mnist", "fgsm_at", 0, two)
    aal_study._train("fashion_mnist", "fgsm_at", 0, two, whole)
    reference = tmp_path / "reference"
    whole.rename(reference)

    fit_epoch = aal.engine.trainer.Trainer.train_epoch

    def stop_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("the session ends")
        return fit_epoch(self, epoch)

    monkeypatch.setattr(aal.engine.trainer.Trainer, "train_epoch", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        aal_study._train("fashion_mnist", "fgsm_at", 0, two, whole)
    monkeypatch.setattr(aal.engine.trainer.Trainer, "train_epoch", fit_epoch)
    first_epoch = (whole / "metrics.jsonl").read_text()  # with its timings: resuming keeps it, re-training would not
    with aal_study.claimed(whole):  # still running: not carried
        assert aal_study.carry() == []
    [copy] = aal_study.carry()
    assert copy == tmp_path / "carry" / "fashion_mnist" / whole.name and (copy / "checkpoints").is_dir()
    line = json.loads((copy / aal_study.CARRIED).read_text())
    assert line["epoch"] == 1 and line["machine"]["cpu"] and not line["suite_state"]
    assert aal_study.carry() == []  # carried again unchanged: no second hand-over line

    shutil.rmtree(tmp_path / "out")  # the next session's fresh machine
    assert aal_study.restore_carried() == [whole] and aal_study.restore_carried() == []  # once: not behind
    aal_study._train("fashion_mnist", "fgsm_at", 0, two, whole)
    assert aal_study.reproduction_mismatch(reference, whole) is None
    assert (whole / "metrics.jsonl").read_text().startswith(first_epoch)  # resumed, not trained again
    assert len((whole / aal_study.CARRIED).read_text().splitlines()) == 1  # the record says it came in parts
    published = aal_study.publish(whole, "fashion_mnist")
    assert (published / aal_study.CARRIED).exists() and copy.exists()  # no suite yet: still to hand over
    assert aal_study.carry() == [copy]  # trained now: handed over for its suite, without its optimizer state
    assert not (copy / "checkpoints" / "last" / "optimizer.safetensors").exists()
    shutil.rmtree(whole)
    assert aal_study.restore_carried() == [whole]
    from aal.engine.run import load_run

    restored, trained = load_run(whole)[1].state_dict(), load_run(reference)[1].state_dict()
    assert restored.keys() == trained.keys() and all(torch.equal(restored[k], trained[k]) for k in trained)
    (whole / "eval").mkdir()
    (whole / "eval" / "study_suite_standard.json").write_text("{}")
    aal_study.publish(whole, "fashion_mnist")
    assert not copy.exists()  # complete: nothing left to carry
    assert aal_study.carry() == []
    # the published record was trained in parts: a machine kind that made any part cannot be told apart
    (published / aal_study.CARRIED).write_text(json.dumps({"machine": {"cpu": "Some Other CPU"}}) + "\n")
    assert "trained on 'Some Other CPU'" in aal_study.same_machine_kind(published)


def test_a_pipeline_stage_is_carried_while_a_run_built_on_it_is_unfinished(tmp_path, monkeypatch):
    """AToP's fine-tuning needs its stages' models: they go with it, and their copies go once it is complete."""
    out, records, carried = tmp_path / "out" / "fashion_mnist_rank", tmp_path / "records" / "fashion_mnist_rank", tmp_path / "carry"

    def run(name, epoch, arm=None, **model):
        d = out / name
        (d / "checkpoints" / "last").mkdir(parents=True)
        (d / "checkpoints" / "last" / "state.json").write_text(json.dumps({"epoch": epoch}))
        (d / "checkpoints" / "last" / "optimizer.safetensors").write_bytes(b"momentum")
        (d / "config.yaml").write_text("")
        (d / "model.json").write_text(json.dumps(model))
        if arm:  # training finished
            (d / "study.json").write_text(json.dumps({"arm": arm, "seed": 0}))
        return d

    monkeypatch.setattr(aal_study, "OUT", tmp_path / "out")
    monkeypatch.setattr(aal_study, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(aal_study, "CARRY", carried)
    monkeypatch.setattr(aal_study, "stored_config", _StoredModel)
    run("standard-s0-aaaa", 5, "standard")
    run("standard-s1-eeee", 5, "standard")  # nothing built on it here: its model is not needed
    run("atop-s0-cccc", 2, classifier_run="/x/standard-s0-aaaa")
    assert sorted(p.name for p in aal_study.carry()) == ["atop-s0-cccc", "standard-s0-aaaa"]
    # the finished stage is only read from now on: its optimizer state stays behind; the run in training keeps its own
    assert not (carried / "fashion_mnist_rank" / "standard-s0-aaaa" / "checkpoints" / "last" / "optimizer.safetensors").exists()
    assert (carried / "fashion_mnist_rank" / "atop-s0-cccc" / "checkpoints" / "last" / "optimizer.safetensors").exists()
    (records / "atop-s0-cccc").mkdir(parents=True)
    (records / "atop-s0-cccc" / "suite_standard.json").write_text("{}")  # AToP done, suite and all
    assert aal_study.carry() == [] and list((carried / "fashion_mnist_rank").iterdir()) == []


def test_working_folder_lies_outside_the_work_tree_and_follows_the_environment(tmp_path):
    """Checkpoints live where a fresh work tree does not wipe them; $AAL_STUDY_OUT, then $XDG_CACHE_HOME, move them."""

    def out(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("AAL_STUDY_OUT", "XDG_CACHE_HOME")}
        code = "import sys; sys.path.insert(0, 'benchmarks'); import aal_study; print(aal_study.OUT)"
        return Path(subprocess.run([sys.executable, "-c", code], cwd=aal_study.ROOT, env={**base, "HOME": str(tmp_path), **env},
                                   capture_output=True, text=True, check=True).stdout.strip())

    assert out() == tmp_path / ".cache" / "aal" / "study"
    assert aal_study.ROOT not in out().parents
    assert out(XDG_CACHE_HOME=str(tmp_path / "xdg")) == tmp_path / "xdg" / "aal" / "study"
    assert out(AAL_STUDY_OUT=str(tmp_path / "o"), XDG_CACHE_HOME=str(tmp_path / "xdg")) == tmp_path / "o"


@pytest.mark.parametrize("bad", [{"threads": 0}, {"batch_size": 0}])
def test_suite_one_refuses_nonpositive_threads_or_batch(bad):
    with pytest.raises(ValueError, match=">= 1"):
        aal_study.suite_one("fashion_mnist", "fgsm_at", 0, 100, **bad)
