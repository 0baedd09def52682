"""Clean SSD vs SSD + AAL on BCCD (AAL paper Sec. 4.2, Table 4, scaled down): test mAP@0.5 over seeds.

Both arms run the same config (configs/detection/bccd_ssd.yaml and bccd_ssd_aal.yaml: same model,
data, epochs, optimizer and schedule; only the method differs), for each seed; the report gives
per-seed test mAP@0.5 and per-class AP, mean +- std over seeds, the paired per-seed difference,
and the wall time per arm. Evaluation is on the clean test split (72 images), as the paper
("the clean validation set is used for testing").

    python benchmarks/detection.py --seeds 0 1 2 --json runs/detection_bench.json     # the full comparison
    python benchmarks/detection.py --smoke                                            # minutes: plumbing only
    python benchmarks/detection.py --set data.image_size=300 --set epochs=24          # any config override

Cost on this 2-core CPU (one thread, 160 px, 205 training images): about 30 s per epoch for
clean SSD and 45 s for SSD + AAL (one associative pass + a clean and an adversarial training
pass), so the default 24 epochs x 2 arms x 3 seeds is about 1.5 hours.

``--smoke`` runs 1 epoch on 8 training and 8 test images at 96 pixels, one seed: it checks the
pipeline, its numbers mean nothing. The machine and data used are written into the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from aal.engine.run import machine_description
from aal.engine.task_runs import train_detection
from aal.tasks.detection import load_detection_config
from aal.utils.runtime import tune_malloc

REPO = Path(__file__).resolve().parents[1]
ARMS = {"ssd": REPO / "configs" / "detection" / "bccd_ssd.yaml", "ssd_aal": REPO / "configs" / "detection" / "bccd_ssd_aal.yaml"}
SMOKE = [
    "epochs=1", "data.image_size=96", "data.batch_size=4", "data.train_n=8", "data.val_split=null", "data.test_n=8",
    "eval.top_k=50",
]  # fmt: skip


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", default=None, help="BCCD folder (default: $AAL_DATA/bccd, then ../shared/data/bccd)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both arms")
    p.add_argument("--smoke", action="store_true", help="tiny plumbing run (1 epoch, 8 images, one seed)")
    p.add_argument("--out-dir", default=None, help="keep each run's folder (metrics, checkpoint) under this folder")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.root
    if root is None:
        shared = REPO.parent / "shared" / "data" / "bccd"
        root = str(shared) if shared.is_dir() else None
    overrides = (SMOKE if args.smoke else []) + list(args.set) + ([f"data.root={root}"] if root else []) + ["progress=false"]
    seeds = args.seeds[:1] if args.smoke else args.seeds

    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in seeds:
        for arm, path in ARMS.items():  # arms interleaved per seed: drift of the machine hits both
            cfg = load_detection_config(path, overrides + [f"seed={seed}"])
            run_dir = Path(args.out_dir) / f"{arm}-seed{seed}" if args.out_dir else None
            t0 = time.perf_counter()
            _, res = train_detection(cfg, run_dir=run_dir, log=lambda s: None)
            wall = time.perf_counter() - t0
            test = res["test"]
            runs[arm].append({"seed": seed, "test": test, "train_seconds": res["train_seconds"], "wall_seconds": wall})
            aps = "  ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in test.items() if "/" in k)
            print(f"{arm:8s} seed {seed}: test mAP@0.5 {test['map50']:.4f}  ({aps})  {wall:.0f}s", flush=True)

    summary = {}
    for arm, rs in runs.items():
        m, s = _mean_std([r["test"]["map50"] for r in rs])
        per_class = {}
        for key in rs[0]["test"]:
            if "/" in key:
                per_class[key] = _mean_std([r["test"][key] for r in rs])
        summary[arm] = {"map50_mean": m, "map50_std": s, "per_class": per_class, "seconds_mean": statistics.fmean(r["wall_seconds"] for r in rs)}
    diffs = [a["test"]["map50"] - b["test"]["map50"] for a, b in zip(runs["ssd_aal"], runs["ssd"])]
    dm, ds = _mean_std(diffs)
    print()
    print("| method | test mAP@0.5 (mean +- std over seeds) | " + " | ".join(k.split("/")[-1] for k in summary["ssd"]["per_class"]) + " | s/run |")
    print("|---|---|" + "---|" * len(summary["ssd"]["per_class"]) + "---|")
    for arm, sm in summary.items():
        cls = " | ".join(f"{v[0]:.3f}" for v in sm["per_class"].values())
        print(f"| {arm} | {sm['map50_mean']:.4f} +- {sm['map50_std']:.4f} | {cls} | {sm['seconds_mean']:.0f} |")
    print(f"\nAAL - clean, paired over {len(diffs)} seed(s): {dm:+.4f} +- {ds:.4f} mAP@0.5" + ("  (smoke run: meaningless)" if args.smoke else ""))
    report = {
        "benchmark": "detection: clean SSD vs SSD+AAL on BCCD",
        "smoke": args.smoke,
        "overrides": overrides,
        "configs": {arm: str(path.relative_to(REPO)) for arm, path in ARMS.items()},
        "seeds": seeds,
        "runs": runs,
        "summary": summary,
        "aal_minus_clean": {"mean": dm, "std": ds, "per_seed": diffs},
        "machine": machine_description(),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
