"""Metrics: hand-computed overlap scores, HD95 (official pooled definition), empty-mask rules of
both conventions, lesion-wise matching, aggregation and reports."""
import csv
import itertools
import json

import numpy as np
import pytest

from metrics import (LEGACY_EMPTY_HD95, LESION_MISS_HD95, aggregate, binary_metrics, case_metrics,
                     confusion_matrix, evaluate_labels, format_table, hd95, legacy_hd95, lesionwise_metrics,
                     rules_text, surface_distances, write_report)


def mask(shape, *boxes):
    """Boolean array of ``shape`` with each ``((x0, x1), (y0, y1), (z0, z1))`` box set."""
    out = np.zeros(shape, dtype=bool)
    for box in boxes:
        out[tuple(slice(a, b) for a, b in box)] = True
    return out


def brute_force_hd95(pred, ref, spacing):
    """Independent reference: 6-neighbour border test and all-pairs distances, pooled 95th pct."""
    def border(m):
        padded = np.pad(m, 1)
        inner = np.ones_like(m)
        for axis, step in itertools.product(range(3), (-1, 1)):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return m & ~inner

    def directed(a, b):
        pa, pb = np.argwhere(border(a)) * spacing, np.argwhere(border(b)) * spacing
        return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)

    return float(np.percentile(np.concatenate([directed(pred, ref), directed(ref, pred)]), 95))


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
    assert "hd95" not in scores
    assert scores["ref_voxels"] == sum(ref) and scores["pred_voxels"] == sum(pred)


def test_case_metrics_regions_hand_values():
    # voxels:     0  1  2  3  4  5  6  7
    ref = np.array([0, 1, 2, 3, 3, 2, 0, 0], dtype=np.uint8).reshape(2, 2, 2)
    pred = np.array([0, 2, 2, 3, 1, 0, 0, 3], dtype=np.uint8).reshape(2, 2, 2)
    scores = case_metrics(pred, ref, (1, 1, 1), hd95=False)
    # WT: pred {1,2,3,4,7} ref {1,2,3,4,5}: tp 4 fp 1 fn 1 tn 2
    assert scores["WT"]["dice"] == pytest.approx(8 / 10)
    assert scores["WT"]["sensitivity"] == pytest.approx(4 / 5)
    assert scores["WT"]["specificity"] == pytest.approx(2 / 3)
    # TC: pred {3,4,7} ref {1,3,4}: tp 2 fp 1 fn 1 tn 4
    assert scores["TC"]["dice"] == pytest.approx(4 / 6)
    assert scores["TC"]["specificity"] == pytest.approx(4 / 5)
    # ET: pred {3,7} ref {3,4}: tp 1 fp 1 fn 1 tn 5
    assert scores["ET"]["dice"] == pytest.approx(2 / 4)
    assert scores["ET"]["sensitivity"] == pytest.approx(1 / 2)
    assert scores["ET"]["specificity"] == pytest.approx(5 / 6)


@pytest.mark.parametrize("convention", ["legacy", "lesionwise"])
def test_case_metrics_equals_binary_metrics_per_region(convention):
    # case_metrics counts on a crop around the tumour; binary_metrics on the full masks
    rng = np.random.default_rng(1)
    shape = (30, 28, 26)
    ref = np.zeros(shape, dtype=np.uint8)
    ref[8:20, 9:19, 6:16] = 2
    ref[10:16, 11:17, 8:13] = 1
    ref[12:15, 12:16, 9:12] = 3
    pred = ref.copy()
    noise = np.zeros(shape, dtype=bool)
    noise[5:25, 6:22, 3:20] = rng.random((20, 16, 17)) < 0.15  # leaves a background frame to crop
    pred[noise] = rng.integers(0, 4, int(noise.sum()))
    spacing = (1.0, 0.8, 1.7)
    scores = case_metrics(pred, ref, spacing, convention, min_volume=10)
    for region, classes in (("WT", (1, 2, 3)), ("TC", (1, 3)), ("ET", (3,))):
        expected = binary_metrics(np.isin(pred, classes), np.isin(ref, classes), spacing, convention, min_volume=10)
        assert scores[region] == pytest.approx(expected), region


