"""Metrics: hand-computed overlap scores for every built-in task, HD95 (official pooled definition),
NSD (BraTS 2025 scripts) against a brute-force implementation, empty-mask rules, lesion-wise
matching with the 2024 prediction merging, files, aggregation and reports."""
import csv
import itertools
import json

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from core.errors import UserError
from core.task import builtin_tasks, load_task
from metrics import (
    LEGACY_EMPTY_HD95,
    LESION_MISS_HD95,
    aggregate,
    binary_metrics,
    case_metrics,
    confusion_matrix,
    evaluate_files,
    evaluate_labels,
    format_table,
    hd95,
    legacy_hd95,
    lesionwise_metrics,
    nsd,
    pair_cases,
    read_classes,
    reference_files,
    rules_text,
    surface_distances,
    surface_scores,
    write_report,
)

GLI23 = load_task("brats-gli-2023")
GLI24 = load_task("brats-gli-2024")
MET = load_task("brats-met")
PED = load_task("brats-ped")


def mask(shape, *boxes):
    """Boolean array of ``shape`` with each ``((x0, x1), (y0, y1), (z0, z1))`` box set."""
    out = np.zeros(shape, dtype=bool)
    for box in boxes:
        out[tuple(slice(a, b) for a, b in box)] = True
    return out


def brute_border(m):
    """Border by the definition: a voxel of ``m`` with a 6-neighbour outside ``m`` (outside the
    array counts as outside)."""
    padded = np.pad(m, 1)
    inner = np.ones_like(m)
    for axis, step in itertools.product(range(3), (-1, 1)):
        inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return m & ~inner


def brute_directed(a, b, spacing):
    """For each border voxel of ``a``, the distance (mm) to the nearest border voxel of ``b``
    (all pairs, scipy cdist)."""
    pa = np.argwhere(brute_border(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_border(b)) * np.asarray(spacing)
    return cdist(pa, pb).min(axis=1)


def brute_force_hd95(pred, ref, spacing):
    """Independent reference: pooled 95th percentile of both directions."""
    return float(np.percentile(np.concatenate([brute_directed(pred, ref, spacing),
                                               brute_directed(ref, pred, spacing)]), 95))


def brute_force_nsd(pred, ref, spacing, tolerance):
    """Independent reference of the BraTS 2025 NSD: mean of the two directed fractions."""
    if not pred.any() and not ref.any():
        return 1.0
    if not pred.any() or not ref.any():
        return 0.0
    a_to_b, b_to_a = brute_directed(pred, ref, spacing), brute_directed(ref, pred, spacing)
    return ((a_to_b <= tolerance).mean() + (b_to_a <= tolerance).mean()) / 2


# ----------------------------------------------------------------------------------------------
# Dice, sensitivity, specificity
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, ref, dice, sens, spec", [
    # tp=2 fp=1 fn=1 tn=4
    ([1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0, 0], 4 / 6, 2 / 3, 4 / 5),
    # perfect
    ([0, 1, 1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0], 1.0, 1.0, 1.0),
    # disjoint: tp=0 fp=2 fn=1 tn=5
    ([1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0], 0.0, 0.0, 5 / 7),
    # over-segmentation: tp=2 fp=4 fn=0 tn=2
    ([1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], 4 / 8, 1.0, 2 / 6),
])
def test_overlap_metrics_hand_values(pred, ref, dice, sens, spec):
    p = np.asarray(pred, dtype=bool).reshape(2, 2, 2)
    r = np.asarray(ref, dtype=bool).reshape(2, 2, 2)
    scores = binary_metrics(p, r, (1, 1, 1), hd95=False)
    assert scores["dice"] == pytest.approx(dice)
    assert scores["sensitivity"] == pytest.approx(sens)
    assert scores["specificity"] == pytest.approx(spec)
    assert "hd95" not in scores and "nsd_1.0" not in scores
    assert scores["ref_voxels"] == sum(ref) and scores["pred_voxels"] == sum(pred)


# Per task: reference and prediction as training classes, one voxel each (classes in the YAML's
# label order), and the expected (dice, sensitivity, specificity) of every region by hand.
GLIOMA_LIKE = (  # classes 1 core (NCR/NETC/NET), 2 edema (ED/SNFH), 3 enhancing; WT {1,2,3}, TC {1,3}, ET {3}
    #  voxel 0  1  2  3  4  5  6  7
    [0, 1, 2, 3, 3, 2, 0, 0],
    [0, 2, 2, 3, 1, 0, 0, 3],
    {
        # WT: ref {1,2,3,4,5}, pred {1,2,3,4,7}: tp 4 fp 1 fn 1 tn 2
        "WT": (8 / 10, 4 / 5, 2 / 3),
        # TC: ref {1,3,4}, pred {3,4,7}: tp 2 fp 1 fn 1 tn 4
        "TC": (4 / 6, 2 / 3, 4 / 5),
        # ET: ref {3,4}, pred {3,7}: tp 1 fp 1 fn 1 tn 5
        "ET": (2 / 4, 1 / 2, 5 / 6),
    })
POST_TREATMENT = (  # 1 NETC, 2 SNFH, 3 ET, 4 RC; WT {1,2,3} (RC outside), TC {1,3}
    #  voxel 0  1  2  3  4  5  6  7  8  9
    [0, 1, 2, 3, 4, 4, 2, 0, 3, 1],
    [0, 1, 2, 3, 4, 2, 4, 4, 1, 0],
    {
        # WT: ref {1,2,3,6,8,9}, pred {1,2,3,5,8}: tp 4 ({1,2,3,8}) fp 1 ({5}) fn 2 ({6,9}) tn 3 ({0,4,7})
        "WT": (8 / 11, 4 / 6, 3 / 4),
        # TC: ref {1,3,8,9}, pred {1,3,8}: tp 3 fp 0 fn 1 tn 6
        "TC": (6 / 7, 3 / 4, 6 / 6),
        # NETC: ref {1,9}, pred {1,8}: tp 1 fp 1 fn 1 tn 7
        "NETC": (2 / 4, 1 / 2, 7 / 8),
        # SNFH: ref {2,6}, pred {2,5}: tp 1 fp 1 fn 1 tn 7
        "SNFH": (2 / 4, 1 / 2, 7 / 8),
        # ET: ref {3,8}, pred {3}: tp 1 fp 0 fn 1 tn 8
        "ET": (2 / 3, 1 / 2, 8 / 8),
        # RC: ref {4,5}, pred {4,6,7}: tp 1 fp 2 fn 1 tn 6
        "RC": (2 / 5, 1 / 2, 6 / 8),
    })
