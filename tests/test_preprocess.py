"""datasets/preprocess.py: brain mask, crop box, z-scoring inside the brain."""
import numpy as np
import pytest

from core.boxes import bounding_box, crop
from core.task import builtin_tasks
from datasets.io import Geometry
from datasets.preprocess import brain_mask, preprocess_case, zscore_in_mask

TASKS = builtin_tasks()
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # the canonical voxel order: not reoriented


def _images() -> np.ndarray:
    """(2, 8, 7, 6): brain = x 2..5, y 1..4, z 3..4 (in either channel)."""
    images = np.zeros((2, 8, 7, 6), dtype=np.float32)
    rng = np.random.default_rng(0)
    images[0, 2:6, 1:5, 3:5] = rng.uniform(10, 50, (4, 4, 2))
    images[1, 2:6, 1:5, 3:5] = rng.uniform(100, 300, (4, 4, 2))
    images[0, 2, 1, 3] = 0.0  # zero in one channel only: still brain
    return images


def test_brain_mask_is_nonzero_in_any_channel():
    mask = brain_mask(_images())
    assert mask.dtype == bool and mask.sum() == 4 * 4 * 2
    assert mask[2, 1, 3]


@pytest.mark.parametrize("box", [((2, 6), (1, 5), (3, 5)), ((0, 1), (0, 7), (5, 6)), ((7, 8), (6, 7), (0, 6))])
def test_bounding_box_hand_checked(box):
    mask = np.zeros((8, 7, 6), dtype=bool)
    (x0, x1), (y0, y1), (z0, z1) = box
    mask[x0:x1, y0:y1, z0:z1] = True
    assert bounding_box(mask) == box


def test_bounding_box_of_scattered_voxels():
    mask = np.zeros((8, 7, 6), dtype=bool)
    mask[1, 6, 2] = mask[5, 0, 4] = True
    assert bounding_box(mask) == ((1, 6), (0, 7), (2, 5))


def test_bounding_box_of_empty_mask_is_full_volume():
    assert bounding_box(np.zeros((3, 4, 5), dtype=bool)) == ((0, 3), (0, 4), (0, 5))


def test_crop_last_three_axes():
    array = np.arange(2 * 8 * 7 * 6).reshape(2, 8, 7, 6)
    out = crop(array, ((2, 6), (1, 5), (3, 5)))
    assert out.shape == (2, 4, 4, 2)
    assert out[1, 0, 0, 0] == array[1, 2, 1, 3]


def test_zscore_inside_mask():
    images = _images()
    mask = brain_mask(images)
    out = zscore_in_mask(images, mask)
    assert out.dtype == np.float32
    for c in range(2):
        np.testing.assert_allclose(out[c][mask].mean(), 0.0, atol=1e-5)
        np.testing.assert_allclose(out[c][mask].std(), 1.0, atol=1e-5)
        assert (out[c][~mask] == 0).all()
    # hand-computed for one voxel
    values = images[1][mask].astype(np.float64)
    np.testing.assert_allclose(out[1, 3, 2, 4], (images[1, 3, 2, 4] - values.mean()) / values.std(), rtol=1e-5)


def test_zscore_constant_channel_does_not_blow_up():
    images = np.zeros((1, 4, 4, 4), dtype=np.float32)
    images[0, 1:3, 1:3, 1:3] = 7.0
    out = zscore_in_mask(images, images[0] > 0)
    assert np.isfinite(out).all() and (out == 0).all()


def test_preprocess_case_crops_normalizes_and_converts_labels():
    images = _images()
    seg = np.zeros((8, 7, 6), dtype=np.uint8)
    seg[3, 2, 3], seg[4, 2, 3], seg[5, 4, 4] = 1, 2, 4
    geometry = Geometry(affine=LPS, header=None, shape=(8, 7, 6))
    out, classes, cropped = preprocess_case(images, seg, geometry, TASKS["brats-gli-2021"])
    assert cropped.crop_box == ((2, 6), (1, 5), (3, 5)) and geometry.crop_box is None  # the input is not changed
    assert cropped.task == "brats-gli-2021" and cropped.cropped_shape == (4, 4, 2)
    assert out.shape == (2, 4, 4, 2) and classes.shape == (4, 4, 2) and classes.dtype == np.uint8
    assert (classes[1, 1, 0], classes[2, 1, 0], classes[3, 3, 1]) == (1, 2, 3)
    assert classes.sum() == 6
    inside = brain_mask(images)[2:6, 1:5, 3:5]
    for c in range(2):
        np.testing.assert_allclose(out[c][inside].mean(), 0.0, atol=1e-5)
        np.testing.assert_allclose(out[c][inside].std(), 1.0, atol=1e-5)
    assert out.flags.c_contiguous and classes.flags.c_contiguous


@pytest.mark.parametrize("name,values,classes", [
    ("brats-ped", [1, 2, 3, 4], [1, 2, 3, 4]),       # PED: 1 ET, 2 NETC, 3 CC, 4 ED -> classes in that order
    ("msd-brain", [1, 2, 3, 0], [2, 1, 3, 0]),       # MSD: value 1 (edema) is class 2, value 2 class 1
    ("brats-gli-2024", [4, 3, 2, 1], [4, 3, 2, 1]),
])
def test_preprocess_case_uses_the_task_labels(name, values, classes):
    seg = np.zeros((8, 7, 6), dtype=np.uint8)
    seg[2:6, 1, 3] = values
    geometry = Geometry(affine=LPS, header=None, shape=(8, 7, 6))
    _, out, _ = preprocess_case(_images(), seg, geometry, TASKS[name])
    assert out[:, 0, 0].tolist() == classes


def test_preprocess_case_without_labels():
    geometry = Geometry(affine=LPS, header=None, shape=(8, 7, 6))
    out, classes, geometry = preprocess_case(_images(), None, geometry, TASKS["brats-gli-2023"])
    assert classes is None and out.shape == (2, 4, 4, 2) and geometry.task == "brats-gli-2023"


def test_preprocess_case_rejects_labels_of_another_task():
    geometry = Geometry(affine=LPS, header=None, shape=(8, 7, 6))
    seg = np.zeros((8, 7, 6), np.uint8)
    seg[3, 2, 3] = 4
    with pytest.raises(ValueError, match=r"label values \[4\] are not labels of task brats-gli-2023"):
        preprocess_case(_images(), seg, geometry, TASKS["brats-gli-2023"])
