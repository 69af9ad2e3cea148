"""datasets/io.py: discovery of every naming and the MSD layout, geometry-preserving round trips,
and one documented error per kind of bad input (each naming the file)."""
import gzip
import math

import nibabel as nib
import numpy as np
import pytest

from core.errors import UserError
from core.task import builtin_tasks
from datasets.io import (
    CaseError,
    Geometry,
    discover_cases,
    read_case,
    to_original,
    write_probabilities,
    write_segmentation,
)
from datasets.preprocess import preprocess_case

TASKS = builtin_tasks()
GLI21, GLI23, MSD = TASKS["brats-gli-2021"], TASKS["brats-gli-2023"], TASKS["msd-brain"]

SHAPE = (12, 10, 8)
MODALITIES = ["t1", "t1ce", "t2", "flair"]
NAMES = {"2021": ("_", ["t1", "t1ce", "t2", "flair"]), "2023": ("-", ["t1n", "t1c", "t2w", "t2f"])}


def _rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = math.cos(ax), math.sin(ax), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


def _affine(linear, offset) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = offset
    return affine


AFFINES = {
    "lps": _affine(np.diag([-1.0, -1.0, 1.0]), [0.0, 239.0, 0.0]),
    "ras": _affine(np.eye(3), [-90.0, -126.0, -72.0]),
    "oblique": _affine(_rotation(0.2, 0.5) @ np.diag([1.2, 1.2, 1.0]), [10.5, -20.25, 33.0]),
    "anisotropic": _affine(np.diag([0.9375, 0.9375, 3.0]), [-120.0, -110.0, -60.0]),
}


def write_nifti(path, data, affine, sform_code=1, qform_code=1, slope=None, inter=None):
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_sform(affine, code=sform_code)
    img.header.set_qform(affine, code=qform_code)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_case(root, case_id, convention="2021", suffix=".nii.gz", affine=None, dtype=np.int16,
               with_seg=True, skip=(), codes=(1, 1), slope=None, inter=None, seed=0):
    """A tiny case with raw image values ``raw`` (returned) and labels of ``convention``."""
    rng = np.random.default_rng(seed)
    affine = AFFINES["lps"] if affine is None else affine
    sep, names = NAMES[convention]
    folder = root / case_id
    raw = {}
    for name in names:
        if name in skip:
            continue
        data = rng.integers(1, 500, SHAPE).astype(dtype)
        data[:2] = 0  # background
        raw[name] = data
        write_nifti(folder / f"{case_id}{sep}{name}{suffix}", data, affine, *codes, slope=slope, inter=inter)
    if with_seg:
        seg = np.zeros(SHAPE, dtype=np.uint8)
        seg[4:6, 3:5, 2:4] = 1
        seg[6:8, 3:5, 2:4] = 2
        seg[8:10, 3:5, 2:4] = 4 if convention == "2021" else 3
        write_nifti(folder / f"{case_id}{sep}seg{suffix}", seg, affine, *codes)
    return folder, raw


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_discovers_both_conventions(tmp_path, suffix):
    write_case(tmp_path, "BraTS2021_00001", "2021", suffix)
    write_case(tmp_path, "BraTS-GLI-00002-000", "2023", suffix)
    write_case(tmp_path, "BraTS-MEN-00003-001", "2023", suffix, with_seg=False)
    (tmp_path / "notes").mkdir()  # folders without case files are ignored
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS-GLI-00002-000", "BraTS-MEN-00003-001", "BraTS2021_00001"]
    for case in cases:
        assert case.modalities_present() == frozenset(MODALITIES) and case.layout == "brats"
        assert all(p.name.endswith(suffix) for p in case.files.values())
    assert cases[0].image_sources(["flair"], GLI23)[0] == (cases[0].folder / f"BraTS-GLI-00002-000-t2f{suffix}", None)
    assert cases[2].files["t1ce"].name == f"BraTS2021_00001_t1ce{suffix}"
    assert cases[0].seg.name == f"BraTS-GLI-00002-000-seg{suffix}"
    assert cases[1].seg is None


def test_root_may_be_a_single_case_folder(tmp_path):
    folder, _ = write_case(tmp_path, "BraTS2021_00007")
    cases = discover_cases(folder)
    assert len(cases) == 1 and cases[0].case_id == "BraTS2021_00007"


