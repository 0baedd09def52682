"""A Markdown report comparing trained runs: tables, plots, and the JSON they were made from.

:func:`aal.engine.report.make_report` (``aal report RUN [RUN ...] --out DIR``) reads run folders
(the engine's) and writes, with the pieces of this module::

    DIR/report.md              a table comparing the runs (from each run's results.json, any
                               finished suite results in RUN/eval/, and what the report measures),
                               per-class robust accuracy, the hardest class pairs, the plots
    DIR/report.json            every number used (so a figure can be re-plotted or checked)
    DIR/acc_vs_eps.png         PGD accuracy vs eps (eps x eps_factors)
    DIR/acc_vs_steps.png       PGD accuracy vs attack steps, at the run's eps
    DIR/per_class_robust.png   per-class accuracy under PGD at the run's eps (clean as markers)
    DIR/attention_<run>.png    for AAL runs (from the command line): the attention figure of ``aal viz``

What the report measures itself is kept cheap: PGD (seeded, random start) on the first ``n``
test images (default 500), at each run's own ``eval.eps`` unless ``eps`` is given. With
``checks=True`` it also runs the gradient-masking checks (:mod:`aal.eval.checks`) per run.
Numbers from ``results.json`` are the run's own final evaluation (its ``n``, its attacks).

Plots use matplotlib's object API with the Agg canvas (no pyplot, no display).

Example:
    >>> from aal.engine.report import make_report
    >>> make_report(["runs/pgd_at", "runs/standard"], "report/", n=500)    # doctest: +SKIP
    PosixPath('report/report.md')
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from aal.attacks import PGD
from aal.eval.analytics import class_report, predict_under_attack


# ----------------------------------------------------------------------------- measurements
def robustness_curves(
    model: nn.Module,
    data: Any,
    eps: float,
    *,
    norm: str = "linf",
    n: int | None = 500,
    eps_factors: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
    steps: Sequence[int] = (1, 2, 5, 10, 20, 50),
    attack_steps: int = 20,
    batch_size: int = 500,
    seed: int = 0,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """PGD accuracy vs eps, vs steps, and per-class analytics at ``eps`` (JSON-able dict).

    Every PGD run is seeded with ``seed`` and attacks only clean-correct points; the
    ``(eps, attack_steps)`` run is shared by the eps curve, the steps curve and the per-class
    analytics. ``eps * 0`` is clean accuracy.

    Returns:
        ``{"eps": float, "norm", "n", "attack_steps", "eps_curve": {"eps": [...], "accuracy": [...]},
        "steps_curve": {"steps": [...], "accuracy": [...]}, "per_class": ClassReport.to_dict(),
        "clean": float, "robust": float (PGD-attack_steps at eps), "seconds": float}``
    """
    t0 = time.perf_counter()
    cache: dict[tuple[float, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def preds(e: float, k: int):
        key = (round(e, 12), k if e > 0 else 0)
        if key not in cache:
            if progress:
                progress(f"PGD-{k} at eps={e:.4g}" if e > 0 else "clean")
            attack = PGD(e, steps=k, norm=norm, seed=seed) if e > 0 else None
            cache[key] = predict_under_attack(model, data, attack, n=n, batch_size=batch_size)
        return cache[key]

    def acc(e: float, k: int) -> float:
        y, _, adv = preds(e, k)
        return (adv == y).float().mean().item() if len(y) else 0.0

    eps_list = sorted({float(f) * eps for f in eps_factors} | {eps})
    eps_acc = [acc(e, attack_steps) for e in eps_list]
    steps_list = sorted({int(k) for k in steps} | {attack_steps})
    steps_acc = [acc(eps, k) for k in steps_list]
    y, clean, adv = preds(eps, attack_steps)
    k = num_classes if num_classes is not None else int(max(int(y.max()), int(clean.max()), int(adv.max())) + 1)
    per_class = class_report(y, clean, adv, k, class_names=class_names)
    return {
        "eps": float(eps),
        "norm": norm,
        "n": int(len(y)),
        "attack": f"pgd{attack_steps}",
        "attack_steps": int(attack_steps),
        "seed": int(seed),
        "clean": (clean == y).float().mean().item(),
        "robust": (adv == y).float().mean().item(),
        "eps_curve": {"eps": eps_list, "accuracy": eps_acc},
        "steps_curve": {"steps": steps_list, "accuracy": steps_acc},
        "per_class": per_class.to_dict(),
        "seconds": time.perf_counter() - t0,
    }


def _suite_results(run_dir: Path) -> list[dict[str, Any]]:
    """Finished suite results saved by ``aal eval --suite`` in ``RUN/eval/``."""
    out = []
    for p in sorted((run_dir / "eval").glob("suite-*.json")):
        try:
            state = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(state, dict) and state.get("finished") and "result" in state:
            fp = state.get("fingerprint", {})
            out.append({"file": p.name, "suite": fp.get("suite"), "eps": fp.get("eps"), "norm": fp.get("norm"),
                        "n": fp.get("n"), "seed": fp.get("seed"), **state["result"]})
            if "label" not in out[-1]:  # written before results carried their label (and before FAB-T ran)
                plain = fp.get("suite") != "standard" or "fab_t" in state["result"].get("accuracy", {})
                out[-1]["label"] = f"{fp.get('suite')} suite" if plain else "standard suite without FAB-T (older aal)"
    return out


# ----------------------------------------------------------------------------- plots
def _figure(w: float = 6.0, h: float = 4.0):
    from matplotlib.figure import Figure  # lazy: plotting is optional at import time

    return Figure(figsize=(w, h), dpi=100)


def plot_curves(runs: list[dict[str, Any]], key: str, xkey: str, xlabel: str, path: Path, logx: bool = False,
                title: str | None = None) -> Path:
    """One line per run of ``run["computed"][key][xkey]`` vs accuracy (%)."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    xs_all: set[float] = set()
    for r in runs:
        c = r["computed"][key]
        xs_all.update(c[xkey])
        ax.plot(c[xkey], [100 * a for a in c["accuracy"]], marker="o", label=r["name"])
    if logx:
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.set_xticks(sorted(xs_all))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_per_class(runs: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars of per-class robust accuracy (one colour per run), clean accuracy as markers."""
    k = max(r["computed"]["per_class"]["num_classes"] for r in runs)
    names = runs[0]["computed"]["per_class"].get("class_names") or [str(i) for i in range(k)]
    if len(names) < k:
        names = [*names, *[str(i) for i in range(len(names), k)]]
    fig = _figure(max(6.0, 0.6 * k * max(1, len(runs)) ** 0.5 + 2), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        pc = r["computed"]["per_class"]
        xs = [j - 0.4 + width * (i + 0.5) for j in range(pc["num_classes"])]
        rob = [float("nan") if v is None else 100 * v for v in pc["robust"]]
        cln = [float("nan") if v is None else 100 * v for v in pc["clean"]]
        bars = ax.bar(xs, rob, width=width, label=f"{r['name']} (robust)")
        ax.plot(xs, cln, linestyle="none", marker="_", markersize=10, color=bars.patches[0].get_facecolor() if bars.patches else None)
    ax.set_xticks(range(k))
    ax.set_xticklabels(names[:k], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)  (bars: under PGD, ticks: clean)")
    ax.set_ylim(0, 102)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- the report
def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.2f}"
    return str(v)


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        base = p.name or str(p)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def render_markdown(payload: dict[str, Any]) -> str:
    """The Markdown text of a report from its JSON payload (:func:`make_report`)."""
    runs = payload["runs"]
    s = payload["settings"]
    m = payload["machine"]
    lines = ["# Robustness report", ""]
    lines.append(
        f"{len(runs)} run(s); measured {payload['created']} on {m.get('cpu') or 'unknown CPU'} "
        f"({m.get('cores')} cores, torch {m.get('torch')}, {m.get('threads')} threads, "
        f"aal commit {m.get('aal_commit') or 'unknown'}) in {payload['seconds']:.0f} s."
    )
    lines.append("")

    # --- comparison table
    attack_cols: list[str] = []
    for r in runs:
        acc = ((r.get("results") or {}).get("eval") or {}).get("accuracy", {})
        for k in acc:
            if k not in attack_cols and k not in ("clean", "robust"):
                attack_cols.append(k)
    suite_cols: list[str] = []
    for r in runs:
        for su in r["suites"]:
            col = su["label"]
            if col not in suite_cols:
                suite_cols.append(col)
    lines.append("## Comparison")
    lines.append("")
    lines.append("Accuracy in %. *results.json*: the run's own final evaluation (its `n`); "
                 "*suite*: `aal eval --suite` results saved in the run folder; "
                 "*report*: measured for this report on the first test images (columns `report n`, `report eps`).")
    lines.append("")
    header = ["run", "method", "model", "dataset", "epochs", "eps", "n", "clean", *attack_cols, "robust",
              *suite_cols, "report n", "report eps", "report clean", f"report PGD-{runs[0]['computed']['attack_steps']}"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for r in runs:
        c, comp = r["config"], r["computed"]
        ev = (r.get("results") or {}).get("eval") or {}
        acc = ev.get("accuracy", {})
        suites = {su["label"]: su for su in r["suites"]}
        row = [r["name"], c["method"], c["model"], c["dataset"], str(c["epochs"]),
               f"{ev['eps']:.4g}" if "eps" in ev else "-", str(ev.get("n", "-")), _fmt(acc.get("clean"))]
        row += [_fmt(acc.get(k)) for k in attack_cols]
        row += [_fmt(acc.get("robust"))]
        for col in suite_cols:
            su = suites.get(col)
            row.append(f"{_fmt(su['accuracy']['robust'])} (n={su['n']}, eps={su['eps']:.4g})" if su else "-")
        row += [str(comp["n"]), f"{comp['eps']:.4g}", _fmt(comp["clean"]), _fmt(comp["robust"])]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")

    # --- plots
    lines.append("## Plots")
    lines.append("")
    lines.append(f"Seeded PGD (random start, step 2.5·eps/steps) on the first {runs[0]['computed']['n']} test images; "
                 "only clean-correct points are attacked.")
    lines.append("")
    lines.append(f"![accuracy vs eps]({payload['plots']['acc_vs_eps']})")
    lines.append(f"![accuracy vs steps]({payload['plots']['acc_vs_steps']})")
    lines.append(f"![per-class robust accuracy]({payload['plots']['per_class_robust']})")
    lines.append("")
    if any(r.get("figures") for r in runs):
        lines.append("## Figures")
        lines.append("")
        for r in runs:
            for caption, file in (r.get("figures") or {}).items():
                lines.append(f"**{r['name']}**: {caption}")
                lines.append("")
                lines.append(f"![{r['name']}: {caption}]({file})")
                lines.append("")

    # --- per-class
    lines.append("## Per-class accuracy under attack")
    lines.append("")
    k = max(r["computed"]["per_class"]["num_classes"] for r in runs)
    names = runs[0]["computed"]["per_class"].get("class_names") or [str(i) for i in range(k)]
    header = ["class", *[f"{r['name']} clean / robust" for r in runs]]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for j in range(k):
        row = [names[j] if j < len(names) else str(j)]
        for r in runs:
            pc = r["computed"]["per_class"]
            if j < pc["num_classes"]:
                row.append(f"{_fmt(pc['clean'][j])} / {_fmt(pc['robust'][j])}")
            else:
                row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("### Hardest class pairs under attack")
    lines.append("")
    lines.append("Symmetrised counts of true -> predicted confusions at the adversarial examples (a -> b + b -> a).")
    lines.append("")
    for r in runs:
        pairs = r["computed"]["per_class"]["hardest_pairs"]
        cn = r["computed"]["per_class"].get("class_names")
        desc = ", ".join(
            f"{cn[p['a']] if cn else p['a']} <-> {cn[p['b']] if cn else p['b']}: {p['count']} ({p['a_to_b']} + {p['b_to_a']})"
            for p in pairs
        ) or "none"
        lines.append(f"- **{r['name']}**: {desc}")
    lines.append("")

    # --- checks
    if any("checks" in r for r in runs):
        lines.append("## Gradient-masking checks")
        lines.append("")
        for r in runs:
            ch = r.get("checks")
            if not ch:
                continue
            lines.append(f"**{r['name']}**: {ch['status'].upper()} (n={ch['n']}, eps={ch['eps']:.4g})")
            lines.append("")
            for c in ch["checks"]:
                lines.append(f"- {c['status'].upper()} `{c['name']}`: {c['message']}")
            lines.append("")
    lines.append(f"Data: `report.json`. Settings: {json.dumps(s)}.")
    lines.append("")
    return "\n".join(lines)


__all__ = ["plot_curves", "plot_per_class", "render_markdown", "robustness_curves"]
