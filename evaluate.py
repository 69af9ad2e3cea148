"""Evaluate predicted segmentations against reference labels, per region of the task.

    python evaluate.py --pred predictions/unet3d --ref data/brats [--task auto] [--convention lesionwise] [-o out.json]
    # -> predictions/unet3d/evaluation.json + evaluation.csv (infer.py's metrics.json is left as it is)

Predictions are ``PRED_DIR/<case_id>.nii.gz``; references are a dataset folder (case folders with
label files, or the MSD layout) or a flat folder of ``<case_id>.nii.gz`` label files. The task
(labels, evaluated regions, lesion-wise parameters) is ``--task`` or detected from the reference
case names and label values (``datasets/detect.py``); predictions are read in each case's task
(``--pred-task`` when they were written in another naming variant, e.g. ET = 4 for 2023 data).
Writes a JSON report (default ``PRED_DIR/evaluation.json``, so the ``metrics.json`` that
``infer.py`` wrote there is not replaced) and a CSV with one row per case and region next to it
(``evaluation.csv``), and prints the summary table; the report's folder must be writable (checked
before any case is read). ``--subset`` scores a prediction folder that covers only part of the
references and lists the references it skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.atomic import atomic_write_text, check_writable
from core.errors import UserError, run_cli
from core.task import CaseFacts, load_task
from datasets.detect import choose_from_facts, file_label_values
from datasets.io import discover_cases
from inference.tuning import tune_case, tune_postprocessing
from metrics import aggregate, evaluate_files, format_table, write_report
from metrics.case import CONVENTIONS
from metrics.files import nifti_files, pair_cases, read_classes, reference_files


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", required=True, action="append",
                        help="folder of predictions <case_id>.nii.gz; repeat for several folders (e.g. one per "
                             "fold's validation cases): their cases are scored together")
    parser.add_argument("--ref", required=True, help="dataset folder or flat folder of <case_id>.nii.gz labels")
    parser.add_argument("--task", default="auto",
                        help="task of the references: auto (detected), a built-in name or a task YAML (default: auto)")
    parser.add_argument("--pred-task", default=None,
                        help="task whose label values the predictions use (default: each reference case's)")
    parser.add_argument("--convention", choices=CONVENTIONS, default="legacy",
                        help="empty-mask/lesion rules (default: %(default)s); lesion parameters come from the task")
    parser.add_argument("-o", "--output",
                        help="JSON report path (default: PRED_DIR/evaluation.json, not infer.py's metrics.json); "
                             "the CSV goes next to it")
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 and NSD (much faster)")
    parser.add_argument("--subset", action="store_true",
                        help="score only the references that have a prediction (the others are listed)")
    parser.add_argument("-j", "--workers", type=int, default=1, help="parallel processes (default: 1)")
    parser.add_argument("--tune-postprocessing", metavar="JSON",
                        help="instead of a report: choose post-processing on these predictions (inference/tuning.py) "
                             "and write it here, for infer.py --postprocessing JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pred_dirs, ref_dir = [Path(p) for p in args.pred], Path(args.ref)
    pred_dir = pred_dirs[0]
    json_path = Path(args.tune_postprocessing or args.output or pred_dir / "evaluation.json")
    csv_path = json_path.with_suffix(".csv")
    if ref_dir.is_dir() and json_path.resolve().is_relative_to(ref_dir.resolve()):
        raise UserError(f"{json_path}: refusing to write the report inside the reference folder {ref_dir}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    for folder in pred_dirs:
        if not folder.is_dir():
            raise UserError(f"{folder}: prediction folder not found")
    if json_path.is_dir():
        raise UserError(f"{json_path}: -o is a folder; give the path of the JSON report "
                        f"(e.g. {json_path / 'evaluation.json'})")
    check_writable(json_path.parent, "-o")  # before any case is read

    pairs, extra, skipped = pair_folders(pred_dirs, ref_dir, args.subset)
    if extra:
        print(f"note: {len(extra)} predictions have no reference and are ignored (first: {extra[0]})", file=sys.stderr)
    if skipped:
        shown = ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        print(f"note: --subset: {len(skipped)} reference case(s) without a prediction are not scored: {shown}",
              file=sys.stderr)
    if not pairs:
        raise UserError(f"{pred_dir}: no prediction matches a reference case of {ref_dir}")
    choice = choose_from_facts(reference_facts(ref_dir, {case_id: ref for case_id, _, ref in pairs}, args.workers),
                               args.task)
    pred_task = load_task(args.pred_task) if args.pred_task else None
    if pred_task is not None and not pred_task.compatible_with(choice.task):
        raise UserError(f"--pred-task: task {pred_task.name} has other classes or regions than the references' "
                        f"task {choice.task.name}")

    if args.tune_postprocessing:
        return tune(args, pairs, choice, pred_task, json_path)
    job = partial(_evaluate_one, convention=args.convention, hd95=not args.no_hd95)
    jobs = [(pred, ref, choice.per_case[case_id], pred_task or choice.per_case[case_id]) for case_id, pred, ref in pairs]
    with ProcessPoolExecutor(args.workers) if args.workers > 1 else nullcontext() as pool:
        results = pool.map(job, jobs) if pool else map(job, jobs)
        progress = tqdm(results, total=len(pairs), desc="evaluate", unit="case", disable=None)
        per_case = {case_id: scores for (case_id, _, _), scores in zip(pairs, progress)}

    summary = aggregate(per_case)
    write_report(per_case, summary, json_path, csv_path, args.convention, choice.task)
    print(f"{len(per_case)} cases, task {choice.task.name}, {args.convention} convention")
    print(format_table(summary))
    print(f"wrote {json_path} and {csv_path}")
    return 0


def pair_folders(pred_dirs: list[Path], ref_dir: Path, subset: bool) -> tuple[list, list[str], list[str]]:
    """``pair_cases`` of one prediction folder, or the union of several (each covering part of the
    references: then the references none of them covers are listed as skipped)."""
    if len(pred_dirs) == 1:
        return pair_cases(pred_dirs[0], ref_dir, subset=subset)
    pairs, extra, seen = [], [], {}
    for folder in pred_dirs:
        folder_pairs, folder_extra, _ = pair_cases(folder, ref_dir, subset=True)
        for case_id, pred, ref in folder_pairs:
            if case_id in seen:
                raise UserError(f"{pred}: case {case_id} is also predicted in {seen[case_id]}")
            seen[case_id] = folder
            pairs.append((case_id, pred, ref))
        extra += folder_extra
    covered = set(seen)
    skipped = [case_id for case_id in reference_files(ref_dir) if case_id not in covered]
    if skipped and not subset:
        raise UserError(f"{ref_dir}: {len(skipped)} reference case(s) are in none of the prediction folders "
                        f"(first: {skipped[0]}); add --subset to score the others")
    return sorted(pairs), sorted(set(extra) - covered), skipped


def tune(args, pairs, choice, pred_task, json_path: Path) -> int:
    """``--tune-postprocessing``: the rules chosen on these predictions, written for infer.py."""
    cases = []
    for case_id, pred_path, ref_path in tqdm(pairs, desc="read", unit="case", disable=None):
        task = choice.per_case[case_id]
        ref, ref_img = read_classes(ref_path, task)
        pred, pred_img = read_classes(pred_path, pred_task or task)
        if pred.shape != ref.shape:
            raise UserError(f"{pred_path}: shape {pred.shape} differs from the reference {ref_path.name} {ref.shape}")
        spacing = tuple(float(v) for v in np.linalg.norm(ref_img.affine[:3, :3], axis=0))
        cases.append(tune_case(pred, ref, spacing, choice.task))  # cropped to the tumour: not every file in memory
    result = tune_postprocessing(cases, choice.task, args.convention)
    where = "of " + ", ".join(args.pred)
    record = {"rules": result.rules.to_dict(), "source": result.source(args.convention, where),
              "convention": args.convention, "task": choice.task.name, "mean_dice_before": result.before,
              "mean_dice_after": result.after, "dice_before": result.regions_before, "dice_after": result.regions_after}
    atomic_write_text(json_path, json.dumps(record, indent=1) + "\n")
    print(f"{result.cases} cases, task {choice.task.name}, {args.convention} convention: post-processing "
          f"{result.rules.describe(choice.task)}")
    print("region  " + "  ".join(f"{r:>8}" for r in choice.task.region_names) + "      mean")
    for label, values, mean in (("before", result.regions_before, result.before),
                                ("after", result.regions_after, result.after)):
        print(f"{label:<6}  " + "  ".join(f"{values[r]:8.4f}" for r in choice.task.region_names) + f"  {mean:8.4f}")
    print(f"wrote {json_path} (infer.py ... --postprocessing {json_path})")
    return 0


def reference_facts(ref_dir: Path, refs: dict, workers: int) -> list[CaseFacts]:
    """Detection facts of the reference cases: names, label values and, for a dataset folder
    (not a flat folder of label files), the layout of each case (images are not needed to score)."""
    values = file_label_values(refs, workers=workers)
    cases = {} if nifti_files(ref_dir) else {c.case_id: c for c in discover_cases(ref_dir)}
    facts = []
    for case_id, path in refs.items():
        case = cases.get(case_id)
        facts.append(CaseFacts(case_id, case.layout if case else None, None, tuple(values[case_id]), str(path)))
    return facts


def _evaluate_one(job, convention: str, hd95: bool) -> dict:
    pred, ref, task, pred_task = job
    return evaluate_files(pred, ref, task, convention, hd95=hd95, pred_task=pred_task)


if __name__ == "__main__":
    run_cli(main)
