"""infer.py and engine/predict.py end to end on tiny BraTS-format cases written here.

Most tests use ``ThresholdNet``, a hand-made "network" whose class at each voxel is a fixed function
of the z-scored first modality there, so the expected mask of any input is known exactly: that
checks the orientation, the crop and paste-back, the label convention and the metrics. A tiny real
U-Net checks the checkpoint round trip, ensembling and the error exits.
"""
import json
import math
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import infer
from datasets.io import Case
from datasets.labels import classes_to_labels
from datasets.preprocess import brain_mask, zscore_in_mask
from engine.checkpoint import save_checkpoint
from engine.config import Config, InferConfig, to_dict
from engine.errors import UserError, run_cli
from engine.predict import load_models, override_infer_config, predict_case

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (22, 19, 14)
EDGES = (0.0, 0.6, 1.2)  # z-score thresholds of ThresholdNet
# number of edges exceeded -> training class: 0 bg, 1 ED, 2 NCR, 3 ET
COUNT_TO_CLASS = np.array([0, 2, 1, 3], dtype=np.uint8)
NAMES = {"2021": ("t1", "t1ce", "t2", "flair"), "2023": ("t1n", "t1c", "t2w", "t2f")}


class ThresholdNet(nn.Module):
    """Pointwise: labels mode one-hot logits of ``COUNT_TO_CLASS[#edges below x0]``; regions mode
    WT/TC/ET = x0 > edge 0/1/2. Both give the same classes."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.edges = nn.Parameter(torch.tensor(EDGES))

    def forward(self, x):
        v = x[:, :1]
        above = torch.cat([(v > e).float() for e in self.edges], dim=1)  # (B, 3, ...)
        if self.out_channels == 3:
            return 20.0 * (above - 0.5)
        classes = torch.from_numpy(COUNT_TO_CLASS).to(x.device)[above.sum(1).long()]
        return 20.0 * nn.functional.one_hot(classes.long(), 4).permute(0, 4, 1, 2, 3).float()


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
        labels = classes_to_labels(expected_classes(images), seg_convention)
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


def threshold_checkpoint(path: Path, convention: str = "2021", mode: str = "labels") -> Path:
    model = ThresholdNet(4 if mode == "labels" else 3)
    return save_checkpoint({"config": to_dict(tiny_config(mode)), "convention": convention,
                            "model": model.state_dict()}, path)


def unet_checkpoint(path: Path, convention: str = "2021", seed: int = 0, mode: str = "labels") -> Path:
    from models import build_model
    cfg = tiny_config(mode)
    torch.manual_seed(seed)
    model = build_model(cfg.model, 4, 4 if mode == "labels" else 3, cfg.data.patch_size)
    return save_checkpoint({"config": to_dict(cfg), "convention": convention, "model": model.state_dict()}, path)


@pytest.fixture
def threshold_net(monkeypatch):
    """Make checkpoints rebuild ``ThresholdNet`` instead of the configured network."""
    monkeypatch.setattr("engine.predict.build_model",
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
    expected = classes_to_labels(expected_classes(images), convention)
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
    assert "1 written, 0 skipped, 0 failed" in stdout and "Dice" in stdout


@pytest.mark.parametrize("naming, checkpoint_convention, override, expected_et", [
    ("2023", "2021", None, 3),                       # auto: the input's naming wins
    ("2021", "2023", None, 4),
    ("2023", "2021", "infer.output_convention=2021", 4),
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

    width, height, pixels = read_png(out / f"{cid}.png")
    zoom = infer.PNG_MIN_SIZE // max(SHAPE)
    assert height == zoom * 2 * max(SHAPE[1], SHAPE[2])  # rows: prediction, reference
    assert width == zoom * (SHAPE[0] + 2 + SHAPE[0] + 2 + SHAPE[1] + 2)  # axial (x, y), coronal (x, z), sagittal (y, z)
    assert pixels.reshape(height, width, 3).max() > 0


def read_png(path: Path) -> tuple[int, int, np.ndarray]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + 3 * width)
    assert (raw[:, 0] == 0).all()
    return width, height, raw[:, 1:]


def test_encode_png_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(infer.encode_png(rgb))
    width, height, pixels = read_png(path)
    assert (width, height) == (7, 5)
    np.testing.assert_array_equal(pixels.reshape(5, 7, 3), rgb)
    with pytest.raises(ValueError):
        infer.encode_png(rgb.astype(np.float32))


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
    assert "exists, skipped" in stdout and "0 written, 1 skipped" in stdout
    assert target.stat().st_mtime_ns == stamp
    assert json.loads((out / "metrics.json").read_text())["cases"][cid]["ET"]["dice"] == 1.0

    assert run_main(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out, "--overwrite"]) == 0
    assert "1 written, 0 skipped" in capsys.readouterr().out
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
    assert "2 written, 0 skipped, 1 failed" in captured.out
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
    assert "4 written, 0 skipped, 1 failed" in captured.out
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
    (b"garbage bytes", "cannot read checkpoint"),
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
# engine.predict: ensembles, overrides, checkpoints that disagree
# ----------------------------------------------------------------------------------------------
def test_ensemble_of_two_copies_equals_one(tmp_path):
    ckpt = unet_checkpoint(tmp_path / "a.pt")
    single, cfg, convention, mode = load_models([ckpt])
    pair, *_ = load_models([ckpt, ckpt])
    images = np.random.default_rng(0).normal(size=(4, 18, 16, 17)).astype(np.float32)
    one = predict_case(single, images, cfg.infer, cfg.data.patch_size, mode, "cpu")
    two = predict_case(pair, images, cfg.infer, cfg.data.patch_size, mode, "cpu")
    assert one.shape == (4, 18, 16, 17) and (convention, mode) == ("2021", "labels")
    torch.testing.assert_close(two, one)
    other, *_ = load_models([unet_checkpoint(tmp_path / "b.pt", seed=1)])
    three = predict_case(single + other, images, cfg.infer, cfg.data.patch_size, mode, "cpu")
    b = predict_case(other, images, cfg.infer, cfg.data.patch_size, mode, "cpu")
    torch.testing.assert_close(three, (one + b) / 2)


def test_predict_case_restores_training_mode():
    model = ThresholdNet(4).train()
    probs = predict_case([model], torch.zeros(1, 8, 8, 8), InferConfig(), (8, 8, 8), "labels", "cpu")
    assert model.training and probs.shape == (4, 8, 8, 8)


@pytest.mark.parametrize("second, message", [
    (dict(convention="2023"), "label convention"),
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
    path = save_checkpoint({"config": to_dict(cfg), "convention": "2021", "model": {"w": torch.zeros(1)}},
                           tmp_path / "x.pt")
    with pytest.raises(UserError, match="weights do not fit"):
        load_models([path])


def test_override_infer_config():
    cfg = tiny_config()
    new = override_infer_config(cfg, ["infer.tta=true", "infer.min_component_size=[5, 5, 5]",
                                      "metrics.convention=lesionwise"])
    assert new.infer.tta and new.infer.min_component_size == [5, 5, 5] and new.metrics.convention == "lesionwise"
    assert not cfg.infer.tta  # a copy
    for bad, key in [("data.patch_size=[8,8,8]", "data.patch_size"), ("model.name=swin_unetr", "model.name"),
                     ("infer.overlapp=0.3", "infer.overlapp"), ("infer.overlap=1.0", "infer.overlap"),
                     ("infer.sw_batch_size=0", "infer.sw_batch_size")]:
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            override_infer_config(cfg, [bad])


def test_resolve_device():
    from engine.predict import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="infer.device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:0")
