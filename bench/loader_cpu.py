"""Time the data pipeline on the CPU and print JSON: synthetic generation, cache build, and the
patches per second the training DataLoader delivers.

    python bench/loader_cpu.py                       # 64^3 from 96x96x64 cases, 128^3 from 240x240x155
    python bench/loader_cpu.py --batches 20 --out bench/results/loader_cpu.json

Two scenarios: the CPU demo (64^3 patches from 96x96x64 cases) and the GPU recipe (128^3 patches
from full 240x240x155 cases). For each: augmentation off (``augment.device=train``: the loader
only cuts patches) and on (``augment.device=loader``, default ``AugmentConfig``), with
``num_workers`` 0 and 2. Throughput is counted after one warm-up batch (worker start-up and the
first page faults are excluded); the cache sits in the page cache, as in a running training.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.cache import prepare_cache  # noqa: E402
from datasets.loader import build_train_loader  # noqa: E402
from datasets.synthetic import generate_dataset  # noqa: E402
from engine.config import load_config  # noqa: E402

SCENARIOS = {  # name -> (case shape, number of cases, patch side)
    "demo_64_from_96x96x64": ((96, 96, 64), 6, 64),
    "full_128_from_240x240x155": ((240, 240, 155), 2, 128),
}


def build(work: Path, name: str, shape, cases: int) -> tuple[dict, object]:
    """Generate the cases and build their cache; returns timings and the cache index."""
    root, cache_dir = work / name / "data", work / name / "cache"
    start = time.perf_counter()
    generate_dataset(root, cases, seed=0, shape=shape)
    generate_s = (time.perf_counter() - start) / cases
    cfg = load_config(None, [f"data.root={root}", f"data.cache_dir={cache_dir}", "data.cache_workers=1"])
    start = time.perf_counter()
    cache = prepare_cache(cfg.data, show_progress=False)
    build_s = (time.perf_counter() - start) / cases
    start = time.perf_counter()
    prepare_cache(cfg.data, show_progress=False)
    reuse_s = time.perf_counter() - start
    timings = {"cases": cases, "generate_s_per_case": round(generate_s, 3),
               "cache_build_s_per_case": round(build_s, 3), "cache_reuse_s_total": round(reuse_s, 4)}
    return timings, cache


def throughput(cache, patch: int, augment: bool, workers: int, batches: int, batch_size: int) -> float:
    """Patches per second over ``batches`` batches, after one warm-up batch."""
    cfg = load_config(None, [
        f"data.root={cache.folder}", f"data.patch_size=[{patch},{patch},{patch}]", f"data.batch_size={batch_size}",
        f"data.num_workers={workers}", f"train.iters_per_epoch={batches + 1}",
        f"augment.device={'loader' if augment else 'train'}"])
    loader = build_train_loader(cache, cache.case_ids, cfg)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    count = sum(batch["image"].shape[0] for batch in iterator)
    seconds = time.perf_counter() - start
    del iterator, loader
    return count / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--work-dir", default="", help="where to put data and cache (default: a temporary folder)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)

    result = {"device": "cpu", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(), "batch_size": args.batch_size,
              "timed_batches": args.batches, "scenarios": {}}
    with tempfile.TemporaryDirectory(dir=args.work_dir or None) as work:
        for name, (shape, cases, patch) in SCENARIOS.items():
            timings, cache = build(Path(work), name, shape, cases)
            rates = {}
            for augment in (False, True):
                for workers in (0, 2):
                    key = f"augment_{'on' if augment else 'off'}_workers_{workers}"
                    rates[key] = round(throughput(cache, patch, augment, workers, args.batches, args.batch_size), 2)
            result["scenarios"][name] = {"case_shape": list(shape), "patch": [patch] * 3, **timings,
                                         "patches_per_s": rates}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
