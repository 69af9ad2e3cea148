"""Train a BraTS segmentation network from a YAML config.

    python train.py -c configs/demo.yaml [key=value ...]        # e.g. train.epochs=5 data.root=/data/brats
    python train.py --resume runs/demo/last.pt [key=value ...]  # continue exactly (e.g. train.epochs=60 to extend)
    python train.py -c configs/unet3d.yaml --resume auto        # resume out_dir/last.pt if it exists, else start
    torchrun --nproc_per_node=4 train.py -c configs/unet3d.yaml # one process per GPU (DDP)
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py -c ...

Everything a run writes goes into ``cfg.out_dir`` (default ``runs/<config name>``): the resolved
``config.yaml``, ``split.json``, ``last.pt`` (every epoch), ``best.pt`` (best mean validation
Dice over the task's regions, e.g. WT/TC/ET, after the post-processing chosen on the validation
cases: ``inference/tuning.py``), ``postprocessing.json`` (those rules), ``metrics.jsonl`` (one line
per validation) and TensorBoard event files. The task (``data.task``: labels, regions, evaluation rules) is detected
from the data unless set, and stored in every checkpoint.

One epoch = ``train.iters_per_epoch`` optimizer steps on random patches; validation every
``train.val_every`` epochs (and after the last one) runs the same sliding-window inference as
``infer.py`` on whole validation cases. The learning rate is a function of the iteration, so
``--resume`` continues the schedule, epoch counter, best score and data stream exactly. On resume
the checkpoint's config is the base (``-c`` replaces it) and the run writes to the checkpoint's
folder (unless ``out_dir=`` is given); the model, modalities, loss, optimizer and
``train.iters_per_epoch`` must match the checkpoint, other keys (``train.epochs``, ...) may change.

Multi-GPU (``torchrun``): every process trains on its own patch stream (seeded by its rank) with
``data.batch_size`` patches per step, and DistributedDataParallel averages the gradients, so the
**effective batch is data.batch_size x world_size** patches per optimizer step (the learning rate
is not rescaled). Validation is sharded: rank r predicts validation cases r, r+N, ...; rank 0
gathers the per-case metrics and alone logs, prints and writes files. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from core import distributed as dist
from core.atomic import atomic_write_text, check_writable
from core.checkpoint import load_checkpoint, save_checkpoint, stored_task, unwrap_model
from core.config import ConfigError, apply_overrides, from_dict, load_config, parse_override, save_config, to_dict
from core.errors import UserError, run_cli
from core.logger import Progress, RunLogger
from core.optim import LRSchedule, apply_hyperparameters, build_optimizer
from core.task import builtin_tasks, display_channels, load_task, output_mode
from datasets.augment import Augmenter
from datasets.cache import prepare_cache
from datasets.loader import build_train_loader
from datasets.spatial import plan_strides, pooling_problem
from datasets.split import load_split, make_split, save_split
from datasets.synthetic import generate_dataset
from inference.predict import check_infer_config, predict_case
from inference.render import as_chw, dice_line, render_case
from inference.tuning import tune_case, tune_postprocessing
from losses import build_loss
from metrics import aggregate, case_metrics, means
from models import build_model, count_parameters

# keys that must equal the checkpoint's on --resume (the weights / optimizer state depend on them)
RESUME_FIXED = ("model", "data.modalities", "data.spacing", "loss.name", "train.optimizer", "train.iters_per_epoch")


class NonFiniteLoss(Exception):
    """The loss or gradient norm became NaN/inf (and ``train.skip_nonfinite`` is off)."""


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # train.time_limit counts from here
    args = parse_args(argv)
    resolve_auto_resume(args)
    resume = load_checkpoint(args.resume) if args.resume else None
    cfg = build_config(args, resume)
    check_config(cfg)
    out_dir = Path(cfg.out_dir)
    same_run = resume is not None and out_dir.resolve() == Path(args.resume).resolve().parent
    if (out_dir / "last.pt").exists() and not same_run:
        raise UserError(f"{out_dir / 'last.pt'} already exists: continue that run with --resume "
                        f"{out_dir / 'last.pt'}, or start a new one with out_dir=<another folder>")
    if resume is not None:
        check_resume(cfg, resume, args.resume)
        if resume["epoch"] >= cfg.train.epochs:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"nothing to do: {args.resume} has finished {resume['epoch']} epochs (train.epochs="
                      f"{cfg.train.epochs}); raise train.epochs to continue it")
            return 0
    check_writable(cfg.out_dir, "out_dir")  # before any long work
    check_writable(cfg.data.cache_dir, "data.cache_dir")
    info = dist.setup(cfg.train.device)
    try:
        with Interrupt() as interrupt:
            return train(cfg, info, resume, started, interrupt)
    except NonFiniteLoss as err:
        if info.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        dist.cleanup()


@dataclasses.dataclass
class Parts:
    """What a run builds from its config before the first step (``build_parts``)."""
    cache: Any  # datasets.cache.CacheIndex: preprocessed cases, their task, modalities and spacing
    split: dict  # {"train": [case ids], "val": [case ids]}
    loader: Any  # DataLoader of random patches (datasets.loader)
    augmenter: Augmenter | None  # augmentation on the training device (augment.device=train), else None
    mode: str  # output mode: "labels" or "regions" (core.task.output_mode)
    model: torch.nn.Module  # the network
    train_model: torch.nn.Module  # what the steps call: the network, wrapped by DDP and/or torch.compile
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # autocast dtype; None = fp32

    @property
    def task(self):
        return self.cache.task


@dataclasses.dataclass
class Position:
    """Where training stands: stored in every checkpoint (``checkpoint_state``), restored on resume."""
    epoch: int = 0  # completed epochs
    epoch_iter: int = 0  # steps done in the current epoch
    iteration: int = 0  # steps done in all
    best: dict = dataclasses.field(default_factory=lambda: {"dice": -1.0, "epoch": 0})  # best.pt's score
    skipped: int = 0  # non-finite steps skipped (train.skip_nonfinite)
    postprocessing: dict | None = None  # {"rules", "source"} tuned on the last validation


@dataclasses.dataclass
class Epoch:
    """One epoch's (or its stopped part's) training summary (``run_epoch``)."""
    loss: float  # mean loss of its finite steps
    lr: float  # learning rate of its last step
    steps: int
    seconds: float
    stop: str | None = None  # "time" (train.time_limit) | "interrupt" (Ctrl-C) | None


def train(cfg, info: dist.DistInfo, resume: dict | None, started: float, interrupt: "Interrupt") -> int:
    """Build the run, train epoch by epoch (validation, checkpoints), print where it ended.
    Returns the exit code: 0, or 130 when interrupted (the run can be resumed exactly)."""
    if info.device.type == "cpu" and cfg.train.cpu_threads > 0:
        torch.set_num_threads(cfg.train.cpu_threads)
    log = print if info.is_main else (lambda *a, **k: None)
    set_seeds(cfg.train.seed + info.rank, cfg.train.deterministic)
    parts = build_parts(cfg, info, resume, log)
    position, world_note = start_position(parts, cfg, info, resume)
    logger = open_run_folder(cfg, info, parts, position, resume)
    describe_run(cfg, info, parts, position, resume, world_note, logger, log)

    last_val = None  # (summary, tuning) of the last validation
    last_val_seconds, stop = 0.0, None
    interrupt.active = True  # from here a first Ctrl-C stops cleanly after the current step
    while position.epoch < cfg.train.epochs:
        epoch = run_epoch(parts, position, cfg, info, logger, started, interrupt)
        log_epoch(epoch, position, cfg, info, log)
        improved = False
        due = position.epoch % cfg.train.val_every == 0 or position.epoch >= cfg.train.epochs
        if epoch.stop != "interrupt" and (epoch.stop == "time" or due):
            log(f"validating {len(parts.split['val'])} case(s) (whole cases, sliding window"
                + (f"; about {last_val_seconds:.0f} s last time)" if last_val_seconds else ")"))
            tick = time.perf_counter()
            last_val, improved = validation_round(parts, position, cfg, info, logger, epoch, log)
            last_val_seconds = time.perf_counter() - tick
        save_training_state(cfg.out_dir, info, checkpoint_state(cfg, info, parts, position), best_too=improved)
        if epoch.stop is None and interrupt.requested:  # Ctrl-C during validation: stop after its save
            epoch.stop = "interrupt"
        if epoch.stop is not None:
            stop = epoch.stop
            break
    interrupt.active = False
    if logger is not None:
        logger.close()
    return finish(cfg, info, parts, position, last_val, stop, started, log)


def build_parts(cfg, info: dist.DistInfo, resume: dict | None, log) -> Parts:
    """Data (cases -> preprocessed cache -> split -> loader), the network (weights of ``resume``),
    its DDP/compile wrappers, the loss, optimizer, schedule and mixed precision."""
    device = info.device
    cache = prepare_data(cfg, info, log, resume)
    check_infer_config(cfg.infer, cache.task)  # post-processing sizes per training region: before any training
    if resume is not None:
        check_resume_task(cache.task, resume, cfg.out_dir)
    split = load_or_make_split(cfg, cache, resume is not None)
    check_grid(cfg, cache.spacing, {cid: cache.load(cid).geometry for cid in cache.case_ids})
    loader = build_train_loader(cache, split["train"], cfg, rank=info.rank, world_size=info.world_size,
                                device_type=device.type)
    augmenter = Augmenter(cfg.augment) if cfg.augment.device == "train" else None

    mode = output_mode(cfg.loss)
    model = build_model(cfg.model, len(cache.modalities), cache.task.output_channels(mode),
                        patch_size=cfg.data.patch_size)
    if resume is not None:
        load_weights(model, resume)
    model.to(device)
    if cfg.train.channels_last:  # faster convolutions on CUDA and on CPU (oneDNN)
        model.to(memory_format=torch.channels_last_3d)
    train_model = model
    if info.distributed:
        contiguous_pointwise_weights(model)
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    optimizer = build_optimizer(model, cfg.train, device.type)
    iters = cfg.train.iters_per_epoch
    schedule = LRSchedule(optimizer, cfg.train.schedule, cfg.train.epochs * iters, cfg.train.warmup_epochs * iters,
                          cfg.train.lr)
    amp_dtype = dist.autocast_dtype(cfg.train.precision, device)  # bf16 -> fp16 before Ampere, CPU fp32
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    return Parts(cache, split, loader, augmenter, mode, model, train_model, build_loss(cfg.loss, cache.task).to(device),
                 optimizer, schedule, scaler, amp_dtype)


def start_position(parts: Parts, cfg, info: dist.DistInfo, resume: dict | None) -> tuple[Position, str | None]:
    """A fresh ``Position``, or the checkpoint's with the optimizer, schedule, scaler and RNG
    states restored; and the note when the world size changed (``restore_rng``)."""
    if resume is None:
        return Position(), None
    parts.optimizer.load_state_dict(resume["optimizer"])
    apply_hyperparameters(parts.optimizer, cfg.train)  # weight decay / momentum overridden on resume
    parts.schedule.load_state_dict(resume["scheduler"])
    if resume.get("scaler"):
        parts.scaler.load_state_dict(resume["scaler"])
    position = Position(resume["epoch"], resume["epoch_iteration"], resume["iteration"], dict(resume["best"]),
                        resume["skipped_steps"], resume.get("postprocessing"))
    return position, restore_rng(resume["rng"], info, info.device, cfg.data.batch_size)


def open_run_folder(cfg, info: dist.DistInfo, parts: Parts, position: Position, resume: dict | None):
    """Rank 0: the run folder (written only now that every input has been checked) with
    ``config.yaml``, ``split.json`` and the ``RunLogger``; ``None`` on the other ranks."""
    logger = None
    if info.is_main:
        out_dir = Path(cfg.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        save_split(parts.split, out_dir / "split.json")
        logger = RunLogger(out_dir, purge_step=position.iteration if resume is not None else None)
        logger.text("val/legend", legend_markdown(parts.task))
    dist.barrier()
    return logger


def describe_run(cfg, info: dist.DistInfo, parts: Parts, position: Position, resume: dict | None,
                 world_note: str | None, logger, log) -> None:
    """The lines a run starts with: network, devices, batch, data, task; resume notes."""
    task, mode = parts.task, parts.mode
    log(f"{cfg.model.name}: {count_parameters(parts.model) / 1e6:.2f} M parameters | device {info.device} x "
        f"{info.world_size} | precision {precision_name(parts.amp_dtype)} | effective batch "
        f"{cfg.data.batch_size * info.world_size} ({cfg.data.batch_size} x {info.world_size} processes) | "
        f"{len(parts.split['train'])} train / {len(parts.split['val'])} val cases | spacing "
        f"{spacing_text(parts.cache.spacing)} | task {task.name} ({task.describe_labels()}; {mode} output over "
        f"{', '.join(task.class_names[1:] if mode == 'labels' else task.training_region_names)}) | out_dir "
        f"{cfg.out_dir}")
    if world_note:
        log(f"warning: {world_note}")
        if logger is not None:
            logger.text("train/notes", world_note, position.iteration)
    if resume is not None:
        best = position.best
        best_text = f"{best['dice']:.4f} (epoch {best['epoch']})" if best["dice"] >= 0 else "none yet"
        log(f"resumed at epoch {position.epoch + 1}, iteration {position.iteration} (lr "
            f"{parts.schedule.lr_at(position.iteration):.3g}, best mean Dice {best_text})")
    if cfg.data.num_workers > 0:
        log(f"starting {cfg.data.num_workers} loader worker(s) per process: the first batch takes a few seconds"
            + workers_note(cfg.data.num_workers))
    if cfg.train.compile:
        log("train.compile: the first steps compile the model (about a minute), then run faster")


def run_epoch(parts: Parts, position: Position, cfg, info: dist.DistInfo, logger, started: float,
              interrupt: "Interrupt") -> Epoch:
    """Steps until the epoch ends, ``train.time_limit`` passes or Ctrl-C: each a ``train_step``,
    then TensorBoard scalars every ``train.log_every`` steps and ``last.pt`` every
    ``train.checkpoint_every``. ``position`` advances; a finished epoch increments ``epoch``."""
    iters, effective = cfg.train.iters_per_epoch, cfg.data.batch_size * info.world_size
    parts.train_model.train()
    parts.loader.sampler.set_epoch(position.epoch, start=position.epoch_iter * cfg.data.batch_size)  # > 0: resumed
    batches = iter(parts.loader)
    bar = Progress(iters, f"epoch {position.epoch + 1}/{cfg.train.epochs}", initial=position.epoch_iter,
                   enabled=info.is_main)
    epoch_loss, epoch_steps, window_loss, window_steps = 0.0, 0, 0.0, 0
    epoch_start = tick = time.perf_counter()
    first_iter, lr, stop = position.epoch_iter, 0.0, None
    while position.epoch_iter < iters:
        lr = parts.schedule.set(position.iteration)
        step = train_step(parts, next(batches), cfg, info, position, started, interrupt)
        now = time.perf_counter()
        patches_per_s, tick = effective / max(now - tick, 1e-9), now
        if step.finite:
            epoch_loss, epoch_steps = epoch_loss + step.loss, epoch_steps + 1
            window_loss, window_steps = window_loss + step.loss, window_steps + 1
        bar.update(loss=step.loss, lr=lr, patches_per_s=patches_per_s)
        if logger is not None and (position.iteration % cfg.train.log_every == 0 or position.epoch_iter == iters):
            log_step(logger, position, lr, patches_per_s, step.grad_norm, window_loss, window_steps, info.device)
            window_loss, window_steps = 0.0, 0
        if step.stop is not None:
            stop = step.stop
            break
        if cfg.train.checkpoint_every and position.iteration % cfg.train.checkpoint_every == 0 \
                and position.epoch_iter < iters:  # mid-epoch
            save_training_state(cfg.out_dir, info, checkpoint_state(cfg, info, parts, position))
    bar.close()
    steps = position.epoch_iter - first_iter
    if position.epoch_iter == iters:
        position.epoch, position.epoch_iter = position.epoch + 1, 0
    return Epoch(epoch_loss / max(epoch_steps, 1), lr, steps, time.perf_counter() - epoch_start, stop)


@dataclasses.dataclass
class Step:
    loss: float  # mean over ranks
    grad_norm: float  # mean over ranks
    finite: bool  # the optimizer stepped (else skipped: train.skip_nonfinite)
    stop: str | None  # "interrupt" (Ctrl-C on any rank) | "time" (rank 0's train.time_limit) | None


def train_step(parts: Parts, batch: dict, cfg, info: dist.DistInfo, position: Position, started: float,
               interrupt: "Interrupt") -> Step:
    """One optimizer step on ``batch`` (``image (B, C, X, Y, Z)``, ``label (B, X, Y, Z)``):
    augmentation on the device when asked, forward under autocast, backward, gradient clipping,
    and one all-reduce that averages loss and gradient norm over the ranks and shares rank 0's
    time-limit decision and any rank's Ctrl-C. A non-finite loss skips the step
    (``train.skip_nonfinite``) or raises ``NonFiniteLoss``. Advances ``position``."""
    device = info.device
    image = batch["image"].to(device, non_blocking=True).float()  # float16 cache -> float32 on the device
    label = batch["label"].to(device, non_blocking=True).long()  # uint8 from the loader -> int64
    if parts.augmenter is not None:
        generator = torch.Generator().manual_seed(stream_seed(cfg.train.seed, info.rank, position.iteration))
        image, label = parts.augmenter(image, label, generator)
    if cfg.train.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)

    with torch.autocast(device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
        loss = parts.loss_fn(parts.train_model(image), label)
    scaler, optimizer = parts.scaler, parts.optimizer
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), max_norm)
    out_of_time = info.is_main and cfg.train.time_limit > 0 and time.perf_counter() - started > 60 * cfg.train.time_limit
    stats = dist.all_reduce_sum(torch.stack([loss.detach().float(), grad_norm.detach().float(),
                                             torch.full((), float(out_of_time), device=device),
                                             torch.full((), float(interrupt.requested), device=device)]))
    loss_sum, grad_sum, stop_votes, interrupt_votes = stats.tolist()
    loss_value, grad_value = loss_sum / info.world_size, grad_sum / info.world_size
    finite = math.isfinite(loss_value) and (scaler.is_enabled() or math.isfinite(grad_value))
    if finite:
        scaler.step(optimizer)
    elif cfg.train.skip_nonfinite:
        position.skipped += 1
    else:
        what = f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradient norm ({grad_value})"
        raise NonFiniteLoss(
            f"non-finite {what} at iteration {position.iteration + 1} (epoch {position.epoch + 1}); stopped without "
            f"saving this step (last.pt holds the last completed epoch). Try a lower train.lr, "
            f"train.precision=fp32, or train.skip_nonfinite=true")
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    position.iteration += 1
    position.epoch_iter += 1
    stop = "interrupt" if interrupt_votes > 0 else "time" if stop_votes > 0 else None
    return Step(loss_value, grad_value, finite, stop)


def log_step(logger, position: Position, lr: float, patches_per_s: float, grad_norm: float, window_loss: float,
             window_steps: int, device: torch.device) -> None:
    """TensorBoard scalars of the steps since the last write (``train.log_every``)."""
    scalars = {"train/lr": lr, "train/patches_per_s": patches_per_s, "train/grad_norm": grad_norm,
               "train/skipped_steps": position.skipped}
    if window_steps:
        scalars["train/loss"] = window_loss / window_steps
    if device.type == "cuda":
        scalars["train/gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)  # the next value: the peak of its own window
    logger.scalars(scalars, position.iteration)


def log_epoch(epoch: Epoch, position: Position, cfg, info: dist.DistInfo, log) -> None:
    finished = position.epoch_iter == 0
    shown = position.epoch if finished else position.epoch + 1
    effective = cfg.data.batch_size * info.world_size
    log(f"epoch {shown}/{cfg.train.epochs}{'' if finished else ' (stopped early)'}"
        f" | loss {epoch.loss:.4f} | lr {epoch.lr:.3g} | {epoch.steps / epoch.seconds:.2f} it/s, "
        f"{epoch.steps * effective / epoch.seconds:.1f} patches/s | {epoch.seconds:.0f} s"
        + (f" | skipped {position.skipped} non-finite steps" if position.skipped else ""))
    if epoch.stop == "interrupt":
        log(f"interrupted (Ctrl-C) after iteration {position.iteration}: saving last.pt there and stopping")
    elif epoch.stop == "time":
        log(f"train.time_limit of {cfg.train.time_limit:g} min reached after iteration {position.iteration}: "
            f"validating, saving and stopping")


def validation_round(parts: Parts, position: Position, cfg, info: dist.DistInfo, logger, epoch: Epoch, log):
    """Validate (sharded over ranks), tune post-processing on the same predictions (all ranks),
    and on rank 0 update the best score (``postprocessing.json`` with it), log and print.
    Returns ``((summary, tuning), improved)``; ``summary`` is ``None`` off rank 0."""
    task, out_dir = parts.task, Path(cfg.out_dir)
    tick = time.perf_counter()
    per_case, panel, predictions = validate(parts.model, parts.cache, parts.split["val"], cfg, parts.mode, info,
                                            display_channels(parts.cache.modalities))
    tuning = None
    if cfg.train.tune_postprocessing:  # on this validation's predictions: no second pass
        tuning = tune_postprocessing(predictions, task, cfg.metrics.convention,
                                     reduce=lambda v: dist.all_reduce_sum(torch.as_tensor(
                                         v, device=info.device)).cpu().numpy())
        position.postprocessing = {"rules": tuning.rules.to_dict(), "source": tuning.source(
            cfg.metrics.convention, f"of {out_dir} at epoch {position.epoch}")}
    if not info.is_main:
        return (None, tuning), False
    summary = means(aggregate(per_case))
    mean_dice = float(np.mean([summary[r]["dice"] for r in task.region_names]))
    score = tuning.after if tuning is not None else mean_dice  # best.pt: post-processed when tuned
    improved = score > position.best["dice"]
    if improved:
        position.best = {"dice": score, "epoch": position.epoch}
        if tuning is not None:
            atomic_write_text(out_dir / "postprocessing.json", json.dumps(position.postprocessing, indent=1))
    log_validation(logger, summary, mean_dice, tuning, position, len(per_case), panel, epoch)
    best = position.best
    log("validation Dice | " + " | ".join(f"{r} {summary[r]['dice']:.4f}" for r in task.region_names)
        + f" | mean {mean_dice:.4f}"
        + (f" | post-processed mean {tuning.after:.4f} ({tuning.rules.describe(task)})" if tuning else "")
        + f" | best {best['dice']:.4f} (epoch {best['epoch']}) | {len(per_case)} cases, "
        f"{time.perf_counter() - tick:.0f} s")
    return (summary, tuning), improved


def finish(cfg, info: dist.DistInfo, parts: Parts, position: Position, last_val, stop: str | None, started: float,
           log) -> int:
    """The closing lines: replicas in sync, the final validation, and what to run next."""
    if info.distributed:
        log(check_replicas(parts.model, info))
    regions = parts.task.region_names
    if last_val is not None and last_val[0] is not None:
        summary, tuning = last_val
        best = position.best
        log("final validation Dice: " + ", ".join(f"{r} {summary[r]['dice']:.4f}" for r in regions)
            + ("; post-processed: " + ", ".join(f"{r} {tuning.regions_after[r]:.4f}" for r in regions)
               if tuning is not None else "")
            + f" (best {'post-processed ' if cfg.train.tune_postprocessing else ''}mean {best['dice']:.4f} "
            f"at epoch {best['epoch']})")
    out_dir = Path(cfg.out_dir)
    resume_command = shell_command("python", "train.py", "--resume", out_dir / "last.pt")
    if stop == "interrupt":
        log(f"interrupted: {out_dir / 'last.pt'} holds iteration {position.iteration}; continue exactly with: "
            f"{resume_command}")
        return 130
    if position.epoch < cfg.train.epochs:
        log(f"stopped by train.time_limit; continue with: {resume_command}")
    else:
        infer_command = shell_command("python", "infer.py", "--checkpoint", out_dir / "best.pt", "-i", cfg.data.root,
                                      "-o", Path("predictions") / out_dir.name, "--cases",
                                      f"{out_dir / 'split.json'}:val")
        log(f"done in {(time.perf_counter() - started) / 60:.1f} min: {out_dir / 'best.pt'} and "
            f"{out_dir / 'last.pt'} written. Next, the validation cases (the ones the Dice above is of):\n"
            f"  {infer_command}")
    return 0


# ==============================================================================================
# Helpers, in the order train() uses them.
# ==============================================================================================
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="YAML config (optional with --resume: the checkpoint's config is used)")
    parser.add_argument("--resume", help="checkpoint to continue (e.g. runs/demo/last.pt), or auto: out_dir/last.pt "
                                         "when it exists (a resubmitted or restarted job), else a fresh run")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=5")
    args = parser.parse_intermixed_args(argv)
    if args.config is None and args.resume is None:
        parser.error("give a config (-c CONFIG) or a checkpoint to resume (--resume CKPT)")
    if args.resume == "auto" and args.config is None:
        parser.error("--resume auto needs the config (-c CONFIG): it resumes <out_dir>/last.pt")
    return args


def resolve_auto_resume(args: argparse.Namespace) -> None:
    """``--resume auto``: ``<out_dir>/last.pt`` of the config when it exists, else no resume."""
    if args.resume != "auto":
        return
    last = Path(load_config(args.config, args.overrides).out_dir) / "last.pt"
    args.resume = str(last) if last.is_file() else None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"--resume auto: {'resuming ' + str(last) if args.resume else 'no ' + str(last) + ', starting fresh'}")


def build_config(args: argparse.Namespace, resume: dict | None):
    """YAML + overrides; on ``--resume`` without ``-c``, the checkpoint's config + overrides.
    A resumed run writes to the checkpoint's folder unless ``out_dir=`` is overridden."""
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg = from_dict(apply_overrides(copy.deepcopy(resume["config"]), args.overrides))
    if resume is not None and not any(parse_override(o)[0] == "out_dir" for o in args.overrides):
        cfg.out_dir = str(Path(args.resume).parent)
    return cfg