def test_empty_root_raises_naming_folder(tmp_path):
    with pytest.raises(UserError, match="no BraTS cases found") as err:
        discover_cases(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_missing_root_raises(tmp_path):
    with pytest.raises(UserError, match="not found"):
        discover_cases(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------
# Reading and writing back
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("affine_name", list(AFFINES))
@pytest.mark.parametrize("codes", [(1, 1), (2, 0), (0, 1), (4, 2)])
def test_segmentation_round_trip_keeps_geometry(tmp_path, affine_name, codes):
    affine = AFFINES[affine_name]
    write_case(tmp_path, "BraTS2021_00001", affine=affine, codes=codes)
    case = discover_cases(tmp_path)[0]
    images, seg, geometry = read_case(case, GLI21)
    assert images.shape == (4,) + SHAPE and images.dtype == np.float32
    assert seg.dtype == np.uint8 and sorted(np.unique(seg)) == [0, 1, 2, 4]
    out = write_segmentation(seg, geometry, tmp_path / "pred" / "BraTS2021_00001.nii.gz")
    ref, img = nib.load(str(case.files["t1"])), nib.load(str(out))
    assert img.shape == SHAPE
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
    assert int(img.header["sform_code"]) == codes[0] == int(ref.header["sform_code"])
    assert int(img.header["qform_code"]) == codes[1] == int(ref.header["qform_code"])
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), seg)
    np.testing.assert_allclose(img.header.get_zooms(), ref.header.get_zooms(), atol=1e-5)


@pytest.mark.parametrize("dtype,slope,inter", [(np.int16, 2.0, 10.0), (np.int16, 0.5, -3.0), (np.float32, None, None)])
def test_read_applies_scaling(tmp_path, dtype, slope, inter):
    _, raw = write_case(tmp_path, "BraTS2021_00001", dtype=dtype, slope=slope, inter=inter)
    images, _, _ = read_case(discover_cases(tmp_path)[0], GLI21, ["flair", "t1"])
    expected = [raw["flair"].astype(np.float64), raw["t1"].astype(np.float64)]
    if slope is not None:
        expected = [e * slope + inter for e in expected]
    np.testing.assert_allclose(images, np.stack(expected), rtol=1e-6)


def test_modality_order_and_aliases(tmp_path):
    _, raw = write_case(tmp_path, "BraTS-GLI-00001-000", "2023", dtype=np.float32)
    case = discover_cases(tmp_path)[0]
    images, _, _ = read_case(case, GLI23, ["t2f", "t1ce"])  # aliases of flair, t1c
    np.testing.assert_array_equal(images[0], raw["t2f"])
    np.testing.assert_array_equal(images[1], raw["t1c"])


def test_cropped_prediction_written_in_full_geometry(tmp_path):
    write_case(tmp_path, "BraTS2021_00001", affine=AFFINES["oblique"])
    case = discover_cases(tmp_path)[0]
    images, seg, geometry = read_case(case, GLI21)
    _, classes, cropped = preprocess_case(images, seg, geometry, GLI21, target_spacing=None)
    assert cropped.crop_box is not None and cropped.orientation is not None  # oblique: closest RAS-like axes
    with pytest.raises(ValueError, match="use to_original first"):
        write_segmentation(classes, cropped, tmp_path / "pred.nii.gz")
    out = write_segmentation(to_original(classes, cropped), cropped, tmp_path / "pred.nii.gz")  # class 3 as-is
    data = np.asanyarray(nib.load(str(out)).dataobj)
    assert data.shape == SHAPE
    assert (data[:2] == 0).all()
    assert (data[8:10, 3:5, 2:4] == 3).all()


def test_probabilities_round_trip(tmp_path):
    write_case(tmp_path, "BraTS2021_00001", affine=AFFINES["anisotropic"])
    _, _, geometry = read_case(discover_cases(tmp_path)[0], GLI21)
    probs = np.random.default_rng(1).random((3,) + SHAPE).astype(np.float32)
    img = nib.load(str(write_probabilities(probs, geometry, tmp_path / "probs.nii.gz")))
    assert img.shape == SHAPE + (3,)
    np.testing.assert_allclose(img.affine, AFFINES["anisotropic"], atol=1e-5)
    np.testing.assert_allclose(np.moveaxis(img.get_fdata(), -1, 0), probs, atol=0.5 / 255 + 1e-6)


def test_geometry_json_round_trip():
    geometry = Geometry(affine=AFFINES["oblique"], header=None, shape=SHAPE,
                        crop_box=((1, 11), (0, 10), (2, 8)), task="brats-gli-2023", source="x.nii.gz")
    back = Geometry.from_json(geometry.to_json())
    np.testing.assert_array_equal(back.affine, geometry.affine)
    assert (back.shape, back.crop_box, back.task, back.source) == (SHAPE, geometry.crop_box, "brats-gli-2023",
                                                                    "x.nii.gz")
    assert back.cropped_shape == (10, 10, 6)
    np.testing.assert_allclose(back.spacing, (1.2, 1.2, 1.0))


