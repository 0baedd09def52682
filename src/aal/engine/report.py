"""``aal report``: read trained run folders and write the Markdown report comparing them.

Run folders belong to the engine, so the function that reads them lives here; the measurements,
plots and Markdown come from :mod:`aal.eval.report` (see its module doc for what is written).
:func:`finish_run` is the end of ``aal train`` when the config asks for it (``eval.suite``,
``eval.report``): the evaluation suite into the run's ``eval/`` folder, then the report into its
``report/`` folder.

Example:
    >>> from aal.engine.report import make_report
    >>> make_report(["runs/pgd_at", "runs/standard"], "report/", n=500)    # doctest: +SKIP
    PosixPath('report/report.md')
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from aal.engine.run import find_run_files, load_run, machine_description
from aal.eval.checks import run_checks
from aal.eval.suite import run_suite
from aal.eval.report import _suite_results, _unique_names, plot_curves, plot_per_class, render_markdown, robustness_curves


def make_report(
    runs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    n: int | None = 500,
    eps: float | None = None,
    seed: int = 0,
    batch_size: int = 500,
    eps_factors: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
    steps: Sequence[int] = (1, 2, 5, 10, 20, 50),
    attack_steps: int = 20,
    checks: bool = False,
    log: Callable[[str], None] | None = None,
    figures: Callable[[Any, nn.Module, Any, Path, str], dict[str, str]] | None = None,
) -> Path:
    """Write ``report.md``, ``report.json`` and the PNG plots for ``runs`` into ``out_dir``.

    Args:
        runs: run folders made by ``aal train`` (or checkpoints inside them).
        out_dir: where to write (created).
        n: first ``n`` test images for the report's own measurements (``None``: all).
        eps: budget for the measurements (default: each run's ``eval.eps``).
        seed: seed of every attack.
        batch_size: attack batch size.
        eps_factors: multiples of eps for the accuracy-vs-eps plot (0 = clean).
        steps: PGD steps for the accuracy-vs-steps plot.
        attack_steps: PGD steps of the eps curve and the per-class analytics.
        checks: also run the gradient-masking checks on each run (slower).
        log: progress messages (e.g. ``print``).
        figures: ``figures(cfg, model, bundle, out_dir, name) -> {caption: file name in out_dir}``,
            called for each run with its trained model; the figures it writes are shown in the
            report (the command line draws AAL's attention figure with it, :func:`aal.viz.report_figures`).

    Returns:
        the path of ``report.md``.
    """
    if not runs:
        raise ValueError("give at least one run folder")
    paths = [Path(r) for r in runs]
    run_dirs = [find_run_files(p)[0].parent for p in paths]  # raises FileNotFoundError early, before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    entries: list[dict[str, Any]] = []
    for name, path, run_dir in zip(_unique_names(run_dirs), paths, run_dirs):
        say(f"[{name}] loading {path}")
        cfg, model, bundle = load_run(path)
        results_path = run_dir / "results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else None
        run_eps = float(eps) if eps is not None else float(cfg.eval.eps)
        info = bundle.info
        computed = robustness_curves(
            model, bundle.test, run_eps, n=n, eps_factors=eps_factors, steps=steps, attack_steps=attack_steps,
            batch_size=batch_size, seed=seed, num_classes=info.num_classes, class_names=list(info.classes),
            progress=lambda m, _name=name: say(f"[{_name}] {m}"),
        )
        entry: dict[str, Any] = {
            "name": name,
            "path": str(path),
            "config": {"method": cfg.method.name, "model": cfg.model.name, "dataset": info.description, "epochs": cfg.epochs,
                       "eval_eps": float(cfg.eval.eps), "seed": cfg.seed},
            "results": results,
            "suites": _suite_results(run_dir),
            "computed": computed,
        }
        if figures is not None:
            entry["figures"] = figures(cfg, model, bundle, out, name)
        if checks:
            say(f"[{name}] gradient-masking checks")
            entry["checks"] = run_checks(model, bundle.test, eps=run_eps, n=n, batch_size=batch_size, seed=seed).to_dict()
        entries.append(entry)

    plots = {
        "acc_vs_eps": plot_curves(entries, "eps_curve", "eps", "eps", out / "acc_vs_eps.png",
                                  title=f"PGD-{attack_steps} accuracy vs eps").name,
        "acc_vs_steps": plot_curves(entries, "steps_curve", "steps", "PGD steps", out / "acc_vs_steps.png", logx=True,
                                    title="PGD accuracy vs steps (each run at its eps)").name,
        "per_class_robust": plot_per_class(entries, out / "per_class_robust.png").name,
    }
    payload = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_description(),
        "settings": {"n": n, "eps": eps, "seed": seed, "batch_size": batch_size, "eps_factors": list(eps_factors),
                     "steps": list(steps), "attack_steps": attack_steps, "checks": checks},
        "seconds": time.perf_counter() - t_start,
        "plots": plots,
        "runs": entries,
    }
    (out / "report.json").write_text(json.dumps(payload, indent=2))
    md = render_markdown(payload)
    (out / "report.md").write_text(md)
    return out / "report.md"


def suite_state_path(run_dir: str | Path, suite: str, norm: str, eps: float, n: int | None, seed: int) -> Path:
    """Where a run's suite keeps its resumable state: ``RUN/eval/suite-<suite>-<norm>-eps<eps>-n<n>-seed<seed>.json``.

    ``aal eval RUN --suite`` and :func:`finish_run` use the same file, so either resumes or reuses
    the other's work, and the report lists every finished one.
    """
    return Path(run_dir) / "eval" / f"suite-{suite}-{norm}-eps{eps:.6g}-n{n or 'all'}-seed{seed}.json"


def finish_run(
    run_dir: str | Path,
    *,
    figures: Callable[[Any, nn.Module, Any, Path, str], dict[str, str]] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Path | None:
    """The end of a training run as its config asks: ``eval.suite`` then ``eval.report``.

    1. ``eval.suite`` (unless ``none``) at ``eval.eps``, L-inf, on the first ``eval.suite_n`` test
       images, seeded with ``eval.seed``; resumable from :func:`suite_state_path` (an interrupted
       suite continues where it stopped when the command is run again). Its table is logged.
    2. ``eval.report``: :func:`make_report` of the run into ``RUN/report/`` (PGD measurements on
       the first ``eval.report_n`` test images), which also lists the suite's result.

    Args:
        run_dir: a finished classification run folder.
        figures: passed to :func:`make_report`.
        progress: progress bars of the suite.
        log: receives the suite's table and progress lines.

    Returns:
        the path of ``report.md``, or ``None`` when the config asks for no report.
    """
    run = find_run_files(run_dir)[0].parent
    cfg, model, bundle = load_run(run)
    e = cfg.eval
    if e.suite != "none":
        state = suite_state_path(run, e.suite, "linf", e.eps, e.suite_n, e.seed)
        result = run_suite(model, bundle.test, e.suite, eps=e.eps, n=e.suite_n, batch_size=e.batch_size, seed=e.seed,
                           progress=progress, state_path=state)
        log(result.table())
        log(f"suite state: {state}")
    if not e.report:
        return None
    return make_report([run], run / "report", n=e.report_n, seed=e.seed, batch_size=e.batch_size, figures=figures,
                       log=log if progress else None)


__all__ = ["finish_run", "make_report", "suite_state_path"]
