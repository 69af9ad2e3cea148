"""datasets/split.py: seeded k-fold and split files."""
import json

import pytest

from engine.config import DataConfig
from engine.errors import UserError
from datasets.split import make_split, save_split

IDS = [f"BraTS2021_{i:05d}" for i in range(11)]


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


@pytest.mark.parametrize("folds,fold,match", [(1, 0, "data.folds"), (3, 3, "data.fold must"), (3, -1, "data.fold must"),
                                              (12, 0, "only 11 labelled")])
def test_kfold_bad_settings(folds, fold, match):
    with pytest.raises(UserError, match=match):
        make_split(IDS, DataConfig(folds=folds, fold=fold))


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
