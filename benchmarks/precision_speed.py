"""fp32 vs bf16 training speed, side by side in one run (issue 12's goal: >= 1.7x faster PGD-10-AT
epochs on the CIFAR CPU model and ResNet-18).

What it measures, batch 128, random data (speed does not depend on the pixel values):

1. The machine's conv peak in fp32 and in bf16, measured as ``benchmarks/speed.py`` measures the
   fp32 one: the best of several 1x1 convolutions over a channels_last ``(n/64, n/4, 16, 16)``
   batch (a plain GEMM through oneDNN) and ``torch.mm``, sampled through the run.
2. Train steps (one batch through aal's :class:`~aal.engine.Trainer`: the method under autocast,
   backward, SGD step) of FGSM-AT, PGD-10-AT and AAL+FGSM on the small CNN (1x28x28, the
   Fashion-MNIST model; CBAM for AAL, which needs an attention map), on the CIFAR CPU model
   (``configs/cifar10_cpu``: PreAct-ResNet-18 width 16 with ``cbam_in``, 3x32x32) and PGD-10-AT on
   ResNet-18 (CIFAR stem), in fp32 and bf16: interleaved repetitions (the order alternates), median.
3. Short epochs: ``--epoch-batches`` batches of random uint8 images of the dataset's shape
   through the Trainer and aal's BatchLoader (shuffle, the config's augmentation, channels_last),
   the same interleaving; random tensors stand in for the real data, whose loading is not what
   is compared (it is the same for both precisions).
4. The ResNet-18 standard train step's achieved GFLOP/s as a fraction of each precision's peak
   (FLOPs counted with ``FlopCounterMode``), and ``torch.profiler``'s top ops by self CPU time for
   one PGD-10-AT step in fp32 and in bf16 (what limits the speed-up).

Run it alone, under the shared lock, one thread:
    flock /tmp/aal-cpu.lock env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src \\
        python benchmarks/precision_speed.py --out benchmarks/results/precision_speed
It writes ``precision_speed.json`` and ``precision_speed.txt`` (the printed report).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import count_flops, matmul_peak, timed  # noqa: E402  (the fp32 peak, measured the same way)

BATCH = 128
PRECISIONS = ("fp32", "bf16")
# name: (create_model kwargs, (C, H, W), eps, augmentation of its config)
MODELS: dict[str, tuple[dict[str, Any], tuple[int, int, int], float, str]] = {
    "small_cnn": ({"name": "small_cnn"}, (1, 28, 28), 0.1, "none"),
    "cifar_cpu": ({"name": "preact_resnet18", "width": 16, "attention": "cbam_in"}, (3, 32, 32), 8 / 255, "crop_flip"),
    "resnet18": ({"name": "resnet18"}, (3, 32, 32), 8 / 255, "crop_flip"),
}
METHODS = {"fgsm_at": ("fgsm_at", {}), "pgd10_at": ("pgd_at", {"steps": 10}), "aal_fgsm": ("aal_fgsm", {})}
CASES = [(m, k) for m in ("small_cnn", "cifar_cpu") for k in METHODS] + [("resnet18", "pgd10_at")]


def bf16_peak(n: int, repeats: int) -> dict[str, tuple[float, float]]:
    """:func:`speed.matmul_peak`'s two GEMMs with bf16 operands (oneDNN / MKL bf16 kernels)."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    c = n // 4
    x = torch.randn(n // 64, c, 16, 16).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 1, 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    kernels = {"mm": (lambda: a @ b, 2 * n**3), "conv1x1": (lambda: torch.conv2d(x, w), 2 * (n // 64) * 256 * c * c)}
    out = {}
    for name, (fn, flops) in kernels.items():
        fn()
        runs = [timed(fn, torch.device("cpu")) for _ in range(repeats)]
        out[name] = (flops / min(w_ for w_, _ in runs) / 1e9, flops / max(min(c_ for _, c_ in runs), 1e-9) / 1e9)
    return out


def build(model_name: str, method_key: str):
    """A fresh model (same seed each time) and the method of a case."""
    from aal.methods import create_method
    from aal.models import create_model

    kwargs, (c, _, _), eps, _ = MODELS[model_name]
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    if method_key == "aal_fgsm" and "attention" not in kwargs:
        kwargs["attention"] = "cbam_in"  # configs/fashion_mnist/aal_fgsm.yaml's model
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=c, channels_last=True, **kwargs)
    method_name, params = METHODS[method_key]
    return model, create_method(method_name, eps=eps, **params)


