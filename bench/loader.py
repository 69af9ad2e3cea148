"""Data-pipeline benchmark (JSON out): training patches per second delivered by the DataLoader.

    python bench/loader.py [-o bench/results/loader_cpu.json] [--workers 0 2 4 8] [--scenarios full demo]
    PYTHONPATH=/tmp/peer_pkgs python bench/loader.py   # + the equivalent MONAI pipeline on the same cores

Scenarios: ``full`` = configs/unet3d.yaml (128^3 patches from 240 x 240 x 155 cases, float16 cache,
nnU-Net augmentation) and ``demo`` = configs/demo.yaml (its patch size and synthetic case shape).
Synthetic cases are generated and cached first (seconds per case reported). For every
``--workers`` count, three modes of ``datasets.loader.build_train_loader``:

- ``off``: ``augment.device=train`` and no augmenter: the loader only cuts patches;
- ``loader``: ``augment.device=loader``: each worker augments its samples on the CPU;
- ``train``: the ``off`` loader + ``datasets.augment.Augmenter`` applied per batch on ``--device``
  (in the main process, as train.py does).

A measurement is ``--batches`` consecutive batches (the batch also moved to ``--device`` and, in
``train`` mode, augmented there); one untimed warm-up measurement starts the workers, then
``--repeats`` timed ones give median/min/max patches per second.

MONAI (when importable) runs the closest pipeline on the same cases, batch size and worker
counts: ``LoadImaged`` -> ``EnsureChannelFirstd`` -> ``CropForegroundd`` -> ``NormalizeIntensityd``
(nonzero, channel-wise) -> ``FgBgToIndicesd`` -> ``RandCropByPosNegLabeld`` (pos = the config's
foreground fraction) and, for ``loader``, the same augmentation: ``RandAffined`` (rotation and
zoom in one resampling, with the probability that ours draws either), ``RandFlipd`` per axis,
``RandGaussianNoised``, ``RandGaussianSmoothd``, ``RandScaleIntensityd``, ``RandShiftIntensityd``,
``RandAdjustContrastd`` (retain_stats), with the config's probabilities and ranges. Two variants:
``cache`` (``CacheDataset``: the deterministic part kept in RAM, as MONAI users do when the
dataset fits) and ``nifti`` (``Dataset``: the NIfTI files read for every sample, as MONAI's BraTS
tutorial; ``loader`` mode only).
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    ROOT,
    benchmark_parser,
    finish,
    import_monai,
    load_average,
    log,
    measure,
    monai_skipped,
    per_second,
    ratio,
    setup,
    synchronize,
    synthetic_cases,
    work_dir,
)
from core.config import load_config  # noqa: E402
from core.task import builtin_tasks  # noqa: E402
from datasets.augment import Augmenter  # noqa: E402
from datasets.cache import prepare_cache  # noqa: E402
from datasets.loader import PREFETCH_FACTOR, build_train_loader  # noqa: E402

SCENARIOS = {  # name -> (config, number of cases, case shape or None = the config's synthetic_shape)
    "full": ("unet3d.yaml", 2, (240, 240, 155)),
    "demo": ("demo.yaml", 6, None),
}
MODES = ("off", "loader", "train")
MONAI_PREFETCH = 2  # torch's default prefetch_factor, which MONAI keeps


def scenario_config(name: str, work: Path):
    """``(make_config(overrides), cache, info)`` of a scenario, its cases generated in ``work``
    when missing and cached."""
    config, cases, shape = SCENARIOS[name]
    path = ROOT / "configs" / config
    shape = shape or tuple(load_config(path).data.synthetic_shape)
    found, generate_s = synthetic_cases(work / "data", cases, shape)
    base = [f"data.root={found[0].folder.parent}", f"data.cache_dir={work / 'cache'}", "data.cache_workers=1"]

    def make_config(overrides=()):
        return load_config(path, base + list(overrides))

    cfg = make_config()
    start = time.perf_counter()
    cache = prepare_cache(cfg.data, show_progress=False)
    cache_s = (time.perf_counter() - start) / cases  # ~0 when the cache was reused (--work-dir)
    info = {"config": f"configs/{config}", "case_shape": list(shape), "cases": cases,
            "patch": list(cfg.data.patch_size), "foreground_fraction": cfg.data.foreground_fraction,
            "cache_dtype": cfg.data.cache_dtype, "generate_s_per_case": generate_s,
            "cache_build_s_per_case": round(cache_s, 3)}
    return make_config, cache, info


def batches_needed(args, workers: int, prefetch: int) -> int:
    """Batches one benchmark run draws: the drained prefetch queue, warm-up and timed runs."""
    return workers * prefetch + 1 + (args.warmup + args.repeats) * args.batches


def batches_rate(next_batch, prefetched: int, args, device) -> dict:
    """Patches per second of ``args.batches`` consecutive ``next_batch()`` calls.

    First ``prefetched + 1`` batches are drawn untimed: the workers start, and the batches they
    queued meanwhile (``workers x prefetch_factor``) are gone, so the timed batches come at the
    rate the pipeline produces them. Then ``measure`` (its own warm-up runs, repeats, budget).
    """
    for _ in range(prefetched + 1):
        next_batch()
    timing = measure(lambda: [next_batch() for _ in range(args.batches)], args.repeats, args.warmup,
                     args.budget, device)
    return {"patches_per_s": per_second(args.batches * args.batch_size, timing), "seconds": timing}


def ours(make_config, cache, mode: str, workers: int, args, device) -> dict:
    """Our loader in ``mode`` with ``workers`` processes."""
    cfg = make_config([f"data.num_workers={workers}", f"data.batch_size={args.batch_size}",
                       f"augment.device={'loader' if mode == 'loader' else 'train'}",
                       f"train.iters_per_epoch={batches_needed(args, workers, PREFETCH_FACTOR)}", "train.epochs=1"])
    loader = build_train_loader(cache, cache.case_ids, cfg, device_type=device.type)
    augmenter = Augmenter(cfg.augment) if mode == "train" else None
    batches, seeds = iter(loader), itertools.count()

    def next_batch():
        batch = next(batches)
        image = batch["image"].to(device, non_blocking=True).float()  # as train.py: float16 cache -> float32
        label = batch["label"].to(device, non_blocking=True).long()  # uint8 -> int64
        if augmenter is not None:
            image, label = augmenter(image, label, torch.Generator().manual_seed(next(seeds)))
        synchronize(device)
        return image, label

    return batches_rate(next_batch, workers * PREFETCH_FACTOR, args, device)  # workers stop with the iterator


# ----------------------------------------------------------------------------------------------
# MONAI's pipeline.
# ----------------------------------------------------------------------------------------------
def monai_transforms(cfg, augment: bool):
    """``(deterministic, random)`` MONAI transform lists mirroring our cache + loader."""
    from monai import transforms as T

    keys = ["image", "label"]
    patch = list(cfg.data.patch_size)
    fg = cfg.data.foreground_fraction
    deterministic = [
        T.LoadImaged(keys=keys, image_only=True), T.EnsureChannelFirstd(keys=keys),
        T.CropForegroundd(keys=keys, source_key="image"),
        T.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        T.SpatialPadd(keys=keys, spatial_size=patch),  # ours pads patches larger than the crop too
        T.FgBgToIndicesd(keys="label"),  # else RandCropByPosNegLabeld searches the volume per sample
    ]
    random = [T.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch, pos=fg, neg=1 - fg,
                                       num_samples=1, fg_indices_key="label_fg_indices",
                                       bg_indices_key="label_bg_indices")]
    if augment:
        a = cfg.augment
        angle = math.radians(a.rotate_range)
        zoom = (a.scale_range[0] - 1, a.scale_range[1] - 1)  # MONAI adds 1 to its scale_range
        random += [
            T.RandAffined(keys=keys, prob=1 - (1 - a.rotate_prob) * (1 - a.scale_prob), rotate_range=[angle] * 3,
                          scale_range=[zoom] * 3, mode=("bilinear", "nearest"), padding_mode="zeros"),
            *[T.RandFlipd(keys=keys, prob=a.flip_prob, spatial_axis=axis) for axis in range(3)],
            T.RandGaussianNoised(keys="image", prob=a.noise_prob, std=a.noise_std),
            T.RandGaussianSmoothd(keys="image", prob=a.blur_prob, sigma_x=a.blur_sigma, sigma_y=a.blur_sigma,
                                  sigma_z=a.blur_sigma),
            T.RandScaleIntensityd(keys="image", prob=a.intensity_scale_prob,
                                  factors=(a.intensity_scale_range[0] - 1, a.intensity_scale_range[1] - 1)),
            T.RandShiftIntensityd(keys="image", prob=a.intensity_shift_prob, offsets=a.intensity_shift_range),
            T.RandAdjustContrastd(keys="image", prob=a.gamma_prob, gamma=tuple(a.gamma_range),
                                  retain_stats=a.gamma_retain_stats),
        ]
    return deterministic, random + [T.EnsureTyped(keys=keys, track_meta=False)]


def monai_loader(cache_cases, cfg, augment: bool, cached: bool, workers: int, args, samples: int, pin: bool):
    """A MONAI DataLoader of ``samples`` samples drawn with replacement from the cases."""
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.transforms import Compose

    task = builtin_tasks()["brats-gli-2021"]  # the synthetic benchmark data's task
    modalities = task.select_modalities(cfg.data.modalities)
    data = [{"image": [str(p) for p, _ in case.image_sources(modalities, task)], "label": str(case.seg)}
            for case in cache_cases]
    deterministic, random = monai_transforms(cfg, augment)
    if cached:
        dataset = CacheDataset(data, Compose(deterministic + random), cache_rate=1.0, num_workers=1,
                               progress=False)
    else:
        dataset = Dataset(data, Compose(deterministic + random))
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=samples,
                                             generator=torch.Generator().manual_seed(0))
    extra = {"persistent_workers": True, "prefetch_factor": MONAI_PREFETCH} if workers else {}
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                      **extra)


def monai_rate(cases, cfg, augment: bool, cached: bool, workers: int, args, device) -> dict:
    """Patches per second of the MONAI pipeline, like ``ours`` (memory pinned on CUDA, as ours)."""
    samples = batches_needed(args, workers, MONAI_PREFETCH) * args.batch_size
    start = time.perf_counter()
    loader = monai_loader(cases, cfg, augment, cached, workers, args, samples, device.type == "cuda")
    setup_s = time.perf_counter() - start
    batches = iter(loader)

    def next_batch():
        batch = next(batches)
        out = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        synchronize(device)
        return out

    result = batches_rate(next_batch, workers * MONAI_PREFETCH, args, device)
    return {**result, "dataset_setup_s": round(setup_s, 3)}


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, repeats=3, budget=30.0)
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batches", type=int, default=4, help="batches per timed measurement")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--monai-variants", nargs="+", choices=["cache", "nifti"], default=["cache", "nifti"])
    args = parser.parse_args(argv)
    device = setup(args)
    load_at_start = load_average()
    monai = import_monai(args.no_monai)
    report: dict = {"benchmark": "loader", "batches_per_measurement": args.batches, "batch_size": args.batch_size,
                    "repeats": args.repeats, "budget_s": args.budget, "workers": args.workers,
                    "monai": monai.__version__ if monai else monai_skipped(args.no_monai), "scenarios": {}}
    with work_dir(args) as work:
        for name in args.scenarios:
            make_config, cache, info = scenario_config(name, work / name)
            cfg = make_config()
            info["augment"] = {k: v for k, v in vars(cfg.augment).items() if k != "device"}
            rates: dict = {}
            for mode in args.modes:
                for workers in args.workers:
                    key = f"ours_{mode}_workers{workers}"
                    rates[key] = ours(make_config, cache, mode, workers, args, device)
                    log(f"{name} {key}: {rates[key]['patches_per_s']}")
            if monai:
                from datasets.io import discover_cases

                cases = discover_cases(cfg.data.root)
                for variant in args.monai_variants:
                    for mode in ("off", "loader") if variant == "cache" else ("loader",):
                        if mode not in args.modes:
                            continue
                        for workers in args.workers:
                            key = f"monai_{variant}_{mode}_workers{workers}"
                            rates[key] = monai_rate(cases, cfg, mode == "loader", variant == "cache", workers,
                                                    args, device)
                            log(f"{name} {key}: {rates[key]['patches_per_s']}")
            info["rates"] = rates
            info["ratios_ours_over_monai"] = monai_ratios(rates, args.workers)
            report["scenarios"][name] = info
    return finish(report, args, device, load_at_start)


def monai_ratios(rates: dict, workers: list[int]) -> dict:
    """Our median patches/s over MONAI's for the same mode and worker count."""
    out = {}
    for key, value in rates.items():
        if not key.startswith("monai_"):
            continue
        _, variant, mode, workers_key = key.split("_")
        theirs = value["patches_per_s"]["median"]
        out[f"{mode}_{workers_key}_vs_monai_{variant}"] = ratio(
            rates.get(f"ours_{mode}_{workers_key}", {}).get("patches_per_s", {}).get("median"), theirs, 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
