"""BatchNorm folding in attacks (aal.utils.fold), on vs off, side by side in one process.

aal's PGD-3 and FGSM with ``fold_bn=True`` (the default) and ``fold_bn=False`` on ResNet-18 (20
conv->BN pairs fold) and PreAct-ResNet-18 (8 pairs), fp32, batch 128, channels_last, malloc tuned
as the CLI does; interleaved rounds (alternating who goes first, after one warm-up call each),
median seconds per call.

    python benchmarks/fold_speed.py --out benchmarks/results/fold_speed.json

Quote the ratios; stop other jobs first (the result file records the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision_speed import interleaved  # noqa: E402  (the same interleaved timing)

ROUNDS = {"pgd3": 8, "fgsm": 16}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from aal.utils.runtime import tune_malloc

    tune_malloc()  # as the aal CLI does at start-up
    from aal.attacks import FGSM, PGD
    from aal.models import create_model

    torch.manual_seed(0)
    out = {"load_before": os.getloadavg(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    attacks = {"pgd3": lambda fold: PGD(8 / 255, steps=3, step_size=2 / 255, fold_bn=fold),
               "fgsm": lambda fold: FGSM(8 / 255, fold_bn=fold)}
    for name in ("resnet18", "preact_resnet18"):
        m = create_model(name, num_classes=10, in_channels=3, channels_last=True).eval()
        x = torch.rand(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (128,))
        for atk_name, make in attacks.items():
            on, off = make(True), make(False)
            t = interleaved({"on": lambda: on(m, x, y), "off": lambda: off(m, x, y)}, ROUNDS[atk_name])
            on_, off_ = statistics.median(t["on"]), statistics.median(t["off"])
            out[f"{name}/{atk_name}"] = {"folded_s": on_, "unfolded_s": off_, "gain": off_ / on_, "rounds": ROUNDS[atk_name]}
            print(name, atk_name, f"folded {on_:.3f}s unfolded {off_:.3f}s gain {off_ / on_:.3f}x", flush=True)
    out["load_after"] = os.getloadavg()
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