def make_trainer(model, method, loader, precision: str, compile: bool = False):
    from aal.engine import Trainer

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    return Trainer(model, method, loader, opt, epochs=1, progress=False, seed=None, distributed=False, precision=precision,
                   compile=compile)


def random_split(model_name: str, n: int):
    from aal.data.base import Split

    _, shape, _, _ = MODELS[model_name]
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g))


def step_runner(case, precision: str) -> Callable[[], None]:
    """One Trainer step (a one-batch epoch) of ``case`` in ``precision``."""
    model, method = build(*case)
    split = random_split(case[0], BATCH)
    x = split.images.float().div(255).contiguous(memory_format=torch.channels_last)
    trainer = make_trainer(model, method, [(x, split.labels)], precision)
    return lambda: trainer.train_epoch(0)


def epoch_runner(case, precision: str, batches: int, compile: bool = False) -> Callable[[], None]:
    """A short epoch of ``batches`` batches through the Trainer and aal's BatchLoader."""
    from aal.data.loader import BatchLoader

    model, method = build(*case)
    loader = BatchLoader(random_split(case[0], batches * BATCH), batch_size=BATCH, shuffle=True, drop_last=True,
                         augment=MODELS[case[0]][3], padding=4, channels_last=True)
    trainer = make_trainer(model, method, loader, precision, compile)
    return lambda: trainer.train_epoch(0)


def compile_epochs(args) -> int:
    """``--compile-epochs MODEL``: short PGD-10-AT and FGSM-AT epochs of MODEL, fp32 vs bf16 vs
    bf16 + ``compile: true``, interleaved (the first call of each, the warm-up, includes compiling)."""
    model = args.compile_epochs
    n = {k: int(v) for k, v in (item.split("=") for item in args.epoch_batches.split(","))}[model]
    res = {"uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
           "threads": torch.get_num_threads(), "batches": n}
    for method in ("pgd10_at", "fgsm_at"):
        runners = {"fp32": epoch_runner((model, method), "fp32", n), "bf16": epoch_runner((model, method), "bf16", n),
                   "bf16+compile": epoch_runner((model, method), "bf16", n, compile=True)}
        t = interleaved(runners, args.epoch_repeats)
        med = {k: statistics.median(v) for k, v in t.items()}
        res[f"{model}/{method}"] = {"seconds": t, "median": med, "speedup_vs_fp32": {k: med["fp32"] / v for k, v in med.items()}}
        print(f"{model} {method} " + "  ".join(f"{k} {v:.2f}s ({med['fp32'] / v:.2f}x)" for k, v in med.items()), flush=True)
    if args.out:
        Path(f"{args.out}_compile.json").write_text(json.dumps(res, indent=1))
    return 0


def interleaved(runners: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds per runner (a precision, a variant): a warm-up call each, then ``repeats`` rounds,
    alternating who goes first."""
    for fn in runners.values():
        fn()  # warm-up: oneDNN builds its bf16 primitives at the first call of each shape
    times: dict[str, list[float]] = {p: [] for p in runners}
    for r in range(repeats):
        for p in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            times[p].append(timed(runners[p], torch.device("cpu"))[0])
    return times


def profile_step(case, precision: str, rows: int) -> str:
    """torch.profiler's top ops by self CPU time for one train step of ``case``."""
    from torch.profiler import ProfilerActivity, profile

    run = step_runner(case, precision)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=38)


