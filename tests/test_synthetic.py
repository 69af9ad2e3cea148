"""datasets/synthetic.py: BraTS names and label values, determinism, background, contrasts."""
import nibabel as nib
import numpy as np
import pytest

from datasets.io import discover_cases, read_case
from datasets.synthetic import (brats_affine, case_id, generate_case, generate_dataset, main, smooth_field,
                                synthesize_case)

SHAPE = (40, 44, 32)


@pytest.fixture(scope="module")
def cases():
    """Ten in-memory cases: (images (4, X, Y, Z), classes (X, Y, Z))."""
    return [synthesize_case(SHAPE, np.random.default_rng([3, i])) for i in range(10)]


@pytest.mark.parametrize("convention,files", [
    ("2021", ["BraTS2021_00001_flair.nii.gz", "BraTS2021_00001_seg.nii.gz", "BraTS2021_00001_t1.nii.gz",
              "BraTS2021_00001_t1ce.nii.gz", "BraTS2021_00001_t2.nii.gz"]),
    ("2023", ["BraTS-GLI-00001-000-seg.nii.gz", "BraTS-GLI-00001-000-t1c.nii.gz", "BraTS-GLI-00001-000-t1n.nii.gz",
              "BraTS-GLI-00001-000-t2f.nii.gz", "BraTS-GLI-00001-000-t2w.nii.gz"]),
])
def test_names_affine_and_dtypes(tmp_path, convention, files):
    folder = generate_case(tmp_path, 1, seed=0, convention=convention, shape=SHAPE)
    assert folder == tmp_path / case_id(1, convention)
    assert sorted(p.name for p in folder.iterdir()) == files
    for path in folder.iterdir():
        img = nib.load(str(path))
        assert img.shape == SHAPE
        np.testing.assert_array_equal(img.affine, brats_affine(SHAPE))
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        expected = np.uint8 if "seg" in path.name else np.int16
        assert img.get_data_dtype() == expected
    case = discover_cases(tmp_path)[0]
    assert case.case_id == folder.name and case.seg is not None and len(case.images) == 4


def test_brats_affine_is_lps_with_sri24_offset():
    np.testing.assert_array_equal(brats_affine((240, 240, 155)),
                                  [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize("convention,values", [("2021", {0, 1, 2, 4}), ("2023", {0, 1, 2, 3})])
def test_label_values_follow_convention(tmp_path, convention, values):
    generate_dataset(tmp_path, 4, seed=3, convention=convention, shape=SHAPE)
    found, with_et = set(), 0
    et = 4 if convention == "2021" else 3
    for case in discover_cases(tmp_path):
        seg = np.asanyarray(nib.load(str(case.seg)).dataobj)
        found |= set(np.unique(seg).tolist())
        with_et += int((seg == et).any())
    assert found <= values and {1, 2} <= found
    assert with_et >= 3  # most cases have ET


def test_deterministic_given_seed(tmp_path):
    a = generate_case(tmp_path / "a", 2, seed=5, shape=SHAPE)
    b = generate_case(tmp_path / "b", 2, seed=5, shape=SHAPE)
    c = generate_case(tmp_path / "c", 2, seed=6, shape=SHAPE)
    for name in ("t1", "flair", "seg"):
        data = [np.asanyarray(nib.load(str(f / f"{f.name}_{name}.nii.gz")).dataobj) for f in (a, b, c)]
        np.testing.assert_array_equal(data[0], data[1])
        assert not np.array_equal(data[0], data[2])


def test_parallel_generation_equals_serial(tmp_path):
    serial = generate_dataset(tmp_path / "s", 2, seed=1, shape=SHAPE)
    parallel = generate_dataset(tmp_path / "p", 2, seed=1, shape=SHAPE, workers=2)
    for s, p in zip(serial, parallel):
        assert s.name == p.name
        for name in ("t2", "seg"):
            np.testing.assert_array_equal(nib.load(str(s / f"{s.name}_{name}.nii.gz")).get_fdata(),
                                          nib.load(str(p / f"{p.name}_{name}.nii.gz")).get_fdata())


def test_background_is_zero_and_brain_nonzero(cases):
    for images, classes in cases:
        brain = images[0] != 0
        for c in range(4):
            assert ((images[c] != 0) == brain).all()  # same brain in every channel, >= 1 inside
        assert images[:, ~brain].max() == 0 and images[:, brain].min() >= 1
        assert (classes[~brain] == 0).all()  # tumour only inside the brain
        assert 0.1 < brain.mean() < 0.6
        # the brain does not touch the x/y borders
        assert not brain[[0, -1]].any() and not brain[:, [0, -1]].any()


def test_tumour_classes_present(cases):
    counts = np.array([np.bincount(classes.ravel(), minlength=4) for _, classes in cases])
    assert (counts[:, 1] > 0).all() and (counts[:, 2] > 0).all()
    assert (counts[:, 3] > 0).sum() >= 7
    assert (counts[:, 1:].sum(1) < 0.1 * np.prod(SHAPE)).all()


@pytest.mark.parametrize("index", range(4))
def test_contrasts_make_labels_learnable(index):
    """Per class median intensity relative to normal brain (classes of >= 50 voxels): edema bright
    on FLAIR and T2, necrosis dark on T1ce, ET bright on T1ce but not on T1."""
    images, classes = synthesize_case((64, 72, 48), np.random.default_rng([4, index]))
    normal = (images[0] > 0) & (classes == 0)

    def rel(channel, cls):
        return np.median(images[channel][classes == cls]) / np.median(images[channel][normal])

    counts = np.bincount(classes.ravel(), minlength=4)
    assert counts[2] >= 50 and rel(3, 2) > 1.4 and rel(2, 2) > 1.2
    if counts[1] >= 50:
        assert rel(1, 1) < 0.8
    if counts[3] >= 50:
        assert rel(1, 3) > 1.4 and rel(0, 3) < 1.0


def test_float32_output(tmp_path):
    folder = generate_case(tmp_path, 0, shape=SHAPE, dtype="float32", convention="2023")
    img = nib.load(str(folder / f"{folder.name}-t1n.nii.gz"))
    assert img.get_data_dtype() == np.float32
    images, seg, _ = read_case(discover_cases(tmp_path)[0], ["t1", "t1ce", "t2", "flair"])
    assert images[:, seg > 0].min() >= 1


def test_smooth_field_has_unit_variance():
    rng = np.random.default_rng(0)
    fields = np.stack([smooth_field((20, 18, 16), 4, rng) for _ in range(200)])
    assert fields.dtype == np.float32 and fields.shape == (200, 20, 18, 16)
    np.testing.assert_allclose(fields.std(axis=0).mean(), 1.0, atol=0.08)
    assert abs(np.diff(fields, axis=1)).mean() < 0.25  # neighbours are strongly correlated


def test_cli(tmp_path, capsys):
    argv = [str(tmp_path), "--cases", "2", "--seed", "1", "--convention", "2023", "--shape", "24", "24", "20"]
    assert main(argv) == 0
    assert "wrote 2 cases" in capsys.readouterr().out
    assert [c.case_id for c in discover_cases(tmp_path)] == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]


@pytest.mark.parametrize("kwargs,match", [
    ({"shape": (8, 40, 40)}, "shape"), ({"convention": "2020"}, "convention"), ({"dtype": "uint8"}, "dtype"),
    ({"cases": 0}, "cases"), ({"workers": 0}, "workers"),
])
def test_invalid_arguments(tmp_path, kwargs, match):
    args = {"cases": 1, "shape": SHAPE, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_dataset(tmp_path, **args)