def test_confusion_matrix_counts_and_rejects_file_labels():
    pred = np.array([0, 1, 3, 3], dtype=np.uint8)
    ref = np.array([0, 2, 3, 0], dtype=np.uint8)
    cm = confusion_matrix(pred, ref)
    assert cm.sum() == 4 and cm[0, 0] == 1 and cm[1, 2] == 1 and cm[3, 3] == 1 and cm[3, 0] == 1
    with pytest.raises(ValueError, match="training classes"):
        confusion_matrix(np.array([0, 4], dtype=np.uint8), np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros(3, dtype=np.uint8), np.zeros(2, dtype=np.uint8))


def test_evaluate_labels_detects_each_files_convention():
    classes = np.array([0, 1, 2, 3, 3, 2, 0, 1], dtype=np.uint8).reshape(2, 2, 2)
    labels_2021 = np.where(classes == 3, 4, classes).astype(np.uint8)
    scores = evaluate_labels(classes, labels_2021, (1, 1, 1), hd95=False)  # pred 2023, ref 2021
    assert all(scores[r]["dice"] == 1.0 for r in ("WT", "TC", "ET"))
    with pytest.raises(ValueError, match="unexpected label values"):
        evaluate_labels(np.array([0, 3, 4], dtype=np.uint8), np.zeros(3, dtype=np.uint8), (1, 1, 1))


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
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (9, 8, 7)
    pred, ref = rng.random(shape) < 0.3, rng.random(shape) < 0.3
    pred[0, 0, 0] = ref[-1, -1, -1] = True  # masks touching the array edge (no margin to crop)
    spacing = tuple(rng.uniform(0.5, 3.0, 3))
    assert hd95(pred, ref, spacing) == pytest.approx(brute_force_hd95(pred, ref, spacing))
    assert hd95(pred, ref, spacing) == pytest.approx(hd95(ref, pred, spacing))  # symmetric


def test_hd95_cropping_is_exact_for_a_small_object_in_a_large_volume():
    shape = (60, 50, 40)
    pred = mask(shape, ((20, 26), (10, 14), (30, 35)))
    ref = mask(shape, ((22, 27), (11, 16), (29, 33)))
    spacing = (0.9, 1.1, 2.5)
    assert hd95(pred, ref, spacing) == pytest.approx(brute_force_hd95(pred, ref, spacing))


