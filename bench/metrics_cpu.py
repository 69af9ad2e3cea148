"""Per-case CPU time of the BraTS metrics on a full 240 x 240 x 155 case (JSON out).

    python bench/metrics_cpu.py [--repeats 5] [--task brats-gli-2023] [-o bench/results/metrics_cpu.json]

The case is a synthetic tumour (edema shell around a core with an enhancing rim and necrosis,
about 1e5 WT voxels) and a prediction that is shifted, eroded in places and has a stray
enhancing island, as training classes 1 core, 2 edema, 3 enhancing (the class order of every
glioma-like task; ``--task`` picks the regions and lesion rules). Reports the median seconds of
``case_metrics`` without surface metrics, with them (HD95 + NSD from one distance computation),
and under the lesion-wise convention, plus the parts (confusion counts, HD95 of each region), and
the seconds per case of choosing post-processing (``inference.tuning.tune_postprocessing``, what
training adds to each validation) on this case and on a noisy one (60 stray enhancing voxels
scattered over the volume: an early, untrained model), in both conventions.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit  # noqa: E402
from core.task import load_task  # noqa: E402
from inference.tuning import tune_postprocessing  # noqa: E402
from metrics import case_metrics, confusion_matrix, hd95  # noqa: E402

SHAPE = (240, 240, 155)


def synthetic_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, reference) training-class maps of a tumour-like case."""
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE, dtype=np.float32)
    centre = np.array([130.0, 110.0, 80.0])
    radius = np.sqrt((((grid - centre[:, None, None, None]) / np.array([1.0, 1.2, 0.9])[:, None, None, None]) ** 2).sum(0))
    bumps = ndimage.gaussian_filter(rng.normal(0, 1, SHAPE).astype(np.float32), 6) * 40
    r = radius + bumps
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[r < 30] = 2  # edema
    ref[r < 18] = 3  # enhancing rim
    ref[r < 12] = 1  # necrotic core
    shifted = np.roll(ref, (2, -1, 1), axis=(0, 1, 2))
    pred = shifted.copy()
    pred[(shifted == 3) & ~ndimage.binary_erosion(shifted == 3, iterations=1)] = 1  # thinner rim
    pred[60:64, 60:64, 40:43] = 3  # stray enhancing island
    return pred, ref


def tuning_seconds(pred, ref, spacing, task, repeats: int) -> dict[str, float]:
    """Seconds of ``tune_postprocessing`` on the case alone and with 60 stray enhancing voxels."""
    noisy = pred.copy()
    strays = np.random.default_rng(1).integers(0, np.array(SHAPE)[:, None], size=(3, 60))
    noisy[tuple(strays)] = 3
    return {f"{name}_{convention}": median_time(lambda p=p, c=convention: tune_postprocessing(
                [(p, ref, spacing)], task, c), repeats)
            for name, p in (("case", pred), ("noisy", noisy)) for convention in ("legacy", "lesionwise")}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--task", default="brats-gli-2023",
                        help="task name or YAML whose regions and lesion rules are timed (default brats-gli-2023)")
    parser.add_argument("-o", "--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    task = load_task(args.task)
    pred, ref = synthetic_case()
    spacing = (1.0, 1.0, 1.0)
    case_metrics(pred, ref, spacing, task)  # warm-up
    region_masks = {r.name: (np.isin(pred, r.classes), np.isin(ref, r.classes)) for r in task.regions}
    result = {
        "shape": list(SHAPE),
        "task": task.name,
        "voxels": {f"{name}_ref": int(r.sum()) for name, (_, r) in region_masks.items()},
        "repeats": args.repeats,
        "seconds_per_case": {
            "legacy_without_hd95": median_time(lambda: case_metrics(pred, ref, spacing, task, hd95=False),
                                               args.repeats),
            "legacy_with_hd95": median_time(lambda: case_metrics(pred, ref, spacing, task), args.repeats),
            "lesionwise_with_hd95": median_time(lambda: case_metrics(pred, ref, spacing, task, "lesionwise"),
                                                args.repeats),
        },
        "seconds_parts": {
            "confusion_matrix": median_time(lambda: confusion_matrix(pred, ref, task.num_classes), args.repeats),
            **{f"hd95_{name}_full_volume": median_time(lambda p=p, r=r: hd95(p, r, spacing), args.repeats)
               for name, (p, r) in region_masks.items()},
        },
        "seconds_tuning_per_case": tuning_seconds(pred, ref, spacing, task, args.repeats),
        "scores_legacy": case_metrics(pred, ref, spacing, task),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__},
    }
    return emit(result, args.output)


if __name__ == "__main__":
    sys.exit(main())
