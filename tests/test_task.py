"""core/task.py: the task schema of every built-in task, its YAML checks, and task detection."""
import re

import numpy as np
import pytest
import torch
import yaml

from core.task import (
    CaseFacts,
    Task,
    TaskError,
    builtin_tasks,
    canonical_modality,
    choose_tasks,
    legacy_task,
    load_task,
)

TASKS = builtin_tasks()
NAMES = sorted(TASKS)
GLIOMA_NAMES = ("t1n", "t1c", "t2w", "t2f")
FOUR = frozenset({"t1", "t1ce", "t2", "flair"})


def test_every_builtin_task_is_listed():
    assert set(TASKS) == {"brats-gli-2021", "brats-gli-2023", "brats-gli-2024", "brats-ssa", "brats-men",
                          "brats-met", "brats-ped", "brats-men-rt", "msd-brain"}


@pytest.mark.parametrize("name", NAMES)
def test_labels_classes_labels_round_trip(name):
    task = TASKS[name]
    labels = np.array(task.label_values, dtype=np.uint8).reshape(-1, 1, 1)  # one voxel per label (+ background)
    classes = task.labels_to_classes(labels)
    assert classes.dtype == np.uint8
    np.testing.assert_array_equal(classes.ravel(), np.arange(task.num_classes))
    np.testing.assert_array_equal(task.classes_to_labels(classes), labels)


@pytest.mark.parametrize("name", NAMES)
def test_values_outside_the_task_raise(name):
    task = TASKS[name]
    bad = max(task.label_values) + 1
    with pytest.raises(ValueError, match=rf"\[{bad}\] are not labels of task {name}"):
        task.labels_to_classes(np.array([0, bad], dtype=np.uint8))
    assert task.unexpected_values([0, bad]) == [bad]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["labels", "regions"])
def test_decoding_gives_back_every_class(name, mode):
    task = TASKS[name]
    classes = np.arange(task.num_classes, dtype=np.uint8).reshape(-1, 1, 1)
    if mode == "regions":
        probs = task.training_region_masks(classes).astype(np.float32) * 0.8 + 0.1  # 0.9 inside, 0.1 outside
    else:
        probs = np.eye(task.num_classes, dtype=np.float32)[classes[..., 0, 0]].T[:, :, None, None]
    assert probs.shape[0] == task.output_channels(mode)
    np.testing.assert_array_equal(task.decode(probs, mode), classes)
    np.testing.assert_array_equal(task.decode(torch.from_numpy(probs), mode).numpy(), classes)


@pytest.mark.parametrize("name", NAMES)
def test_yaml_round_trip(name):
    task = TASKS[name]
    again = Task.from_dict(yaml.safe_load(yaml.safe_dump(task.to_dict())))
    assert again == task


# region membership of the label values [0, v1, v2, ...] of each task, written out by hand
REGION_TABLES = {
    # values 0 1(NETC) 2(SNFH) 3(ET) 4(RC): RC is outside WT and TC
    "brats-gli-2024": ([0, 1, 2, 3, 4], {"WT": [0, 1, 1, 1, 0], "TC": [0, 1, 0, 1, 0], "NETC": [0, 1, 0, 0, 0],
                                         "SNFH": [0, 0, 1, 0, 0], "ET": [0, 0, 0, 1, 0], "RC": [0, 0, 0, 0, 1]}),
    "brats-met": ([0, 1, 2, 3, 4], {"WT": [0, 1, 1, 1, 0], "TC": [0, 1, 0, 1, 0], "ET": [0, 0, 0, 1, 0],
                                    "RC": [0, 0, 0, 0, 1]}),
    # PED: 1 ET, 2 NETC, 3 CC, 4 ED; CC is inside TC
    "brats-ped": ([0, 1, 2, 3, 4], {"WT": [0, 1, 1, 1, 1], "TC": [0, 1, 1, 1, 0], "ET": [0, 1, 0, 0, 0],
                                    "NETC": [0, 0, 1, 0, 0], "CC": [0, 0, 0, 1, 0], "ED": [0, 0, 0, 0, 1]}),
    "brats-gli-2021": ([0, 1, 2, 4], {"WT": [0, 1, 1, 1], "TC": [0, 1, 0, 1], "ET": [0, 0, 0, 1]}),
    "brats-gli-2023": ([0, 1, 2, 3], {"WT": [0, 1, 1, 1], "TC": [0, 1, 0, 1], "ET": [0, 0, 0, 1]}),
    # MSD: 1 edema, 2 non-enhancing, 3 enhancing: TC = 2 | 3
    "msd-brain": ([0, 1, 2, 3], {"WT": [0, 1, 1, 1], "TC": [0, 0, 1, 1], "ET": [0, 0, 0, 1]}),
    "brats-men-rt": ([0, 1], {"GTV": [0, 1]}),
}


