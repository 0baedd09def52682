"""Accuracy parity of bf16 training (issue 12): a bf16-trained model evaluated in fp32 against the
fp32-trained one, same config otherwise, two seeds each.

Each run is ``aal train CONFIG precision=P seed=S`` with the final evaluation (clean and PGD-20 on
the full test set, in fp32: evaluation runs in fp32 whatever the training precision) and
AutoAttack's standard suite on the first ``--suite-n`` test images (``eval.suite``, also fp32).
Runs are cached in ``benchmarks/out/precision_parity/`` (a finished run is not retrained, a killed
one resumes with ``aal train --resume``); the table goes to
``benchmarks/results/precision_parity.{json,md}`` with the paired differences (bf16 - fp32 per
seed) and their mean.

    OMP_NUM_THREADS=1 python benchmarks/precision_parity.py --epochs 3 --seeds 0,1 --suite-n 500
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "precision_parity"
RESULTS = ROOT / "benchmarks" / "results"
PRECISIONS = ("fp32", "bf16")


def run_one(config: str, precision: str, seed: int, epochs: int, suite_n: int) -> dict:
    """Train (or resume, or reuse) one run; its clean, PGD-20 and suite accuracies in %."""
    name = f"{Path(config).stem}-{precision}-s{seed}-e{epochs}-n{suite_n}"
    run = OUT / name
    if not (run / "results.json").exists():
        cmd = [sys.executable, "-m", "aal", "train"]
        if (run / "checkpoints").exists():
            cmd += ["--resume", str(run)]
        else:
            cmd += [config, f"precision={precision}", f"seed={seed}", f"epochs={epochs}", "threads=1", "progress=false",
                    "eval.attacks=[clean,pgd20]", "eval.n=null", "eval.suite=standard", f"eval.suite_n={suite_n}",
                    f"out_dir={OUT}", f"name={name}"]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT)
    res = json.loads((run / "results.json").read_text())
    acc = res["eval"]["accuracy"]
    suite_file = next((run / "eval").glob("suite-standard-*.json"))
    suite = json.loads(suite_file.read_text())
    robust = sum(1 for c in suite["robust"] if c == "1") / len(suite["robust"]) if isinstance(suite["robust"], str) \
        else float(suite["robust"])  # fmt: skip
    return {"precision": precision, "seed": seed, "run": str(run.relative_to(ROOT)), "clean": 100 * acc["clean"],
            "pgd20": 100 * acc["pgd20"], "suite": 100 * robust, "suite_n": suite_n, "eval_n": res["eval"]["n"],
            "train_seconds": res.get("train_seconds"), "recorded_precision": res.get("precision")}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fashion_mnist/fgsm_at.yaml")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--suite-n", type=int, default=500)
    a = p.parse_args()
    rows = [run_one(a.config, prec, int(s), a.epochs, a.suite_n) for s in a.seeds.split(",") for prec in PRECISIONS]
    diffs = {}
    for key in ("clean", "pgd20", "suite"):
        by = {(r["precision"], r["seed"]): r[key] for r in rows}
        d = [by[("bf16", s)] - by[("fp32", s)] for s in sorted({r["seed"] for r in rows})]
        diffs[key] = {"per_seed": d, "mean": statistics.fmean(d), "max_abs": max(abs(x) for x in d)}
    out = {"config": a.config, "epochs": a.epochs, "suite_n": a.suite_n, "rows": rows, "bf16_minus_fp32": diffs}
    (RESULTS / "precision_parity.json").write_text(json.dumps(out, indent=1))
    lines = [f"# bf16 vs fp32 training: accuracy parity ({a.config}, {a.epochs} epochs, evaluated in fp32)", "",
             f"Clean and PGD-20 on the full test set ({rows[0]['eval_n']} images); AutoAttack standard suite on the "
             f"first {a.suite_n}.", "", "| precision | seed | clean % | PGD-20 % | suite % | train s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['seed']} | {r['clean']:.2f} | {r['pgd20']:.2f} | {r['suite']:.2f} | "
                     f"{r['train_seconds'] or 0:.0f} |")
    lines += ["", "bf16 - fp32 per seed (points): " + "; ".join(
        f"{k} {', '.join(f'{x:+.2f}' for x in v['per_seed'])} (mean {v['mean']:+.2f})" for k, v in diffs.items())]
    (RESULTS / "precision_parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
