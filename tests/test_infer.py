"""infer.py and inference/predict.py end to end on tiny BraTS-format cases written here.

Most tests use ``ThresholdNet``, a hand-made "network" whose class at each voxel is a fixed function
of the z-scored first modality there, so the expected mask of any input is known exactly: that
checks the orientation, the crop and paste-back, the label convention and the metrics. A tiny real
U-Net checks the checkpoint round trip, ensembling and the error exits.
"""
import errno
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import infer
from core.checkpoint import save_checkpoint
from core.config import Config, InferConfig, to_dict
from core.errors import UserError, run_cli
from core.task import builtin_tasks
from datasets.io import Case
from datasets.preprocess import brain_mask, zscore_in_mask
from inference.predict import load_models, override_infer_config, predict_case
from inference.render import dice_line, render_case

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (22, 19, 14)
EDGES = (0.0, 0.6, 1.2)  # z-score thresholds of ThresholdNet
# number of edges exceeded -> training class of the glioma tasks: 0 bg, 1 edema, 2 necrosis, 3 ET
COUNT_TO_CLASS = np.array([0, 2, 1, 3], dtype=np.uint8)
NAMES = {"2021": ("t1", "t1ce", "t2", "flair"), "2023": ("t1n", "t1c", "t2w", "t2f")}
TASKS = builtin_tasks()
TASK_OF = {"2021": TASKS["brats-gli-2021"], "2023": TASKS["brats-gli-2023"]}  # by naming


class ThresholdNet(nn.Module):
    """Pointwise: labels mode one-hot logits of ``COUNT_TO_CLASS[#edges below x0]`` over
    ``out_channels`` classes; regions mode WT/TC/ET = x0 > edge 0/1/2 (further region channels,
    e.g. RC, off). Both give the same classes."""

    def __init__(self, out_channels: int, mode: str = "labels"):
        super().__init__()
        self.out_channels = out_channels
        self.edges = nn.Parameter(torch.tensor(EDGES))
        self.register_buffer("regions", torch.tensor(mode == "regions"))  # saved with the weights

    def forward(self, x):
        v = x[:, :1]
        above = torch.cat([(v > e).float() for e in self.edges], dim=1)  # (B, 3, ...)
        if bool(self.regions):
            off = torch.zeros_like(v).expand(-1, self.out_channels - 3, -1, -1, -1)
            return 20.0 * (torch.cat([above, off], dim=1) - 0.5)
        classes = torch.from_numpy(COUNT_TO_CLASS).to(x.device)[above.sum(1).long()]
        return 20.0 * nn.functional.one_hot(classes.long(), self.out_channels).permute(0, 4, 1, 2, 3).float()


def expected_classes(images: np.ndarray) -> np.ndarray:
    z = zscore_in_mask(images, brain_mask(images))[0]
    return COUNT_TO_CLASS[sum((z > e).astype(int) for e in EDGES)]


