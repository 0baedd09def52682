"""ProtoNet vs ProtoNet+AAL, and the xi2 sweep of the AAL paper's Fig. 4 (seed 001, Sec. 4.3-4.4).

Every run is a shipped few-shot config (``configs/fewshot/*_protonet_aal.yaml`` by default)
plus ``--set key=value`` overrides, trained with :func:`aal.engine.task_runs.train_fewshot` and evaluated
on the same fixed test episodes (episode ``i`` is seeded by ``(eval.seed, i)``):

* ``compare``: ``protonet`` (the AAL config's head, clean episodes) vs ``protonet_aal``, same
  epochs x episodes (the same number of optimizer updates on the same training episodes; AAL
  costs more compute per update, reported as train seconds), for each ``--seeds``.
* ``sweep``: ``protonet_aal`` with ``method.xi2`` in ``--xi2`` (Fig. 4: 0, 0.01, 0.05, 0.1, 0.5;
  ``xi2 = 0`` is "spatial attention" without backtracking), for each seed.
* ``control`` (not in ``all``): ``protonet_aal`` with ``method.mask_control=uniform``: each support
  image gets its AAL budget's mean everywhere, so what remains is the attack's strength, not
  where it lands.

Writes ``<out>.json`` (every run, the per-seed numbers, the summary and the machine), a
Markdown table ``<out>.md`` and, for the sweep, a plot ``<out>_xi2.png``. Numbers: test
accuracy in % (mean over seeds, ± the std over seeds; the mean 95% CI of the test episodes).

Examples (repository root)::

    # smoke (seconds): proves the pipeline, numbers meaningless
    python benchmarks/fewshot.py all --smoke --set data.root=../shared/data/omniglot/python
    # the evidence runs (long on this CPU):
    python benchmarks/fewshot.py all --config configs/fewshot/omniglot_protonet_aal.yaml \\
        --set data.root=../shared/data/omniglot/python --seeds 0 1 2 --out benchmarks/results/fewshot_omniglot
    python benchmarks/fewshot.py all --config configs/fewshot/fashion_mnist_protonet_aal.yaml \\
        --seeds 0 1 2 --out benchmarks/results/fewshot_fmnist
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
FIG4_XI2 = (0.0, 0.01, 0.05, 0.1, 0.5)
SMOKE = ["epochs=1", "data.episodes=2", "data.n_way=5", "data.n_query=2", "eval.episodes=5", "eval.epoch_episodes=0"]
SMOKE_RESNET12 = ["model.channels=[8,8,8,8]"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["compare", "sweep", "control", "all"],
                   help="which experiment(s); control: protonet_aal with mask_control=uniform (same mean budget per "
                        "image, no location), not part of all")
    p.add_argument("--config", default="configs/fewshot/omniglot_protonet_aal.yaml", help="a protonet_aal few-shot config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--xi2", type=float, nargs="+", default=list(FIG4_XI2), help="sweep values (Fig. 4)")
    p.add_argument("--sweep-seeds", type=int, nargs="+", default=None, help="seeds of the sweep (default: --seeds)")
    p.add_argument("--out", default=None, help="output path stem (default benchmarks/results/fewshot-<dataset>[-smoke])")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--smoke", action="store_true", help="tiny runs (1 epoch of 2 episodes, 5 test episodes, 8-wide ResNet-12)")
    return p.parse_args(argv)


def run_one(raw: dict[str, Any], data, label: str) -> dict[str, Any]:
    from aal.engine.task_runs import train_fewshot

    t0 = time.perf_counter()
    _, res = train_fewshot(raw, data=data, log=lambda s: None)
    accs = {k: (round(100 * v["mean"], 2), round(100 * v["ci95"], 2)) for k, v in res["fewshot"].items()}
    print(f"  {label:<28} {time.perf_counter() - t0:7.1f}s  " + "  ".join(f"{k} {m:.2f}±{c:.2f}" for k, (m, c) in accs.items()), flush=True)
    return {"fewshot": res["fewshot"], "train_seconds": res["train_seconds"], "eval_seconds": res["eval_seconds"],
            "last_epoch": res["history"][-1] if res["history"] else None}  # fmt: skip


def summarise(runs: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Per group (``key`` of a run) and test setting: mean and std over seeds, mean CI, n seeds."""
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in runs:
        g = groups.setdefault(str(r[key]), {})
        for setting, v in r["fewshot"].items():
            g.setdefault(setting, []).append((v["mean"], v["ci95"]))
    out: dict[str, dict[str, Any]] = {}
    for g, settings in groups.items():
        out[g] = {}
        for setting, vals in settings.items():
            m = [100 * a for a, _ in vals]
            mean = sum(m) / len(m)
            std = math.sqrt(sum((x - mean) ** 2 for x in m) / (len(m) - 1)) if len(m) > 1 else 0.0
            out[g][setting] = {"mean": mean, "std_seeds": std, "ci95_mean": sum(100 * c for _, c in vals) / len(vals), "seeds": len(m)}
    return out


