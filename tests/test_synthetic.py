"""datasets/synthetic.py: every built-in task's names, label values and regions; determinism,
background, contrasts, the MSD layout, the CLI."""
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from core.errors import run_cli
from core.task import TaskError, builtin_tasks, load_task
from datasets.synthetic import (
    brats_affine,
    case_arrays,
    case_files,
    case_id,
    generate_case,
    generate_dataset,
    main,
    msd_files,
    smooth_field,
    synthesize_case,
    tumour_kind,
)

SHAPE = (32, 32, 24)
CASES = 6  # per task: enough for every label of every task to appear (seed 0)
TASKS = list(builtin_tasks())
T2021 = ["t1", "t1ce", "t2", "flair"]
T2023 = ["t1n", "t1c", "t2w", "t2f"]
# task -> case id of index 7, its image files in channel order, its label file
NAMES = {
    "brats-gli-2021": ("BraTS2021_00007", [f"BraTS2021_00007_{m}.nii.gz" for m in T2021], "BraTS2021_00007_seg.nii.gz"),
    **{task: (cid, [f"{cid}-{m}.nii.gz" for m in T2023], f"{cid}-seg.nii.gz") for task, cid in [
        ("brats-gli-2023", "BraTS-GLI-00007-000"), ("brats-gli-2024", "BraTS-GLI-00007-100"),
        ("brats-ssa", "BraTS-SSA-00007-000"), ("brats-men", "BraTS-MEN-00007-000"),
        ("brats-met", "BraTS-MET-00007-000"), ("brats-ped", "BraTS-PED-00007-000")]},
    "brats-men-rt": ("BraTS-MEN-RT-0007-1", ["BraTS-MEN-RT-0007-1_t1c.nii.gz"], "BraTS-MEN-RT-0007-1_gtv.nii.gz"),
    "msd-brain": ("BRATS_008", ["imagesTr/BRATS_008.nii.gz"], "labelsTr/BRATS_008.nii.gz"),
}


