"""Does AWP's weight perturbation survive bf16 autocast? Its loss gain, fp32 vs bf16, same batches.

Under bf16 autocast the convolutions see ``w + v`` rounded to 8 mantissa bits; AWP's ``v`` is
``gamma`` (0.5-1 %) of each layer's norm, the same order as that rounding, so it could be rounded
away, and an AWP run in bf16 would then be plain PGD-AT / TRADES. AWP logs ``awp_loss_gain`` (the
training loss at ``w + v`` minus the loss at ``w`` on the same batch) as the evidence that it acted.
This script:

1. trains the ranking study's model (small CNN + ``cbam_in``) with FGSM-AT on Fashion-MNIST for
   ``--epochs`` epoch(s), fp32, in a temporary folder (``bf16_grad_sign.train_model``);
2. on ``--batches`` training batches of 128, calls ``awp_pgd_at`` (gamma 0.01) and ``awp_trades``
   (gamma 0.005, no warm-up) from the same weights and seed in fp32 and under bf16 autocast, and
   reports each ``awp_loss_gain`` and the bf16/fp32 ratio of the means.

    flock /tmp/aal-cpu.lock env OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/awp_bf16.py

It writes ``benchmarks/results/awp_bf16.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bf16_grad_sign import train_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"awp_pgd_at": 0.01, "awp_trades": 0.005}  # the official codes' gamma


def gains(model, x, y, name: str, gamma: float, precision: str, seed: int) -> float:
    """``awp_loss_gain`` of one call of ``name`` on a copy of ``model`` (train mode)."""
    from aal.methods import create_method
    from aal.utils.precision import autocast_context

    m = copy.deepcopy(model).train()
    method = create_method(name, eps=0.1, steps=10, step_size=0.025, gamma=gamma, awp_warmup=0)
    torch.manual_seed(seed)  # the same random start in both precisions
    with autocast_context(precision, "cpu"):
        out = method(m, (x, y))
    method.after_backward(m)
    return out.logs["awp_loss_gain"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/awp_bf16.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from aal.engine.run import load_run

    with tempfile.TemporaryDirectory(prefix="aal-awp-") as tmp:
        run_dir, train_result, train_s = train_model(args.epochs, tmp, ("model.attention=cbam_in",))
        _, model, bundle = load_run(run_dir)
    per = {}
    for name, gamma in METHODS.items():
        res = {"fp32": [], "bf16": []}
        for b in range(args.batches):
            x = bundle.train.images[b * 128:(b + 1) * 128].float().div(255)
            y = bundle.train.labels[b * 128:(b + 1) * 128].long()
            for precision in res:
                res[precision].append(gains(model, x, y, name, gamma, precision, seed=b))
        means = {k: statistics.fmean(v) for k, v in res.items()}
        per[name] = {"gamma": gamma, "gain": res, "mean": means, "bf16_over_fp32": means["bf16"] / means["fp32"]}
        print(f"{name}: mean gain fp32 {means['fp32']:.4f} bf16 {means['bf16']:.4f} "
              f"(ratio {per[name]['bf16_over_fp32']:.3f})", flush=True)
    payload = {
        "what": "AWP's loss gain (loss at w+v minus at w, same batch) in fp32 and under bf16 autocast",
        "command": "flock /tmp/aal-cpu.lock env OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/awp_bf16.py",
        "model": {"config": "configs/fashion_mnist/fgsm_at.yaml model.attention=cbam_in", "epochs": args.epochs,
                  "train_seconds": train_s, "clean_acc_1000": train_result.accuracy["clean"],
                  "fgsm_acc_1000": train_result.accuracy["fgsm"]},
        "batches": args.batches, "batch_size": 128, "methods": per,
        "threads": torch.get_num_threads(), "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    Path(args.out).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
