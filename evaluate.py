"""Evaluate predicted segmentations against reference labels (BraTS WT/TC/ET metrics).

    python evaluate.py --pred runs/unet3d/predictions --ref data/brats [--convention lesionwise] [-o out.json]

Predictions are ``PRED_DIR/<case_id>.nii.gz``; references are a BraTS dataset folder (case
folders with seg files) or a flat folder of ``<case_id>.nii.gz`` label files. Label conventions
(ET = 4 or 3) are detected per file. Writes a JSON report (default ``PRED_DIR/metrics.json``) and
a CSV with one row per case and region next to it, and prints the summary table.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

from tqdm import tqdm

from engine.config import MetricsConfig
from engine.errors import UserError, run_cli
from metrics import aggregate, evaluate_files, format_table, pair_cases, write_report
from metrics.case import CONVENTIONS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = MetricsConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", required=True, help="folder of predictions <case_id>.nii.gz")
    parser.add_argument("--ref", required=True, help="BraTS dataset folder or flat folder of <case_id>.nii.gz labels")
    parser.add_argument("--convention", choices=CONVENTIONS, default=defaults.convention,
                        help="empty-mask/lesion rules (default: %(default)s)")
    parser.add_argument("-o", "--output", help="JSON report path (default: PRED_DIR/metrics.json); the CSV goes next to it")
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 (much faster)")
    parser.add_argument("--lesion-dilation", type=int, default=defaults.lesion_dilation,
                        help="lesion-wise: reference dilation iterations (default: %(default)s; MEN/MET: 1)")
    parser.add_argument("--lesion-min-volume", type=float, default=defaults.lesion_min_volume,
                        help="lesion-wise: lesions <= this volume in mm^3 are not scored (default: %(default)s; MET: 2)")
    parser.add_argument("-j", "--workers", type=int, default=1, help="parallel processes (default: 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pred_dir, ref_dir = Path(args.pred), Path(args.ref)
    json_path = Path(args.output) if args.output else pred_dir / "metrics.json"
    csv_path = json_path.with_suffix(".csv")
    if ref_dir.is_dir() and json_path.resolve().is_relative_to(ref_dir.resolve()):
        raise UserError(f"{json_path}: refusing to write the report inside the reference folder {ref_dir}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.lesion_dilation < 0:
        raise UserError(f"--lesion-dilation must be >= 0, got {args.lesion_dilation}")

    pairs, extra = pair_cases(pred_dir, ref_dir)
    if extra:
        print(f"note: {len(extra)} predictions have no reference and are ignored (first: {extra[0]})", file=sys.stderr)
    options = dict(convention=args.convention, hd95=not args.no_hd95, dilation=args.lesion_dilation,
                   min_volume=args.lesion_min_volume)
    job = partial(evaluate_files, **options)
    preds, refs = [p for _, p, _ in pairs], [r for _, _, r in pairs]
    with ProcessPoolExecutor(args.workers) if args.workers > 1 else nullcontext() as pool:
        results = pool.map(job, preds, refs) if pool else map(job, preds, refs)
        progress = tqdm(results, total=len(pairs), desc="evaluate", unit="case", disable=None)
        per_case = {case_id: scores for (case_id, _, _), scores in zip(pairs, progress)}

    summary = aggregate(per_case)
    write_report(per_case, summary, json_path, csv_path, args.convention, args.lesion_dilation, args.lesion_min_volume)
    print(f"{len(per_case)} cases, {args.convention} convention")
    print(format_table(summary))
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
