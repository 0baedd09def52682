"""The seed methods ranked by a comparison that can rank them (issue 16, item 3).

Every method trains the same model on the same data with the same schedule: the AAL study's
Fashion-MNIST setting (``benchmarks/aal_study.py``: small CNN + input-level CBAM, **all 60,000
training images, 5 epochs**, batch 128, SGD lr 0.05 cosine, eps 0.1; AToP: its own purifier stages,
5 epochs each, on top of a standard-trained classifier of that architecture). Two settings of it,
never mixed (own run folders, own reports):

* ``fashion_mnist_rank`` (the default): trained under **bf16 autocast** (evaluation in fp32). On a
  CPU with native bf16 (AVX512-BF16 or AMX) PGD-10 training steps of this model were 2.7x faster
  than fp32 on the machine of ``benchmarks/results/precision_speed.txt``; elsewhere bf16 is emulated,
  ~10x slower than fp32 (``precision_speed_avx2.txt``), and training refuses
  (``aal_study.check_machine``). bf16 and fp32 FGSM-AT reached the same accuracy
  (``precision_parity.md``), and AWP's weight perturbation survives the rounding of ``w + v`` to
  bf16 (its logged ``awp_loss_gain``, the loss at ``w + v`` minus at ``w``, was 1.00x fp32's for
  AT-AWP and 0.94x for TRADES-AWP, mean of 16 batches: ``benchmarks/awp_bf16.py``).
* ``fashion_mnist_rank_fp32``: the same comparison in fp32 (every resolved config the bf16 one's
  but for ``precision``), its report in ``methods_rank_fp32.*``: it runs at full speed on any CPU
  kind, so it progresses whatever machine a session gets.

A run with its suite takes ~40 min to ~2 h per core depending on method and machine, so a seed
takes more than one 3-h session. Runs, caching, resuming and publishing are the AAL study's
(``aal_study.train_one`` / ``suite_one``: a run folder per arm, seed and config hash in
``aal_study.OUT``, ``~/.cache/aal/study/``; finished runs' small files in
``benchmarks/results/aal_study_runs/``, committed, never retrained). Sessions get fresh machines:
``carry`` at a session's end commits the unfinished run folders (``aal_study.carry``), which
``train`` and ``suite`` resume; a published run whose checkpoint is gone is recovered by training
it again (``aal_study.recover``: kept only if bit-identical, on the CPU kind that trained it) or,
with ``--supersede-unrecoverable`` on another kind, set aside and trained again
(``aal_study.supersede``). Evaluation per run: clean and
PGD-20 on the full test set (10,000 images; AToP's PGD-20 there draws one random transform per
step, no EOT), then the standard suite (APGD-CE -> APGD-T -> FAB-T -> Square, AutoAttack's
standard version) on the first ``--suite-n`` test images, or for a randomised model (AToP)
AutoAttack's ``rand`` version (APGD-CE -> APGD-DLR) with EOT over 20 draws per step.

What the report states and tests:

* **Left chance by the end of epoch 1**: the epoch-1 PGD-10 accuracy on the epoch-evaluation
  images (the first 1,000 test images) must be at least twice chance (20 %); the table says
  per method whether every seed did. **Close to converged**: the change of that accuracy over the
  last epoch, in points (the per-epoch curves are plotted).
* **"A beats B"** only where, on at least 3 seeds, both a hierarchical bootstrap over seeds and
  test images (2,000 resamples: seeds with replacement, then images with replacement within each
  drawn seed, on the per-image outcomes) and the paired t-test over seeds put the difference's
  two-sided p below 0.05, each after Holm's correction over all pairs of that column (the bootstrap
  alone is too liberal with 3 seeds: see :func:`verdict`); otherwise "no difference measured".
  With one seed the bootstrap sees two trained models, not two methods; with two, resampling the
  seeds has three outcomes and cannot measure the seed spread (a 0.6-point PGD-20 gap over 2 seeds
  had bootstrap p 0.011 and paired-t p 0.19): below 3 seeds the verdict names the models, not the
  methods. The suite column uses the suite's images only.

    python benchmarks/methods_rank.py train --seeds 0 --then-suite --lock /tmp/aal-study.lock   # hours per seed, 1 thread
    python benchmarks/methods_rank.py suite --seeds 0 --suite-n 1000
    python benchmarks/methods_rank.py report
    python benchmarks/methods_rank.py carry    # at a session's end, the processes stopped: commit benchmarks/results/aal_study_carry/

``--dataset cifar10_rank`` runs the same comparison on the CPU-scale CIFAR-10 recipe as shipped
(``configs/cifar10_cpu/``: PreAct-ResNet-18 width 16 + CBAM, 20 epochs, bf16, eager; eps 8/255; the
data from ``$AAL_CIFAR10`` or ``../shared/data/cifar10``), its report in ``methods_rank_cifar10.*``
and its README block where the README has its markers.

``train`` and ``suite`` can run in several processes (``--methods``, ``--seeds``; two processes
given the same list share it: each skips the runs the other holds) and on several days; a killed
run resumes from its last epoch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aal_study as study  # noqa: E402

# the settings (aal_study dataset keys; their runs live apart) -> the stem of their results files
SETTINGS = {"fashion_mnist_rank": "methods_rank", "fashion_mnist_rank_fp32": "methods_rank_fp32",
            "cifar10_rank": "methods_rank_cifar10"}
DATASET = "fashion_mnist_rank"  # the default: the AAL study's Fashion-MNIST setting, trained under bf16 autocast
METHODS = ["pgd_at", "trades", "awp_pgd_at", "awp_trades", "mart", "uiat", "spat", "aal_pgd", "atop"]
PREREQUISITES = {"atop": ["standard", "atop_pretrain"]}  # pipeline stages trained first, same seed
CHANCE, LEFT_CHANCE = 0.1, 0.2  # 10 classes; the epoch-1 rule: robust accuracy >= 2x chance
COLUMNS = {"clean": "clean (10k)", "pgd20": "PGD-20 (10k)", "suite": "suite (n)"}
ALPHA, BOOT = 0.05, 2000
MIN_SEEDS = 3  # a method comparison needs seed-to-seed variation the bootstrap can resample (the issue's 3 seeds)


def train(methods: list[str], seeds: list[int], lock: str | None, suite_n: int = 0, dataset: str = DATASET,
          supersede: bool = False, suite_options: dict[str, int] | None = None) -> None:
    """Train every method (and its pipeline stages) per seed; with ``suite_n`` > 0 run each method's
    suite right after it, while its checkpoint is on this machine (checkpoints are not committed).
    ``supersede``: a needed model that cannot be recovered here is trained again (``aal_study.supersede``).
    ``suite_options``: the suite's ``threads`` / ``batch_size`` (``aal_study.suite_one``)."""
    for seed in seeds:  # seed-major: a cut-short study still has whole seeds
        for m in methods:
            with study._skip_claimed():  # another process holds a stage: the method's chain is its work
                for arm in [*PREREQUISITES.get(m, []), m]:
                    t0 = time.time()
                    with study._held(lock):
                        print(f"[{time.strftime('%H:%M:%S')}] train {arm} seed {seed}", flush=True)
                        # a pipeline stage's model feeds the next stage, a method's feeds its suite: recover the
                        # checkpoint of a published run trained on another machine when it is needed
                        need = arm != m or bool(suite_n) and study.suite_missing(dataset, m, seed)
                        r = study.train_one(dataset, arm, seed, checkpoint=need, supersede_unrecoverable=supersede)
                        if suite_n and arm == m:
                            study.suite_one(dataset, m, seed, suite_n, **(suite_options or {}))
                    print(f"  clean {r['accuracy']['clean']:.4f} pgd20 {r['accuracy']['pgd20']:.4f} "
                          f"({time.time() - t0:.0f} s)", flush=True)


