"""datasets/spatial.py and the native-space pipeline: orientation (all 48 axis orders and flips),
resampling, the foreground of a head with a skull, the target spacing and the pooling plan."""
import itertools
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from core.task import builtin_tasks
from datasets.io import CaseError, Geometry, discover_cases, read_case, to_original, write_segmentation
from datasets.preprocess import preprocess_case, restore_probabilities
from datasets.spatial import (
    MAX_VOXELS,
    canonical_orientation,
    foreground_mask,
    from_canonical,
    otsu_threshold,
    plan_spacing,
    plan_strides,
    pooling_problem,
    resample,
    resample_classes,
    resampled_shape,
    to_canonical,
)

GLI = builtin_tasks()["brats-gli-2021"]
SHAPE = (9, 7, 5)
SIGNED_PERMUTATIONS = [(perm, signs) for perm in itertools.permutations(range(3))
                       for signs in itertools.product((1, -1), repeat=3)]


def signed_affine(perm, signs, spacing=(1.0, 1.5, 2.0), offset=(10.0, -20.0, 30.0)) -> np.ndarray:
    """Voxel axis ``k`` runs along world axis ``perm[k]`` in direction ``signs[k]``."""
    affine = np.zeros((4, 4))
    for k, (axis, sign) in enumerate(zip(perm, signs)):
        affine[axis, k] = sign * spacing[k]
    affine[:3, 3] = offset
    affine[3, 3] = 1
    return affine


def test_there_are_48_orientations():
    assert len(SIGNED_PERMUTATIONS) == 48


@pytest.mark.parametrize("perm, signs", SIGNED_PERMUTATIONS)
def test_canonical_orientation_matches_nibabel(perm, signs):
    affine = signed_affine(perm, signs)
    array = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    orientation = canonical_orientation(affine)
    ours = to_canonical(array, orientation)
    theirs = nib.orientations.apply_orientation(array, nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("LPS")))
    np.testing.assert_array_equal(ours, theirs)  # an independent implementation of the same transform
    np.testing.assert_array_equal(from_canonical(ours, orientation), array)
    stacked = np.stack([array, array + 1])  # leading (channel) axes are left alone
    np.testing.assert_array_equal(to_canonical(stacked, orientation)[1], ours + 1)
    torch_out = to_canonical(torch.from_numpy(stacked), orientation)
    np.testing.assert_array_equal(torch_out.numpy(), to_canonical(stacked, orientation))
    np.testing.assert_array_equal(from_canonical(torch_out, orientation).numpy(), stacked)


def test_the_brats_orientation_is_left_alone():
    assert canonical_orientation(np.diag([-1.0, -1.0, 1.0, 1.0])) is None
    assert canonical_orientation(np.eye(4)) == ((0, True), (1, True), (2, False))  # RAS: x and y reversed


def write_case(root, case_id, affine, seed=0, codes=(1, 1)):
    rng = np.random.default_rng(seed)
    folder = root / case_id
    folder.mkdir(parents=True)
    images = np.zeros((4,) + SHAPE, np.int16)
    images[:, 1:8, 1:6, 1:4] = rng.integers(10, 500, (4, 7, 5, 3))  # zero background: skull-stripped
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:6, 2:5, 1:3] = rng.choice(np.array([0, 1, 2, 4], np.uint8), (4, 3, 2))
    for data, name in list(zip(images, ("t1", "t1ce", "t2", "flair"))) + [(seg, "seg")]:
        img = nib.Nifti1Image(data, affine)
        img.header.set_sform(affine, codes[0])
        img.header.set_qform(affine, codes[1])
        img.header["descrip"] = b"from the scanner"
        nib.save(img, str(folder / f"{case_id}_{name}.nii.gz"))
    return folder


