"""bench/check_run.py: the run / prediction checks used by bench/gpu_check.sh must catch failures."""
import json

import nibabel as nib
import numpy as np
import pytest

from bench.check_run import check_predictions, check_run, main
from core.checkpoint import save_checkpoint
from core.task import builtin_tasks

TASK = builtin_tasks()["brats-gli-2021"]


def make_run(folder, losses, dice=0.5):
    folder.mkdir()
    (folder / "config.yaml").write_text("out_dir: x\n")
    (folder / "split.json").write_text("{}")
    state = {"config": {}, "model": {}, "task": TASK.to_dict(), "best": {"dice": dice, "epoch": 1},
             "iteration": 10, "world_size": 1}
    save_checkpoint(state, folder / "last.pt")
    save_checkpoint(state, folder / "best.pt")
    lines = [json.dumps({"train_loss": loss, "mean_dice": dice}) for loss in losses]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("losses, min_validations, loss_check, expected", [
    ([1.0, 0.8, 0.5], 3, True, []),
    ([1.0, 1.2], 2, True, ["training loss did not fall: [1.0, 1.2]"]),
    ([1.0, 1.2], 2, False, []),
    ([1.0], 2, True, ["metrics.jsonl has 1 validations, expected >= 2"]),
    ([1.0, float("nan")], 1, False, ["a validation Dice or training loss is not finite"]),
])
def test_check_run(tmp_path, losses, min_validations, loss_check, expected):
    summary, failures = check_run(make_run(tmp_path / "run", losses), min_validations, loss_check)
    assert failures == expected
    assert summary["validations"] == len(losses)


def test_check_run_missing_checkpoint(tmp_path):
    run = make_run(tmp_path / "run", [1.0, 0.5])
    (run / "best.pt").unlink()
    assert main([str(run)]) == 1
    assert check_run(run, 1, True)[1] == [f"{run / 'best.pt'} is missing"]


def write_case(root, case_id, shape, affine):
    folder = root / case_id
    folder.mkdir(parents=True)
    for modality in ("t1", "t1ce", "t2", "flair"):
        nib.save(nib.Nifti1Image(np.ones(shape, np.int16), affine), folder / f"{case_id}_{modality}.nii.gz")


@pytest.mark.parametrize("pred_shape, pred_affine, values, expected", [
    ((8, 8, 6), np.diag([-1.0, -1.0, 1.0, 1.0]), [0, 1, 2, 4], []),
    ((8, 8, 5), np.diag([-1.0, -1.0, 1.0, 1.0]), [0, 1], ["shape (8, 8, 5) != input (8, 8, 6)"]),
    ((8, 8, 6), np.eye(4), [0, 1], ["affine differs from the input's"]),
    ((8, 8, 6), np.diag([-1.0, -1.0, 1.0, 1.0]), [0, 3],
     ["label values [0, 3] are not labels of task brats-gli-2021 (1 NCR, 2 ED, 4 ET)"]),
])
def test_check_predictions(tmp_path, pred_shape, pred_affine, values, expected):
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    write_case(tmp_path / "data", "BraTS2021_00000", (8, 8, 6), affine)
    (tmp_path / "pred").mkdir()
    labels = np.zeros(pred_shape, np.uint8)
    labels.flat[:len(values)] = values
    nib.save(nib.Nifti1Image(labels, pred_affine), tmp_path / "pred" / "BraTS2021_00000.nii.gz")
    summary, failures = check_predictions(tmp_path / "pred", tmp_path / "data", TASK)
    assert summary["cases"] == 1
    assert [f.split(": ", 1)[1] for f in failures] == expected


def test_check_predictions_missing_file(tmp_path):
    write_case(tmp_path / "data", "BraTS2021_00000", (8, 8, 6), np.eye(4))
    (tmp_path / "pred").mkdir()
    _, failures = check_predictions(tmp_path / "pred", tmp_path / "data", TASK)
    assert failures == [f"{tmp_path / 'pred' / 'BraTS2021_00000.nii.gz'} is missing"]
