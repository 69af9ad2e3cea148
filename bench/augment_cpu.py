"""Time batch augmentation on the CPU and print JSON.

    python bench/augment_cpu.py                      # 2 x 4 x 128^3, default and all-on configs
    python bench/augment_cpu.py --size 96 --repeats 3

Reports seconds per batch (wall and process CPU) for the default ``AugmentConfig`` (random:
each repeat draws other transforms), every transform at probability 1 without and with elastic
deformation, and the stages of the all-on run one by one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import AugmentConfig  # noqa: E402
from datasets.augment import Augmenter, add_gaussian_noise, flip, gamma_transform, gaussian_blur, spatial_transform  # noqa: E402

ALL_ON = dict(flip_prob=1.0, rotate_prob=1.0, scale_prob=1.0, intensity_scale_prob=1.0, intensity_shift_prob=1.0,
              gamma_prob=1.0, noise_prob=1.0, blur_prob=1.0)


def timed(fn, repeats: int) -> dict[str, float]:
    """Median wall and process-CPU seconds of ``repeats`` calls ``fn(seed)`` after one warm-up
    call (CPU seconds are the better guide when other processes share the cores)."""
    fn(0)
    wall, cpu = [], []
    for i in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn(i + 1)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return {"wall_median": round(statistics.median(wall), 4), "wall_mean": round(statistics.mean(wall), 4),
            "cpu_median": round(statistics.median(cpu), 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="patch side, voxels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = (args.size,) * 3
    image = torch.randn(args.batch, args.channels, *shape, generator=torch.Generator().manual_seed(0))
    label = torch.randint(0, 4, (args.batch, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def run(cfg: AugmentConfig):
        augment = Augmenter(cfg)
        return lambda seed: augment(image, label, torch.Generator().manual_seed(seed))


    augment = Augmenter(AugmentConfig(**ALL_ON, elastic_prob=1.0))
    params = augment.sample(args.batch, args.channels, shape, torch.Generator().manual_seed(0))
    stages = {
        "draw_parameters": lambda s: augment.sample(args.batch, args.channels, shape, torch.Generator().manual_seed(s)),
        "spatial_rotate_scale": lambda s: spatial_transform(image, label, params.matrix),
        "spatial_rotate_scale_elastic": lambda s: spatial_transform(image, label, params.matrix, params.displacement),
        "flip_3_axes": lambda s: flip(image, label, params.flips),
        "noise": lambda s: add_gaussian_noise(image, params.noise_std),
        "blur": lambda s: gaussian_blur(image, params.blur_sigma),
        "scale_shift": lambda s: torch.addcmul(params.shift_value.float()[..., None, None, None], image,
                                               params.scale_factor.float()[..., None, None, None]),
        "gamma": lambda s: gamma_transform(image, params.gamma_value, augment.cfg.gamma_retain_stats),
    }
    report = {
        "batch": [args.batch, args.channels, *shape],
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "processor": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "seconds_per_batch": {
            "default_config": timed(run(AugmentConfig()), args.repeats),
            "all_prob1_no_elastic": timed(run(AugmentConfig(**ALL_ON)), args.repeats),
            "all_prob1_with_elastic": timed(run(AugmentConfig(**ALL_ON, elastic_prob=1.0)), args.repeats),
        },
        "stage_seconds": {name: timed(fn, args.repeats) for name, fn in stages.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
