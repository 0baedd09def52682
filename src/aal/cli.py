"""The ``aal`` command line: ``train``, ``eval``, ``check``, ``report``, ``list``, ``viz``.

Each subcommand is a thin layer over the library (:mod:`aal.engine.run`, :mod:`aal.eval`);
configuration lives in YAML files (:mod:`aal.config`), not in flags.

Examples::

    aal train configs/fashion_mnist/pgd_at.yaml epochs=5 method.eps=0.1
    aal train --resume runs/pgd_at-fashion_mnist-20260101-120000
    aal eval runs/pgd_at-fashion_mnist-20260101-120000 --attacks clean,fgsm,pgd20 --n 1000
    aal eval RUN --suite standard --n 1000      # AutoAttack: APGD-CE -> APGD-T -> FAB-T -> Square; resumable
    aal eval RUN --suite full                   # standard suite + gradient-masking checks
    aal eval --model mypkg.nets:make --weights w.safetensors --data cifar10 --eps 8/255 --n 1000
    aal check RUN --n 500                       # gradient-masking checks only
    aal report RUN_A RUN_B --out report/        # report.md + report.json + PNG plots
    aal list

Exit codes (every error is one ``aal: error:`` line on stderr, no traceback): 0 success; 1
missing, corrupt or implausible files (data, run folder, checkpoint), an I/O error (full disk,
unwritable folder), a diverged training (non-finite loss), or, for ``aal check`` and
``aal eval --suite full``, at least one gradient-masking check FAILED (the results are printed
in full first; WARN alone exits 0); 2 invalid arguments or configuration, including a new run
into an existing run folder and a resume whose ``config.yaml`` no longer matches its checkpoint;
130 interrupted by Ctrl-C, 143 by SIGTERM (``aal train --resume RUN`` continues a run, the
message names RUN; ``aal eval --suite`` resumes from its state file when rerun with the same
arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Sequence

from aal.config import ConfigError


def _tune_malloc(enabled: bool) -> None:
    # Before the first large tensor: glibc otherwise mmaps (and page-faults) every buffer above
    # its dynamic threshold on every step; see aal.utils.runtime.tune_malloc for the numbers.
    from aal.utils.runtime import tune_malloc

    tune_malloc(enabled and os.environ.get("AAL_NO_MALLOC_TUNE", "") not in ("1", "true", "yes"))


def task_of(config_path: str | os.PathLike | None):
    """The registered task (:class:`aal.tasks.base.RunTask`) a config file declares with its
    top-level ``task`` key (``classification`` without one); the CLI asks it, never branches on its name."""
    from aal.tasks.base import task_of_config

    return task_of_config(config_path)


def cmd_train(args: argparse.Namespace) -> int:
    from aal.engine.distributed import is_main_rank
    from aal.engine.run import run_task
    from aal.engine.rundir import find_run_dir

    run_dir = None
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume takes the run folder only; its config.yaml is reused as it was")
        run_dir = find_run_dir(args.resume)  # any path inside the run: RUN/checkpoints/last, ...
        cfg_path, overrides = str(run_dir / "config.yaml"), []
    else:
        if not args.config:
            raise ConfigError("give a config file (e.g. configs/fashion_mnist/pgd_at.yaml) or --resume RUN_DIR")
        cfg_path = args.config
        overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
        overrides += [f"device={args.device}"] if args.device else []
    task = task_of(cfg_path)
    cfg = task.load_config(cfg_path, overrides)
    if args.print_config:  # the resolved config (base: chain, overrides, defaults), validated; nothing trained
        from aal.config import config_yaml

        print(config_yaml(cfg), end="")
        return 0
    # malloc tuning for every task, before the first large tensor (the runner applies it)
    out = run_task(cfg, resume=run_dir, malloc_tune=not args.no_malloc_tune)
    if is_main_rank():  # under torchrun every process returns here: print once
        print(task.format_result(out.result))
        print(f"run folder: {out.run_dir}")
        if task.attack_eval:  # eval.suite / eval.report: attack evaluations of a classifier
            _finish_run(out.run_dir, cfg.progress)
    return 0


def _finish_run(run_dir, progress: bool) -> None:
    """``eval.suite`` and ``eval.report`` of a trained run (:func:`aal.engine.report.finish_run`)."""
    from aal.engine.report import finish_run
    from aal.engine.rundir import RunInterrupted
    from aal.viz import report_figures

    try:
        path = finish_run(run_dir, figures=report_figures, progress=progress and sys.stderr.isatty(), log=print)
    except RunInterrupted:
        raise
    except KeyboardInterrupt as err:  # `aal train --resume RUN` finishes it: the suite resumes from its state file
        raise RunInterrupted(run_dir) from err
    if path is not None:
        files = sorted(p.name for p in path.parent.glob("*.png"))
        print(f"report: {path}  (plots: {', '.join(files)})")


def _load_for_eval(args: argparse.Namespace):
    from aal.config import parse_float
    from aal.engine.run import load_run

    if getattr(args, "n", None) is not None and args.n <= 0:
        raise ConfigError(f"--n: must be > 0, got {args.n}")
    if getattr(args, "batch_size", 1) < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    eps = parse_float(args.eps, "--eps") if getattr(args, "eps", None) is not None else None
    if eps is not None and not eps > 0:
        raise ConfigError(f"--eps: must be > 0, got {args.eps}")
    _tune_malloc(not getattr(args, "no_malloc_tune", False))
    cfg, model, bundle = load_run(args.run)
    return cfg, model, bundle, (eps if eps is not None else cfg.eval.eps)


def _checks_list(spec: str | None) -> list[str] | None:
    from aal.eval.checks import CHECKS

    if spec is None:
        return None
    names = [c.strip().lower() for c in spec.split(",") if c.strip()]
    bad = [c for c in names if c not in CHECKS]
    if bad or not names:
        raise ConfigError(f"--only: unknown checks {bad or spec!r}; choose from {', '.join(CHECKS)}")
    return names


def _check_check_args(args: argparse.Namespace) -> None:
    _checks_list(getattr(args, "only", None))
    if args.square_queries < 1:
        raise ConfigError(f"--square-queries: must be >= 1, got {args.square_queries}")
    if getattr(args, "check_n", 1) < 1:
        raise ConfigError(f"--check-n: must be >= 1, got {args.check_n}")


def _run_checks(args: argparse.Namespace, model, bundle, eps: float, n: int | None):
    from aal.eval.checks import run_checks

    return run_checks(
        model, bundle.test, eps=eps, norm=args.norm, n=n, batch_size=args.batch_size, seed=args.seed,
        progress=not args.json and sys.stderr.isatty(), square_queries=args.square_queries,
        which=_checks_list(getattr(args, "only", None)),
    )


def _eval_task(task, args: argparse.Namespace) -> int:
    """``aal eval RUN`` of a task without attack evaluation: its own final evaluation, ``--n`` items."""
    from aal.engine.run import load_task_run

    if args.suite is not None or args.attacks is not None:
        raise ConfigError(f"--suite/--attacks apply to classification runs; this is a {task.name} run")
    if args.n is not None and args.n <= 0:
        raise ConfigError(f"--n: must be > 0, got {args.n}")
    results = task.evaluate(load_task_run(args.run), n=args.n)
    print(json.dumps(results, indent=2) if args.json else task.format_result(results))
    return 0


def _cmd_eval_model(args: argparse.Namespace) -> int:
    """``aal eval --model package.module:factory [--weights W] --data NAME --eps E``: any model."""
    from aal.config import parse_float
    from aal.eval.external import benchmark, load_model
    from aal.eval.suite import SuiteStateError

    if args.run is not None:
        raise ConfigError("give either a run folder or --model, not both")
    if args.data is None or args.eps is None:
        raise ConfigError("--model needs --data NAME (e.g. cifar10) and --eps (e.g. 8/255)")
    if args.attacks is not None or args.suite == "full":
        raise ConfigError("--model evaluates with --suite standard, fast or rand (default standard)")
    if args.n is not None and args.n <= 0:
        raise ConfigError(f"--n: must be > 0, got {args.n}")
    if args.batch_size < 1 or args.eot_n < 1:
        raise ConfigError("--batch-size and --eot-n must be >= 1")
    eps = parse_float(args.eps, "--eps")
    if not eps > 0:
        raise ConfigError(f"--eps: must be > 0, got {args.eps}")
    _tune_malloc(not args.no_malloc_tune)
    model = load_model(args.model, args.weights)
    if args.fresh and args.state is not None and os.path.exists(args.state):
        os.unlink(args.state)
    try:
        result = benchmark(
            model, args.data, threat=args.norm, eps=eps, n=args.n, suite=args.suite or "standard",
            data_root=args.data_root, out=args.out, state_path=args.state, batch_size=args.batch_size, seed=args.seed,
            progress=not args.json and sys.stderr.isatty(), eot={"auto": "auto", "on": True, "off": False}[args.eot],
            eot_n=args.eot_n,
        )
    except SuiteStateError as err:
        raise ConfigError(f"--state: {err} (or pass --fresh)") from err
    print(json.dumps({**result.to_dict(), "data": args.data}, indent=2) if args.json else result.table())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from aal.config import check_precision_key
    from aal.engine.run import find_run_files

    if args.precision != "fp32":  # refused where it would be ignored, and fp16 off CUDA
        if args.model is not None or args.suite is not None:
            raise ConfigError("--precision applies to --attacks on a run folder (suites and --model run in fp32)")
        check_precision_key(args.precision, "auto")
    if args.model is not None:
        return _cmd_eval_model(args)
    if args.run is None:
        raise ConfigError("aal eval needs a run folder, or --model package.module:factory --data NAME --eps E")
    for flag in ("weights", "data", "data_root", "out"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} applies to --model (a run folder has its own)")
    task = task_of(find_run_files(args.run)[0])
    if not task.attack_eval:
        if args.precision != "fp32":
            raise ConfigError(f"--precision applies to classification runs (this is a {task.name} run, evaluated in fp32)")
        return _eval_task(task, args)
    if args.suite is not None:
        return _cmd_eval_suite(args)
    from aal.attacks import from_spec
    from aal.eval import evaluate

    if args.norm != "linf":
        raise ConfigError("--norm applies to --suite; for --attacks give the norm in the spec (e.g. pgd20-l2)")
    attacks = [a.strip() for a in (args.attacks or "clean,fgsm,pgd20").split(",") if a.strip()]
    if args.n is not None and args.n <= 0:
        raise ConfigError(f"--n: must be > 0, got {args.n}")
    for spec in attacks:
        if spec != "clean":
            try:
                from_spec(spec, 0.1)
            except ValueError as err:
                raise ConfigError(f"--attacks: {err}") from err
    cfg, model, bundle, eps = _load_for_eval(args)
    result = evaluate(
        model, bundle.test, attacks=attacks, eps=eps, batch_size=args.batch_size, n=args.n, seed=args.seed,
        progress=not args.json and sys.stderr.isatty(), precision=args.precision,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
    return 0


def _cmd_eval_suite(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aal.attacks import ATTACKS
    from aal.engine.report import suite_state_path
    from aal.engine.run import find_run_files
    from aal.eval.suite import SUITES, SuiteStateError, run_suite

    if args.attacks is not None:
        raise ConfigError("--attacks and --suite exclude each other: a suite fixes its attacks")
    suite = "standard" if args.suite == "full" else args.suite
    missing = sorted({s.attack for s in SUITES[suite] if s.attack not in ATTACKS})
    if missing:
        raise ConfigError(f"--suite {args.suite}: attacks {', '.join(missing)} are not registered in this version of aal")
    _check_check_args(args)
    if args.eot_n < 1:
        raise ConfigError(f"--eot-n: must be >= 1, got {args.eot_n}")
    cfg, model, bundle, eps = _load_for_eval(args)
    if args.state is not None:
        state = Path(args.state)
    else:
        state = suite_state_path(find_run_files(args.run)[0].parent, suite, args.norm, eps, args.n, args.seed)
    if args.fresh and state.exists():
        state.unlink()
    eot = {"auto": "auto", "on": True, "off": False}[args.eot]
    try:
        result = run_suite(
            model, bundle.test, suite, eps=eps, norm=args.norm, n=args.n, batch_size=args.batch_size, seed=args.seed,
            progress=not args.json and sys.stderr.isatty(), state_path=state, eot=eot, eot_n=args.eot_n,
        )
    except SuiteStateError as err:
        raise ConfigError(f"--state: {err} (or pass --fresh)") from err
    report = None
    if args.suite == "full":
        report = _run_checks(args, model, bundle, eps, min(args.n, args.check_n) if args.n else args.check_n)
    if args.json:
        payload = {**result.to_dict(), "state": str(state)}
        if report is not None:
            payload = {"suite": payload, "checks": report.to_dict()}
        print(json.dumps(payload, indent=2))
    else:
        print(result.table())
        print(f"state: {state}")
        if report is not None:
            print()
            print(report.table())
    return 1 if report is not None and report.status == "fail" else 0


def cmd_check(args: argparse.Namespace) -> int:
    _check_check_args(args)
    cfg, model, bundle, eps = _load_for_eval(args)
    report = _run_checks(args, model, bundle, eps, args.n)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 1 if report.status == "fail" else 0


def cmd_report(args: argparse.Namespace) -> int:
    from aal.config import parse_float
    from aal.engine.report import make_report
    from aal.viz import report_figures

    if args.n is not None and args.n <= 0:
        raise ConfigError(f"--n: must be > 0, got {args.n}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    eps = parse_float(args.eps, "--eps") if args.eps is not None else None
    if eps is not None and not eps > 0:
        raise ConfigError(f"--eps: must be > 0, got {args.eps}")
    _tune_malloc(not args.no_malloc_tune)
    quiet = args.quiet or not sys.stderr.isatty()
    path = make_report(
        args.runs, args.out, n=args.n, eps=eps, seed=args.seed, batch_size=args.batch_size, checks=args.checks,
        log=None if quiet else (lambda m: print(m, file=sys.stderr)), figures=report_figures,
    )
    print(f"wrote {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from aal.attacks import ATTACKS
    from aal.attention import ATTENTION, KERNELS
    from aal.data import DATASETS
    from aal.data.fewshot import FEWSHOT_DATASETS
    from aal.methods import METHODS
    from aal.models import MODELS
    from aal.tasks import TASKS

    registries = [
        ("tasks", TASKS), ("models", MODELS), ("attention", ATTENTION), ("kernels", KERNELS), ("attacks", ATTACKS),
        ("methods", METHODS), ("datasets", DATASETS), ("few-shot datasets", FEWSHOT_DATASETS),
    ]
    for title, reg in registries:
        print(f"{title}:")
        for entry in reg.entries():
            print(f"  {entry.name:<18} {entry.summary}")
    return 0


def _viz_classification(args: argparse.Namespace, native) -> str:
    from aal.viz import attention_grid_for_run

    cfg, model, bundle = native
    return attention_grid_for_run(cfg, model, bundle, n=args.n, out_path=args.out, seed=args.seed)


def _viz_detection(args: argparse.Namespace, native) -> str:
    from aal.viz import detection_grid_for_run

    return detection_grid_for_run(native, n=args.n, out_path=args.out, seed=args.seed)


VIZ = {"classification": _viz_classification, "detection": _viz_detection}
"""``aal viz`` figure of each task's restored run (by task name); a task without one is refused."""


