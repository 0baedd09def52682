"""AAL vs adversarial training baselines and controls on Fashion-MNIST (issue 3's evidence).

Trains named settings x seeds with :func:`aal.engine.run.train_run` (small_cnn, eps 0.1, every
setting with ``model.attention=cbam`` so that the architecture is identical, baselines
included), evaluates each on the first ``--eval-n`` test images with full, unmasked attacks
(clean, FGSM, PGD-20 at eps 0.1) and writes

* ``benchmarks/results/aal_compare.json``: every run (setting, seed, exact config, accuracies,
  wall time per epoch, mean of the budget k per epoch) and the command line, per group;
* ``benchmarks/results/aal_compare.md``: mean +- std over seeds per setting, per group;
* ``benchmarks/results/aal_compare_<group>.png``: the same as a bar plot.

Groups (``--group``):

* ``main``: FGSM-AT (random start, its default) vs AAL+FGSM (paper defaults) vs the controls
  AAL+FGSM with ``mask_control=uniform`` / ``shuffle`` (same mean budget per image, no /
  destroyed location) vs FGSM-AT at the *matched* mean budget ``eps * mean k``, with mean k
  measured from this group's AAL+FGSM runs (``mask_mean`` logged per epoch, averaged over
  epochs and seeds).
* ``pgd``: PGD-AT vs AAL+PGD (PGD-10 in training).
* ``kernels``: k = M, M o M, 1 - M o M (paper Table 8).
* ``xi2``: xi2 in {0, 0.01, 0.05, 0.1, 0.5} (paper Fig. 4).
* ``search``: settings beyond the paper vs the matched-budget control.

Runs are cached: a run folder is named by setting, seed and a hash of its config, so a setting
shared by two groups (e.g. AAL+FGSM in main, kernels and xi2) is trained once.

    python benchmarks/aal_compare.py --group main --seeds 0,1,2 --epochs 5 --train-n 20000 --jobs 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "fashion_mnist"
RESULTS = ROOT / "benchmarks" / "results"
EPS = 0.1


@dataclass(frozen=True)
class Setting:
    """A named training setting: a base config plus ``key=value`` overrides.

    ``matched`` names a reference setting: the run's ``method.eps`` becomes ``EPS * mean k`` of
    that setting's runs (the matched-budget control).
    """

    name: str
    base: str
    overrides: tuple[str, ...] = ()
    label: str = ""
    matched: str | None = None


def _aal(name: str, label: str, *over: str) -> Setting:
    return Setting(name, "aal_fgsm.yaml", tuple(over), label)


SETTINGS = {
    s.name: s
    for s in [
        Setting("fgsm_at", "fgsm_at.yaml", (), "FGSM-AT (rand init)"),
        _aal("aal_fgsm", "AAL+FGSM (paper defaults: M2, indicator, xi1=xi2=zeta=0.1)"),
        _aal("aal_fgsm_uniform", "AAL+FGSM, control: uniform mask (per-image mean of k)", "method.mask_control=uniform"),
        _aal("aal_fgsm_shuffle", "AAL+FGSM, control: shuffled mask (k permuted per image)", "method.mask_control=shuffle"),
        Setting("fgsm_at_matched", "fgsm_at.yaml", (), "FGSM-AT at matched budget eps*mean k (of AAL+FGSM)", "aal_fgsm"),
        Setting("pgd_at", "pgd_at.yaml", (), "PGD-AT (PGD-10)"),
        Setting("aal_pgd", "aal_pgd.yaml", (), "AAL+PGD (PGD-10 in k(M^a))"),
        Setting("aal_pgd_uniform", "aal_pgd.yaml", ("method.mask_control=uniform",),
                "AAL+PGD, control: uniform mask (per-image mean of k)"),
        Setting("pgd_at_matched", "pgd_at.yaml", (), "PGD-AT at matched budget eps*mean k (of AAL+PGD)", "aal_pgd"),
        _aal("aal_fgsm_kM", "AAL+FGSM, kernel M", "method.kernel=M"),
        _aal("aal_fgsm_k1-M2", "AAL+FGSM, kernel 1-M2 (background)", "method.kernel=1-M2"),
        *[_aal(f"aal_fgsm_xi2_{v}", f"AAL+FGSM, xi2={v}", f"method.xi2={v}") for v in ("0", "0.01", "0.05", "0.5")],
        _aal("aal_fgsm_cw05", "AAL+FGSM, clean_weight 0.5", "method.clean_weight=0.5"),
        _aal("aal_fgsm_fd", "AAL+FGSM, coupling finite-difference", "method.coupling=finite-difference"),
        _aal("aal_fgsm_bin50", "AAL+FGSM, binary top-50% of k at full eps", "method.mask_binarize=0.5"),
        _aal("aal_fgsm_bin50_shuffle", "control: binary 50% mask, shuffled", "method.mask_binarize=0.5",
             "method.mask_control=shuffle"),
        _aal("aal_fgsm_rand", "AAL+FGSM, random start", "method.rand_init=true"),
        _aal("aal_fgsm_input_att", "AAL+FGSM, attention at input level (cbam_input)", "model.attention=cbam_input"),
        _aal("aal_fgsm_fixed", "AAL+FGSM, adv_attention fixed, clean_weight 0.5", "method.adv_attention=fixed",
             "method.clean_weight=0.5"),
        _aal("aal_fgsm_fixed_uniform", "control: adv_attention fixed, clean_weight 0.5, uniform mask",
             "method.adv_attention=fixed", "method.clean_weight=0.5", "method.mask_control=uniform"),
        _aal("aal_fgsm_input_att_uniform", "control: cbam_input attention, uniform mask", "model.attention=cbam_input",
             "method.mask_control=uniform"),
        _aal("aal_fgsm_kM_rand", "AAL+FGSM, kernel M, random start", "method.kernel=M", "method.rand_init=true"),
    ]
}  # fmt: skip

GROUPS = {
    "main": ["fgsm_at", "aal_fgsm", "aal_fgsm_uniform", "aal_fgsm_shuffle", "fgsm_at_matched"],
    "pgd": ["pgd_at", "aal_pgd", "aal_pgd_uniform", "pgd_at_matched"],
    "kernels": ["aal_fgsm_kM", "aal_fgsm", "aal_fgsm_k1-M2"],
    "xi2": ["aal_fgsm_xi2_0", "aal_fgsm_xi2_0.01", "aal_fgsm_xi2_0.05", "aal_fgsm", "aal_fgsm_xi2_0.5"],
    "search": ["aal_fgsm", "fgsm_at_matched", "aal_fgsm_uniform", "aal_fgsm_cw05", "aal_fgsm_kM", "aal_fgsm_fd",
               "aal_fgsm_bin50", "aal_fgsm_bin50_shuffle", "aal_fgsm_rand", "aal_fgsm_kM_rand",
               "aal_fgsm_input_att", "aal_fgsm_fixed"],
}  # fmt: skip
ATTACKS = ("clean", "fgsm", "pgd20")


@dataclass
class Job:
    setting: str
    seed: int
    overrides: list[str] = field(default_factory=list)


def common_overrides(args: argparse.Namespace, seed: int) -> list[str]:
    return [
        f"seed={seed}",
        f"epochs={args.epochs}",
        f"data.train_n={args.train_n}",
        "model.attention=cbam",
        f"eval.n={args.eval_n}",
        f"eval.eps={EPS}",
        "eval.attacks=[clean,fgsm,pgd20]",
        "eval.epoch_n=0",  # no per-epoch evaluation: the final one is what we compare
        "progress=false",
        "threads=1",
        "checkpoint_every=1000",
    ]


def run_one(setting: str, seed: int, base: str, overrides: list[str], out_root: str) -> dict:
    """Train and evaluate one run in this (worker) process; return its record."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from aal.config import load_config
    from aal.engine.run import train_run

    key = hashlib.sha1(json.dumps([base, overrides]).encode()).hexdigest()[:8]
    name = f"{setting}-s{seed}-{key}"
    run_dir = Path(out_root) / name
    if not (run_dir / "results.json").exists():
        cfg = load_config(CONFIGS / base, [*overrides, f"out_dir={out_root}", f"name={name}"])
        if run_dir.exists():  # a killed run: start again
            import shutil

            shutil.rmtree(run_dir)
        with open(Path(out_root) / f"{name}.log", "w") as logf:
            train_run(cfg, log=lambda s: print(s, file=logf, flush=True))
    res = json.loads((run_dir / "results.json").read_text())
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "setting": setting,
        "seed": seed,
        "config": base,
        "overrides": overrides,
        "run_dir": str(run_dir),
        "accuracy": {k: res["eval"]["accuracy"][k] for k in ATTACKS},
        "eval_n": res["eval"]["n"],
        "epoch_time": [e["epoch_time"] for e in epochs],
        "mask_mean": [e["logs"].get("mask_mean") for e in epochs],
        "m_mean": [e["logs"].get("m_mean") for e in epochs],  # clean attention M (saturation check)
        "m_a_mean": [e["logs"].get("m_a_mean") for e in epochs],
        "train_acc": [e.get("train_acc") for e in epochs],
        "machine": res.get("machine"),
    }


