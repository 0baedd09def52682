"""AAL where it can work: the selectivity study of issue 11, on CIFAR-10 and Fashion-MNIST.

Every arm of a dataset trains the same model (CBAM after the first conv, BatchNorm in the gate),
on the same data with the same schedule and seeds; only the method or its budget placement
differs. Arms (``ARMS``):

* ``fgsm_at``: FGSM-AT with a random start (the baseline).
* ``aal_fgsm``: AAL+FGSM with the paper's defaults (k = M^a o M^a, xi1 = xi2 = zeta = 0.1).
* controls at the *same per-image budget*: ``aal_fgsm_uniform`` (each image's mean budget
  everywhere), ``aal_fgsm_shuffle`` (the budget values at random places), ``aal_fgsm_anti``
  (the budget values in reverse rank order: most budget on the least-attended pixels), and
  ``fgsm_at_matched`` (FGSM-AT at eps x mean k of the same seed's ``aal_fgsm`` run).
* readings the paper leaves open: ``aal_fgsm_fixed`` (map held at M^a in the adversarial pass;
  the public code's clean-then-adversarial schedule trains the map), ``aal_fgsm_rho10`` (indicator
  coupling with rho = zeta = 0.1: backtracking moves 10 % of the map, not 1 %), ``aal_fgsm_fd``
  (finite-difference coupling).
* the premise without CBAM (``saliency_fgsm``): budget ranked by the smoothed clean-gradient
  magnitude, placed on the ``sal_fg`` foreground, ``sal_bg`` background, ``sal_shuffle`` at
  random, ``sal_uniform`` flat; identical budget values in all four.
* ``pgd_at``, ``aal_pgd``, ``aal_pgd_uniform``, ``aal_pgd_anti``: the same with PGD-10. On
  Fashion-MNIST these run in the ranking study's bf16 setting (``--dataset fashion_mnist_rank``,
  where ``benchmarks/methods_rank.py`` trains ``pgd_at`` and ``aal_pgd`` anyway); the report gives
  them their own section.

Evaluation: clean and PGD-20 (step 2.5 eps/20, random start) on the **full test set** as part of
each run (per-image correctness kept for paired tests), then, in the ``suite`` phase, the
standard suite on the first ``--suite-n`` test images (resumable state file per run).

Degeneracy rule (stated in every table): an AAL arm tests selectivity only if, in its last
epoch, the mean budget k lies in [0.2, 0.8] **and** the per-image standard deviation of k is at
least 0.1; otherwise its row says "map degenerate: no test of selectivity". Comparisons:
paired over seeds (mean difference, std and a two-sided paired t-test); with one seed, an exact
McNemar test on the per-image PGD-20 outcomes (same test images) is given instead.

Runs are cached and resumable: a run folder is named by arm, seed and a hash of its exact
config; a killed run resumes from its last checkpoint (in ``~/.cache/aal/study/``, ``$AAL_STUDY_OUT``), and a
finished run's small files (config, per-epoch metrics with the map diagnostics, results,
per-image correctness) are published to ``benchmarks/results/aal_study_runs/``, which is
committed: a finished run is never trained into a second record, in any checkout. Runs can be split across
processes (``--arms``, ``--seeds``, ``--lock``) and days; two processes given the same run never
train it twice: each run is claimed (an ``flock`` beside its folder) and a process that finds it
claimed skips it and goes on with its list. The suite phase needs the run's checkpoint, and
checkpoints are not committed; ``train --then-suite`` runs each suite right after its run, and for
a published run without its checkpoint here (trained in an earlier session, whose machine is gone)
it first *recovers* the checkpoint: it trains the run again and keeps it only if it reproduces the
published run exactly (every per-image outcome on the test set and every logged per-epoch number;
training is deterministic at one thread), else sets it aside and stops: never two models for one
record (:func:`recover`). Pipeline stages (AToP's classifier and purifier) are recovered the same
way when a later stage needs them. Recovery needs the CPU kind that trained the run; on another
kind, ``--supersede-unrecoverable`` sets the published run (and the stages built on it) aside in
``aal_study_runs/<dataset>/superseded/``, kept and listed by the reports, and trains its arm and
seed again here (:func:`supersede`). Comparisons cover the suite column on the seeds where both runs have it
(same first n images). A published run whose config is no longer its arm's (a config file changed
while it trained) is left out of the report and named there.

    python benchmarks/aal_study.py train --dataset cifar10 --arms fgsm_at,aal_fgsm --seeds 0 [--then-suite]
    python benchmarks/aal_study.py suite --dataset cifar10 --suite-n 1000
    python benchmarks/aal_study.py report     # aal_study.md/.json, the plots, and the README's table
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# working run folders (checkpoints; not in git), outside the work tree: a session that is handed its machine back
# gets a fresh work tree but keeps the rest, so checkpoints kept here spare recovery (a re-training) and let a run
# longer than a session resume; $AAL_STUDY_OUT moves them (benchmarks/out/aal_study until 2026-12-02)
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
OUT = Path(os.environ.get("AAL_STUDY_OUT") or CACHE / "aal" / "study")
RECORDS = RESULTS / "aal_study_runs"  # the small files of every finished run (in git): the cache across checkouts
CARRY = RESULTS / "aal_study_carry"  # unfinished run folders handed to a later session (committed): see carry()
CARRIED = "carried.jsonl"  # in a run folder: one line per hand-over (when, from which machine, at which epoch)
PUBLISHED = ("config.yaml", "metrics.jsonl", "results.json", "study.json", "correct.npz", "suite_correct.npz", CARRIED)
EOT_N = 20  # EOT draws per attack step for randomised models in the suite phase
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
K_RANGE, K_STD_MIN = (0.2, 0.8), 0.1  # the degeneracy rule
# CIFAR-10 runs trained before the loader interleaved the zip's classes (2026-12-01): their per-epoch
# evaluation images (the first 500 test images) were all airplanes; their full-test figures are unaffected
AIRPLANE_EPOCH_EVAL = frozenset({
    "aal_fgsm-s0-ae3468a4", "aal_fgsm_anti-s0-a521a0a1", "aal_fgsm_bn-s0-0972a90a", "aal_fgsm_shuffle-s0-b8e572d3",
    "aal_fgsm_uniform-s0-f108f310", "fgsm_at-s0-d12d9a75", "fgsm_at_matched-s0-ba7c17b6",
})


@dataclass(frozen=True)
class Dataset:
    config_dir: str
    eps: str
    overrides: tuple[str, ...]
    label: str
    cifar: bool = False  # read from $AAL_CIFAR10, else the shared CIFAR-10 folder


def _trained_in(base: Dataset, precision: str, label: str) -> Dataset:
    """``base`` pinned to one precision, eager: the same runs but for their arithmetic, in their own folders."""
    return replace(base, overrides=(*base.overrides, f"precision={precision}", "compile=false"), label=f"{base.label}, {label}")


FASHION = Dataset(
    "configs/fashion_mnist", "0.1", ("epochs=5", "model.attention=cbam_in"),
    "Fashion-MNIST, small CNN + CBAM (cbam_in), 5 epochs, batch 128, all 60,000 training images",
)
DATASETS = {
    "cifar10": Dataset(
        # fp32 and eager as the study's first runs: the recipe's bf16 + compile would change the arithmetic mid-study
        # and the recipe's first schedule (6 epochs), pinned so a longer shipped recipe never changes a study run
        "configs/cifar10_cpu", "8/255", ("epochs=6", "model.attention=cbam_in", "precision=fp32", "compile=false"),
        "CIFAR-10, PreAct-ResNet-18 width 16 + CBAM (cbam_in), 6 epochs, batch 128, all 50,000 training images",
        cifar=True,
    ),
    "fashion_mnist": FASHION,
    # the ranking study's setting (benchmarks/methods_rank.py): the one above, trained under bf16 autocast
    # (2.7x faster PGD-10 steps on this CPU; evaluation stays fp32); its own folder, never mixed with the above
    "fashion_mnist_rank": _trained_in(FASHION, "bf16", "trained under bf16 autocast (evaluated in fp32)"),
    # the ranking study's setting in fp32: any CPU runs it at full speed (bf16 needs AVX512-BF16/AMX, else it is
    # emulated ~10x slower than fp32: precision_speed_avx2.txt); its own folder and results, never mixed with the bf16 one
    "fashion_mnist_rank_fp32": _trained_in(FASHION, "fp32", "fp32"),
    # the ranking study on the CPU-scale CIFAR-10 recipe as shipped (20 epochs, bf16), pinned like the study's
    # arms; eager (the seed methods' two-step tests run eager; compile is a speed option, not part of a run)
    "cifar10_rank": Dataset(
        "configs/cifar10_cpu", "8/255", ("epochs=20", "model.attention=cbam_in", "precision=bf16", "compile=false",
                                         "eval.epoch_n=1000"),
        "CIFAR-10, PreAct-ResNet-18 width 16 + CBAM (cbam_in), 20 epochs (1 lr warm-up), batch 128, crop+flip, "
        "all 50,000 training images, trained under bf16 autocast (evaluated in fp32)",
        cifar=True,
    ),
}


@dataclass(frozen=True)
class Arm:
    base: str  # config file name in the dataset's config dir
    overrides: tuple[str, ...]
    label: str
    matched: str | None = None  # eps = eps x mean k (over epochs) of this arm's run with the same seed
    control_of: str | None = None  # the arm it is compared with
    needs: tuple[tuple[str, str], ...] = ()  # (config key, arm): key = that arm's same-seed run folder
    drop: tuple[str, ...] = ()  # dataset overrides (by key prefix) that do not apply to this arm
    study: str = "aal"  # "aal" (this study's report) or "rank" (only benchmarks/methods_rank.py's)


def _rank(base: str, label: str, *over: str, needs: tuple[tuple[str, str], ...] = (), drop: tuple[str, ...] = ()) -> Arm:
    return Arm(base, over, label, needs=needs, drop=drop, study="rank")


def _aal(label: str, *over: str, control_of: str | None = "aal_fgsm") -> Arm:
    return Arm("aal_fgsm.yaml", over, label, control_of=control_of)


def _sal(placement: str, label: str) -> Arm:
    return Arm("fgsm_at.yaml", ("method.name=saliency_fgsm", f"method.placement={placement}"), label,
               control_of=None if placement == "foreground" else "sal_fg")


ARMS = {
    "fgsm_at": Arm("fgsm_at.yaml", (), "FGSM-AT (random start)"),
    "aal_fgsm": _aal("AAL+FGSM (paper defaults)", control_of="fgsm_at"),
    "aal_fgsm_uniform": _aal("control: uniform budget (per-image mean of k)", "method.mask_control=uniform"),
    "aal_fgsm_shuffle": _aal("control: shuffled budget", "method.mask_control=shuffle"),
    "aal_fgsm_anti": _aal("control: anti-selective budget", "method.mask_control=anti"),
    "fgsm_at_matched": Arm("fgsm_at.yaml", (), "control: FGSM-AT at eps x mean k", "aal_fgsm", "aal_fgsm"),
    "aal_fgsm_fixed": _aal("map held at M^a (clean-then-adv schedule)", "method.adv_attention=fixed",
                           "method.schedule=clean_then_adv"),
    "aal_fgsm_rho10": _aal("coupling rho = zeta = 0.1", "method.rho=0.1"),
    "aal_fgsm_fd": _aal("finite-difference coupling", "method.coupling=finite-difference"),
    "aal_fgsm_bn": _aal("gate with BatchNorm (CBAM's reference, 'cbam')", "model.attention=cbam", control_of=None),
    "aal_fgsm_nobn": _aal("gate without normalisation ('cbam_nobn')", "model.attention=cbam_nobn", control_of=None),
    "sal_fg": _sal("foreground", "saliency budget on the foreground"),
    "sal_bg": _sal("background", "saliency budget on the background"),
    "sal_shuffle": _sal("shuffle", "saliency budget shuffled"),
    "sal_uniform": _sal("uniform", "saliency budget uniform"),
    "pgd_at": Arm("pgd_at.yaml", (), "PGD-AT (PGD-10)"),
    "aal_pgd": Arm("aal_pgd.yaml", (), "AAL+PGD (paper defaults)", control_of="pgd_at"),
    "aal_pgd_uniform": Arm("aal_pgd.yaml", ("method.mask_control=uniform",), "AAL+PGD, uniform budget", control_of="aal_pgd"),
    "aal_pgd_anti": Arm("aal_pgd.yaml", ("method.mask_control=anti",), "AAL+PGD, anti-selective budget", control_of="aal_pgd"),
    # the seed methods ranked by benchmarks/methods_rank.py (issue 16), same model/data/schedule as above
    "standard": _rank("standard.yaml", "standard training (AToP's classifier)"),
    "trades": _rank("trades.yaml", "TRADES (beta 6)"),
    "awp_pgd_at": _rank("awp_pgd_at.yaml", "AT-AWP (PGD-10, gamma 0.01 from epoch 2)"),
    "awp_trades": _rank("awp_trades.yaml", "TRADES-AWP (beta 6, gamma 0.005 from epoch 2)"),
    "mart": _rank("mart.yaml", "MART (beta 6, loss in fp32)"),
    "uiat": _rank("uiat.yaml", "UIAT (eps_inv = eps/2, beta 1)"),
    "spat": _rank("spat.yaml", "SPAT (cosine head, beta 6)"),
    "atop_pretrain": _rank("atop_pretrain.yaml", "AToP stage 1: purifier reconstruction", needs=(("model.classifier_run", "standard"),),
                           drop=("model.attention",)),
    "atop": _rank("atop_finetune.yaml", "AToP (RT2, U-Net purifier + standard classifier)",
                  needs=(("model.classifier_run", "standard"), ("model.purifier_run", "atop_pretrain")), drop=("model.attention",)),
}  # fmt: skip
STAGES = {arm for a in ARMS.values() for _, arm in a.needs}  # arms trained as another arm's input, never given a suite
MAIN = ["fgsm_at", "aal_fgsm", "aal_fgsm_uniform", "aal_fgsm_shuffle", "aal_fgsm_anti", "fgsm_at_matched"]
DIAG = ("mask_mean", "mask_std", "m_mean", "m_std", "backtracked_frac", "trigger_frac", "sal_fg_corr")


def config_for(dataset: str, arm: str, overrides: list[str]):
    from aal.config import load_config

    return load_config(ROOT / DATASETS[dataset].config_dir / ARMS[arm].base, overrides)


def identity(cfg) -> dict:
    """What makes two runs the same run: the resolved config without where it is written or read from.

    ``out_dir``/``name`` (the folder) and ``data.root`` (where this checkout finds the files) do not
    change what is trained; every other key does, including keys added to the schema later (a
    stored config re-loaded by today's code gets their defaults, see :func:`finished_record`).
    """
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("out_dir", "name")}
    d["data"] = {k: v for k, v in d["data"].items() if k != "root"}
    for key in RUN_KEYS:  # another run's folder: its name (arm, seed, config hash), not where it lies
        if isinstance(d["model"].get(key), str):
            d["model"][key] = Path(d["model"][key]).name
    return d


RUN_KEYS = ("classifier_run", "purifier_run")  # model keys that name another run's folder


def identity_key(cfg) -> str:
    """An identity as one canonical string (key order and non-JSON values fixed), to hash or compare."""
    return json.dumps(identity(cfg), sort_keys=True, default=str)


def run_dir_for(dataset: str, arm: str, seed: int, overrides: list[str]) -> Path:
    # keyed by the *resolved* config, so an edited config file never reuses a stale run
    key = hashlib.sha1(identity_key(config_for(dataset, arm, overrides)).encode()).hexdigest()[:8]
    return OUT / dataset / f"{arm}-s{seed}-{key}"


def finished_record(dataset: str, arm: str, seed: int, overrides: list[str]) -> Path | None:
    """A published run of this arm and seed whose config is *this* config (None if there is none).

    The folder name's hash changes when the schema gains a key (or the data moves), so published
    runs are matched by content: each stored ``config.yaml`` is re-loaded by today's code (new keys
    take their defaults) and compared with today's resolved config.
    """
    want = identity_key(config_for(dataset, arm, overrides))
    for path in sorted(RECORDS.glob(f"{dataset}/{arm}-s{seed}-*/study.json")):
        if identity_key(stored_config(path.parent)) == want:
            return path.parent
    return None


def stored_config(run_dir: Path):
    """A run's stored config, re-loaded by today's code (new keys take their defaults)."""
    from aal.config import load_config

    return load_config(run_dir / "config.yaml", validate=False)


def overrides_for(dataset: str, arm: str, seed: int) -> list[str]:
    ds, a = DATASETS[dataset], ARMS[arm]
    kept = [o for o in ds.overrides if not o.startswith(a.drop)] if a.drop else list(ds.overrides)
    over = [*kept, f"seed={seed}", "progress=false", "threads=1", "checkpoint_every=1", "eval.n=null",
            "eval.attacks=[clean,pgd20]", *a.overrides]
    if ds.cifar:
        over.append(f"data.root={os.environ.get('AAL_CIFAR10', SHARED_CIFAR)}")
    if a.matched:
        ref = current_record(dataset, a.matched, seed)
        if ref is None:
            raise LookupError(f"{arm} seed {seed} needs the finished {a.matched} run of the same seed first")
        mean_k = statistics.fmean(ref["per_epoch"]["mask_mean"])  # the budget averaged over training
        over.append(f"method.eps={_eps_value(ds.eps) * mean_k:.6f}")
    for key, needed in a.needs:  # a pipeline stage: the same seed's run of the arm it builds on
        ref = current_record(dataset, needed, seed)
        folder = OUT / dataset / Path(ref["run_dir"]).name if ref else None
        if folder is None or not (folder / "checkpoints").exists():
            raise LookupError(f"{arm} seed {seed} needs the {needed} run of the same seed, with its checkpoint, "
                              f"in {OUT / dataset} (train it first: --arms {needed},{arm})")
        over.append(f"{key}={folder}")
    return over


def _eps_value(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den or 1)


def train_one(dataset: str, arm: str, seed: int, checkpoint: bool = False, supersede_unrecoverable: bool = False) -> dict:
    """Train (or resume, or reuse) one run and evaluate it; returns its record.

    A published run is reused as it is; with ``checkpoint``, one whose checkpoint is not on this
    machine (checkpoints are not committed) is first recovered (:func:`recover`): a pipeline stage
    or a suite needs the model itself, not only its record. Where it cannot be recovered (trained on
    another CPU kind) and ``supersede_unrecoverable`` is set, it is set aside instead
    (:func:`supersede`) and its arm and seed trained again here.
    """
    over = overrides_for(dataset, arm, seed)
    run_dir = run_dir_for(dataset, arm, seed, over)
    published = finished_record(dataset, arm, seed, over)
    unrecoverable = None
    if published is not None:
        if not checkpoint or (OUT / dataset / published.name / "checkpoints").exists():
            return load_record(dataset, arm, seed, published)
        unrecoverable = same_machine_kind(published) if supersede_unrecoverable else None
        if unrecoverable is None:
            recover(dataset, arm, seed, over, published)
            return load_record(dataset, arm, seed, published)
    with claimed(run_dir):
        if unrecoverable and published.exists():  # under the claim: another process may have set it aside already
            supersede(dataset, published, f"its model was needed (suite or next stage), its checkpoint is gone "
                                          f"and it cannot be recovered here ({unrecoverable})")
        if not (run_dir / "study.json").exists():  # checked under the claim: another process may just have finished it
            _train(dataset, arm, seed, over, run_dir)
        publish(run_dir, dataset)
    return load_record(dataset, arm, seed, RECORDS / dataset / run_dir.name)


SUPERSEDED = "superseded"  # RECORDS/<dataset>/superseded/<run>/: published runs set aside for a re-training


def supersede(dataset: str, published: Path, reason: str) -> list[str]:
    """Set a published run aside, with every published run built on it (a pipeline's later stages
    name it in their config), so that its arm and seed are trained again; returns the names set aside.

    For a run whose model is needed and cannot be had: its checkpoint is gone and :func:`recover`
    cannot rebuild it on this CPU kind. Waiting for that kind may take any number of sessions, so
    the run is replaced by a new training of the same config and seed here. The rule is mechanical
    (whatever the old run measured: no choosing by outcome) and nothing is lost: the records move to
    ``RECORDS/<dataset>/superseded/`` with a ``superseded.json`` (why, when, this machine), and the
    reports list them (:func:`superseded`)."""
    from aal.engine.run import cpu_identity

    names = []
    for run in dict.fromkeys([published, *downstream(dataset, published.name)]):
        dest = RECORDS / dataset / SUPERSEDED / run.name
        if dest.exists():  # the same run superseded before: keep both
            dest = dest.with_name(f"{run.name}.{time.strftime('%Y%m%dT%H%M%S')}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        run.rename(dest)
        why = reason if run == published else f"built on {published.name}, which was superseded"
        (dest / "superseded.json").write_text(json.dumps(
            {"reason": why, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": cpu_identity()},
            indent=1))
        names.append(run.name)
        print(f"  {run.name}: superseded ({why}); its record is kept in {_rel(dest)}", flush=True)
    return names


def downstream(dataset: str, name: str) -> list[Path]:
    """The published runs of ``dataset`` whose config names the run ``name`` as an input, and theirs."""
    found = []
    for study in sorted(RECORDS.glob(f"{dataset}/*/study.json")):
        if name in input_runs(study.parent):
            found += [study.parent, *downstream(dataset, study.parent.name)]
    return found


def input_runs(run_dir: Path) -> set[str]:
    """The names of the runs a run's stored config takes as inputs (a pipeline stage's earlier stages)."""
    model = stored_config(run_dir).to_dict()["model"]
    return {Path(model[k]).name for k in RUN_KEYS if isinstance(model.get(k), str)}


def superseded(dataset: str) -> list[dict]:
    """The runs of ``dataset`` set aside by :func:`supersede`: which, why, and what they measured."""
    out = []
    for info in sorted(RECORDS.glob(f"{dataset}/{SUPERSEDED}/*/superseded.json")):
        study = json.loads((info.parent / "study.json").read_text())
        res = json.loads((info.parent / "results.json").read_text())
        out.append({"arm": study["arm"], "seed": study["seed"], "run": info.parent.name, **json.loads(info.read_text()),
                    "accuracy": res["eval"]["accuracy"], "trained_on": (res.get("machine") or {}).get("cpu")})
    return out


def _train(dataset: str, arm: str, seed: int, over: list[str], run_dir: Path) -> None:
    """Train (or resume) the run in ``run_dir`` and evaluate it (per-image correctness kept)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from aal.engine.run import train_run

    cfg = config_for(dataset, arm, [*over, f"out_dir={run_dir.parent}", f"name={run_dir.name}"])
    check_machine(cfg.precision)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as logf:
        _, result = train_run(cfg, resume=run_dir if run_dir.exists() else None,
                              log=lambda s: print(s, file=logf, flush=True))
    np.savez_compressed(run_dir / "correct.npz", **{k: v.numpy() for k, v in result.correct.items()})
    (run_dir / "study.json").write_text(json.dumps({"dataset": dataset, "arm": arm, "seed": seed,
                                                    "overrides": over}, indent=1))


