"""BraTS evaluation, driven by a task (``core.task.Task``): Dice, sensitivity, specificity, HD95
and NSD of the task's regions, legacy and lesion-wise.

    from core.task import load_task
    from metrics import case_metrics, aggregate, format_table, write_report
    task = load_task("brats-met")
    scores = case_metrics(pred_classes, ref_classes, spacing, task, convention="lesionwise")
    summary = aggregate({"case_1": scores, ...})

Modules: ``overlap`` (Dice/sensitivity/specificity from voxel counts), ``surface`` (official
pooled HD95 and the BraTS 2025 NSD), ``lesionwise`` (BraTS 2023/2024 lesion matching),
``case`` (per-case metrics of a task's regions and the rules in words), ``report`` (aggregate,
table, JSON/CSV), ``files`` (evaluate prediction files against reference files).
"""
from metrics.case import CONVENTIONS, RULES, binary_metrics, case_metrics, evaluate_labels, rules_text
from metrics.files import evaluate_files, pair_cases, read_classes, reference_files
from metrics.lesionwise import LESION_MISS_HD95, lesionwise_metrics
from metrics.overlap import confusion_matrix, overlap_metrics, region_counts
from metrics.report import aggregate, format_table, means, write_report
from metrics.surface import LEGACY_EMPTY_HD95, NSD_TOLERANCES, hd95, legacy_hd95, nsd, surface_distances, surface_scores

__all__ = [
    "CONVENTIONS", "RULES", "binary_metrics", "case_metrics", "evaluate_labels", "rules_text",
    "evaluate_files", "pair_cases", "read_classes", "reference_files", "LESION_MISS_HD95", "lesionwise_metrics",
    "confusion_matrix", "overlap_metrics", "region_counts", "aggregate", "format_table", "means",
    "write_report", "LEGACY_EMPTY_HD95", "NSD_TOLERANCES", "hd95", "legacy_hd95", "nsd", "surface_distances",
    "surface_scores",
]
