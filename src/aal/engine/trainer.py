"""One training loop for every method (nanoGPT / airbench style: read it in one sitting).

Per epoch: ``loader.set_epoch(epoch)``, ``method.on_epoch_start(epoch, epochs)``, then for each
batch ``out = method(model, batch)``, ``zero_grad``, ``out.loss.backward()``,
``method.after_backward(model)``, optional gradient clipping, ``optimizer.step()``, ``scheduler.step()`` (schedules are per iteration). There are no
per-method branches: a method is anything ``(model, batch) -> Output(loss, logits, logs)``.

At the end of each epoch the trainer runs ``evaluate_fn(model)`` (with the global RNG state
saved and restored around it, so evaluating or not never changes the training trajectory),
appends one JSON line to ``RUN/metrics.jsonl`` (mirrored to TensorBoard with ``logger="tensorboard"``,
:mod:`aal.engine.tracking`) and atomically saves ``RUN/checkpoints/last``
(model, optimizer, scheduler, method state, RNG states). Resuming from it reproduces the
uninterrupted run bit for bit on CPU, because the data order depends only on
``(loader seed, epoch)`` and all other randomness comes from the restored global RNGs.

Example:
    >>> import torch, aal
    >>> from aal.engine import Trainer, build_optimizer, build_scheduler
    >>> from aal.methods import create_method
    >>> model = aal.create_model("small_cnn")
    >>> data = [(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(4)]
    >>> opt = build_optimizer(model, lr=0.05)
    >>> sched = build_scheduler(opt, "cosine", epochs=2, steps_per_epoch=len(data))
    >>> trainer = Trainer(model, create_method("standard"), data, opt, sched, epochs=2, progress=False)
    >>> records = trainer.fit()
    >>> [r["epoch"] for r in records], sorted(records[0])[:3]
    ([1, 2], ['epoch', 'epoch_time', 'eval'])
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from aal.config import check_logger
from aal.engine import distributed as dist_utils
from aal.engine.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from aal.engine.tracking import MetricsLogger, create_logger
from aal.utils.precision import autocast_context, check_precision, make_grad_scaler, native_bf16
from aal.utils.runtime import cpu_info, get_rng_state, is_main_process, seed_everything, set_rng_state, world_size
from aal.utils.serialize import jsonable


class RunningMeans:
    """Weighted running means that keep tensors on their device (no host sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.weights: dict[str, float] = {}

    def add(self, key: str, value: float | Tensor, weight: float = 1.0) -> None:
        if isinstance(value, Tensor):
            value = value.detach().double()
        self.sums[key] = self.sums.get(key, 0.0) + value * weight
        self.weights[key] = self.weights.get(key, 0.0) + weight

    def means(self, all_ranks: bool = True) -> dict[str, float]:
        """Means so far; over every rank's data when distributed (a collective: every rank must
        call it, with the same keys), or this rank's only with ``all_ranks=False``. Never mutates."""
        keys = sorted(self.sums)
        sums = [float(self.sums[k]) for k in keys]
        weights = [self.weights[k] for k in keys]
        if all_ranks and world_size() > 1:
            # every rank sees a shard of the data; report means over the whole epoch
            flat = dist_utils.all_reduce_(torch.tensor(sums + weights, dtype=torch.float64))
            sums, weights = flat[: len(keys)].tolist(), flat[len(keys) :].tolist()
        return {k: s / w for k, s, w in zip(keys, sums, weights) if w > 0}


def _batch_size(batch: Any) -> int:
    """Images in a batch: the leading size of its first tensor (1 if it holds none)."""
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    for t in items:
        if isinstance(t, Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return 1


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    """Train ``model`` with ``method`` for ``epochs`` epochs, logging, evaluating and checkpointing.

    Args:
        model: the network (its device decides where batches are moved).
        method: ``method(model, batch) -> Output(loss, logits, logs)``; optional hooks
            ``on_epoch_start(epoch, epochs)``, ``after_backward(model)`` (after each backward,
            before the optimizer step), ``state_dict()`` / ``load_state_dict()``.
        train_loader: iterable of batches (``(x (B,C,H,W) in [0,1], y (B,))`` for
            classification); ``set_epoch(epoch)`` is called when it exists, ``len()`` feeds the ETA.
        optimizer: a torch optimizer over the model's parameters.
        scheduler: optional LR scheduler, stepped after every optimizer step.
        epochs: total number of epochs of the run (a resumed run continues up to it).
        run_dir: folder for ``metrics.jsonl`` and ``checkpoints/last``; ``None`` writes nothing.
        evaluate_fn: ``evaluate_fn(model) -> dict`` of metrics, run after every ``eval_every``-th
            epoch and after the last one.
        eval_every: evaluation period in epochs.
        checkpoint_every: checkpoint period in epochs (a checkpoint is always written at the end).
        progress: show a tqdm bar (epoch, batch, loss, acc, img/s, ETA) and a summary line per
            epoch; the bar hides itself when stderr is not a terminal.
        grad_clip: clip the global gradient norm to this value (``None``: no clipping); the
            pre-clip norm is logged as ``grad_norm``.
        seed: seeds Python, NumPy and torch when a fresh run starts (``fit`` from epoch 0, not
            resumed); ``None`` leaves the global RNGs alone. Data order is the loader's business.
        config: JSON-able run configuration stored in every checkpoint (``extra["config"]``).
        log_fn: receives the one-line summary of each epoch (default: printed via ``tqdm.write``
            when ``progress`` is on, silent otherwise).
        distributed: wrap the model for DistributedDataParallel when ``torch.distributed`` runs
            more than one process (``None``/``True``; ``False``: never). See
            :mod:`aal.engine.distributed`.
        find_unused_parameters: passed to DDP (default True: a method may leave parameters out
            of a step's loss, e.g. AAL with ``adv_attention="fixed"``).
        logger: experiment tracking besides ``metrics.jsonl``: ``"none"``/``None`` (default),
            ``"tensorboard"`` (event files in ``RUN/tensorboard/``; needs ``run_dir``), or a
            :class:`~aal.engine.tracking.MetricsLogger`. Called after each epoch's line is
            written, on the main process, with the RNG state saved and restored; closed when
            :meth:`fit` returns or fails.
        preview: ``(x, y)`` images whose attention maps the ``"tensorboard"`` logger draws
            each epoch for AAL methods (:func:`aal.engine.tracking.preview_batch`).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA only; with a
            ``GradScaler``). Everything the method does for a step (clean forward, attack,
            adversarial forward, loss) runs under autocast (:mod:`aal.utils.precision`); the
            weights and the optimizer stay fp32, and backward, ``after_backward``, clipping and
            the optimizer step run outside it.
        compile: run the training forwards (and the method's attack forwards) through
            ``torch.compile(model)`` (default off: compiling costs tens of seconds at the first
            step and again when a mode or shape changes, worth it only for long runs). The
            plain model is still what is checkpointed and evaluated.

    Distributed (one Trainer per process, e.g. under ``torchrun``): the method gets a
    :class:`~aal.engine.distributed.DDPModel` (training forwards through DDP, attack forwards on
    the plain model), ``train_loader`` must yield this rank's shard (``BatchLoader(rank=...,
    world_size=...)``), logged means and ``images`` cover all ranks, the method state is
    broadcast from rank 0 when training starts, BatchNorm buffers after every epoch, and only
    rank 0 writes files and shows progress. ``self.model`` stays the plain model.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Callable[[nn.Module, Any], Any],
        train_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        epochs: int = 1,
        run_dir: str | os.PathLike | None = None,
        evaluate_fn: Callable[[nn.Module], dict[str, Any]] | None = None,
        eval_every: int = 1,
        checkpoint_every: int = 1,
        progress: bool = True,
        grad_clip: float | None = None,
        seed: int | None = 0,
        config: dict[str, Any] | None = None,
        log_fn: Callable[[str], None] | None = None,
        distributed: bool | None = None,
        find_unused_parameters: bool = True,
        logger: str | MetricsLogger | None = None,
        preview: tuple[Tensor, Tensor] | None = None,
        precision: str = "fp32",
        compile: bool = False,
    ) -> None:
        if int(epochs) < 1 or int(eval_every) < 1 or int(checkpoint_every) < 1:
            raise ValueError(
                f"epochs, eval_every, checkpoint_every must be >= 1, got {epochs}, {eval_every}, {checkpoint_every}"
            )
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        self.model, self.method, self.loader = dist_utils.unwrap_model(model), method, train_loader
        # what the method calls: the DDP wrapper when several processes train, else the model itself
        self.train_model = self.model
        if distributed is not False:
            self.train_model = dist_utils.wrap_model(self.model, find_unused_parameters=find_unused_parameters)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.epochs, self.eval_every, self.checkpoint_every = int(epochs), int(eval_every), int(checkpoint_every)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.evaluate_fn, self.progress, self.grad_clip = evaluate_fn, progress, grad_clip
        self.seed, self.config, self.log_fn = seed, config, log_fn
        if isinstance(logger, str):
            check_logger(logger)  # a typo fails here, not after the first epoch
        self.logger, self.preview = logger, preview
        params = next(iter(self.model.parameters()), None)
        self.device = params.device if params is not None else torch.device("cpu")
        self.precision = check_precision(precision, self.device)
        if self.precision == "bf16" and not native_bf16(self.device):
            # it still runs (and gives bf16's numbers), but a user choosing bf16 wants speed
            what = f"{cpu_info()['name']}; no AVX512-BF16/AMX" if self.device.type == "cpu" else "torch: no bf16 support"
            warnings.warn(f"precision=bf16 on a {self.device.type} without native bf16 ({what}): it is emulated, "
                          "~10x slower than fp32 (small-CNN PGD-10-AT steps on an AVX2 AMD EPYC); precision=fp32 is "
                          "faster", stacklevel=2)
        self.scaler = make_grad_scaler(self.precision, self.device)  # None unless fp16 on CUDA
        self.compiled = bool(compile)
        if self.compiled:  # around the DDP wrapper when there is one (DDP's documented order)
            self.train_model = torch.compile(self.train_model)
        self._tracker: MetricsLogger | None = None  # opened at the first record, closed by fit()
        self.start_epoch = 0  # the next epoch to run; set by resume()
        self.step = 0  # optimizer steps taken so far
        self.history: list[dict[str, Any]] = []
        self._resumed = False
        # when set: metrics.jsonl lines of later epochs (and a line cut by a crash) are dropped
        # just before the next line is written, not when the checkpoint is loaded, so that a
        # resume failing before its first epoch ends never loses a record it cannot replace
        self.keep_metrics: int | None = None

    # ------------------------------------------------------------------------- paths
    @property
    def metrics_path(self) -> Path | None:
        return self.run_dir / "metrics.jsonl" if self.run_dir is not None else None

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / "checkpoints" / "last" if self.run_dir is not None else None

    # ------------------------------------------------------------------------- the loop
    def fit(self, start_epoch: int | None = None) -> list[dict[str, Any]]:
        """Train from ``start_epoch`` (default: 0, or where :meth:`load` / :meth:`resume` left off).

        Returns:
            one record per epoch run (the dicts written to ``metrics.jsonl``).

        Raises:
            FloatingPointError: the epoch's mean training loss is not finite (logged first; the
                last checkpoint is left as it was).
        """
        try:
            return self._fit(start_epoch)
        finally:  # the tracking logger's files are complete even when training fails
            if self._tracker is not None:
                tracker, self._tracker = self._tracker, None
                tracker.close()

    def _fit(self, start_epoch: int | None) -> list[dict[str, Any]]:
        start = self.start_epoch if start_epoch is None else int(start_epoch)
        if start == 0 and not self._resumed and self.seed is not None:
            seed_everything(dist_utils.rank_seed(self.seed))  # per-rank streams; rank 0 (or one process): the seed
        # no-ops on one process; under DDP every rank must start from rank 0's state (a resumed
        # method state, or a method built differently on some rank, would silently diverge)
        dist_utils.broadcast_model_state(self.model)
        dist_utils.broadcast_method_state(self.method)
        records = []
        for epoch in range(start, self.epochs):
            record = self.train_epoch(epoch)
            if self.evaluate_fn is not None and self._due(epoch, self.eval_every):
                t0 = time.perf_counter()
                # evaluation must not consume the training RNG streams: then eval_every never
                # changes the trained weights, and a resumed run matches an uninterrupted one
                rng = get_rng_state()
                try:
                    record["eval"] = jsonable(self.evaluate_fn(self.model))
                finally:
                    set_rng_state(rng)
                record["eval_time"] = time.perf_counter() - t0
            self._log(record)
            if not math.isfinite(record["train_loss"]):
                raise FloatingPointError(
                    f"mean training loss is {record['train_loss']} in epoch {epoch + 1}; stopping before "
                    "it overwrites the last checkpoint (lower the lr or set grad_clip)"
                )
            if self.run_dir is not None and self._due(epoch, self.checkpoint_every):
                rank_rng = dist_utils.gather_rng_states()  # collective: every rank's RNG, for resume
                if is_main_process():
                    extra = {} if rank_rng is None else {"rank_rng": rank_rng}  # None on one process
                    self.save_checkpoint(epoch + 1, record, **extra)
            records.append(record)
            self.history.append(record)
            self.start_epoch = epoch + 1
        if self.keep_metrics is not None:  # nothing was left to run: still drop the stale lines
            self._truncate_metrics(self.keep_metrics)
        return records

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training data; returns the epoch's record (without evaluation)."""
        model, opt = self.train_model, self.optimizer
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
        if hasattr(self.method, "on_epoch_start"):
            self.method.on_epoch_start(epoch, self.epochs)
        device = next(model.parameters()).device if any(True for _ in model.parameters()) else None
        meters, images, lr = RunningMeans(), 0, opt.param_groups[0]["lr"]
        total = len(self.loader) if hasattr(self.loader, "__len__") else None
        bar = tqdm(
            self.loader, total=total, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch", leave=False,
            dynamic_ncols=True, file=sys.stderr,
            disable=True if not (self.progress and is_main_process()) else None,  # None: off when not a TTY
        )
        t0 = last_shown = time.perf_counter()
        for batch in bar:
            batch = _to_device(batch, device)
            n = _batch_size(batch)
            model.train()  # every step: an evaluation or a method may have left it in eval mode
            for out in self._updates(model, batch):
                opt.zero_grad(set_to_none=True)
                grad_norm = self._backward_step(out.loss, model)
                if grad_norm is not None:
                    meters.add("grad_norm", grad_norm, n)
                lr = opt.param_groups[0]["lr"]  # the lr this step used
            if self.scheduler is not None:
                self.scheduler.step()  # per batch (iteration), whatever the number of steps
            self.step += 1
            images += n
            meters.add("train_loss", out.loss, n)
            y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None
            if out.logits is not None and isinstance(y, Tensor) and out.logits.dim() == 2 and len(out.logits) == len(y):
                meters.add("train_acc", (out.logits.detach().argmax(1) == y).float().mean(), n)
            for k, v in (out.logs or {}).items():
                meters.add(f"logs/{k}", v, n)
            now = time.perf_counter()
            if not bar.disable and now - last_shown > 0.5:  # .item() syncs a GPU: not every step
                last_shown = now
                m = meters.means(all_ranks=False)  # rank 0 alone shows a bar: no collective here
                bar.set_postfix(loss=f"{m['train_loss']:.4f}", acc=f"{m.get('train_acc', float('nan')):.3f}",
                                img_s=f"{images / (now - t0):.0f}", refresh=False)
        bar.close()
        # DDP keeps parameters in sync but each rank's BatchNorm buffers followed its own data:
        # give all ranks rank 0's, which the checkpoint stores and evaluation should use
        dist_utils.broadcast_buffers(self.model)
        seconds = time.perf_counter() - t0
        m = meters.means()
        images *= world_size()
        return {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": lr,
            "train_loss": m.pop("train_loss", float("nan")),
            "train_acc": m.pop("train_acc", None),
            "grad_norm": m.pop("grad_norm", None),
            "logs": {k.removeprefix("logs/"): v for k, v in m.items()},
            "eval": {},
            "epoch_time": seconds,
            "eval_time": 0.0,
            "images": images,
            "img_per_s": images / seconds if seconds > 0 else None,
        }

    def _updates(self, model: nn.Module, batch: Any) -> Iterable[Any]:
        """The method's outputs for one batch, each computed under the run's autocast.

        A method may take several optimizer steps per batch (``Method.updates`` yields one Output
        per step, lazily, so a later step sees the weights updated by the earlier one): each
        ``next`` runs in its own autocast region, left before the trainer's backward and step.
        """
        with autocast_context(self.precision, self.device):
            if hasattr(self.method, "updates"):
                steps = iter(self.method.updates(model, batch))
            else:
                steps = iter([self.method(model, batch)])
        while True:
            with autocast_context(self.precision, self.device):
                out = next(steps, None)
            if out is None:
                return
            yield out

    def _backward_step(self, loss: Tensor, model: nn.Module) -> Tensor | None:
        """Backward, ``after_backward``, optional clipping and the optimizer step (fp32, outside
        autocast); with an fp16 ``GradScaler`` the loss is scaled and the gradients unscaled
        before clipping. Returns the pre-clip gradient norm when clipping is on."""
        opt, scaler, grad_norm = self.optimizer, self.scaler, None
        (loss if scaler is None else scaler.scale(loss)).backward()
        if hasattr(self.method, "after_backward"):
            self.method.after_backward(model)  # e.g. AWP puts back the weights it perturbed
        if self.grad_clip is not None:
            if scaler is not None:
                scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if scaler is None:
            opt.step()
        else:  # skips the step when the scaled gradients overflowed, and adapts the scale
            scaler.step(opt)
            scaler.update()
        return grad_norm

    def _due(self, epoch: int, every: int) -> bool:
        return (epoch + 1) % every == 0 or epoch + 1 == self.epochs

    # ------------------------------------------------------------------------- logging
    def _log(self, record: dict[str, Any]) -> None:
        if not is_main_process():
            return
        if self.metrics_path is not None:
            if self.keep_metrics is not None:
                self._truncate_metrics(self.keep_metrics)
            try:
                self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()  # a crash right after the epoch still leaves its line on disk
                    os.fsync(f.fileno())
            except OSError as err:  # full disk, read-only folder: say which file, in one line
                raise OSError(err.errno, f"cannot write {self.metrics_path}: {err.strerror or err}") from None
        self._track(record)
        line = self.summary(record)
        if self.log_fn is not None:
            self.log_fn(line)
        elif self.progress:
            tqdm.write(line)

    def _track(self, record: dict[str, Any]) -> None:
        """Hand the record to the tracking logger (opened at the first record)."""
        if self.logger is None or self.logger == "none":
            return
        if self._tracker is None:
            if isinstance(self.logger, str):
                if self.run_dir is None:
                    raise ValueError(f"logger={self.logger!r} writes into the run folder: give the Trainer a run_dir")
                self._tracker = create_logger(self.logger, self.run_dir, self.preview)
            else:
                self._tracker = self.logger
        # the maps of an AAL preview run the method's association: keep the training RNG streams
        rng = get_rng_state()
        try:
            self._tracker.log_epoch(record, self.model, self.method)
        finally:
            set_rng_state(rng)

    def summary(self, r: dict[str, Any]) -> str:
        """One human-readable line for an epoch record."""
        parts = [f"epoch {r['epoch']}/{self.epochs}", f"loss {r['train_loss']:.4f}"]
        if r.get("train_acc") is not None:
            parts.append(f"acc {100 * r['train_acc']:.2f}%")
        parts.append(f"lr {r['lr']:.4g}")
        parts += [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.get("eval", {}).items()]
        parts.append(f"{r['epoch_time']:.1f}s")
        if r.get("img_per_s"):
            parts.append(f"{r['img_per_s']:.0f} img/s")
        return "  ".join(parts)

    # ------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, epoch: int, record: dict[str, Any] | None = None,
                        rank_rng: list[dict[str, Any]] | None = None) -> Path:
        """Atomically write ``RUN/checkpoints/last`` for ``epoch`` completed epochs.

        ``rank_rng``: every rank's RNG snapshot (distributed runs), so that each continues its
        own stream on resume; the checkpoint's own RNG state is this process's.
        """
        if self.checkpoint_path is None:
            raise ValueError("Trainer has no run_dir to save checkpoints in")
        extra = {"config": self.config, "epochs": self.epochs, "step": self.step, "record": record}
        if rank_rng is not None:
            extra["rank_rng"] = rank_rng
        if self.scaler is not None:  # fp16's loss scale: a resumed run continues with it, not from 2**16
            extra["grad_scaler"] = self.scaler.state_dict()
        try:
            return save_checkpoint(
                self.checkpoint_path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                method=self.method if hasattr(self.method, "state_dict") else None, epoch=epoch, extra=extra,
            )
        except OSError as err:  # full disk, unwritable folder: the previous checkpoint is intact
            raise OSError(err.errno, f"cannot save the checkpoint {self.checkpoint_path} ({err.strerror or err}); "
                          "the previous checkpoint, if any, is kept") from None

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore model, optimizer, scheduler, method state, RNG states and epoch from a checkpoint.

        Args:
            path: a run folder (its ``checkpoints/last``) or a checkpoint directory. When the
                trainer has no ``run_dir``, the run folder holding the checkpoint becomes it.

        Returns:
            the checkpoint metadata (see :func:`~aal.engine.checkpoint.load_checkpoint`).
        """
        ckpt = resolve_checkpoint(path)
        meta = load_checkpoint(
            ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            method=self.method if hasattr(self.method, "load_state_dict") else None, restore_rng=True,
        )
        self.start_epoch, self._resumed = meta["epoch"], True
        self.step = int(meta["extra"].get("step", 0))
        scaler_state = meta["extra"].get("grad_scaler")
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        # distributed: each rank continues its own random streams (no-op on one process)
        dist_utils.restore_rank_rng(meta["extra"].get("rank_rng"), fallback_seed=(self.seed or 0) + 7919 * self.start_epoch)
        if self.run_dir is None and ckpt.parent.name == "checkpoints":
            self.run_dir = ckpt.parent.parent
        self.keep_metrics = self.start_epoch  # applied when the next record is written
        return meta

    def resume(self, path: str | os.PathLike) -> list[dict[str, Any]]:
        """:meth:`load` the checkpoint at ``path``, then :meth:`fit` the remaining epochs."""
        self.load(path)
        return self.fit()

    def _truncate_metrics(self, epochs_done: int) -> None:
        # epochs after the checkpoint are re-run; drop their lines (and a line cut by a crash)
        self.keep_metrics = None
        path = self.metrics_path
        if path is None or not path.is_file() or not is_main_process():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and int(rec.get("epoch", 0)) <= epochs_done:
                kept.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)


__all__ = ["RunningMeans", "Trainer"]