def make_affine(kind: str) -> np.ndarray:
    if kind == "lps":  # BraTS / SRI24
        return np.array([[-1, 0, 0, 239], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    if kind == "ras":
        return np.diag([1.0, 1.0, 1.0, 1.0])
    if kind == "anisotropic":
        return np.array([[0.9, 0, 0, -10], [0, 1.2, 0, 5], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    if kind == "oblique":
        a = math.radians(20)
        rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        affine = np.eye(4)
        affine[:3, :3] = rot @ np.diag([1.0, 1.1, 2.0])
        affine[:3, 3] = [3, -4, 5]
        return affine
    raise ValueError(kind)


def write_case(root: Path, case_id: str, naming: str = "2021", affine_kind: str = "lps", dtype=np.int16,
               seed: int = 0, seg_convention: str | None = None, shape=SHAPE) -> tuple[Path, np.ndarray]:
    """A BraTS-format case with an ellipsoid 'brain'; returns (folder, images (C, X, Y, Z) float32)."""
    rng = np.random.default_rng(seed)
    folder = root / case_id
    folder.mkdir(parents=True)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = sum((g / r) ** 2 for g, r in zip(grid, (0.8, 0.7, 0.9))) <= 1
    brain[:3] = False  # off-centre brain: a crop that is not symmetric
    images = np.zeros((4,) + shape, np.float32)
    for c in range(4):
        values = rng.normal(300 + 50 * c, 60, size=shape)
        images[c][brain] = np.round(values[brain]) if dtype == np.int16 else values[brain]
    affine = make_affine(affine_kind)
    sep = "_" if naming == "2021" else "-"
    for c, name in enumerate(NAMES[naming]):
        img = nib.Nifti1Image(images[c].astype(dtype), affine)
        img.header.set_sform(affine, 1)
        img.header.set_qform(affine, 1)
        nib.save(img, str(folder / f"{case_id}{sep}{name}.nii.gz"))
    if seg_convention is not None:
        labels = task_of(seg_convention).classes_to_labels(expected_classes(images))
        nib.save(nib.Nifti1Image(labels, affine), str(folder / f"{case_id}{sep}seg.nii.gz"))
    return folder, images


def case_id(naming: str, i: int) -> str:
    return f"BraTS2021_{i:05d}" if naming == "2021" else f"BraTS-GLI-{i:05d}-000"


def tiny_config(mode: str = "labels") -> Config:
    cfg = Config()
    cfg.data.patch_size = [16, 16, 16]
    cfg.loss.name = "dice_ce" if mode == "labels" else "region_dice_bce"
    cfg.model.unet3d.features = [4, 8]
    cfg.model.unet3d.strides = [1, 2]
    cfg.model.unet3d.blocks_per_stage = [1, 1]
    cfg.infer.device = "cpu"
    cfg.infer.sw_batch_size = 2
    return cfg


def task_of(convention_or_task: str):
    return TASK_OF.get(convention_or_task) or TASKS[convention_or_task]


def checkpoint_state(convention_or_task: str, mode: str, model: nn.Module, cfg: Config) -> dict:
    """A checkpoint of the current format; ``"2021"``/``"2023"`` mean the glioma tasks."""
    return {"config": to_dict(cfg), "task": task_of(convention_or_task).to_dict(), "output_mode": mode,
            "modalities": ["t1", "t1ce", "t2", "flair"], "model": model.state_dict()}


def threshold_checkpoint(path: Path, convention: str = "2021", mode: str = "labels") -> Path:
    model = ThresholdNet(task_of(convention).output_channels(mode), mode)
    return save_checkpoint(checkpoint_state(convention, mode, model, tiny_config(mode)), path)


def unet_checkpoint(path: Path, convention: str = "2021", seed: int = 0, mode: str = "labels") -> Path:
    from models import build_model
    cfg = tiny_config(mode)
    torch.manual_seed(seed)
    model = build_model(cfg.model, 4, task_of(convention).output_channels(mode), cfg.data.patch_size)
    return save_checkpoint(checkpoint_state(convention, mode, model, cfg), path)


@pytest.fixture
def threshold_net(monkeypatch):
    """Make checkpoints rebuild ``ThresholdNet`` instead of the configured network (its mode comes
    back with the checkpoint's weights)."""
    monkeypatch.setattr("inference.predict.build_model",
                        lambda model_cfg, in_ch, out_ch, patch_size=None: ThresholdNet(out_ch))


def run_main(argv) -> int:
    """``run_cli(infer.main, argv)`` in-process -> its exit code (read the output with capsys)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(infer.main, [str(a) for a in argv])
    return exit_info.value.code


# ----------------------------------------------------------------------------------------------
# Geometry, label convention, metrics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("affine_kind, dtype, convention, mode", [
    ("lps", np.int16, "2021", "labels"),
    ("ras", np.float32, "2023", "labels"),
    ("oblique", np.int16, "2023", "regions"),
    ("anisotropic", np.float32, "2021", "regions"),
])
def test_output_geometry_labels_and_metrics(tmp_path, threshold_net, capsys, affine_kind, dtype, convention, mode):
    ckpt = threshold_checkpoint(tmp_path / "model.pt", convention, mode)
    cid = case_id(convention, 1)
    _, images = write_case(tmp_path / "data", cid, convention, affine_kind, dtype, seg_convention=convention)
    out = tmp_path / "out"
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out]) == 0

    src = nib.load(str(tmp_path / "data" / cid / next(p.name for p in (tmp_path / "data" / cid).iterdir()
                                                       if "seg" not in p.name)))
    pred = nib.load(str(out / f"{cid}.nii.gz"))
    assert pred.shape == src.shape == SHAPE
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-6)
    assert int(pred.header["sform_code"]) == int(src.header["sform_code"])
    assert pred.get_data_dtype() == np.uint8
    labels = np.asarray(pred.dataobj)
    expected = TASK_OF[convention].classes_to_labels(expected_classes(images))
    np.testing.assert_array_equal(labels, expected)
    assert (labels == (4 if convention == "2021" else 3)).any()
    assert not (labels == (3 if convention == "2021" else 4)).any()

    report = json.loads((out / "metrics.json").read_text())
    assert list(report["cases"]) == [cid]
    for region in ("WT", "TC", "ET"):
        assert report["cases"][cid][region]["dice"] == 1.0
        assert report["cases"][cid][region]["hd95"] == 0.0
    assert (out / "metrics.csv").read_text().startswith("case_id,region,")
    stdout = capsys.readouterr().out
    assert "done: 1 predicted now, 0 kept" in stdout and "settings, 0 failed" in stdout and "Dice" in stdout


@pytest.mark.parametrize("naming, checkpoint_convention, override, expected_et", [
    ("2023", "2021", None, 3),                       # auto: the input's naming wins
    ("2021", "2023", None, 4),
    ("2023", "2021", "infer.output_task=brats-gli-2021", 4),
])
def test_output_convention_follows_the_input(tmp_path, threshold_net, naming, checkpoint_convention, override,
                                             expected_et):
    ckpt = threshold_checkpoint(tmp_path / "model.pt", checkpoint_convention)
    cid = case_id(naming, 3)
    write_case(tmp_path / "data", cid, naming)
    args = ["--checkpoint", ckpt, "-i", tmp_path / "data" / cid, "-o", tmp_path / "out"] + ([override] if override else [])
    assert run_main(args) == 0
    labels = np.asarray(nib.load(str(tmp_path / "out" / f"{cid}.nii.gz")).dataobj)
    assert (labels == expected_et).any() and set(np.unique(labels)) <= {0, 1, 2, expected_et}


def test_postprocessing_override_is_applied(tmp_path, threshold_net):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    cid = case_id("2021", 4)
    _, images = write_case(tmp_path / "data", cid)
    et_voxels = int((expected_classes(images) == 3).sum())
    assert et_voxels > 0
    run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", tmp_path / "out", f"infer.et_min_volume={et_voxels + 1}"])
    labels = np.asarray(nib.load(str(tmp_path / "out" / f"{cid}.nii.gz")).dataobj)
    assert not (labels == 4).any()
    assert (labels == 1).sum() == (expected_classes(images) == 1).sum() + et_voxels


def test_probabilities_and_png(tmp_path, threshold_net):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    cid = case_id("2021", 5)
    _, images = write_case(tmp_path / "data", cid, seg_convention="2021")
    out = tmp_path / "out"
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out, "--save-probabilities", "--png"]) == 0
    probs = nib.load(str(out / f"{cid}_probs.nii.gz"))
    assert probs.shape == SHAPE + (4,)
    np.testing.assert_allclose(probs.affine, make_affine("lps"))
    p = probs.get_fdata()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=0.01)
    np.testing.assert_array_equal(p.argmax(-1), expected_classes(images))
    assert (p[:3, ..., 0] > 0.99).all()  # outside the brain crop: certain background

    # the picture of inference/render.py: FLAIR, prediction and reference rows, the case's Dice line
    task = TASK_OF["2021"]
    metrics = json.loads((out / "metrics.json").read_text())["cases"][cid]
    expected = render_case(images[3], expected_classes(images), expected_classes(images), make_affine("lps"), task,
                           cid, subtitle=dice_line(metrics, task))
    assert dice_line(metrics, task) == "Dice WT 1.00  TC 1.00  ET 1.00"
    assert_png_equals(out / f"{cid}.png", expected)
    assert not list(out.glob(".*"))  # written atomically: no temporary file left


def test_png_without_a_reference_has_no_dice_line(tmp_path, threshold_net):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    cid = case_id("2021", 6)
    _, images = write_case(tmp_path / "data", cid, affine_kind="anisotropic")  # no label file
    out = tmp_path / "out"
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out, "--png"]) == 0
    expected = render_case(images[3], expected_classes(images), None, make_affine("anisotropic"), TASK_OF["2021"],
                           cid)
    assert_png_equals(out / f"{cid}.png", expected)
    assert not (out / "metrics.json").exists()


def assert_png_equals(path: Path, expected: np.ndarray) -> None:
    from PIL import Image
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), expected)


# ----------------------------------------------------------------------------------------------
# Tasks: each case's labels, checkpoints of other tasks, invalid references, old checkpoints
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_name, mode", [("brats-ped", "labels"), ("brats-gli-2024", "regions"),
                                             ("brats-met", "labels")])
def test_output_in_the_task_label_values(tmp_path, threshold_net, capsys, task_name, mode):
    task = TASKS[task_name]
    ckpt = threshold_checkpoint(tmp_path / "model.pt", task_name, mode)
    prefix = {"brats-ped": "BraTS-PED", "brats-gli-2024": "BraTS-GLI", "brats-met": "BraTS-MET"}[task_name]
    cid = f"{prefix}-00001-100"
    _, images = write_case(tmp_path / "data", cid, "2023", seg_convention=task_name)
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", tmp_path / "out"]) == 0
    labels = np.asarray(nib.load(str(tmp_path / "out" / f"{cid}.nii.gz")).dataobj)
    np.testing.assert_array_equal(labels, task.classes_to_labels(expected_classes(images)))
    assert set(np.unique(labels)) <= set(task.label_values)
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["task"] == task_name and list(report["cases"][cid]) == list(task.region_names)
    assert all(report["cases"][cid][r]["dice"] == 1.0 for r in task.region_names)
    assert f"task {task_name}" in capsys.readouterr().out


def test_checkpoint_of_another_task_exits_2(tmp_path, threshold_net, capsys):
    ckpt = threshold_checkpoint(tmp_path / "model.pt", "2023")
    write_case(tmp_path / "data", "BraTS-PED-00001-000", "2023")
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", tmp_path / "out"]) == 2
    line = one_error_line(capsys)
    assert "case BraTS-PED-00001-000 is task brats-ped" in line and "trained on task brats-gli-2023" in line
    assert not (tmp_path / "out").exists()


def test_invalid_reference_fails_its_case(tmp_path, threshold_net, capsys):
    """A label file with a value outside the task is a failed case (exit 1), not a silent gap in the metrics."""
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    good, bad = case_id("2021", 1), case_id("2021", 2)
    write_case(tmp_path / "data", good, seg_convention="2021")
    folder, _ = write_case(tmp_path / "data", bad, seed=1, seg_convention="2021")
    seg_path = folder / f"{bad}_seg.nii.gz"
    seg = nib.load(str(seg_path))
    labels = np.asarray(seg.dataobj).copy()
    labels[5, 5, 5] = 5
    nib.save(nib.Nifti1Image(labels, seg.affine), str(seg_path))
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", tmp_path / "out"]) == 1
    captured = capsys.readouterr()
    assert "done: 1 predicted now, 0 kept" in captured.out and "settings, 1 failed" in captured.out
    assert f"{bad}: " in captured.err and "5" in captured.err and str(seg_path.name) in captured.err
    assert list(json.loads((tmp_path / "out" / "metrics.json").read_text())["cases"]) == [good]


def test_checkpoint_written_before_tasks_still_loads(tmp_path, threshold_net):
    cfg = to_dict(tiny_config())
    cfg["data"].pop("task"), cfg["data"].pop("synthetic_task"), cfg["infer"].pop("output_task")
    cfg["data"].update(label_convention="auto", synthetic_convention="2021", modalities=["t1", "t1ce", "t2", "flair"])
    cfg["metrics"].update(lesion_dilation=3, lesion_min_volume=50.0)
    cfg["infer"].update(output_convention="auto", min_component_size=[0, 0, 0])
    ckpt = save_checkpoint({"config": cfg, "convention": "2023", "model": ThresholdNet(4).state_dict()},
                           tmp_path / "old.pt")
    cid = case_id("2023", 1)
    _, images = write_case(tmp_path / "data", cid, "2023", seg_convention="2023")
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", tmp_path / "out"]) == 0
    labels = np.asarray(nib.load(str(tmp_path / "out" / f"{cid}.nii.gz")).dataobj)
    np.testing.assert_array_equal(labels, TASK_OF["2023"].classes_to_labels(expected_classes(images)))


# ----------------------------------------------------------------------------------------------
# Output rules: skip / overwrite, never inside the input
# ----------------------------------------------------------------------------------------------
def test_existing_outputs_skipped_unless_overwrite(tmp_path, threshold_net, capsys):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    cid = case_id("2021", 6)
    write_case(tmp_path / "data", cid, seg_convention="2021")
    out = tmp_path / "out"
    out.mkdir()
    target = out / f"{cid}.nii.gz"
    run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out])
    first = target.read_bytes()
    (out / "metrics.json").unlink()
    capsys.readouterr()

    target.write_bytes(first)  # an existing prediction is kept and still evaluated
    stamp = target.stat().st_mtime_ns
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out]) == 0
    stdout = capsys.readouterr().out
    assert f"{cid}: kept" in stdout and "done: 0 predicted now, 1 kept" in stdout
    assert target.stat().st_mtime_ns == stamp
    assert json.loads((out / "metrics.json").read_text())["cases"][cid]["ET"]["dice"] == 1.0

    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out, "--overwrite"]) == 0
    assert "done: 1 predicted now, 0 kept" in capsys.readouterr().out
    assert target.stat().st_mtime_ns != stamp


@pytest.mark.parametrize("where", ["same", "inside", "inside_case"])
def test_output_inside_input_refused(tmp_path, threshold_net, capsys, where):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    cid = case_id("2021", 7)
    folder, _ = write_case(tmp_path / "data", cid)
    before = sorted(p.name for p in folder.iterdir())
    inp, out = {"same": (tmp_path / "data", tmp_path / "data"),
                "inside": (tmp_path / "data", tmp_path / "data" / "preds"),
                "inside_case": (folder, folder / "preds")}[where]
    assert run_main(["--checkpoint", ckpt, "-i", inp, "-o", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "outside the input" in err[0]
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not (tmp_path / "data" / "preds").exists()


# ----------------------------------------------------------------------------------------------
# OUTPUT/predictions.json: what wrote the masks; kept masks only of the same configuration
# ----------------------------------------------------------------------------------------------
def other_threshold_checkpoint(path: Path) -> Path:
    """Another model of the same task: ThresholdNet with shifted edges (other masks)."""
    model = ThresholdNet(4)
    with torch.no_grad():
        model.edges += 0.05
    return save_checkpoint(checkpoint_state("2021", "labels", model, tiny_config()), path)


def write_cases(root: Path, n: int) -> list[str]:
    ids = [case_id("2021", i) for i in range(n)]
    for i, cid in enumerate(ids):
        write_case(root, cid, seed=i, seg_convention="2021")
    return ids


def test_predictions_json_records_what_wrote_the_masks(tmp_path, threshold_net, capsys):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    ids = write_cases(tmp_path / "data", 2)
    out = tmp_path / "out"
    base = ["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out]
    assert run_main(base + ["--cases", ids[0], "infer.tta=true", "infer.sw_batch_size=1"]) == 0
    record = json.loads((out / "predictions.json").read_text())
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record["checkpoints"] == [{"path": str(ckpt.resolve()), "sha256": digest}]
    assert record["task"] == "brats-gli-2021" and record["output_task"].startswith("auto")
    assert record["settings"]["infer.tta"] is True and record["settings"]["postprocessing.et_min_volume"] == 0
    assert {"infer.overlap", "infer.output_task", "postprocessing.min_component_size"} <= set(record["settings"])
    assert not {"infer.device", "infer.sw_batch_size", "infer.precision"} & set(record["settings"])
    assert datetime.fromisoformat(record["time"]).tzinfo is not None
    assert record["cases"] == [ids[0]]
    assert json.loads((out / "metrics.json").read_text())["kept"] == []
    capsys.readouterr()

    # the same checkpoint and mask settings (device and batch size do not change masks): the first
    # case's mask is kept, reported as kept, and the case lists merge
    assert run_main(base + ["infer.tta=true", "infer.sw_batch_size=3", "infer.device=cpu", "infer.precision=fp32"]) == 0
    stdout = capsys.readouterr().out
    assert "done: 1 predicted now, 1 kept from an earlier run of the same checkpoint(s) and settings" in stdout
    assert "1 of them of masks kept from an earlier run" in stdout
    assert json.loads((out / "predictions.json").read_text())["cases"] == ids
    report = json.loads((out / "metrics.json").read_text())
    assert report["kept"] == [ids[0]] and sorted(report["cases"]) == ids
    assert not list(out.glob(".*"))


def test_masks_of_another_checkpoint_are_refused(tmp_path, threshold_net, capsys):
    """Re-running with another checkpoint into the same folder must not report the old masks'
    metrics as the new model's: one line saying what wrote them, exit 2, nothing touched."""
    a = threshold_checkpoint(tmp_path / "a.pt")
    b = other_threshold_checkpoint(tmp_path / "b.pt")
    ids = write_cases(tmp_path / "data", 2)
    out = tmp_path / "out"
    assert run_main(["--checkpoint", a, "-i", tmp_path / "data", "-o", out, "--cases", ids[0]]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    for cases in (ids[0], ids[1]):  # also other cases: one folder holds the masks of one configuration
        assert run_main(["--checkpoint", b, "-i", tmp_path / "data", "-o", out, "--cases", cases]) == 2
        line = one_error_line(capsys)
        assert f"{ids[0]}.nii.gz" in line and "another configuration" in line
        assert str(a.resolve()) in line and str(b.resolve()) in line
        assert "--overwrite" in line and "another -o" in line
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert run_main(["--checkpoint", b, "-i", tmp_path / "data", "-o", out, "--cases", ids[0], "--overwrite"]) == 0
    assert "done: 1 predicted now, 0 kept" in capsys.readouterr().out
    record = json.loads((out / "predictions.json").read_text())
    assert [c["sha256"] for c in record["checkpoints"]] == [hashlib.sha256(b.read_bytes()).hexdigest()]
    assert record["cases"] == [ids[0]]


def test_masks_of_other_mask_settings_are_refused(tmp_path, threshold_net, capsys):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    write_cases(tmp_path / "data", 1)
    out = tmp_path / "out"
    base = ["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out]
    assert run_main(base) == 0
    capsys.readouterr()
    assert run_main(base + ["infer.et_min_volume=5", "infer.tta=true"]) == 2
    line = one_error_line(capsys)
    assert "postprocessing.et_min_volume=0.0 there, 5.0 now" in line and "infer.tta=false there, true now" in line
    assert "sha256" not in line  # the same checkpoint: only the settings differ


@pytest.mark.parametrize("problem", ["no_record", "unreadable_record", "unlisted_mask"])
def test_masks_of_unknown_origin_are_refused(tmp_path, threshold_net, capsys, problem):
    """Masks without a predictions.json (an older folder, copied masks), with a broken one, or not
    listed in it: nobody can tell what wrote them, so they are not reported as this run's."""
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    ids = write_cases(tmp_path / "data", 2)
    out = tmp_path / "out"
    base = ["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out]
    assert run_main(base + ["--cases", ids[0]]) == 0
    if problem == "no_record":
        (out / "predictions.json").unlink()
    elif problem == "unreadable_record":
        (out / "predictions.json").write_text("{not json")
    else:
        (out / f"{ids[1]}.nii.gz").write_bytes((out / f"{ids[0]}.nii.gz").read_bytes())
    metrics_before = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert run_main(base) == 2
    line = one_error_line(capsys)
    expected = {"no_record": "no predictions.json says which checkpoint(s) and settings wrote them",
                "unreadable_record": "predictions.json is unreadable",
                "unlisted_mask": f"{ids[1]}.nii.gz) are not listed in"}[problem]
    assert expected in line and "--overwrite" in line
    assert (out / "metrics.json").read_bytes() == metrics_before
    assert run_main(base + ["--overwrite"]) == 0
    assert "done: 2 predicted now, 0 kept" in capsys.readouterr().out
    assert json.loads((out / "predictions.json").read_text())["cases"] == ids


def test_interrupted_run_continues(tmp_path, threshold_net, capsys, monkeypatch):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    ids = write_cases(tmp_path / "data", 3)
    out = tmp_path / "out"
    original = infer.predict_stage

    def interrupted(run, loaded):
        if loaded.case.case_id == ids[1]:
            raise KeyboardInterrupt
        return original(run, loaded)

    monkeypatch.setattr(infer, "predict_stage", interrupted)
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out]) == 130
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{ids[0]}.nii.gz"]
    assert json.loads((out / "predictions.json").read_text())["cases"] == [ids[0]]
    monkeypatch.setattr(infer, "predict_stage", original)
    capsys.readouterr()
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out]) == 0
    assert "done: 2 predicted now, 1 kept" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["kept"] == [ids[0]]
    assert json.loads((out / "predictions.json").read_text())["cases"] == ids


# ----------------------------------------------------------------------------------------------
# --cases: a split file, a list of ids, comma-separated ids
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["split_json", "text_file", "comma_list"])
def test_cases_selects_cases_of_the_input(tmp_path, threshold_net, capsys, form):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    ids = write_cases(tmp_path / "data", 4)
    wanted = [ids[1], ids[3]]
    if form == "split_json":  # the split.json of train.py
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "split.json").write_text(json.dumps({"train": [ids[0], ids[2]], "val": wanted}))
        spec = f"{tmp_path / 'run' / 'split.json'}:val"
    elif form == "text_file":
        (tmp_path / "cases.txt").write_text(f"# validation cases\n{ids[3]}\n\n  {ids[1]}  \n")
        spec = str(tmp_path / "cases.txt")
    else:
        spec = f"{ids[3]}, {ids[1]}"
    out = tmp_path / "out"
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out, "--cases", spec]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{i}.nii.gz" for i in wanted]
    assert sorted(json.loads((out / "metrics.json").read_text())["cases"]) == wanted
    assert capsys.readouterr().out.startswith("2 case(s), ")


