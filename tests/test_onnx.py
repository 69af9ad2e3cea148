"""ONNX deployment: export.py, the metadata contract, infer.py with ONNX Runtime, infer.backend.

Tiny networks (a 2-stage U-Net, a 2-stage Swin UNETR whose shifted and padded windows need attention
masks) are exported once per module; each test checks one promise of the issue: reload, agreement
with PyTorch (probabilities and masks) on a case with an oblique affine, the written geometry, the
metadata round trip, ensembles, the automatic backend, and one-line exit-2 errors for bad input.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")  # CI installs requirements-test.txt (onnx, onnxruntime, onnxscript)
ort = pytest.importorskip("onnxruntime")

import export  # noqa: E402
import infer  # noqa: E402
from core.checkpoint import save_checkpoint  # noqa: E402
from core.config import Config, to_dict  # noqa: E402
from core.errors import UserError, run_cli  # noqa: E402
from core.task import builtin_tasks, logits_to_probabilities  # noqa: E402
from datasets.io import Case, read_case  # noqa: E402
from datasets.preprocess import preprocess_case  # noqa: E402
from inference import onnx_model  # noqa: E402
from inference.onnx_export import VERIFY_TOLERANCE, export_network  # noqa: E402
from inference.onnx_model import FORMAT, OnnxModel, load_onnx_model, spec_from_metadata, spec_metadata  # noqa: E402
from inference.predict import ModelSpec, auto_backend, choose_backend, load_model, load_models, predict_case  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one torch thread (conftest)

ROOT = Path(__file__).resolve().parents[1]
TASKS = builtin_tasks()
SHAPE = (30, 26, 20)
MODALITIES = ["t1", "t1ce", "t2", "flair"]


def tiny_config(name: str) -> Config:
    cfg = Config()
    cfg.model.name = name
    cfg.model.unet3d.features, cfg.model.unet3d.strides, cfg.model.unet3d.blocks_per_stage = [4, 8], [1, 2], [1, 1]
    swin = cfg.model.swin_unetr  # maps 8^3 and 4^3 of a 16^3 window: window 3 is shifted and padded (masks)
    swin.feature_size, swin.depths, swin.num_heads, swin.window_size = 12, [2, 2], [2, 4], 3
    cfg.data.patch_size = [16, 16, 16]
    cfg.infer.device, cfg.infer.sw_batch_size, cfg.infer.backend = "cpu", 2, "torch"
    return cfg


def write_checkpoint(path: Path, name: str = "unet3d", mode: str = "labels", task: str = "brats-gli-2021",
                     seed: int = 0, spacing=None, postprocessing=None) -> Path:
    from models import build_model
    cfg = tiny_config(name)
    cfg.loss.name = "dice_ce" if mode == "labels" else "region_dice_bce"
    torch.manual_seed(seed)
    model = build_model(cfg.model, 4, TASKS[task].output_channels(mode), cfg.data.patch_size)
    state = {"config": to_dict(cfg), "task": TASKS[task].to_dict(), "output_mode": mode, "modalities": MODALITIES,
             "model": model.state_dict()}
    if spacing is not None:
        state["spacing"] = list(spacing)
    if postprocessing is not None:
        state["postprocessing"] = postprocessing
    return save_checkpoint(state, path)


def run_export(argv) -> int:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(export.main, [str(a) for a in argv])
    return exit_info.value.code


def run_infer(argv) -> int:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(infer.main, [str(a) for a in argv])
    return exit_info.value.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def oblique_affine() -> np.ndarray:
    a = math.radians(25)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.0, 1.2, 1.5])
    affine[:3, 3] = [4, -3, 7]
    return affine


def write_case(root: Path, case_id: str = "BraTS2021_00001", seed: int = 0) -> Path:
    """A BraTS-2021-named case with an off-centre ellipsoid 'brain' and an oblique affine."""
    rng = np.random.default_rng(seed)
    folder = root / case_id
    folder.mkdir(parents=True)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    brain = sum((g / r) ** 2 for g, r in zip(grid, (0.8, 0.7, 0.9))) <= 1
    brain[:4] = False
    affine = oblique_affine()
    for c, name in enumerate(MODALITIES):
        smooth = rng.normal(size=SHAPE).cumsum(0).cumsum(1) * 3  # structure, so the network's outputs vary
        image = np.where(brain, np.round(300 + 50 * c + smooth + rng.normal(0, 30, SHAPE)), 0).astype(np.int16)
        img = nib.Nifti1Image(image, affine)
        img.header.set_sform(affine, 1)
        img.header.set_qform(affine, 1)
        nib.save(img, str(folder / f"{case_id}_{name}.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{name: (checkpoint.pt, model.onnx)}``: the tiny U-Net (labels, with a spacing and tuned
    post-processing) and the tiny Swin UNETR (regions), exported by export.py once."""
    folder = tmp_path_factory.mktemp("exported")
    out = {}
    rules = {"rules": {"min_component_size": [3, 0, 0]}, "source": "tuned on 4 validation cases"}
    for name, mode in (("unet3d", "labels"), ("swin_unetr", "regions")):
        extra = dict(spacing=(1.0, 1.0, 1.5), postprocessing=rules) if name == "unet3d" else {}
        ckpt = write_checkpoint(folder / f"{name}.pt", name, mode, **extra)
        with pytest.raises(SystemExit) as exit_info:
            run_cli(export.main, ["--checkpoint", str(ckpt), "-o", str(folder / f"{name}.onnx")])
        assert exit_info.value.code == 0
        out[name] = (ckpt, folder / f"{name}.onnx")
    return out