def _mean_k(records: list[dict]) -> float:
    vals = [v for r in records for v in r["mask_mean"] if v is not None]
    if not vals:
        raise RuntimeError("no mask_mean logged by the reference runs")
    return statistics.fmean(vals)


def run_group(args: argparse.Namespace, group: str, seeds: list[int]) -> dict:
    names = GROUPS[group]
    out_root = str(Path(args.out_dir).resolve())
    Path(out_root).mkdir(parents=True, exist_ok=True)
    # references of matched settings must run too (and first)
    refs = {SETTINGS[n].matched for n in names if SETTINGS[n].matched}
    order = [n for n in refs if n not in names] + sorted(names, key=lambda n: n not in refs)
    ref_seeds = [int(s) for s in args.ref_seeds.split(",") if s] if args.ref_seeds else seeds
    pending = [(n, s) for s in seeds for n in order if n not in refs or n in names]
    pending += [(n, s) for n in refs for s in ref_seeds if (n, s) not in pending]
    pending.sort(key=lambda t: (t[0] not in refs, t[1]))  # references first; the rest in the given order
    done: dict[tuple[str, int], dict] = {}
    failed: list[dict] = []
    matched_info: dict[str, dict] = {}

    def ready(n: str) -> bool:
        ref = SETTINGS[n].matched
        return ref is None or all((ref, s) in done for s in ref_seeds)

    def make(n: str, seed: int) -> list[str]:
        st = SETTINGS[n]
        over = common_overrides(args, seed) + list(st.overrides)
        if st.matched:
            ref_records = [done[(st.matched, s)] for s in ref_seeds]
            k = _mean_k(ref_records)
            matched_info[n] = {"reference": st.matched, "mean_k": k, "eps": EPS * k, "seeds": ref_seeds}
            over.append(f"method.eps={EPS * k:.6f}")
        return over

    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        running = {}
        while pending or running:
            while len(running) < args.jobs:
                idx = next((i for i, (n, _) in enumerate(pending) if ready(n)), None)
                if idx is None:
                    break
                n, s = pending.pop(idx)
                over = make(n, s)
                print(f"[{time.strftime('%H:%M:%S')}] start {n} seed {s}", flush=True)
                fut = pool.submit(run_one, n, s, SETTINGS[n].base, over, out_root)
                running[fut] = (n, s, over)
            if not running:
                raise RuntimeError(f"nothing runnable: {pending}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                n, s, over = running.pop(fut)
                try:
                    rec = fut.result()
                except Exception:  # a failed run is reported, the others go on
                    failed.append({"setting": n, "seed": s, "overrides": over, "error": traceback.format_exc()})
                    print(f"FAILED {n} seed {s}:\n{failed[-1]['error']}", flush=True)
                    if any(SETTINGS[m].matched == n for m, _ in pending):
                        pending = [(m, t) for m, t in pending if SETTINGS[m].matched != n]
                    continue
                done[(n, s)] = rec
                a = rec["accuracy"]
                print(f"[{time.strftime('%H:%M:%S')}] done {n} seed {s}: clean {a['clean']:.4f} fgsm {a['fgsm']:.4f} "
                      f"pgd20 {a['pgd20']:.4f}  {statistics.fmean(rec['epoch_time']):.1f} s/epoch", flush=True)
    runs = [done[(n, s)] for n in order for s in seeds if (n, s) in done and (n in names or n not in refs)]
    return {
        "group": group,
        "settings": [n for n in order if any(r["setting"] == n for r in runs)],
        "labels": {n: SETTINGS[n].label for n in order},
        "seeds": seeds,
        "epochs": args.epochs,
        "train_n": args.train_n,
        "eval_n": args.eval_n,
        "matched": matched_info,
        "runs": runs,
        "failed": failed,
    }


def summarize(group: dict) -> list[dict]:
    rows = []
    for n in group["settings"]:
        recs = [r for r in group["runs"] if r["setting"] == n]
        row = {"setting": n, "label": group["labels"].get(n, n), "n_seeds": len(recs)}
        for a in ATTACKS:
            vals = [100 * r["accuracy"][a] for r in recs]
            row[a] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        row["epoch_time"] = statistics.fmean(t for r in recs for t in r["epoch_time"])
        ks = [v for r in recs for v in r["mask_mean"] if v is not None]
        row["mean_k"] = statistics.fmean(ks) if ks else None
        last_m = [r["m_mean"][-1] for r in recs if r.get("m_mean") and r["m_mean"][-1] is not None]
        row["m_last"] = statistics.fmean(last_m) if last_m else None  # mean clean attention M, last epoch
        row["k_per_epoch"] = (
            [round(statistics.fmean(r["mask_mean"][e] for r in recs), 4) for e in range(len(recs[0]["mask_mean"]))]
            if ks else None
        )  # fmt: skip
        rows.append(row)
    return rows


def markdown(doc: dict) -> str:
    out = ["# AAL vs baselines and controls on Fashion-MNIST", ""]
    out.append("Generated by `benchmarks/aal_compare.py` (small_cnn with CBAM after the first conv for every setting, "
               "eps 0.1, SGD lr 0.05 cosine, batch 128, train on the first `train_n` training images; accuracy on the "
               "first `eval_n` test images with full, unmasked attacks: FGSM and PGD-20 (step 2.5 eps/20, random start) "
               "at eps 0.1). Mean ± std over seeds, in %. `s/epoch` is wall time with 1 thread per run on a shared "
               "2-core CPU (noisy: compare within a table only). `mean k` is the mean of the budget mask k(M^a) over "
               "training (per epoch in the JSON); `mean M, last epoch` is the mean of the clean CBAM map M over the "
               "last epoch (values near 1 mean the attention has saturated and k(M^a) is close to 1 everywhere).")
    out.append("")
    for gname, g in doc["groups"].items():
        out.append(f"## {gname}")
        out.append("")
        out.append(f"Command: `{g['command']}`  ")
        out.append(f"seeds {g['seeds']}, epochs {g['epochs']}, train_n {g['train_n']}, eval_n {g['eval_n']}; "
                   f"measured {g['finished']} on {g['machine']}")
        for n, m in g.get("matched", {}).items():
            out.append(f"  \n`{n}`: eps = 0.1 × mean k of `{m['reference']}` = 0.1 × {m['mean_k']:.4f} = {m['eps']:.4f}")
        if g.get("partial"):
            out.append(f"\n**Partial**: {g['partial']}")
        out.append("")
        out.append("| setting | seeds | clean | FGSM | PGD-20 | mean k | mean M, last epoch | s/epoch |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in summarize(g):
            k = f"{r['mean_k']:.3f}" if r["mean_k"] is not None else "1 (full)"
            if r["setting"].endswith("_matched"):
                k = f"{g['matched'][r['setting']]['mean_k']:.3f} (uniform)"
            cells = " | ".join(f"{r[a][0]:.2f} ± {r[a][1]:.2f}" for a in ATTACKS)
            m = f"{r['m_last']:.3f}" if r["m_last"] is not None else "-"
            out.append(f"| `{r['setting']}`: {r['label']} | {r['n_seeds']} | {cells} | {k} | {m} | {r['epoch_time']:.1f} |")
        if g.get("failed"):
            out.append("")
            out.append("Failed runs: " + ", ".join(f"{f['setting']} seed {f['seed']}" for f in g["failed"]))
        out.append("")
    return "\n".join(out)


def grouped_bars(rows: list[dict], cols: dict[str, str], names: list[str], ylabel: str, title: str, path: Path,
                 rotation: int = 30) -> None:
    """Bar plot: one group per row (``names``), one bar per column key in ``cols`` (key -> legend
    label), heights ``row[key][0]`` with error bars ``row[key][1]`` (mean, std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4))
    width = 0.8 / len(cols)
    for i, (c, label) in enumerate(cols.items()):
        xs = [j + (i - (len(cols) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r[c][0] for r in rows], width, yerr=[r[c][1] for r in rows], capsize=3, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=rotation, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(g: dict, path: Path) -> None:
    rows = summarize(g)
    grouped_bars(rows, {a: a for a in ATTACKS}, [r["setting"] for r in rows], "accuracy (%)",
                 f"Fashion-MNIST, eps 0.1, small_cnn+CBAM: {g.get('key', g['group'])} ({len(g['seeds'])} seeds, "
                 f"{g['epochs']} ep, {g['train_n']} train)", path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", choices=sorted(GROUPS), default="main")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-n", type=int, default=20000)
    p.add_argument("--eval-n", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=2, help="parallel training processes (1 thread each)")
    p.add_argument("--settings", default="", help="comma-separated subset of the group's settings")
    p.add_argument("--ref-seeds", default="",
                   help="seeds of the reference runs whose mean k sets a matched budget (default: --seeds)")
    p.add_argument("--tag", default="", help="store the results under '<group>-<tag>' (keeps another run of the group)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "out" / "aal_compare"))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--render-only", action="store_true", help="only rewrite the Markdown from the JSON")
    args = p.parse_args(argv)
    if args.render_only:
        jpath = Path(args.results) / "aal_compare.json"
        (Path(args.results) / "aal_compare.md").write_text(markdown(json.loads(jpath.read_text())))
        return 0
    if args.settings:
        keep = [s for s in args.settings.split(",") if s]
        unknown = [s for s in keep if s not in SETTINGS]
        if unknown:
            p.error(f"unknown settings {unknown} (known: {', '.join(SETTINGS)})")
        GROUPS[args.group] = keep
    seeds = [int(s) for s in args.seeds.split(",") if s]
    command = "python benchmarks/aal_compare.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    from aal.engine.run import machine_description

    t0 = time.time()
    g = run_group(args, args.group, seeds)
    g["command"] = command
    g["wall_seconds"] = time.time() - t0
    g["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    mach = machine_description()
    g["machine"] = f"{mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, commit {mach['aal_commit']}"
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    jpath = results / "aal_compare.json"
    doc = json.loads(jpath.read_text()) if jpath.exists() else {"groups": {}}
    key = f"{args.group}-{args.tag}" if args.tag else args.group
    g["key"] = key
    doc["groups"][key] = g
    jpath.write_text(json.dumps(doc, indent=1))
    (results / "aal_compare.md").write_text(markdown(doc))
    plot(g, results / f"aal_compare_{key}.png")
    print(markdown({"groups": {key: g}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
