"""Checkpoint format: atomic save, safe load, clear errors for files that are not ours."""
import pytest
import torch

from core.checkpoint import FORMAT, load_checkpoint, save_checkpoint, stored_task, unwrap_model
from core.errors import UserError, run_cli
from core.task import builtin_tasks


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
    (b"not a zip file at all", "not a PyTorch checkpoint"),
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


def one_clean_line(err: UserError, path) -> str:
    """The error's message, checked to be one line naming the file, without ANSI codes, ending in a
    complete sentence (no message of torch cut mid-sentence)."""
    message = str(err)
    assert "\n" not in message and "\x1b" not in message and "\t" not in message, repr(message)
    assert message.startswith(f"{path}: "), message
    assert len(message) < 300 and not message.endswith(("...", "…")), message
    return message[len(f"{path}: "):]


def assert_refused(path, *expected: str) -> str:
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    problem = one_clean_line(info.value, path)
    for text in expected:
        assert text in problem, problem
    return problem


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "best.pt"
    path.write_text("model: unet3d\nepochs: 100\n")  # a config saved under the checkpoint's name
    assert assert_refused(path, "not a PyTorch checkpoint (a text file?)")


def test_pickled_module_is_refused_in_our_words(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # torch.save(model): a pickled module, not a state dict
    problem = assert_refused(path, "holds Python objects that torch.load(weights_only=True) refuses",
                             "not a checkpoint of this repository")
    assert "torch.nn.modules.linear.Linear" in problem  # what it holds
    assert "PyTorch 2.6" not in problem and "add_safe_globals" not in problem  # not torch's advice


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_checkpoint(tmp_path, keep):
    full = save_checkpoint(minimal_state(), tmp_path / "full.pt").read_bytes()
    path = tmp_path / "last.pt"
    path.write_bytes(full[:int(len(full) * keep)])  # an interrupted copy
    assert_refused(path, "the file is truncated or corrupt")


def test_empty_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"")
    assert_refused(path, "the file is empty")


@pytest.mark.parametrize("content, expected", [
    (b"\x1f\x8b\x08\x00" + bytes(range(200)), "gzip"),  # e.g. a .nii.gz passed by mistake
    (b"\x93NUMPY\x01\x00" + bytes(120), "NumPy"),
    (bytes(range(256)) * 4, "not a PyTorch checkpoint"),  # binary of unknown kind
], ids=["gzip", "numpy", "binary"])
def test_other_files(tmp_path, content, expected):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    assert_refused(path, expected)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    import zipfile
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    assert_refused(path, "a zip archive", "not a PyTorch checkpoint")


def test_plain_pickle_is_not_a_checkpoint_and_torch_warnings_are_not_shown(tmp_path, recwarn):
    import pickle
    path = tmp_path / "x.pt"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))  # torch warns about protocol 4, then refuses
    assert_refused(path, "not a PyTorch checkpoint (a Python pickle not written by torch.save)")
    assert not [str(w.message) for w in recwarn]


def test_folder_lists_its_checkpoints(tmp_path):
    run = tmp_path / "runs" / "demo"
    save_checkpoint(minimal_state(), run / "last.pt")
    save_checkpoint(minimal_state(), run / "best.pt")
    (run / "config.yaml").write_text("x: 1\n")
    assert assert_refused(run) == "is a folder; its checkpoints: best.pt, last.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert assert_refused(empty) == "is a folder with no checkpoint (*.pt) in it"


def test_missing_file_and_cli_line(tmp_path, capsys):
    assert assert_refused(tmp_path / "nope.pt") == "checkpoint not found"
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda argv: load_checkpoint(path), [])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and "\x1b" not in err


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