def suite(methods: list[str], seeds: list[int], n: int, lock: str | None, dataset: str = DATASET,
          suite_options: dict[str, int] | None = None) -> None:
    for seed in seeds:
        for m in methods:
            with study._held(lock), study._skip_claimed():
                print(f"[{time.strftime('%H:%M:%S')}] suite {m} seed {seed} (n={n})", flush=True)
                study.suite_one(dataset, m, seed, n, **(suite_options or {}))


# ----------------------------------------------------------------------------- statistics
def outcomes(rec: dict, column: str):
    """Per-image outcomes (bool array) of a run for a column; None when not measured."""
    import numpy as np

    if column == "suite":
        return study.suite_outcomes(rec)
    return np.load(study.ROOT / rec["run_dir"] / "correct.npz")[column]


def bootstrap_p(a: dict, b: dict, rng, reps: int = BOOT) -> tuple[float, float, float]:
    """Hierarchical bootstrap of mean(A) - mean(B) over seeds, then images (paired: the same
    images for both). ``a``/``b``: seed -> per-image bool array. Returns (p two-sided, lo, hi) of
    the 95 % interval, in points."""
    import numpy as np

    seeds = sorted(set(a) & set(b))
    diffs = np.empty(reps)
    per_seed = {s: a[s].astype(np.float64) - b[s].astype(np.float64) for s in seeds}
    n = len(next(iter(per_seed.values())))
    for i in range(reps):
        drawn = rng.choice(seeds, size=len(seeds), replace=True)
        diffs[i] = np.mean([per_seed[s][rng.integers(0, n, n)].mean() for s in drawn])
    p = 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())
    return float(min(p, 1.0)), float(100 * np.percentile(diffs, 2.5)), float(100 * np.percentile(diffs, 97.5))


