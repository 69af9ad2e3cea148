"""Train a BraTS segmentation network from a YAML config.

    python train.py -c configs/demo.yaml [key=value ...]        # e.g. train.epochs=5 data.root=/data/brats
    python train.py --resume runs/demo/last.pt [key=value ...]  # continue exactly (e.g. train.epochs=60 to extend)
    python train.py -c configs/unet3d.yaml --resume auto        # resume out_dir/last.pt if it exists, else start
    torchrun --nproc_per_node=4 train.py -c configs/unet3d.yaml # one process per GPU (DDP)
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py -c ...

Everything a run writes goes into ``cfg.out_dir`` (default ``runs/<config name>``): the resolved
``config.yaml``, ``split.json``, ``last.pt`` (every epoch), ``best.pt`` (best mean validation
Dice over the task's regions, e.g. WT/TC/ET, after the post-processing chosen on the validation
cases: ``engine/tuning.py``), ``postprocessing.json`` (those rules), ``metrics.jsonl`` (one line
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

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from datasets.augment import Augmenter
from datasets.cache import prepare_cache
from datasets.loader import build_train_loader
from datasets.spatial import plan_strides, pooling_problem
from datasets.split import load_split, make_split, save_split
from datasets.synthetic import generate_dataset
from engine import distributed as dist
from engine.atomic import atomic_write_text, check_writable
from engine.checkpoint import load_checkpoint, save_checkpoint, stored_task, unwrap_model
from engine.config import ConfigError, apply_overrides, from_dict, load_config, parse_override, save_config, to_dict
from engine.errors import UserError, run_cli
from engine.logger import Progress, RunLogger
from engine.optim import LRSchedule, apply_hyperparameters, build_optimizer
from engine.predict import predict_case
from engine.render import as_chw, dice_line, render_case
from engine.task import builtin_tasks, display_channels, load_task
from engine.tuning import tune_case, tune_postprocessing
from losses import build_loss, output_mode
from metrics import aggregate, case_metrics, means
from models import build_model, count_parameters

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
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


def train(cfg, info: dist.DistInfo, resume: dict | None, started: float, interrupt: "Interrupt") -> int:
    device, is_main = info.device, info.is_main
    if device.type == "cpu" and cfg.train.cpu_threads > 0:
        torch.set_num_threads(cfg.train.cpu_threads)
    log = print if is_main else (lambda *a, **k: None)
    set_seeds(cfg.train.seed + info.rank, cfg.train.deterministic)
    out_dir = Path(cfg.out_dir)

    # ---------------- data: (synthetic) cases -> preprocessed cache -> split -> loader ----------------
    cache = prepare_data(cfg, info, log, resume)
    task = cache.task
    if resume is not None:
        check_resume_task(task, resume, cfg.out_dir)
    split = load_or_make_split(cfg, cache, resume is not None)
    geometries = {cid: cache.load(cid).geometry for cid in cache.case_ids}
    check_grid(cfg, cache.spacing, geometries)
    loader = build_train_loader(cache, split["train"], cfg, rank=info.rank, world_size=info.world_size,
                                device_type=device.type)
    augmenter = Augmenter(cfg.augment) if cfg.augment.device == "train" else None

    # ---------------- model, loss, optimizer, schedule, mixed precision ----------------
    mode = output_mode(cfg.loss)
    model = build_model(cfg.model, len(cache.modalities), task.output_channels(mode),
                        patch_size=cfg.data.patch_size)
    if resume is not None:
        load_weights(model, resume)
    model.to(device)
    channels_last = cfg.train.channels_last  # faster convolutions on CUDA and on CPU (oneDNN)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    train_model = model
    if info.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    loss_fn = build_loss(cfg.loss, task).to(device)
    optimizer = build_optimizer(model, cfg.train, device.type)
    iters = cfg.train.iters_per_epoch
    total_iters = cfg.train.epochs * iters
    schedule = LRSchedule(optimizer, cfg.train.schedule, total_iters, cfg.train.warmup_epochs * iters, cfg.train.lr)
    amp_dtype = dist.autocast_dtype(AMP_DTYPES[cfg.train.precision], device)  # bf16 -> fp16 before Ampere, CPU fp32
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    # ---------------- where we start: fresh or resumed ----------------
    epoch, epoch_iter, iteration, best, skipped = 0, 0, 0, {"dice": -1.0, "epoch": 0}, 0
    world_note = None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        apply_hyperparameters(optimizer, cfg.train)  # weight decay / momentum overridden on resume
        schedule.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        epoch, epoch_iter, iteration = resume["epoch"], resume["epoch_iteration"], resume["iteration"]
        best, skipped = dict(resume["best"]), resume["skipped_steps"]
        world_note = restore_rng(resume["rng"], info, device, cfg.data.batch_size)
    # ---------------- run folder (written only now that every input has been checked) ----------------
    logger = None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        save_split(split, out_dir / "split.json")
        logger = RunLogger(out_dir, purge_step=iteration if resume is not None else None)
        logger.text("val/legend", legend_markdown(task))
    dist.barrier()
    effective = cfg.data.batch_size * info.world_size
    log(f"{cfg.model.name}: {count_parameters(model) / 1e6:.2f} M parameters | device {device} x "
        f"{info.world_size} | precision {precision_name(amp_dtype)} | effective batch {effective} "
        f"({cfg.data.batch_size} x {info.world_size} processes) | {len(split['train'])} train / "
        f"{len(split['val'])} val cases | spacing {spacing_text(cache.spacing)} | task {task.name} ({task.describe_labels()}; {mode} output over "
        f"{', '.join(task.class_names[1:] if mode == 'labels' else task.training_region_names)}) | out_dir {out_dir}")
    if resume is not None and world_note:
        log(f"warning: {world_note}")
        if logger is not None:
            logger.text("train/notes", world_note, iteration)
    if resume is not None:
        best_text = f"{best['dice']:.4f} (epoch {best['epoch']})" if best["dice"] >= 0 else "none yet"
        log(f"resumed at epoch {epoch + 1}, iteration {iteration} (lr {schedule.lr_at(iteration):.3g}, "
            f"best mean Dice {best_text})")

    # ---------------- the loop ----------------
    channels = display_channels(cache.modalities)
    regions = task.region_names
    stop = interrupted = False
    last_val, last_val_seconds, last_tuning = None, 0.0, None
    postprocessing = resume.get("postprocessing") if resume is not None else None  # the rules of the last validation
    if cfg.data.num_workers > 0:
        log(f"starting {cfg.data.num_workers} loader worker(s) per process: the first batch takes a few seconds"
            + workers_note(cfg.data.num_workers))
    if cfg.train.compile:
        log("train.compile: the first steps compile the model (about a minute), then run faster")
    interrupt.active = True  # from here a first Ctrl-C stops cleanly after the current step
    while epoch < cfg.train.epochs and not stop:
        train_model.train()
        loader.sampler.set_epoch(epoch, start=epoch_iter * cfg.data.batch_size)  # start > 0: resumed mid-epoch
        batches = iter(loader)
        bar = Progress(iters, f"epoch {epoch + 1}/{cfg.train.epochs}", initial=epoch_iter, enabled=is_main)
        epoch_loss, epoch_steps, window_loss, window_steps = 0.0, 0, 0.0, 0
        epoch_start = tick = time.perf_counter()
        first_iter = epoch_iter
        while epoch_iter < iters:
            lr = schedule.set(iteration)
            batch = next(batches)
            image = batch["image"].to(device, non_blocking=True).float()  # float16 cache -> float32 on the device
            label = batch["label"].to(device, non_blocking=True).long()  # uint8 from the loader -> int64
            if augmenter is not None:
                generator = torch.Generator().manual_seed(stream_seed(cfg.train.seed, info.rank, iteration))
                image, label = augmenter(image, label, generator)
            if channels_last:
                image = image.contiguous(memory_format=torch.channels_last_3d)

            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(train_model(image), label)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            # one sync per step: mean loss over ranks, grad norm, rank 0's time-limit decision, Ctrl-C anywhere
            out_of_time = is_main and cfg.train.time_limit > 0 and \
                time.perf_counter() - started > 60 * cfg.train.time_limit
            stats = dist.all_reduce_sum(torch.stack([loss.detach().float(), grad_norm.detach().float(),
                                                     torch.full((), float(out_of_time), device=device),
                                                     torch.full((), float(interrupt.requested), device=device)]))
            loss_sum, grad_sum, stop_votes, interrupt_votes = stats.tolist()
            loss_value, grad_value = loss_sum / info.world_size, grad_sum / info.world_size
            finite = math.isfinite(loss_value) and (scaler.is_enabled() or math.isfinite(grad_value))
            if finite:
                scaler.step(optimizer)
            elif cfg.train.skip_nonfinite:
                skipped += 1
            else:
                what = f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradient norm ({grad_value})"
                raise NonFiniteLoss(
                    f"non-finite {what} at iteration {iteration + 1} (epoch {epoch + 1}); stopped without saving "
                    f"this step (last.pt holds the last completed epoch). Try a lower train.lr, "
                    f"train.precision=fp32, or train.skip_nonfinite=true")
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iteration += 1
            epoch_iter += 1

            now = time.perf_counter()
            patches_per_s = effective / max(now - tick, 1e-9)
            tick = now
            if finite:
                epoch_loss, epoch_steps = epoch_loss + loss_value, epoch_steps + 1
                window_loss, window_steps = window_loss + loss_value, window_steps + 1
            bar.update(loss=loss_value, lr=lr, patches_per_s=patches_per_s)
            if logger is not None and (iteration % cfg.train.log_every == 0 or epoch_iter == iters):
                scalars = {"train/lr": lr, "train/patches_per_s": patches_per_s, "train/grad_norm": grad_value,
                           "train/skipped_steps": skipped}
                if window_steps:
                    scalars["train/loss"] = window_loss / window_steps
                if device.type == "cuda":
                    scalars["train/gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    torch.cuda.reset_peak_memory_stats(device)  # the next value: the peak of its own window
                logger.scalars(scalars, iteration)
                window_loss, window_steps = 0.0, 0
            if stop_votes > 0 or interrupt_votes > 0:
                stop, interrupted = True, interrupt_votes > 0
                break
            if cfg.train.checkpoint_every and iteration % cfg.train.checkpoint_every == 0 and epoch_iter < iters:
                save_training_state(out_dir, info, cfg, cache, mode, model, optimizer, schedule, scaler,
                                    counters(epoch, epoch_iter, iteration, best, skipped),
                                    postprocessing=postprocessing)  # mid-epoch
        bar.close()

        steps_done = epoch_iter - first_iter
        finished = epoch_iter == iters
        if finished:
            epoch, epoch_iter = epoch + 1, 0
        seconds = time.perf_counter() - epoch_start
        train_loss = epoch_loss / max(epoch_steps, 1)
        log(f"epoch {epoch if finished else epoch + 1}/{cfg.train.epochs}{'' if finished else ' (stopped early)'}"
            f" | loss {train_loss:.4f} | lr {lr:.3g} | {steps_done / seconds:.2f} it/s, "
            f"{steps_done * effective / seconds:.1f} patches/s | {seconds:.0f} s"
            + (f" | skipped {skipped} non-finite steps" if skipped else ""))
        if interrupted:
            log(f"interrupted (Ctrl-C) after iteration {iteration}: saving last.pt there and stopping")
        elif stop:
            log(f"train.time_limit of {cfg.train.time_limit:g} min reached after iteration {iteration}: "
                f"validating, saving and stopping")

        # ---------------- validation (sharded over ranks), best.pt, last.pt ----------------
        improved = False
        if not interrupted and (stop or epoch % cfg.train.val_every == 0 or epoch >= cfg.train.epochs):
            log(f"validating {len(split['val'])} case(s) (whole cases, sliding window"
                + (f"; about {last_val_seconds:.0f} s last time)" if last_val_seconds else ")"))
            val_start = time.perf_counter()
            per_case, panel, predictions = validate(model, cache, split["val"], cfg, mode, info, channels)
            tuning = last_tuning = None
            if cfg.train.tune_postprocessing:  # on this validation's predictions: no second pass (all ranks)
                tuning = tune_postprocessing(predictions, task, cfg.metrics.convention,
                                             reduce=lambda v: dist.all_reduce_sum(torch.as_tensor(
                                                 v, device=device)).cpu().numpy())
                last_tuning = tuning
                postprocessing = {"rules": tuning.rules.to_dict(),
                                  "source": tuning.source(cfg.metrics.convention, f"of {out_dir} at epoch {epoch}")}
            if is_main:
                last_val = means(aggregate(per_case))
                mean_dice = float(np.mean([last_val[r]["dice"] for r in regions]))
                score = tuning.after if tuning is not None else mean_dice  # best.pt: post-processed when tuned
                improved = score > best["dice"]
                if improved:
                    best = {"dice": score, "epoch": epoch}
                    if tuning is not None:
                        atomic_write_text(out_dir / "postprocessing.json", json.dumps(postprocessing, indent=1))
                log_validation(logger, last_val, mean_dice, tuning, best, per_case, panel, epoch, iteration,
                               train_loss, lr)
                last_val_seconds = time.perf_counter() - val_start
                log("validation Dice | " + " | ".join(f"{r} {last_val[r]['dice']:.4f}" for r in regions)
                    + f" | mean {mean_dice:.4f}"
                    + (f" | post-processed mean {tuning.after:.4f} ({tuning.rules.describe(task)})" if tuning else "")
                    + f" | best {best['dice']:.4f} (epoch {best['epoch']}) | {len(per_case)} cases, "
                    f"{last_val_seconds:.0f} s")
        save_training_state(out_dir, info, cfg, cache, mode, model, optimizer, schedule, scaler,
                            counters(epoch, epoch_iter, iteration, best, skipped), best_too=improved,
                            postprocessing=postprocessing)
        if interrupt.requested and not interrupted:  # Ctrl-C during validation: stop after its save
            stop = interrupted = True
    interrupt.active = False

    # ---------------- the end ----------------
    if info.distributed:
        log(check_replicas(model, info))
    if logger is not None:
        logger.close()
    if last_val is not None:
        log("final validation Dice: " + ", ".join(f"{r} {last_val[r]['dice']:.4f}" for r in regions)
            + ("; post-processed: " + ", ".join(f"{r} {last_tuning.regions_after[r]:.4f}" for r in regions)
               if last_tuning is not None else "")
            + f" (best {'post-processed ' if cfg.train.tune_postprocessing else ''}mean {best['dice']:.4f} "
            f"at epoch {best['epoch']})")
    resume_command = shell_command("python", "train.py", "--resume", out_dir / "last.pt")
    if interrupted:
        log(f"interrupted: {out_dir / 'last.pt'} holds iteration {iteration}; continue exactly with: {resume_command}")
        return 130
    if epoch < cfg.train.epochs:
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
    """Training-specific values the types alone do not rule out (``ConfigError``, one line)."""
    t, d = cfg.train, cfg.data
    rules = [
        (t.epochs >= 1, "train.epochs", t.epochs, ">= 1"),
        (t.iters_per_epoch >= 1, "train.iters_per_epoch", t.iters_per_epoch, ">= 1"),
        (0 <= t.warmup_epochs <= t.epochs, "train.warmup_epochs", t.warmup_epochs, f"in [0, train.epochs={t.epochs}]"),
        (t.lr > 0, "train.lr", t.lr, "> 0"),
        (t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0"),
        (0 <= t.momentum < 1, "train.momentum", t.momentum, "in [0, 1)"),
        (t.grad_clip >= 0, "train.grad_clip", t.grad_clip, ">= 0 (0 = off)"),
        (t.val_every >= 1, "train.val_every", t.val_every, ">= 1"),
        (t.log_every >= 1, "train.log_every", t.log_every, ">= 1"),
        (t.cpu_threads >= 0, "train.cpu_threads", t.cpu_threads, ">= 0 (0 = torch default)"),
        (t.time_limit >= 0, "train.time_limit", t.time_limit, ">= 0 (0 = no limit)"),
        (t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every, ">= 0 (0 = every epoch)"),
        (len(d.patch_size) == 3 and min(d.patch_size) >= 1, "data.patch_size", d.patch_size, "3 positive sizes"),
        (d.batch_size >= 1, "data.batch_size", d.batch_size, ">= 1"),
        (d.synthetic_cases >= 0, "data.synthetic_cases", d.synthetic_cases, ">= 0"),
    ]
    for ok, key, value, rule in rules:
        if not ok:
            raise ConfigError(f"{key}: {value!r} must be {rule}")
    if d.task != "auto":
        load_task(d.task).select_modalities(d.modalities)  # TaskError naming data.task / data.modalities
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
    ``[0, 1]``: what ``infer.py --png`` draws (``engine.render``), of image channel ``channel``
    (FLAIR, else the first display channel), prediction and reference rows and the case's Dice
    line. The cached arrays are on the model grid: canonical voxel axes at ``model_spacing``."""
    picture = render_case(np.asarray(case.images[channel], dtype=np.float32), pred, ref, case.geometry.model_affine,
                          task, case_id,
                          subtitle=dice_line(metrics, task))
    return as_chw(picture)


