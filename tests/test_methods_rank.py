"""The ranking study (benchmarks/methods_rank.py): pipeline arms, the bootstrap and Holm, the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
aal_study = pytest.importorskip("aal_study")
methods_rank = pytest.importorskip("methods_rank")


@pytest.fixture(autouse=True)
def _no_carried_runs_of_this_checkout(tmp_path_factory, monkeypatch):
    """``train`` and ``suite`` restore the runs carried by earlier sessions: never this checkout's into the real cache."""
    monkeypatch.setattr(aal_study, "CARRY", tmp_path_factory.mktemp("carry"))
    monkeypatch.setattr(aal_study, "OUT", tmp_path_factory.mktemp("out"))


@pytest.mark.parametrize("ds, precision", [("fashion_mnist_rank", "bf16"), ("fashion_mnist_rank_fp32", "fp32")])
def test_every_ranked_method_is_an_arm_with_the_study_setting(ds, precision):
    for m in methods_rank.METHODS:
        over = aal_study.overrides_for(ds, m, 0) if m != "atop" else None
        if over is not None:
            cfg = aal_study.config_for(ds, m, over)
            assert cfg.epochs == 5 and cfg.model.attention == "cbam_in" and cfg.eval.n is None, m
            assert cfg.precision == precision and not cfg.compile and cfg.data.name == "fashion_mnist", m
            assert cfg.method.name == m and cfg.eval.epoch_n == 1000, m
    # its own run folders: a ranked pgd_at is not the AAL study's Fashion-MNIST pgd_at (fp32)
    assert aal_study.run_dir_for(ds, "pgd_at", 0, aal_study.overrides_for(ds, "pgd_at", 0)).parent.name == ds
    assert aal_study.ARMS["atop"].study == "rank" and aal_study.ARMS["pgd_at"].study == "aal"
    assert len(set(methods_rank.SETTINGS.values())) == len(methods_rank.SETTINGS)  # each setting its own report files


def test_the_fp32_ranking_is_the_bf16_one_but_for_precision():
    """Two settings, one comparison: every ranked method's resolved config differs only in precision."""
    for m in [*methods_rank.METHODS, "standard"]:
        if m == "atop":
            continue
        cfgs = [aal_study.identity(aal_study.config_for(ds, m, aal_study.overrides_for(ds, m, 0)))
                for ds in ("fashion_mnist_rank", "fashion_mnist_rank_fp32")]
        diff = {k for k in cfgs[0].keys() | cfgs[1].keys() if cfgs[0].get(k) != cfgs[1].get(k)}
        assert diff == {"precision"}, (m, diff)


def test_the_cifar10_setting_gives_every_method_the_cpu_recipe(monkeypatch, tmp_path):
    """cifar10_rank: the same methods on the CPU-scale CIFAR-10 recipe, one model/schedule for all."""
    monkeypatch.setenv("AAL_CIFAR10", str(tmp_path / "cifar"))
    monkeypatch.setattr(aal_study, "OUT", tmp_path / "out")
    ds, seen = "cifar10_rank", set()
    for m in [*methods_rank.METHODS, "standard"]:
        try:
            over = aal_study.overrides_for(ds, m, 1)
        except LookupError:  # AToP's stages need the same seed's earlier stage first
            assert m in ("atop", "atop_pretrain")
            continue
        cfg = aal_study.config_for(ds, m, over)
        assert cfg.method.name == m and cfg.data.name == "cifar10" and cfg.data.root == str(tmp_path / "cifar"), m
        assert (cfg.epochs, cfg.precision, cfg.compile, cfg.seed, cfg.eval.epoch_n) == (20, "bf16", False, 1, 1000), m
        assert cfg.model.name == "preact_resnet18" and cfg.model.attention == "cbam_in", m
        assert (cfg.optim.lr, cfg.schedule.warmup_epochs, cfg.eval.eps) == (0.2, 1, 8 / 255), m
        seen.add(m)
    assert seen == set(methods_rank.METHODS) - {"atop"} | {"standard"}
    assert aal_study.run_dir_for(ds, "trades", 0, aal_study.overrides_for(ds, "trades", 0)).parent.name == ds


