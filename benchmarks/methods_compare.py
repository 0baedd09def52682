"""The seed methods side by side on Fashion-MNIST at eps 0.1 (issue 5's evidence).

PGD-AT, TRADES, AT-AWP, TRADES-AWP, MART, UIAT, SPAT, AAL+PGD and AToP (purifier + standard classifier), each for
``--seeds``, with the same model (small_cnn with CBAM after the first conv, so that AAL's
attention exists and every method trains the identical architecture; SPAT adds its cosine
head, which is part of the method), the same data slice, epochs, optimiser and schedule: the
shipped ``configs/fashion_mnist/<method>.yaml`` plus the common overrides of
``benchmarks/aal_compare.py`` (seed, epochs, ``data.train_n``, 1 thread).

AToP is three runs per seed: ``standard`` (the classifier it defends, same overrides) ->
``atop_pretrain`` (purifier reconstruction) -> ``atop_finetune`` (reconstruction + lambda CE on
adversarial examples of the *whole pipeline*, the honest threat model); its epochs are the
same ``--epochs`` for each stage, its time per epoch is that of the fine-tuning stage.

Every trained model is evaluated the same way:

* clean, FGSM and PGD-20 (eps 0.1, step 2.5 eps/20, random start) on the first ``--eval-n``
  test images, by the trainer's final evaluation (no EOT: for AToP this PGD-20 is marked);
* PGD-20 and the AutoAttack-style suite (:func:`aal.eval.suite.run_suite`) on the first
  ``--suite-n`` test images: ``standard`` (APGD-CE -> APGD-T -> Square) for deterministic
  models, ``rand`` (APGD-CE -> APGD-DLR, AutoAttack's version for randomised defences) with EOT
  over ``--eot-n`` draws per step (default 20) for randomised ones (AToP), said in the table.

Writes ``benchmarks/results/methods_compare.{json,md,png}``: every run (config, accuracies,
seconds per epoch, suite stages and times) and the mean ± std over seeds per method.

    python benchmarks/methods_compare.py --seeds 0,1,2 --epochs 3 --train-n 4000 --suite-n 200
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aal_compare import EPS, RESULTS, ROOT, common_overrides, grouped_bars, run_one  # noqa: E402

METHODS = {  # name -> (config file, label)
    "pgd_at": ("pgd_at.yaml", "PGD-AT (PGD-10)"),
    "trades": ("trades.yaml", "TRADES (beta 6)"),
    "awp_pgd_at": ("awp_pgd_at.yaml", "AT-AWP (PGD-10, gamma 0.01)"),
    "awp_trades": ("awp_trades.yaml", "TRADES-AWP (beta 6, gamma 0.005)"),
    "mart": ("mart.yaml", "MART (beta 6)"),
    "uiat": ("uiat.yaml", "UIAT (eps_inv 0.05, beta 1)"),
    "spat": ("spat.yaml", "SPAT (cosine head, beta 6)"),
    "aal_pgd": ("aal_pgd.yaml", "AAL+PGD (PGD-10 in k(M^a))"),
    "atop": ("atop_finetune.yaml", "AToP (U-Net purifier + standard classifier)"),
}
COLUMNS = ("clean", "pgd20", "suite_pgd20", "suite")


def suite_eval(run_dir: Path, n: int, eot_n: int) -> dict:
    """PGD-20 and the AutoAttack-style suite on the first ``n`` test images, cached.

    Deterministic models get the ``standard`` suite; randomised ones (AToP's random transform)
    get AutoAttack's ``rand`` suite (APGD-CE -> APGD-DLR) with EOT over ``eot_n`` draws, as
    AutoAttack evaluates randomised defences (Square's 5000 queries would each need the EOT
    draws too). The key ``"standard"`` holds whichever suite ran; its ``suite`` field says which.
    """
    cache = run_dir / f"methods_compare_suite_n{n}_eot{eot_n}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    import torch

    from aal.attacks import from_spec
    from aal.engine.run import load_run
    from aal.eval import is_randomized
    from aal.eval.suite import run_suite

    torch.set_num_threads(1)
    _, model, bundle = load_run(run_dir)
    probe = bundle.test.images[:32].float().div(255)
    named = "rand" if is_randomized(model, probe) else "standard"
    out = {}
    for name, label, suite in (("pgd20", "pgd20", [("pgd20", from_spec("pgd20", EPS))]), ("standard", named, named)):
        res = run_suite(model, bundle.test, suite, eps=EPS, n=n, seed=0, eot="auto", eot_n=eot_n,
                        state_path=run_dir / "eval" / f"methods_compare-{label}-n{n}-eot{eot_n}.json")
        out[name] = res.to_dict()
    cache.write_text(json.dumps(out, indent=1))
    return out


def atop_chain(args: argparse.Namespace, seed: int, out_root: str) -> dict:
    """standard -> atop_pretrain -> atop_finetune for one seed; the fine-tuned record, with the stages' times."""
    common = [o for o in common_overrides(args, seed) if not o.startswith("model.attention")]
    std = run_one("standard", seed, "standard.yaml", common_overrides(args, seed), out_root)
    pre = run_one("atop_pretrain", seed, "atop_pretrain.yaml",
                  [*common, f"model.classifier_run={std['run_dir']}"], out_root)
    fine = run_one("atop", seed, "atop_finetune.yaml",
                   [*common, f"model.classifier_run={std['run_dir']}", f"model.purifier_run={pre['run_dir']}"], out_root)
    fine["stages"] = {k: {"run_dir": r["run_dir"], "epoch_time": r["epoch_time"], "accuracy": r["accuracy"]}
                      for k, r in (("standard", std), ("atop_pretrain", pre))}
    return fine


def run_all(args: argparse.Namespace) -> dict:
    out_root = str(Path(args.out_dir).resolve())
    Path(out_root).mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    runs = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:  # seed-major: a cut-short run still has whole seeds
        for m in methods:
            t0 = time.time()
            if m == "atop":
                rec = atop_chain(args, seed, out_root)
            else:
                rec = run_one(m, seed, METHODS[m][0], common_overrides(args, seed), out_root)
            rec["method"] = m
            rec["suite"] = suite_eval(Path(rec["run_dir"]), args.suite_n, args.eot_n)
            runs.append(rec)
            s = rec["suite"]
            print(f"[{time.strftime('%H:%M:%S')}] {m} seed {seed}: clean {rec['accuracy']['clean']:.4f} "
                  f"pgd20 {rec['accuracy']['pgd20']:.4f} | n={args.suite_n}: pgd20 {s['pgd20']['accuracy']['robust']:.4f} "
                  f"suite {s['standard']['accuracy']['robust']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    return {"methods": methods, "labels": {m: METHODS[m][1] for m in methods}, "runs": runs}


def value(rec: dict, col: str) -> float:
    if col in ("clean", "pgd20"):
        return 100 * rec["accuracy"][col]
    return 100 * rec["suite"]["pgd20" if col == "suite_pgd20" else "standard"]["accuracy"]["robust"]


def summarize(doc: dict) -> list[dict]:
    rows = []
    for m in doc["methods"]:
        recs = [r for r in doc["runs"] if r["method"] == m]
        if not recs:
            continue
        row = {"method": m, "label": doc["labels"][m], "n_seeds": len(recs)}
        for c in COLUMNS:
            vals = [value(r, c) for r in recs]
            row[c] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        row["epoch_time"] = statistics.fmean(t for r in recs for t in r["epoch_time"])
        eot = {r["suite"]["standard"].get("eot_n") for r in recs}
        row["eot"] = next(iter(eot)) if len(eot) == 1 else sorted(eot, key=str)
        row["suite_name"] = "/".join(sorted({r["suite"]["standard"]["suite"] for r in recs}))
        stage_t = [sum(r["suite"]["standard"]["seconds"].get(k, 0.0) for k in r["suite"]["standard"]["seconds"] if k != "clean")
                   for r in recs]  # fmt: skip
        row["suite_seconds"] = statistics.fmean(stage_t)
        rows.append(row)
    return rows


def markdown(doc: dict) -> str:
    a = doc["args"]
    out = ["# Seed methods on Fashion-MNIST, eps 0.1", "",
           f"Command: `{doc['command']}`  ",
           f"Measured {doc['finished']} on {doc['machine']}; seeds {a['seeds']}, {a['epochs']} epochs on the first "
           f"{a['train_n']} training images, small_cnn + CBAM for every method (SPAT: cosine head), SGD lr 0.05 cosine, "
           f"batch 128 (AToP: Adam 1e-3, its own schedule). Accuracy in % (mean ± std over seeds). Clean and PGD-20: first "
           f"{a['eval_n']} test images; PGD-20 (n) and the AutoAttack-style suite (per-sample worst case): first "
           f"{a['suite_n']} test images, the same images for every run; `standard` = APGD-CE -> APGD-T -> Square 5000 "
           f"queries for deterministic models, `rand` = APGD-CE -> APGD-DLR with EOT for randomised ones (AutoAttack's "
           f"versions). `s/epoch`: wall time "
           f"of one training epoch with 1 thread (other jobs shared the 2 cores: compare within this table only; AToP: the "
           f"fine-tuning stage). `suite s`: seconds of the suite's attacks per model.", "",
           "| method | seeds | clean | PGD-20 | PGD-20 (n) | suite (n) | s/epoch | suite s | suite, EOT |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in summarize(doc):
        cells = " | ".join(f"{r[c][0]:.2f} ± {r[c][1]:.2f}" for c in COLUMNS)
        eot = f"{r['suite_name']}, " + (f"{r['eot']} draws" if r["eot"] else "no EOT (deterministic)")
        out.append(f"| `{r['method']}`: {r['label']} | {r['n_seeds']} | {cells} | {r['epoch_time']:.1f} | "
                   f"{r['suite_seconds']:.0f} | {eot} |")
    out.append("")
    out.append("AToP's PGD-20 column (trainer's final evaluation) attacks one random draw per step (no EOT); the "
               "(n) columns use EOT and are the ones to compare.")
    return "\n".join(out)


def plot(doc: dict, path: Path) -> None:
    rows, a = summarize(doc), doc["args"]
    grouped_bars(rows, {"clean": "clean", "suite_pgd20": "PGD-20", "suite": "AutoAttack-style suite"}, [r["method"] for r in rows],
                 f"accuracy % (clean: first {a['eval_n']}, attacks: first {a['suite_n']} test images)",
                 f"Fashion-MNIST eps 0.1: {len(a['seeds'].split(','))} seeds, {a['epochs']} epochs, {a['train_n']} train images",
                 path, rotation=20)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-n", type=int, default=4000)
    p.add_argument("--eval-n", type=int, default=1000)
    p.add_argument("--suite-n", type=int, default=200)
    p.add_argument("--eot-n", type=int, default=20,
                   help="EOT draws per attack step for randomised models (AToP); default EOT-20")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "out" / "methods_compare"))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--render-only", action="store_true", help="only rewrite the Markdown and plot from the JSON")
    args = p.parse_args(argv)
    results = Path(args.results)
    jpath = results / "methods_compare.json"
    if not args.render_only:
        unknown = [m for m in args.methods.split(",") if m and m not in METHODS]
        if unknown:
            p.error(f"unknown methods {unknown} (known: {', '.join(METHODS)})")
        from aal.engine.run import machine_description

        t0 = time.time()
        doc = run_all(args)
        mach = machine_description()
        doc.update(
            command="python benchmarks/methods_compare.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            args={k: getattr(args, k) for k in ("seeds", "epochs", "train_n", "eval_n", "suite_n", "eot_n")},
            wall_seconds=time.time() - t0, finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            machine=f"{mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, commit {mach['aal_commit']}",
        )
        results.mkdir(parents=True, exist_ok=True)
        jpath.write_text(json.dumps(doc, indent=1))
    doc = json.loads(jpath.read_text())
    (results / "methods_compare.md").write_text(markdown(doc))
    plot(doc, results / "methods_compare.png")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