# ----------------------------------------------------------------------------------------------
# Export and reload
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unet3d", "swin_unetr"])
def test_export_and_reload(exported, name):
    ckpt, path = exported[name]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 18
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # the batch dimension is dynamic
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == [4, 16, 16, 16]

    torch_model, torch_spec = load_model(ckpt)
    model, spec = load_model(path)
    assert isinstance(model, OnnxModel) and not model.training and model.providers == ["CPUExecutionProvider"]
    assert (spec.mode, spec.modalities, spec.spacing, spec.task) == (torch_spec.mode, torch_spec.modalities,
                                                                     torch_spec.spacing, torch_spec.task)
    assert to_dict(spec.cfg) == to_dict(torch_spec.cfg) and spec.postprocessing == torch_spec.postprocessing
    for batch_size in (1, 3):  # windows and flips are batched
        x = torch.randn(batch_size, 4, 16, 16, 16, generator=torch.Generator().manual_seed(batch_size))
        with torch.inference_mode():
            expected = torch_model(x)
        got = model(x)
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_export_prints_the_check_and_writes_one_file_per_ensemble_member(tmp_path, capsys):
    a = write_checkpoint(tmp_path / "a.pt", seed=0)
    b = write_checkpoint(tmp_path / "b.pt", seed=1)
    assert run_export(["--checkpoint", a, "--checkpoint", b, "-o", tmp_path / "out" / "folds.onnx",
                       "--window", 16, 16, 24]) == 0
    stdout = capsys.readouterr().out
    assert "window [16, 16, 24], batch dynamic, opset 20" in stdout and "max |probability difference|" in stdout
    assert f"--checkpoint {tmp_path / 'out' / 'folds-1.onnx'} --checkpoint {tmp_path / 'out' / 'folds-2.onnx'}" \
        in stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["folds-1.onnx", "folds-2.onnx"]  # atomic
    onnx_models, spec = load_models([tmp_path / "out" / "folds-1.onnx", tmp_path / "out" / "folds-2.onnx"])
    torch_models, _ = load_models([a, b])
    assert spec.cfg.data.patch_size == [16, 16, 24]  # infer.py slides the window the graph takes
    sources = [json.loads(m.metadata["brats_seg.source"])["checkpoint"] for m in onnx_models]
    assert sources == ["a.pt", "b.pt"]
    image = torch.randn(4, 20, 18, 30, generator=torch.Generator().manual_seed(0))
    args = (spec.cfg.infer, spec.cfg.data.patch_size, spec.mode, "cpu")
    torch.testing.assert_close(predict_case(onnx_models, image, *args), predict_case(torch_models, image, *args),
                               atol=1e-4, rtol=0)