EMULATED_BF16_OK = "AAL_STUDY_EMULATED_BF16"  # set to 1 to train a bf16 setting on a CPU without native bf16


def check_machine(precision: str) -> None:
    """Refuse to train a bf16 setting on a CPU that only emulates bf16 (unless the environment sets
    ``AAL_STUDY_EMULATED_BF16=1``): a Fashion-MNIST ranking run (AAL+PGD) trained at ~200 images/s
    on the AVX-512-BF16 EPYC of its first seeds and at 5 images/s on an AVX2 EPYC (~16 h instead
    of ~25 min), and a study that mixed precisions per run to dodge it would compare arithmetic,
    not methods."""
    from aal.utils.precision import native_bf16
    from aal.utils.runtime import cpu_info

    if precision == "bf16" and not native_bf16("cpu") and os.environ.get(EMULATED_BF16_OK) != "1":
        cpu = cpu_info()
        raise SystemExit(f"this setting trains under bf16 and this CPU ({cpu['id'] or cpu['name']}) has "
                         f"no native bf16 (AVX512-BF16/AMX): a run takes ~40x its time on a CPU with them. Run it "
                         f"on a machine with them (or a GPU), or set {EMULATED_BF16_OK}=1 to run it anyway.")


def same_machine_kind(published: Path) -> str | None:
    """Why this machine cannot reproduce the published run bit for bit (None: it may).

    Floating-point results depend on the kernels the CPU selects: a run is re-trained only on the
    CPU kind that trained it (its ``cpu_id``; records older than that field: its CPU name), every
    part of it for a run carried between sessions (:func:`carry`)."""
    from aal.engine.run import cpu_identity

    now = cpu_identity()
    carried = published / CARRIED  # a run trained in parts: every part's machine
    parts = [json.loads(line)["machine"] for line in carried.read_text().splitlines() if line.strip()] if carried.exists() else []
    for then in [*parts, json.loads((published / "results.json").read_text()).get("machine") or {}]:
        key = "cpu_id" if then.get("cpu_id") else "cpu"
        if then.get(key) != now.get(key):
            return f"trained on {then.get(key)!r}, this machine is {now.get(key)!r}"
    return None


