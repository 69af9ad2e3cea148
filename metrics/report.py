"""Summaries and reports of per-case metrics.

    per_case = {"BraTS-GLI-00000-000": case_metrics(pred, ref, spacing, task), ...}
    summary = aggregate(per_case)
    print(format_table(summary))
    write_report(per_case, summary, "out/metrics.json", "out/metrics.csv", "legacy", task)

The regions are those of the per-case dicts (a task's ``regions``, in order).
``summary[region][metric] = {"mean", "median", "std", "n"}`` over cases (``std`` is the sample
standard deviation, ddof=1; 0 for one case), and ``summary[region]["empty_reference"]`` counts
the cases whose reference region is empty (``ref_voxels == 0``).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from core.atomic import atomic_write_text, json_default
from core.task import Task
from metrics.case import rules_text

TABLE_METRICS = (("dice", "Dice"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
                 ("hd95", "HD95 (mm)"))


def aggregate(per_case: dict[str, dict]) -> dict[str, dict]:
    """Mean, median, std and count of every numeric metric per region, plus ``empty_reference``."""
    if not per_case:
        raise ValueError("no cases to aggregate")
    regions = _regions(per_case)
    summary = {}
    for region in regions:
        rows = [scores[region] for scores in per_case.values()]
        entry: dict = {"empty_reference": sum(1 for row in rows if row.get("ref_voxels", 1) == 0)}
        for key in _metric_keys(rows):
            values = np.asarray([row[key] for row in rows if row.get(key) is not None], dtype=np.float64)
            entry[key] = {
                "mean": float(values.mean()), "median": float(np.median(values)),
                "std": float(values.std(ddof=1)) if values.size > 1 else 0.0, "n": int(values.size),
            }
        summary[region] = entry
    return summary


def means(summary: dict[str, dict]) -> dict[str, dict[str, float]]:
    """``{region: {metric: mean}}`` from an ``aggregate`` summary."""
    return {region: {k: v["mean"] for k, v in entry.items() if isinstance(v, dict)}
            for region, entry in summary.items()}


def format_table(summary: dict[str, dict]) -> str:
    """Aligned text table: one row per region, ``mean ± std (median)`` per metric."""
    metrics = [(key, title) for key, title in TABLE_METRICS if any(key in e for e in summary.values())]
    header = ["Region", "Cases"] + [title for _, title in metrics] + ["Empty ref"]
    rows = [header]
    for region, entry in summary.items():
        n = max((v["n"] for v in entry.values() if isinstance(v, dict)), default=0)
        cells = [region, str(n)]
        for key, _ in metrics:
            stats = entry[key]
            digits = 2 if key == "hd95" else 4
            cells.append(f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} ({stats['median']:.{digits}f})")
        cells.append(str(entry["empty_reference"]))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(mean ± std (median) over cases)"


def write_report(per_case: dict[str, dict], summary: dict[str, dict], json_path: str | Path,
                 csv_path: str | Path, convention: str, task: Task) -> None:
    """Write the JSON report and the per-case/per-region CSV, each atomically.

    JSON: ``{"convention", "task": name, "regions": {region: [label names]}, "rules" (the empty-mask,
    NSD and per-region lesion rules in words), "cases": {id: {region: {metric: value}}}, "mean":
    {region: {metric: mean}}, "summary": aggregate(...)}``. CSV: one row per case and region of
    ``task`` (``case_id``, ``region`` and every metric; empty cells for missing values).
    """
    names = task.class_names
    report = {
        "convention": convention,
        "task": task.name,
        "regions": {r.name: [names[c] for c in r.classes] for r in task.regions},
        "rules": rules_text(convention, task),
        "cases": per_case,
        "mean": means(summary),
        "summary": summary,
    }
    atomic_write_text(Path(json_path), json.dumps(report, indent=2, default=json_default) + "\n")
    atomic_write_text(Path(csv_path), _csv_text(per_case, list(task.region_names)))


def _metric_keys(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in keys and isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                keys.append(key)
    return keys


def _regions(per_case: dict[str, dict]) -> list[str]:
    """The region names of the first case, in order; ``ValueError`` if another case has other regions."""
    first_id, first = next(iter(per_case.items()))
    regions = list(first)
    for case_id, scores in per_case.items():
        if set(scores) != set(regions):
            raise ValueError(f"case {case_id} has regions {list(scores)}, case {first_id} has {regions} "
                             "(aggregate the cases of one task)")
    return regions


def _csv_text(per_case: dict[str, dict], regions: list[str]) -> str:
    keys = _metric_keys([scores.get(r, {}) for scores in per_case.values() for r in regions])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case_id", "region"] + keys)
    for case_id, scores in per_case.items():
        for region in regions:
            row = scores.get(region, {})
            writer.writerow([case_id, region] + [_csv_value(row.get(k)) for k in keys])
    return buffer.getvalue()


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)