@pytest.mark.parametrize("spacing", [(1, 1), (1, 0, 1), (1, -1, 1), (1, float("nan"), 1)])
def test_bad_spacing_raises(spacing):
    m = mask((4, 4, 4), ((1, 2), (1, 2), (1, 2)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(m, m, spacing)


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
    (EMPTY, EMPTY, {"dice": 1.0, "sensitivity": 1.0, "specificity": 1.0, "hd95": 0.0}),
    (BLOB, EMPTY, {"dice": 0.0, "sensitivity": 0.0, "specificity": 1 - 64 / 1728, "hd95": LEGACY_EMPTY_HD95}),
    (EMPTY, BLOB, {"dice": 0.0, "sensitivity": 0.0, "specificity": 1.0, "hd95": LEGACY_EMPTY_HD95}),
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
    scores = case_metrics(pred, ref, (1, 1, 1))
    assert scores["WT"]["dice"] == 1.0 and scores["WT"]["hd95"] == 0.0
    assert scores["TC"]["dice"] == 0.0 and scores["TC"]["hd95"] == LEGACY_EMPTY_HD95
    assert scores["ET"]["dice"] == 0.0 and scores["ET"]["sensitivity"] == 0.0
    assert scores["ET"]["ref_voxels"] == 0 and scores["ET"]["pred_voxels"] == 1
    assert case_metrics(ref, ref, (1, 1, 1))["ET"] == {
        "dice": 1.0, "sensitivity": 1.0, "specificity": 1.0, "hd95": 0.0, "ref_voxels": 0, "pred_voxels": 0}


@pytest.mark.parametrize("pred, ref, dice, hd, counts", [
    (EMPTY, EMPTY, 1.0, 0.0, (0, 0, 0, 0)),                          # nothing on either side
    (BLOB, EMPTY, 0.0, LESION_MISS_HD95, (0, 0, 0, 1)),               # one false positive
    (EMPTY, BLOB, 0.0, LESION_MISS_HD95, (1, 0, 1, 0)),               # one missed lesion
    (BLOB, BLOB, 1.0, 0.0, (1, 1, 0, 0)),                             # perfect
])
def test_lesionwise_empty_rules(pred, ref, dice, hd, counts):
    scores = lesionwise_metrics(pred, ref, (1, 1, 1))
    assert scores["dice"] == pytest.approx(dice) and scores["hd95"] == pytest.approx(hd)
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


def test_prediction_of_an_ignored_small_lesion_is_not_a_false_positive():
    ref = mask(LSHAPE, cube(5, size=3))  # 27 voxels: not scored
    scores = lesionwise_metrics(ref, ref, (1, 1, 1))
    assert (scores["num_lesions"], scores["num_fp"], scores["dice"], scores["hd95"]) == (0, 0, 1.0, 0.0)


def test_lesionwise_per_lesion_hd95_uses_pooled_definition():
    ref = mask(LSHAPE, cube(5))
    pred = mask(LSHAPE, cube(6))  # shifted by one voxel
    scores = lesionwise_metrics(pred, ref, (1.5, 1, 1))
    assert scores["hd95"] == pytest.approx(hd95(pred, ref, (1.5, 1, 1)))
    assert scores["dice"] == pytest.approx(2 * 48 / 128)


def test_case_metrics_lesionwise_keys():
    ref = np.zeros(LSHAPE, dtype=np.uint8)
    ref[mask(LSHAPE, cube(5, size=5))] = 2
    ref[mask(LSHAPE, cube(6, size=3))] = 3
    scores = case_metrics(ref, ref, (1, 1, 1), convention="lesionwise")
    assert set(scores["WT"]) == {"dice", "sensitivity", "specificity", "hd95", "legacy_dice", "legacy_hd95",
                                 "num_lesions", "num_tp", "num_fn", "num_fp", "ref_voxels", "pred_voxels"}
    assert scores["WT"]["num_lesions"] == 1 and scores["WT"]["dice"] == 1.0
    assert scores["ET"]["num_lesions"] == 0 and scores["ET"]["dice"] == 1.0  # 27-voxel ET not scored
    with pytest.raises(ValueError, match="convention"):
        case_metrics(ref, ref, (1, 1, 1), convention="2023")


# ----------------------------------------------------------------------------------------------
# aggregate, table, report
# ----------------------------------------------------------------------------------------------
def region_scores(dice, hd, ref_voxels=10):
    return {"dice": dice, "sensitivity": 1.0, "specificity": 1.0, "hd95": hd, "ref_voxels": ref_voxels,
            "pred_voxels": 10}


def per_case_fixture():
    return {
        "a": {"WT": region_scores(0.5, 2.0), "TC": region_scores(0.8, 4.0), "ET": region_scores(1.0, 0.0, 0)},
        "b": {"WT": region_scores(1.0, 4.0), "TC": region_scores(0.6, 6.0), "ET": region_scores(0.0, 373.13)},
        "c": {"WT": region_scores(0.9, 0.0), "TC": region_scores(0.7, 5.0), "ET": region_scores(1.0, 0.0, 0)},
    }


def test_aggregate_hand_values():
    summary = aggregate(per_case_fixture())
    wt = summary["WT"]["dice"]
    assert wt["mean"] == pytest.approx(0.8) and wt["median"] == pytest.approx(0.9) and wt["n"] == 3
    assert wt["std"] == pytest.approx(np.std([0.5, 1.0, 0.9], ddof=1))
    assert summary["TC"]["hd95"]["median"] == pytest.approx(5.0)
    assert summary["ET"]["empty_reference"] == 2 and summary["WT"]["empty_reference"] == 0
    with pytest.raises(ValueError, match="no cases"):
        aggregate({})


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
    write_report(per_case, summary, json_path, csv_path, convention)
    report = json.loads(json_path.read_text())
    assert report["convention"] == convention
    assert report["rules"] == rules_text(convention)
    assert report["cases"]["b"]["ET"]["hd95"] == 373.13
    assert report["mean"]["WT"]["dice"] == pytest.approx(0.8)
    assert report["summary"]["ET"]["empty_reference"] == 2
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 9 and rows[0]["case_id"] == "a" and rows[0]["region"] == "WT"
    assert float(rows[0]["dice"]) == 0.5
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["metrics.csv", "metrics.json"]  # no temp files


def test_rules_text_states_the_empty_rules():
    legacy = rules_text("legacy")
    assert "373.13" in legacy and "both empty" in legacy
    lesion = rules_text("lesionwise", dilation=1, min_volume=2)
    assert "374" in lesion and "1 dilation" in lesion and "2 mm^3" in lesion
