"""torch.compile for an attack's forward/backward, against eager, side by side in one process.

A plain FGSM step (forward, input-gradient backward, sign step) on the small CNN (1x28x28,
channels_last, batch 128, parameters frozen as in aal's attacks), eager vs ``torch.compile(model)``
(inductor, default mode), and aal's own ``FGSM`` call on the same model (its whole loop: checks,
threat model, mode context), interleaved rounds, median seconds per call; also whether compiled
and eager give identical examples. Issue 12 asked whether compiling the attack loop closes the
small-CNN FGSM gap; the aal rows say how far aal's FGSM (and the same step through the generic
loop, i.e. without FGSM's fast path) is from a minimal FGSM.

Training (``--train``): a whole training step (the method's attack + loss, backward, SGD step)
eager vs through ``torch.compile(model)`` as ``compile: true`` runs it, for FGSM-AT and PGD-10-AT on
the small CNN (Fashion-MNIST shape) and on the CIFAR-10 CPU model (PreAct-ResNet-18 width 16 with
input-level CBAM), batch 128, interleaved rounds after a warm-up that includes the compilation.

    python benchmarks/compile_speed.py --out benchmarks/results/compile_speed.json --train
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision_speed import interleaved  # noqa: E402  (the same interleaved timing)

from aal.attacks import FGSM
from aal.attacks.base import IterativeAttack
from aal.models import create_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--out", default=None)
    p.add_argument("--train", action="store_true", help="also time training steps, eager vs compile")
    p.add_argument("--train-rounds", type=int, default=6)
    p.add_argument("--precisions", default="fp32", help="comma-separated: fp32,bf16")
    p.add_argument("--only-model", default=None, choices=("small_cnn", "cifar_cpu"))
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
    t = interleaved(calls, args.rounds)
    e, c, a, gen = (statistics.median(t[k]) for k in ("eager", "compiled", "aal", "aal_generic"))
    out = {"eager_s": e, "compiled_s": c, "speedup": e / c, "aal_fgsm_s": a, "aal_over_minimal": a / e,
           "aal_generic_loop_s": gen, "fast_path_gain": gen / a,
           "fast_path_identical": bool(torch.equal(aal_fgsm(m, x, y), generic(m, x, y))),
           "first_call_s": compile_s,
           "identical": bool(torch.equal(fgsm(m), fgsm(compiled))), "threads": torch.get_num_threads(),
           "load": os.getloadavg(), "torch": torch.__version__}
    if args.train:
        out["train"] = train_steps(args.train_rounds, tuple(args.precisions.split(",")), args.only_model)
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


def train_steps(rounds: int, precisions: tuple[str, ...] = ("fp32",), only: str | None = None) -> dict:
    """Median seconds of a training step, eager vs ``torch.compile``, per (model, method, precision);
    a precision other than fp32 runs the method under its autocast as the Trainer does."""
    from aal.methods import create_method
    from aal.utils.precision import autocast_context

    models = {  # name -> (factory, input shape, eps)
        "small_cnn": (lambda: create_model("small_cnn", num_classes=10, in_channels=1, channels_last=True), (1, 28), 0.1),
        "cifar_cpu": (lambda: create_model("preact_resnet18", num_classes=10, attention="cbam_in", width=16,
                                           channels_last=True), (3, 32), 8 / 255),
    }
    out = {}
    for (mname, (factory, (c, hw), eps)), prec in itertools.product(models.items(), precisions):
        if only and mname != only:
            continue
        x = torch.rand(128, c, hw, hw).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (128,))
        for method_name, kw in (("fgsm_at", {}), ("pgd_at", {"steps": 10})):
            method = create_method(method_name, eps=eps, **kw)
            steps, first = {}, {}
            for compiled in (False, True):
                torch.manual_seed(0)
                model = factory().train()
                run_model = torch.compile(model) if compiled else model
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

                def step(run_model=run_model, opt=opt):
                    with autocast_context(prec, "cpu"):
                        o = method(run_model, (x, y))
                    opt.zero_grad(set_to_none=True)
                    o.loss.backward()
                    opt.step()

                t0 = time.perf_counter()
                step()
                first[compiled] = time.perf_counter() - t0
                steps[compiled] = step
            t = interleaved(steps, rounds)  # its warm-up call is each side's second step
            e, cmp = statistics.median(t[False]), statistics.median(t[True])
            key = f"{mname}/{method_name}" + ("" if prec == "fp32" else f"/{prec}")
            out[key] = {"eager_s": e, "compiled_s": cmp, "speedup": e / cmp,
                        "first_step_s": {"eager": first[False], "compiled": first[True]}}
            print(key, out[key], flush=True)
    return out


if __name__ == "__main__":
    main()