def check_config(cfg) -> None:
    """What the config's own validation cannot know: with a named task, that data.modalities and
    the infer.* post-processing keys fit it (``ConfigError`` / ``TaskError``, one line). With
    ``data.task: auto`` the same is checked once the task is detected (``train``)."""
    d = cfg.data
    if d.task != "auto":
        task = load_task(d.task)
        task.select_modalities(d.modalities)  # TaskError naming data.task / data.modalities
        check_infer_config(cfg.infer, task)
    if d.synthetic_cases > 0 and d.synthetic_task not in ("auto", *builtin_tasks()):
        raise ConfigError(f"data.synthetic_task: {d.synthetic_task!r} must be auto or a built-in task "
                          f"({', '.join(builtin_tasks())})")


def synthetic_task(d) -> str:
    """The task of the cases ``data.synthetic_cases`` generates: ``data.synthetic_task``, with
    ``auto`` the training task ``data.task`` when it is a built-in one, else ``brats-gli-2021``."""
    if d.synthetic_task != "auto":
        return d.synthetic_task
    return d.task if d.task in builtin_tasks() else "brats-gli-2021"


def check_resume_task(task, state: dict, out_dir: str) -> None:
    """The data must be of the checkpoint's task (or a naming variant of it, e.g. 2021 <-> 2023)."""
    trained = stored_task(state, out_dir)
    if not trained.compatible_with(task):
        raise UserError(f"{out_dir}: the checkpoint was trained on task {trained.name} ({trained.describe_labels()}) "
                        f"but the data is task {task.name} ({task.describe_labels()}); a resumed run keeps its task")


