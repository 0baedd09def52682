"""Speed, measured side by side in one run: aal vs torchattacks, and vs the machine's FLOP peak.

What it prints (issue 7's goals), fp32, batch 128, random data (speed does not depend on it):

1. aal's PGD-10 and FGSM *as a user runs them* (this process: glibc malloc tuned at start-up as
   the ``aal`` CLI does, channels_last where it is aal's default) against torchattacks' PGD and
   FGSM run *as their users run them* (a plain Python subprocess: no malloc tuning, NCHW), on
   ResNet-18 (CIFAR stem, 3x32x32) and the small CNN (1x28x28), with the same weights and inputs.
   The two processes take turns (round-robin, alternating who goes first), so machine noise hits
   both alike, and only one of them computes at any time. aal's attacks fold BatchNorm into the
   convolutions by default (``aal.utils.fold``); the same aal attacks with ``fold_bn=False`` are
   timed in the same rounds, so the fold's own gain is a ratio from one run. FGSM examples are
   compared pixel by pixel: with the same memory format and no folding, the same arithmetic must
   give identical examples.
2. The hardware's fp32 peak (best of a few big matmuls), a ResNet-18 training step's achieved
   GFLOP/s against it (FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode``: the
   convolutions and matmuls of forward + backward), and a PGD-10-AT step (10 input-gradient
   attack steps + one training step) against its FLOP lower bound (its counted FLOPs at peak), and
   a whole PGD-10-AT epoch (``--epoch-batches`` batches) through aal's own Trainer and
   BatchLoader (shuffling, augmentation, scheduler, logging: everything an epoch does but disk).
3. The standard evaluation suite (goal 3: no slower than torchattacks' AutoAttack for the same
   result): ``aal.eval.run_suite(..., "standard")`` against torchattacks' APGD-CE -> APGD-T ->
   FAB-T -> Square chained by its ``MultiAttack`` (what its ``AutoAttack`` wraps) with our suite's
   settings (AutoAttack's standard version),
   on the small CNN trained a few hundred FGSM-AT steps on Fashion-MNIST (the robust points decide how
   much work Square does, so the model must be a trained one), the first ``--suite-n`` test
   images, ``--suite-threads`` threads. Each side runs in a fresh process of its own, as its users
   run it: aal as the ``aal eval --suite`` CLI does (malloc tuned at start-up, channels_last, batch
   500), torchattacks in a plain process (NCHW, the same batches). The two never run at the same
   time; with ``--suite-repeats`` > 1 they alternate who goes first. It prints each side's robust
   accuracy, the number of points on which they disagree, and the time ratio.
   torchattacks' ``AutoAttack(version="standard")`` itself is not the same evaluation: it runs
   APGD, APGD-T and FAB-T at its default of 10 iterations, where the reference AutoAttack and our
   suite run 100, and rescales Square's schedule; hence the ``MultiAttack``.

    python benchmarks/speed.py                       # ~3-5 minutes on the 2-core CPU, plus section 3
    python benchmarks/speed.py --repeats 5 --out benchmarks/results/speed.txt
    python benchmarks/speed.py --device cuda         # on a GPU machine (same tables)
    python benchmarks/speed.py --only suite --suite-n 500   # section 3 only (needs Fashion-MNIST)

torchattacks is installed with ``pip install --no-deps torchattacks`` (its metadata asks for
torchvision, which it does not import for these attacks). Ratios are what to quote; absolute
times depend on the load of the machine, which the output records (load average before/after).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

EPS, ALPHA, STEPS, BATCH = 8 / 255, 2 / 255, 10, 128
MODELS = {"resnet18": (3, 32), "small_cnn": (1, 28)}  # name: (channels, size)
SUITE_BATCH = 500  # aal eval's default --batch-size; torchattacks gets the same batches


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of ``fn()``.

    CPU time (all threads) is the load-robust companion of wall time on a shared machine: it
    grows only while this process's threads run. It also counts OpenMP threads spin-waiting and
    misses the time a single-threaded stretch leaves a core idle, so on a quiet machine wall time
    is the figure to quote; under load CPU-time ratios are the better estimate.
    """
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