def _load(path):
    img = nib.load(str(path))
    return img, np.asanyarray(img.dataobj)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``task name -> (root, [what generate_case returned])`` of CASES cases (seed 0), written once."""
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            cache[name] = root, generate_dataset(root, CASES, seed=0, task=name, shape=SHAPE)
        return cache[name]
    return get


def _read_cases(task, root, paths):
    """``[(images (C, X, Y, Z), labels (X, Y, Z), [nibabel images])]`` read back from disk."""
    out = []
    for path in paths:
        if task.layout == "msd":
            image, label = msd_files(root, path.name[:-len(".nii.gz")])
            img, data = _load(image)
            lab_img, labels = _load(label)
            out.append((np.moveaxis(data, -1, 0), labels, [img, lab_img]))
        else:
            images, label = case_files(path, task)
            loaded = [_load(p) for p in images + [label]]
            out.append((np.stack([d for _, d in loaded[:-1]]), loaded[-1][1], [i for i, _ in loaded]))
    return out


def test_every_builtin_task_has_expected_names():
    assert sorted(NAMES) == sorted(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_file_names(tmp_path, name):
    task = load_task(name)
    cid, images, label = NAMES[name]
    assert case_id(7, name) == case_id(7, task) == cid
    path = generate_case(tmp_path, 7, seed=0, task=task, shape=SHAPE)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    if task.layout == "msd":
        assert path == tmp_path / images[0]
        assert files == sorted(images + [label])
        assert msd_files(tmp_path, cid) == (tmp_path / images[0], tmp_path / label)
    else:
        assert path == tmp_path / cid
        assert files == sorted(f"{cid}/{f}" for f in images + [label])
        assert case_files(path, name) == ([path / f for f in images], path / label)


@pytest.mark.parametrize("name", TASKS)
def test_read_back_geometry_dtypes_and_labels(written, name):
    task = load_task(name)
    root, paths = written(name)
    found = set()
    for images, labels, imgs in _read_cases(task, root, paths):
        assert images.shape == (len(task.modalities),) + SHAPE and labels.shape == SHAPE
        for img in imgs:
            np.testing.assert_array_equal(img.affine, brats_affine(SHAPE))
            assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
            assert img.header.get_zooms()[:3] == (1.0, 1.0, 1.0)
        assert images.dtype == np.int16 and labels.dtype == np.uint8
        brain = images[0] != 0
        assert all(((c != 0) == brain).all() for c in images)  # same brain in every channel, background 0
        assert images[:, brain].min() >= 1 and 0.1 < brain.mean() < 0.6
        assert not labels[~brain].any()  # labels only inside the brain
        values = set(np.unique(labels).tolist())
        assert values <= set(task.label_values), (values, task.label_values)
        assert values - {0}, "every case has a lesion"
        found |= values
    assert found == set(task.label_values)  # every label appears in some case


@pytest.mark.parametrize("name", TASKS)
def test_deterministic_and_cases_differ(tmp_path, name):
    a = generate_case(tmp_path / "a", 2, seed=5, task=name, shape=SHAPE)
    b = generate_case(tmp_path / "b", 2, seed=5, task=name, shape=SHAPE)
    c = generate_case(tmp_path / "c", 3, seed=5, task=name, shape=SHAPE)
    d = generate_case(tmp_path / "d", 2, seed=6, task=name, shape=SHAPE)
    task = load_task(name)
    read = [_read_cases(task, p.parent.parent if task.layout == "msd" else p.parent, [p])[0] for p in (a, b, c, d)]
    np.testing.assert_array_equal(read[0][0], read[1][0])
    np.testing.assert_array_equal(read[0][1], read[1][1])
    for other in read[2:]:
        assert not np.array_equal(read[0][0], other[0]) and not np.array_equal(read[0][1], other[1])


def test_glioma_tasks_share_content_and_2021_is_unchanged():
    """2021, 2023, SSA, MEN pre-op and MSD: the same case, in each task's channel order and labels.
    The 2021 numbers are those of the generator before tasks existed (other tests rely on them)."""
    images, labels = case_arrays(0, 0, "brats-gli-2021", SHAPE)
    voxels = {int(v): int(n) for v, n in zip(*np.unique(labels, return_counts=True))}
    assert voxels == pytest.approx({0: 24195, 1: 72, 2: 243, 4: 66}, abs=3)
    sums = np.rint(images).astype(np.int16).astype(np.int64).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(sums, [2630480, 2344191, 3485620, 2169870], rtol=1e-4)
    for name in ("brats-gli-2023", "brats-ssa", "brats-men"):
        other_images, other_labels = case_arrays(0, 0, name, SHAPE)
        np.testing.assert_array_equal(other_images, images)
        np.testing.assert_array_equal(other_labels, np.where(labels == 4, 3, labels))
    msd_images, msd_labels = case_arrays(0, 0, "msd-brain", SHAPE)  # FLAIR, T1w, T1gd, T2w; 1 ED 2 NET 3 ET
    np.testing.assert_array_equal(msd_images, images[[3, 0, 1, 2]])
    np.testing.assert_array_equal(msd_labels, np.array([0, 2, 1, 0, 3], np.uint8)[labels])


def test_tumour_kinds():
    assert {n: tumour_kind(n) for n in TASKS} == {
        "brats-gli-2021": "glioma", "brats-gli-2023": "glioma", "brats-ssa": "glioma", "brats-men": "glioma",
        "msd-brain": "glioma", "brats-gli-2024": "post-treatment", "brats-met": "metastases",
        "brats-ped": "pediatric", "brats-men-rt": "meningioma"}


def _arrays(name, count, seed=1, shape=SHAPE):
    task = load_task(name)
    return task, [case_arrays(i, seed, task, shape) for i in range(count)]


def _rel(image, mask, normal):
    return np.median(image[mask]) / np.median(image[normal])


def test_gli_2024_resection_cavity():
    """RC outside WT, in most but not all cases, fluid-like, with residual tumour/edema next to it;
    some cases have no ET."""
    task, cases = _arrays("brats-gli-2024", 20)
    with_rc = with_et = 0
    for images, labels in cases:
        classes = task.labels_to_classes(labels)
        masks = task.region_masks(classes)
        assert not (masks["RC"] & masks["WT"]).any()
        with_et += int(masks["ET"].any())
        if masks["RC"].any():
            with_rc += 1
            assert (ndimage.binary_dilation(masks["RC"]) & masks["WT"]).any()  # residual next to the cavity
            if masks["RC"].sum() >= 30:
                normal = (images[0] > 0) & (labels == 0)
                t1, t1ce, t2, flair = (_rel(images[c], masks["RC"], normal) for c in range(4))
                assert t1 < 0.7 and t1ce < 0.7 and t2 > 1.3 and flair < 0.7
    assert 12 <= with_rc < 20 and 8 <= with_et < 20


def test_ped_cyst_inside_tumour_core():
    task, cases = _arrays("brats-ped", 12, shape=(48, 48, 36))
    with_cc = 0
    for images, labels in cases:
        classes = task.labels_to_classes(labels)
        cc, tc = task.region_mask(classes, "CC"), task.region_mask(classes, "TC")
        if cc.any():
            with_cc += 1
            assert (ndimage.binary_dilation(cc) <= tc).all()  # every neighbour of the cyst is tumour core
            if cc.sum() >= 30:
                normal = (images[0] > 0) & (labels == 0)
                assert _rel(images[2], cc, normal) > 1.3 and _rel(images[0], cc, normal) < 0.7  # T2 bright, T1 dark
    assert with_cc >= 6


def test_met_several_small_lesions_and_some_cavities():
    task, cases = _arrays("brats-met", 12)
    lesions, with_rc = [], 0
    for images, labels in cases:
        classes = task.labels_to_classes(labels)
        masks = task.region_masks(classes)
        assert not (masks["RC"] & masks["WT"]).any() and masks["ET"].any()
        lesions.append(ndimage.label(masks["TC"], np.ones((3, 3, 3)))[1])
        with_rc += int(masks["RC"].any())
    assert min(lesions) >= 1 and max(lesions) >= 2 and max(lesions) <= 4
    assert 1 <= with_rc < 12


def test_men_rt_enhancing_mass_on_t1c(written):
    root, paths = written("brats-men-rt")
    for folder in paths:
        images, labels, _ = _read_cases(load_task("brats-men-rt"), root, [folder])[0]
        assert images.shape[0] == 1 and set(np.unique(labels).tolist()) == {0, 1}
        normal = (images[0] > 0) & (labels == 0)
        assert _rel(images[0], labels == 1, normal) > 1.3
        assert ndimage.label(labels)[1] == 1  # one compact mass


def test_msd_layout_and_dataset_json(written):
    root, paths = written("msd-brain")
    assert paths == [root / "imagesTr" / f"BRATS_{i:03d}.nii.gz" for i in range(1, CASES + 1)]
    assert nib.load(str(paths[0])).shape == SHAPE + (4,)
    content = json.loads((root / "dataset.json").read_text())
    assert content["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert content["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert content["numTraining"] == CASES and content["tensorImageSize"] == "4D" and content["name"] == "BRATS"
    assert content["training"] == [{"image": f"./imagesTr/BRATS_{i:03d}.nii.gz",
                                    "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"} for i in range(1, CASES + 1)]
    assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]  # no temporary left
    with pytest.raises(ValueError, match="msd_files"):
        case_files(root / "BRATS_001", "msd-brain")


def test_brats_affine_is_lps_with_sri24_offset():
    np.testing.assert_array_equal(brats_affine((240, 240, 155)),
                                  [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_parallel_generation_equals_serial(tmp_path):
    serial = generate_dataset(tmp_path / "s", 2, seed=1, task="brats-ped", shape=SHAPE)
    parallel = generate_dataset(tmp_path / "p", 2, seed=1, task=load_task("brats-ped"), shape=SHAPE, workers=2)
    for s, p in zip(serial, parallel):
        assert s.name == p.name
        for a, b in zip(sorted(s.iterdir()), sorted(p.iterdir())):
            np.testing.assert_array_equal(_load(a)[1], _load(b)[1])


@pytest.fixture(scope="module")
def gliomas():
    """Ten in-memory glioma cases: (images (4, X, Y, Z), lesions = classes (X, Y, Z))."""
    return [synthesize_case((40, 44, 32), np.random.default_rng([3, i])) for i in range(10)]


def test_glioma_background_and_classes(gliomas):
    counts = np.array([np.bincount(classes.ravel(), minlength=4) for _, classes in gliomas])
    assert counts.shape[1] == 4  # the glioma kind uses lesion codes 0..3 only (= its classes)
    assert (counts[:, 1] > 0).all() and (counts[:, 2] > 0).all() and (counts[:, 3] > 0).sum() >= 7
    assert (counts[:, 1:].sum(1) < 0.1 * 40 * 44 * 32).all()
    for images, _ in gliomas:
        brain = images[0] != 0
        assert not brain[[0, -1]].any() and not brain[:, [0, -1]].any()  # the brain does not touch x/y borders


@pytest.mark.parametrize("index", range(4))
def test_contrasts_make_labels_learnable(index):
    """Per class median intensity relative to normal brain (classes of >= 50 voxels): edema bright
    on FLAIR and T2, necrosis dark on T1ce, ET bright on T1ce but not on T1."""
    images, classes = synthesize_case((64, 72, 48), np.random.default_rng([4, index]))
    normal = (images[0] > 0) & (classes == 0)
    counts = np.bincount(classes.ravel(), minlength=4)
    assert counts[2] >= 50
    assert _rel(images[3], classes == 2, normal) > 1.4 and _rel(images[2], classes == 2, normal) > 1.2
    if counts[1] >= 50:
        assert _rel(images[1], classes == 1, normal) < 0.8
    if counts[3] >= 50:
        assert _rel(images[1], classes == 3, normal) > 1.4 and _rel(images[0], classes == 3, normal) < 1.0


def test_float32_output(tmp_path):
    folder = generate_case(tmp_path, 0, shape=SHAPE, dtype="float32", task="brats-gli-2023")
    img, data = _load(folder / f"{folder.name}-t1n.nii.gz")
    assert img.get_data_dtype() == np.float32 and data[data > 0].min() >= 1


def test_smooth_field_has_unit_variance():
    rng = np.random.default_rng(0)
    fields = np.stack([smooth_field((20, 18, 16), 4, rng) for _ in range(200)])
    assert fields.dtype == np.float32 and fields.shape == (200, 20, 18, 16)
    np.testing.assert_allclose(fields.std(axis=0).mean(), 1.0, atol=0.08)
    assert abs(np.diff(fields, axis=1)).mean() < 0.25  # neighbours are strongly correlated


def test_custom_task_yaml(tmp_path):
    """A user task: synthesized by its label names, named by its case_pattern's prefix."""
    path = tmp_path / "my.yaml"
    path.write_text("name: my-cohort\ncase_pattern: '^BraTS-XYZ-'\nmodalities: [t2f, t1c]\n"
                    "labels: {ET: 3, SNFH: 2, NETC: 1}\nregions: {WT: [NETC, SNFH, ET]}\n")
    folder = generate_case(tmp_path / "data", 4, task=str(path), shape=SHAPE)
    assert sorted(p.name for p in folder.iterdir()) == [
        "BraTS-XYZ-00004-000-seg.nii.gz", "BraTS-XYZ-00004-000-t1c.nii.gz", "BraTS-XYZ-00004-000-t2f.nii.gz"]
    images, labels = case_arrays(4, 0, str(path), SHAPE)
    reference, ref_labels = case_arrays(4, 0, "brats-gli-2023", SHAPE)
    np.testing.assert_array_equal(images, reference[[3, 1]])
    np.testing.assert_array_equal(labels, ref_labels)