TASK_CASES = {
    "brats-gli-2021": GLIOMA_LIKE,
    "brats-gli-2023": GLIOMA_LIKE,
    "brats-men": GLIOMA_LIKE,
    "brats-ssa": GLIOMA_LIKE,
    "msd-brain": GLIOMA_LIKE,
    "brats-gli-2024": POST_TREATMENT,
    "brats-met": (POST_TREATMENT[0], POST_TREATMENT[1],
                  {k: POST_TREATMENT[2][k] for k in ("WT", "TC", "ET", "RC")}),
    "brats-ped": (  # 1 ET, 2 NETC, 3 CC, 4 ED; WT {1,2,3,4}, TC {1,2,3} (CC inside TC)
        #  voxel 0  1  2  3  4  5  6  7  8  9
        [0, 1, 2, 3, 4, 3, 4, 0, 1, 0],
        [0, 1, 3, 3, 4, 4, 0, 3, 2, 1],
        {
            # WT: ref {1,2,3,4,5,6,8}, pred {1,2,3,4,5,7,8,9}: tp 6 fp 2 ({7,9}) fn 1 ({6}) tn 1 ({0})
            "WT": (12 / 15, 6 / 7, 1 / 3),
            # TC: ref {1,2,3,5,8}, pred {1,2,3,7,8,9}: tp 4 ({1,2,3,8}; voxel 2 NETC vs CC is TC in both)
            #     fp 2 ({7,9}) fn 1 ({5}, CC predicted as ED) tn 3 ({0,4,6})
            "TC": (8 / 11, 4 / 5, 3 / 5),
            # ET: ref {1,8}, pred {1,9}: tp 1 fp 1 fn 1 tn 7
            "ET": (2 / 4, 1 / 2, 7 / 8),
            # NETC: ref {2}, pred {8}: tp 0 fp 1 fn 1 tn 8
            "NETC": (0.0, 0.0, 8 / 9),
            # CC: ref {3,5}, pred {2,3,7}: tp 1 fp 2 fn 1 tn 6
            "CC": (2 / 5, 1 / 2, 6 / 8),
            # ED: ref {4,6}, pred {4,5}: tp 1 fp 1 fn 1 tn 7
            "ED": (2 / 4, 1 / 2, 7 / 8),
        }),
    "brats-men-rt": (  # 1 GTV
        [0, 1, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 1, 0, 0, 0],
        # GTV: ref {1,2,3}, pred {1,2,4}: tp 2 fp 1 fn 1 tn 4
        {"GTV": (4 / 6, 2 / 3, 4 / 5)}),
}


def test_every_builtin_task_has_a_hand_computed_case():
    assert set(TASK_CASES) == set(builtin_tasks())


@pytest.mark.parametrize("name", sorted(builtin_tasks()))
def test_region_scores_hand_values_for_every_task(name):
    task = builtin_tasks()[name]
    ref_list, pred_list, expected = TASK_CASES[name]
    ref = np.asarray(ref_list, dtype=np.uint8).reshape(-1, 1, 1)
    pred = np.asarray(pred_list, dtype=np.uint8).reshape(-1, 1, 1)
    assert list(expected) == list(task.region_names)
    from_classes = case_metrics(pred, ref, (1, 1, 1), task, hd95=False)
    # the same case as the task's file labels (e.g. ET = 4 in 2021, ED = 1 in MSD, ET = 1 in PED)
    from_labels = evaluate_labels(task.classes_to_labels(pred), task.classes_to_labels(ref), (1, 1, 1), task,
                                  hd95=False)
    for scores in (from_classes, from_labels):
        assert list(scores) == list(task.region_names)  # task order
        for region, (dice, sens, spec) in expected.items():
            got = scores[region]
            assert (got["dice"], got["sensitivity"], got["specificity"]) == pytest.approx((dice, sens, spec)), region
            assert set(got) == {"dice", "sensitivity", "specificity", "ref_voxels", "pred_voxels"}
    confusion = confusion_matrix(pred, ref, task.num_classes)
    assert confusion.shape == (task.num_classes, task.num_classes) and confusion.sum() == ref.size


@pytest.mark.parametrize("task", [GLI24, MET], ids=lambda t: t.name)
def test_resection_cavity_is_not_whole_tumour(task):
    rc, snfh = task.class_names.index("RC"), task.class_names.index("SNFH")
    ref = np.zeros((6, 6, 6), dtype=np.uint8)
    ref[1:4, 1:4, 1:4] = snfh  # 27 voxels of tumour
    pred = np.where(ref > 0, rc, 0).astype(np.uint8)  # the same voxels called cavity
    scores = case_metrics(pred, ref, (1, 1, 1), task)
    # WT: ref 27 voxels, pred none (RC is outside WT): Dice 0, sensitivity 0, HD95 373.13, NSD 0
    assert scores["WT"]["dice"] == 0.0 and scores["WT"]["sensitivity"] == 0.0 and scores["WT"]["pred_voxels"] == 0
    assert scores["WT"]["hd95"] == LEGACY_EMPTY_HD95 and scores["WT"]["nsd_1.0"] == 0.0
    # RC: ref none, pred 27: Dice 0, specificity 1 - 27/216
    assert scores["RC"]["dice"] == 0.0 and scores["RC"]["specificity"] == pytest.approx(1 - 27 / 216)
    # the reverse: both agree on the cavity, nothing else
    cavity = np.where(ref > 0, rc, 0).astype(np.uint8)
    scores = case_metrics(cavity, cavity, (1, 1, 1), task)
    assert scores["WT"]["ref_voxels"] == 0 and scores["WT"]["dice"] == 1.0 and scores["RC"]["dice"] == 1.0


def test_pediatric_cystic_component_is_inside_tumour_core():
    cc, ed = PED.class_names.index("CC"), PED.class_names.index("ED")
    ref = np.zeros((6, 6, 6), dtype=np.uint8)
    ref[1:4, 1:4, 1:4] = cc
    scores = case_metrics(ref, ref, (1, 1, 1), PED, hd95=False)
    assert scores["TC"]["ref_voxels"] == 27 and scores["WT"]["ref_voxels"] == 27 and scores["ET"]["ref_voxels"] == 0
    # the cyst predicted as edema: still WT (Dice 1), but no longer TC (Dice 0)
    scores = case_metrics(np.where(ref > 0, ed, 0).astype(np.uint8), ref, (1, 1, 1), PED, hd95=False)
    assert scores["WT"]["dice"] == 1.0 and scores["TC"]["dice"] == 0.0 and scores["CC"]["dice"] == 0.0