# per-epoch fields that measure the machine, not the run: the only ones a reproduction may change
TIMING = ("epoch_time", "eval_time", "img_per_s")


def recover(dataset: str, arm: str, seed: int, over: list[str], published: Path) -> None:
    """Recover the checkpoint of a published run trained on another machine: train it again, from
    its config and seed, and keep the result only if it *is* that run.

    Training here is deterministic (one thread; same seed, data order, initialisation and attack
    draws; checked bit for bit, model and optimiser state, before this was written), so a
    re-trained run either reproduces the published one exactly or is another model. It counts as
    the published run only if it was trained on this CPU kind (:func:`same_machine_kind`; other
    kernels round differently) and every per-image outcome on the full test set (``correct.npz``) and
    every logged per-epoch number (losses, accuracies, map diagnostics, epoch evaluations; timings
    aside) are equal; the folder then holds the published files, so a later :func:`publish` (after
    its suite) leaves the record as it was. Anything else is set aside as ``<folder>.mismatch`` and
    raises: never two models for one record.
    """
    import shutil

    run_dir = OUT / dataset / published.name
    with claimed(run_dir):
        if (run_dir / "checkpoints").exists() and (run_dir / "study.json").exists():
            return  # another process recovered it while this one waited
        other = same_machine_kind(published)
        if other:
            raise RuntimeError(f"{arm} seed {seed}: the published run {published.name} has no checkpoint here and "
                               f"cannot be recovered on this machine ({other}): train it where it was trained")
        print(f"  {published.name}: published, checkpoint not on this machine; re-training to recover it", flush=True)
        _train(dataset, arm, seed, over, run_dir)
        differs = reproduction_mismatch(published, run_dir)
        if differs:
            aside = run_dir.with_name(run_dir.name + ".mismatch")
            shutil.rmtree(aside, ignore_errors=True)
            run_dir.rename(aside)
            raise RuntimeError(f"{arm} seed {seed}: re-training did not reproduce the published run "
                               f"{published.name} ({differs}); set aside in {aside}")
        for name in PUBLISHED:  # the record stays the published one (its timings, its machine)
            if (published / name).exists():
                shutil.copy2(published / name, run_dir / name)
        print(f"  {published.name}: reproduced exactly (per-image outcomes, every epoch's logs); checkpoint recovered",
              flush=True)