@pytest.mark.parametrize("name", sorted(REGION_TABLES))
def test_regions_from_labels(name):
    task = TASKS[name]
    values, expected = REGION_TABLES[name]
    masks = task.region_masks(task.labels_to_classes(np.array(values, dtype=np.uint8)))
    assert list(masks) == list(expected)  # report order of the official scripts
    for region, members in expected.items():
        np.testing.assert_array_equal(masks[region], np.array(members, dtype=bool), err_msg=region)


def test_msd_classes_follow_the_glioma_class_order():
    msd = TASKS["msd-brain"]
    # file value 2 (non-enhancing) is class 1 like NETC/NCR, value 1 (edema) class 2 like SNFH/ED
    np.testing.assert_array_equal(msd.labels_to_classes(np.array([0, 1, 2, 3])), [0, 2, 1, 3])
    assert msd.compatible_with(TASKS["brats-gli-2023"]) and msd.compatible_with(TASKS["brats-gli-2021"])


@pytest.mark.parametrize("a,b,compatible", [
    ("brats-gli-2021", "brats-gli-2023", True), ("brats-gli-2023", "brats-ssa", True),
    ("brats-gli-2023", "brats-men", True), ("brats-gli-2023", "brats-gli-2024", False),
    ("brats-gli-2024", "brats-met", False), ("brats-ped", "brats-gli-2024", False),
    ("brats-men-rt", "brats-gli-2023", False),
])
def test_compatibility(a, b, compatible):
    assert TASKS[a].compatible_with(TASKS[b]) is compatible
    assert TASKS[b].compatible_with(TASKS[a]) is compatible


def test_training_targets_of_gli_2024_keep_rc_outside_wt():
    task = TASKS["brats-gli-2024"]
    classes = torch.tensor([[0, 1, 2, 3, 4]]).view(1, 5, 1, 1)
    targets = task.training_targets(classes)
    assert targets.shape == (1, 4, 5, 1, 1) and targets.dtype == torch.float32
    expected = [[0, 1, 1, 1, 0],   # WT
                [0, 1, 0, 1, 0],   # TC
                [0, 0, 0, 1, 0],   # ET
                [0, 0, 0, 0, 1]]   # RC
    np.testing.assert_array_equal(targets[0, :, :, 0, 0].numpy(), expected)


def test_lesion_rules_follow_the_official_scripts():
    gli = TASKS["brats-gli-2024"]
    assert {r: (gli.lesion_rule(r).dilation, gli.lesion_rule(r).min_volume) for r in gli.region_names} == {
        "WT": (3, 20), "TC": (3, 20), "NETC": (5, 20), "SNFH": (3, 20), "ET": (3, 10), "RC": (5, 20)}
    assert all(gli.lesion_rule(r).merge_predictions for r in gli.region_names)
    expected = {"brats-met": (1, 2.0, True), "brats-ped": (5, 10.0, True), "brats-men": (1, 50.0, False),
                "brats-ssa": (3, 50.0, True), "brats-men-rt": (1, 50.0, True), "brats-gli-2023": (3, 50.0, False),
                "brats-gli-2021": (3, 50.0, False)}
    for name, (dilation, volume, merge) in expected.items():
        for region in TASKS[name].region_names:
            rule = TASKS[name].lesion_rule(region)
            assert (rule.dilation, rule.min_volume, rule.merge_predictions) == (dilation, volume, merge), name


def test_modalities_and_aliases():
    assert canonical_modality("T2F") == "flair" and canonical_modality("t1c") == "t1ce" and canonical_modality("adc") == "adc"
    gli = TASKS["brats-gli-2023"]
    assert gli.select_modalities([]) == ("t1", "t1ce", "t2", "flair")
    assert gli.select_modalities(["t2f", "t1"]) == ("flair", "t1")
    with pytest.raises(TaskError, match="data.modalities: 'flair' is not a modality of task brats-men-rt"):
        TASKS["brats-men-rt"].select_modalities(["flair"])
    with pytest.raises(TaskError, match="twice"):
        gli.select_modalities(["t1", "t1n"])


def test_legacy_checkpoint_conventions():
    assert legacy_task("2021").name == "brats-gli-2021" and legacy_task("2023").name == "brats-gli-2023"
    with pytest.raises(TaskError, match="unknown label convention"):
        legacy_task("2019")


# ----------------------------------------------------------------------------------------------
# Task YAML errors: one line naming the key
# ----------------------------------------------------------------------------------------------
def base_yaml() -> dict:
    return {"name": "mine", "modalities": ["t1c", "t2f"], "labels": {"A": 1, "B": 2},
            "regions": {"ALL": ["A", "B"], "B": ["B"]},
            "training_regions": [["ALL", "A"], ["B", "B"]]}