@pytest.mark.parametrize("convention", ["legacy", "lesionwise"])
def test_case_metrics_equals_binary_metrics_per_region(convention):
    # case_metrics counts on a crop around the tumour; binary_metrics on the full masks, each
    # region with its own lesion rule (GLI 2024: NETC/RC dilation 5, ET 10 mm^3, merged predictions)
    rng = np.random.default_rng(1)
    shape = (30, 28, 26)
    ref = np.zeros(shape, dtype=np.uint8)
    ref[8:20, 9:19, 6:16] = 2
    ref[10:16, 11:17, 8:13] = 1
    ref[12:15, 12:16, 9:12] = 3
    ref[21:24, 9:13, 8:12] = 4
    pred = ref.copy()
    noise = np.zeros(shape, dtype=bool)
    noise[5:25, 6:22, 3:20] = rng.random((20, 16, 17)) < 0.15  # leaves a background frame to crop
    pred[noise] = rng.integers(0, 5, int(noise.sum()))
    spacing = (1.0, 0.8, 1.7)
    scores = case_metrics(pred, ref, spacing, GLI24, convention)
    for region in GLI24.regions:
        rule = GLI24.lesion_rule(region.name)
        expected = binary_metrics(np.isin(pred, region.classes), np.isin(ref, region.classes), spacing, convention,
                                  dilation=rule.dilation, min_volume=rule.min_volume,
                                  merge_predictions=rule.merge_predictions)
        assert scores[region.name] == pytest.approx(expected), region.name
    assert GLI24.lesion_rule("NETC").dilation == 5 and GLI24.lesion_rule("ET").min_volume == 10


def test_confusion_matrix_counts_and_rejects_file_labels():
    pred = np.array([0, 1, 3, 3], dtype=np.uint8)
    ref = np.array([0, 2, 3, 0], dtype=np.uint8)
    cm = confusion_matrix(pred, ref, 4)
    assert cm.shape == (4, 4)
    assert cm.sum() == 4 and cm[0, 0] == 1 and cm[1, 2] == 1 and cm[3, 3] == 1 and cm[3, 0] == 1
    assert confusion_matrix(np.array([4], np.uint8), np.array([4], np.uint8), 5)[4, 4] == 1  # 5x5 for RC tasks
    with pytest.raises(ValueError, match="training classes"):
        confusion_matrix(np.array([0, 4], dtype=np.uint8), np.zeros(2, dtype=np.uint8), 4)
    with pytest.raises(ValueError, match="training classes 0..4"):  # file label 4 of a 5-class task is fine,
        case_metrics(np.full((2, 2, 2), 5, np.uint8), np.zeros((2, 2, 2), np.uint8), (1, 1, 1), GLI24)  # 5 not
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros(3, dtype=np.uint8), np.zeros(2, dtype=np.uint8), 4)


def test_evaluate_labels_with_a_prediction_task():
    classes = np.array([0, 1, 2, 3, 3, 2, 0, 1], dtype=np.uint8).reshape(2, 2, 2)
    gli21 = load_task("brats-gli-2021")
    labels_2021, labels_2023 = gli21.classes_to_labels(classes), GLI23.classes_to_labels(classes)
    assert labels_2021.max() == 4 and labels_2023.max() == 3
    # a 2021 prediction (ET = 4) against 2023 references (ET = 3)
    scores = evaluate_labels(labels_2021, labels_2023, (1, 1, 1), GLI23, hd95=False, pred_task=gli21)
    assert all(scores[r]["dice"] == 1.0 for r in ("WT", "TC", "ET"))
    # read as 2023 labels, a 2021 file has a value (4) outside the task
    with pytest.raises(ValueError, match=r"\[4\] are not labels of task brats-gli-2023"):
        evaluate_labels(labels_2021, labels_2023, (1, 1, 1), GLI23)
    with pytest.raises(ValueError, match="classes or regions differ"):
        evaluate_labels(labels_2023, labels_2023, (1, 1, 1), GLI24, pred_task=GLI23)


def test_bad_shapes_raise():
    a, b = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8)
    a[1, 1, 1] = b[1, 1, 1] = 1
    for call in (lambda: case_metrics(a, b, (1, 1, 1), GLI23),
                 lambda: case_metrics(a, b, (1, 1, 1), GLI23, "lesionwise"),
                 lambda: lesionwise_metrics(a, b, (1, 1, 1)),
                 lambda: nsd(a, b, (1, 1, 1), 1.0),
                 lambda: nsd(a, np.zeros_like(b), (1, 1, 1), 1.0),
                 lambda: binary_metrics(a, b, (1, 1, 1))):
        with pytest.raises(ValueError, match="shape"):
            call()


# ----------------------------------------------------------------------------------------------
# HD95
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis, spacing", [(0, (2.0, 0.7, 1.3)), (1, (2.0, 0.7, 1.3)), (2, (2.0, 0.7, 1.3)),
                                           (0, (1.0, 1.0, 1.0))])
def test_hd95_parallel_slabs(axis, spacing):
    # two one-voxel-thick slabs 3 voxels apart: every border voxel is 3 * spacing[axis] from the other
    shape = (10, 10, 10)
    box_a, box_b = [(2, 8)] * 3, [(2, 8)] * 3
    box_a[axis], box_b[axis] = (2, 3), (5, 6)
    assert hd95(mask(shape, box_b), mask(shape, box_a), spacing) == pytest.approx(3 * spacing[axis])


def test_hd95_offset_cubes_hand_counted():
    # 3x3x3 cubes shifted by one voxel along x. Borders: 26 voxels each (the centre is interior).
    # A->B: 9 voxels at sx (face x=2), 16 at 0, the A-border voxel (4,3,3) is B's centre: min(sx,sy,sz).
    # Pooled: 18 x sx, 32 x 0, 2 x min -> 95th percentile (index 48.45 of 52) = sx.
    shape = (8, 8, 8)
    a = mask(shape, ((2, 5), (2, 5), (2, 5)))
    b = mask(shape, ((3, 6), (2, 5), (2, 5)))
    spacing = (2.0, 1.0, 1.5)
    to_b, to_a = surface_distances(a, b, spacing)
    assert sorted(to_b.tolist()) == [0.0] * 16 + [1.0] + [2.0] * 9
    assert sorted(to_a.tolist()) == [0.0] * 16 + [1.0] + [2.0] * 9
    assert hd95(a, b, spacing) == pytest.approx(2.0)
    # NSD of the same pair (each direction: 16 x 0, 1 x 1.0, 9 x 2.0):
    # tol 0.5: 16/26 per direction -> 8/13; tol 1.0: 17/26; tol 2.0: 26/26
    assert nsd(a, b, spacing, 0.5) == pytest.approx(8 / 13)
    assert nsd(a, b, spacing, 1.0) == pytest.approx(17 / 26)
    assert nsd(a, b, spacing, 2.0) == pytest.approx(1.0)
    assert surface_scores(a, b, spacing) == pytest.approx({"hd95": 2.0, "nsd_0.5": 8 / 13, "nsd_1.0": 17 / 26})