def check_resume(cfg, state: dict, path: str) -> None:
    """The checkpoint must hold training state and match the config where weights depend on it."""
    missing = [k for k in ("optimizer", "scheduler", "iteration", "epoch", "rng") if k not in state]
    if missing:
        raise UserError(f"{path}: not a training checkpoint (missing {', '.join(missing)}); cannot resume from it")
    try:
        ours, theirs = to_dict(cfg), to_dict(from_dict(copy.deepcopy(state["config"])))  # with today's defaults
    except ConfigError as err:
        raise UserError(f"{path}: stored config is invalid ({err})") from None
    for key in RESUME_FIXED:
        a, b = _lookup(ours, key), _lookup(theirs, key)
        if a != b:
            where = _first_difference(a, b, key)
            raise UserError(f"{path}: {where[0]} is {where[2]!r} in the checkpoint but {where[1]!r} now; "
                            f"a resumed run must keep {key}")


def _lookup(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _first_difference(a, b, key: str):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{key}.{k}")
    return key, a, b


class Interrupt:
    """Ctrl-C (SIGINT) during the training loop (``active``): the first one asks the loop to stop
    after the current step (``requested``) and save ``last.pt`` there, so ``--resume`` continues
    exactly; a second one, or one outside the loop, stops at once (``KeyboardInterrupt``)."""

    def __init__(self):
        self.active = self.requested = False
        self.previous = None

    def __enter__(self) -> "Interrupt":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        if not self.active or self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving last.pt and stopping (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)


def shell_command(*words) -> str:
    """A command line to copy and paste: each word shell-quoted (paths with spaces stay one word)."""
    return " ".join(shlex.quote(str(w)) for w in words)


def workers_note(workers: int) -> str:
    """A note when ``data.num_workers`` exceeds the CPU cores this process may use (said once, here;
    torch's own warning about it is silenced)."""
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers <= cores:
        return ""
    return (f"; note: data.num_workers={workers} but this machine gives this process {cores} CPU core(s): "
            f"the workers share them (lower data.num_workers, or augment on the GPU with augment.device=train)")


def set_seeds(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def stream_seed(seed: int, rank: int, iteration: int) -> int:
    """Seed of the on-device augmentation of one step: a function of (seed, rank, iteration)."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1, np.uint64)[0] >> 1)


def prepare_data(cfg, info: dist.DistInfo, log, resume: dict | None = None):
    """Generate the synthetic dataset if asked and missing (rank 0), then build the cache (the first
    process of each node).
    A resumed run keeps the grid it was trained on (``data.spacing: auto`` is not planned again)."""
    root = Path(cfg.data.root)
    if not root.exists() and cfg.data.synthetic_cases == 0:
        raise UserError(f"{root}: data folder not found; set data.root=/path/to/BraTS (a folder of case folders)")
    # rank 0 decides (the others could see the folder it is creating) and tells the others
    if dist.broadcast_object(not root.exists() and cfg.data.synthetic_cases > 0):
        if info.is_main:
            log(f"{root} does not exist: generating {cfg.data.synthetic_cases} synthetic cases of task "
                f"{synthetic_task(cfg.data)}, shape {'x'.join(map(str, cfg.data.synthetic_shape))}, there "
                "(data.synthetic_cases)")
            generate_dataset(root, cfg.data.synthetic_cases, seed=cfg.data.seed,
                             task=synthetic_task(cfg.data), shape=tuple(cfg.data.synthetic_shape),
                             workers=max(1, cfg.data.cache_workers))
        dist.barrier()
    data_cfg = cfg.data
    if resume is not None:
        data_cfg = dataclasses.replace(cfg.data, spacing=list(resume["spacing"]) if resume.get("spacing") else None)
    # the first process of every node builds that node's cache (a node-local data.cache_dir); on a
    # shared cache the builders share the work case by case (per-case locks); the others wait
    builder = info.local_rank == 0
    cache = None
    if builder:
        log(f"reading the cases of {root} (names, label values, spacings) and preparing the cache in "
            f"{data_cfg.cache_dir}")
        cache = prepare_cache(data_cfg, show_progress=info.is_main)
    dist.barrier()
    if not builder:
        cache = prepare_cache(data_cfg, show_progress=False)
    if len(cache.case_ids) < 2:
        raise UserError(f"{cfg.data.root}: {len(cache.case_ids)} labelled case(s); training needs at least 2 "
                        "(one to train on, one to validate)")
    return cache


def load_or_make_split(cfg, cache, resuming: bool) -> dict[str, list[str]]:
    """A resumed run keeps its ``split.json``; otherwise ``make_split`` (k-fold or data.split_file)."""
    path = Path(cfg.out_dir) / "split.json"
    if resuming and path.is_file():
        split = load_split(path, cache.case_ids)
    else:
        split = make_split(cache.case_ids, cfg.data)
    for part in ("train", "val"):
        if not split.get(part):
            raise UserError(f"{path if resuming else cfg.data.split_file or 'data.folds'}: the split has no "
                            f"{part} cases")
    return split


def check_grid(cfg, spacing, geometries: dict) -> None:
    """The patch and the network must fit the model grid (``UserError`` saying what would work):
    the patch no larger than every case, and (unet3d) no axis pooled while it is more than twice
    as coarse as the finest one (thick slices; nnU-Net plans strides per axis the same way)."""
    patch = list(cfg.data.patch_size)
    shapes = {cid: g.model_full_shape for cid, g in geometries.items()}
    if not any(all(p <= s for p, s in zip(patch, shape)) for shape in shapes.values()):
        largest = max(shapes.values(), key=math.prod)
        raise UserError(f"data.patch_size {patch} is larger than every case (largest case "
                        f"{'x'.join(map(str, largest))} at spacing {spacing_text(spacing)}); choose a smaller patch")
    if cfg.model.name != "unet3d":
        return
    grid = spacing or tuple(np.median([g.model_spacing for g in geometries.values()], axis=0))
    strides = cfg.model.unet3d.strides
    problem = pooling_problem(strides, grid)
    if problem is not None:
        planned = plan_strides(grid, len(strides))
        suggestion = suggest_patch(patch, grid, planned, shapes.values())
        raise UserError(f"model.unet3d.strides: {problem} (spacing {spacing_text(grid)}); for this spacing use "
                        f"model.unet3d.strides={compact(planned)} data.patch_size={suggestion}")


def suggest_patch(patch, spacing, strides, shapes) -> list[int]:
    """A patch of about ``patch``'s voxel count covering about the same mm along each axis,
    each size a multiple of the strides' product along its axis and within the median case."""
    divisor = [math.prod(s[axis] for s in strides) for axis in range(3)]
    median = np.median(np.asarray(list(shapes)), axis=0)
    extent = [1.0 / s for s in spacing]
    scale = (math.prod(patch) / math.prod(extent)) ** (1 / 3)
    out = []
    for e, d, m in zip(extent, divisor, median):
        size = max(d, int(round(scale * e / d)) * d)
        out.append(int(min(size, max(d, int(m) // d * d))))
    return out


def compact(strides) -> list:
    """``[[1, 1, 1], [2, 2, 1]]`` -> ``[1, [2, 2, 1]]`` (one int where all axes agree)."""
    return [s[0] if len(set(s)) == 1 else list(s) for s in strides]


def spacing_text(spacing) -> str:
    return "original (not resampled)" if spacing is None else "x".join(f"{s:g}" for s in spacing) + " mm"


def load_weights(model: torch.nn.Module, state: dict) -> None:
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:200]
        raise UserError(f"checkpoint weights do not fit the model ({first})") from None


def contiguous_pointwise_weights(model: torch.nn.Module) -> None:
    """Give every parameter whose spatial sizes are all 1 (1x1x1 convolution weights, (C_out, C_in,
    1, 1, 1)) plain contiguous strides. After ``channels_last_3d`` they read (C_in, 1, C_in, C_in,
    C_in): the same memory, but DDP compares the gradient's strides with its bucket's literally and
    warns "Grad strides do not match bucket view strides" on every run."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 2 and all(size == 1 for size in param.shape[2:]):
                param.data = param.data.clone(memory_format=torch.contiguous_format)


def precision_name(dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


def legend_markdown(task) -> str:
    """The colour legend of the image panels, as a Markdown table."""
    rows = [f"| {name} | {value} | rgb{tuple(rgb)} |"
            for name, value, rgb in zip(task.class_names[1:], task.label_values[1:], task.colours[1:])]
    return "\n".join([f"Task {task.name}: overlay colours", "", "| label | value | colour |", "|---|---|---|"] + rows)


def validate(model, cache, case_ids: list[str], cfg, mode: str, info: dist.DistInfo, channels):
    """Sliding-window prediction of whole cached validation cases, sharded over ranks.

    Returns (on rank 0) ``{case_id: case_metrics(...)}`` of all cases and the picture of the
    first case (``validation_panel``), on other ranks ``({}, None)``; and on every rank its own
    cases for post-processing tuning (``tune_case``; none without ``train.tune_postprocessing``).
    """
    net = unwrap_model(model)  # predict_case puts it in eval mode and back
    infer_cfg = dataclasses.replace(cfg.infer, tta=False)
    window = tuple(cfg.data.patch_size)
    results, panel, predictions = {}, None, []
    for i, case_id in enumerate(case_ids[info.rank::info.world_size]):
        case = cache.load(case_id)
        images = torch.from_numpy(np.array(case.images, dtype=np.float32))  # a copy of the memory map
        probs = predict_case([net], images, infer_cfg, window, mode, info.device)
        pred = cache.task.decode(probs, mode, cfg.infer.region_threshold).cpu().numpy()
        ref = np.asarray(case.classes)
        results[case_id] = case_metrics(pred, ref, case.geometry.model_spacing, cache.task,
                                        convention=cfg.metrics.convention, hd95=cfg.train.val_hd95)
        if cfg.train.tune_postprocessing:  # cropped to the tumour: validation does not hold every case
            predictions.append(tune_case(pred, ref, case.geometry.model_spacing, cache.task))
        if info.is_main and i == 0:
            panel = validation_panel(case_id, case, pred, ref, channels[0], cache.task, results[case_id])
    merged = {}
    for part in dist.all_gather_objects(results):
        merged.update(part)
    return (merged, panel, predictions) if info.is_main else ({}, None, predictions)


def validation_panel(case_id: str, case, pred: np.ndarray, ref: np.ndarray, channel: int, task,
                     metrics: dict) -> np.ndarray:
    """The TensorBoard picture ``val/panel`` of a cached validation case, ``(3, H, W)`` floats in
    ``[0, 1]``: what ``infer.py --png`` draws (``inference.render``), of image channel ``channel``
    (FLAIR, else the first display channel), prediction and reference rows and the case's Dice
    line. The cached arrays are on the model grid: canonical voxel axes at ``model_spacing``."""
    picture = render_case(np.asarray(case.images[channel], dtype=np.float32), pred, ref, case.geometry.model_affine,
                          task, case_id,
                          subtitle=dice_line(metrics, task))
    return as_chw(picture)


def log_validation(logger, summary: dict, mean_dice: float, tuning, position: Position, cases: int, panel,
                   epoch: Epoch) -> None:
    """One ``metrics.jsonl`` line and the TensorBoard scalars (and panel) of a validation."""
    scalars = {f"val/dice_{r}": summary[r]["dice"] for r in summary}
    scalars.update({f"val/hd95_{r}": summary[r]["hd95"] for r in summary if "hd95" in summary[r]})
    scalars.update({"val/dice_mean": mean_dice, "train/epoch_loss": epoch.loss})
    record = {"epoch": position.epoch, "iteration": position.iteration, "time": time.time(), "lr": epoch.lr,
              "train_loss": epoch.loss, "val": summary, "mean_dice": mean_dice, "best_dice": position.best["dice"],
              "best_epoch": position.best["epoch"], "cases": cases}
    if tuning is not None:
        scalars["val/dice_mean_postprocessed"] = tuning.after
        scalars.update({f"val/dice_{r}_postprocessed": dice for r, dice in tuning.regions_after.items()})
        record["postprocessing"] = {"rules": tuning.rules.to_dict(), "mean_dice": tuning.after,
                                    "dice": tuning.regions_after}
    logger.validation(record, scalars, position.iteration)
    if panel is not None:
        logger.image("val/panel", panel, position.iteration)


def checkpoint_state(cfg, info: dist.DistInfo, parts: Parts, position: Position) -> dict:
    """What a checkpoint holds (``core/checkpoint.py``): the resolved config, the task, modalities,
    spacing and output mode (what inference needs), the weights, optimizer, schedule and scaler
    states, the ``Position``, every rank's RNG states (gathered: all ranks call this) and the
    post-processing tuned on the last validation (infer.py applies it by default)."""
    rng = dist.all_gather_objects(rng_state(info.device))
    cache = parts.cache
    return {
        "config": to_dict(cfg), "task": cache.task.to_dict(), "modalities": list(cache.modalities),
        "spacing": list(cache.spacing) if cache.spacing else None, "output_mode": parts.mode,
        "model": unwrap_model(parts.model).state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.schedule.state_dict(), "scaler": parts.scaler.state_dict(),
        "epoch": position.epoch, "epoch_iteration": position.epoch_iter, "iteration": position.iteration,
        "best": position.best, "skipped_steps": position.skipped, "rng": rng, "world_size": info.world_size,
        "postprocessing": position.postprocessing,
    }


def save_training_state(out_dir: str | Path, info: dist.DistInfo, state: dict, best_too: bool = False) -> None:
    """Rank 0: write ``last.pt`` (and ``best.pt``) atomically, so the previous file stays until the
    new one is complete; every rank waits for it."""
    if info.is_main:
        save_checkpoint(state, Path(out_dir) / "last.pt")
        if best_too:
            save_checkpoint(state, Path(out_dir) / "best.pt")
    dist.barrier()


def check_replicas(model, info: dist.DistInfo) -> str:
    """DDP keeps every process's parameters identical; a checksum per rank confirms it (a line to log)."""
    with torch.no_grad():
        total = sum(p.double().sum().item() + p.double().abs().sum().item() for p in unwrap_model(model).parameters())
    sums = dist.all_gather_objects(total)
    if all(s == sums[0] for s in sums):
        return f"parameters identical on all {info.world_size} processes (checksum {sums[0]:.10g})"
    return f"warning: the processes' parameters differ (checksums {sums}): the replicas went out of sync"


def rng_state(device: torch.device) -> dict:
    """This process's RNG states as tensors and plain types (``weights_only``-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def restore_rng(states: list[dict], info: dist.DistInfo, device: torch.device, batch_size: int) -> str | None:
    """Restore this rank's RNG states. With another world size than the checkpoint's that is not
    possible: the fresh seeds are kept and the returned note says what changes (to be logged)."""
    if len(states) != info.world_size:
        return (f"resumed with {info.world_size} process(es) instead of {len(states)}: the run continues but is not "
                f"the uninterrupted one: each process draws its patches from the fresh seeds of its rank (not the "
                f"saved random states), and the effective batch is now {batch_size * info.world_size} patches per "
                f"step instead of {batch_size * len(states)} (the learning-rate schedule is unchanged)")
    s = states[info.rank]
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and s["cuda"] is not None:
        torch.cuda.set_rng_state(s["cuda"], device)
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    return None


if __name__ == "__main__":
    run_cli(main, exit_with=dist.exit_process)  # a torchrun worker skips interpreter shutdown
