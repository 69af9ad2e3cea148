"""datasets/cache.py: build, reuse, invalidation, the task of the data, stored arrays."""
import logging
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

import datasets.cache as cache_module
import datasets.detect as detect_module
from core.config import ConfigError, DataConfig, from_dict
from core.errors import UserError
from core.task import builtin_tasks
from datasets.cache import prepare_cache
from datasets.io import atomic_save, discover_cases, read_case
from datasets.preprocess import preprocess_case
from datasets.synthetic import generate_dataset

SHAPE = (32, 32, 24)
MODALITIES = ["t1", "t1ce", "t2", "flair"]
TASKS = builtin_tasks()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Three 2021 cases plus one without a seg file, generated once."""
    root = tmp_path_factory.mktemp("source")
    folders = generate_dataset(root, 4, seed=5, task="brats-gli-2021", shape=SHAPE)
    for folder in folders[:3]:  # every labelled case has ET (the naming tests rely on it)
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
    assert index.task.name == "brats-gli-2021" and index.modalities == ("t1", "t1ce", "t2", "flair")
    assert index.case_ids == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]  # 00003 has no seg
    case_source = discover_cases(root)[1]
    images, seg, geometry = read_case(case_source, index.task)
    expected, classes, geometry = preprocess_case(images, seg, geometry, index.task)

    case = index.load("BraTS2021_00001")
    assert isinstance(case.images, np.memmap) and isinstance(case.classes, np.memmap)
    assert case.images.dtype == np.float32 and case.classes.dtype == np.uint8
    np.testing.assert_array_equal(case.images, expected)
    np.testing.assert_array_equal(case.classes, classes)
    assert case.geometry.crop_box == geometry.crop_box and case.geometry.shape == SHAPE
    assert case.geometry.task == "brats-gli-2021"
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
    forced = prepare_cache(config(root, tmp_path, task="brats-gli-2021"), show_progress=False)
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


@pytest.mark.parametrize("name", ["brats-gli-2023", "brats-gli-2024", "brats-ped", "brats-men-rt", "msd-brain"])
def test_task_detected_and_classes_stored(tmp_path, name):
    task = TASKS[name]
    generate_dataset(tmp_path / "data", 3, seed=5, task=name, shape=SHAPE)
    index = prepare_cache(config(tmp_path / "data", tmp_path), show_progress=False)
    assert index.task == task and index.modalities == task.modalities
    counts = {c: 0 for c in range(task.num_classes)}
    for source in discover_cases(tmp_path / "data"):
        case = index.load(source.case_id)
        assert case.images.shape[0] == len(task.modalities)
        seg = np.asanyarray(nib.load(str(source.seg)).dataobj)
        for cls, value in enumerate(task.label_values[1:], start=1):
            assert case.class_counts[cls] == (seg == value).sum()  # each label value is its own class
            counts[cls] += case.class_counts[cls]
        assert set(case.class_locations) == set(task.foreground_classes)  # every label is oversampled
    assert all(counts[c] > 0 for c in task.foreground_classes), counts


def test_mixed_2021_and_2023_naming_is_one_task(root, tmp_path):
    generate_dataset(tmp_path / "more", 2, seed=7, task="brats-gli-2023", shape=SHAPE)
    for folder in (tmp_path / "more").iterdir():
        shutil.copytree(folder, root / folder.name)
    index = prepare_cache(config(root, tmp_path), show_progress=False)
    assert index.task.name == "brats-gli-2021"  # 3 of the 5 labelled cases
    for case_id in ("BraTS2021_00000", "BraTS-GLI-00000-000"):
        case = index.load(case_id)
        seg = np.asanyarray(nib.load(str(next(c.seg for c in discover_cases(root) if c.case_id == case_id))).dataobj)
        et_value = 4 if case_id.startswith("BraTS2021") else 3
        assert case.class_counts[3] == (seg == et_value).sum() > 0  # ET is class 3 in both namings


def test_labels_of_another_convention_under_one_name(root, tmp_path):
    """A 2021-named case relabelled to ET = 3: its name and labels disagree, so auto-detection asks
    for data.task; with it the case is read with the 2023 labels."""
    rewrite_seg(root / "BraTS2021_00002", lambda seg: np.where(seg == 4, 3, seg))
    with pytest.raises(UserError, match=r"case BraTS2021_00002 \(label values \[0, 1, 2, 3\]\) fits no task: its files "
                                        r"and labels fit brats-gli-2023, .* \(not its name\); set data.task"):
        prepare_cache(config(root, tmp_path), show_progress=False)
    for name in ("BraTS2021_00000", "BraTS2021_00001"):
        rewrite_seg(root / name, lambda seg: np.where(seg == 4, 3, seg))
    index = prepare_cache(config(root, tmp_path, task="brats-gli-2023"), show_progress=False)
    assert all(index.load(c).class_counts[3] > 0 for c in index.case_ids)


def test_a_folder_mixing_tasks_is_refused(root, tmp_path):
    generate_dataset(tmp_path / "ped", 1, seed=5, task="brats-ped", shape=SHAPE)
    for folder in (tmp_path / "ped").iterdir():
        shutil.copytree(folder, root / folder.name)
    with pytest.raises(UserError, match="the data mixes tasks: case BraTS-PED-00000-000 is brats-ped but case "
                                        "BraTS2021_00000 is brats-gli-2021"):
        prepare_cache(config(root, tmp_path), show_progress=False)


def test_unexpected_label_values_raise_naming_the_case(root, tmp_path):
    def add_five(seg):
        seg[0, 0, 0] = 5
        return seg
    path = rewrite_seg(root / "BraTS2021_00001", add_five)
    with pytest.raises(UserError, match=r"label values \[0, 1, 2, 4, 5\]\) fits no task") as err:
        prepare_cache(config(root, tmp_path), show_progress=False)
    assert str(path) in str(err.value)


def test_forced_task_that_does_not_fit_raises(root, tmp_path):
    with pytest.raises(UserError, match=r"case BraTS2021_00000 has label values \[0, 1, 2, 4\], task brats-men-rt has "
                                        r"1 GTV; built-in tasks that fit: brats-gli-2021") as err:
        prepare_cache(config(root, tmp_path, task="brats-men-rt"), show_progress=False)
    assert "BraTS2021_00000_seg.nii.gz" in str(err.value)


def test_forced_task_that_fits_the_values_but_not_the_names_warns(root, tmp_path, caplog):
    """PED labels 1..4 include the 2021 values {1, 2, 4}: allowed, but the names say otherwise."""
    with caplog.at_level(logging.WARNING, logger="datasets.detect"):
        index = prepare_cache(config(root, tmp_path, task="brats-ped"), show_progress=False)
    assert index.task.name == "brats-ped"
    assert "data.task is brats-ped but 3 case(s) are named like another task (BraTS2021_00000: brats-gli-2021)" \
        in caplog.text


def test_forced_task_with_other_naming_is_accepted(root, tmp_path):
    """data.task = brats-gli-2023 on 2021 data: the cases keep their 2021 labels (a naming variant)."""
    index = prepare_cache(config(root, tmp_path, task="brats-gli-2023"), show_progress=False)
    assert index.task.name == "brats-gli-2023"
    assert index.load("BraTS2021_00000").class_counts[3] > 0


def test_modalities_must_belong_to_the_task(root, tmp_path):
    with pytest.raises(UserError, match="data.modalities: 'adc' is not a modality of task brats-gli-2021"):
        prepare_cache(config(root, tmp_path, modalities=["t1", "adc"]), show_progress=False)


def test_label_values_are_remembered(root, tmp_path, monkeypatch):
    cfg = config(root, tmp_path)
    prepare_cache(cfg, show_progress=False)
    assert (tmp_path / "cache" / detect_module.LABEL_MEMO).is_file()

    def fail(path):
        raise AssertionError(f"{path} read again")
    monkeypatch.setattr(detect_module, "read_label_values", fail)
    assert prepare_cache(cfg, show_progress=False).task.name == "brats-gli-2021"


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


def test_classic_1mm_data_is_cached_byte_for_byte_as_before(tmp_path):
    """BraTS-like 1 mm L-P-S data: no reorientation, no resampling (data.spacing auto = 1 mm): the
    cached arrays are exactly those of the pipeline before native-space support (hashes taken
    from that version: commit 6006072 and the task-schema commit produce the same)."""
    import hashlib
    generate_dataset(tmp_path / "data", 3, seed=3, task="brats-gli-2021", shape=(48, 40, 32))
    index = prepare_cache(config(tmp_path / "data", tmp_path), show_progress=False)
    assert index.spacing == (1.0, 1.0, 1.0)
    expected = {"BraTS2021_00000": ("fe8df026101352af", "9c227710fa84a41e"),
                "BraTS2021_00001": ("6b29fc410def20cf", "bb84d66beb4b9ba6"),
                "BraTS2021_00002": ("01deafd58e60b62f", "ed3f3651093d1391")}
    for case_id, (arrays, locations) in expected.items():
        case = index.load(case_id, mmap=False)
        assert case.geometry.orientation is None and case.geometry.resampled_shape is None
        digest = hashlib.sha256(np.ascontiguousarray(case.images).tobytes()
                                + np.ascontiguousarray(case.classes).tobytes()).hexdigest()[:16]
        locs = hashlib.sha256(b"".join(case.class_locations[k].tobytes()
                                       for k in sorted(case.class_locations))).hexdigest()[:16]
        assert (digest, locs) == (arrays, locations), case_id


def test_native_space_cases_are_resampled_to_the_planned_spacing(tmp_path):
    generate_dataset(tmp_path / "data", 3, seed=1, task="brats-gli-2021", shape=(48, 40, 32), native="mixed")
    index = prepare_cache(config(tmp_path / "data", tmp_path), show_progress=False)
    # spacings (canonical axes) 1x1x1, 1x1x3, 0.8x0.8x2 -> medians 1 x 1 x 2 (ratio 2: no thick-slice rule)
    assert index.spacing == (1.0, 1.0, 2.0)
    for case_id in index.case_ids:
        geometry = index.load(case_id).geometry
        assert geometry.model_spacing == (1.0, 1.0, 2.0)
        assert index.load(case_id).images.shape[1:] == geometry.model_shape
    ras = index.load("BraTS2021_00001").geometry
    assert ras.orientation == ((0, True), (1, True), (2, False)) and ras.resampled_shape is not None
    none = prepare_cache(config(tmp_path / "data", tmp_path, spacing=None), show_progress=False)
    assert none.spacing is None and none.folder != index.folder
    assert none.load("BraTS2021_00001").geometry.resampled_shape is None
    with pytest.raises(ConfigError, match=r"data.spacing: \[1.0, 0.0, 1.0\] must be auto, null or 3 positive"):
        from_dict({"data": {"spacing": [1.0, 0.0, 1.0]}})  # refused when the config is loaded