def standard_step_flops(precision: str, repeats: int) -> tuple[int, float]:
    """(FLOPs, median wall seconds) of the ResNet-18 standard train step (fwd + bwd + SGD)."""
    from aal.methods import create_method

    model, _ = build("resnet18", "pgd10_at")
    split = random_split("resnet18", BATCH)
    x = split.images.float().div(255).contiguous(memory_format=torch.channels_last)
    trainer = make_trainer(model, create_method("standard"), [(x, split.labels)], precision)
    flops = count_flops(lambda: trainer.train_epoch(0))
    trainer.train_epoch(0)
    return flops, statistics.median(timed(lambda: trainer.train_epoch(0), torch.device("cpu"))[0] for _ in range(repeats))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per case and precision (steps)")
    p.add_argument("--epoch-repeats", type=int, default=2, help="timed rounds of the short epochs")
    p.add_argument("--epoch-batches", default="small_cnn=40,cifar_cpu=6,resnet18=2",
                   help="batches of each model's short epoch (model=N,...)")
    p.add_argument("--peak-n", type=int, default=4096)
    p.add_argument("--profile-rows", type=int, default=12)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.txt")
    p.add_argument("--models", default=",".join(MODELS),
                   help="only these models' cases (comma-separated; section 4 needs resnet18): on a CPU that emulates "
                        "bf16 the ResNet-18 cases alone take most of an hour")
    p.add_argument("--compile-epochs", default=None, choices=sorted(MODELS),
                   help="only: short epochs of this model, fp32 vs bf16 vs bf16 + compile (writes OUT_compile.json)")
    args = p.parse_args(argv)
    from aal.utils.runtime import tune_malloc

    tune_malloc()  # as the aal CLI does at start-up
    if args.compile_epochs:
        return compile_epochs(args)
    torch.manual_seed(0)
    epoch_batches = {k: int(v) for k, v in (item.split("=") for item in args.epoch_batches.split(","))}
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    cases = [c for c in CASES if c[0] in models]
    uptime0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t_start = time.perf_counter()
    out = io.StringIO()

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.write(line + "\n")

    peaks = {"fp32": [matmul_peak(torch.device("cpu"), args.peak_n, 3)], "bf16": [bf16_peak(args.peak_n, 3)]}
    steps, epochs = {}, {}
    for case in cases:
        steps[case] = interleaved({pr: step_runner(case, pr) for pr in PRECISIONS}, args.repeats)
        say(f"  step  {case[0]:<10} {case[1]:<9} " + "  ".join(f"{pr} {statistics.median(t):.3f}s" for pr, t in steps[case].items()))
    peaks["fp32"].append(matmul_peak(torch.device("cpu"), args.peak_n, 1))
    peaks["bf16"].append(bf16_peak(args.peak_n, 1))
    for case in cases:
        n = epoch_batches[case[0]]
        epochs[case] = interleaved({pr: epoch_runner(case, pr, n) for pr in PRECISIONS}, args.epoch_repeats)
        say(f"  epoch {case[0]:<10} {case[1]:<9} " + "  ".join(f"{pr} {statistics.median(t):.3f}s" for pr, t in epochs[case].items()))
    flop_steps = {pr: standard_step_flops(pr, args.repeats) for pr in PRECISIONS} if "resnet18" in models else {}
    peaks["fp32"].append(matmul_peak(torch.device("cpu"), args.peak_n, 3))
    peaks["bf16"].append(bf16_peak(args.peak_n, 3))
    profiles = {(m, pr): profile_step((m, "pgd10_at"), pr, args.profile_rows)
                for m in ("cifar_cpu", "resnet18") if m in models for pr in PRECISIONS}
    best = {pr: {k: max(s[k][0] for s in peaks[pr]) for k in peaks[pr][0]} for pr in PRECISIONS}
    peak = {pr: max(best[pr].values()) for pr in PRECISIONS}
    uptime1 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    from aal.engine.run import machine_description

    mach = machine_description()
    say()
    say(f"# benchmarks/precision_speed.py  {time.strftime('%Y-%m-%d %H:%M %Z')}  aal {mach.get('aal_commit')}")
    say(f"# machine: {mach['cpu']} ({mach['cpu_id']}), {mach['cores']} cores, torch {mach['torch']}, cpu capability "
        f"{mach['cpu_capability']}, native bf16 {mach['bf16_native']}, threads {torch.get_num_threads()} "
        f"(the other core runs another job)")
    say(f"# uptime before: {uptime0}")
    say(f"# uptime after:  {uptime1}")
    say("# batch 128, random data; Trainer steps (method under autocast, backward, SGD step); median of interleaved rounds")
    say()
    say("1. conv/GEMM peak (GFLOP/s, best of samples through the run): " + "; ".join(
        f"{pr}: " + ", ".join(f"{k} {v:.0f}" for k, v in best[pr].items()) for pr in PRECISIONS)
        + f"  -> bf16/fp32 peak {peak['bf16'] / peak['fp32']:.2f}x")
    say()
    say(f"2. train steps (s)  rounds {args.repeats}")
    say(f"   {'model':<10} {'method':<9} {'fp32':>8} {'bf16':>8} {'speed-up':>9}")
    rows = {}
    for case in cases:
        a, b = (statistics.median(steps[case][pr]) for pr in PRECISIONS)
        rows[f"{case[0]}/{case[1]}"] = {"step": {"fp32": steps[case]["fp32"], "bf16": steps[case]["bf16"], "speedup": a / b}}
        say(f"   {case[0]:<10} {case[1]:<9} {a:>8.3f} {b:>8.3f} {a / b:>8.2f}x")
    say()
    say(f"3. short epochs (s; N batches of random uint8 images of the dataset's shape through the Trainer and "
        f"BatchLoader)  rounds {args.epoch_repeats}")
    say(f"   {'model':<10} {'method':<9} {'N':>3} {'fp32':>8} {'bf16':>8} {'speed-up':>9} {'goal':>6}")
    for case in cases:
        a, b = (statistics.median(epochs[case][pr]) for pr in PRECISIONS)
        goal = 1.7 if case[1] == "pgd10_at" and case[0] in ("cifar_cpu", "resnet18") else None
        rows[f"{case[0]}/{case[1]}"]["epoch"] = {"batches": epoch_batches[case[0]], "fp32": epochs[case]["fp32"],
                                                  "bf16": epochs[case]["bf16"], "speedup": a / b, "goal": goal}
        say(f"   {case[0]:<10} {case[1]:<9} {epoch_batches[case[0]]:>3} {a:>8.3f} {b:>8.3f} {a / b:>8.2f}x "
            f"{'' if goal is None else f'{goal:.2f}x':>6}")
    say()
    say("4. ResNet-18 standard train step (fwd+bwd+SGD) against its precision's peak"
        + ("" if flop_steps else ": not measured (resnet18 not in --models)"))
    fractions = {}
    for pr in flop_steps:
        flops, secs = flop_steps[pr]
        fractions[pr] = flops / secs / 1e9 / peak[pr]
        say(f"   {pr}: {secs:.3f} s, {flops / 1e9:.1f} GFLOP, {flops / secs / 1e9:.0f} GFLOP/s = "
            f"{100 * fractions[pr]:.1f}% of the {pr} peak ({peak[pr]:.0f} GFLOP/s)")
    say()
    say("5. torch.profiler, one PGD-10-AT train step, top ops by self CPU time")
    for (m, pr), table in profiles.items():
        say(f"--- {m} {pr}")
        for line in table.splitlines():
            say("   " + line)
    total = time.perf_counter() - t_start
    say(f"# total {total:.0f} s")
    if args.out:
        base = Path(args.out)
        base.with_suffix(".txt").write_text(out.getvalue())
        payload = {"cases": rows, "peak_gflops": best, "standard_step_fraction_of_peak": fractions,
                   "standard_step": {pr: {"flops": f, "seconds": s} for pr, (f, s) in flop_steps.items()},
                   "profiles": {f"{m}/{pr}": t for (m, pr), t in profiles.items()},
                   "threads": torch.get_num_threads(), "uptime": [uptime0, uptime1], "machine": mach,
                   "epoch_batches": epoch_batches, "repeats": args.repeats, "epoch_repeats": args.epoch_repeats,
                   "seconds": total}
        base.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