@pytest.mark.parametrize("change,message", [
    ({"lables": {}}, "unknown task key 'lables'; did you mean 'labels'?"),
    ({"regions": {"ALL": ["A", "C"]}}, "regions.ALL names label 'C', which is not a label"),
    ({"training_regions": [["B", "B"], ["ALL", "A"]]}, "cannot be decoded: a voxel of label B is painted back as A"),
    ({"training_regions": [["ALL", "A"]]}, "cannot be decoded: a voxel of label B is painted back as A"),
    ({"training_regions": [["ALL", "C"]]}, "label painted names label 'C'"),
    ({"training_regions": [["XX", "A"]]}, "names region 'XX', which is not an evaluated region"),
    ({"training_regions": [["B", "A"], ["ALL", "A"]]}, "paints label 'A', which is not one of its labels"),
    ({"labels": {"A": 1, "B": 1}}, "labels.B: value 1 is used twice"),
    ({"labels": {"A": 0}}, "labels.A: value 0 must be an integer in 1..255"),
    ({"layout": "nnunet"}, "layout 'nnunet' must be one of brats, msd"),
    ({"lesionwise": {"dilaton": 2}}, "unknown key 'lesionwise.dilaton'"),
    ({"lesionwise": {"regions": {"ZZ": {"dilation": 1}}}}, "lesionwise.regions names region 'ZZ'"),
    ({"lesionwise": {"min_volume": -1}}, "lesionwise.min_volume: -1 must be a number >= 0"),
    ({"colours": {"A": [300, 0, 0]}}, "colours.A must be [R, G, B]"),
    ({"modalities": ["t1", "t1n"]}, "name one modality twice"),
    ({"case_pattern": "("}, "is not a regular expression"),
])
def test_bad_task_yaml(tmp_path, change, message):
    raw = {**base_yaml(), **change}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TaskError) as err:
        load_task(str(path))
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_missing_key_and_unknown_name(tmp_path):
    raw = base_yaml()
    del raw["regions"]
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TaskError, match="task key 'regions' is missing"):
        load_task(path)
    with pytest.raises(TaskError, match="unknown task 'brats-gli-2042'; did you mean 'brats-gli-2024'"):
        load_task("brats-gli-2042")
    with pytest.raises(TaskError, match="task file not found"):
        load_task(tmp_path / "nope.yaml")


def test_user_task_defaults_one_region_per_label(tmp_path):
    raw = base_yaml()
    del raw["training_regions"]
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    task = load_task(path)
    assert task.training_region_names == ("A", "B") and task.output_channels("regions") == 2
    assert task.lesion_rule("ALL").dilation == 3 and task.lesion_rule("ALL").min_volume == 50.0


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------
def facts(case_id, values, modalities=FOUR, layout="brats"):
    return CaseFacts(case_id, layout, frozenset(modalities) if modalities is not None else None,
                     None if values is None else tuple(values))


ALL = list(TASKS.values())


@pytest.mark.parametrize("case_id,values,modalities,layout,expected", [
    ("BraTS2021_00001", [0, 1, 2, 4], FOUR, "brats", "brats-gli-2021"),
    ("BraTS20_Training_001", [0, 1, 2, 4], FOUR, "brats", "brats-gli-2021"),
    ("Brats18_2013_0_1", [0, 1, 2], FOUR, "brats", "brats-gli-2021"),
    ("BraTS-GLI-00001-000", [0, 1, 2, 3], FOUR, "brats", "brats-gli-2023"),
    ("BraTS-GLI-00001-100", [0, 1, 2, 3, 4], FOUR, "brats", "brats-gli-2024"),
    ("BraTS-GLI-00001-100", [0, 2, 4], FOUR, "brats", "brats-gli-2024"),
    ("BraTS-SSA-00001-000", [0, 1, 2, 3], FOUR, "brats", "brats-ssa"),
    ("BraTS-MEN-00001-000", [0, 1, 2, 3], FOUR, "brats", "brats-men"),
    ("BraTS-MEN-RT-0001-1", [0, 1], {"t1ce"}, "brats", "brats-men-rt"),
    ("BraTS-MET-00001-000", [0, 1, 2, 3, 4], FOUR, "brats", "brats-met"),
    ("BraTS-MET-00001-000", [0, 3], FOUR, "brats", "brats-met"),
    ("BraTS-PED-00001-000", [0, 1, 2, 3, 4], FOUR, "brats", "brats-ped"),
    ("BRATS_001", [0, 1, 2, 3], None, "msd", "msd-brain"),
    ("patient1", [0, 1, 2, 4], FOUR, "brats", "brats-gli-2021"),  # no name matches: files + values decide
])
def test_detection_of_one_case(case_id, values, modalities, layout, expected):
    choice = choose_tasks([facts(case_id, values, modalities, layout)], ALL)
    assert choice.task.name == expected and choice.per_case[case_id].name == expected


