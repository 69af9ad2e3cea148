"""Post-processing by the task's rules: small-component removal on the training regions (nested
or not), the enhancing label relabelled below a volume."""
import numpy as np
import pytest

from core.config import InferConfig
from core.task import builtin_tasks
from inference.postprocess import Rules, largest_component, postprocess_classes, remove_small_components

TASKS = builtin_tasks()
GLI = TASKS["brats-gli-2021"]
BG, NCR, ED, ET = 0, 1, 2, 3  # classes of the glioma tasks
RC = 4  # class of the resection cavity in brats-gli-2024


def blob(shape, box, value, out=None):
    out = np.zeros(shape, np.uint8) if out is None else out
    out[tuple(slice(a, b) for a, b in box)] = value
    return out


def test_remove_small_components_uses_26_connectivity():
    mask = np.zeros((6, 6, 6), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True     # corner-touching: one 26-connected component of 2
    mask[4, 4, 4] = True                     # isolated single voxel
    kept = remove_small_components(mask, 2)
    assert kept[0, 0, 0] and kept[1, 1, 1] and not kept[4, 4, 4]
    assert not remove_small_components(mask, 3).any()
    assert np.array_equal(remove_small_components(mask, 0), mask)
    assert np.array_equal(remove_small_components(mask, 1), mask)
    with pytest.raises(ValueError):
        remove_small_components(mask, -1)


def test_defaults_are_off():
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 4, size=(8, 8, 8)).astype(np.uint8)
    out = postprocess_classes(classes, GLI, Rules.from_config(InferConfig()))
    assert np.array_equal(out, classes) and out is not classes


def test_small_wt_component_removed_with_everything_inside():
    shape = (20, 20, 20)
    classes = blob(shape, [(2, 8), (2, 8), (2, 8)], ED)            # big tumour: 216 voxels
    blob(shape, [(4, 6), (4, 6), (4, 6)], ET, classes)             # ET inside it
    blob(shape, [(14, 16), (14, 16), (14, 16)], ED, classes)       # small tumour: 8 voxels
    blob(shape, [(14, 15), (14, 15), (14, 15)], ET, classes)       # with ET inside
    out = postprocess_classes(classes, GLI, Rules((10, 0, 0)))
    assert (out[14:16, 14:16, 14:16] == BG).all()
    assert np.array_equal(out[:10, :10, :10], classes[:10, :10, :10])


def test_small_tc_component_becomes_edema_and_small_et_becomes_ncr():
    shape = (20, 20, 20)
    classes = blob(shape, [(1, 19), (1, 19), (1, 19)], ED)
    blob(shape, [(2, 8), (2, 8), (2, 8)], NCR, classes)            # big core (216)
    blob(shape, [(3, 7), (3, 7), (3, 7)], ET, classes)             # big ET (64) inside it
    blob(shape, [(12, 14), (12, 14), (12, 14)], NCR, classes)      # small core (8 voxels, 1 ET)
    classes[12, 12, 12] = ET
    blob(shape, [(16, 18), (2, 5), (2, 5)], NCR, classes)          # core of 18 with ET of 4
    blob(shape, [(16, 18), (2, 3), (2, 4)], ET, classes)
    out = postprocess_classes(classes, GLI, Rules((0, 9, 5)))
    assert (out[12:14, 12:14, 12:14] == ED).all()                 # TC (8 < 9) removed -> ED, its ET too
    assert (out[16:18, 2:3, 2:4] == NCR).all()                    # ET (4 < 5) removed -> NCR
    assert (out[16:18, 2:5, 2:5] == NCR).all()
    assert np.array_equal(out[:10, :10, :10], classes[:10, :10, :10])
    assert out[0, 0, 0] == BG and out[18, 18, 18] == ED
    # regions stay nested: every ET voxel is in TC, every TC voxel in WT
    assert set(np.unique(out)) <= {BG, NCR, ED, ET}


@pytest.mark.parametrize("et_voxels, threshold, expected_et", [
    (5, 6, 0),      # below the threshold: all ET -> NCR
    (6, 6, 6),      # at the threshold: kept
    (5, 0, 5),      # rule off
    (0, 6, 0),      # no ET at all: nothing to do
])
def test_et_min_volume(et_voxels, threshold, expected_et):
    classes = blob((10, 10, 10), [(0, 5), (0, 5), (0, 5)], NCR)   # 125 tumour-core voxels
    classes[tuple(np.argwhere(classes == NCR)[:et_voxels].T)] = ET
    out = postprocess_classes(classes, GLI, Rules(et_min_volume=threshold))
    assert (out == ET).sum() == expected_et
    assert (out == NCR).sum() == 125 - expected_et
    assert (out == ED).sum() == 0