@pytest.mark.parametrize("spec, message", [
    ("BraTS2021_00001,BraTS2021_00042", "case BraTS2021_00042 is not in"),
    ("{split}:val", "case BraTS2021_00099 is not in"),
    ("{split}:test", 'has no list "test" (keys: train, val)'),
    ("{split}", "name the list to use"),
    ("{tmp}/missing.txt", "missing.txt: file not found"),
    ("{tmp}/missing.json:val", "missing.json: file not found"),
    (" , ", "no case ids given"),
])
def test_cases_errors_exit_2(tmp_path, threshold_net, capsys, spec, message):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    write_cases(tmp_path / "data", 2)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [case_id("2021", 0)], "val": [case_id("2021", 1), case_id("2021", 99)]}))
    spec = spec.format(split=split, tmp=tmp_path)
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", tmp_path / "out", "--cases", spec]) == 2
    line = one_error_line(capsys)
    assert "--cases" in line and message in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Unwritable OUTPUT, full disk
# ----------------------------------------------------------------------------------------------
def test_unwritable_output_exits_2_before_any_work(tmp_path, unwritable, capsys):
    folder, reason = unwritable
    write_case(tmp_path / "data", case_id("2021", 1))
    # the checkpoint does not exist: the output folder is checked before models are loaded
    assert run_main(["--checkpoint", tmp_path / "missing.pt", "-i", tmp_path / "data", "-o", folder]) == 2
    line = one_error_line(capsys)
    assert f"{folder}: cannot write there ({reason})" in line and "-o" in line