def test_export_refuses_a_graph_that_does_not_reproduce_the_network(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "a.pt")
    model, spec = load_model(ckpt)
    monkeypatch.setattr(OnnxModel, "forward", lambda self, x: torch.zeros(x.shape[0], 4, *x.shape[2:]))
    with pytest.raises(UserError, match=f"does not reproduce the network.*tolerance {VERIFY_TOLERANCE:g}"):
        export_network(model, spec, where=str(ckpt))


def test_instance_norm_keeps_its_precision_over_a_large_window():
    """ONNX Runtime's InstanceNormalization sums a whole window in one float32 running sum (error
    7.6e-5 here, compounding through a U-Net's norms); the export takes the means axis by axis."""
    norm = torch.nn.InstanceNorm3d(4, affine=True).eval()
    cfg = tiny_config("unet3d")
    cfg.data.patch_size = [96, 96, 96]
    data, _ = export_network(norm, ModelSpec(cfg, TASKS["brats-gli-2021"], "labels", tuple(MODALITIES)),
                             verify=False)
    x = torch.randn(1, 4, 96, 96, 96, generator=torch.Generator().manual_seed(0))
    x += torch.tensor([0.0, 5.0, 20.0, 50.0]).view(1, 4, 1, 1, 1)  # means far from 0: where a running sum loses
    with torch.no_grad():
        reference = norm.double()(x.double())
    assert float((OnnxModel(data)(x).double() - reference).abs().max()) < 1e-5


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{ckpt}", "-o", "{tmp}/model.pt"], "must end in .onnx"),
    (["--checkpoint", "{tmp}/model.onnx", "-o", "{tmp}/again.onnx"], "already an ONNX model"),
    (["--checkpoint", "{ckpt}", "-o", "{tmp}/m.onnx", "--window", 16, 16, 15], "window [16, 16, 15]"),
    (["--checkpoint", "{tmp}/missing.pt", "-o", "{tmp}/m.onnx"], "checkpoint not found"),
])
def test_export_errors_exit_2(tmp_path, capsys, argv, message):
    ckpt = write_checkpoint(tmp_path / "a.pt")
    argv = [str(a).format(ckpt=ckpt, tmp=tmp_path) for a in argv]
    assert run_export(argv) == 2
    assert message in one_error_line(capsys)
    assert not list(tmp_path.glob("*.onnx"))


