"""How often bf16 autocast flips the sign of the input gradient an L-inf attack steps along.

FGSM and PGD step by ``sign(dL/dx)``; under bf16 autocast (:mod:`aal.utils.precision`) the
convolutions run with 8 mantissa bits, so the gradient is perturbed and some signs flip. This
script measures how many, on a trained model, and what it does to the attacks' strength:

1. trains the small CNN with FGSM-AT on Fashion-MNIST for ``--epochs`` epoch(s) (``aal train
   configs/fashion_mnist/fgsm_at.yaml epochs=1``, fp32, in a temporary folder);
2. on the first ``--n`` test images, the input gradient of the cross-entropy at the clean images
   and at PGD-10 points (where an attack's later steps are taken), in fp32 and under bf16
   autocast (same weights, same points);
3. reports the fraction of pixels whose sign differs (a zero gradient counts as a sign), over
   all pixels and restricted to pixels with a non-negligible fp32 gradient (``|g| >= tau *
   max |g|`` of their image, tau = 1e-3, 1e-2, 1e-1), and the cosine similarity of the two;
4. the robust accuracy under FGSM and PGD-20 (eps 0.1) run in fp32 and in bf16.

Usage (one thread, under the shared lock, as every benchmark here):
    flock /tmp/aal-cpu.lock env OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bf16_grad_sign.py
It writes ``benchmarks/results/bf16_grad_sign.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TAUS = (1e-3, 1e-2, 1e-1)


def input_grad(model, x, y, precision: str) -> torch.Tensor:
    """dCE/dx at ``x`` (summed over the batch), the forward/backward under ``precision``'s autocast."""
    from aal.utils.precision import autocast_context

    x = x.detach().clone().requires_grad_(True)
    with autocast_context(precision, "cpu"):
        loss = F.cross_entropy(model(x), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    return g


def sign_stats(g32: torch.Tensor, g16: torch.Tensor) -> dict:
    """Sign disagreement of ``g16`` against ``g32``, overall and on non-negligible pixels."""
    flip = torch.sign(g32) != torch.sign(g16)
    per_image_max = g32.abs().flatten(1).amax(1).view(-1, *([1] * (g32.dim() - 1)))
    out = {"flip_all": float(flip.float().mean()), "zero_fp32": float((g32 == 0).float().mean()),
           "zero_bf16": float((g16 == 0).float().mean()),
           "cosine": float(F.cosine_similarity(g32.flatten(1), g16.flatten(1), dim=1).mean())}
    for tau in TAUS:
        big = g32.abs() >= tau * per_image_max
        out[f"flip_tau{tau:g}"] = float(flip[big].float().mean())
        out[f"frac_pixels_tau{tau:g}"] = float(big.float().mean())
    return out


def train_model(epochs: int, out_dir: str, extra: tuple[str, ...] = ()):
    """FGSM-AT on Fashion-MNIST (fp32, one thread) into ``out_dir``: (run_dir, result, seconds)."""
    from aal.config import load_config
    from aal.engine.run import train_run

    cfg = load_config(ROOT / "configs/fashion_mnist/fgsm_at.yaml",
                      [f"epochs={epochs}", "progress=false", "eval.epoch_n=0", "eval.n=1000",
                       "eval.attacks=clean,fgsm", f"out_dir={out_dir}", "threads=1", *extra])
    t0 = time.perf_counter()
    run_dir, result = train_run(cfg, log=lambda _m: None)
    return run_dir, result, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--n", type=int, default=2000, help="test images")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/bf16_grad_sign.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from aal.attacks import PGD
    from aal.engine.run import load_run
    from aal.eval import evaluate

    with tempfile.TemporaryDirectory(prefix="aal-bf16-") as tmp:
        run_dir, train_result, train_s = train_model(args.epochs, tmp)
        cfg, model, bundle = load_run(run_dir)
    model.eval()
    x = bundle.test.images[: args.n].float().div(255)
    y = bundle.test.labels[: args.n].long()
    with torch.enable_grad():
        x_pgd = PGD(args.eps, steps=10, rand_init=True, seed=0)(model, x, y)
    stats = {}
    for where, pts in (("clean", x), ("pgd10", x_pgd)):
        g32 = torch.cat([input_grad(model, pts[i:i + 500], y[i:i + 500], "fp32") for i in range(0, len(y), 500)])
        g16 = torch.cat([input_grad(model, pts[i:i + 500], y[i:i + 500], "bf16") for i in range(0, len(y), 500)])
        stats[where] = sign_stats(g32, g16)
    acc = {}
    for precision in ("fp32", "bf16"):
        res = evaluate(model, (x[:1000], y[:1000]), attacks=("clean", "fgsm", "pgd20"), eps=args.eps, batch_size=500,
                       precision=precision)
        acc[precision] = res.accuracy
    payload = {
        "what": "sign(dCE/dx) under bf16 autocast vs fp32, small CNN after FGSM-AT on Fashion-MNIST",
        "command": "flock /tmp/aal-cpu.lock env OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bf16_grad_sign.py",
        "model": {"config": "configs/fashion_mnist/fgsm_at.yaml", "epochs": args.epochs, "train_seconds": train_s,
                  "clean_acc_1000": train_result.accuracy["clean"], "fgsm_acc_1000": train_result.accuracy["fgsm"]},
        "n_images": int(len(y)),
        "non_negligible": "pixels with |g_fp32| >= tau * (max |g_fp32| of the image)",
        "grad_sign": stats,
        "accuracy_first_1000": acc,
        "eps": args.eps,
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