def test_to_original_pastes_and_reorients():
    # canonical axes = original (z, x, y) reversed in y: orientation ((2, F), (0, F), (1, T))
    geometry = Geometry(affine=np.eye(4), header=None, shape=(12, 10, 8), crop_box=((1, 7), (0, 12), (2, 8)),
                        orientation=((2, False), (0, False), (1, True)))
    assert geometry.canonical_shape == (8, 12, 10) and geometry.cropped_shape == (6, 12, 6)
    crop = np.zeros((6, 12, 6), np.uint8)
    crop[0, 3, 0] = 5  # canonical voxel (1, 3, 2)
    full = to_original(crop, geometry)
    assert full.shape == (12, 10, 8) and full.sum() == 5
    assert full[3, 10 - 1 - 2, 1] == 5  # original x = canonical y, original y reversed, original z = canonical x
    with pytest.raises(ValueError, match="is not the canonical crop"):
        to_original(np.ones((9, 10, 6)), geometry)
    probs = np.full((3, 6, 12, 6), 0.5, np.float32)  # per-channel fill outside the crop
    full = to_original(probs, geometry, fill=[1.0, 0.0, 0.25])
    inside = to_original(np.ones((6, 12, 6), bool), geometry, fill=False)
    assert full.shape == (3, 12, 10, 8) and inside.sum() == 6 * 12 * 6
    assert (full[:, inside] == 0.5).all()
    assert (full[0][~inside] == 1.0).all() and (full[1][~inside] == 0.0).all() and (full[2][~inside] == 0.25).all()


# ----------------------------------------------------------------------------------------------
# Bad inputs: one error each, naming the file
# ----------------------------------------------------------------------------------------------
def test_missing_modality(tmp_path):
    folder, _ = write_case(tmp_path, "BraTS2021_00001", skip=("flair",))
    with pytest.raises(CaseError, match="has no 'flair' image") as err:
        read_case(discover_cases(tmp_path)[0], GLI21)
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("suffix, data, affine, match", [
    ("t2", np.ones((12, 10, 9), np.int16), "lps", "shape"),          # a modality of another shape
    ("flair", np.ones(SHAPE, np.int16), "ras", "affine differs"),     # not co-registered
    ("seg", np.zeros((12, 10, 7), np.uint8), "lps", "shape"),        # the seg on another grid
])
def test_file_off_the_case_grid(tmp_path, suffix, data, affine, match):
    folder, _ = write_case(tmp_path, "BraTS2021_00001")
    bad = folder / f"BraTS2021_00001_{suffix}.nii.gz"
    write_nifti(bad, data, AFFINES[affine])
    with pytest.raises(CaseError, match=match) as err:
        read_case(discover_cases(tmp_path)[0], GLI21)
    assert str(bad) in str(err.value)


def test_truncated_gzip(tmp_path):
    folder, _ = write_case(tmp_path, "BraTS2021_00001")
    bad = folder / "BraTS2021_00001_t1ce.nii.gz"
    content = bad.read_bytes()
    bad.write_bytes(content[: len(content) // 2])
    with pytest.raises(CaseError, match="cannot read") as err:
        read_case(discover_cases(tmp_path)[0], GLI21)
    assert str(bad) in str(err.value)


def test_corrupt_file(tmp_path):
    folder, _ = write_case(tmp_path, "BraTS2021_00001")
    bad = folder / "BraTS2021_00001_t1.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    with pytest.raises(CaseError, match="cannot read NIfTI") as err:
        read_case(discover_cases(tmp_path)[0], GLI21)
    assert str(bad) in str(err.value)


def test_nan_voxels(tmp_path):
    folder, _ = write_case(tmp_path, "BraTS2021_00001", dtype=np.float32)
    bad = folder / "BraTS2021_00001_t2.nii.gz"
    data = np.ones(SHAPE, np.float32)
    data[3, 3, 3] = np.nan
    data[4, 4, 4] = np.inf
    write_nifti(bad, data, AFFINES["lps"])
    with pytest.raises(CaseError, match="2 voxels are NaN or infinite") as err:
        read_case(discover_cases(tmp_path)[0], GLI21)
    assert str(bad) in str(err.value)


def test_4d_file(tmp_path):
    folder, _ = write_case(tmp_path, "BraTS2021_00001")
    bad = folder / "BraTS2021_00001_flair.nii.gz"
    write_nifti(bad, np.ones(SHAPE + (2,), np.int16), AFFINES["lps"])
    with pytest.raises(CaseError, match="expected a 3D volume") as err:
        read_case(discover_cases(tmp_path)[0], GLI21)
    assert str(bad) in str(err.value)


def test_4d_file_with_one_volume_is_accepted(tmp_path):
    folder, raw = write_case(tmp_path, "BraTS2021_00001")
    write_nifti(folder / "BraTS2021_00001_flair.nii.gz", raw["flair"][..., None], AFFINES["lps"])
    images, _, _ = read_case(discover_cases(tmp_path)[0], GLI21)
    np.testing.assert_array_equal(images[3], raw["flair"])


@pytest.mark.parametrize("bad", [0.0, np.nan])
def test_zero_or_nan_spacing_names_the_file(tmp_path, bad):
    folder, _ = write_case(tmp_path, "BraTS2021_00001")
    path = folder / "BraTS2021_00001_t1.nii.gz"
    img = nib.load(str(path))
    header = img.header.copy()
    header["sform_code"] = 1  # the affine comes from the sform rows: a broken z column
    header["srow_x"][2], header["srow_y"][2], header["srow_z"][2] = 0.0, 0.0, bad
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, header), str(path))
    with pytest.raises(CaseError, match="voxel spacing .* is zero or not a number") as err:
        read_case(discover_cases(tmp_path)[0], GLI21)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_non_integer_labels(tmp_path):
    folder, _ = write_case(tmp_path, "BraTS2021_00001")
    bad = folder / "BraTS2021_00001_seg.nii.gz"
    write_nifti(bad, np.full(SHAPE, 1.5, np.float32), AFFINES["lps"])
    with pytest.raises(CaseError, match="non-integer") as err:
        read_case(discover_cases(tmp_path)[0], GLI21)
    assert str(bad) in str(err.value)


