"""Time one training step of every registered method on the same model and batch.

Prints each method's step time relative to a plain forward+backward step (the `standard`
method), measured side by side in one process, interleaved round-robin so that machine noise
hits every method alike. A step = method(model, batch) + backward + SGD step.

    python benchmarks/method_step_times.py                      # small_cnn on 28x28, batch 128
    python benchmarks/method_step_times.py --model preact_resnet18 --size 32 --channels 3
    python benchmarks/method_step_times.py --model preact_resnet18 --model-opt width=16 --size 32 --channels 3 \
        --attention cbam_in --channels-last --eps 0.0313725 --methods fgsm_at,aal_fgsm --threads 1   # CIFAR-10 CPU model
    python benchmarks/method_step_times.py --json out.json
    python benchmarks/method_step_times.py --methods fgsm_at,aal_fgsm \
        --variant aal_fgsm_fd=aal_fgsm:coupling=finite-difference      # a method with other params

A variant is ``NAME=METHOD[:key=value,key=value...]``: the registered ``METHOD`` with those
hyper-parameters (values parsed as YAML scalars, e.g. ``rand_init=true``, ``xi2=0.05``), timed
side by side with the others under ``NAME``.

AAL methods run with model.attention=cbam (they need an attention map); every other method runs
on the same architecture with the same attention layer, so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from aal.engine.run import machine_description
from aal.methods import METHODS, create_method
from aal.models import create_model
from aal.utils.runtime import tune_malloc


def default_params(name: str, eps: float) -> dict:
    """Per-method settings for the benchmark: each method's own defaults (PGD-10 etc.) at ``eps``."""
    import inspect

    factory = METHODS.get(name)
    sig = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory)
    params = {}
    if "eps" in sig.parameters:
        params["eps"] = eps
    return params


def parse_variant(text: str, eps: float) -> tuple[str, str, dict]:
    """``"NAME=METHOD:k=v,k=v"`` -> ``(NAME, METHOD, params)`` (params include the default eps)."""
    import yaml

    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"--variant {text!r}: expected NAME=METHOD[:key=value,...]")
    method, _, kv = rest.partition(":")
    if method not in METHODS:
        raise SystemExit(f"--variant {text!r}: unknown method {method!r} (known: {', '.join(METHODS.names())})")
    params = default_params(method, eps)
    for item in (i for i in kv.split(",") if i):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: {item!r} must look like key=value")
        params[key] = yaml.safe_load(value)
    return name, method, params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", default="", help="comma-separated subset (default: all registered)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=METHOD[:key=value,...]: also time METHOD with these params as NAME (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--attention", default="cbam")
    p.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a model option, e.g. width=16 (values parsed as YAML scalars)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--ratio", nargs=2, action="append", metavar=("A", "B"),
                   help="also print median(A)/median(B) (repeatable), e.g. --ratio aal_fgsm fgsm_at")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    tune_malloc(True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # by default: every registered method that trains a classifier on (x, y) batches with the model
    # itself (few-shot/detection methods need episodes/boxes, AToP a purifier pipeline, SPAT a
    # cosine head: run those with --methods and a suitable --model)
    default = [
        n for n in METHODS.names()
        if getattr(METHODS.get(n), "batch_type", "classification") == "classification"
        and not n.startswith("atop") and n != "spat"
    ]
    names = [n for n in args.methods.split(",") if n] or ([] if args.variant else default)
    if "standard" not in names:
        names = ["standard", *names]
    specs = {n: (n, default_params(n, args.eps)) for n in names}
    for v in args.variant:
        vname, method, params = parse_variant(v, args.eps)
        if vname in specs:
            raise SystemExit(f"--variant name {vname!r} is already used")
        specs[vname] = (method, params)
        names.append(vname)
    import yaml

    options = {}
    for item in args.model_opt:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--model-opt {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    model = create_model(args.model, num_classes=10, in_channels=args.channels, attention=args.attention,
                         channels_last=args.channels_last, **options)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(args.batch, args.channels, args.size, args.size)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    methods = {n: create_method(m, **params) for n, (m, params) in specs.items()}

    def step(method) -> float:
        t0 = time.perf_counter()
        for out in method.updates(model, (x, y)):
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        return time.perf_counter() - t0

    model.train()
    for _ in range(args.warmup):
        for m in methods.values():
            step(m)
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for n, m in methods.items():  # round-robin: noise hits every method alike
            times[n].append(step(m))
    base = statistics.median(times["standard"])
    rows = []
    for n in names:
        med = statistics.median(times[n])
        rows.append({"method": n, "registered": specs[n][0], "median_s": med, "relative": med / base,
                     "params": specs[n][1]})
    print(f"model={args.model} batch={args.batch} input={args.channels}x{args.size}x{args.size} "
          f"attention={args.attention} threads={torch.get_num_threads()}")
    print(f"repeats={args.repeats} warmup={args.warmup} (median of round-robin rounds)")
    width = max(14, *(len(n) + 2 for n in names))
    print(f"{'method':<{width}}{'step (s)':>10}{'x standard':>12}  params")
    for r in rows:
        print(f"{r['method']:<{width}}{r['median_s']:>10.4f}{r['relative']:>12.2f}  {r['params']}")
    pairs = [(a, b) for a, b in (args.ratio or [])]
    for a, b in pairs:
        if a in times and b in times:
            print(f"ratio {a} / {b}: {statistics.median(times[a]) / statistics.median(times[b]):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine_description(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