@pytest.mark.parametrize("perm, signs", SIGNED_PERMUTATIONS)
def test_mask_round_trip_through_the_pipeline_is_exact(tmp_path, perm, signs):
    """seg -> canonical crop (classes) -> back to the original grid -> written: the input exactly,
    affine and header included (no resampling at the case's own spacing)."""
    affine = signed_affine(perm, signs)
    folder = write_case(tmp_path / "data", "BraTS2021_00001", affine, codes=(2, 1))
    (case,) = discover_cases(tmp_path / "data")
    images, seg, geometry = read_case(case, GLI)
    _, classes, model = preprocess_case(images, seg, geometry, GLI, target_spacing=model_spacing(affine))
    assert model.resampled_shape is None  # the target is the case's own spacing
    out = write_segmentation(GLI.classes_to_labels(to_original(classes, model)), model, tmp_path / "out.nii.gz")
    source, written = nib.load(str(folder / "BraTS2021_00001_seg.nii.gz")), nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(source.dataobj))
    np.testing.assert_array_equal(written.affine, source.affine)
    for key in ("sform_code", "qform_code", "pixdim", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c",
                "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "dim", "descrip", "xyzt_units"):
        np.testing.assert_array_equal(written.header[key], source.header[key], err_msg=key)


def model_spacing(affine) -> tuple:
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    orientation = canonical_orientation(affine)
    return tuple(spacing) if orientation is None else tuple(spacing[a] for a, _ in orientation)


# ----------------------------------------------------------------------------------------------
# Resampling
# ----------------------------------------------------------------------------------------------
def smooth_volume(shape) -> np.ndarray:
    g = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    return (np.sin(2 * np.pi * g[0]) * np.cos(np.pi * g[1]) + g[2] ** 2).astype(np.float32)[None]


@pytest.mark.parametrize("spacing, target", [((1, 1, 1), (1, 1, 3)), ((1, 1, 3), (1, 1, 1)),
                                             ((0.8, 0.8, 2), (1, 1, 1)), ((1, 1, 1), (0.5, 0.5, 0.5))])
def test_smooth_image_there_and_back(spacing, target):
    """A smooth image (values in [-1, 2]) resampled to the target grid and back stays within 0.01
    of itself away from the edges (0.08 on the outermost voxels, which a coarser grid does not
    sample beyond) and 0.005 on average."""
    volume = smooth_volume((48, 40, 30))
    shape = resampled_shape(volume.shape[1:], spacing, target)
    there = resample(volume, shape, "image", spacing)
    back = resample(there, volume.shape[1:], "image", target)
    assert there.shape == (1,) + shape and back.shape == volume.shape and back.dtype == np.float32
    error = np.abs(back - volume)
    assert error[:, 2:-2, 2:-2, 2:-2].max() < 0.01 and error.max() < 0.08 and error.mean() < 0.005


def test_resampled_shape_keeps_the_extent():
    assert resampled_shape((240, 240, 52), (1, 1, 3), (1, 1, 1)) == (240, 240, 156)
    assert resampled_shape((500, 500, 40), (0.5, 0.5, 5), (1, 1, 1)) == (250, 250, 200)
    assert resampled_shape((10, 10, 10), (1, 1, 1), (1.0005, 1, 1)) == (10, 10, 10)  # equal within 1e-3
    assert resampled_shape((10, 10, 10), (1, 1, 1), None) == (10, 10, 10)


def test_thick_slices_are_resampled_separately():
    """Across a thick axis (1 x 1 x 5 mm) the in-plane interpolation is bicubic and the through-plane
    one linear: a linear ramp along z is reproduced exactly between slice centres."""
    ramp = np.broadcast_to(np.arange(6, dtype=np.float32)[None, None, None], (1, 8, 8, 6)).copy()
    up = resample(ramp, (16, 16, 30), "image", (1, 1, 5))
    centres = (np.arange(30) + 0.5) / 5 - 0.5  # target voxel centres in source voxel units
    np.testing.assert_allclose(up[0, 5, 5, 3:27], centres[3:27], atol=1e-5)
    assert np.allclose(up[0, :, :, 10], up[0, 0, 0, 10])  # constant in-plane stays constant


def test_labels_keep_their_values_and_do_not_invent_any():
    labels = np.zeros((30, 30, 16), np.uint8)
    labels[4:26, 4:26, 1:15] = 2
    labels[9:21, 9:21, 3:13] = 1
    labels[12:18, 12:18, 5:11] = 4  # values 0, 1, 2, 4 (no 3 between them), each at least 4 voxels thick
    for shape in [(60, 60, 48), (15, 15, 8), (30, 30, 48)]:
        out = resample_classes(labels, shape, 5)
        assert out.shape == shape and set(np.unique(out)) == {0, 1, 2, 4}


def test_probabilities_go_back_to_the_crop_grid():
    geometry = Geometry(affine=np.diag([-1.0, -1, 3, 1]), header=None, shape=(20, 20, 10),
                        crop_box=((2, 18), (2, 18), (1, 9)), target_spacing=(1.0, 1.0, 1.0),
                        resampled_shape=(16, 16, 24))
    probs = torch.rand(3, 16, 16, 24)
    back = restore_probabilities(probs, geometry)
    assert back.shape == (3, 16, 16, 8) and back.min() >= 0 and back.max() <= 1
    same = Geometry(affine=np.eye(4), header=None, shape=(20, 20, 10), crop_box=((0, 20), (0, 20), (0, 10)))
    assert restore_probabilities(probs, same) is probs  # not resampled: nothing to undo


def test_a_too_fine_target_spacing_is_refused_with_the_size():
    images = np.ones((1, 240, 240, 155), np.float32)
    geometry = Geometry(affine=np.diag([-1.0, -1, 1, 1]), header=None, shape=(240, 240, 155), source="x_t1.nii.gz")
    with pytest.raises(CaseError, match=r"x_t1.nii.gz: resampled to 2400x2400x1550 = 8.93e\+09 voxels, more than the "
                                        r"limit of 2.68e\+08; choose a coarser data.spacing"):
        preprocess_case(images, None, geometry, GLI, target_spacing=(0.1, 0.1, 0.1))
    assert MAX_VOXELS == 2**28


# ----------------------------------------------------------------------------------------------
# The foreground of skull-stripped and of non-skull-stripped images
# ----------------------------------------------------------------------------------------------
def head_with_skull(shape=(40, 44, 36), seed=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(2, X, Y, Z) images: a brain, a bright skull, scalp, and scanner noise everywhere (no exact
    zeros), with the head and brain masks."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt((g[0] / 0.7) ** 2 + (g[1] / 0.8) ** 2 + (g[2] / 0.75) ** 2)
    brain, skull, scalp = r < 0.75, (r >= 0.75) & (r < 0.87), (r >= 0.87) & (r < 1.0)
    images = np.abs(rng.normal(0, 15, (2,) + shape)) + 1.0  # Rayleigh-like background noise, never 0
    images[0][brain] += 500 + 80 * g[0][brain]
    images[1][brain] += 800
    images[:, skull] += 1200
    images[:, scalp] += 300
    return images.astype(np.float32), r < 1.0, brain


def test_foreground_of_a_head_with_skull_is_the_head():
    images, head, _ = head_with_skull()
    mask = foreground_mask(images)
    assert (mask & head).sum() / head.sum() > 0.97  # the whole head, skull and scalp included
    assert (mask & ~head).sum() / (~head).sum() < 0.02  # not the noisy background
    # the pipeline crops to the head and z-scores inside it: the noise is 0, the head has mean 0 / std 1
    geometry = Geometry(affine=np.diag([-1.0, -1, 1, 1]), header=None, shape=head.shape)
    out, _, cropped = preprocess_case(images, None, geometry, GLI)
    box = cropped.crop_box
    head_box = [(int(np.flatnonzero(head.any(axis=tuple(a for a in range(3) if a != k)))[0]),
                 int(np.flatnonzero(head.any(axis=tuple(a for a in range(3) if a != k)))[-1]) + 1) for k in range(3)]
    assert all(abs(a - c) <= 1 and abs(b - d) <= 1 for (a, b), (c, d) in zip(box, head_box))
    inside = mask[tuple(slice(a, b) for a, b in box)]
    assert abs(out[0][inside].mean()) < 1e-4 and abs(out[0][inside].std() - 1) < 1e-4
    assert (out[:, ~inside] == 0).all()


def test_foreground_of_skull_stripped_data_is_the_nonzero_voxels():
    images, head, brain = head_with_skull()
    stripped = np.where(brain, images, 0.0)
    stripped[0, 20, 20, 18] = 0.0  # a zero voxel inside the brain in one modality only: still foreground
    np.testing.assert_array_equal(foreground_mask(stripped), (stripped != 0).any(0))


def test_otsu_threshold_separates_two_modes():
    values = np.concatenate([np.random.default_rng(0).normal(10, 2, 5000), np.random.default_rng(1).normal(100, 5, 5000)])
    assert 25 < otsu_threshold(values) < 80  # in the gap between the modes (10 +- 2 and 100 +- 5), near its middle


# ----------------------------------------------------------------------------------------------
# Target spacing and pooling plan (hand-computed)
# ----------------------------------------------------------------------------------------------
def test_plan_spacing_median_and_thick_slices():
    assert plan_spacing([(1, 1, 1)] * 3) == (1.0, 1.0, 1.0)
    assert plan_spacing([(1, 1, 1), (1, 1, 3), (0.8, 0.8, 2)]) == (1.0, 1.0, 2.0)  # medians; ratio 2: kept
    # medians (0.5, 0.5, 4): 4 > 3 x 0.5, so z takes its 10th percentile of [1.5, 3, 5, 5]:
    # position 0.1 x 3 = 0.3 between 1.5 and 3 -> 1.5 + 0.3 x 1.5 = 1.95
    assert plan_spacing([(0.5, 0.5, 5), (0.5, 0.5, 5), (0.6, 0.6, 3), (0.5, 0.5, 1.5)]) == (0.5, 0.5, 1.95)
    # never below the other axes' spacing: medians (1, 1, 6); the 10th percentile of z is 0.2 -> 1
    assert plan_spacing([(1, 1, 6), (1, 1, 6), (1, 1, 0.2), (1, 1, 0.2), (1, 1, 6)]) == (1.0, 1.0, 1.0)


def test_plan_strides_waits_for_the_thick_axis():
    # 0.5 x 0.5 x 1.5: z is more than twice the finest -> not pooled at stage 1; then pooled with the others
    assert plan_strides((0.5, 0.5, 1.5), 5) == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert plan_strides((1, 1, 1), 3) == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert plan_strides((1, 1, 5), 4) == [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2]]
    assert pooling_problem([1, 2, 2, 2, 2], (0.5, 0.5, 1.5)) == \
        "stage 1 pools axis z at 1.5 mm while the finest axis is 0.5 mm"
    assert pooling_problem([1, [2, 2, 1], 2, 2, 2], (0.5, 0.5, 1.5)) is None
    assert pooling_problem([1, 2, 2], (1, 1, 1)) is None


def test_unet_with_per_axis_strides():
    from models import UNet3D
    net = UNet3D(2, 3, features=[4, 8, 8], strides=[1, [2, 2, 1], 2], blocks_per_stage=[1, 1, 1]).eval()
    assert net.divisor == (4, 4, 2)
    with torch.no_grad():
        assert net(torch.zeros(1, 2, 16, 16, 6)).shape == (1, 3, 16, 16, 6)
    with pytest.raises(ValueError, match=r"multiple of \[4, 4, 2\]"):
        net.check_input_size((16, 16, 5))
    with pytest.raises(ValueError, match=r"strides\[1\] must be an integer or \[x, y, z\]"):
        UNet3D(2, 3, features=[4, 8], strides=[1, [2, 2]], blocks_per_stage=[1, 1])
    assert math.prod(net.divisor) == 32