def reproduction_mismatch(published: Path, run_dir: Path) -> str | None:
    """How the run in ``run_dir`` differs from the published one (None: the same run)."""
    import numpy as np

    with np.load(published / "correct.npz") as a, np.load(run_dir / "correct.npz") as b:
        if sorted(a.files) != sorted(b.files):
            return f"evaluated attacks {sorted(a.files)} vs {sorted(b.files)}"
        for k in a.files:
            if not np.array_equal(a[k], b[k]):
                return f"{k}: {int((a[k] != b[k]).sum())} of {a[k].size} per-image outcomes differ"

    def epochs(folder: Path) -> list[dict]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]

    mine, theirs = epochs(run_dir), epochs(published)
    if len(mine) != len(theirs):
        return f"{len(mine)} epochs logged vs {len(theirs)}"
    for e, (m, t) in enumerate(zip(mine, theirs), 1):
        if m != t:
            keys = sorted(k for k in {*m, *t} if m.get(k) != t.get(k))
            return f"epoch {e}: {', '.join(keys)} differ"
    return None


def publish(run_dir: Path, dataset: str) -> Path:
    """Copy a finished run's small files to the committed records (idempotent)."""
    import shutil

    dest = RECORDS / dataset / run_dir.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in PUBLISHED:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, dest / name)
    suite = run_dir / "eval" / "study_suite_standard.json"
    if suite.exists():
        shutil.copy2(suite, dest / "suite_standard.json")
        shutil.rmtree(CARRY / dataset / run_dir.name, ignore_errors=True)  # complete: nothing left to hand over
    return dest


def carry(dataset: str = "*") -> list[Path]:
    """Hand every unfinished run of this machine to a later session: copy its folder (checkpoint,
    per-epoch log, suite state) from ``OUT`` into ``CARRY``, which is committed; returns the copies.

    Sessions get fresh machines (``OUT`` does not survive them) and a run plus its suite can take
    longer than a session, so without this such a run never finishes. Unfinished: a run folder with
    a checkpoint whose run is not published with its suite (training or its suite not done; a
    pipeline stage, published without one, is carried while a run built on it is unfinished). A run a
    process holds now is skipped (stop it first: its checkpoint may be mid-write). The folder gets a
    line in ``carried.jsonl`` (published with the run), so its record says it was trained in parts
    and where. A run whose training is finished goes without its optimizer state (half its size).
    :func:`restore_carried` puts it back in ``OUT``; :func:`publish` drops the copy once the run is
    published with its suite."""
    import shutil

    from aal.engine.run import cpu_identity

    copies = []
    for ckpt in sorted(OUT.glob(f"{dataset}/*/checkpoints")):
        run = ckpt.parent
        if run.name.endswith(".mismatch"):
            continue
        if _complete(run) or (_stage(run) and not _feeds_unfinished(run)):  # nothing left to do with its model
            shutil.rmtree(CARRY / run.parent.name / run.name, ignore_errors=True)
            continue
        epoch = _progress(run)[0]
        dest = CARRY / run.parent.name / run.name
        if _carried_as_is(run, dest):  # a second call in one session: no new hand-over to record
            continue
        try:
            with claimed(run):
                with open(run / CARRIED, "a") as f:
                    f.write(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                        "machine": cpu_identity(), "epoch": epoch,
                                        "suite_state": any((run / "eval").glob("study_suite_state_*.json"))}) + "\n")
                shutil.rmtree(dest, ignore_errors=True)
                # a finished run is only read (its model, for its suite or a next stage), never
                # resumed: its optimizer state, as large as its weights, stays behind
                shutil.copytree(run, dest, ignore=shutil.ignore_patterns("optimizer.safetensors") if _progress(run)[1] else None)
        except Claimed as e:
            print(f"  {e}: not carried (stop it first)", flush=True)
            continue
        print(f"  {run.name}: carried at epoch {epoch} to {_rel(dest)}", flush=True)
        copies.append(dest)
    return copies


def _carried_as_is(run: Path, copy: Path) -> bool:
    """Whether ``copy`` already holds ``run`` as far as it is now: same checkpoint epoch, same finished
    parts, same suite state."""

    def suite_states(d: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (d / "eval").glob("study_suite_state_*.json")}

    return copy.is_dir() and _progress(copy) == _progress(run) and suite_states(copy) == suite_states(run)


