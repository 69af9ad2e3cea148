"""Compare our Dice, HD95 and NSD with medpy and MONAI on random and blob-like masks (JSON out).

The peers are not dependencies of this repository; install them into a throwaway folder:

    pip install --target /tmp/peer_pkgs --no-deps medpy monai
    PYTHONPATH=/tmp/peer_pkgs python bench/compare_metrics.py [--cases 40] [-o bench/results/compare_metrics.json]

Expected: HD95 identical to medpy's ``hd95`` (same pooled definition); MONAI's HD95 (larger of
the two directed 95th percentiles) >= ours; NSD at 0.5 and 1.0 mm equal (up to the script's 1e-8)
to the BraTS 2025 scripts' ``normalized_surface_dice`` (``rachitsaluja/BraTS-2024-Metrics``, built
on medpy's ``__surface_distances``; reproduced in ``brats_script_nsd``). Missing peers are skipped
with a note.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit  # noqa: E402
from metrics.overlap import dice_from_counts, mask_counts  # noqa: E402
from metrics.surface import NSD_TOLERANCES, hd95, nsd  # noqa: E402

SPACINGS = [(1.0, 1.0, 1.0), (0.5, 0.5, 3.0), (1.2, 0.8, 2.5), (0.9375, 0.9375, 5.0)]


def blob(rng: np.random.Generator, shape: tuple[int, ...], n: int) -> np.ndarray:
    """Union of ``n`` random ellipsoids, smoothed and thresholded (tumour-like masks)."""
    grid = np.indices(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n):
        centre = rng.uniform(0.3, 0.7, 3) * np.asarray(shape)
        radii = rng.uniform(0.05, 0.2, 3) * np.asarray(shape)
        mask |= (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
    noisy = ndimage.gaussian_filter(mask.astype(np.float32) + rng.normal(0, 0.3, shape).astype(np.float32), 1.5)
    return noisy > 0.5


def perturb(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A plausible prediction: shifted, eroded or dilated, with a stray island."""
    out = np.roll(mask, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2))
    op = rng.integers(3)
    if op == 1:
        out = ndimage.binary_erosion(out, iterations=int(rng.integers(1, 3)))
    elif op == 2:
        out = ndimage.binary_dilation(out, iterations=int(rng.integers(1, 3)))
    corner = tuple(int(rng.integers(0, s - 4)) for s in mask.shape)
    out[tuple(slice(c, c + 3) for c in corner)] = True
    return out


def pairs(rng: np.random.Generator, n: int):
    shape = (64, 56, 40)
    for i in range(n):
        kind = "noise" if i % 4 == 0 else "blobs"
        if kind == "noise":  # random voxels: many tiny components, worst case for surfaces
            ref, pred = rng.random(shape) < 0.05, rng.random(shape) < 0.05
        else:
            ref = blob(rng, shape, int(rng.integers(1, 4)))
            pred = perturb(rng, ref)
        if ref.any() and pred.any():
            yield kind, ref, pred, SPACINGS[int(rng.integers(len(SPACINGS)))]


def brats_script_nsd(surface_distances, a: np.ndarray, b: np.ndarray, threshold: float, spacing) -> float:
    """``normalized_surface_dice`` of the BraTS 2025 metric scripts (``metrics_GLI.py`` and
    siblings, from nnU-Net v1), given medpy's ``__surface_distances``; both masks non-empty."""
    a_to_b = surface_distances(a, b, spacing, 1)
    b_to_a = surface_distances(b, a, spacing, 1)
    tp_a, tp_b = np.sum(a_to_b <= threshold) / len(a_to_b), np.sum(b_to_a <= threshold) / len(b_to_a)
    fp, fn = np.sum(a_to_b > threshold) / len(a_to_b), np.sum(b_to_a > threshold) / len(b_to_a)
    return float((tp_a + tp_b) / (tp_a + tp_b + fp + fn + 1e-8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI's internal deprecation notices
    try:
        from medpy.metric import binary as medpy_binary
    except ImportError:
        medpy_binary = None
    medpy_surface = getattr(medpy_binary, "__surface_distances", None) if medpy_binary is not None else None
    try:
        import torch
        from monai.metrics import compute_dice, compute_hausdorff_distance
    except ImportError:
        compute_dice = compute_hausdorff_distance = None
    if medpy_binary is None and compute_hausdorff_distance is None:
        print(json.dumps({"skipped": "neither medpy nor monai is importable (see the module docstring)"}))
        return 0

    rng = np.random.default_rng(args.seed)
    by_kind: dict[str, dict[str, list[float]]] = {}
    for kind, ref, pred, spacing in pairs(rng, args.cases):
        diffs = by_kind.setdefault(kind, {"medpy_dice": [], "medpy_hd95": [], "monai_dice": [],
                                          "monai_hd95_minus_ours": [], "ours_hd95": []})
        ours_dice = dice_from_counts(mask_counts(pred, ref))
        ours_hd = hd95(pred, ref, spacing)
        diffs["ours_hd95"].append(ours_hd)
        if medpy_binary is not None:
            diffs["medpy_dice"].append(abs(ours_dice - medpy_binary.dc(pred, ref)))
            diffs["medpy_hd95"].append(abs(ours_hd - medpy_binary.hd95(pred, ref, voxelspacing=spacing)))
        if medpy_surface is not None:
            for tolerance in NSD_TOLERANCES:
                official = brats_script_nsd(medpy_surface, pred, ref, tolerance, spacing)
                diffs.setdefault(f"brats_script_nsd_{tolerance}", []).append(
                    abs(nsd(pred, ref, spacing, tolerance) - official))
        if compute_hausdorff_distance is not None:
            p = torch.from_numpy(pred)[None, None].float()
            r = torch.from_numpy(ref)[None, None].float()
            diffs["monai_dice"].append(abs(ours_dice - float(compute_dice(p, r, include_background=True))))
            monai_hd = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                                        spacing=list(spacing)))
            diffs["monai_hd95_minus_ours"].append(monai_hd - ours_hd)
    result: dict = {"spacings": [list(s) for s in SPACINGS]}
    for kind, diffs in by_kind.items():
        entry: dict = {"cases": len(diffs["ours_hd95"])}
        for key, values in diffs.items():
            if values:
                arr = np.asarray(values)
                entry[key] = ({"min": float(arr.min()), "max": float(arr.max()), "mean": float(arr.mean())}
                              if key in ("monai_hd95_minus_ours", "ours_hd95") else {"max_abs_diff": float(arr.max())})
        result[kind] = entry
    return emit(result, args.output)


if __name__ == "__main__":
    sys.exit(main())