def test_full_disk_while_writing_a_mask(tmp_path, threshold_net, capsys, monkeypatch):
    """A write that fails (here: no space left) is one line naming the mask, exit 2; the earlier
    mask of the case is intact and no temporary file is left in OUTPUT."""
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    [cid] = write_cases(tmp_path / "data", 1)
    out = tmp_path / "out"
    base = ["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out]
    assert run_main(base) == 0
    earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "predictions.json"}

    def full_disk(img, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a NIfTI")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(nib, "save", full_disk)
    capsys.readouterr()
    assert run_main(base + ["--overwrite"]) == 2
    line = one_error_line(capsys)
    assert f"{out / cid}.nii.gz: cannot write it (No space left on device)" in line and ".tmp" not in line
    assert not list(out.glob(".*"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "predictions.json"} == earlier
    assert json.loads((out / "predictions.json").read_text())["cases"] == [cid]


# ----------------------------------------------------------------------------------------------
# Bad input: one failing case among many; exit-2 errors
# ----------------------------------------------------------------------------------------------
def test_corrupt_case_among_good_ones(tmp_path, threshold_net, capsys):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    ids = [case_id("2021", i) for i in (10, 11, 12)]
    for i, cid in enumerate(ids):
        write_case(tmp_path / "data", cid, seed=i)
    (tmp_path / "data" / ids[1] / f"{ids[1]}_flair.nii.gz").write_bytes(b"not a nifti file at all")
    out = tmp_path / "out"
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out]) == 1
    assert (out / f"{ids[0]}.nii.gz").is_file() and (out / f"{ids[2]}.nii.gz").is_file()
    assert not (out / f"{ids[1]}.nii.gz").exists()
    captured = capsys.readouterr()
    assert "done: 2 predicted now, 0 kept" in captured.out and "settings, 1 failed" in captured.out
    assert "1 of 3 cases failed" in captured.err and ids[1] in captured.err and "flair" in captured.err


