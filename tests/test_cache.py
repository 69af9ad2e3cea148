"""datasets/cache.py: build, reuse, invalidation, label conventions, stored arrays."""
import logging
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

import datasets.cache as cache_module
from engine.config import DataConfig
from engine.errors import UserError
from datasets.cache import prepare_cache
from datasets.io import CaseError, atomic_save, discover_cases, read_case
from datasets.preprocess import preprocess_case
from datasets.synthetic import generate_dataset

SHAPE = (32, 32, 24)
MODALITIES = ["t1", "t1ce", "t2", "flair"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Three 2021 cases plus one without a seg file, generated once."""
    root = tmp_path_factory.mktemp("source")
    folders = generate_dataset(root, 4, seed=5, convention="2021", shape=SHAPE)
    for folder in folders[:3]:  # every labelled case has ET (the convention tests rely on it)
        assert (nib.load(str(folder / f"{folder.name}_seg.nii.gz")).get_fdata() == 4).any()
    (folders[3] / f"{folders[3].name}_seg.nii.gz").unlink()
    return root


@pytest.fixture
def root(source, tmp_path):
    """A private copy of the source data (file mtimes preserved)."""
    return shutil.copytree(source, tmp_path / "data")


def config(root, tmp_path, **kwargs) -> DataConfig:
    return DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"), **{"cache_workers": 1, **kwargs})


def rewrite_seg(folder, change):
    """Replace the seg file of ``folder`` by ``change(labels)`` (same affine)."""
    path = next(folder.glob("*seg.nii.gz"))
    img = nib.load(str(path))
    labels = change(np.asanyarray(img.dataobj).copy())
    atomic_save(nib.Nifti1Image(labels.astype(np.uint8), img.affine), path)
    return path


def mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if not p.name.startswith(".")}


def test_build_and_load(root, tmp_path):
    index = prepare_cache(config(root, tmp_path), show_progress=False)
    assert index.convention == "2021"
    assert index.case_ids == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]  # 00003 has no seg
    case_source = discover_cases(root)[1]
    images, seg, geometry = read_case(case_source, MODALITIES)
    expected, classes, geometry = preprocess_case(images, seg, geometry, "2021")

    case = index.load("BraTS2021_00001")
    assert isinstance(case.images, np.memmap) and isinstance(case.classes, np.memmap)
    assert case.images.dtype == np.float32 and case.classes.dtype == np.uint8
    np.testing.assert_array_equal(case.images, expected)
    np.testing.assert_array_equal(case.classes, classes)
    assert case.geometry.crop_box == geometry.crop_box and case.geometry.shape == SHAPE
    assert case.geometry.convention == "2021"
    np.testing.assert_array_equal(case.geometry.affine, geometry.affine)
    assert case.class_counts == {c: int((classes == c).sum()) for c in range(4)}
    for cls, locs in case.class_locations.items():
        assert locs.dtype == np.int32 and locs.shape == (case.class_counts[cls], 3)
        assert (classes[tuple(locs.T)] == cls).all()
    loaded = index.load("BraTS2021_00001", mmap=False)
    assert not isinstance(loaded.images, np.memmap)


def test_locations_are_capped_and_distinct(root, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "MAX_LOCATIONS", 7)
    index = prepare_cache(config(root, tmp_path), show_progress=False)
    case = index.load(index.case_ids[0])
    for cls, locs in case.class_locations.items():
        assert len(locs) == min(7, case.class_counts[cls])
        assert len({tuple(v) for v in locs}) == len(locs)
        assert (case.classes[tuple(locs.T)] == cls).all()


def test_reused_without_rewriting(root, tmp_path):
    cfg = config(root, tmp_path)
    first = prepare_cache(cfg, show_progress=False)
    before = mtimes(first.folder)
    second = prepare_cache(cfg, show_progress=False)
    assert second.folder == first.folder and mtimes(second.folder) == before


def test_touched_source_rebuilds_only_that_case(root, tmp_path):
    cfg = config(root, tmp_path)
    index = prepare_cache(cfg, show_progress=False)
    before = mtimes(index.folder)
    t2 = root / "BraTS2021_00002" / "BraTS2021_00002_t2.nii.gz"
    stat = t2.stat()
    os.utime(t2, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    after = mtimes(prepare_cache(cfg, show_progress=False).folder)
    changed = sorted(name for name in before if after[name] != before[name])
    assert changed == ["BraTS2021_00002.json", "BraTS2021_00002_image.npy", "BraTS2021_00002_label.npy",
                       "BraTS2021_00002_locs.npz"]


def test_modified_labels_are_rebuilt(root, tmp_path):
    cfg = config(root, tmp_path)
    prepare_cache(cfg, show_progress=False)
    rewrite_seg(root / "BraTS2021_00000", lambda seg: np.where(seg > 0, 2, 0))  # all tumour -> edema
    case = prepare_cache(cfg, show_progress=False).load("BraTS2021_00000")
    assert case.class_counts[1] == case.class_counts[3] == 0 and case.class_counts[2] > 0
    assert len(case.class_locations[3]) == 0


def test_interrupted_case_is_rebuilt(root, tmp_path):
    cfg = config(root, tmp_path)
    folder = prepare_cache(cfg, show_progress=False).folder
    (folder / "BraTS2021_00001.json").unlink()  # as if killed before the json was written
    (folder / "BraTS2021_00001_image.npy").write_bytes(b"half")
    case = prepare_cache(cfg, show_progress=False).load("BraTS2021_00001")
    assert case.images.shape[0] == 4


def test_changed_settings_use_a_new_folder(root, tmp_path):
    base = prepare_cache(config(root, tmp_path), show_progress=False)
    half = prepare_cache(config(root, tmp_path, cache_dtype="float16"), show_progress=False)
    order = prepare_cache(config(root, tmp_path, modalities=["flair", "t1", "t1ce", "t2"]), show_progress=False)
    alias = prepare_cache(config(root, tmp_path, modalities=["t1n", "t1c", "t2w", "t2f"]), show_progress=False)
    forced = prepare_cache(config(root, tmp_path, label_convention="2021"), show_progress=False)
    assert len({base.folder, half.folder, order.folder}) == 3
    assert alias.folder == base.folder and forced.folder == base.folder  # same arrays, same folder
    a, b = base.load("BraTS2021_00000"), half.load("BraTS2021_00000")
    assert b.images.dtype == np.float16
    np.testing.assert_allclose(b.images, a.images, atol=2e-3 * np.abs(a.images).max())
    np.testing.assert_array_equal(order.load("BraTS2021_00000").images[0], a.images[3])


def test_parallel_build_matches_serial(root, tmp_path):
    serial = prepare_cache(config(root, tmp_path / "a"), show_progress=False)
    parallel = prepare_cache(config(root, tmp_path / "b", cache_workers=2), show_progress=False)
    for case_id in serial.case_ids:
        a, b = serial.load(case_id), parallel.load(case_id)
        np.testing.assert_array_equal(a.images, b.images)
        for cls in (1, 2, 3):
            np.testing.assert_array_equal(a.class_locations[cls], b.class_locations[cls])


def test_2023_convention_detected(tmp_path):
    generate_dataset(tmp_path / "data", 2, seed=5, convention="2023", shape=SHAPE)
    index = prepare_cache(config(tmp_path / "data", tmp_path), show_progress=False)
    assert index.convention == "2023"
    case = index.load(index.case_ids[0])
    seg = nib.load(str(discover_cases(tmp_path / "data")[0].seg)).get_fdata().astype(np.uint8)
    assert case.class_counts[3] == (seg == 3).sum() > 0


def test_mixed_conventions_raise_naming_the_case(root, tmp_path):
    rewrite_seg(root / "BraTS2021_00002", lambda seg: np.where(seg == 4, 3, seg))
    with pytest.raises(UserError, match="BraTS2021_00002") as err:
        prepare_cache(config(root, tmp_path), show_progress=False)
    assert "[0, 1, 2, 3]" in str(err.value) and "[0, 1, 2, 4]" in str(err.value)


def test_unexpected_label_values_raise_naming_the_case(root, tmp_path):
    def add_five(seg):
        seg[0, 0, 0] = 5
        return seg
    path = rewrite_seg(root / "BraTS2021_00001", add_five)
    with pytest.raises(UserError, match="unexpected label values") as err:
        prepare_cache(config(root, tmp_path), show_progress=False)
    assert str(path) in str(err.value) and "5" in str(err.value)


def test_forced_convention_that_does_not_fit_raises(root, tmp_path):
    with pytest.raises(CaseError, match="do not fit the 2023 convention") as err:
        prepare_cache(config(root, tmp_path, label_convention="2023"), show_progress=False)
    assert "BraTS2021_00000_seg.nii.gz" in str(err.value)


def test_no_et_anywhere_falls_back_to_2021(root, tmp_path, caplog):
    for name in ("BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"):
        rewrite_seg(root / name, lambda seg: np.where(seg == 4, 1, seg))
    with caplog.at_level(logging.WARNING, logger="datasets.cache"):
        index = prepare_cache(config(root, tmp_path), show_progress=False)
    assert index.convention == "2021"
    assert any("assuming the 2021 convention" in r.message for r in caplog.records)


def test_label_values_are_remembered(root, tmp_path, monkeypatch):
    cfg = config(root, tmp_path)
    prepare_cache(cfg, show_progress=False)
    assert (tmp_path / "cache" / cache_module.LABEL_MEMO).is_file()

    def fail(path):
        raise AssertionError(f"{path} read again")
    monkeypatch.setattr(cache_module, "read_label_values", fail)
    assert prepare_cache(cfg, show_progress=False).convention == "2021"


def test_no_labelled_case_raises(tmp_path):
    folders = generate_dataset(tmp_path / "data", 1, shape=SHAPE)
    (folders[0] / f"{folders[0].name}_seg.nii.gz").unlink()
    with pytest.raises(UserError, match="no case has a seg file"):
        prepare_cache(config(tmp_path / "data", tmp_path), show_progress=False)


def test_unlabelled_cases_are_skipped_with_a_message(root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="datasets.cache"):
        index = prepare_cache(config(root, tmp_path), show_progress=False)
    assert "BraTS2021_00003" not in index.case_ids
    assert any("BraTS2021_00003" in r.message for r in caplog.records)


def test_missing_case_in_index_raises(root, tmp_path):
    index = prepare_cache(config(root, tmp_path), show_progress=False)
    with pytest.raises(UserError, match="not in the cache"):
        index.load("BraTS2021_00003")