# ----------------------------------------------------------------------------------------------
# The metadata contract
# ----------------------------------------------------------------------------------------------
def test_metadata_round_trip():
    cfg = tiny_config("unet3d")
    cfg.data.patch_size = [32, 32, 32]
    cfg.infer.region_threshold = 0.4
    task = TASKS["brats-gli-2024"]
    rules = {"rules": {"et_min_volume": 20.0}, "source": "tuned"}
    spec = ModelSpec(cfg, task, "regions", ("t1", "t1ce", "t2", "flair"), (1.0, 1.0, 2.5), rules)
    meta = spec_metadata(spec, [16, 24, 32], {"model": {"name": "unet3d"}})
    assert meta["brats_seg.format"] == FORMAT
    assert all(isinstance(v, str) for v in meta.values())
    decoding = json.loads(meta["brats_seg.decoding"])
    assert decoding["channels"] == ["WT", "TC", "ET", "RC"] and decoding["threshold"] == 0.4
    assert decoding["labels"] == {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4}
    assert json.loads(meta["brats_seg.normalisation"])["scheme"] == onnx_model.NORMALISATION["scheme"]
    back = spec_from_metadata(meta, "m.onnx")
    assert back.cfg.data.patch_size == [16, 24, 32]  # the window replaces the training patch size
    back.cfg.data.patch_size = [32, 32, 32]
    assert to_dict(back.cfg) == to_dict(cfg)
    assert (back.task, back.mode, back.modalities, back.spacing, back.postprocessing) == (
        task, "regions", ("t1", "t1ce", "t2", "flair"), (1.0, 1.0, 2.5), rules)
    labels = json.loads(spec_metadata(ModelSpec(cfg, task, "labels", ("t1",)), [16] * 3)["brats_seg.decoding"])
    assert labels["activation"].startswith("softmax") and labels["channels"][0] == "background"
    assert spec_from_metadata(spec_metadata(ModelSpec(cfg, task, "labels", ("t1",)), [16] * 3), "m").spacing is None


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("brats_seg.format"), "ONNX model without brats-seg metadata (missing 'brats_seg.format')"),
    (lambda m: m.update({"brats_seg.format": "brats-seg-onnx/2"}),
     "exported in format brats-seg-onnx/2, newer than this version of brats-seg reads (brats-seg-onnx/1)"),
    (lambda m: m.update({"brats_seg.format": "other/1"}), "not brats-seg-onnx/<version>"),
    (lambda m: m.pop("brats_seg.task"), "brats-seg metadata is missing 'brats_seg.task'"),
    (lambda m: m.update({"brats_seg.window": "[16, 16]"}), "'brats_seg.window' must be 3 positive integers"),
    (lambda m: m.update({"brats_seg.spacing": "{"}), "'brats_seg.spacing' is not valid JSON"),
    (lambda m: m.update({"brats_seg.output_mode": '"logits"'}), "'brats_seg.output_mode' must be one of"),
    (lambda m: m.update({"brats_seg.normalisation": '{"scheme": "minmax"}'}), "must have scheme"),
])
def test_bad_metadata_is_one_line_naming_it(change, message):
    cfg = tiny_config("unet3d")
    meta = spec_metadata(ModelSpec(cfg, TASKS["brats-gli-2021"], "labels", tuple(MODALITIES)), [16] * 3)
    change(meta)
    with pytest.raises(UserError, match="^m.onnx: ") as err:
        spec_from_metadata(meta, "m.onnx")
    assert message in str(err.value) and "\n" not in str(err.value)


def rewrite_metadata(source: Path, target: Path, change) -> Path:
    proto = onnx.load(str(source))
    meta = {p.key: p.value for p in proto.metadata_props}
    change(meta)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(target))
    return target


def foreign_onnx(path: Path) -> Path:
    """A valid ONNX model that is not ours (an Identity graph, no metadata)."""
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 16, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 16, 16, 16])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize("kind, message", [
    ("foreign", "ONNX model without brats-seg metadata (missing 'brats_seg.format')"),
    ("newer", "newer than this version of brats-seg reads"),
    ("no_modalities", "brats-seg metadata is missing 'brats_seg.modalities'"),
    ("garbage", "not a usable ONNX model"),
    ("missing", "checkpoint not found"),
    ("shape", "the graph's input shape"),
])
def test_bad_onnx_file_exits_2(tmp_path, capsys, exported, kind, message):
    _, good = exported["unet3d"]
    path = tmp_path / "model.onnx"
    if kind == "foreign":
        foreign_onnx(path)
    elif kind == "newer":
        rewrite_metadata(good, path, lambda m: m.update({"brats_seg.format": "brats-seg-onnx/7"}))
    elif kind == "no_modalities":
        rewrite_metadata(good, path, lambda m: m.pop("brats_seg.modalities"))
    elif kind == "garbage":
        path.write_bytes(b"not a protobuf at all")
    elif kind == "shape":
        rewrite_metadata(good, path, lambda m: m.update({"brats_seg.window": "[32, 32, 32]"}))
    write_case(tmp_path / "data")
    assert run_infer(["--checkpoint", path, "-i", tmp_path / "data", "-o", tmp_path / "out"]) == 2
    line = one_error_line(capsys)
    assert str(path) in line and message in line
    assert not (tmp_path / "out").exists()