def table(summary: dict[str, dict[str, Any]], first: str) -> str:
    settings = sorted({s for g in summary.values() for s in g})
    lines = [f"| {first} | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for g, row in summary.items():
        cells = [f"{row[s]['mean']:.2f} ± {row[s]['std_seeds']:.2f} (CI ±{row[s]['ci95_mean']:.2f})" if s in row else "" for s in settings]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(summary, key=float)
    settings = sorted({s for g in summary.values() for s in g if not s.startswith("runs_")})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for s in settings:
        ys = [summary[x][s]["mean"] for x in xs]
        es = [summary[x][s]["std_seeds"] for x in xs]
        ax.errorbar(range(len(xs)), ys, yerr=es, marker="o", capsize=3, label=s)
    ax.set_xticks(range(len(xs)), [f"{float(x):g}" for x in xs])
    ax.set_xlabel("backtracking rate ξ2 (0: spatial attention, no backtracking)")
    ax.set_ylabel("test accuracy %")
    ax.set_title("ProtoNet+AAL: ξ2 sweep (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from aal.data.fewshot import load_fewshot
    from aal.engine.run import machine_description
    from aal.tasks import fewshot_config
    from aal.tasks.fewshot import merge_config
    from aal.config import parse_overrides, read_config_file

    if args.threads:
        torch.set_num_threads(args.threads)
    base = read_config_file(ROOT / args.config if not Path(args.config).is_absolute() else Path(args.config))
    smoke = SMOKE + (SMOKE_RESNET12 if base.get("model", {}).get("name") == "resnet12" else []) if args.smoke else []
    overrides = smoke + args.overrides + ["progress=false"]
    base = merge_config(base, parse_overrides(overrides))
    cfg = fewshot_config(base)  # validates once, before any work
    if cfg.method.name != "protonet_aal":
        raise SystemExit(f"--config must be a protonet_aal config, got method {cfg.method.name!r}")
    d = cfg.data
    stem = Path(args.out).with_suffix("") if args.out else ROOT / "benchmarks" / "results" / f"fewshot-{d.name}{'-smoke' if args.smoke else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    print(f"loading {d.name} ...", flush=True)
    data = load_fewshot(d.name, root=d.root, download=d.download, **dict(d.options))
    head = {k: base["method"][k] for k in ("metric", "temperature") if k in base["method"]}
    payload: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "config": args.config, "overrides": overrides, "resolved_base": base, "seeds": args.seeds,
        "machine": machine_description(),
    }  # fmt: skip
    md = [f"# Few-shot: ProtoNet vs ProtoNet+AAL on {d.name}", "",
          f"`{payload['command']}`; test accuracy % (mean ± std over {len(args.seeds)} seeds; mean 95% CI of "
          f"the test episodes); {payload['machine']['cpu']}, torch {payload['machine']['torch']}.", ""]  # fmt: skip
    if args.what in ("compare", "all"):
        print("compare: protonet vs protonet_aal", flush=True)
        runs = []
        for seed in args.seeds:
            for arm in ("protonet", "protonet_aal"):
                raw = merge_config(base, {"seed": seed})
                if arm == "protonet":
                    raw["method"] = {"name": "protonet", **head}
                runs.append({"arm": arm, "seed": seed, **run_one(raw, data, f"{arm} seed {seed}")})
        payload["compare"] = {"runs": runs, "summary": summarise(runs, "arm")}
        md += ["## ProtoNet vs ProtoNet+AAL (same episodes and updates)", "", table(payload["compare"]["summary"], "method"), ""]
        secs = {a: sum(r["train_seconds"] for r in runs if r["arm"] == a) for a in ("protonet", "protonet_aal")}
        md += [f"Train seconds (all seeds): protonet {secs['protonet']:.0f}, protonet_aal {secs['protonet_aal']:.0f}.", ""]
    if args.what == "control":
        print("control: protonet_aal with mask_control=uniform", flush=True)
        runs = []
        for seed in args.seeds:
            raw = merge_config(base, {"seed": seed, "method": {"mask_control": "uniform"}})
            runs.append({"arm": "protonet_aal_uniform", "seed": seed, **run_one(raw, data, f"uniform control seed {seed}")})
        payload["control"] = {"runs": runs, "summary": summarise(runs, "arm")}
        md += ["## Control: the AAL budget's per-image mean, spread uniformly (no location)", "",
               table(payload["control"]["summary"], "method"), ""]
    if args.what in ("sweep", "all"):
        print(f"sweep: xi2 in {args.xi2}", flush=True)
        # the compare arm protonet_aal at the config's xi2 is the same run: reuse it, don't train it twice
        done = {(r["seed"], float(base["method"]["xi2"])): r for r in payload.get("compare", {}).get("runs", [])
                if r["arm"] == "protonet_aal"}  # fmt: skip
        runs = []
        for seed in args.sweep_seeds or args.seeds:
            for xi2 in args.xi2:
                if (seed, xi2) in done:
                    runs.append({**{k: v for k, v in done[(seed, xi2)].items() if k != "arm"}, "xi2": xi2})
                    continue
                raw = merge_config(base, {"seed": seed, "method": {"xi2": xi2}})
                runs.append({"xi2": xi2, "seed": seed, **run_one(raw, data, f"xi2={xi2:g} seed {seed}")})
        payload["sweep"] = {"runs": runs, "summary": summarise(runs, "xi2")}
        md += ["## ξ2 sweep (paper Fig. 4)", "", f"seeds {args.sweep_seeds or args.seeds}", "", table(payload["sweep"]["summary"], "ξ2"), ""]
        plot_sweep(payload["sweep"]["summary"], stem.with_name(stem.name + "_xi2.png"))
        md += [f"![xi2 sweep]({stem.name}_xi2.png)", ""]
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=float))
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