@pytest.mark.parametrize("stage", ["read_stage", "predict_stage", "write_stage"])
def test_pipeline_failure_in_any_stage_skips_only_that_case(tmp_path, threshold_net, capsys, monkeypatch, stage):
    """Cases are read ahead and written behind the prediction (threads); a failure in any stage
    fails its own case only, and the report keeps the case order."""
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    ids = [case_id("2021", i) for i in range(5)]
    for i, cid in enumerate(ids):
        write_case(tmp_path / "data", cid, seed=i, seg_convention="2021")
    original = getattr(infer, stage)

    def flaky(run, first, *rest):
        loaded_case = first if isinstance(first, Case) else first.case
        if loaded_case.case_id == ids[2]:
            raise RuntimeError(f"simulated {stage} failure")
        if stage == "write_stage":
            time.sleep(0.05)  # a slow writer: the prediction loop runs ahead, then waits
        return original(run, first, *rest)

    monkeypatch.setattr(infer, stage, flaky)
    out = tmp_path / "out"
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out]) == 1
    captured = capsys.readouterr()
    assert f"{ids[2]}: RuntimeError: simulated {stage} failure" in captured.err
    assert "done: 4 predicted now, 0 kept" in captured.out and "settings, 1 failed" in captured.out
    written = [line.split(":")[0] for line in captured.out.splitlines() if ": written in" in line]
    assert written == [ids[0], ids[1], ids[3], ids[4]]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{i}.nii.gz" for i in ids if i != ids[2]]
    assert sorted(json.loads((out / "metrics.json").read_text())["cases"]) == [i for i in ids if i != ids[2]]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_missing_modality_exits_2(tmp_path, threshold_net, capsys):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    cid = case_id("2023", 1)
    folder, _ = write_case(tmp_path / "data", cid, "2023")
    (folder / f"{cid}-t2f.nii.gz").unlink()
    assert run_main(["--checkpoint", ckpt, "-i", folder, "-o", tmp_path / "out"]) == 2
    line = one_error_line(capsys)
    assert "flair" in line and cid in line


