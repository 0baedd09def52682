"""torch.compile for an attack's forward/backward, against eager, side by side in one process.

A plain FGSM step (forward, input-gradient backward, sign step) on the small CNN (1x28x28,
channels_last, batch 128, parameters frozen as in aal's attacks), eager vs ``torch.compile(model)``
(inductor, default mode), and aal's own ``FGSM`` call on the same model (its whole loop: checks,
threat model, mode context), interleaved rounds, median seconds per call; also whether compiled
and eager give identical examples. Issue 12 asked whether compiling the attack loop closes the
small-CNN FGSM gap; the aal rows say how far aal's FGSM (and the same step through the generic
loop, i.e. without FGSM's fast path) is from a minimal FGSM.

    OMP_NUM_THREADS=1 python benchmarks/compile_speed.py --out benchmarks/results/compile_speed.json
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from aal.attacks import FGSM
from aal.attacks.base import IterativeAttack
from aal.models import create_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    m = create_model("small_cnn", num_classes=10, in_channels=1, channels_last=True).eval()
    for q in m.parameters():
        q.requires_grad_(False)
    x = torch.rand(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))

    def fgsm(model):
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xx), y), xx)
        return (x + 8 / 255 * g.sign()).clamp(0, 1)

    compiled = torch.compile(m)
    t0 = time.perf_counter()
    fgsm(compiled)
    compile_s = time.perf_counter() - t0
    for _ in range(10):
        fgsm(compiled), fgsm(m)
    aal_fgsm = FGSM(8 / 255)
    # the same one step through the generic loop (latent u = 0, straight-through clip): FGSM without its fast path
    generic = IterativeAttack(8 / 255, steps=1, step_size=8 / 255, rand_init=False)
    calls = {"eager": lambda: fgsm(m), "compiled": lambda: fgsm(compiled), "aal": lambda: aal_fgsm(m, x, y),
             "aal_generic": lambda: generic(m, x, y)}
    t = {k: [] for k in calls}
    for r in range(args.rounds):
        for k in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            s = time.perf_counter()
            calls[k]()
            t[k].append(time.perf_counter() - s)
    e, c, a, gen = (statistics.median(t[k]) for k in ("eager", "compiled", "aal", "aal_generic"))
    out = {"eager_s": e, "compiled_s": c, "speedup": e / c, "aal_fgsm_s": a, "aal_over_minimal": a / e,
           "aal_generic_loop_s": gen, "fast_path_gain": gen / a,
           "fast_path_identical": bool(torch.equal(aal_fgsm(m, x, y), generic(m, x, y))),
           "first_call_s": compile_s,
           "identical": bool(torch.equal(fgsm(m), fgsm(compiled))), "threads": torch.get_num_threads(),
           "load": os.getloadavg(), "torch": torch.__version__}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