def curve(rec: dict) -> list[float | None]:
    """Per-epoch PGD-10 accuracy on the epoch-evaluation images."""
    return [next((v for k, v in e.items() if k.startswith("test_pgd")), None) for e in rec["epoch_eval"]]


def collect(excluded: list | None = None, dataset: str = DATASET) -> dict:
    """The ranked methods' published runs; runs whose config is not their method's go to ``excluded``."""
    left_out: list = []
    recs = study.collect(left_out, dataset).get(dataset, {})
    if excluded is not None:
        excluded += [(a, s, why) for _, a, s, why in left_out if a in METHODS]
    return {k: r for k, r in recs.items() if k[0] in METHODS}


def analyse(recs: dict) -> dict:
    import numpy as np

    rows = []
    for m in METHODS:
        rs = [recs[k] for k in sorted(recs) if k[0] == m]
        if not rs:
            continue
        vals = {c: [100 * r["accuracy"][c] for r in rs] for c in ("clean", "pgd20")}
        vals["suite"] = [100 * r["suite"]["accuracy"]["robust"] for r in rs if r["suite"]]
        curves = [curve(r) for r in rs]
        first = [c[0] for c in curves if c and c[0] is not None]
        last_delta = [100 * (c[-1] - c[-2]) for c in curves if len(c) > 1 and None not in c[-2:]]
        suites = {r["suite"]["suite"] for r in rs if r["suite"]}
        rows.append({
            "method": m, "label": study.ARMS[m].label, "seeds": [r["seed"] for r in rs],
            "mean": {c: statistics.fmean(v) if v else None for c, v in vals.items()},
            "std": {c: statistics.stdev(v) if len(v) > 1 else None for c, v in vals.items()},
            "values": vals, "suite_n": next((r["suite"]["n"] for r in rs if r["suite"]), None),
            "suite_name": "/".join(sorted(suites)) or None,
            "epoch1_pgd10": first, "left_chance": bool(first) and min(first) >= LEFT_CHANCE,
            "last_epoch_delta": last_delta, "curves": curves, "epochs": rs[0]["epochs"],
            "train_seconds": [r["train_seconds"] for r in rs],
        })  # fmt: skip
    comps = {}
    rng = np.random.default_rng(0)
    for col in COLUMNS:
        pairs = []
        for ra, rb in itertools.combinations(rows, 2):
            a = {r["seed"]: o for r in (recs[(ra["method"], s)] for s in ra["seeds"]) if (o := outcomes(r, col)) is not None}
            b = {r["seed"]: o for r in (recs[(rb["method"], s)] for s in rb["seeds"]) if (o := outcomes(r, col)) is not None}
            common = sorted(set(a) & set(b))
            if not common or any(len(a[s]) != len(b[s]) for s in common):
                continue
            p, lo, hi = bootstrap_p(a, b, rng)
            d = [100 * (a[s].mean() - b[s].mean()) for s in common]
            pairs.append({"a": ra["method"], "b": rb["method"], "seeds": common, "diff": statistics.fmean(d),
                          "ci95": [lo, hi], "p_boot": p, "p_paired_t": study.paired_t(d)})
        boot = study.holm([c["p_boot"] for c in pairs])
        t = study.holm([1.0 if c["p_paired_t"] is None else c["p_paired_t"] for c in pairs])
        for c, adj, adj_t in zip(pairs, boot, t):
            c["p_holm"], c["p_t_holm"] = adj, adj_t
            c["verdict"] = verdict(c)
        comps[col] = pairs
    return {"rows": rows, "comparisons": comps}