def test_pooled_hd95_differs_from_max_of_directed():
    # prediction = the 5^3 reference cube plus a 2x2x2 island 11-12 voxels away.
    # pred->ref: 98 zeros + 4 x 11 + 4 x 12 -> directed p95 = 11 (MONAI reports max(11, 0) = 11);
    # ref->pred: 98 zeros. Pooled (official): 196 zeros + 8 far values -> p95 = 0.
    shape = (24, 10, 10)
    ref = mask(shape, ((2, 7), (2, 7), (2, 7)))
    pred = mask(shape, ((2, 7), (2, 7), (2, 7)), ((17, 19), (3, 5), (3, 5)))
    to_ref, to_pred = surface_distances(pred, ref, (1, 1, 1))
    monai_style = max(np.percentile(to_ref, 95), np.percentile(to_pred, 95))
    assert monai_style == pytest.approx(11.0)
    assert hd95(pred, ref, (1, 1, 1)) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(4))
def test_hd95_and_nsd_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 8, 7)
    pred, ref = rng.random(shape) < 0.3, rng.random(shape) < 0.3
    pred[0, 0, 0] = ref[-1, -1, -1] = True  # masks touching the array edge (no margin to crop)
    spacing = tuple(rng.uniform(0.5, 3.0, 3))
    assert hd95(pred, ref, spacing) == pytest.approx(brute_force_hd95(pred, ref, spacing))
    assert hd95(pred, ref, spacing) == pytest.approx(hd95(ref, pred, spacing))  # symmetric
    assert 0 < brute_force_nsd(pred, ref, spacing, 0.5) < 1  # not a trivial case
    for tolerance in (0.5, 1.0, float(rng.uniform(0.5, 2.5))):
        expected = brute_force_nsd(pred, ref, spacing, tolerance)
        assert nsd(pred, ref, spacing, tolerance) == pytest.approx(expected)
        assert nsd(ref, pred, spacing, tolerance) == pytest.approx(expected)  # symmetric


@pytest.mark.parametrize("seed", range(3))
def test_nsd_of_blobs_matches_brute_force(seed):
    # compact, tumour-like masks with a small offset: many distances near the tolerances
    rng = np.random.default_rng(10 + seed)
    shape = (14, 12, 10)
    grid = np.indices(shape).astype(float)
    centre = np.array([7.0, 6.0, 5.0])
    ref = (((grid - centre[:, None, None, None]) / np.array([4.5, 3.5, 3.0])[:, None, None, None]) ** 2).sum(0) <= 1
    shift = centre + rng.uniform(-1.5, 1.5, 3)
    pred = (((grid - shift[:, None, None, None]) / np.array([4.0, 3.8, 2.6])[:, None, None, None]) ** 2).sum(0) <= 1
    spacing = (0.5, 0.5, 1.0) if seed == 0 else tuple(rng.uniform(0.4, 1.5, 3))
    for tolerance in (0.5, 1.0):
        assert nsd(pred, ref, spacing, tolerance) == pytest.approx(brute_force_nsd(pred, ref, spacing, tolerance))


def test_nsd_averages_the_two_directions():
    # ref: 3x3x3 cube (26 border voxels); pred: the cube + one voxel 5 voxels away (27 border voxels).
    # pred->ref: 26 x 0, 1 x 5; ref->pred: 26 x 0. BraTS 2025 NSD = (26/27 + 26/26) / 2 = 53/54;
    # nnU-Net v1's pooled count (26 + 26) / (27 + 26) = 52/53 is not what the BraTS scripts report.
    shape = (12, 6, 6)
    ref = mask(shape, ((1, 4), (1, 4), (1, 4)))
    pred = ref.copy()
    pred[8, 2, 2] = True
    assert nsd(pred, ref, (1, 1, 1), 1.0) == pytest.approx(53 / 54)
    assert nsd(pred, ref, (1, 1, 1), 1.0) != pytest.approx(52 / 53)
    assert nsd(pred, ref, (1, 1, 1), 5.0) == 1.0  # no 1e-8 in the denominator: a full match is exactly 1


def test_nsd_empty_rules_and_bad_tolerance():
    m = mask((5, 5, 5), ((1, 3), (1, 3), (1, 3)))
    empty = np.zeros((5, 5, 5), bool)
    assert nsd(empty, empty, (1, 1, 1), 0.5) == 1.0
    assert nsd(m, empty, (1, 1, 1), 0.5) == 0.0 and nsd(empty, m, (1, 1, 1), 1.0) == 0.0
    assert nsd(m, m, (1, 1, 1), 0.0) == 1.0
    assert surface_scores(empty, empty, (1, 1, 1)) == {"hd95": 0.0, "nsd_0.5": 1.0, "nsd_1.0": 1.0}
    assert surface_scores(m, empty, (1, 1, 1)) == {"hd95": LEGACY_EMPTY_HD95, "nsd_0.5": 0.0, "nsd_1.0": 0.0}
    with pytest.raises(ValueError, match="tolerance"):
        nsd(m, m, (1, 1, 1), -1.0)


def test_hd95_cropping_is_exact_for_a_small_object_in_a_large_volume():
    shape = (60, 50, 40)
    pred = mask(shape, ((20, 26), (10, 14), (30, 35)))
    ref = mask(shape, ((22, 27), (11, 16), (29, 33)))
    spacing = (0.9, 1.1, 2.5)
    assert hd95(pred, ref, spacing) == pytest.approx(brute_force_hd95(pred, ref, spacing))
    assert nsd(pred, ref, spacing, 1.0) == pytest.approx(brute_force_nsd(pred, ref, spacing, 1.0))