def restore_carried(dataset: str = "*") -> list[Path]:
    """Put the runs carried by an earlier session (:func:`carry`) into ``OUT`` where this machine
    has no copy as far along; returns the run folders restored."""
    import shutil

    restored = []
    for src in sorted(CARRY.glob(f"{dataset}/*/{CARRIED}")):
        run = src.parent
        dest = OUT / run.parent.name / run.name
        if dest.exists() and _progress(dest) >= _progress(run):
            continue
        try:
            with claimed(dest):
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(run, dest)
        except Claimed:
            continue  # another process is restoring (or running) it
        print(f"  {run.name}: restored from {_rel(run)} (epoch {_progress(dest)[0]})", flush=True)
        restored.append(dest)
    return restored



def _complete(run: Path) -> bool:
    """Published with its suite."""
    return (RECORDS / run.parent.name / run.name / "suite_standard.json").exists()


def _stage(run: Path) -> bool:
    """A finished run of a pipeline-stage arm."""
    study = run / "study.json"
    return study.exists() and json.loads(study.read_text())["arm"] in STAGES


def _feeds_unfinished(run: Path) -> bool:
    """Whether a run folder beside ``run`` that is not complete names it as an input in its config."""
    return any(other.parent != run and not _complete(other.parent) and run.name in input_runs(other.parent)
               for other in run.parent.glob("*/config.yaml"))


def _progress(run: Path) -> tuple[int, bool, bool]:
    """How far a run folder is: its checkpoint's epoch, training finished, suite finished."""
    state = run / "checkpoints" / "last" / "state.json"
    epoch = json.loads(state.read_text())["epoch"] if state.exists() else 0
    return epoch, (run / "study.json").exists(), (run / "eval" / "study_suite_standard.json").exists()


def current_record(dataset: str, arm: str, seed: int) -> dict | None:
    """The finished run of this arm and seed under the arm's config *today*: published, or finished
    in ``OUT`` and not yet published (None if neither). Never a run of the same arm and seed trained
    under another config (a left-out run): picking by folder name could return that one, and a
    matched eps, a pipeline input or a suite would then come from the wrong model."""
    over = overrides_for(dataset, arm, seed)
    return load_record(dataset, arm, seed, finished_record(dataset, arm, seed, over) or run_dir_for(dataset, arm, seed, over))


def load_record(dataset: str, arm: str, seed: int, run_dir: Path) -> dict | None:
    """The record of the finished run in ``run_dir`` (None if it has not finished)."""
    if not (run_dir / "study.json").exists():
        return None
    res = json.loads((run_dir / "results.json").read_text())
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = epochs[-1]["logs"]
    suite = next((p for p in (run_dir / "suite_standard.json", run_dir / "eval" / "study_suite_standard.json")
                  if p.exists()), run_dir / "suite_standard.json")
    return {
        "dataset": dataset, "arm": arm, "seed": seed, "run_dir": _rel(run_dir),
        "source": res.get("dataset_source", dataset), "accuracy": res["eval"]["accuracy"], "eval_n": res["eval"]["n"],
        "train_seconds": res.get("train_seconds"), "epochs": len(epochs),
        "per_epoch": {k: [e["logs"].get(k) for e in epochs] for k in DIAG if k in last},
        "train_acc": [e.get("train_acc") for e in epochs],
        "epoch_eval": [e.get("eval") or {} for e in epochs],
        "last_epoch": {k: last[k] for k in DIAG if k in last},
        "suite": json.loads(suite.read_text()) if suite.exists() else None,
        "machine": res.get("machine"),
    }  # fmt: skip


def _rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (records stay valid in any checkout)."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def suite_missing(dataset: str, arm: str, seed: int) -> bool:
    """Whether this arm and seed has no suite yet (unfinished runs included)."""
    rec = current_record(dataset, arm, seed)
    return rec is None or rec["suite"] is None


def suite_one(dataset: str, arm: str, seed: int, n: int, *, threads: int = 1, batch_size: int = 256) -> None:
    """The standard suite on the first ``n`` test images of a finished run (resumable).

    ``threads``: torch threads for the attacks (1 beside another run; 2 lets a lone suite use both
    cores). ``batch_size``: points per attack call, which is also how often the state is saved (a
    stop loses the unfinished batch). Neither changes what is measured: each point's attack is its
    own, and a resumed suite re-seeds its random stream anyway, so neither is in the suite's state
    fingerprint and a suite may resume with other values.
    """
    import torch

    if threads < 1 or batch_size < 1:
        raise ValueError(f"threads and batch_size must be >= 1, got {threads} and {batch_size}")
    torch.set_num_threads(threads)
    rec = current_record(dataset, arm, seed)
    if rec is None or rec["suite"] is not None:
        return
    run_dir = OUT / dataset / Path(rec["run_dir"]).name
    if not (run_dir / "checkpoints").exists():
        print(f"  {run_dir.name}: no checkpoint in this checkout; suite not run (train --then-suite recovers it)",
              flush=True)
        return
    out = run_dir / "eval" / "study_suite_standard.json"
    with claimed(run_dir):
        if not out.exists():  # another process may have run it while this one waited for the record
            _run_suite(run_dir, out, dataset, n, batch_size)
        publish(run_dir, dataset)


def _run_suite(run_dir: Path, out: Path, dataset: str, n: int, batch_size: int) -> None:
    import numpy as np

    from aal.engine.run import load_run
    from aal.eval import is_randomized
    from aal.eval.suite import run_suite

    cfg, model, bundle = load_run(run_dir)
    # a randomised model (AToP's random transforms) gets AutoAttack's version for randomised defences,
    # APGD-CE -> APGD-DLR with EOT over 20 draws per step; the record says which suite ran
    suite = "rand" if is_randomized(model, bundle.test.images[:32].float().div(255)) else "standard"
    res = run_suite(model, bundle.test, suite, eps=_eps_value(DATASETS[dataset].eps), n=n, eot="auto", eot_n=EOT_N,
                    batch_size=batch_size, state_path=run_dir / "eval" / f"study_suite_state_{n}.json")
    np.savez_compressed(run_dir / "suite_correct.npz", **{k: v.cpu().numpy() for k, v in res.correct.items()})
    out.write_text(json.dumps(res.to_dict(), indent=1))


class Claimed(RuntimeError):
    """Another process is training (or attacking) this run now."""


@contextlib.contextmanager
def claimed(run_dir: Path):
    """Hold the run's claim (a non-blocking ``flock`` on ``<run folder>.claim``) for the duration, or
    raise :class:`Claimed` at once when another process holds it. The kernel drops a dead process's
    lock, so a killed run never stays claimed."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_flocked(run_dir.parent / f"{run_dir.name}.claim", blocking=False))
        except BlockingIOError:
            raise Claimed(f"{run_dir.name}: claimed by another process; skipped") from None
        yield


# ----------------------------------------------------------------------------- statistics
def degenerate(rec: dict) -> str | None:
    """Why an AAL run's map cannot test selectivity (None: it can)."""
    last = rec["last_epoch"]
    arm = ARMS.get(rec["arm"])
    flat_by_design = arm is not None and "method.mask_control=uniform" in arm.overrides  # a control, not a test
    if "mask_mean" not in last or flat_by_design or rec["arm"].startswith(("fgsm_at", "pgd_at", "sal_")):
        return None
    k, s = last["mask_mean"], last.get("mask_std", 0.0)
    if not (K_RANGE[0] <= k <= K_RANGE[1]) or s < K_STD_MIN:
        return f"map degenerate (mean k {k:.2f}, per-image std {s:.2f}): no test of selectivity"
    return None


def paired_t(diffs: list[float]) -> float | None:
    """Two-sided p-value of a paired t-test on ``diffs`` (None with fewer than 2)."""
    if len(diffs) < 2:
        return None
    sd = statistics.stdev(diffs)
    if sd == 0:
        return 0.0 if statistics.fmean(diffs) != 0 else 1.0
    from scipy import stats

    t = statistics.fmean(diffs) / (sd / math.sqrt(len(diffs)))
    return float(2 * stats.t.sf(abs(t), len(diffs) - 1))


