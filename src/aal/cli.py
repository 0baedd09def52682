"""The ``aal`` command line: ``train``, ``eval``, ``list``, ``viz``.

Each subcommand is a thin layer over the library (:mod:`aal.engine.run`, :mod:`aal.eval`);
configuration lives in YAML files (:mod:`aal.config`), not in flags.

Examples::

    aal train configs/fashion_mnist/pgd_at.yaml epochs=5 method.eps=0.1
    aal train --resume runs/pgd_at-fashion_mnist-20260101-120000
    aal eval runs/pgd_at-fashion_mnist-20260101-120000 --attacks clean,fgsm,pgd20 --n 1000
    aal list
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from aal.config import ConfigError


def _tune_malloc(enabled: bool) -> None:
    # Before the first large tensor: glibc otherwise mmaps (and page-faults) every buffer above
    # its dynamic threshold on every step; see aal.utils.runtime.tune_malloc for the numbers.
    from aal.utils.runtime import tune_malloc

    tune_malloc(enabled and os.environ.get("AAL_NO_MALLOC_TUNE", "") not in ("1", "true", "yes"))


def cmd_train(args: argparse.Namespace) -> int:
    from aal.config import load_config
    from aal.engine.run import find_run_files, train_run

    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume takes the run folder only; its config.yaml is reused as it was")
        cfg_path, _ = find_run_files(args.resume)
        cfg = load_config(cfg_path)
    else:
        if not args.config:
            raise ConfigError("give a config file (e.g. configs/fashion_mnist/pgd_at.yaml) or --resume RUN_DIR")
        overrides = list(args.overrides)
        if args.no_progress:
            overrides.append("progress=false")
        cfg = load_config(args.config, overrides)
    _tune_malloc(cfg.malloc_tune and not args.no_malloc_tune)
    run_dir, result = train_run(cfg, resume=args.resume)
    print(result.table())
    print(f"run folder: {run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from aal.config import parse_float
    from aal.engine.run import load_run
    from aal.eval import evaluate

    _tune_malloc(not args.no_malloc_tune)
    cfg, model, bundle = load_run(args.run)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    eps = parse_float(args.eps, "--eps") if args.eps is not None else cfg.eval.eps
    if args.n is not None and args.n <= 0:
        raise ConfigError(f"--n: must be > 0, got {args.n}")
    from aal.attacks import from_spec

    for spec in attacks:
        if spec != "clean":
            try:
                from_spec(spec, eps)
            except ValueError as err:
                raise ConfigError(f"--attacks: {err}") from err
    result = evaluate(
        model, bundle.test, attacks=attacks, eps=eps, batch_size=args.batch_size, n=args.n, seed=args.seed,
        progress=not args.json and sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from aal.attacks import ATTACKS
    from aal.attention import ATTENTION
    from aal.data import DATASETS
    from aal.methods import METHODS
    from aal.models import MODELS

    registries = [("models", MODELS), ("attention", ATTENTION), ("attacks", ATTACKS), ("methods", METHODS), ("datasets", DATASETS)]
    try:
        from aal.attention import KERNELS

        registries.append(("kernels", KERNELS))
    except ImportError:
        pass
    for title, reg in registries:
        print(f"{title}:")
        for entry in reg.entries():
            print(f"  {entry.name:<18} {entry.summary}")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from aal.engine.run import load_run
    from aal.viz import attention_grid_for_run

    cfg, model, bundle = load_run(args.run)
    out = attention_grid_for_run(cfg, model, bundle, n=args.n, out_path=args.out, seed=args.seed)
    print(f"wrote {out}")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from aal.data import DataError

    return (FileNotFoundError, DataError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aal", description="Associative Adversarial Learning toolkit")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config with key=value overrides")
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.eps=8/255 epochs=5")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-malloc-tune", action="store_true", help="leave glibc malloc untuned")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run folder or checkpoint")
    e.add_argument("run", help="run folder (or a checkpoint inside one)")
    e.add_argument("--attacks", default="clean,fgsm,pgd20", help="comma-separated specs: clean, fgsm, pgd20, pgd50x5, cw20, pgd20-l2")
    e.add_argument("--eps", default=None, help="budget, e.g. 0.1 or 8/255 (default: the run's eval.eps)")
    e.add_argument("--n", type=int, default=None, help="first n test images (default: all)")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--no-malloc-tune", action="store_true")
    e.set_defaults(func=cmd_eval)

    ls = sub.add_parser("list", help="show registered models, attacks, methods, datasets")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"aal: error: {err}", file=sys.stderr)
        return 2
    except _user_errors() as err:  # missing/corrupt files: a clear message, no traceback
        print(f"aal: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aal: interrupted; resume with `aal train --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
