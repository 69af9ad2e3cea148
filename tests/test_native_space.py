"""Native-space data end to end (CPU, tiny): cases of mixed spacings (1x1x1, 1x1x3, 0.8x0.8x2 mm)
and orientations (LPS, RAS, oblique) are trained on one canonical grid and target spacing, and
every written mask has its input's exact grid, affine and header; Dice is scored on the native grid."""
import json

import nibabel as nib
import numpy as np
import pytest
import yaml

import infer
import train
from cli_capture import run_cli_captured as run  # (exit code, stdout, stderr) of a script's main
from core.checkpoint import load_checkpoint
from datasets.io import discover_cases
from datasets.synthetic import generate_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one torch thread (conftest)


@pytest.fixture(scope="module")
def native_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    generate_dataset(root / "data", 6, seed=2, task="brats-gli-2021", shape=(48, 48, 36), native="mixed")
    return root


def config(root, spacing, out):
    return {
        "out_dir": str(out),
        "data": {"root": str(root / "data"), "cache_dir": str(root / "cache"), "patch_size": [16, 16, 16],
                 "batch_size": 2, "num_workers": 0, "folds": 3, "cache_workers": 1, "spacing": spacing,
                 "foreground_fraction": 1.0},
        "model": {"name": "unet3d", "unet3d": {"features": [4, 8], "strides": [1, 2], "blocks_per_stage": [1, 1]}},
        "train": {"epochs": 1, "iters_per_epoch": 3, "precision": "fp32", "device": "cpu", "log_every": 1},
        "infer": {"sw_batch_size": 2, "device": "cpu"},
    }


@pytest.mark.parametrize("spacing, expected", [("auto", [1.0, 1.0, 2.0]), (None, None)])
def test_mixed_spacings_and_orientations_end_to_end(native_data, tmp_path, spacing, expected):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(native_data, spacing, tmp_path / "run")))
    code, out, err = run(train.main, ["-c", path])
    assert code == 0, err
    assert ("spacing 1x1x2 mm" if expected else "spacing original (not resampled)") in out
    assert load_checkpoint(tmp_path / "run" / "best.pt")["spacing"] == expected

    code, out, err = run(infer.main, ["--checkpoint", tmp_path / "run" / "best.pt", "-i", native_data / "data",
                                      "-o", tmp_path / "pred", "--save-probabilities"])
    assert code == 0, err
    for case in discover_cases(native_data / "data"):
        source = nib.load(str(case.files["t1"]))
        pred = nib.load(str(tmp_path / "pred" / f"{case.case_id}.nii.gz"))
        assert pred.shape == source.shape
        np.testing.assert_array_equal(pred.affine, source.affine)
        for key in ("sform_code", "qform_code", "pixdim", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c",
                    "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"):
            np.testing.assert_array_equal(pred.header[key], source.header[key], err_msg=f"{case.case_id} {key}")
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}
        probs = nib.load(str(tmp_path / "pred" / f"{case.case_id}_probs.nii.gz"))
        assert probs.shape == source.shape + (4,)
        np.testing.assert_allclose(probs.get_fdata().sum(-1), 1.0, atol=0.02)
    report = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert len(report["cases"]) == 6  # scored against each reference on its own (native) grid
    assert all(0.0 <= scores["WT"]["dice"] <= 1.0 for scores in report["cases"].values())


def test_thick_slices_with_isotropic_pooling_say_what_would_work(tmp_path):
    generate_dataset(tmp_path / "data", 3, seed=4, task="brats-gli-2021", shape=(48, 48, 80), native=None)
    cfg = config(tmp_path, [1.0, 1.0, 4.0], tmp_path / "run")  # thick slices: 4 mm
    cfg["model"]["unet3d"] = {"features": [4, 8, 8], "strides": [1, 2, 2], "blocks_per_stage": [1, 1, 1]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = run(train.main, ["-c", path])
    assert code == 2
    line = err.strip().splitlines()[-1]  # after the cache's progress lines
    assert line.startswith("error: model.unet3d.strides: stage 1 pools axis z at 4 mm while the finest axis is 1 mm")
    assert line.endswith("use model.unet3d.strides=[1, [2, 2, 1], 2] data.patch_size=[24, 24, 6]")  # 24 mm each way
    assert not (tmp_path / "run").exists()