def test_geometry_mismatch_exits_2(tmp_path, threshold_net, capsys):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    cid = case_id("2021", 2)
    folder, images = write_case(tmp_path / "data", cid)
    nib.save(nib.Nifti1Image(images[1].astype(np.int16), make_affine("ras")), str(folder / f"{cid}_t1ce.nii.gz"))
    assert run_main(["--checkpoint", ckpt, "-i", folder, "-o", tmp_path / "out"]) == 2
    assert "affine differs" in one_error_line(capsys)


def test_empty_input_folder_exits_2(tmp_path, threshold_net, capsys):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    (tmp_path / "empty").mkdir()
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "empty", "-o", tmp_path / "out"]) == 2
    assert "no BraTS cases" in one_error_line(capsys)


@pytest.mark.parametrize("content, message", [
    (None, "checkpoint not found"),
    (b"garbage bytes", "not a PyTorch checkpoint (a text file?)"),
    ("foreign", "not a checkpoint of this repository"),
])
def test_bad_checkpoint_exits_2(tmp_path, capsys, content, message):
    ckpt = tmp_path / "model.pt"
    if content == "foreign":
        torch.save({"state_dict": {}}, ckpt)
    elif content is not None:
        ckpt.write_bytes(content)
    write_case(tmp_path / "data", case_id("2021", 1))
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", tmp_path / "out"]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_real_unet_and_bad_override(tmp_path):
    """The real entry point: a tiny U-Net checkpoint end to end, then a forbidden override."""
    ckpt = unet_checkpoint(tmp_path / "unet.pt", "2023")
    cid = case_id("2023", 8)
    write_case(tmp_path / "data", cid, "2023", "oblique")
    base = [sys.executable, str(ROOT / "infer.py"), "--checkpoint", str(ckpt), "-i", str(tmp_path / "data")]
    done = subprocess.run(base + ["-o", str(tmp_path / "out"), "infer.tta=true"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    pred = nib.load(str(tmp_path / "out" / f"{cid}.nii.gz"))
    assert pred.shape == SHAPE and pred.get_data_dtype() == np.uint8
    np.testing.assert_allclose(pred.affine, make_affine("oblique"), atol=1e-6)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}

    bad = subprocess.run(base + ["-o", str(tmp_path / "out2"), "data.patch_size=[32,32,32]"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "data.patch_size" in lines[0]


# ----------------------------------------------------------------------------------------------
# inference.predict: ensembles, overrides, checkpoints that disagree
# ----------------------------------------------------------------------------------------------
def test_ensemble_of_two_copies_equals_one(tmp_path):
    ckpt = unet_checkpoint(tmp_path / "a.pt")
    single, spec = load_models([ckpt])
    cfg, mode = spec.cfg, spec.mode
    pair, _ = load_models([ckpt, ckpt])
    images = np.random.default_rng(0).normal(size=(4, 18, 16, 17)).astype(np.float32)
    one = predict_case(single, images, cfg.infer, cfg.data.patch_size, mode, "cpu")
    two = predict_case(pair, images, cfg.infer, cfg.data.patch_size, mode, "cpu")
    assert one.shape == (4, 18, 16, 17) and (spec.task.name, mode) == ("brats-gli-2021", "labels")
    torch.testing.assert_close(two, one)
    other, _ = load_models([unet_checkpoint(tmp_path / "b.pt", seed=1)])
    three = predict_case(single + other, images, cfg.infer, cfg.data.patch_size, mode, "cpu")
    b = predict_case(other, images, cfg.infer, cfg.data.patch_size, mode, "cpu")
    torch.testing.assert_close(three, (one + b) / 2)


def test_predict_case_restores_training_mode():
    model = ThresholdNet(4).train()
    probs = predict_case([model], torch.zeros(1, 8, 8, 8), InferConfig(), (8, 8, 8), "labels", "cpu")
    assert model.training and probs.shape == (4, 8, 8, 8)


@pytest.mark.parametrize("second, message", [
    (dict(convention="brats-gli-2024"), "task classes and regions"),
    (dict(mode="regions"), "output mode"),
])
def test_ensemble_members_must_agree(tmp_path, second, message):
    a = unet_checkpoint(tmp_path / "a.pt")
    b = unet_checkpoint(tmp_path / "b.pt", **second)
    with pytest.raises(UserError, match=message) as err:
        load_models([a, b])
    assert str(b) in str(err.value)


def test_weights_that_do_not_fit_are_a_user_error(tmp_path):
    cfg = tiny_config()
    path = save_checkpoint({**checkpoint_state("2021", "labels", nn.Linear(1, 1), cfg), "model": {"w": torch.zeros(1)}},
                           tmp_path / "x.pt")
    with pytest.raises(UserError, match="weights do not fit"):
        load_models([path])


def test_override_infer_config():
    cfg, task = tiny_config(), TASK_OF["2021"]
    new = override_infer_config(cfg, ["infer.tta=true", "infer.min_component_size=[5, 5, 5]",
                                      "metrics.convention=lesionwise"], task)
    assert new.infer.tta and new.infer.min_component_size == [5, 5, 5] and new.metrics.convention == "lesionwise"
    assert not cfg.infer.tta  # a copy
    for bad, key in [("data.patch_size=[8,8,8]", "data.patch_size"), ("model.name=swin_unetr", "model.name"),
                     ("infer.overlapp=0.3", "infer.overlapp"), ("infer.overlap=1.0", "infer.overlap"),
                     ("infer.sw_batch_size=0", "infer.sw_batch_size"),
                     ("infer.min_component_size=[5, 5]", "infer.min_component_size")]:
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            override_infer_config(cfg, [bad], task)
    # one size per training region of the task: GLI 2024 has four (WT, TC, ET, RC); MEN-RT has no ET
    assert override_infer_config(cfg, ["infer.min_component_size=[5, 5, 5, 9]"], TASKS["brats-gli-2024"])
    with pytest.raises(UserError, match="WT, TC, ET, RC"):
        override_infer_config(cfg, ["infer.min_component_size=[5, 5, 5]"], TASKS["brats-gli-2024"])
    with pytest.raises(UserError, match="no enhancing label"):
        override_infer_config(cfg, ["infer.et_min_volume=10"], TASKS["brats-men-rt"])


def test_resolve_device():
    from inference.predict import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="infer.device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:0")


# ----------------------------------------------------------------------------------------------
# Post-processing: tuned rules in the checkpoint, a rules file, infer.* overrides
# ----------------------------------------------------------------------------------------------
ALL_ET_TO_NETC = {"rules": {"min_component_size": [], "et_min_volume": 1e9, "unit": "voxels",
                            "largest_component": False}, "source": "a test: any ET is too small"}


def tuned_threshold_checkpoint(path: Path) -> Path:
    state = checkpoint_state("2021", "labels", ThresholdNet(4), tiny_config())
    return save_checkpoint({**state, "postprocessing": ALL_ET_TO_NETC}, path)


def written_labels(out: Path, cid: str) -> set[int]:
    return set(np.unique(np.asarray(nib.load(out / f"{cid}.nii.gz").dataobj)).tolist())


@pytest.mark.parametrize("how, et_written, source", [
    ("default", False, "a test: any ET is too small"),  # the checkpoint's tuned rules
    ("override", True, "infer.* overrides"),  # any infer.* post-processing key replaces them
    ("file", True, "rules.json: off by file"),  # --postprocessing FILE replaces them
    ("ensemble", True, "an ensemble"),  # members tuned on different cases: none without a file
])
def test_tuned_postprocessing_is_applied_unless_replaced(tmp_path, threshold_net, capsys, how, et_written, source):
    ckpt = tuned_threshold_checkpoint(tmp_path / "model.pt")
    cid = write_cases(tmp_path / "data", 1)[0]
    out = tmp_path / "out"
    argv = ["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out]
    if how == "override":
        argv.append("infer.et_min_volume=0")
    elif how == "file":
        (tmp_path / "rules.json").write_text(json.dumps({"rules": {}, "source": "off by file"}))
        argv += ["--postprocessing", tmp_path / "rules.json"]
    elif how == "ensemble":
        argv += ["--checkpoint", tuned_threshold_checkpoint(tmp_path / "model2.pt")]
    assert run_main(argv) == 0
    stdout = capsys.readouterr().out
    line = next(l for l in stdout.splitlines() if l.startswith("post-processing: "))
    assert source in line
    labels = written_labels(out, cid)
    assert (4 in labels) is et_written and 1 in labels  # ET relabelled as the necrotic core, not dropped
    settings = json.loads((out / "predictions.json").read_text())["settings"]
    assert settings["postprocessing.et_min_volume"] == (0.0 if et_written else 1e9)


@pytest.mark.parametrize("content, message", [
    (None, "post-processing file not found"),
    ("{not json", "not a post-processing file"),
    ('{"source": "no rules"}', "not a post-processing file"),
    ('{"rules": {"min_component_size": [5, 5]}}', "3 sizes >= 0, one per training region"),
])
def test_bad_postprocessing_file_exits_2(tmp_path, threshold_net, capsys, content, message):
    ckpt = threshold_checkpoint(tmp_path / "model.pt")
    write_cases(tmp_path / "data", 1)
    rules = tmp_path / "rules.json"
    if content is not None:
        rules.write_text(content)
    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", tmp_path / "out",
                     "--postprocessing", rules]) == 2
    line = one_error_line(capsys)
    assert str(rules) in line and message in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))
