"""BraTS evaluation: Dice, sensitivity, specificity and HD95 of WT/TC/ET, legacy and lesion-wise.

    from metrics import case_metrics, aggregate, format_table, write_report
    scores = case_metrics(pred_classes, ref_classes, spacing, convention="legacy")
    summary = aggregate({"case_1": scores, ...})

Modules: ``overlap`` (Dice/sensitivity/specificity from voxel counts), ``surface`` (official
pooled HD95), ``lesionwise`` (BraTS 2023 lesion matching), ``case`` (per-case metrics of the
three regions and the rules in words), ``report`` (aggregate, table, JSON/CSV), ``files``
(evaluate prediction files against reference files).
"""
from metrics.case import CONVENTIONS, RULES, binary_metrics, case_metrics, evaluate_labels, rules_text
from metrics.files import evaluate_files, pair_cases, reference_files
from metrics.lesionwise import LESION_MISS_HD95, lesionwise_metrics
from metrics.overlap import confusion_matrix, overlap_metrics, region_counts
from metrics.report import aggregate, format_table, means, write_report
from metrics.surface import LEGACY_EMPTY_HD95, hd95, legacy_hd95, surface_distances

__all__ = [
    "CONVENTIONS", "RULES", "binary_metrics", "case_metrics", "evaluate_labels", "rules_text",
    "evaluate_files", "pair_cases", "reference_files", "LESION_MISS_HD95", "lesionwise_metrics",
    "confusion_matrix", "overlap_metrics", "region_counts", "aggregate", "format_table", "means",
    "write_report", "LEGACY_EMPTY_HD95", "hd95", "legacy_hd95", "surface_distances",
]