# ----------------------------------------------------------------------------------------------
# Other layouts: MEN-RT (one modality, gtv labels) and the MSD Task01 layout (4D images)
# ----------------------------------------------------------------------------------------------
def test_men_rt_case_with_gtv_label_file(tmp_path):
    folder = tmp_path / "BraTS-MEN-RT-0001-1"
    t1c = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    write_nifti(folder / "BraTS-MEN-RT-0001-1_t1c.nii.gz", t1c, AFFINES["anisotropic"])
    write_nifti(folder / "BraTS-MEN-RT-0001-1_gtv.nii.gz", (t1c > 500).astype(np.uint8), AFFINES["anisotropic"])
    (case,) = discover_cases(tmp_path)
    assert case.seg.name == "BraTS-MEN-RT-0001-1_gtv.nii.gz" and case.modalities_present() == {"t1ce"}
    images, seg, geometry = read_case(case, TASKS["brats-men-rt"])
    assert images.shape == (1,) + SHAPE and set(np.unique(seg)) == {0, 1}
    np.testing.assert_array_equal(images[0], t1c)
    np.testing.assert_allclose(geometry.spacing, (0.9375, 0.9375, 3.0))


def write_msd(root, ids=(1, 2), test_ids=(3,), channels=4):
    """An MSD Task01 folder: 4D images (X, Y, Z, C) whose channel c holds the value 100 * (c + 1) + case."""
    for folder, labels, case_ids in (("imagesTr", "labelsTr", ids), ("imagesTs", None, test_ids)):
        for i in case_ids:
            volume = np.stack([np.full(SHAPE, 100 * (c + 1) + i, np.int16) for c in range(channels)], axis=-1)
            write_nifti(root / folder / f"BRATS_{i:03d}.nii.gz", volume, AFFINES["ras"])
            if labels:
                seg = np.zeros(SHAPE, np.uint8)
                seg[4:6, 4:6, 2:4] = [[[1, 2], [3, 1]]] * 2
                write_nifti(root / labels / f"BRATS_{i:03d}.nii.gz", seg, AFFINES["ras"])
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")  # ignored


def test_msd_layout_discovery_and_4d_reading(tmp_path):
    write_msd(tmp_path)
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_002", "BRATS_003"]
    assert [c.layout for c in cases] == ["msd"] * 3 and cases[0].modalities_present() is None
    assert cases[1].seg == tmp_path / "labelsTr" / "BRATS_002.nii.gz" and cases[2].seg is None
    # channels in the task's order (FLAIR, T1w, T1gd, T2w), read in any order asked
    images, seg, geometry = read_case(cases[1], MSD, ["t1", "t1ce", "t2", "flair"])
    assert [float(images[c, 0, 0, 0]) for c in range(4)] == [202.0, 302.0, 402.0, 102.0]
    assert geometry.shape == SHAPE and set(np.unique(seg)) == {0, 1, 2, 3}
    out = write_segmentation(seg, geometry, tmp_path / "out" / "BRATS_002.nii.gz")
    img = nib.load(str(out))
    assert img.shape == SHAPE  # a 3D mask from the 4D image's header
    np.testing.assert_allclose(img.affine, AFFINES["ras"], atol=1e-5)
    # an imagesTs folder given directly
    assert [c.case_id for c in discover_cases(tmp_path / "imagesTs")] == ["BRATS_003"]


def test_msd_image_with_another_channel_count(tmp_path):
    write_msd(tmp_path, ids=(1,), test_ids=(), channels=3)
    with pytest.raises(CaseError, match="the 4D image has 3 channel.*task msd-brain expects 4") as err:
        read_case(discover_cases(tmp_path)[0], MSD)
    assert "BRATS_001.nii.gz" in str(err.value)
