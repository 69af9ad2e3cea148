"""datasets/split.py: seeded k-fold by patient, and split files."""
import json

import numpy as np
import pytest

from core.config import ConfigError, DataConfig, from_dict
from core.errors import UserError
from datasets.split import kfold_split, make_split, patient_id, save_split

IDS = [f"BraTS2021_{i:05d}" for i in range(11)]


def _array_split_folds(case_ids, folds, fold, seed):
    """The k-fold split before patients were grouped: numpy.array_split of the shuffled sorted ids."""
    ids = sorted(set(case_ids))
    val = set(np.array_split(np.random.default_rng(seed).permutation(len(ids)), folds)[fold].tolist())
    return {"train": [c for i, c in enumerate(ids) if i not in val], "val": [c for i, c in enumerate(ids) if i in val]}


# hand-made longitudinal data: patient -> number of time points
LONGITUDINAL = {"BraTS-GLI-00001": 3, "BraTS-GLI-00002": 1, "BraTS-GLI-00003": 2, "BraTS-GLI-00004": 1,
                "BraTS-GLI-00005": 4, "BraTS-GLI-00006": 1, "BraTS-GLI-00007": 2, "BraTS-GLI-00008": 1,
                "BraTS-MEN-RT-0001": 2, "BraTS-MET-00001": 1, "BraTS-PED-00001": 1}
MULTI = [f"{p}-{t:03d}" if "RT" not in p else f"{p}-{t}" for p, n in LONGITUDINAL.items() for t in range(100, 100 + n)]


def test_kfold_is_deterministic_and_partitions_the_cases():
    folds = [make_split(IDS, DataConfig(folds=5, fold=k, seed=7)) for k in range(5)]
    assert folds == [make_split(list(reversed(IDS)), DataConfig(folds=5, fold=k, seed=7)) for k in range(5)]
    vals = [set(f["val"]) for f in folds]
    assert set().union(*vals) == set(IDS) and sum(len(v) for v in vals) == len(IDS)
    assert sorted(len(v) for v in vals) == [2, 2, 2, 2, 3]
    for f in folds:
        assert set(f["train"]) | set(f["val"]) == set(IDS) and not set(f["train"]) & set(f["val"])
        assert f["train"] == sorted(f["train"]) and f["val"] == sorted(f["val"])


def test_kfold_depends_on_seed():
    a = make_split(IDS, DataConfig(folds=3, fold=0, seed=1))
    b = make_split(IDS, DataConfig(folds=3, fold=0, seed=2))
    assert a != b


@pytest.mark.parametrize("folds,fold,match", [(1, 0, "data.folds"), (3, 3, "data.fold: 3 must"),
                                              (3, -1, "data.fold: -1 must")])
def test_kfold_bad_settings_are_config_errors(folds, fold, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"data": {"folds": folds, "fold": fold}})
    from_dict({"data": {"folds": 0, "fold": 5, "split_file": "split.json"}})  # no k-fold split: not checked


def test_kfold_needs_a_patient_per_fold():
    with pytest.raises(UserError, match="only 11 labelled"):
        make_split(IDS, DataConfig(folds=12, fold=0))


def _write(tmp_path, content) -> str:
    path = tmp_path / "split.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_split_file(tmp_path):
    path = _write(tmp_path, {"train": IDS[2:], "val": IDS[:2]})
    assert make_split(IDS, DataConfig(split_file=path, folds=0)) == {"train": IDS[2:], "val": IDS[:2]}


@pytest.mark.parametrize("content,match", [
    ({"train": IDS[1:], "val": ["BraTS2021_99999"]}, 'case "BraTS2021_99999" in "val"'),
    ({"train": IDS, "val": IDS[:1]}, 'case "BraTS2021_00000" is in both'),
    ({"train": IDS[1:] + IDS[1:2], "val": IDS[:1]}, 'listed twice'),
    ({"train": IDS}, '"train" and "val"'),
    ({"train": "BraTS2021_00000", "val": []}, "must be a list"),
    ({"train": [], "val": IDS}, '"train" is empty'),
    ("{not json", "invalid JSON"),
])
def test_bad_split_file_names_file_and_id(tmp_path, content, match):
    path = _write(tmp_path, content)
    with pytest.raises(UserError, match=match) as err:
        make_split(IDS, DataConfig(split_file=path))
    assert path in str(err.value)