def test_onnxruntime_missing_exits_2_with_the_install_command(tmp_path, capsys, monkeypatch, exported):
    _, path = exported["unet3d"]
    write_case(tmp_path / "data")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert run_infer(["--checkpoint", path, "-i", tmp_path / "data", "-o", tmp_path / "out"]) == 2
    line = one_error_line(capsys)
    assert "onnxruntime, which is not installed" in line and "pip install onnxruntime" in line


# ----------------------------------------------------------------------------------------------
# infer.py on the ONNX model: agreement with PyTorch, geometry
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unet3d", "swin_unetr"])
def test_onnxruntime_agrees_with_pytorch_on_an_oblique_case(tmp_path, exported, name):
    ckpt, path = exported[name]
    folder = write_case(tmp_path / "data")
    torch_models, spec = load_models([ckpt])
    onnx_models, onnx_spec = load_models([path])
    case = Case("BraTS2021_00001", folder, {m: folder / f"BraTS2021_00001_{m}.nii.gz" for m in MODALITIES})
    images, _, geometry = read_case(case, spec.task, spec.modalities, with_label=False)
    crop, _, geometry = preprocess_case(images, None, geometry, spec.task, spec.spacing)
    infer_cfg = spec.cfg.infer
    infer_cfg.tta = True
    probs = {}
    for key, models in (("torch", torch_models), ("onnx", onnx_models)):
        probs[key] = predict_case(models, crop, infer_cfg, onnx_spec.cfg.data.patch_size, spec.mode, "cpu")
    assert float((probs["torch"] - probs["onnx"]).abs().max()) <= 1e-3  # the bound (here ~1e-6)
    masks = {k: spec.task.decode(p, spec.mode, infer_cfg.region_threshold) for k, p in probs.items()}
    assert float((masks["torch"] == masks["onnx"]).float().mean()) >= 0.999
    assert len(torch.unique(masks["torch"])) > 1  # not a trivial (all-background) comparison

    # infer.py end to end: same masks (to 99.9%), written with the input's grid, affine and header
    outputs = {}
    for key, checkpoint in (("torch", ckpt), ("onnx", path)):
        out = tmp_path / f"out_{key}"
        assert run_infer(["--checkpoint", checkpoint, "-i", tmp_path / "data", "-o", out, "infer.tta=true"]) == 0
        outputs[key] = nib.load(str(out / "BraTS2021_00001.nii.gz"))
    source = nib.load(str(folder / "BraTS2021_00001_flair.nii.gz"))
    for written in outputs.values():
        assert written.shape == source.shape and written.get_data_dtype() == np.uint8
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
        assert int(written.header["sform_code"]) == int(source.header["sform_code"])
        np.testing.assert_allclose(written.header.get_zooms(), source.header.get_zooms())
    a, b = (np.asarray(o.dataobj) for o in outputs.values())
    assert (a == b).mean() >= 0.999