def holm(pvals: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order."""
    order = sorted(range(len(pvals)), key=lambda i: pvals[i])
    adj, running = [0.0] * len(pvals), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvals) - rank) * pvals[i]))
        adj[i] = running
    return adj


def adjust(comps: list[dict]) -> None:
    """Add ``p_holm`` to every paired test over seeds (two or more) of one dataset's comparisons: the
    family is every column (clean, PGD-20, suite) of every comparison, so a dataset's verdicts hold
    together at alpha, not each on its own. One-seed (McNemar) tests compare models and stay out."""
    tests = [c[m] for c in comps for m in ("clean", "pgd20", "suite") if m in c and c[m]["p_paired_t"] is not None]
    for m, p in zip(tests, holm([m["p_paired_t"] for m in tests])):
        m["p_holm"] = p


def deciding_p(m: dict) -> float | None:
    """The p that decides a column's verdict: Holm-adjusted over seeds (see :func:`adjust`), else the
    test's own (a one-seed McNemar, or a paired t before adjustment)."""
    return m.get("p_holm", m["p_paired_t"] if m["p_paired_t"] is not None else m.get("p_mcnemar"))


def mcnemar(a, b) -> float:
    """Exact two-sided McNemar p-value for paired boolean outcomes ``a``, ``b``."""
    from scipy import stats

    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    return float(stats.binomtest(n01, n01 + n10, 0.5).pvalue) if n01 + n10 else 1.0


def compare(dataset: str, arm: str, ref: str, recs: dict) -> dict | None:
    import numpy as np

    seeds = sorted(s for (a, s) in recs if a == arm and (ref, s) in recs)
    if not seeds:
        return None
    out = {"arm": arm, "ref": ref, "seeds": seeds}
    for metric in ("clean", "pgd20"):
        d = [100 * (recs[(arm, s)]["accuracy"][metric] - recs[(ref, s)]["accuracy"][metric]) for s in seeds]
        out[metric] = {"mean_diff": statistics.fmean(d), "std": statistics.stdev(d) if len(d) > 1 else None,
                       "p_paired_t": paired_t(d)}
        if len(seeds) == 1:
            ca = np.load(ROOT / recs[(arm, seeds[0])]["run_dir"] / "correct.npz")[metric]
            cb = np.load(ROOT / recs[(ref, seeds[0])]["run_dir"] / "correct.npz")[metric]
            out[metric]["p_mcnemar"] = mcnemar(ca, cb)
    # the suite column: only the seeds where both runs have it, on the same images (the first n)
    suite = {s: (suite_outcomes(recs[(arm, s)]), suite_outcomes(recs[(ref, s)])) for s in seeds}  # loaded once
    both = [s for s, (a, b) in suite.items() if a is not None and b is not None
            and recs[(arm, s)]["suite"]["n"] == recs[(ref, s)]["suite"]["n"]]
    if both:
        d = [100 * (recs[(arm, s)]["suite"]["accuracy"]["robust"] - recs[(ref, s)]["suite"]["accuracy"]["robust"])
             for s in both]
        out["suite"] = {"mean_diff": statistics.fmean(d), "std": statistics.stdev(d) if len(d) > 1 else None,
                        "p_paired_t": paired_t(d), "seeds": both, "n": recs[(arm, both[0])]["suite"]["n"]}
        if len(both) == 1:
            out["suite"]["p_mcnemar"] = mcnemar(*suite[both[0]])
    return out


def suite_outcomes(rec: dict):
    """Per-image robust outcomes of a run's suite (None when it has none)."""
    import numpy as np

    path = ROOT / rec["run_dir"] / "suite_correct.npz"
    return np.load(path)["robust"] if rec.get("suite") and path.exists() else None


def verdict(c: dict, alpha: float = 0.05) -> str:
    parts = []
    for metric in ("clean", "pgd20", "suite"):
        if metric not in c:
            continue
        m = c[metric]
        p = m["p_paired_t"] if m["p_paired_t"] is not None else m.get("p_mcnemar")
        one_seed = m["p_paired_t"] is None
        seeds = m.get("seeds", c["seeds"])
        test = "McNemar, 1 seed" if one_seed else f"paired t over {len(seeds)} seeds"
        if metric == "suite":
            test += f", first {m['n']} images, seeds {seeds}"
        decides = deciding_p(m)
        sig = decides is not None and decides < alpha
        if one_seed:  # the test sees these two trained models, not the spread between seeds
            word = ("the two models differ" if sig else "no difference measured") + "; not a method comparison yet"
        else:
            word = ("higher" if m["mean_diff"] > 0 else "lower") if sig else "no difference measured"
        p_txt = f"={p:.3g}" if p else " < 1e-300"  # an exact binomial tail below float range underflows to 0
        if "p_holm" in m:
            p_txt += f", Holm {m['p_holm']:.3g}"
        parts.append(f"{metric} {m['mean_diff']:+.2f} pt ({test} p{p_txt}: {word})")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- report
def collect(excluded: list | None = None, dataset: str = "*") -> dict:
    """The published runs, by dataset and (arm, seed), of every dataset or of ``dataset``. A run
    whose config is no longer its arm's (trained while a config file changed under it) is left out
    and, when ``excluded`` is given, listed there as ``(dataset, arm, seed, how it differs)``: it is
    not a run of that arm."""
    for study in OUT.glob(f"{dataset}/*/study.json"):  # finished runs not yet published (e.g. by an older script)
        publish(study.parent, study.parent.parent.name)
    recs = {}
    for study in sorted(RECORDS.glob(f"{dataset}/*/study.json")):
        info = json.loads(study.read_text())
        drift = config_drift(info["dataset"], info["arm"], info["seed"], study.parent)
        if drift:
            if excluded is not None:
                excluded.append((info["dataset"], info["arm"], info["seed"], drift))
            continue
        r = load_record(info["dataset"], info["arm"], info["seed"], study.parent)
        recs.setdefault(info["dataset"], {})[(info["arm"], info["seed"])] = r
    return recs


def config_drift(dataset: str, arm: str, seed: int, run_dir: Path) -> str | None:
    """How a published run's config differs from what its arm trains today (None: the same run,
    or not decidable here: a pipeline stage whose input runs are not on this machine)."""
    try:
        want = identity(config_for(dataset, arm, overrides_for(dataset, arm, seed)))
    except LookupError:
        return None
    diffs = _differences(identity(stored_config(run_dir)), want)
    return ", ".join(f"{key} {a} (the arm's: {b})" for key, a, b in diffs) or None


def _differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out


def reported(all_recs: dict) -> dict:
    """The runs this report covers: the AAL-study arms of every dataset. The ranking study's dataset
    (bf16) holds PGD-AT and AAL+PGD runs, and AAL+PGD's controls where trained: they get their own
    section, never pooled with the fp32 runs of the same data; the other ranked methods do not."""
    kept = {d: {k: r for k, r in recs.items() if ARMS[k[0]].study == "aal"} for d, recs in all_recs.items()}
    return {d: recs for d, recs in kept.items() if recs}


def _pm(vals: list[float]) -> str:
    if not vals:
        return "-"
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"


def summarise(rs: list[dict]) -> dict:
    """What the report's table and the README's show of one arm's runs: the seeds, mean ± std
    accuracies, the suite (and the seeds that have it), the map's last-epoch diagnostics averaged
    over seeds, the degeneracy notes and the mean training time."""
    suites = [r for r in rs if r["suite"]]
    diag = {k: [r["last_epoch"][k] for r in rs if k in r["last_epoch"]] for k in DIAG}
    secs = [r["train_seconds"] for r in rs if r["train_seconds"]]
    return {
        "seeds": [r["seed"] for r in rs],
        "clean": _pm([100 * r["accuracy"]["clean"] for r in rs]),
        "pgd20": _pm([100 * r["accuracy"]["pgd20"] for r in rs]),
        "suite": _pm([100 * r["suite"]["accuracy"]["robust"] for r in suites]) if suites else None,
        "suite_n": suites[0]["suite"]["n"] if suites else None,
        "suite_seeds": [r["seed"] for r in suites],
        "diag": {k: statistics.fmean(v) for k, v in diag.items() if v},
        "notes": sorted({d for r in rs if (d := degenerate(r))}),
        "train_seconds": statistics.fmean(secs) if secs else None,
    }


def report() -> str:
    excluded: list = []
    all_recs = collect(excluded)
    lines = ["# AAL selectivity study (issue 11)", "",
             "Generated by `python benchmarks/aal_study.py report` from the finished runs in "
             "`benchmarks/results/aal_study_runs/` "
             "(commands in the script's docstring). Accuracy in % (mean ± std over seeds); clean and PGD-20 on the full "
             "test set (10,000 images), standard suite on the first N test images where run. Diagnostics are from the "
             f"last training epoch. Degeneracy rule: an AAL arm tests selectivity only if its last-epoch mean budget k is in "
             f"[{K_RANGE[0]}, {K_RANGE[1]}] and the per-image std of k is >= {K_STD_MIN}.", ""]
    doc = {}
    all_recs = reported(all_recs)
    for dataset, recs in sorted(all_recs.items()):
        arms = [a for a in ARMS if any(k[0] == a for k in recs)]
        src = next(iter(recs.values()))["source"]
        order_note = (" Per-epoch curves of runs trained before 2026-12-01 (all seed-0 runs) are on the first 500 test "
                      "images in the zip's file order, i.e. airplanes only (fixed since: classes interleaved); the "
                      "full-test figures are not affected." if dataset == "cifar10" else "")
        lines += [f"## {DATASETS[dataset].label}", "", f"Data: {src}. eps {DATASETS[dataset].eps}.{order_note}", "",
                  "| arm | seeds | clean | PGD-20 | suite (n) | mean k | std k | mean M | backtracked | train s | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in arms:
            sm = summarise([recs[k] for k in sorted(recs) if k[0] == a])
            suite = f"{sm['suite']} ({sm['suite_n']})" if sm["suite"] else "-"
            fmt = {k: (f"{sm['diag'][k]:.3f}" if k in sm["diag"] else "-") for k in DIAG}
            secs_txt = f"{sm['train_seconds']:.0f}" if sm["train_seconds"] is not None else "-"
            lines.append(f"| `{a}`: {ARMS[a].label} | {len(sm['seeds'])} | {sm['clean']} | {sm['pgd20']} | {suite} | "
                         f"{fmt['mask_mean']} | {fmt['mask_std']} | {fmt['m_mean']} | {fmt['backtracked_frac']} | "
                         f"{secs_txt} | {'; '.join(sm['notes'])} |")
        comps = [c for a in arms if (ref := ARMS[a].control_of) and (c := compare(dataset, a, ref, recs))]
        adjust(comps)
        if comps:
            lines += ["", "Comparisons (arm minus reference, same seeds and test images; alpha 0.05). Paired t-tests "
                      "over seeds decide by their Holm-adjusted p (family: every column of every comparison of this "
                      "dataset with two or more seeds). With one seed, an exact McNemar test over the test images says "
                      "whether the two trained models differ; seed-to-seed variation is not in it, so only paired tests "
                      "over seeds compare the methods:", ""]
            for c in comps:
                deg = [degenerate(recs[(a, s)]) for a in (c["arm"], c["ref"]) for s in c["seeds"]]
                tag = " **(map degenerate: no test of selectivity)**" if any(deg) else ""
                lines.append(f"- `{c['arm']}` vs `{c['ref']}` (seeds {c['seeds']}): {verdict(c)}{tag}")
        gone = [{"arm": a, "seed": s, "differs": why} for d, a, s, why in excluded if d == dataset]
        if gone:
            lines += ["", "Left out: runs trained under another config than their arm's (a config file changed "
                      "while they ran), so they are not runs of that arm: "
                      + "; ".join(f"`{g['arm']}` seed {g['seed']} ({g['differs']})" for g in gone) + "."]
        sup = [x for x in superseded(dataset) if ARMS[x["arm"]].study == "aal"]
        if sup:
            lines += ["", "Superseded (set aside and trained again: `--supersede-unrecoverable`; records kept in "
                      f"`aal_study_runs/{dataset}/{SUPERSEDED}/`): " + "; ".join(
                          f"`{x['arm']}` seed {x['seed']} (`{x['run']}`, clean {100 * x['accuracy']['clean']:.2f}, "
                          f"PGD-20 {100 * x['accuracy']['pgd20']:.2f}; {x['reason']})" for x in sup) + "."]
        lines.append("")
        doc[dataset] = {"runs": [recs[k] for k in sorted(recs)], "comparisons": comps, "excluded": gone,
                        "superseded": sup}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for dataset, recs in sorted(all_recs.items()):
        png = plot(dataset, recs)
        lines.insert(lines.index(f"## {DATASETS[dataset].label}") + 2,
                     f"![per-epoch diagnostics and accuracy]({png.name}) (`{png.name}`: budget mean and per-image std "
                     "per epoch with the degeneracy thresholds, per-epoch robust accuracy, final clean vs PGD-20 per seed)\n")
    (RESULTS / "aal_study.json").write_text(json.dumps(doc, indent=1))
    text = "\n".join(lines)
    (RESULTS / "aal_study.md").write_text(text)
    update_readme(doc)
    return text


README_BEGIN = "<!-- aal_study table: generated by `python benchmarks/aal_study.py report`; do not edit by hand -->"
README_END = "<!-- aal_study table: end -->"


def _seed_list(seeds: list[int]) -> str:
    """[1, 2, 3] -> "1-3"; [0, 2] -> "0, 2"."""
    s = sorted(seeds)
    return f"{s[0]}-{s[-1]}" if len(s) > 2 and s == list(range(s[0], s[-1] + 1)) else ", ".join(map(str, s))


def readme_table(doc: dict) -> str:
    """The README's study table, rendered from the report's JSON (``aal_study.json``) so the two
    cannot drift: one row per arm and dataset, with the seeds behind every mean."""
    rows = ["| dataset (training) | arm | seeds | clean | PGD-20 | suite (n; seeds) | mean k | per-image std k |",
            "|---|---|---|---|---|---|---|---|"]
    for dataset in (d for d in DATASETS if d in doc):
        runs, first = doc[dataset]["runs"], True
        gone = {}
        for g in doc[dataset]["excluded"]:
            gone.setdefault(g["arm"], []).append(g["seed"])
        for arm in (a for a in ARMS if any(r["arm"] == a for r in runs)):
            rs = [r for r in runs if r["arm"] == arm]
            sm = summarise(rs)
            suite = f"{sm['suite']} ({sm['suite_n']}; {_seed_list(sm['suite_seeds'])})" if sm["suite"] else "-"
            k = {key: (f"{sm['diag'][key]:.2f}" if key in sm["diag"] else "-") for key in ("mask_mean", "mask_std")}
            deg = " (degenerate)" if sm["notes"] else ""
            left = f"; left out: a seed-{_seed_list(gone[arm])} run under another config" if arm in gone else ""
            src = "" if rs[0]["source"] == dataset else f"; {rs[0]['source']}"  # named where not the plain dataset
            where = f"{DATASETS[dataset].label}{src}; eps {DATASETS[dataset].eps}" if first else ""
            rows.append(f"| {where} | `{arm}`: {ARMS[arm].label} | {_seed_list(sm['seeds'])}{left} | {sm['clean']} | "
                        f"{sm['pgd20']} | {suite} | {k['mask_mean']} | {k['mask_std']}{deg} |")
            first = False
    return "\n".join(rows)


def _diff_cell(m: dict | None, alpha: float = 0.05) -> str:
    if m is None:
        return "-"
    p, decides = m["p_paired_t"], deciding_p(m)
    holm_txt = f", Holm {m['p_holm']:.2g}" if "p_holm" in m else ""
    where = f"; seeds {_seed_list(m['seeds'])}" if "seeds" in m else ""
    return f"{m['mean_diff']:+.2f} (p {p:.2g}{holm_txt}{where}){'' if decides < alpha else ' n.d.'}"


def readme_comparisons(doc: dict) -> str:
    """The paired comparisons over seeds (two or more) as a table: arm minus reference, points, with
    the two-sided paired t-test's p; "n.d." (no difference measured) where p >= 0.05. One-seed
    comparisons (McNemar: the two *models* differ or not) stay in the full report."""
    rows = ["| dataset | arm vs reference | seeds | clean | PGD-20 | suite (seeds) |", "|---|---|---|---|---|---|"]
    for dataset in (d for d in DATASETS if d in doc):
        for c in doc[dataset]["comparisons"]:
            if len(c["seeds"]) < 2:
                continue
            suite = c.get("suite")
            rows.append(f"| {dataset} | `{c['arm']}` vs `{c['ref']}` | {_seed_list(c['seeds'])} | "
                        f"{_diff_cell(c['clean'])} | {_diff_cell(c['pgd20'])} | "
                        f"{_diff_cell(suite) if suite and len(suite['seeds']) > 1 else '-'} |")
    return "\n".join(rows)


def readme_block(doc: dict) -> str:
    return (f"{README_BEGIN}\n{readme_table(doc)}\n\nPaired comparisons over seeds (arm minus reference, points; "
            "two-sided paired t-test over the seeds listed, Holm-adjusted over the dataset's tests in this table "
            "(every column of every row); n.d. = no difference measured, Holm p >= 0.05; a suite "
            "difference is tested where both arms have the suite on two or more seeds):\n\n"
            f"{readme_comparisons(doc)}\n{README_END}")


def update_readme(doc: dict, readme: Path = ROOT / "README.md") -> bool:
    """Replace the README's generated study table (between the markers); False when it has none."""
    return replace_block(readme, README_BEGIN, README_END, readme_block(doc))


def replace_block(path: Path, begin: str, end: str, block: str) -> bool:
    """Replace ``path``'s text from the line ``begin`` to ``end`` (both kept, as ``block`` starts and
    ends with them) by ``block``; False, and nothing written, when the file has no such markers."""
    text = path.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(head + block + tail)
    return True


def plot(dataset: str, recs: dict, out_dir: Path = RESULTS) -> Path:
    """One figure per dataset: what the map did per epoch (mean k and per-image std of k, with the
    degeneracy thresholds), the per-epoch robust accuracy on the epoch-evaluation images, and the
    final clean vs PGD-20 accuracy of every run (one marker per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(19, 4.2))
    arms = [a for a in ARMS if any(k[0] == a for k in recs)]
    colors = {a: plt.cm.tab20(i % 20) for i, a in enumerate(arms)}
    for a in arms:
        rs = [recs[k] for k in sorted(recs) if k[0] == a]
        for j, r in enumerate(rs):
            lab = a if j == 0 else None
            ep = range(1, r["epochs"] + 1)
            for panel, key in ((0, "mask_mean"), (1, "mask_std")):
                vals = r["per_epoch"].get(key)
                if vals and any(v is not None for v in vals):
                    ax[panel].plot(ep, vals, "-o", ms=3, color=colors[a], label=lab)
            rob = [next((v for k, v in e.items() if k.startswith("test_pgd")), None) for e in r["epoch_eval"]]
            if any(v is not None for v in rob):
                old_order = Path(r.get("run_dir", "")).name in AIRPLANE_EPOCH_EVAL
                ax[2].plot(ep, [None if v is None else 100 * v for v in rob], ":" if old_order else "-o", ms=3,
                           color=colors[a], label=lab, alpha=0.6 if old_order else 1.0)
            ax[3].scatter(100 * r["accuracy"]["clean"], 100 * r["accuracy"]["pgd20"], color=colors[a], label=lab, s=25)
    ax[0].axhspan(*K_RANGE, color="0.9", zorder=0)
    ax[1].axhline(K_STD_MIN, color="0.5", ls="--")
    for a_, t, yl in ((ax[0], "mean budget k (shaded: rule's range)", "mean k"),
                      (ax[1], "per-image std of k (dashed: rule's minimum)", "std k"),
                      (ax[2], "robust acc. per epoch (dotted: eval images all airplanes, "
                               "runs before the order fix)" if dataset == "cifar10" else
                               "robust accuracy per epoch (epoch-eval images)", "PGD-10 %"),
                      (ax[3], "final, full test set (one marker per seed)", "PGD-20 %")):
        a_.set_title(t, fontsize=9)
        a_.set_ylabel(yl)
        a_.set_xlabel("clean %" if a_ is ax[3] else "epoch")
    ax[3].legend(fontsize=6, loc="best")
    fig.suptitle(f"AAL study, {DATASETS[dataset].label}", fontsize=10)
    fig.tight_layout()
    out = out_dir / f"aal_study_{dataset}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@contextlib.contextmanager
def _held(path: str | None):
    """An exclusive ``flock`` on ``path`` for the duration (nothing when None)."""
    if path is None:
        yield
        return
    with _flocked(path):
        yield


@contextlib.contextmanager
def _flocked(path: str | Path, blocking: bool = True):
    """An exclusive ``flock`` on ``path`` (created if missing); ``blocking=False`` raises
    ``BlockingIOError`` at once when another open file holds it."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _skip_claimed():
    """A run another process holds is its work: say so and go on with the list."""
    try:
        yield
    except Claimed as e:
        print(f"  {e}", flush=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_suite_options(p: argparse.ArgumentParser) -> None:
    """The suite's ``--suite-threads`` and ``--suite-batch`` (see :func:`suite_one`), shared with methods_rank."""
    p.add_argument("--suite-threads", type=_positive, default=1,
                   help="torch threads of a suite (default 1, for two runs at a time; 2: a lone suite on both cores)")
    p.add_argument("--suite-batch", type=_positive, default=256,
                   help="points per attack call; the state is saved after each (smaller: less lost at a stop)")


def suite_options(args: argparse.Namespace) -> dict[str, int]:
    """:func:`suite_one`'s keyword options from the parsed ``--suite-threads`` / ``--suite-batch``."""
    return {"threads": args.suite_threads, "batch_size": args.suite_batch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("train", "suite", "report", "carry"),
                   help="carry: copy this machine's unfinished runs into benchmarks/results/aal_study_carry/ (commit "
                        "it) so that a later session resumes them; train and suite restore them first")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10")
    p.add_argument("--arms", default=",".join(MAIN), help=f"comma-separated, from: {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--suite-n", type=int, default=1000)
    add_suite_options(p)
    p.add_argument("--lock", default=None, help="hold this file's lock (flock) during each run: share a core politely")
    p.add_argument("--then-suite", action="store_true",
                   help="train: run the suite on each run right after it, while its checkpoint is on this machine "
                        "(a published run without its suite and checkpoint is re-trained first, kept only if it "
                        "reproduces the published run exactly)")
    p.add_argument("--supersede-unrecoverable", action="store_true",
                   help="train: a published run whose model is needed but was trained on another CPU kind is set "
                        "aside (kept in superseded/, reported) and trained again here, instead of stopping")
    args = p.parse_args(argv)
    if args.phase == "report":
        print(report())
        return 0
    if args.phase == "carry":
        carry(args.dataset)
        return 0
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}")
    restore_carried(args.dataset)
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for arm in arms:
            t0 = time.time()
            with _held(args.lock), _skip_claimed():
                print(f"[{time.strftime('%H:%M:%S')}] {args.phase} {args.dataset} {arm} seed {seed}", flush=True)
                if args.phase == "train":
                    need = args.then_suite and suite_missing(args.dataset, arm, seed)  # its suite needs the model
                    r = train_one(args.dataset, arm, seed, checkpoint=need,
                                  supersede_unrecoverable=args.supersede_unrecoverable)
                    print(f"  clean {r['accuracy']['clean']:.4f} pgd20 {r['accuracy']['pgd20']:.4f} "
                          f"diag {r['last_epoch']} ({time.time() - t0:.0f} s)", flush=True)
                    if args.then_suite:
                        suite_one(args.dataset, arm, seed, args.suite_n, **suite_options(args))
                else:
                    suite_one(args.dataset, arm, seed, args.suite_n, **suite_options(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