@pytest.mark.parametrize("yaml_text,match", [
    ("labels: {TUMOUR: 1}\nregions: {T: [TUMOUR]}", "cannot synthesize label 'TUMOUR'"),
    ("labels: {ET: 1}\nregions: {ET: [ET]}", "needs a label for necrosis, edema"),
    ("labels: {NCR: 1, NETC: 2, ED: 3, ET: 4}\nregions: {ET: [ET]}", "both necrosis"),
])
def test_task_that_cannot_be_synthesized(tmp_path, yaml_text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: bad\nmodalities: [t1c]\n{yaml_text}\n")
    with pytest.raises(ValueError, match=match):
        generate_dataset(tmp_path / "data", 1, task=str(path), shape=SHAPE)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"shape": (8, 40, 40)}, ValueError, "shape"), ({"dtype": "uint8"}, ValueError, "dtype"),
    ({"cases": 0}, ValueError, "cases"), ({"workers": 0}, ValueError, "workers"),
    ({"task": "brats-gli-2025"}, TaskError, "unknown task 'brats-gli-2025'"),
])
def test_invalid_arguments(tmp_path, kwargs, error, match):
    args = {"cases": 1, "shape": SHAPE, **kwargs}
    with pytest.raises(error, match=match):
        generate_dataset(tmp_path, **args)


def test_index_range():
    assert case_id(9999, "brats-men-rt") == "BraTS-MEN-RT-9999-1"
    with pytest.raises(ValueError, match="index"):
        case_id(10000, "brats-men-rt")
    with pytest.raises(ValueError, match="index"):
        case_id(-1, "brats-ped")


def test_cli(tmp_path, capsys):
    argv = [str(tmp_path), "--task", "brats-ped", "--cases", "2", "--seed", "1", "--shape", "24", "24", "20"]
    assert main(argv) == 0
    assert "wrote 2 cases of brats-ped" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BraTS-PED-00000-000", "BraTS-PED-00001-000"]


@pytest.mark.parametrize("argv,match", [
    (["--task", "brats-pedd"], "unknown --task 'brats-pedd'; did you mean 'brats-ped'?"),
    (["--cases", "0"], "cases must be >= 1"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(tmp_path / "out")] + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err
    assert not (tmp_path / "out").exists()
