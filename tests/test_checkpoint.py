"""Checkpoint format: atomic save, safe load, clear errors for files that are not ours."""
import pytest
import torch

from engine.checkpoint import FORMAT, load_checkpoint, save_checkpoint, stored_task, unwrap_model
from engine.errors import UserError, run_cli
from engine.task import builtin_tasks


def minimal_state():
    return {"config": {"model": {"name": "unet3d"}}, "model": {"w": torch.ones(2)}, "convention": "2021"}


def test_round_trip_tags_format(tmp_path):
    path = save_checkpoint(minimal_state(), tmp_path / "sub" / "last.pt")
    state = load_checkpoint(path)
    assert state["format"] == FORMAT
    assert torch.equal(state["model"]["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_interrupted_save_keeps_old_file(tmp_path, monkeypatch):
    path = save_checkpoint(minimal_state(), tmp_path / "last.pt")

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({**minimal_state(), "convention": "2023"}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["convention"] == "2021"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("content, message", [
    (None, "checkpoint not found"),
    (b"not a zip file at all", "cannot read checkpoint"),
    ({"weights": torch.ones(1)}, "not a checkpoint of this repository"),
    ({"format": FORMAT, "model": {}, "convention": "2021"}, "missing 'config'"),
    ({"format": FORMAT, "model": {}, "config": {}}, "missing 'task'"),
])
def test_bad_checkpoints(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_unwrap_compiled_like_wrapper():
    inner = torch.nn.Linear(2, 2)
    wrapper = torch.nn.Module()
    wrapper._orig_mod = inner
    assert unwrap_model(wrapper) is inner
    assert unwrap_model(inner) is inner


def test_run_cli_user_error_exits_2(capsys):
    def main(argv):
        raise UserError("data/x.nii.gz: file not found")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: data/x.nii.gz: file not found\n"


def test_stored_task_new_and_legacy(tmp_path):
    ped = builtin_tasks()["brats-ped"]
    path = save_checkpoint({**minimal_state(), "task": ped.to_dict()}, tmp_path / "new.pt")
    assert stored_task(load_checkpoint(path), path) == ped
    # written before tasks existed: the glioma task of its convention, old config keys migrated
    old = {**minimal_state(), "convention": "2023",
           "config": {"data": {"label_convention": "auto", "synthetic_convention": "2021"},
                      "metrics": {"convention": "legacy", "lesion_dilation": 3, "lesion_min_volume": 50.0},
                      "infer": {"output_convention": "2021"}}}
    path = save_checkpoint(old, tmp_path / "old.pt")
    state = load_checkpoint(path)
    assert stored_task(state, path).name == "brats-gli-2023"
    assert state["config"] == {"data": {"task": "auto", "synthetic_task": "brats-gli-2021"},
                               "metrics": {"convention": "legacy"}, "infer": {"output_task": "brats-gli-2021"}}
    bad = save_checkpoint({**minimal_state(), "task": {"name": "x"}}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="bad.pt: stored task: task key 'modalities' is missing"):
        stored_task(load_checkpoint(bad), bad)
