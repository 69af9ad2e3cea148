"""One real run per task family at tiny size: generate synthetic cases of the task, train a few
iterations (task auto-detected), infer, and check the written masks: the task's own label values,
in the input's grid and affine, scored per region of the task."""
import json

import nibabel as nib
import numpy as np
import pytest
import yaml

import infer
import train
from cli_capture import run_cli_captured as run  # (exit code, stdout, stderr) of a script's main
from core.checkpoint import load_checkpoint
from core.task import builtin_tasks
from datasets.io import discover_cases

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one torch thread (conftest)

TASKS = builtin_tasks()


@pytest.mark.parametrize("name, loss", [("brats-gli-2024", "region_dice_bce"), ("brats-ped", "dice_ce"),
                                        ("msd-brain", "region_dice_bce"), ("brats-men-rt", "dice_ce")])
def test_train_and_infer_one_task(tmp_path, name, loss):
    task = TASKS[name]
    config = {
        "data": {"root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"), "patch_size": [16, 16, 16],
                 "batch_size": 2, "num_workers": 0, "folds": 2, "cache_workers": 1, "synthetic_cases": 4,
                 "synthetic_shape": [32, 32, 24], "synthetic_task": name, "foreground_fraction": 1.0},
        "model": {"name": "unet3d", "unet3d": {"features": [4, 8], "strides": [1, 2], "blocks_per_stage": [1, 1],
                                              "deep_supervision": True}},
        "loss": {"name": loss},
        "train": {"epochs": 1, "iters_per_epoch": 2, "precision": "fp32", "device": "cpu", "log_every": 1},
        "infer": {"sw_batch_size": 2, "device": "cpu"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = run(train.main, ["-c", path, f"out_dir={tmp_path / 'run'}"])
    assert code == 0, err
    assert f"task {name} ({task.describe_labels()}" in out
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    assert state["task"]["name"] == name and state["modalities"] == list(task.modalities)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert list(record["val"]) == list(task.region_names)

    code, out, err = run(infer.main, ["--checkpoint", tmp_path / "run" / "best.pt", "-i", tmp_path / "data",
                                      "-o", tmp_path / "out", "--png"])
    assert code == 0, err
    cases = discover_cases(tmp_path / "data")
    for case in cases:
        pred = nib.load(str(tmp_path / "out" / f"{case.case_id}.nii.gz"))
        source = nib.load(str(case.volume if case.layout == "msd" else case.image_sources(task.modalities[:1], task)[0][0]))
        assert pred.shape == source.shape[:3] and pred.get_data_dtype() == np.uint8
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-6)
        assert set(np.unique(np.asarray(pred.dataobj))) <= set(task.label_values)
        assert (tmp_path / "out" / f"{case.case_id}.png").is_file()
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["task"] == name and sorted(report["cases"]) == sorted(c.case_id for c in cases)
    assert all(list(scores) == list(task.region_names) for scores in report["cases"].values())
