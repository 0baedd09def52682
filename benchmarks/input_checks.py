"""Overhead of the attacks' input checks (:func:`aal.attacks.check_images`), on vs off.

FGSM and PGD-10 on the small CNN (1x28x28), batch 128, random images in [0,1], fp32. Both
variants run in this one process, interleaved (on, off, off, on, ...: who goes first alternates
each repeat), so machine noise hits both alike; "off" replaces the check by a no-op. Prints the
median time per call of each and the ratio on/off (the checks' overhead is ratio - 1).

    python benchmarks/input_checks.py                    # ~1 minute on the 2-core CPU
    python benchmarks/input_checks.py --repeats 30 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import aal
import aal.attacks.base as attack_base


def _time(fn, calls: int, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20, help="interleaved on/off pairs per attack")
    ap.add_argument("--calls", type=int, default=5, help="attack calls per timing")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    model = aal.create_model("small_cnn").to(dev).eval()
    x = torch.rand(args.batch, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    checked = attack_base.check_images
    print(f"device {dev}, torch threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.repeats} interleaved pairs x {args.calls} calls")
    print(f"{'attack':<8} {'on ms':>8} {'off ms':>8} {'on/off':>8}")
    for name, attack in (("fgsm", aal.attacks.FGSM(eps=0.1)), ("pgd10", aal.attacks.PGD(eps=0.1, steps=10, seed=0))):
        attack(model, x, y)  # warm-up
        times: dict[str, list[float]] = {"on": [], "off": []}
        ratios = []
        for r in range(args.repeats):
            pair = {}
            for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                attack_base.check_images = checked if mode == "on" else (lambda *a, **k: None)
                try:
                    pair[mode] = _time(lambda: attack(model, x, y), args.calls, sync)
                finally:
                    attack_base.check_images = checked
                times[mode].append(pair[mode])
            ratios.append(pair["on"] / pair["off"])
        on, off = statistics.median(times["on"]), statistics.median(times["off"])
        print(f"{name:<8} {1e3 * on:8.2f} {1e3 * off:8.2f} {statistics.median(ratios):8.4f}  "
              f"(median of per-pair ratios; quartiles {statistics.quantiles(ratios, n=4)[0]:.4f}"
              f"..{statistics.quantiles(ratios, n=4)[2]:.4f})")
    # the check alone, for scale
    t = _time(lambda: checked(x, model), 200, sync)
    print(f"check_images alone on the batch: {1e6 * t:.1f} us")


if __name__ == "__main__":
    main()