def test_onnx_path_imports_no_training_code(tmp_path, exported):
    """infer.py with an .onnx model: no models/, losses/, train code, no onnx package (only onnxruntime)."""
    _, path = exported["unet3d"]
    write_case(tmp_path / "data")
    script = (
        "import sys, contextlib, io\n"
        "import infer\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = infer.main(['--checkpoint', {str(path)!r}, '-i', {str(tmp_path / 'data')!r}, "
        f"'-o', {str(tmp_path / 'out')!r}])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('models', 'losses', 'train', 'tensorboard', 'onnx', 'onnxscript'))\n"
        "print(code, loaded, 'onnxruntime' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 [] True"


# ----------------------------------------------------------------------------------------------
# infer.backend: a .pt network in ONNX Runtime
# ----------------------------------------------------------------------------------------------
def test_choose_backend(tmp_path, exported, monkeypatch, capsys):
    ckpt = write_checkpoint(tmp_path / "a.pt", spacing=(1.0, 1.0, 1.5))  # the exported U-Net's
    _, onnx_path = exported["unet3d"]
    models, spec = load_models([ckpt, onnx_path])  # a .pt and an .onnx member
    cpu = torch.device("cpu")
    assert choose_backend(models, [ckpt, onnx_path], spec, "torch", cpu) == models
    chosen = choose_backend(models, [ckpt, onnx_path], spec, "onnxruntime", cpu)
    assert isinstance(chosen[0], OnnxModel) and chosen[1] is models[1]
    assert f"{ckpt}: the network (0.0 M parameters) runs in ONNX Runtime (CPUExecutionProvider; " \
           "infer.backend=onnxruntime; exported in memory" in capsys.readouterr().out
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(chosen[0](x), models[0](x), atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob("*.onnx"))  # exported in memory

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # the exporter is missing
    with pytest.raises(UserError, match="pip install onnx onnxscript"):
        choose_backend(models, [ckpt], spec, "onnxruntime", cpu)


@pytest.mark.parametrize("device, paths, passes, installed, expected", [
    ("cpu", ["a.pt"], 8, True, "onnxruntime"),      # 8 cases, or 1 case with 8-flip TTA
    ("cpu", ["a.pt"], 7, True, "torch"),            # the export would cost more than it saves
    ("cpu", ["a.pt"], 800, False, "torch"),         # no exporter installed: PyTorch, no error
    ("cuda", ["a.pt"], 800, True, "torch"),         # measured on the CPU only
    ("cpu", ["a.onnx", "b.onnx"], 800, True, "torch"),  # nothing to export
])
def test_auto_backend(monkeypatch, device, paths, passes, installed, expected):
    import inference.onnx_export as onnx_export
    monkeypatch.setattr(onnx_export, "exporter_available", lambda: installed)
    backend, why = auto_backend(paths, torch.device(device), passes)
    assert backend == expected and why


def test_auto_backend_stays_in_pytorch_when_the_export_fails(tmp_path, monkeypatch, capsys):
    ckpt = write_checkpoint(tmp_path / "a.pt")
    models, spec = load_models([ckpt])
    cpu = torch.device("cpu")
    chosen = choose_backend(models, [ckpt], spec, "auto", cpu, passes=8)
    assert isinstance(chosen[0], OnnxModel)
    assert "infer.backend=auto: 8 network passes over cases on the CPU; exported in memory" in capsys.readouterr().out
    assert choose_backend(models, [ckpt], spec, "auto", cpu, passes=1) == models

    import inference.onnx_export as onnx_export

    def cannot_export(*args, **kwargs):
        raise UserError(f"{ckpt}: unet3d cannot be exported to ONNX (an unsupported operator)")

    monkeypatch.setattr(onnx_export, "export_network", cannot_export)
    assert choose_backend(models, [ckpt], spec, "auto", cpu, passes=8) == models
    assert f"{ckpt}: stays in PyTorch (infer.backend=auto" in capsys.readouterr().out


def test_infer_backend_onnxruntime_runs_a_checkpoint_in_onnxruntime(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "a.pt")
    write_case(tmp_path / "data")
    masks = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        assert run_infer(["--checkpoint", ckpt, "-i", tmp_path / "data", "-o", out, f"infer.backend={backend}"]) == 0
        masks[backend] = np.asarray(nib.load(str(out / "BraTS2021_00001.nii.gz")).dataobj)
        stdout = capsys.readouterr().out
        assert ("runs in ONNX Runtime (CPUExecutionProvider; infer.backend=onnxruntime" in stdout) == (
            backend == "onnxruntime")
    assert (masks["torch"] == masks["onnxruntime"]).mean() >= 0.999


def test_onnx_model_to_and_dtype(exported):
    model, _ = load_onnx_model(exported["unet3d"][1])
    assert model.to("cpu") is model and model.to(torch.device("cpu"), torch.float32) is model
    with pytest.raises(TypeError, match="float32"):
        model.to(torch.float64)
    probs = logits_to_probabilities(model(torch.zeros(1, 4, 16, 16, 16, dtype=torch.float64)), "labels")
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(1), torch.ones(1))