def verdict(c: dict) -> str:
    """A pair's verdict from its Holm-adjusted p-values, its difference and how many seeds it rests on.

    A method verdict (``MIN_SEEDS`` or more seeds) needs both tests below alpha: the hierarchical
    bootstrap (``p_holm``) and the paired t over seeds (``p_t_holm``), each Holm-adjusted over the
    column's pairs. The bootstrap alone is too liberal with few seeds: when every seed's difference
    has the same sign, no resample of the seeds crosses zero, so its p is ~0 whatever their spread
    (three seeds of one sign happen with probability 1/4 under no difference); the t test weighs
    the spread. Below ``MIN_SEEDS`` the bootstrap compares the trained models (its image part).
    """
    winner, loser = (c["a"], c["b"]) if c["diff"] > 0 else (c["b"], c["a"])
    if c["p_holm"] >= ALPHA:
        return "no difference measured"
    if (k := len(c["seeds"])) < MIN_SEEDS:  # the bootstrap then sees trained models, not methods
        models = f"{winner}'s model beats {loser}'s (1 seed" if k == 1 else f"{winner}'s models beat {loser}'s ({k} seeds"
        return models + ": not a method comparison yet)"
    if c["p_t_holm"] >= ALPHA:
        return "no difference measured"
    return f"{winner} beats {loser}"


def _pm(mean, std) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def markdown(doc: dict) -> str:
    ds = study.DATASETS[doc["dataset"]]
    lines = ["# Seed methods ranked (issue 16)", "",
             f"Generated by `python benchmarks/methods_rank.py report --dataset {doc['dataset']}`. Setting: {ds.label}, eps {ds.eps}; every method "
             "the same model, data and schedule (AToP: purifier stages of the same length on a standard-trained "
             "classifier of that model). Accuracy in % (mean ± std over seeds). Clean and PGD-20 (step 2.5 eps/20, "
             "random start): full test set, 10,000 images (AToP: one random draw per step, no EOT). Suite: AutoAttack's "
             "standard version on the first n test images (randomised models: its `rand` version with EOT-20). "
             f"Epoch 1: PGD-10 accuracy on the first 1,000 test images after epoch 1 (rule: >= {100 * LEFT_CHANCE:.0f} %, "
             "twice chance). Last-epoch change: the same accuracy's change over the last epoch, in points.", "",
             *table_lines(doc), "", comparisons_intro(), "", *comparison_lines(doc)]
    if doc.get("excluded"):
        lines += ["", "Left out: runs trained under another config than their method's: " + "; ".join(
            f"`{e['method']}` seed {e['seed']} ({e['differs']})" for e in doc["excluded"]) + "."]
    if doc.get("superseded"):
        lines += ["", "Superseded (set aside and trained again, records kept in `aal_study_runs/<setting>/superseded/`): "
                  + "; ".join(f"`{s['arm']}` seed {s['seed']} (`{s['run']}`, trained on {s['trained_on']}: clean "
                              f"{100 * s['accuracy']['clean']:.2f}, PGD-20 {100 * s['accuracy']['pgd20']:.2f}; "
                              f"{s['reason']}; {s['when']})" for s in doc["superseded"]) + "."]
    return "\n".join(lines) + "\n"