def test_et_rule_applies_after_component_removal():
    shape = (12, 12, 12)
    classes = blob(shape, [(0, 6), (0, 6), (0, 6)], NCR)
    blob(shape, [(0, 3), (0, 3), (0, 3)], ET, classes)   # 27 ET voxels
    classes[5, 5, 5] = ET                                 # plus an isolated one
    out = postprocess_classes(classes, GLI, Rules((0, 0, 2), 28))
    assert (out == ET).sum() == 0                         # 28 -> 27 after removal -> below 28 -> NCR
    assert (out == NCR).sum() == 216


@pytest.mark.parametrize("kwargs", [dict(min_component_size=(1, 2)), dict(min_component_size=(0, -1, 0)),
                                    dict(et_min_volume=-5), dict(unit="litres")])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="infer."):
        postprocess_classes(np.zeros((4, 4, 4), np.uint8), GLI, Rules(**kwargs))
    with pytest.raises(ValueError):
        postprocess_classes(np.zeros((4, 4), np.uint8), GLI)
    with pytest.raises(ValueError, match="task brats-men-rt has no enhancing label"):
        postprocess_classes(np.zeros((4, 4, 4), np.uint8), TASKS["brats-men-rt"], Rules(et_min_volume=10))


def test_sizes_in_mm3_follow_the_spacing():
    """A 3-voxel ET at 2 x 2 x 2 mm is 24 mm^3: relabelled below 25 mm^3, kept below 20 mm^3 (and, in
    voxels, relabelled below 4)."""
    classes = blob((8, 8, 8), [(0, 4), (0, 4), (0, 4)], NCR)
    classes[0, 0, :3] = ET
    spacing = (2.0, 2.0, 2.0)
    assert (postprocess_classes(classes, GLI, Rules(et_min_volume=25, unit="mm3"), spacing) == ET).sum() == 0
    assert (postprocess_classes(classes, GLI, Rules(et_min_volume=20, unit="mm3"), spacing) == ET).sum() == 3
    assert (postprocess_classes(classes, GLI, Rules(et_min_volume=4), spacing) == ET).sum() == 0
    # component sizes too: a 2-voxel TC piece (16 mm^3) goes below 17 mm^3 and stays below 16
    classes = blob((10, 10, 10), [(0, 10), (0, 10), (0, 10)], ED)
    classes[1, 1, 1:3] = NCR
    assert (postprocess_classes(classes, GLI, Rules((0, 17, 0), unit="mm3"), spacing) == NCR).sum() == 0
    assert (postprocess_classes(classes, GLI, Rules((0, 16, 0), unit="mm3"), spacing) == NCR).sum() == 2


def test_largest_component_keeps_the_biggest_tumour_with_its_core():
    shape = (20, 20, 20)
    classes = blob(shape, [(1, 9), (1, 9), (1, 9)], ED)        # 512 voxels
    blob(shape, [(3, 6), (3, 6), (3, 6)], ET, classes)
    blob(shape, [(14, 18), (14, 18), (14, 18)], ED, classes)   # 64 voxels, with a core
    blob(shape, [(15, 16), (15, 16), (15, 16)], NCR, classes)
    out = postprocess_classes(classes, GLI, Rules(largest_component=True))
    assert (out[12:, 12:, 12:] == BG).all() and np.array_equal(out[:10, :10, :10], classes[:10, :10, :10])
    mask = np.zeros(shape, bool)
    assert not largest_component(mask).any()


def test_rules_round_trip_and_describe():
    rules = Rules((0, 50, 0), 100, "mm3", True)
    assert Rules.from_dict(rules.to_dict()) == rules and rules.active and not Rules().active
    assert rules.describe(GLI) == "min component TC 50 mm3, ET below 100 mm3 -> NCR, largest WT component only"
    assert Rules().describe(GLI) == "off"


def test_a_region_outside_wt_is_handled_on_its_own():
    """GLI 2024: a small cavity component goes to background, a large one stays; a cavity next to
    the tumour does not take tumour voxels with it."""
    task = TASKS["brats-gli-2024"]
    shape = (16, 16, 16)
    classes = blob(shape, [(1, 7), (1, 7), (1, 7)], ED)             # tumour (216)
    blob(shape, [(2, 5), (2, 5), (2, 5)], ET, classes)
    blob(shape, [(7, 12), (1, 7), (1, 7)], RC, classes)             # big cavity touching it (180)
    blob(shape, [(13, 15), (13, 15), (13, 15)], RC, classes)        # small cavity (8)
    out = postprocess_classes(classes, task, Rules((0, 0, 0, 10)))
    assert (out[13:15, 13:15, 13:15] == BG).all()
    assert np.array_equal(out[:12, :8, :8], classes[:12, :8, :8])


def test_ped_enhancing_label_becomes_netc():
    task = TASKS["brats-ped"]  # classes 1 ET, 2 NETC, 3 CC, 4 ED
    classes = blob((8, 8, 8), [(0, 4), (0, 4), (0, 4)], 2)
    classes[0, 0, :3] = 1
    out = postprocess_classes(classes, task, Rules(et_min_volume=5))
    assert (out == 1).sum() == 0 and (out == 2).sum() == 64
