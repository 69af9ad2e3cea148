"""Training-step benchmark (JSON out): iterations/s, patches/s and memory of unet3d and swin_unetr.

    python bench/train_step.py [-o bench/results/train_step_cpu.json]        # CPU: tiny configs, 32^3
    python bench/train_step.py --device cuda --compile                       # GPU: full configs, 128^3
    python bench/train_step.py --configs configs/unet3d.yaml --size 128 --precisions bf16
    PYTHONPATH=/tmp/peer_pkgs python bench/train_step.py                     # + MONAI's losses

Defaults: on CUDA configs/unet3d.yaml and configs/swin_unetr.yaml with 128^3 patches; on the CPU
configs/unet3d_tiny.yaml and configs/swin_unetr_tiny.yaml at their own 32^3 patches (the full
networks take minutes per step there, and CPUs without native bf16 run bf16 convolutions through a
slow fallback). Batch ``--batch`` (2). A step is what train.py does: forward under autocast, the
config's loss (deep supervision included), backward, gradient clipping, optimizer step,
``zero_grad``, and reading the loss value (one device sync).

Variants per network: precision (fp32, bf16 autocast) x memory format (contiguous,
channels_last_3d) x ``torch.compile`` (with ``--compile`` on CUDA; on the CPU only with
``--compile-cpu`` as well: it needs a C++ compiler and minutes). Memory: on CUDA the peak
allocated bytes during the timed steps; everywhere the bytes autograd saves from the forward pass
for the backward (activations; parameters excluded; with gradient checkpointing only what is kept
outside the checkpointed blocks) and the bytes of parameters + gradients + optimizer state.

``memory_estimate`` (all devices, ``--no-estimate`` to skip): the full configs at 128^3 and batch 2
run forward on fake tensors (shapes only), which gives the activation memory a GPU would hold
for fp32 / bf16, with and without gradient checkpointing, in seconds and without a GPU.

End to end (``--e2e-workers``): the same step fed by the real loader (synthetic cases, cache,
``build_train_loader`` with the config's augmentation and ``augment.device``) for ``--e2e-steps``
steps after the loader's prefetch queue has drained; reports patches/s and the fraction of the
step time spent waiting for the next batch.

MONAI (when importable): the same step (fp32, contiguous) with MONAI's loss instead of ours, the
two timed alternately --
``DiceLoss(sigmoid=True)`` (+ ``BCEWithLogitsLoss`` when the config has a BCE term; MONAI's
``DiceCELoss`` would apply a softmax cross-entropy to the 3 region channels), wrapped in
``DeepSupervisionLoss`` when the network has deep supervision -- with region targets made
before the step, as a MONAI pipeline makes them in the loader; and the losses alone (forward +
backward on fixed logits, also alternately), with their values side by side.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    ROOT,
    benchmark_parser,
    finish,
    import_monai,
    load_average,
    log,
    measure,
    measure_alternating,
    monai_skipped,
    per_second,
    ratio,
    setup,
    summarize,
    synchronize,
    synthetic_cases,
    work_dir,
)
from core.config import load_config  # noqa: E402
from core.distributed import PRECISIONS  # noqa: E402
from core.optim import build_optimizer  # noqa: E402
from core.task import (
    builtin_tasks,  # noqa: E402
    output_mode,  # noqa: E402
)
from datasets.augment import Augmenter  # noqa: E402
from datasets.cache import prepare_cache  # noqa: E402
from datasets.loader import PREFETCH_FACTOR, build_train_loader  # noqa: E402
from losses import build_loss  # noqa: E402
from models import build_model, count_parameters  # noqa: E402

AMP_DTYPES = {name: PRECISIONS[name] for name in ("fp32", "bf16")}  # fp16 would need train.py's GradScaler
CPU_CONFIGS = ["configs/unet3d_tiny.yaml", "configs/swin_unetr_tiny.yaml"]
GPU_CONFIGS = ["configs/unet3d.yaml", "configs/swin_unetr.yaml"]
TASK = builtin_tasks()["brats-gli-2021"]  # the task of the synthetic benchmark data


def in_channels(cfg) -> int:
    return len(TASK.select_modalities(cfg.data.modalities))


class Trainer:
    """One network, loss and optimizer from a config; ``step(image, label)`` is train.py's step."""

    def __init__(self, cfg, device: torch.device, precision: str, channels_last: bool, compile_model: bool,
                 loss_fn: nn.Module | None = None):
        self.cfg, self.device = cfg, device
        mode = output_mode(cfg.loss)
        torch.manual_seed(0)
        self.model = build_model(cfg.model, in_channels(cfg), TASK.output_channels(mode),
                                 patch_size=cfg.data.patch_size).to(device).train()
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.loss_fn = (loss_fn or build_loss(cfg.loss, TASK)).to(device)
        self.optimizer = build_optimizer(self.model, cfg.train, device.type)
        self.amp = AMP_DTYPES[precision]
        self.max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf

    def loss(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.loss_fn(self.forward(image), target)

    def step(self, image: torch.Tensor, target: torch.Tensor) -> float:
        loss = self.loss(image, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()  # train.py reads the loss every step: one sync

    def state_bytes(self) -> int:
        """Parameters + their gradients + optimizer state (momentum / Adam moments)."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
        return 2 * params + state

    def saved_activation_bytes(self, image: torch.Tensor, target: torch.Tensor) -> int:
        """Bytes autograd keeps from one forward pass for the backward (see ``saved_bytes``)."""
        count, loss = saved_bytes(lambda: self.loss(image, target), self.model)
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return count


def saved_bytes(forward, model: nn.Module) -> tuple[int, torch.Tensor]:
    """``(bytes, forward())``: the storages autograd saves for the backward while ``forward()``
    runs, each counted once, parameters excluded. Inside gradient-checkpointed blocks nothing is
    seen (those activations are recomputed in the backward)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            storages[storage._cdata] = max(storages.get(storage._cdata, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    return sum(storages.values()), result


def estimate_memory(config: Path, size: int, batch: int, precision: str, checkpointing: bool) -> dict:
    """Training memory of a full-size config without running it: the forward pass runs on fake
    tensors (shapes only, ``FakeTensorMode``) and ``saved_bytes`` adds up what would be kept for the
    backward. bf16 uses CPU autocast rules (CUDA's differ in a few ops). A lower bound of the peak:
    add the backward's temporaries and, with checkpointing, one block's recomputed activations."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = load_config(config, [f"data.patch_size=[{size},{size},{size}]", f"data.batch_size={batch}",
                               f"model.checkpointing={str(checkpointing).lower()}"])
    trainer = Trainer(cfg, torch.device("cpu"), precision, False, False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        image = torch.empty(batch, in_channels(cfg), size, size, size)
        label = torch.zeros(batch, size, size, size, dtype=torch.long)
        activations, _ = saved_bytes(lambda: trainer.loss(image, label), trainer.model)
    params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    moments = 2 if cfg.train.optimizer == "adamw" else (1 if cfg.train.momentum > 0 else 0)
    return {"saved_activations_gb": round(activations / 2**30, 2),
            "params_grads_optimizer_gb": round(params * (2 + moments) / 2**30, 2)}


def random_batch(cfg, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ``(B, C, *patch)`` N(0, 1) and classes ``(B, *patch)`` int64 with every class present."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, *cfg.data.patch_size)
    image = torch.randn(batch, in_channels(cfg), *cfg.data.patch_size, generator=generator)
    label = torch.randint(0, 4, shape, generator=generator)
    return image.to(device), label.to(device)


def mb(count: int) -> float:
    return round(count / 2**20, 1)


def bench_variant(cfg, args, device, precision: str, channels_last: bool, compile_model: bool) -> dict:
    """Step timing and memory of one variant."""
    trainer = Trainer(cfg, device, precision, channels_last, compile_model)
    image, target = random_batch(cfg, args.batch, device)
    result = {"parameters": count_parameters(trainer.model)}
    if device.type == "cuda":
        trainer.step(image, target)  # allocations of the first step (and compilation) are not peaks
        torch.cuda.reset_peak_memory_stats(device)
    warmup = args.warmup + (2 if compile_model else 0)
    timing = measure(lambda: trainer.step(image, target), args.repeats, warmup, args.budget, device)
    result.update(seconds_per_step=timing, iterations_per_s=per_second(1, timing),
                  patches_per_s=per_second(args.batch, timing))
    if device.type == "cuda":
        result["peak_allocated_mb"] = mb(torch.cuda.max_memory_allocated(device))
    if not compile_model:
        result["saved_activations_mb"] = mb(trainer.saved_activation_bytes(image, target))
    result["params_grads_optimizer_mb"] = mb(trainer.state_bytes())
    return result


# ----------------------------------------------------------------------------------------------
# End to end: the step fed by the real loader.
# ----------------------------------------------------------------------------------------------
def end_to_end(config: Path, overrides: list[str], shape, args, device, work: Path, workers: int) -> dict:
    cases, _ = synthetic_cases(work / "data", args.e2e_cases, shape)
    steps = args.e2e_steps
    warmup = workers * PREFETCH_FACTOR + 1 + args.warmup
    cfg = load_config(config, overrides + [
        f"data.root={cases[0].folder.parent}", f"data.cache_dir={work / 'cache'}", "data.cache_workers=1",
        f"data.num_workers={workers}", f"train.iters_per_epoch={warmup + steps}", "train.epochs=1"])
    cache = prepare_cache(cfg.data, show_progress=False)
    loader = build_train_loader(cache, cache.case_ids, cfg, device_type=device.type)
    augmenter = Augmenter(cfg.augment) if cfg.augment.device == "train" else None
    trainer = Trainer(cfg, device, "fp32", False, False)
    batches = iter(loader)
    waits, totals = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(batches)
        image = batch["image"].to(device, non_blocking=True).float()  # as train.py: the cache dtype -> float32
        label = batch["label"].to(device, non_blocking=True).long()  # uint8 -> int64
        if augmenter is not None:
            image, label = augmenter(image, label, torch.Generator().manual_seed(i))
        synchronize(device)
        waited = time.perf_counter() - start
        trainer.step(image, label)
        if i >= warmup:
            waits.append(waited)
            totals.append(time.perf_counter() - start)
    del batches, loader
    timing = summarize(totals)
    return {"workers": workers, "augment_device": cfg.augment.device, "case_shape": list(shape), "steps": steps,
            "seconds_per_step": timing, "patches_per_s": per_second(cfg.data.batch_size, timing),
            "waiting_for_data_fraction": round(sum(waits) / sum(totals), 3),
            "waiting_s_median": summarize(waits)["median_s"]}


# ----------------------------------------------------------------------------------------------
# MONAI's losses.
# ----------------------------------------------------------------------------------------------
class MonaiRegionLoss(nn.Module):
    """MONAI's closest equivalent of our ``region_dice_bce``: ``DiceLoss(sigmoid=True)`` plus
    ``BCEWithLogitsLoss``, on region targets ``(B, 3, X, Y, Z)``."""

    def __init__(self, loss_cfg):
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, batch=loss_cfg.batch_dice, smooth_nr=loss_cfg.smooth,
                             smooth_dr=loss_cfg.smooth)
        self.bce = nn.BCEWithLogitsLoss()
        self.dice_weight, self.ce_weight = loss_cfg.dice_weight, loss_cfg.ce_weight

    def forward(self, logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        loss = self.dice_weight * self.dice(logits, regions)
        return loss + self.ce_weight * self.bce(logits, regions) if self.ce_weight else loss


def monai_loss(cfg) -> tuple[nn.Module, str]:
    """MONAI loss for the config, and a description."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    if output_mode(cfg.loss) == "regions":
        base, text = MonaiRegionLoss(cfg.loss), "DiceLoss(sigmoid=True)" + (
            " + BCEWithLogitsLoss" if cfg.loss.ce_weight else "")
    else:
        base = DiceCELoss(to_onehot_y=True, softmax=True, include_background=cfg.loss.include_background,
                          batch=cfg.loss.batch_dice, smooth_nr=cfg.loss.smooth, smooth_dr=cfg.loss.smooth,
                          lambda_dice=cfg.loss.dice_weight, lambda_ce=cfg.loss.ce_weight)
        text = "DiceCELoss(to_onehot_y=True, softmax=True)"
    section = getattr(cfg.model, cfg.model.name)
    if getattr(section, "deep_supervision", False):
        return DeepSupervisionLoss(base, weight_mode="exp"), f"DeepSupervisionLoss({text}, weight_mode='exp')"
    return base, text


def monai_targets(cfg):
    """Targets MONAI's loss takes: region maps ``(B, 3, ...)`` float or classes ``(B, 1, ...)``."""
    if output_mode(cfg.loss) == "regions":
        return TASK.training_targets
    return lambda label: label[:, None]


def loss_step(cfg, device, args, monai_fn: nn.Module) -> dict:
    """fp32 train steps with our loss and with MONAI's (on its region targets), timed alternately."""
    ours, theirs = Trainer(cfg, device, "fp32", False, False), Trainer(cfg, device, "fp32", False, False, monai_fn)
    image, label = random_batch(cfg, args.batch, device)
    target = monai_targets(cfg)(label)
    timings = measure_alternating({"ours": lambda: ours.step(image, label), "monai": lambda: theirs.step(image, target)},
                                  args.repeats, args.warmup, args.budget, device)
    return {"ours_seconds_per_step": timings["ours"], "monai_seconds_per_step": timings["monai"],
            "step_time_ratio_ours_over_monai": ratio(timings["ours"]["median_s"], timings["monai"]["median_s"])}


def loss_only(cfg, device, args, monai_fn: nn.Module) -> dict:
    """Forward + backward of the losses alone on fixed logits (the network's output shapes),
    timed alternately; with a single region output also ours given MONAI's region targets."""
    trainer = Trainer(cfg, device, "fp32", False, False)
    image, label = random_batch(cfg, args.batch, device)
    with torch.no_grad():
        outputs = trainer.model(image)
    outputs = [o.detach().requires_grad_() for o in (outputs if isinstance(outputs, list) else [outputs])]
    prediction = outputs if len(outputs) > 1 else outputs[0]
    ours_fn, target = build_loss(cfg.loss, TASK).to(device), monai_targets(cfg)(label)

    def run(fn, tgt):
        loss = fn(prediction, tgt)
        loss.backward()
        for o in outputs:
            o.grad = None
        return loss.item()

    fns = {"ours": lambda: run(ours_fn, label), "monai": lambda: run(monai_fn, target)}
    same_targets = len(outputs) == 1 and output_mode(cfg.loss) == "regions"
    if same_targets:  # ours takes classes and builds the region maps itself; here it gets MONAI's
        fns["ours_given_region_targets"] = lambda: run(ours_fn.base, target)
    timings = measure_alternating(fns, args.repeats, args.warmup, args.budget, device)
    result = {f"{name}_seconds": timing for name, timing in timings.items()}
    result["time_ratio_ours_over_monai"] = ratio(timings["ours"]["median_s"], timings["monai"]["median_s"])
    if same_targets:
        result["time_ratio_ours_given_region_targets_over_monai"] = ratio(
            timings["ours_given_region_targets"]["median_s"], timings["monai"]["median_s"])
    result.update(ours_value=round(run(ours_fn, label), 6), monai_value=round(run(monai_fn, target), 6))
    if not same_targets:
        result["note"] = ("values differ with deep supervision: MONAI's 'exp' weights are 1, 1/2, 1/4 unnormalised "
                          "and it resizes region targets by nearest-exact interpolation, ours normalise the weights "
                          "to sum 1 and max-pool the regions")
    return result


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, repeats=3, budget=30.0)
    parser.add_argument("--configs", nargs="+", help=f"default: {' '.join(CPU_CONFIGS)} on the CPU, "
                                                     f"{' '.join(GPU_CONFIGS)} on CUDA")
    parser.add_argument("--size", type=int, help="patch edge (default 32 on the CPU, 128 on CUDA)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", choices=list(AMP_DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--channels-last", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile variants (CUDA)")
    parser.add_argument("--compile-cpu", action="store_true", help="allow --compile on the CPU")
    parser.add_argument("--no-estimate", action="store_true", help="skip the fake-tensor memory estimate")
    parser.add_argument("--e2e-workers", type=int, nargs="*", default=[0, 2],
                        help="loader workers of the end-to-end runs (none: skip them)")
    parser.add_argument("--e2e-steps", type=int, default=6)
    parser.add_argument("--e2e-cases", type=int, default=4)
    parser.add_argument("--e2e-case-shape", type=int, nargs=3,
                        help="synthetic case shape (default: the config's data.synthetic_shape on the CPU, "
                             "240 240 155 on CUDA)")
    args = parser.parse_args(argv)
    device = setup(args)
    load_at_start = load_average()
    cuda = device.type == "cuda"
    configs = args.configs or (GPU_CONFIGS if cuda else CPU_CONFIGS)
    size = args.size or (128 if cuda else 32)
    compile_variants = [False] + ([True] if args.compile and (cuda or args.compile_cpu) else [])
    monai = import_monai(args.no_monai)
    report: dict = {
        "benchmark": "train_step", "patch": [size] * 3, "batch": args.batch, "repeats": args.repeats,
        "budget_s": args.budget,
        "note": None if cuda else "CPU run: the tiny configs at 32^3 by default so it finishes in minutes; the GPU "
                                  "recipe is configs/unet3d.yaml / swin_unetr.yaml at 128^3 (--device cuda)",
        "compile": "on" if True in compile_variants else ("off: CPU without --compile-cpu" if args.compile else "off"),
        "monai": monai.__version__ if monai else monai_skipped(args.no_monai),
        "models": {},
    }
    overrides = [f"data.patch_size=[{size},{size},{size}]", f"data.batch_size={args.batch}"]
    with work_dir(args) as work:
        for config in configs:
            path = ROOT / config if not Path(config).is_absolute() else Path(config)
            cfg = load_config(path, overrides)
            entry: dict = {"config": config, "model": cfg.model.name, "loss": cfg.loss.name,
                           "checkpointing": cfg.model.checkpointing, "variants": {}}
            for compile_model in compile_variants:
                for precision in args.precisions:
                    for layout in args.channels_last:
                        name = precision + ("_channels_last" if layout == "on" else "") + \
                            ("_compiled" if compile_model else "")
                        entry["variants"][name] = bench_variant(cfg, args, device, precision, layout == "on",
                                                                compile_model)
                        log(f"{config} {name}: {entry['variants'][name]['patches_per_s']}")
            if monai:
                fn, text = monai_loss(cfg)
                entry["monai_loss_step"] = {"loss": text, **loss_step(cfg, device, args, fn)}
                entry["monai_loss_only"] = {"loss": text, **loss_only(cfg, device, args, fn)}
                log(f"{config} monai loss: {entry['monai_loss_only']['time_ratio_ours_over_monai']}")
            shape = args.e2e_case_shape or ([240, 240, 155] if cuda else list(cfg.data.synthetic_shape))
            entry["end_to_end"] = [end_to_end(path, overrides, shape, args, device, work, w) for w in args.e2e_workers]
            for e2e in entry["end_to_end"]:
                log(f"{config} end to end: {e2e}")
            report["models"][Path(config).stem] = entry
    if not args.no_estimate:
        report["memory_estimate"] = memory_estimates(args.batch)
    return finish(report, args, device, load_at_start)


def memory_estimates(batch: int, size: int = 128) -> dict:
    """``estimate_memory`` of the full configs at ``size``^3, fp32 / bf16, checkpointing off / on."""
    out: dict = {"patch": [size] * 3, "batch": batch,
                 "note": "fake-tensor forward: activations autograd saves for the backward (a lower bound of "
                         "the peak; add the backward's temporaries, and with checkpointing one block's "
                         "recomputed activations); bf16 follows CPU autocast rules"}
    for config in GPU_CONFIGS:
        for precision in ("fp32", "bf16"):
            for checkpointing in (False, True):
                key = f"{Path(config).stem}_{precision}{'_checkpointing' if checkpointing else ''}"
                out[key] = estimate_memory(ROOT / config, size, batch, precision, checkpointing)
                log(f"memory estimate {key}: {out[key]}")
    return out


if __name__ == "__main__":
    sys.exit(main())