def test_missing_split_file(tmp_path):
    with pytest.raises(UserError, match="split file not found"):
        make_split(IDS, DataConfig(split_file=str(tmp_path / "nope.json")))


def test_save_split_round_trip(tmp_path):
    split = make_split(IDS, DataConfig(folds=4, fold=1))
    path = save_split(split, tmp_path / "run" / "split.json")
    assert json.loads(path.read_text()) == split
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temporary left
    assert make_split(IDS, DataConfig(split_file=str(path))) == split


@pytest.mark.parametrize("case_id,patient", [
    ("BraTS-GLI-00007-101", "BraTS-GLI-00007"), ("BraTS-GLI-00007-000", "BraTS-GLI-00007"),
    ("BraTS-MEN-RT-0007-1", "BraTS-MEN-RT-0007"), ("BraTS-PED-00012-000", "BraTS-PED-00012"),
    ("BraTS-SSA-00002-000", "BraTS-SSA-00002"), ("BraTS2021_00007", "BraTS2021_00007"),
    ("BRATS_008", "BRATS_008"), ("my_case", "my_case"), ("BraTS-GLI-00007", "BraTS-GLI-00007"),
])
def test_patient_id(case_id, patient):
    assert patient_id(case_id) == patient


@pytest.mark.parametrize("ids", [
    IDS,
    [f"BraTS-GLI-{i:05d}-000" for i in range(0, 230, 7)],
    [f"BraTS-MEN-RT-{i:04d}-1" for i in range(17)] + [f"BraTS-MET-{i:05d}-000" for i in range(5)],
    [f"BRATS_{i:03d}" for i in range(1, 24)],
])
@pytest.mark.parametrize("folds", [2, 3, 5])
def test_one_case_per_patient_gives_the_earlier_folds(ids, folds):
    for seed in (0, 7, 123):
        for fold in range(folds):
            assert kfold_split(ids, folds, fold, seed) == _array_split_folds(ids, folds, fold, seed)


@pytest.mark.parametrize("folds", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_time_points_of_a_patient_stay_in_one_fold(folds, seed):
    splits = [kfold_split(MULTI, folds, k, seed) for k in range(folds)]
    vals = [s["val"] for s in splits]
    assert sorted(c for v in vals for c in v) == sorted(MULTI)  # the validation folds partition the cases
    for k, split in enumerate(splits):
        assert split["train"] == sorted(set(MULTI) - set(split["val"])) and split["val"] == sorted(split["val"])
        train_patients = {patient_id(c) for c in split["train"]}
        assert not train_patients & {patient_id(c) for c in split["val"]}
    # balanced: the largest patient (4 time points) bounds the imbalance; here folds are within 1 of even
    sizes = sorted(len(v) for v in vals)
    assert sizes[-1] - sizes[0] <= 1, sizes
    # deterministic in the set of ids and the seed
    assert splits == [kfold_split(list(reversed(MULTI)) + MULTI[:3], folds, k, seed) for k in range(folds)]


def test_patient_grouping_depends_on_seed():
    assert kfold_split(MULTI, 3, 0, 0) != kfold_split(MULTI, 3, 0, 1)


def test_balance_when_a_patient_is_large():
    ids = [f"BraTS-GLI-00001-{t:03d}" for t in range(6)] + [f"BraTS-GLI-{p:05d}-000" for p in range(2, 5)]
    sizes = sorted(len(kfold_split(ids, 3, k, 0)["val"]) for k in range(3))
    assert sizes == [1, 2, 6]  # the 6 time points of patient 1 cannot be split; every fold has a patient


def test_more_folds_than_patients():
    with pytest.raises(UserError, match=r"data.folds = 12 but only 11 patient\(s\) in 19 labelled cases"):
        kfold_split(MULTI, 12, 0, 0)
    assert len(kfold_split(MULTI, 11, 0, 0)["val"]) >= 1