@pytest.mark.parametrize("spacing", [(1, 1), (1, 0, 1), (1, -1, 1), (1, float("nan"), 1)])
def test_bad_spacing_raises(spacing):
    m = mask((4, 4, 4), ((1, 2), (1, 2), (1, 2)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(m, m, spacing)
    with pytest.raises(ValueError, match="spacing"):
        nsd(m, np.zeros_like(m), spacing, 1.0)


def test_hd95_of_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        hd95(np.zeros((4, 4, 4), bool), mask((4, 4, 4), ((1, 2), (1, 2), (1, 2))), (1, 1, 1))


# ----------------------------------------------------------------------------------------------
# empty-mask rules
# ----------------------------------------------------------------------------------------------
SHAPE = (12, 12, 12)
BLOB = mask(SHAPE, ((3, 7), (3, 7), (3, 7)))  # 64 voxels
EMPTY = np.zeros(SHAPE, dtype=bool)


@pytest.mark.parametrize("pred, ref, expected", [
    (EMPTY, EMPTY, {"dice": 1.0, "sensitivity": 1.0, "specificity": 1.0, "hd95": 0.0, "nsd_0.5": 1.0}),
    (BLOB, EMPTY, {"dice": 0.0, "sensitivity": 0.0, "specificity": 1 - 64 / 1728, "hd95": LEGACY_EMPTY_HD95,
                   "nsd_1.0": 0.0}),
    (EMPTY, BLOB, {"dice": 0.0, "sensitivity": 0.0, "specificity": 1.0, "hd95": LEGACY_EMPTY_HD95, "nsd_0.5": 0.0}),
])
def test_legacy_empty_rules(pred, ref, expected):
    scores = binary_metrics(pred, ref, (1, 1, 1))
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key
    assert legacy_hd95(pred, ref, (1, 1, 1)) == pytest.approx(expected["hd95"])


def test_legacy_hd95_constant_is_the_brats_diagonal():
    assert LEGACY_EMPTY_HD95 == pytest.approx(np.sqrt(240 ** 2 + 240 ** 2 + 155 ** 2), abs=0.01)


def test_specificity_without_reference_background_is_one():
    full = np.ones((2, 2, 2), dtype=bool)
    assert binary_metrics(full, full, (1, 1, 1), hd95=False)["specificity"] == 1.0


def test_case_with_empty_et_legacy():
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[BLOB] = 2  # edema only: TC and ET empty in the reference
    pred = ref.copy()
    pred[5, 5, 5] = 3  # one false-positive ET voxel
    scores = case_metrics(pred, ref, (1, 1, 1), GLI23)
    assert scores["WT"]["dice"] == 1.0 and scores["WT"]["hd95"] == 0.0 and scores["WT"]["nsd_0.5"] == 1.0
    assert scores["TC"]["dice"] == 0.0 and scores["TC"]["hd95"] == LEGACY_EMPTY_HD95
    assert scores["ET"]["dice"] == 0.0 and scores["ET"]["sensitivity"] == 0.0 and scores["ET"]["nsd_1.0"] == 0.0
    assert scores["ET"]["ref_voxels"] == 0 and scores["ET"]["pred_voxels"] == 1
    assert case_metrics(ref, ref, (1, 1, 1), GLI23)["ET"] == {
        "dice": 1.0, "sensitivity": 1.0, "specificity": 1.0, "hd95": 0.0, "nsd_0.5": 1.0, "nsd_1.0": 1.0,
        "ref_voxels": 0, "pred_voxels": 0}


@pytest.mark.parametrize("pred, ref, dice, hd, nsd_value, counts", [
    (EMPTY, EMPTY, 1.0, 0.0, 1.0, (0, 0, 0, 0)),                          # nothing on either side
    (BLOB, EMPTY, 0.0, LESION_MISS_HD95, 0.0, (0, 0, 0, 1)),               # one false positive
    (EMPTY, BLOB, 0.0, LESION_MISS_HD95, 0.0, (1, 0, 1, 0)),               # one missed lesion
    (BLOB, BLOB, 1.0, 0.0, 1.0, (1, 1, 0, 0)),                             # perfect
])
@pytest.mark.parametrize("merge", [False, True])
def test_lesionwise_empty_rules(pred, ref, dice, hd, nsd_value, counts, merge):
    scores = lesionwise_metrics(pred, ref, (1, 1, 1), merge_predictions=merge)
    assert scores["dice"] == pytest.approx(dice) and scores["hd95"] == pytest.approx(hd)
    assert scores["nsd_0.5"] == pytest.approx(nsd_value) and scores["nsd_1.0"] == pytest.approx(nsd_value)
    assert (scores["num_lesions"], scores["num_tp"], scores["num_fn"], scores["num_fp"]) == counts


# ----------------------------------------------------------------------------------------------
# lesion-wise matching
# ----------------------------------------------------------------------------------------------
LSHAPE = (40, 14, 14)


def cube(x0, size=4, y0=5, z0=5):
    return ((x0, x0 + size), (y0, y0 + size), (z0, z0 + size))


@pytest.mark.parametrize("gap, lesions", [(6, 1), (7, 2)])
def test_split_lesion_is_merged_by_dilation(gap, lesions):
    # two 64-voxel cubes; 3 dilations grow each by 3 voxels, so a gap of <= 6 voxels closes
    ref = mask(LSHAPE, cube(5), cube(9 + gap))
    scores = lesionwise_metrics(ref, ref, (1, 1, 1))
    assert scores["num_lesions"] == lesions and scores["num_tp"] == lesions
    assert scores["dice"] == 1.0 and scores["hd95"] == 0.0 and scores["num_fp"] == 0
    # a prediction of only the first piece: merged -> one lesion with Dice 2*64/(128+64);
    # separate -> one perfect lesion and one missed lesion
    partial = lesionwise_metrics(mask(LSHAPE, cube(5)), ref, (1, 1, 1), hd95=False)
    assert partial["dice"] == pytest.approx(2 * 64 / 192 if lesions == 1 else 0.5)


def test_no_dilation_keeps_pieces_apart():
    ref = mask(LSHAPE, cube(5), cube(11))  # gap of 2
    assert lesionwise_metrics(ref, ref, (1, 1, 1), dilation=0)["num_lesions"] == 2


def test_false_positive_component():
    ref = mask(LSHAPE, cube(5))
    pred = mask(LSHAPE, cube(5), cube(30, size=2))  # a far 8-voxel island
    scores = lesionwise_metrics(pred, ref, (1, 1, 1))
    assert (scores["num_tp"], scores["num_fp"]) == (1, 1)
    assert scores["dice"] == pytest.approx((1.0 + 0.0) / 2)
    assert scores["hd95"] == pytest.approx((0.0 + LESION_MISS_HD95) / 2)
    assert scores["nsd_0.5"] == pytest.approx((1.0 + 0.0) / 2)


def test_component_touching_the_dilated_area_is_matched_and_counted_whole():
    ref = mask(LSHAPE, cube(5))
    # a prediction component 2 voxels from the lesion: inside the dilated area, no overlap
    near = mask(LSHAPE, cube(11, size=2))
    scores = lesionwise_metrics(near, ref, (1, 1, 1), hd95=False)
    assert (scores["num_tp"], scores["num_fp"], scores["dice"]) == (1, 0, 0.0)
    # a component overlapping the lesion and extending far beyond it counts whole in the Dice
    long = mask(LSHAPE, ((7, 30), (5, 9), (5, 9)))  # 23*16 = 368 voxels, 32 inside the lesion
    scores = lesionwise_metrics(long, ref, (1, 1, 1), hd95=False)
    assert scores["dice"] == pytest.approx(2 * 32 / (64 + 368))


def test_missed_small_lesion_below_threshold_is_ignored():
    big = cube(5, size=5)  # 125 voxels
    small = cube(30, size=3)  # 27 voxels <= 50
    ref = mask(LSHAPE, big, small)
    pred = mask(LSHAPE, big)
    scores = lesionwise_metrics(pred, ref, (1, 1, 1))
    assert (scores["num_lesions"], scores["num_fn"]) == (1, 0)
    assert scores["dice"] == 1.0 and scores["hd95"] == 0.0
    # the threshold is a volume in mm^3: at 2 mm voxels the small lesion is 216 mm^3 and counts
    scores = lesionwise_metrics(pred, ref, (2, 2, 2))
    assert (scores["num_lesions"], scores["num_fn"]) == (2, 1)
    assert scores["dice"] == pytest.approx(0.5) and scores["hd95"] == pytest.approx(LESION_MISS_HD95 / 2)
    assert scores["nsd_1.0"] == pytest.approx(0.5)


def test_merged_prediction_threshold_is_a_volume():
    # MET rule (dilation 1, 2 mm^3, merging): a lone 1-voxel prediction far from the lesion is
    # 1 mm^3 at 1 mm (dropped, not a false positive) but 8 mm^3 at 2 mm (kept: a false positive)
    rule = MET.lesion_rule("ET")
    ref = mask(LSHAPE, cube(5))
    pred = ref.copy()
    pred[30, 7, 7] = True
    kwargs = dict(dilation=rule.dilation, min_volume=rule.min_volume, merge_predictions=rule.merge_predictions)
    at_1mm = lesionwise_metrics(pred, ref, (1, 1, 1), **kwargs)
    assert (at_1mm["num_fp"], at_1mm["dice"], at_1mm["hd95"]) == (0, 1.0, 0.0)
    at_2mm = lesionwise_metrics(pred, ref, (2, 2, 2), **kwargs)
    assert (at_2mm["num_fp"], at_2mm["dice"]) == (1, 0.5)
    assert at_2mm["hd95"] == pytest.approx(LESION_MISS_HD95 / 2)


def test_prediction_of_an_ignored_small_lesion_is_not_a_false_positive():
    ref = mask(LSHAPE, cube(5, size=3))  # 27 voxels: not scored
    scores = lesionwise_metrics(ref, ref, (1, 1, 1))
    assert (scores["num_lesions"], scores["num_fp"], scores["dice"], scores["hd95"]) == (0, 0, 1.0, 0.0)


def test_lesionwise_per_lesion_hd95_uses_pooled_definition():
    ref = mask(LSHAPE, cube(5))
    pred = mask(LSHAPE, cube(6))  # shifted by one voxel
    scores = lesionwise_metrics(pred, ref, (1.5, 1, 1))
    assert scores["hd95"] == pytest.approx(hd95(pred, ref, (1.5, 1, 1)))
    assert scores["nsd_1.0"] == pytest.approx(nsd(pred, ref, (1.5, 1, 1), 1.0))
    assert scores["dice"] == pytest.approx(2 * 48 / 128)


# The multi-lesion BraTS-MET case (dilation 1, lesions <= 2 mm^3 not scored, predictions merged).
# All voxels are ET (so WT = TC = ET); y, z = 4..6 (3 voxels) unless noted; 1 mm voxels.
MSHAPE = (44, 11, 11)
C3 = ((4, 7), (4, 7))  # y, z extent of the 3x3x3 cubes


def met_case():
    ref = np.zeros(MSHAPE, dtype=bool)
    pred = np.zeros(MSHAPE, dtype=bool)
    ref[2:5, 4:7, 4:7] = True      # L1: 27 voxels, predicted shifted by one voxel along x
    pred[3:6, 4:7, 4:7] = True
    ref[10:13, 4:7, 4:7] = True    # L2: 27 voxels, missed (nothing within its dilated area x 9..13)
    ref[17, 5, 5:7] = True         # L3: 2 voxels = 2 mm^3 <= 2: not scored (and not predicted)
    ref[22:25, 4:7, 4:7] = True    # L4: 27 voxels, predicted exactly ...
    pred[22:25, 4:7, 4:7] = True
    pred[27, 5, 5:7] = True        # ... plus a 2-voxel piece at x 27: outside L4's area (x 21..25), but its
    #                                dilation (x 26..28) touches the prediction's (x 21..25): merged with it
    pred[33:35, 5:7, 5:7] = True   # a false positive: 8 voxels, far from everything
    pred[40, 5, 5] = True          # a lone 1-voxel piece: merged lesion of 1 mm^3 <= 2, dropped
    classes = np.uint8(MET.class_names.index("ET"))
    return pred.astype(np.uint8) * classes, ref.astype(np.uint8) * classes


def test_met_multi_lesion_case_by_hand():
    pred, ref = met_case()
    scores = case_metrics(pred, ref, (1, 1, 1), MET, "lesionwise")
    # L1 (shift by one voxel): Dice 2*18/54 = 2/3; border 26 voxels each, each direction 16 x 0 and
    #   10 x 1 (9 on the shifted face, 1 face centre that is the other's interior) -> HD95 1;
    #   NSD 0.5: 16/26 = 8/13; NSD 1.0: 1.
    # L2 missed: Dice 0, HD95 374, NSD 0.
    # L4 with the merged 2-voxel piece (29 predicted voxels): Dice 2*27/(27+29) = 27/28;
    #   pred->ref 26 x 0 + 2 x 3 (the piece, 3 voxels from the face x 24), ref->pred 26 x 0:
    #   pooled p95 of 52 zeros and 2 threes = 0; NSD (26/28 + 26/26)/2 = 27/28 at both tolerances.
    # FP: the 8-voxel piece (the 1-voxel piece is dropped): 1. Count = 3 lesions + 1 FP = 4.
    et = scores["ET"]
    assert (et["num_lesions"], et["num_tp"], et["num_fn"], et["num_fp"]) == (3, 2, 1, 1)
    assert et["dice"] == pytest.approx((2 / 3 + 0 + 27 / 28 + 0) / 4)        # = 137/336
    assert et["hd95"] == pytest.approx((1 + 374 + 0 + 374) / 4)               # = 187.25
    assert et["nsd_0.5"] == pytest.approx((8 / 13 + 0 + 27 / 28 + 0) / 4)
    assert et["nsd_1.0"] == pytest.approx((1 + 0 + 27 / 28 + 0) / 4)         # = 55/112
    # voxel-wise (legacy) scores use the raw masks: ref 3*27 + 2 = 83 voxels, pred 27 + 27 + 2 + 8 + 1 = 65,
    # overlap 18 + 27 = 45 -> Dice 90/148
    assert (et["ref_voxels"], et["pred_voxels"]) == (83, 65)
    assert et["legacy_dice"] == pytest.approx(90 / 148) and et["sensitivity"] == pytest.approx(45 / 83)
    assert et["legacy_hd95"] == pytest.approx(surface_scores(pred > 0, ref > 0, (1, 1, 1))["hd95"])
    assert scores["WT"] == scores["TC"] == et
    assert scores["RC"]["num_lesions"] == 0 and scores["RC"]["dice"] == 1.0 and scores["RC"]["nsd_1.0"] == 1.0
    assert set(et) == {"dice", "sensitivity", "specificity", "hd95", "nsd_0.5", "nsd_1.0", "legacy_dice",
                       "legacy_hd95", "legacy_nsd_0.5", "legacy_nsd_1.0", "num_lesions", "num_tp", "num_fn",
                       "num_fp", "ref_voxels", "pred_voxels"}


def test_met_case_without_prediction_merging():
    # the 2023 rule (raw components) on the same case: the 2-voxel piece near L4 and the 1-voxel
    # piece become false positives and L4 is predicted exactly. Lesions 3, FP 3 -> count 6:
    # Dice (2/3 + 0 + 1) / 6 = 5/18; HD95 (1 + 374 + 0 + 3 * 374) / 6 = 1497/6
    pred, ref = met_case()
    scores = lesionwise_metrics(pred, ref, (1, 1, 1), dilation=1, min_volume=2, merge_predictions=False)
    assert (scores["num_lesions"], scores["num_tp"], scores["num_fn"], scores["num_fp"]) == (3, 2, 1, 3)
    assert scores["dice"] == pytest.approx(5 / 18)
    assert scores["hd95"] == pytest.approx(1497 / 6)
    assert scores["nsd_1.0"] == pytest.approx((1 + 0 + 1) / 6)


def test_case_metrics_lesionwise_keys():
    ref = np.zeros(LSHAPE, dtype=np.uint8)
    ref[mask(LSHAPE, cube(5, size=5))] = 2
    ref[mask(LSHAPE, cube(6, size=3))] = 3
    scores = case_metrics(ref, ref, (1, 1, 1), GLI23, convention="lesionwise")
    assert scores["WT"]["num_lesions"] == 1 and scores["WT"]["dice"] == 1.0 and scores["WT"]["nsd_0.5"] == 1.0
    assert scores["ET"]["num_lesions"] == 0 and scores["ET"]["dice"] == 1.0  # 27-voxel ET not scored
    without = case_metrics(ref, ref, (1, 1, 1), GLI23, convention="lesionwise", hd95=False)
    assert set(without["WT"]) == {"dice", "sensitivity", "specificity", "legacy_dice", "num_lesions", "num_tp",
                                  "num_fn", "num_fp", "ref_voxels", "pred_voxels"}
    with pytest.raises(ValueError, match="convention"):
        case_metrics(ref, ref, (1, 1, 1), GLI23, convention="2023")


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def save(data, path, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.uint8), affine), str(path))
    return path


