"""BatchNorm folding in attacks (aal.utils.fold), on vs off, side by side in one process.

aal's PGD-3 and FGSM with ``fold_bn=True`` (the default) and ``fold_bn=False`` on ResNet-18 (20
conv->BN pairs fold) and PreAct-ResNet-18 (8 pairs), fp32, batch 128, channels_last, malloc tuned
as the CLI does; interleaved rounds (alternating who goes first), median seconds per call.

    python benchmarks/fold_speed.py --out benchmarks/results/fold_speed.json

Quote the ratios; stop other jobs first (the result file records the load average).
"""
import argparse, json, os, statistics, sys, time
import torch
from aal.utils.runtime import tune_malloc
tune_malloc()
from aal.models import create_model
from aal.attacks import PGD, FGSM
p = argparse.ArgumentParser()
p.add_argument("--out", default=None)
args = p.parse_args()
torch.manual_seed(0)
out = {"load_before": os.getloadavg(), "threads": torch.get_num_threads(), "torch": torch.__version__}
for name in ("resnet18", "preact_resnet18"):
    m = create_model(name, num_classes=10, in_channels=3, channels_last=True).eval()
    x = torch.rand(128, 3, 32, 32).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 10, (128,))
    for atk_name, on, off, rounds in (("pgd3", PGD(8/255, steps=3, step_size=2/255), PGD(8/255, steps=3, step_size=2/255, fold_bn=False), 8),
                                       ("fgsm", FGSM(8/255), FGSM(8/255, fold_bn=False), 16)):
        on(m, x, y); off(m, x, y)
        t = {"on": [], "off": []}
        for r in range(rounds):
            for k in (("on", "off") if r % 2 == 0 else ("off", "on")):
                a = on if k == "on" else off
                s = time.perf_counter(); a(m, x, y); t[k].append(time.perf_counter() - s)
        on_, off_ = statistics.median(t["on"]), statistics.median(t["off"])
        out[f"{name}/{atk_name}"] = {"folded_s": on_, "unfolded_s": off_, "gain": off_ / on_, "rounds": rounds}
        print(name, atk_name, f"folded {on_:.3f}s unfolded {off_:.3f}s gain {off_/on_:.3f}x ({rounds} rounds)", flush=True)
out["load_after"] = os.getloadavg()
print(json.dumps(out))
if args.out:
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