def log_validation(logger, summary, mean_dice, tuning, best, per_case, panel, epoch, iteration, train_loss,
                   lr) -> None:
    scalars = {f"val/dice_{r}": summary[r]["dice"] for r in summary}
    scalars.update({f"val/hd95_{r}": summary[r]["hd95"] for r in summary if "hd95" in summary[r]})
    scalars.update({"val/dice_mean": mean_dice, "train/epoch_loss": train_loss})
    record = {"epoch": epoch, "iteration": iteration, "time": time.time(), "lr": lr, "train_loss": train_loss,
              "val": summary, "mean_dice": mean_dice, "best_dice": best["dice"], "best_epoch": best["epoch"],
              "cases": len(per_case)}
    if tuning is not None:
        scalars["val/dice_mean_postprocessed"] = tuning.after
        scalars.update({f"val/dice_{r}_postprocessed": dice for r, dice in tuning.regions_after.items()})
        record["postprocessing"] = {"rules": tuning.rules.to_dict(), "mean_dice": tuning.after,
                                    "dice": tuning.regions_after}
    logger.validation(record, scalars, iteration)
    if panel is not None:
        logger.image("val/panel", panel, iteration)


def counters(epoch: int, epoch_iter: int, iteration: int, best: dict, skipped: int) -> dict:
    """Where training stands, as stored in a checkpoint."""
    return {"epoch": epoch, "epoch_iteration": epoch_iter, "iteration": iteration, "best": best,
            "skipped_steps": skipped}


def save_training_state(out_dir: Path, info: dist.DistInfo, cfg, cache, mode: str, model, optimizer, schedule,
                        scaler, progress: dict, best_too: bool = False, postprocessing: dict | None = None) -> None:
    """Every rank: gather the RNG states (for an exact resume); rank 0: write ``last.pt`` (and
    ``best.pt``) atomically, so the previous file stays until the new one is complete. With
    ``postprocessing`` (the rules tuned on the last validation) infer.py applies them by default."""
    rng = dist.all_gather_objects(rng_state(info.device))
    if info.is_main:
        state = {
            "config": to_dict(cfg), "task": cache.task.to_dict(), "modalities": list(cache.modalities),
            "spacing": list(cache.spacing) if cache.spacing else None, "output_mode": mode,
            "model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(), **progress, "rng": rng,
            "world_size": info.world_size, "postprocessing": postprocessing,
        }
        save_checkpoint(state, out_dir / "last.pt")
        if best_too:
            save_checkpoint(state, out_dir / "best.pt")
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
    run_cli(main)
