"""Check a training run (and optionally its predictions) the way a user would: JSON out, exit 1 on a failure.

    python bench/check_run.py runs/unet3d [--min-validations 3] [--no-loss-check]
    python bench/check_run.py runs/unet3d --predictions predictions/unet3d --data data/brats

Run folder: ``config.yaml``, ``split.json``, ``last.pt`` and ``best.pt`` exist and load;
``metrics.jsonl`` has at least ``--min-validations`` lines with finite Dice; the epoch training
loss of the last validation is below that of the first (unless ``--no-loss-check``).
Predictions: one ``<case_id>.nii.gz`` per case of ``--data``, each with the shape, affine and
header codes of the case's first image file and only label values of the run's task (or a naming
variant of it), and a ``metrics.json`` with a finite mean Dice for every region of the task over
the cases that have a reference. Used by ``bench/gpu_check.sh``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.checkpoint import load_checkpoint, stored_task  # noqa: E402
from core.task import CaseFacts  # noqa: E402
from datasets.detect import choose_from_facts  # noqa: E402
from datasets.io import discover_cases  # noqa: E402


def check_run(run: Path, min_validations: int, loss_check: bool) -> tuple[dict, list[str]]:
    """``(summary, failures)`` of a run folder."""
    failures = [f"{run / name} is missing" for name in ("config.yaml", "split.json", "last.pt", "best.pt", "metrics.jsonl")
                if not (run / name).exists()]
    if failures:
        return {}, failures
    best = load_checkpoint(run / "best.pt")
    last = load_checkpoint(run / "last.pt")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = {
        "validations": len(records),
        "train_loss": [round(r["train_loss"], 4) for r in records],
        "mean_dice": [round(r["mean_dice"], 4) for r in records],
        "best": best["best"], "last_iteration": last["iteration"], "task": stored_task(last, run / "last.pt").name,
        "world_size": last["world_size"],
    }
    if len(records) < min_validations:
        failures.append(f"metrics.jsonl has {len(records)} validations, expected >= {min_validations}")
    if not all(math.isfinite(r["mean_dice"]) and math.isfinite(r["train_loss"]) for r in records):
        failures.append("a validation Dice or training loss is not finite")
    if loss_check and len(records) >= 2 and not records[-1]["train_loss"] < records[0]["train_loss"]:
        failures.append(f"training loss did not fall: {summary['train_loss']}")
    return summary, failures


def check_predictions(predictions: Path, data: Path, task) -> tuple[dict, list[str]]:
    """``(summary, failures)`` of an infer.py output folder against the dataset it was run on
    (``task``: the run's; label values of any naming variant of it are accepted)."""
    failures = []
    cases = discover_cases(data)
    for case in cases:
        path = predictions / f"{case.case_id}.nii.gz"
        if not path.exists():
            failures.append(f"{path} is missing")
            continue
        pred, source = nib.load(path), nib.load(case.image_sources(task.modalities[:1], task)[0][0])
        if pred.shape != source.shape[:3]:
            failures.append(f"{path}: shape {pred.shape} != input {source.shape}")
        if not np.allclose(pred.affine, source.affine, atol=1e-5):
            failures.append(f"{path}: affine differs from the input's")
        if (int(pred.header["sform_code"]), int(pred.header["qform_code"])) != \
                (int(source.header["sform_code"]), int(source.header["qform_code"])):
            failures.append(f"{path}: sform/qform codes differ from the input's")
        values = set(np.unique(np.asarray(pred.dataobj)).tolist())
        own = choose_from_facts([CaseFacts(case.case_id, case.layout, None, None)], "auto", prefer=task).task
        if not values <= set(own.label_values):  # the case's naming variant of the run's task
            failures.append(f"{path}: label values {sorted(values)} are not labels of task {own.name} "
                            f"({own.describe_labels()})")
    summary: dict = {"cases": len(cases)}
    report_path = predictions / "metrics.json"
    if any(case.seg is not None for case in cases):
        if not report_path.exists():
            failures.append(f"{report_path} is missing")
        else:
            mean = json.loads(report_path.read_text())["mean"]
            summary["mean_dice"] = {r: round(mean[r]["dice"], 4) for r in task.region_names}
            if not all(math.isfinite(v) for v in summary["mean_dice"].values()):
                failures.append(f"{report_path}: a mean Dice is not finite")
    return summary, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="training run folder")
    parser.add_argument("--min-validations", type=int, default=1)
    parser.add_argument("--no-loss-check", action="store_true", help="do not require the training loss to fall")
    parser.add_argument("--predictions", type=Path, help="infer.py output folder to check")
    parser.add_argument("--data", type=Path, help="the dataset the predictions were made for")
    args = parser.parse_args(argv)
    if (args.predictions is None) != (args.data is None):
        parser.error("--predictions and --data go together")
    report, failures = {}, []
    report["run"], failures = check_run(args.run, args.min_validations, not args.no_loss_check)
    if args.predictions is not None and not failures:
        task = stored_task(load_checkpoint(args.run / "last.pt"), args.run / "last.pt")
        report["predictions"], more = check_predictions(args.predictions, args.data, task)
        failures += more
    report["failures"] = failures
    print(json.dumps(report, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