def test_read_classes_names_the_file_values_and_task(tmp_path):
    labels = np.zeros((4, 4, 3), np.uint8)
    labels[1, 1, 1], labels[2, 2, 2] = 1, 4
    path = save(labels, tmp_path / "BraTS-GLI-00001-000-seg.nii.gz")
    classes, img = read_classes(path, GLI24)  # RC = 4 is a label of GLI 2024 (class 4)
    assert classes[2, 2, 2] == 4 and classes.dtype == np.uint8 and img.shape == (4, 4, 3)
    with pytest.raises(UserError) as err:
        read_classes(path, GLI23)
    message = str(err.value)
    assert str(path) in message and "[0, 1, 4]" in message and "brats-gli-2023" in message
    assert "\n" not in message


def test_evaluate_files_with_tasks(tmp_path):
    ref = np.zeros((8, 8, 6), np.uint8)
    ref[2:6, 2:6, 1:5] = 2
    ref[3:5, 3:5, 2:4] = 3
    ref_path = save(GLI23.classes_to_labels(ref), tmp_path / "ref" / "case.nii.gz")
    gli21 = load_task("brats-gli-2021")
    pred_path = save(gli21.classes_to_labels(ref), tmp_path / "pred" / "case.nii.gz")  # ET = 4
    scores = evaluate_files(pred_path, ref_path, GLI23, pred_task=gli21)
    assert list(scores) == ["WT", "TC", "ET"] and all(s["dice"] == 1.0 and s["nsd_0.5"] == 1.0 for s in scores.values())
    with pytest.raises(UserError, match="case.nii.gz.*brats-gli-2023"):
        evaluate_files(pred_path, ref_path, GLI23)  # the 2021 file read as 2023 labels
    shifted = save(GLI23.classes_to_labels(ref), tmp_path / "pred2" / "case.nii.gz", np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(UserError, match="affine"):
        evaluate_files(shifted, ref_path, GLI23)
    # spacing from the reference affine (2 mm along z): one ET voxel shifted along z is 2 mm away
    moved = ref.copy()
    moved[3:5, 3:5, 2:4] = 2
    moved[3:5, 3:5, 3:5] = 3
    pred3 = save(GLI23.classes_to_labels(moved), tmp_path / "pred3" / "case.nii.gz")
    expected = hd95(moved == 3, ref == 3, (1.0, 1.0, 2.0))
    assert evaluate_files(pred3, ref_path, GLI23)["ET"]["hd95"] == pytest.approx(expected)
    assert expected == pytest.approx(2.0)


def test_pair_cases_flat_folders_and_subset(tmp_path):
    labels = np.zeros((4, 4, 3), np.uint8)
    for case_id, suffix in (("a", "_seg"), ("b", "-seg"), ("c", "_gtv"), ("d", "")):
        save(labels, tmp_path / "ref" / f"{case_id}{suffix}.nii.gz")
    (tmp_path / "ref" / "._a_seg.nii.gz").write_bytes(b"macOS resource fork")  # ignored
    assert sorted(reference_files(tmp_path / "ref")) == ["a", "b", "c", "d"]
    for case_id in ("a", "c", "z"):
        save(labels, tmp_path / "pred" / f"{case_id}.nii.gz")
    (tmp_path / "pred" / "._b.nii.gz").write_bytes(b"")
    with pytest.raises(UserError, match="no prediction for 2 of 4 reference cases"):
        pair_cases(tmp_path / "pred", tmp_path / "ref")
    pairs, extra, skipped = pair_cases(tmp_path / "pred", tmp_path / "ref", subset=True)
    assert [(c, p.name, r.name) for c, p, r in pairs] == [("a", "a.nii.gz", "a_seg.nii.gz"),
                                                          ("c", "c.nii.gz", "c_gtv.nii.gz")]
    assert extra == ["z"] and skipped == ["b", "d"]
    for case_id in ("b", "d"):
        save(labels, tmp_path / "pred" / f"{case_id}.nii.gz")
    pairs, extra, skipped = pair_cases(tmp_path / "pred", tmp_path / "ref")
    assert [c for c, _, _ in pairs] == ["a", "b", "c", "d"] and extra == ["z"] and skipped == []


def test_pair_cases_dataset_folder(tmp_path):
    labels = np.zeros((4, 4, 3), np.uint8)
    for case_id in ("BraTS-GLI-00001-000", "BraTS-GLI-00002-000"):
        folder = tmp_path / "data" / case_id
        for suffix in ("t1n", "t1c", "t2w", "t2f"):
            save(labels, folder / f"{case_id}-{suffix}.nii.gz")
    save(labels, tmp_path / "data" / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz")
    save(labels, tmp_path / "pred" / "BraTS-GLI-00001-000.nii.gz")
    pairs, extra, skipped = pair_cases(tmp_path / "pred", tmp_path / "data")
    assert [(c, r.name) for c, _, r in pairs] == [("BraTS-GLI-00001-000", "BraTS-GLI-00001-000-seg.nii.gz")]
    assert extra == [] and skipped == []  # the case without a seg file is not a reference
    with pytest.raises(UserError, match="no predictions"):
        pair_cases(tmp_path / "data", tmp_path / "data")
    # one case folder given as the reference folder: its seg file, not its images
    assert {c: r.name for c, r in reference_files(tmp_path / "data" / "BraTS-GLI-00001-000").items()} == {
        "BraTS-GLI-00001-000": "BraTS-GLI-00001-000-seg.nii.gz"}


# ----------------------------------------------------------------------------------------------
# aggregate, table, report
# ----------------------------------------------------------------------------------------------
def region_scores(dice, hd, ref_voxels=10):
    return {"dice": dice, "sensitivity": 1.0, "specificity": 1.0, "hd95": hd, "nsd_0.5": dice, "nsd_1.0": dice,
            "ref_voxels": ref_voxels, "pred_voxels": 10}


def per_case_fixture():
    return {
        "a": {"WT": region_scores(0.5, 2.0), "TC": region_scores(0.8, 4.0), "ET": region_scores(1.0, 0.0, 0)},
        "b": {"WT": region_scores(1.0, 4.0), "TC": region_scores(0.6, 6.0), "ET": region_scores(0.0, 373.13)},
        "c": {"WT": region_scores(0.9, 0.0), "TC": region_scores(0.7, 5.0), "ET": region_scores(1.0, 0.0, 0)},
    }


def test_aggregate_hand_values():
    summary = aggregate(per_case_fixture())
    assert list(summary) == ["WT", "TC", "ET"]
    wt = summary["WT"]["dice"]
    assert wt["mean"] == pytest.approx(0.8) and wt["median"] == pytest.approx(0.9) and wt["n"] == 3
    assert wt["std"] == pytest.approx(np.std([0.5, 1.0, 0.9], ddof=1))
    assert summary["TC"]["hd95"]["median"] == pytest.approx(5.0)
    assert summary["WT"]["nsd_1.0"]["mean"] == pytest.approx(0.8)
    assert summary["ET"]["empty_reference"] == 2 and summary["WT"]["empty_reference"] == 0
    with pytest.raises(ValueError, match="no cases"):
        aggregate({})


def test_aggregate_uses_the_task_regions_in_order():
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[1:4, 1:4, 1:4] = 4  # RC only
    per_case = {"x": case_metrics(ref, ref, (1, 1, 1), GLI24, hd95=False),
                "y": case_metrics(np.zeros_like(ref), ref, (1, 1, 1), GLI24, hd95=False)}
    summary = aggregate(per_case)
    assert list(summary) == ["WT", "TC", "NETC", "SNFH", "ET", "RC"]
    assert summary["RC"]["dice"]["mean"] == pytest.approx(0.5) and summary["RC"]["empty_reference"] == 0
    assert summary["WT"]["empty_reference"] == 2
    with pytest.raises(ValueError, match="regions"):
        aggregate({**per_case, "z": case_metrics(ref[:, :, :] * 0, ref * 0, (1, 1, 1), GLI23, hd95=False)})


def test_format_table_is_aligned():
    text = format_table(aggregate(per_case_fixture()))
    lines = text.splitlines()
    assert lines[0].startswith("Region") and "HD95 (mm)" in lines[0]
    assert [line.split()[0] for line in lines[2:5]] == ["WT", "TC", "ET"]
    assert "0.8000 ± 0.2646 (0.9000)" in lines[2]
    column = lines[0].index("Dice")
    assert all(line[column:].startswith(("0.", "1.")) for line in lines[2:5])


@pytest.mark.parametrize("convention", ["legacy", "lesionwise"])
def test_write_report(tmp_path, convention):
    per_case = per_case_fixture()
    summary = aggregate(per_case)
    json_path, csv_path = tmp_path / "out" / "metrics.json", tmp_path / "out" / "metrics.csv"
    write_report(per_case, summary, json_path, csv_path, convention, GLI23)
    report = json.loads(json_path.read_text())
    assert report["convention"] == convention and report["task"] == "brats-gli-2023"
    assert report["regions"] == {"WT": ["NETC", "SNFH", "ET"], "TC": ["NETC", "ET"], "ET": ["ET"]}
    assert report["rules"] == rules_text(convention, GLI23)
    assert report["cases"]["b"]["ET"]["hd95"] == 373.13
    assert report["mean"]["WT"]["dice"] == pytest.approx(0.8)
    assert report["summary"]["ET"]["empty_reference"] == 2
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 9 and rows[0]["case_id"] == "a" and rows[0]["region"] == "WT"
    assert float(rows[0]["dice"]) == 0.5 and float(rows[0]["nsd_1.0"]) == 0.5
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["metrics.csv", "metrics.json"]  # no temp files


def test_write_report_of_a_six_region_task(tmp_path):
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[1:4, 1:4, 1:4] = 4
    per_case = {"x": case_metrics(ref, ref, (1, 1, 1), GLI24, "lesionwise")}
    write_report(per_case, aggregate(per_case), tmp_path / "m.json", tmp_path / "m.csv", "lesionwise", GLI24)
    report = json.loads((tmp_path / "m.json").read_text())
    assert list(report["regions"]) == ["WT", "TC", "NETC", "SNFH", "ET", "RC"] and report["regions"]["RC"] == ["RC"]
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert [r["region"] for r in rows] == ["WT", "TC", "NETC", "SNFH", "ET", "RC"]
    assert rows[-1]["num_lesions"] == "1" and float(rows[-1]["legacy_nsd_0.5"]) == 1.0


def test_rules_text_states_the_rules_of_the_task():
    legacy = rules_text("legacy", GLI23)
    assert "373.13" in legacy and "both empty" in legacy and "NSD" in legacy and "0.5 and 1 mm" in legacy
    assert "WT=NETC+SNFH+ET" in legacy
    lesion = rules_text("lesionwise", GLI24)
    assert "374" in lesion and "RC=RC" in lesion
    # per-region parameters of GLI 2024: NETC and RC 5 dilations, ET 10 mm^3, predictions merged
    assert "NETC: 5 dilation(s), lesions <= 20 mm^3 not scored, predictions merged" in lesion
    assert "ET: 3 dilation(s), lesions <= 10 mm^3 not scored" in lesion
    assert "RC: 5 dilation(s)" in lesion
    met = rules_text("lesionwise", MET)
    assert "1 dilation(s), lesions <= 2 mm^3 not scored" in met and "merged predicted lesions <= 2 mm^3 dropped" in met
    assert "raw predicted components" in rules_text("lesionwise", GLI23)
    with pytest.raises(ValueError, match="convention"):
        rules_text("2023", GLI23)