def cmd_viz(args: argparse.Namespace) -> int:
    from aal.engine.run import find_run_files, load_task_run

    task = task_of(find_run_files(args.run)[0])
    if task.name not in VIZ:
        raise ConfigError(f"aal viz supports {' and '.join(VIZ)} runs, not {task.name} runs yet")
    out = VIZ[task.name](args, load_task_run(args.run))
    print(f"wrote {out}")
    return 0


def _external_model_errors() -> tuple[type[BaseException], ...]:
    from aal.eval.external import ExternalModelError

    return (ExternalModelError,)


def _user_errors() -> tuple[type[BaseException], ...]:
    from aal.data import DataError
    from aal.engine.checkpoint import CheckpointError
    from aal.engine.rundir import RunFolderError

    # OSError: full disk, unwritable or unreadable folder (FileNotFoundError among them)
    return (OSError, DataError, CheckpointError, RunFolderError, FloatingPointError)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


_STOP_SIGNAL: list[int] = []  # the signal that stopped the command (SIGINT or SIGTERM)


def _on_stop_signal(signum: int, _frame) -> None:
    _STOP_SIGNAL.append(signum)
    raise KeyboardInterrupt  # unwinds like Ctrl-C: run folders stay resumable, temporaries are removed


def _interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> int:
    run_dir = getattr(err, "run_dir", None)
    if args.command == "train" and run_dir is not None:
        hint = f"; resume with `aal train --resume {run_dir}`"
    elif args.command == "eval" and getattr(args, "suite", None):
        hint = "; rerun the same command to resume from the suite's state file"
    else:
        hint = ""
    term = bool(_STOP_SIGNAL) and _STOP_SIGNAL[-1] == signal.SIGTERM
    print(f"aal: {'terminated (SIGTERM)' if term else 'interrupted'}{hint}", file=sys.stderr)
    return 143 if term else 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aal", description="Associative Adversarial Learning toolkit")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config with key=value overrides")
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.eps=8/255 epochs=5")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-malloc-tune", action="store_true", help="leave glibc malloc untuned")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (the same as the override device=...)")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved, validated config as YAML (its base: chain and overrides applied) and stop")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run folder or checkpoint, or any model (--model), with attacks or a suite")
    e.add_argument("run", nargs="?", default=None, help="run folder (or a checkpoint inside one); or use --model")
    e.add_argument("--model", default=None, metavar="PKG.MODULE:FACTORY",
                   help="evaluate any model: a factory returning an nn.Module on [0,1] images (normalisation inside)")
    e.add_argument("--weights", default=None, help="--model: a .safetensors state dict, loaded strictly")
    e.add_argument("--data", default=None, help="--model: dataset name (fashion_mnist, mnist, cifar10, cifar100)")
    e.add_argument("--data-root", default=None, help="--model: directory of the dataset's files")
    e.add_argument("--out", default=None, help="--model: also write the result's JSON to this file")
    e.add_argument("--attacks", default=None,
                   help="comma-separated specs: clean, fgsm, pgd20, pgd50x5, cw20, pgd20-l2 (default: clean,fgsm,pgd20)")
    e.add_argument("--suite", choices=("fast", "standard", "full", "rand"), default=None,
                   help="fast: APGD-CE + APGD-T; standard: AutoAttack's standard version, APGD-CE -> APGD-T -> FAB-T -> "
                        "Square; "
                        "full: standard + gradient-masking checks; rand: APGD-CE + APGD-DLR with EOT (AutoAttack's "
                        "version for randomised defences)")
    e.add_argument("--eps", default=None, help="budget, e.g. 0.1 or 8/255 (default: the run's eval.eps)")
    e.add_argument("--norm", choices=("linf", "l2"), default="linf", help="threat model of --suite (default linf)")
    e.add_argument("--n", type=int, default=None, help="first n test images (default: all)")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--state", default=None,
                   help="--suite: resumable state file (default RUN/eval/suite-<suite>-<norm>-eps<eps>-n<n>-seed<seed>.json)")
    e.add_argument("--fresh", action="store_true", help="--suite: discard an existing state file and start over")
    e.add_argument("--eot", choices=("auto", "on", "off"), default="auto",
                   help="--suite: EOT for randomised models (auto: iff two forward passes disagree)")
    e.add_argument("--eot-n", type=int, default=20, help="--suite: EOT draws per step (default 20)")
    e.add_argument("--check-n", type=int, default=500, help="--suite full: images for the checks (default 500)")
    e.add_argument("--square-queries", type=int, default=1000, help="--suite full: Square queries in the checks")
    e.add_argument("--only", default=None, help="--suite full: comma-separated subset of the checks")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="--attacks: arithmetic of the forwards and attacks (default fp32, whatever the run trained in)")
    e.add_argument("--no-malloc-tune", action="store_true")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("check", help="gradient-masking checks (pass/warn/fail); exit 1 if any check fails")
    c.add_argument("run", help="run folder (or a checkpoint inside one)")
    c.add_argument("--eps", default=None, help="budget (default: the run's eval.eps)")
    c.add_argument("--norm", choices=("linf", "l2"), default="linf")
    c.add_argument("--n", type=int, default=500, help="first n test images (default 500)")
    c.add_argument("--batch-size", type=int, default=500)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--square-queries", type=int, default=1000, help="Square's query budget (default 1000)")
    c.add_argument("--only", default=None, help="comma-separated subset of the checks")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("--no-malloc-tune", action="store_true")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("report", help="Markdown report comparing runs, with plots and its JSON")
    r.add_argument("runs", nargs="+", help="run folders")
    r.add_argument("--out", required=True, help="output folder (report.md, report.json, *.png)")
    r.add_argument("--n", type=int, default=500, help="test images for the report's own PGD measurements (default 500)")
    r.add_argument("--eps", default=None, help="budget for the measurements (default: each run's eval.eps)")
    r.add_argument("--batch-size", type=int, default=500)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--checks", action="store_true", help="also run the gradient-masking checks per run (slower)")
    r.add_argument("--quiet", action="store_true", help="no progress messages")
    r.add_argument("--no-malloc-tune", action="store_true")
    r.set_defaults(func=cmd_report)

    ls = sub.add_parser("list", help="show registered tasks, models, attacks, methods, datasets")
    ls.set_defaults(func=cmd_list)

    v = sub.add_parser("viz", help="attention / selective-attack grid (paper Fig. 3 style)")
    v.add_argument("run", help="run folder")
    v.add_argument("--n", type=int, default=8)
    v.add_argument("--out", default="attention.png")
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=cmd_viz)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aal`` console script; returns the exit code."""
    from aal._startup import in_main_thread

    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {}
    if in_main_thread():  # replaces the quiet start-up handlers (aal._startup); restored on return
        handlers = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    _STOP_SIGNAL.clear()
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"aal: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except _external_model_errors() as err:  # aal eval --model: factory, weights, shapes, data range
        print(f"aal: error: {_one_line(err)}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except _user_errors() as err:  # missing/corrupt files, I/O errors: a clear message, no traceback
        print(f"aal: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        return _interrupted(args, err)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