def test_a_gli_2024_dataset_is_detected_from_any_case_with_rc():
    cases = [facts("BraTS-GLI-00001-100", [0, 1, 2, 3]), facts("BraTS-GLI-00002-100", [0, 1, 2, 3, 4]),
             facts("BraTS-GLI-00003-100", None)]
    choice = choose_tasks(cases, ALL)
    assert choice.task.name == "brats-gli-2024"
    assert {t.name for t in choice.per_case.values()} == {"brats-gli-2024"}
    # without the RC case it is the 2023 task (the fewest classes that fit)
    assert choose_tasks(cases[:1] + cases[2:], ALL).task.name == "brats-gli-2023"


def test_mixed_2021_and_2023_naming_is_one_task():
    cases = [facts("BraTS2021_00001", [0, 1, 2, 4]), facts("BraTS-GLI-00002-000", [0, 1, 2, 3]),
             facts("BraTS-GLI-00003-000", [0, 1, 2])]
    choice = choose_tasks(cases, ALL)
    assert choice.task.name == "brats-gli-2023"  # the most common
    assert choice.per_case["BraTS2021_00001"].name == "brats-gli-2021"


def test_a_folder_mixing_tasks_is_refused_naming_two_cases():
    cases = [facts("BraTS-GLI-00001-000", [0, 1, 2, 3]), facts("BraTS-PED-00002-000", [0, 1, 2, 3, 4])]
    with pytest.raises(TaskError, match="the data mixes tasks: case BraTS-GLI-00001-000 is .* but case "
                                        "BraTS-PED-00002-000 is brats-ped"):
        choose_tasks(cases, ALL)


def test_ambiguous_data_names_the_candidates_and_the_key():
    with pytest.raises(TaskError) as err:
        choose_tasks([facts("patient1", [0, 1, 2, 3])], ALL)
    text = str(err.value)
    assert "brats-gli-2023" in text and "brats-ssa" in text and "set data.task" in text


def test_values_that_fit_no_task():
    with pytest.raises(TaskError, match=r"case BraTS-GLI-00001-000 \(label values \[0, 1, 2, 5\]\) fits no task"):
        choose_tasks([facts("BraTS-GLI-00001-000", [0, 1, 2, 5])], ALL)


def test_explicit_task_accepts_its_naming_variants_and_names_bad_cases():
    gli = TASKS["brats-gli-2023"]
    cases = [facts("BraTS2021_00001", [0, 1, 2, 4]), facts("patient7", [0, 1, 3])]
    choice = choose_tasks(cases, ALL, explicit=gli)
    assert choice.task is gli
    assert choice.per_case["BraTS2021_00001"].name == "brats-gli-2021" and choice.per_case["patient7"] is gli
    with pytest.raises(TaskError, match=r"case BraTS-PED-00002-000 has label values \[0, 1, 4\], task brats-gli-2023 "
                                        r"has 1 NETC, 2 SNFH, 3 ET; built-in tasks that fit: .*brats-ped"):
        choose_tasks([facts("BraTS-PED-00002-000", [0, 1, 4])], ALL, explicit=gli)
    with pytest.raises(TaskError, match="has no flair, t1, t2 image.*built-in tasks that fit: brats-men-rt"):
        choose_tasks([facts("BraTS-MEN-RT-0001-1", [0, 1], {"t1ce"})], ALL, explicit=gli)


def test_prefer_picks_the_checkpoint_task_for_unlabelled_cases():
    case = facts("BraTS-GLI-00001-100", None)
    assert choose_tasks([case], ALL).task.name == "brats-gli-2023"
    assert choose_tasks([case], ALL, prefer=TASKS["brats-gli-2024"]).task.name == "brats-gli-2024"
    # a checkpoint's task that does not fit leaves the data's own task (the caller refuses it)
    ped = facts("BraTS-PED-00001-000", None)
    assert choose_tasks([ped], ALL, prefer=TASKS["brats-gli-2023"]).task.name == "brats-ped"


def test_builtin_yaml_files_cite_their_source():
    from core.task import BUILTIN_DIR
    for path in BUILTIN_DIR.glob("*.yaml"):
        text = path.read_text()
        assert re.search(r"^# .*Source", text, re.MULTILINE | re.IGNORECASE) or "Sources:" in text, path.name