# ----------------------------------------------------------------------------- torchattacks side
def worker(path: str, device: str) -> int:
    """The torchattacks process: plain torch (no malloc tuning), NCHW, as its users run it.

    It only borrows aal's model *definitions* (importing aal changes no process setting), loads
    the weights and batches the main process saved, and answers one JSON command per line.
    """
    import torchattacks

    from aal.models import create_model

    dev = torch.device(device)
    saved = torch.load(path, weights_only=True)
    models, attacks = {}, {}
    for name, (c, _) in MODELS.items():
        m = create_model(name, num_classes=10, in_channels=c).to(dev)  # NCHW
        m.load_state_dict(saved[name]["weights"])
        m.eval()
        models[name] = m
        attacks[name, "pgd10"] = torchattacks.PGD(m, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
        attacks[name, "fgsm"] = torchattacks.FGSM(m, eps=EPS)
    data = {n: (saved[n]["x"].to(dev), saved[n]["y"].to(dev)) for n in MODELS}
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        x, y = data[cmd["model"]]
        atk = attacks[cmd["model"], cmd["attack"]]
        if cmd["op"] == "time":
            print(json.dumps({"seconds": timed(lambda: atk(x, y), dev)}), flush=True)  # [wall, cpu]
        elif cmd["op"] == "output":
            torch.save(atk(x, y).cpu(), cmd["path"])
            print(json.dumps({"saved": cmd["path"]}), flush=True)
    return 0


class Peer:
    """A worker subprocess, driven one command at a time (so it never runs concurrently).

    ``role``: ``"attacks"`` (torchattacks' PGD/FGSM, :func:`worker`) or ``"suite-aal"`` /
    ``"suite-torchattacks"`` (one side of section 3, :func:`suite_worker`); ``env``: extra
    environment variables (e.g. ``OMP_NUM_THREADS``).
    """

    def __init__(self, path: str, device: str, role: str = "attacks", env: dict[str, str] | None = None) -> None:
        env_ = dict(os.environ)
        if role != "suite-aal":
            env_.pop("AAL_NO_MALLOC_TUNE", None)  # irrelevant there: nothing tunes malloc in that process
        env_.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", path, "--device", device, "--role", role],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env_,
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torchattacks process died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- FLOPs and peak
def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device, n: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Best fp32 GEMM rates, ``{kernel: (GFLOP per wall second, GFLOP per CPU second)}``.

    Two GEMM kernels, because they differ a lot on some CPUs: ``torch.mm`` (MKL's sgemm, which on
    AMD CPUs takes a slower code path: 230 vs 530 GFLOP/s on this project's 2-core EPYC) and a
    1x1 convolution over a channels_last ``(n/64, n/4, 16, 16)`` batch (a plain ``n x n/4 x n/4``
    GEMM through oneDNN, the library the model's convolutions run on). The hardware peak is the
    best of both. (No 3x3 convolution: oneDNN may run it with Winograd, i.e. fewer real FLOPs.)
    """
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    c = n // 4
    x = torch.randn(n // 64, c, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 1, 1, device=device).contiguous(memory_format=torch.channels_last)
    kernels = {"mm": (lambda: a @ b, 2 * n**3), "conv1x1": (lambda: torch.conv2d(x, w), 2 * (n // 64) * 256 * c * c)}
    out = {}
    for name, (fn, flops) in kernels.items():
        fn()  # warm-up
        runs = [timed(fn, device) for _ in range(repeats)]
        out[name] = (flops / min(w_ for w_, _ in runs) / 1e9, flops / max(min(c_ for _, c_ in runs), 1e-9) / 1e9)
    return out


def pgd_at_epoch(model, method, batches: int, dev: torch.device) -> dict:
    """A whole PGD-10-AT epoch through aal's own :class:`~aal.engine.trainer.Trainer`: its
    :class:`~aal.data.loader.BatchLoader` over ``batches * BATCH`` uint8 CIFAR-shaped images
    (shuffle, crop+flip augmentation, channels_last), SGD with momentum, cosine schedule, the
    running means it logs; no evaluation, no checkpoint. Everything an epoch does but the disk."""
    from aal.data.base import Split
    from aal.data.loader import BatchLoader
    from aal.engine.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    c, s = MODELS["resnet18"]
    split = Split(torch.randint(0, 256, (batches * BATCH, c, s, s), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (batches * BATCH,), generator=g))
    loader = BatchLoader(split, batch_size=BATCH, shuffle=True, drop_last=True, augment="crop_flip", padding=4,
                         channels_last=True, device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, batches)
    trainer = Trainer(model, method, loader, opt, sched, epochs=1, progress=False, seed=None, distributed=False)
    wall, cpu = timed(lambda: trainer.fit(), dev)
    return {"batches": batches, "wall": wall, "cpu": cpu}


# ----------------------------------------------------------------------------- evaluation suite
def suite_worker(path: str, device: str, side: str) -> int:
    """One side of section 3 in a fresh process, as its users run it.

    aal: malloc tuned first thing and the model in aal's default memory format (channels_last), as
    ``aal eval --suite standard`` does; ``run_suite`` without a state file. torchattacks: a plain
    process, NCHW, :func:`torchattacks_standard` over the same batches. One ``run`` command: the
    evaluation is timed (images already in memory, model loaded), the per-point robust flags saved.
    """
    if side == "aal":
        from aal.utils.runtime import tune_malloc

        tune_malloc()  # as the aal CLI does at start-up, before the first big tensor
    from aal.engine.run import default_channels_last
    from aal.models import create_model

    dev = torch.device(device)
    saved = torch.load(path, weights_only=True)
    cl = side == "aal" and default_channels_last("small_cnn") and dev.type == "cpu"
    model = create_model("small_cnn", num_classes=10, in_channels=1, channels_last=cl).to(dev)
    model.load_state_dict(saved["weights"])
    model.eval()
    x, y, eps = saved["x"].to(dev), saved["y"].to(dev), float(saved["eps"])
    if side == "aal":
        from aal.eval import run_suite

        def run():
            res = run_suite(model, (x, y), "standard", eps=eps, batch_size=SUITE_BATCH, seed=0)
            stages = {k: [v, res.seconds.get(k, 0.0)] for k, v in res.accuracy.items()}
            return res.correct["robust"], stages
    else:
        from aal.eval.reference import torchattacks_standard

        attack = torchattacks_standard(model, eps)

        def run():
            robust = []
            for xb, yb in zip(x.split(SUITE_BATCH), y.split(SUITE_BATCH)):
                x_adv = attack(xb, yb)
                with torch.no_grad():
                    robust.append((model(x_adv).argmax(1) == yb).cpu())
            return torch.cat(robust), {}
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        out = {}
        seconds = timed(lambda: out.update(zip(("robust", "stages"), run())), dev)
        torch.save(out["robust"], cmd["path"])
        print(json.dumps({"seconds": seconds, "robust": out["robust"].float().mean().item(), "stages": out["stages"]}),
              flush=True)
    return 0


def suite_model(method_name: str = "fgsm_at", eps: float = EPS, steps: int = 300):
    """``(model, test split)``: the small CNN after ``steps`` SGD steps (batch 128, lr 0.05,
    momentum 0.9, seed 0) of ``method_name`` on Fashion-MNIST, in eval mode.

    FGSM-AT (random start), not standard training: the points it leaves robust after APGD are
    what FAB-T and Square spend their iterations and queries on, the costly part of a real
    evaluation. Also used by ``benchmarks/suite_stages.py``.
    """
    from aal.data import load_data
    from aal.methods import create_method
    from aal.models import create_model

    bundle = load_data("fashion_mnist")  # raises a DataError that says how to install it
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, mean=bundle.info.mean, std=bundle.info.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xtr, ytr = bundle.train.images.float().div(255), bundle.train.labels
    method = create_method(method_name, **({"eps": eps} if method_name != "standard" else {}))
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(ytr), (128,), generator=g)
        loss = method(model, (xtr[i], ytr[i])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), bundle.test


def suite_benchmark(args, tmp: str) -> dict:
    """Section 3: train the model, then time each side once per round, each in a fresh process."""
    model, test = suite_model(args.suite_train_method, args.suite_eps, args.suite_train_steps)
    x, y = test.images[: args.suite_n].float().div(255), test.labels[: args.suite_n]
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    path = f"{tmp}/suite.pt"
    torch.save({"weights": {k: v.contiguous() for k, v in model.state_dict().items()}, "x": x, "y": y,
                "eps": args.suite_eps}, path)
    env = {"OMP_NUM_THREADS": str(args.suite_threads), "MKL_NUM_THREADS": str(args.suite_threads)}
    runs = {"aal": [], "torchattacks": []}
    robust = {}
    threads = {}
    for r in range(args.suite_repeats):
        for side in (["aal", "torchattacks"] if r % 2 == 0 else ["torchattacks", "aal"]):
            peer = Peer(path, args.device, role=f"suite-{side}", env=env)  # a fresh process per run
            threads[side] = peer.info.get("threads")
            runs[side].append(peer.ask(op="run", path=f"{tmp}/suite_{side}_{r}.pt"))
            peer.close()
            robust.setdefault(side, torch.load(f"{tmp}/suite_{side}_{r}.pt", weights_only=True))
    return {"runs": runs, "threads": threads, "clean": clean, "n": len(y),
            "disagree": int((robust["aal"] != robust["torchattacks"]).sum())}


def suite_report(res: dict, args, say) -> None:
    from aal.eval import SUITES

    st = {s.name: dict(s.options) for s in SUITES["standard"]}
    runs = res["runs"]
    say(f"3. standard evaluation suite, small_cnn trained {args.suite_train_steps} SGD steps ({args.suite_train_method}) on Fashion-MNIST "
        f"(clean accuracy {100 * res['clean']:.2f}%), first {res['n']} test images, eps {args.suite_eps:g} Linf, "
        f"batch {SUITE_BATCH},")
    say(f"   threads aal={res['threads'].get('aal')} torchattacks={res['threads'].get('torchattacks')}; "
        f"APGD-CE ({st['apgd_ce']['iterations']} it.) -> APGD-T ({st['apgd_t']['iterations']} it., "
        f"{st['apgd_t']['targets']} targets) -> FAB-T ({st['fab_t']['iterations']} it., {st['fab_t']['targets']} targets) "
        f"-> Square ({st['square']['queries']} queries), seed 0, on both sides")
    say("   (torchattacks: its APGD, APGDT, FAB (multi-targeted) and Square in its MultiAttack, as its AutoAttack "
        "chains them); each side a fresh process per run")
    say(f"   {'side':<13} {'robust %':>9} {'wall s':>8} {'CPU s':>8}  runs")
    med = {}
    for side, rs in runs.items():
        med[side] = (statistics.median(r["seconds"][0] for r in rs), statistics.median(r["seconds"][1] for r in rs))
        accs = sorted({f"{100 * r['robust']:.2f}" for r in rs})
        say(f"   {side:<13} {'/'.join(accs):>9} {med[side][0]:>8.1f} {med[side][1]:>8.1f}  {len(rs)}")
    (a, ac), (t, tc) = med["aal"], med["torchattacks"]
    say(f"   speed-up = torchattacks time / aal time: {t / a:.2f}x (wall), {tc / ac:.2f}x (CPU time)   goal >= 1.00x")
    say(f"   points robust on one side only: {res['disagree']} of {res['n']}")
    stages = runs["aal"][0]["stages"]
    say("   aal per stage (accuracy % after it, seconds): "
        + ", ".join(f"{k} {100 * v[0]:.2f}" + (f" ({v[1]:.1f} s)" if k != "robust" else "") for k, v in stages.items()))


# ----------------------------------------------------------------------------- main
class Report:
    """Lines printed as they come and kept, so ``--out`` writes exactly what the terminal showed."""

    def __init__(self) -> None:
        self.out, self.t_start, self.load0 = io.StringIO(), time.perf_counter(), os.getloadavg()

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.out.write(line + "\n")

    def header(self, title: str, device, note: str, threads: str = "") -> None:
        """Title, machine and load lines (the load before was read when the report began)."""
        from aal.engine.run import machine_description

        mach, l0, l1 = machine_description(), self.load0, os.getloadavg()
        self(f"# {title}  {time.strftime('%Y-%m-%d %H:%M %Z')}  aal {mach.get('aal_commit')}")
        self(f"# machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, device {device}" + threads)
        self(f"# load average (1/5/15 min) before {l0[0]:.1f}/{l0[1]:.1f}/{l0[2]:.1f}, "
             f"after {l1[0]:.1f}/{l1[1]:.1f}/{l1[2]:.1f}" + (f"; {note}" if note else ""))

    def finish(self, path: str | None) -> int:
        """Last line (total time) and, with ``--out``, the report written to that file."""
        self(f"# total {time.perf_counter() - self.t_start:.0f} s")
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(self.out.getvalue())
        return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of the ResNet-18 PGD-10 / AT steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--small-rounds", type=int, default=0,
                   help="timed rounds of the small-CNN attacks (default 2 x --repeats)")
    p.add_argument("--peak-n", type=int, default=4096, help="matmul size for the peak")
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("--note", default="", help="a line about the machine's state (e.g. shared with other jobs)")
    p.add_argument("--epoch-batches", type=int, default=8,
                   help="batches of the whole PGD-10-AT epoch timed through the Trainer (0: skip)")
    p.add_argument("--only", choices=("attacks", "suite"), default=None,
                   help="run only sections 1-2 (attacks, FLOPs) or only section 3 (evaluation suite); default: all")
    p.add_argument("--suite-n", type=int, default=500, help="section 3: first n Fashion-MNIST test images")
    p.add_argument("--suite-eps", type=float, default=0.1, help="section 3: L-inf budget")
    p.add_argument("--suite-threads", type=int, default=1, help="section 3: threads of each side's process")
    p.add_argument("--suite-repeats", type=int, default=1, help="section 3: timed runs per side (fresh process each)")
    p.add_argument("--suite-train-steps", type=int, default=300, help="section 3: SGD steps (batch 128) of the model")
    p.add_argument("--suite-train-method", default="fgsm_at", choices=("fgsm_at", "standard"),
                   help="section 3: how the model is trained (fgsm_at: random start, eps --suite-eps)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--role", default="attacks", choices=("attacks", "suite-aal", "suite-torchattacks"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("suite_n", "suite_threads", "suite_repeats", "suite_train_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build_models(dev: torch.device) -> tuple[dict, dict, dict]:
    """``(models, data, saved)``: each model of :data:`MODELS` in aal's default memory format with a
    random batch, and the NCHW weights + batch (``saved``) the torchattacks process loads."""
    from aal.engine.run import default_channels_last
    from aal.models import create_model

    torch.manual_seed(0)
    models, data, saved = {}, {}, {}
    for name, (c, s) in MODELS.items():
        cl = default_channels_last(name) and dev.type == "cpu"  # channels_last: aal's CPU default
        m = create_model(name, num_classes=10, in_channels=c, channels_last=cl).to(dev).eval()
        x, y = torch.rand(BATCH, c, s, s), torch.randint(0, 10, (BATCH,))
        saved[name] = {"weights": {k: v.contiguous() for k, v in m.state_dict().items()}, "x": x, "y": y}
        xd = x.to(dev)
        models[name] = (m, cl)
        data[name] = (xd.contiguous(memory_format=torch.channels_last) if cl else xd, y.to(dev))
    return models, data, saved


def aal_attacks(fold_bn: bool = True) -> dict:
    """aal's PGD-10 and FGSM; ``fold_bn=False``: BatchNorm left unfolded, to time the fold's own gain."""
    from aal.attacks import FGSM, PGD

    return {"pgd10": PGD(EPS, steps=STEPS, step_size=ALPHA, rand_init=True, fold_bn=fold_bn),
            "fgsm": FGSM(EPS, fold_bn=fold_bn)}


def time_attacks(models, data, sides: dict, peer: Peer, args, dev, peaks: list) -> tuple[list, dict, dict]:
    """Section 1's timings, ``(cases, rounds, times)``: round-robin over aal's ``sides`` (``{"aal": ...,
    "aal_unfolded": ...}``, each :func:`aal_attacks`) and torchattacks (alternating who goes first), a
    matmul-peak sample per round appended to ``peaks``."""
    cases = [(m, a) for m in MODELS for a in ("pgd10", "fgsm")]
    # the cheap cases get more rounds: their times are short and noisier
    rounds = {c: args.repeats if c == ("resnet18", "pgd10") else 2 * args.repeats for c in cases}
    if args.small_rounds:  # the small CNN's calls take milliseconds: many rounds to resolve a few per cent
        rounds.update({c: args.small_rounds for c in cases if c[0] == "small_cnn"})
    times = {c: {"aal": [], "torchattacks": [], "aal_unfolded": []} for c in cases}
    for c in cases:  # warm-up both sides (lazy init, first allocations); a PGD step allocates what
        if c[1] == "fgsm":  # an FGSM call does, so the costly PGD-10 needs no warm-up call of its own
            sides["aal"][c[1]](models[c[0]][0], *data[c[0]])
            peer.ask(op="time", model=c[0], attack=c[1])
    for r in range(max(rounds.values())):
        peaks.append(matmul_peak(dev, args.peak_n, repeats=1))
        for c in (c for c in cases if r < rounds[c]):
            m, (x, y) = models[c[0]][0], data[c[0]]
            order = ["aal", "aal_unfolded", "torchattacks"] if r % 2 == 0 else ["torchattacks", "aal_unfolded", "aal"]
            for side in order:
                if side == "torchattacks":
                    times[c][side].append(peer.ask(op="time", model=c[0], attack=c[1])["seconds"])
                else:
                    times[c][side].append(timed(lambda: sides[side][c[1]](m, x, y), dev))
    return cases, rounds, times


def fgsm_identity(models, data, saved, sides: dict, peer: Peer, tmp: str, dev) -> dict:
    """Per model: are aal's FGSM examples identical to torchattacks' (same weights, same inputs)? On a
    channels_last model also the same check on the model in NCHW with BatchNorm unfolded: the same
    arithmetic as torchattacks, so there they must be identical."""
    from aal.models import create_model

    fgsm, fgsm_unfolded = sides["aal"]["fgsm"], sides["aal_unfolded"]["fgsm"]  # the attacks section 1 timed
    check = {}
    for name in MODELS:
        m, cl = models[name]
        x, y = data[name]
        peer.ask(op="output", model=name, attack="fgsm", path=f"{tmp}/{name}_fgsm.pt")
        ref = torch.load(f"{tmp}/{name}_fgsm.pt", weights_only=True)
        ours = fgsm(m, x, y).cpu()
        row = {"identical": bool(torch.equal(ours.contiguous(), ref)), "differ_frac": float((ours != ref).float().mean()),
               "max_abs": float((ours - ref).abs().max())}
        if cl:
            nchw = create_model(name, num_classes=10, in_channels=MODELS[name][0]).to(dev).eval()
            nchw.load_state_dict(saved[name]["weights"])
            o2 = fgsm_unfolded(nchw, saved[name]["x"].to(dev), y).cpu()
            row["nchw_identical"] = bool(torch.equal(o2, ref))
            row["nchw_differ_frac"] = float((o2 != ref).float().mean())
        check[name] = row
    return check


def time_training(model, x, y, args, dev, peaks: list) -> dict:
    """Section 2's measurements on ResNet-18: counted FLOPs and times of a standard and a PGD-10-AT
    training step, and (``--epoch-batches``) a whole PGD-10-AT epoch through the Trainer."""
    from aal.methods import create_method

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    standard, pgd_at = create_method("standard"), create_method("pgd_at", eps=EPS, steps=STEPS, step_size=ALPHA)

    def train_step(method):
        model.train()
        loss = method(model, (x, y)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # every PGD step is the same forward + input-gradient backward: count PGD-1-AT and extrapolate
    pgd1_at = create_method("pgd_at", eps=EPS, steps=1, step_size=ALPHA)
    f_std, f_pgd1 = count_flops(lambda: train_step(standard)), count_flops(lambda: train_step(pgd1_at))
    flops = {"standard": f_std, "pgd_at": f_std + STEPS * (f_pgd1 - f_std)}
    times = {"standard": [], "pgd_at": []}
    train_step(standard)  # warm-up (the attack's buffers were warmed up in section 1)
    for _ in range(args.repeats):
        peaks.append(matmul_peak(dev, args.peak_n, repeats=1))
        for _ in range(3):
            times["standard"].append(timed(lambda: train_step(standard), dev))
        times["pgd_at"].append(timed(lambda: train_step(pgd_at), dev))
    peaks.append(matmul_peak(dev, args.peak_n, repeats=3))
    epoch = pgd_at_epoch(model, pgd_at, args.epoch_batches, dev) if args.epoch_batches else None
    peaks.append(matmul_peak(dev, args.peak_n, repeats=3))
    return {"flops": flops, "times": times, "epoch": epoch}


def attacks_report(say, cases, rounds, times, fgsm_check) -> None:
    say(f"1. attacks, fp32, batch {BATCH}, eps 8/255 (PGD-10: alpha 2/255, random start); median seconds per batch;")
    say("   speed-up = torchattacks time / aal time, from wall time and from each process's CPU time")
    say("   (aal unfolded: the same aal attack with fold_bn=False, i.e. BatchNorm not folded into the convolutions;")
    say("   fold gain = unfolded time / aal time; the small CNN has no BatchNorm, so there both run the same code)")
    say(f"   {'model':<10} {'attack':<7} {'aal s':>8} {'torchattacks s':>15} {'speed-up':>9} {'(CPU time)':>11} "
        f"{'goal':>6}  {'unfolded s':>10} {'fold gain':>9}  rounds")
    goals = {"resnet18": 1.5, "small_cnn": 1.25}
    for c in cases:
        a, t, u = (statistics.median(w for w, _ in times[c][k]) for k in ("aal", "torchattacks", "aal_unfolded"))
        ac, tc = (statistics.median(cpu for _, cpu in times[c][k]) for k in ("aal", "torchattacks"))
        say(f"   {c[0]:<10} {c[1]:<7} {a:>8.3f} {t:>15.3f} {t / a:>8.2f}x {tc / ac:>10.2f}x {goals[c[0]]:>5.2f}x  "
            f"{u:>10.3f} {u / a:>8.2f}x  {rounds[c]}")
    say()
    say("   FGSM examples, aal vs torchattacks (same weights, same inputs):")
    for name, r in fgsm_check.items():
        line = (f"   {name:<10} identical={r['identical']} (pixels differing {100 * r['differ_frac']:.4f}%, "
                f"max |diff| {r['max_abs']:.4g})")
        if "nchw_identical" in r:
            line += f"; aal (fold_bn=False) on the same model in NCHW: identical={r['nchw_identical']}"
        say(line)


def flops_report(say, train: dict, peaks: list, channels_last: bool) -> None:
    best = {k: (max(p_[k][0] for p_ in peaks), max(p_[k][1] for p_ in peaks)) for k in peaks[0]}
    peak, peak_cpu = max(v[0] for v in best.values()), max(v[1] for v in best.values())
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in train["times"].items()}
    (std_t, std_c), (at_t, at_c) = med["standard"], med["pgd_at"]
    f_std, f_at = train["flops"]["standard"] / 1e9, train["flops"]["pgd_at"] / 1e9
    say(f"2. FLOPs (ResNet-18 CIFAR, batch {BATCH}, fp32, channels_last={channels_last}); peak = the best "
        f"fp32 GEMM of {len(peaks)} samples spread over the run")
    say(f"   measured peak            {peak:7.1f} GFLOP/s wall, {peak_cpu:7.1f} GFLOP per CPU-second; best per kernel: "
        + ", ".join(f"{k} {v[0]:.0f}" for k, v in best.items())
        + "  (conv1x1 wall samples: " + ", ".join(f"{p_['conv1x1'][0]:.0f}" for p_ in peaks) + ")")
    say(f"   train step (fwd+bwd+SGD) {std_t:7.3f} s wall, {std_c:7.3f} s CPU, {f_std:7.1f} GFLOP: "
        f"{100 * f_std / std_t / peak:5.1f}% of peak (wall), {100 * f_std / std_c / peak_cpu:5.1f}% (CPU time)   goal >= 75%")
    say(f"   PGD-10-AT step           {at_t:7.3f} s wall, {at_c:7.3f} s CPU, {f_at:7.1f} GFLOP: "
        f"{at_t / (f_at / peak):5.2f}x its FLOP lower bound (wall), {at_c / (f_at / peak_cpu):5.2f}x (CPU time)   "
        f"goal <= 1.3x")
    epoch = train["epoch"]
    if epoch is not None:
        ep_f = epoch["batches"] * f_at
        say(f"   PGD-10-AT epoch (Trainer) {epoch['wall']:7.3f} s wall, {epoch['cpu']:7.3f} s CPU, {ep_f:7.1f} GFLOP: "
            f"{epoch['wall'] / (ep_f / peak):5.2f}x its FLOP lower bound (wall), {epoch['cpu'] / (ep_f / peak_cpu):5.2f}x "
            f"(CPU time)   goal <= 1.3x")
        say(f"     ({epoch['batches']} batches of {BATCH} random uint8 3x32x32 images through aal's Trainer and "
            f"BatchLoader: shuffle, crop+flip, channels_last, SGD momentum, cosine LR, logged running means; "
            f"no evaluation, no checkpoint)")
    n_std, n_at = len(train["times"]["standard"]), len(train["times"]["pgd_at"])
    say(f"   (times: median of {n_std} / {n_at} steps. PGD-10-AT FLOPs / train-step FLOPs = "
        f"{train['flops']['pgd_at'] / train['flops']['standard']:.2f}: the attack takes input gradients "
        f"only; FlopCounterMode counts convolutions and matmuls, not elementwise ops)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.role == "attacks":
            return worker(args.worker, args.device)
        return suite_worker(args.worker, args.device, args.role.removeprefix("suite-"))
    if args.only == "suite":
        return main_suite(args)

    # as the aal CLI does at start-up, before the first big tensor
    from aal.utils.runtime import malloc_tuned, tune_malloc

    tune_malloc()
    dev = torch.device(args.device)
    say = Report()
    models, data, saved = build_models(dev)
    tmp = tempfile.mkdtemp(prefix="aal-speed-")
    torch.save(saved, f"{tmp}/state.pt")
    peer = Peer(f"{tmp}/state.pt", args.device)
    peaks = [matmul_peak(dev, args.peak_n, repeats=3)]  # sampled through the run; the best counts
    sides = {"aal": aal_attacks(), "aal_unfolded": aal_attacks(fold_bn=False)}
    cases, rounds, times = time_attacks(models, data, sides, peer, args, dev, peaks)
    fgsm_check = fgsm_identity(models, data, saved, sides, peer, tmp, dev)
    peer_threads = peer.info.get("threads")
    peer.close()
    train = time_training(models["resnet18"][0], *data["resnet18"], args, dev, peaks)
    suite = suite_benchmark(args, tmp) if args.only is None else None

    say.header("benchmarks/speed.py", dev, args.note, f", threads aal={torch.get_num_threads()} torchattacks={peer_threads}")
    say(f"# aal process: malloc tuned={malloc_tuned()}, channels_last per aal's default "
        f"({', '.join(f'{n}={models[n][1]}' for n in MODELS)}); torchattacks: plain subprocess, NCHW")
    say()
    attacks_report(say, cases, rounds, times, fgsm_check)
    say()
    flops_report(say, train, peaks, models["resnet18"][1])
    say()
    if suite is not None:
        suite_report(suite, args, say)
        say()
    return say.finish(args.out)


def main_suite(args) -> int:
    """``--only suite``: section 3 alone (this process only trains the model and drives the two sides)."""
    say = Report()
    res = suite_benchmark(args, tempfile.mkdtemp(prefix="aal-speed-"))
    say.header("benchmarks/speed.py --only suite", args.device, args.note)
    say()
    suite_report(res, args, say)
    say()
    return say.finish(args.out)


if __name__ == "__main__":
    sys.exit(main())