def table_lines(doc: dict) -> list[str]:
    """One row per method: the means over its seeds, its suite, and whether it left chance (per seed)."""
    lines = ["| method | seeds | clean | PGD-20 | suite (n) | epoch 1 PGD-10 | left chance | last-epoch change | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        suite = _pm(r["mean"]["suite"], r["std"]["suite"]) + (f" ({r['suite_n']}, {r['suite_name']})" if r["suite_n"] else "")
        e1 = ", ".join(f"{100 * v:.1f}" for v in r["epoch1_pgd10"]) or "-"
        delta = ", ".join(f"{v:+.1f}" for v in r["last_epoch_delta"]) or "-"
        secs = [s for s in r["train_seconds"] if s]
        secs_txt = f"{statistics.fmean(secs):.0f}" if secs else "-"
        lines.append(f"| `{r['method']}`: {r['label']} | {study._seed_list(r['seeds'])} | "
                     f"{_pm(r['mean']['clean'], r['std']['clean'])} | {_pm(r['mean']['pgd20'], r['std']['pgd20'])} | "
                     f"{suite} | {e1} | {'yes' if r['left_chance'] else 'NO'} | {delta} | {secs_txt} |")
    return lines


def comparisons_intro() -> str:
    return (f"Pairwise comparisons (A minus B, points; hierarchical bootstrap over seeds and images, {BOOT} resamples, "
            f"95 % interval, and paired t over seeds, each Holm-corrected over the pairs of each column, alpha {ALPHA}; "
            f"\"A beats B\" needs both on {MIN_SEEDS}+ seeds, the bootstrap alone compares models on fewer). Only pairs "
            "with a verdict other than \"no difference measured\" are listed; the JSON has all.")


def _holm_text(c: dict, n_pairs: int) -> str:
    # no resample crossed zero: the bootstrap only bounds p (2 / resamples, times Holm's factor)
    return f"< {2 * n_pairs / BOOT:.2g}" if c["p_holm"] == 0 else f"{c['p_holm']:.3g}"


def comparison_lines(doc: dict) -> list[str]:
    lines = []
    for col, label in COLUMNS.items():
        pairs = doc["comparisons"].get(col, [])
        won = [c for c in pairs if c["verdict"] != "no difference measured"]
        lines.append(f"- **{label}**: {_pairs(len(pairs))}, {len(won)} with a measured difference"
                     + (":" if won else "; no difference measured between any two methods."))
        for c in sorted(won, key=lambda c: -abs(c["diff"])):
            pt = "-" if c["p_paired_t"] is None else f"{c['p_paired_t']:.3g} (Holm {c['p_t_holm']:.3g})"
            lines.append(f"  - {c['verdict']}: `{c['a']}` - `{c['b']}` = {c['diff']:+.2f} "
                         f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] (p Holm {_holm_text(c, len(pairs))}, paired t {pt}, "
                         f"seeds {c['seeds']})")
    return lines


def readme_markers(dataset: str) -> tuple[str, str]:
    """The lines that enclose a setting's generated block in the README."""
    return (f"<!-- methods_rank table ({dataset}): generated by `python benchmarks/methods_rank.py report --dataset "
            f"{dataset}`; do not edit by hand -->", f"<!-- methods_rank table ({dataset}): end -->")


README = study.ROOT / "README.md"


def _pairs(n: int) -> str:
    return f"{n} pair" if n == 1 else f"{n} pairs"


def readme_verdicts(doc: dict) -> list[str]:
    """Per column, the *method* verdicts only (pairs compared on ``MIN_SEEDS`` or more seeds); pairs
    compared on fewer are counted, their model-level differences stay in ``methods_rank.md``."""
    lines = []
    for col, label in COLUMNS.items():
        pairs = doc["comparisons"].get(col, [])
        multi = [c for c in pairs if len(c["seeds"]) >= MIN_SEEDS]
        # the verdict analyse() wrote, not the rule again
        won = sorted((c for c in multi if c["verdict"] != "no difference measured"), key=lambda c: -abs(c["diff"]))
        one = len(pairs) - len(multi)
        if not multi:
            head = f"no pair of methods on {MIN_SEEDS}+ seeds yet"
        else:
            head = f"{_pairs(len(multi))} on {MIN_SEEDS}+ seeds, " + (
                f"{len(won)} with a measured difference" if won else "no difference measured between any two methods")
        lines.append(f"- **{label}**: {head}" + (f"; {_pairs(one)} on fewer seeds (models, not methods: see the report)."
                                                  if one else "."))
        for c in won:
            lines.append(f"  - {c['verdict']}: {abs(c['diff']):.2f} points [{min(abs(x) for x in c['ci95']):.2f}, "
                         f"{max(abs(x) for x in c['ci95']):.2f}] (bootstrap p Holm {_holm_text(c, len(pairs))}, "
                         f"paired t p Holm {c['p_t_holm']:.3g}; seeds {study._seed_list(c['seeds'])})")
    return lines


def readme_block(doc: dict) -> str:
    """The README's ranking table and method verdicts, rendered from ``methods_rank.json``."""
    intro = (f"Verdicts: hierarchical bootstrap over seeds and images ({BOOT} resamples, 95 % interval) and paired t over "
             f"seeds, each Holm-corrected over the pairs of each column, alpha {ALPHA}; \"A beats B\" only where both "
             f"say so, on {MIN_SEEDS} or more seeds.")
    begin, end = readme_markers(doc["dataset"])
    return "\n".join([begin, *table_lines(doc), "", intro, "", *readme_verdicts(doc), end])


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.2))
    for i, r in enumerate(doc["rows"]):
        color = plt.cm.tab10(i % 10)
        for j, c in enumerate(r["curves"]):
            ax[0].plot(range(1, len(c) + 1), [None if v is None else 100 * v for v in c], "-o", ms=3, color=color,
                       label=r["method"] if j == 0 else None)
        for j, (cl, rb) in enumerate(zip(r["values"]["clean"], r["values"]["suite"] or r["values"]["pgd20"])):
            ax[1].scatter(cl, rb, color=color, s=25, label=r["method"] if j == 0 else None)
    ax[0].axhline(100 * LEFT_CHANCE, color="0.5", ls="--")
    ax[0].set(title="PGD-10 % per epoch (first 1,000 test images; dashed: 2x chance)", xlabel="epoch", ylabel="PGD-10 %")
    ax[1].set(title="final: clean (10k) vs suite robust (n; PGD-20 10k where no suite)", xlabel="clean %", ylabel="robust %")
    for a in ax:
        a.title.set_fontsize(9)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(dataset: str = DATASET) -> str:
    """The setting's report, JSON and plot in ``benchmarks/results/``, and its README block where the
    README has the setting's markers (a setting without runs yet has none)."""
    excluded: list = []
    doc = {"dataset": dataset, **analyse(collect(excluded, dataset))}
    doc["excluded"] = [{"method": a, "seed": s, "differs": why} for a, s, why in excluded]
    doc["superseded"] = [s for s in study.superseded(dataset) if s["arm"] in METHODS or s["arm"] in study.STAGES]
    stem = study.RESULTS / SETTINGS[dataset]
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    if doc["rows"]:
        plot(doc, stem.with_suffix(".png"))
    text = markdown(doc)
    stem.with_suffix(".md").write_text(text)
    study.replace_block(README, *readme_markers(dataset), readme_block(doc))
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("train", "suite", "report", "carry"),
                   help="carry: copy this machine's unfinished runs of the setting into benchmarks/results/"
                        "aal_study_carry/ (commit it) so that a later session resumes them; train and suite restore them first")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--suite-n", type=int, default=1000)
    study.add_suite_options(p)
    p.add_argument("--lock", default=None, help="hold this file's lock (flock) during each run: share a core politely")
    p.add_argument("--then-suite", action="store_true", help="train: each method's suite right after it (same machine)")
    p.add_argument("--supersede-unrecoverable", action="store_true",
                   help="train: a published run whose model is needed (its suite, a next stage) but was trained on "
                        "another CPU kind is set aside (kept, reported) and trained again here, instead of stopping")
    p.add_argument("--dataset", choices=sorted(SETTINGS), default=DATASET,
                   help="the setting (default %(default)s; cifar10_rank reads CIFAR-10 from $AAL_CIFAR10 or ../shared/data)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.phase in ("train", "suite"):
        study.restore_carried(args.dataset)
    if args.phase == "carry":
        study.carry(args.dataset)
    elif args.phase == "train":
        train(methods, seeds, args.lock, args.suite_n if args.then_suite else 0, args.dataset,
              args.supersede_unrecoverable, study.suite_options(args))
    elif args.phase == "suite":
        suite(methods, seeds, args.suite_n, args.lock, args.dataset, study.suite_options(args))
    else:
        print(report(args.dataset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