def test_dataset_option_reaches_every_phase_and_names_the_results(monkeypatch, tmp_path):
    calls = []
    acc = {"accuracy": {"clean": 0.5, "pgd20": 0.2}}
    monkeypatch.setattr(methods_rank.study, "train_one", lambda d, a, s, checkpoint, supersede_unrecoverable: calls.append(("train", d, a)) or acc)
    monkeypatch.setattr(methods_rank.study, "suite_one", lambda d, a, s, n, **kw: calls.append(("suite", d, a)))
    monkeypatch.setattr(methods_rank.study, "suite_missing", lambda d, a, s: calls.append(("missing?", d, a)) or True)
    methods_rank.main(["train", "--dataset", "cifar10_rank", "--methods", "trades", "--seeds", "0", "--then-suite"])
    methods_rank.main(["suite", "--dataset", "cifar10_rank", "--methods", "mart", "--seeds", "0"])
    assert calls == [("missing?", "cifar10_rank", "trades"), ("train", "cifar10_rank", "trades"), ("suite", "cifar10_rank", "trades"),
                     ("suite", "cifar10_rank", "mart")]
    monkeypatch.setattr(methods_rank, "collect", lambda excluded, dataset: calls.append(dataset) or {})
    monkeypatch.setattr(aal_study, "RESULTS", tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("no markers of this setting\n")
    monkeypatch.setattr(methods_rank, "README", readme)
    methods_rank.main(["report", "--dataset", "cifar10_rank"])
    doc = json.loads((tmp_path / "methods_rank_cifar10.json").read_text())
    assert calls[-1] == "cifar10_rank" and doc["dataset"] == "cifar10_rank" and doc["rows"] == []
    assert "CIFAR-10, PreAct-ResNet-18" in (tmp_path / "methods_rank_cifar10.md").read_text()
    assert readme.read_text() == "no markers of this setting\n"  # no runs yet, no README block
    with pytest.raises(SystemExit):
        methods_rank.main(["report", "--dataset", "cifar10"])  # the AAL study's setting is not a ranking


def test_a_pipeline_stage_needs_its_same_seed_run_with_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(aal_study, "OUT", tmp_path / "out")
    monkeypatch.setattr(aal_study, "RECORDS", tmp_path / "records")
    with pytest.raises(LookupError, match="needs the standard run of the same seed"):
        aal_study.overrides_for("fashion_mnist", "atop_pretrain", 0)
    std = tmp_path / "records" / "fashion_mnist" / "standard-s0-abcdef12"
    std.mkdir(parents=True)
    for name, text in (("study.json", "{}"), ("results.json", json.dumps({"eval": {"accuracy": {}, "n": 1}})),
                       ("metrics.jsonl", json.dumps({"epoch": 1, "logs": {}}) + "\n")):
        (std / name).write_text(text)
    std_cfg = aal_study.config_for("fashion_mnist", "standard", aal_study.overrides_for("fashion_mnist", "standard", 0))
    (std / "config.yaml").write_text(yaml.safe_dump(std_cfg.to_dict()))  # the standard arm's config today
    with pytest.raises(LookupError, match="with its checkpoint"):  # published, but trained elsewhere
        aal_study.overrides_for("fashion_mnist", "atop_pretrain", 0)
    (tmp_path / "out" / "fashion_mnist" / "standard-s0-abcdef12" / "checkpoints").mkdir(parents=True)
    over = aal_study.overrides_for("fashion_mnist", "atop_pretrain", 0)
    assert f"model.classifier_run={tmp_path / 'out' / 'fashion_mnist' / 'standard-s0-abcdef12'}" in over
    assert "model.attention=cbam_in" not in over and "epochs=5" in over  # dropped / kept dataset overrides
    ident = aal_study.identity(aal_study.config_for("fashion_mnist", "atop_pretrain", over))
    assert ident["model"]["classifier_run"] == "standard-s0-abcdef12"  # the run, not where this checkout keeps it


def test_holm_and_bootstrap():
    assert aal_study.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    rng = np.random.default_rng(0)
    same = {s: rng.random(2000) < 0.5 for s in range(3)}
    p, lo, hi = methods_rank.bootstrap_p(same, same, np.random.default_rng(1), reps=300)
    assert p == 1.0 and lo == hi == 0.0
    better = {s: v | (rng.random(2000) < 0.3) for s, v in same.items()}  # ~15 points higher on every seed
    p, lo, hi = methods_rank.bootstrap_p(better, same, np.random.default_rng(1), reps=300)
    assert p < 0.01 and 10 < lo < hi < 20


def test_report_from_synthetic_runs(tmp_path, monkeypatch):
    """Two methods, three seeds, one clearly more robust: the table, the epoch-1 rule and the verdicts."""
    rng = np.random.default_rng(0)
    recs = {}
    for m, (clean, rob, e1) in {"pgd_at": (0.85, 0.70, 0.45), "mart": (0.85, 0.60, 0.12)}.items():
        for s in range(3):
            run = tmp_path / f"{m}-s{s}"
            run.mkdir()
            np.savez(run / "correct.npz", clean=rng.random(10_000) < clean, pgd20=rng.random(10_000) < rob)
            np.savez(run / "suite_correct.npz", robust=rng.random(1000) < rob - 0.02)
            recs[(m, s)] = {
                "arm": m, "seed": s, "run_dir": str(run), "accuracy": {"clean": clean, "pgd20": rob},
                "suite": {"accuracy": {"robust": rob - 0.02}, "n": 1000, "suite": "standard"}, "epochs": 2,
                "epoch_eval": [{"test_pgd10": e1}, {"test_pgd10": rob}], "train_seconds": 100.0,
            }
    def collect(excluded, dataset):  # and one run trained under another config: named, never ranked
        excluded.append(("mart", 3, "precision fp32 (the arm's: bf16)"))
        return recs

    monkeypatch.setattr(methods_rank, "collect", collect)
    monkeypatch.setattr(aal_study, "RESULTS", tmp_path)
    monkeypatch.setattr(aal_study, "superseded", lambda dataset: [  # a ranked method's and an unranked arm's
        {"arm": arm, "seed": 2, "run": f"{arm}-s2-abc", "reason": "why", "when": "then", "trained_on": "Other CPU",
         "accuracy": {"clean": 0.81, "pgd20": 0.7288}} for arm in ("mart", "fgsm_at")])
    readme = tmp_path / "README.md"
    begin, end = methods_rank.readme_markers("fashion_mnist_rank")
    readme.write_text(f"intro\n{begin}\nold table\n{end}\nafter\n")
    monkeypatch.setattr(methods_rank, "README", readme)
    text = methods_rank.report()
    doc = json.loads((tmp_path / "methods_rank.json").read_text())
    assert doc["dataset"] == "fashion_mnist_rank"
    rows = {r["method"]: r for r in doc["rows"]}
    assert rows["pgd_at"]["left_chance"] and not rows["mart"]["left_chance"]
    verdicts = {c: [p["verdict"] for p in pairs] for c, pairs in doc["comparisons"].items()}
    assert verdicts["pgd20"] == ["pgd_at beats mart"] and verdicts["suite"] == ["pgd_at beats mart"]
    assert verdicts["clean"] == ["no difference measured"]
    assert "(p Holm < 0.001," in text  # no resample crossed zero: a bound, not "p = 0"
    assert "| NO |" in text and (tmp_path / "methods_rank.png").stat().st_size > 10_000
    assert "Left out: runs trained under another config than their method's: `mart` seed 3 (precision fp32" in text
    assert rows["mart"]["seeds"] == [0, 1, 2]
    assert ("`mart` seed 2 (`mart-s2-abc`, trained on Other CPU: clean 81.00, PGD-20 72.88; why; then)" in text
            and "fgsm_at" not in text and [x["arm"] for x in doc["superseded"]] == ["mart"])
    block = readme.read_text()
    assert block == f"intro\n{methods_rank.readme_block(doc)}\nafter\n" and "| `mart`: MART" in block
    assert "  - pgd_at beats mart: " in block and "seeds 0-2)" in block  # method verdicts: 3 seeds
    assert "- **clean (10k)**: 1 pair on 3+ seeds, no difference measured between any two methods." in block


def test_readme_ranking_table_is_the_one_generated_from_the_committed_report():
    root = Path(__file__).resolve().parents[1]
    doc = json.loads((root / "benchmarks" / "results" / "methods_rank.json").read_text())
    assert methods_rank.readme_block(doc) in (root / "README.md").read_text()


def test_a_verdict_names_methods_only_on_three_seeds():
    def c(seeds, diff=-2.0, p=0.001, p_t=0.01):
        return methods_rank.verdict({"a": "x", "b": "y", "seeds": seeds, "diff": diff, "p_holm": p, "p_t_holm": p_t})
    assert c([0]) == "y's model beats x's (1 seed: not a method comparison yet)"
    assert c([0, 1]) == "y's models beat x's (2 seeds: not a method comparison yet)"
    assert c([0, 1, 2]) == "y beats x" and c([0, 1, 2], diff=2.0) == "x beats y"
    assert c([0, 1, 2], p=0.05) == "no difference measured"
    # three seeds of one sign: the bootstrap's p is ~0 whatever their spread; the t test must agree
    assert c([0, 1, 2], p=0.0, p_t=0.18) == "no difference measured"
    assert c([0, 1], p=0.0, p_t=1.0) == "y's models beat x's (2 seeds: not a method comparison yet)"


def test_readme_verdicts_separate_one_seed_model_differences_from_method_verdicts():
    def pair(seeds, diff, p):
        c = {"a": "x", "b": "y", "seeds": seeds, "diff": diff, "ci95": [diff - 1, diff + 1], "p_holm": p, "p_t_holm": p}
        return {**c, "verdict": methods_rank.verdict(c)}  # the rule analyse() applies
    doc = {"comparisons": {"clean": [pair([0], 3.0, 0.0), pair([0, 1], 3.0, 0.0)],
                           "pgd20": [pair([0, 1, 2], 3.0, 0.01), pair([0], 1.0, 0.5)],
                           "suite": [pair([0, 1, 2], -0.5, 0.4)]}}
    lines = methods_rank.readme_verdicts(doc)
    assert lines[0].startswith("- **clean (10k)**: no pair of methods on 3+ seeds yet; 2 pairs on fewer seeds")
    assert lines[1].startswith("- **PGD-20 (10k)**: 1 pair on 3+ seeds, 1 with a measured difference; 1 pair on fewer")
    assert lines[2] == "  - x beats y: 3.00 points [2.00, 4.00] (bootstrap p Holm 0.01, paired t p Holm 0.01; seeds 0-2)"
    assert lines[3] == "- **suite (n)**: 1 pair on 3+ seeds, no difference measured between any two methods."


def test_then_suite_follows_each_method_not_its_pipeline_stages(monkeypatch):
    calls = []
    acc = {"accuracy": {"clean": 0.5, "pgd20": 0.2}}
    monkeypatch.setattr(methods_rank.study, "train_one", lambda d, a, s, checkpoint=False, supersede_unrecoverable=False:
                        calls.append(("train", a, checkpoint) + (("supersede",) if supersede_unrecoverable else ())) or acc)
    options = []
    monkeypatch.setattr(methods_rank.study, "suite_one",
                        lambda d, a, s, n, **kw: calls.append(("suite", a, n)) or options.append(kw))
    monkeypatch.setattr(methods_rank.study, "suite_missing", lambda d, a, s: a == "atop")  # trades has its suite
    methods_rank.main(["train", "--methods", "atop,trades", "--seeds", "0", "--then-suite", "--suite-n", "500"])
    # a stage's checkpoint feeds the next stage, a method's its missing suite: both recovered if trained elsewhere
    assert calls == [("train", "standard", True), ("train", "atop_pretrain", True), ("train", "atop", True),
                     ("suite", "atop", 500), ("train", "trades", False), ("suite", "trades", 500)]
    assert options == [{"threads": 1, "batch_size": 256}] * 2  # one thread beside another run, AutoAttack's batch
    calls.clear(), options.clear()
    for phase in (["train", "--then-suite"], ["suite"]):
        methods_rank.main([*phase, "--methods", "trades", "--seeds", "0", "--suite-threads", "2", "--suite-batch", "64"])
    assert options == [{"threads": 2, "batch_size": 64}] * 2
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            methods_rank.main(["suite", "--methods", "trades", "--suite-batch", bad])
    calls.clear()
    methods_rank.main(["train", "--methods", "atop", "--seeds", "0"])  # no suite: only the stages need their models
    assert calls == [("train", "standard", True), ("train", "atop_pretrain", True), ("train", "atop", False)]
    calls.clear()
    methods_rank.main(["train", "--methods", "trades", "--seeds", "0", "--supersede-unrecoverable"])
    assert calls == [("train", "trades", False, "supersede")]


def test_a_claimed_pipeline_stage_skips_its_method_and_the_list_goes_on(monkeypatch, capsys):
    calls = []
    acc = {"accuracy": {"clean": 0.5, "pgd20": 0.2}}

    def train_one(d, a, s, checkpoint=False, supersede_unrecoverable=False):
        if a == "standard":  # another process is training AToP's first stage
            raise methods_rank.study.Claimed("standard-s0-x: claimed by another process; skipped")
        calls.append(a)
        return acc

    monkeypatch.setattr(methods_rank.study, "train_one", train_one)
    methods_rank.main(["train", "--methods", "atop,trades", "--seeds", "0"])
    assert calls == ["trades"] and "standard-s0-x: claimed by another process; skipped" in capsys.readouterr().out
