"""Time each stage of the standard suite (AutoAttack's standard version) on a small robust CNN.

Trains the small CNN with FGSM-AT (random start, Wong et al. 2020) for a few hundred steps on
Fashion-MNIST (the model ``benchmarks/speed.py`` times its suite on: real robustness, so every
stage has points to attack, in about a minute), then runs ``run_suite(..., "standard")`` on the first ``--n`` test images and prints the
per-stage table: accuracy after each stage, points attacked, seconds. One torch thread by default,
so the figures compare with the README's other one-thread timings.

    python benchmarks/suite_stages.py                          # 200 images, L-inf eps 0.1, 1 thread
    python benchmarks/suite_stages.py --norm l2 --eps 1.5
    python benchmarks/suite_stages.py --json benchmarks/results/suite_stages_linf.json

Only the ratios between stages carry over to other models: each stage's cost is (points it
attacks) x (its iterations, targets, queries) x (one forward/backward of the model).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from aal.engine.run import machine_description
from aal.eval import run_suite
from speed import suite_model  # the model speed.py's suite section times (benchmarks/ is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="test images (default 200)")
    parser.add_argument("--eps", type=float, default=0.1, help="suite budget (default 0.1)")
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf")
    parser.add_argument("--train-steps", type=int, default=300, help="FGSM-AT steps (default 300, as speed.py)")
    parser.add_argument("--train-eps", type=float, default=0.1, help="FGSM-AT L-inf budget (default 0.1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, test = suite_model("fgsm_at", args.train_eps, args.train_steps)
    train_s = time.perf_counter() - t0
    res = run_suite(model, test, "standard", eps=args.eps, norm=args.norm, n=args.n, batch_size=args.n, seed=0)
    print(f"model: small_cnn, FGSM-AT {args.train_steps} steps (eps {args.train_eps}), trained in {train_s:.0f} s")
    print(res.table())
    print(f"total suite time: {sum(res.seconds.values()):.1f} s; machine: {machine_description()}; threads {args.threads}")
    if args.json:
        payload = {"result": res.to_dict(), "train_steps": args.train_steps, "train_eps": args.train_eps,
                   "threads": args.threads, "machine": machine_description(),
                   "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)


if __name__ == "__main__":
    main()
