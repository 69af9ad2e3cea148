"""train.py end to end on tiny synthetic data (CPU): outputs, TensorBoard, exact resume, time
limit, non-finite loss, atomic checkpoints, 2-process DDP (gloo) and bad inputs."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import train
from cli_capture import run_cli_captured
from core.checkpoint import load_checkpoint
from core.optim import lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one torch thread (conftest)

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, ITERS, LR = 2, 3, 0.01


def tiny_config(tmp: Path) -> dict:
    return {
        "data": {"root": str(tmp / "data"), "cache_dir": str(tmp / "cache"), "patch_size": [16, 16, 16],
                 "batch_size": 2, "num_workers": 0, "folds": 3, "cache_workers": 1,
                 "synthetic_cases": 5, "synthetic_shape": [32, 32, 24]},
        "model": {"name": "unet3d", "unet3d": {"features": [4, 8, 16], "strides": [1, 2, 2],
                                              "blocks_per_stage": [1, 1, 1], "deep_supervision": True}},
        "train": {"epochs": EPOCHS, "iters_per_epoch": ITERS, "lr": LR, "precision": "fp32", "device": "cpu",
                  "log_every": 1, "val_every": 1, "warmup_epochs": 0},
        "infer": {"sw_batch_size": 2},
    }


def run(argv: list[str]) -> tuple[int, str, str]:
    """``python train.py ARGV`` in this process: (exit code, stdout, stderr)."""
    return run_cli_captured(train.main, argv)


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    """A config file and the output of an uninterrupted 2-epoch run (which generates the data)."""
    tmp = tmp_path_factory.mktemp("train")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp)))
    code, out, err = run(["-c", str(config), f"out_dir={tmp / 'run_a'}"])
    assert code == 0, err
    return {"tmp": tmp, "config": config, "run_a": tmp / "run_a", "stdout": out}


def args(base, out_dir, *overrides):
    return ["-c", str(base["config"]), f"out_dir={out_dir}", *overrides]


def test_end_to_end_outputs(base):
    run_a, out = base["run_a"], base["stdout"]
    assert "generating 5 synthetic cases of task brats-gli-2021, shape 32x32x24" in out
    assert "effective batch 2" in out
    assert f"epoch 1/{EPOCHS} [{ITERS}/{ITERS}] loss" in out  # progress as plain lines off a terminal
    assert "final validation Dice: WT" in out and "; post-processed: WT" in out and "(best post-processed mean" in out
    assert f"python infer.py --checkpoint {run_a / 'best.pt'} -i " in out  # the next step, on the validation cases:
    assert f"--cases {run_a / 'split.json'}:val" in out
    for name in ("config.yaml", "split.json", "last.pt", "best.pt", "metrics.jsonl"):
        assert (run_a / name).is_file(), name
    assert yaml.safe_load((run_a / "config.yaml").read_text())["train"]["epochs"] == EPOCHS
    split = json.loads((run_a / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 5 and not set(split["train"]) & set(split["val"])

    lines = [json.loads(line) for line in (run_a / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert [r["iteration"] for r in lines] == [ITERS, 2 * ITERS]
    assert all(0.0 <= r["val"][region]["dice"] <= 1.0 for r in lines for region in ("WT", "TC", "ET"))

    state = load_checkpoint(run_a / "last.pt")
    assert state["epoch"] == EPOCHS and state["iteration"] == EPOCHS * ITERS and state["epoch_iteration"] == 0
    assert state["task"]["name"] == "brats-gli-2021" and state["modalities"] == ["t1", "t1ce", "t2", "flair"]
    assert state["output_mode"] == "labels"
    assert state["config"]["train"]["epochs"] == EPOCHS
    assert {"optimizer", "scheduler", "scaler", "rng", "best"} <= set(state)
    best = load_checkpoint(run_a / "best.pt")
    tuned = [r["postprocessing"] for r in lines]  # tuned at every validation (train.tune_postprocessing)
    assert all(t["mean_dice"] >= r["mean_dice"] for t, r in zip(tuned, lines))  # never worse than none
    assert best["best"]["dice"] == max(t["mean_dice"] for t in tuned)  # best.pt: the post-processed score
    assert best["postprocessing"]["rules"] == tuned[best["best"]["epoch"] - 1]["rules"]
    assert json.loads((run_a / "postprocessing.json").read_text()) == best["postprocessing"]
    assert state["postprocessing"]["rules"] == tuned[-1]["rules"] and "tuned on" in state["postprocessing"]["source"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_a))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/patches_per_s", "val/dice_WT", "val/dice_TC", "val/dice_ET",
            "val/dice_mean", "val/dice_mean_postprocessed", "val/dice_ET_postprocessed"} <= scalars
    assert "val/panel" in events.Tags()["images"]
    panel = events.Images("val/panel")[-1]  # the picture of the first validation case (inference/render.py)
    import numpy as np
    from PIL import Image

    from core.task import builtin_tasks
    pixels = np.asarray(Image.open(io.BytesIO(panel.encoded_image_string)).convert("RGB"))
    size = max(tiny_config(base["tmp"])["data"]["synthetic_shape"])  # the cases are cropped smaller
    assert panel.height >= 2 * size and panel.width >= 3 * size  # two rows, three views, not shrunk
    legend = pixels[-40:].reshape(-1, 3)
    for rgb in builtin_tasks()["brats-gli-2021"].colours[1:]:  # the legend: NCR, ED, ET swatches
        assert (legend == rgb).all(axis=1).sum() >= 50, rgb
    assert "val/legend/text_summary" in events.Tags()["tensors"]  # the colour legend of the panels
    lrs = {e.step: e.value for e in events.Scalars("train/lr")}
    assert sorted(lrs) == list(range(1, EPOCHS * ITERS + 1))  # log_every = 1
    for step, value in lrs.items():  # the LR of iteration i (0-based) is logged at step i + 1
        assert value == pytest.approx(LR * lr_factor(step - 1, EPOCHS * ITERS, 0, "poly"), rel=1e-6)


def test_time_limit_then_resume_matches_uninterrupted_run(base):
    run_b = base["tmp"] / "run_b"
    # a tiny time limit stops after the first iteration: validate, save, exit 0
    code, out, err = run(args(base, run_b, "train.time_limit=1e-9"))
    assert code == 0, err
    assert "time_limit" in out and "--resume" in out
    stopped = load_checkpoint(run_b / "last.pt")
    assert (stopped["epoch"], stopped["epoch_iteration"], stopped["iteration"]) == (0, 1, 1)
    assert len((run_b / "metrics.jsonl").read_text().splitlines()) == 1

    # resume (checkpoint config + override): continues mid-epoch to the end
    code, out, err = run(["--resume", str(run_b / "last.pt"), "train.time_limit=0"])
    assert code == 0, err
    assert "resumed at epoch 1, iteration 1" in out
    a, b = load_checkpoint(base["run_a"] / "last.pt"), load_checkpoint(run_b / "last.pt")
    assert (b["epoch"], b["iteration"]) == (a["epoch"], a["iteration"])
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], rtol=1e-5, atol=1e-6), name
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(b["optimizer"]["param_groups"][0]["lr"])
    epochs = [json.loads(line)["epoch"] for line in (run_b / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_resume_extends_finished_run(base):
    run_c = base["tmp"] / "run_c"
    shutil.copytree(base["run_a"], run_c)
    code, out, _ = run(["--resume", str(run_c / "last.pt")])  # nothing left to do
    assert code == 0 and "nothing to do" in out
    code, out, err = run(["--resume", str(run_c / "last.pt"), "train.epochs=3"])
    assert code == 0, err
    state = load_checkpoint(run_c / "last.pt")
    assert (state["epoch"], state["iteration"]) == (3, 3 * ITERS)
    assert state["config"]["train"]["epochs"] == 3
    lines = [json.loads(line) for line in (run_c / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    # the schedule continues from iteration 6 of the new 9-iteration schedule (no restart)
    first_new = 2 * ITERS
    assert lines[-1]["lr"] == pytest.approx(LR * lr_factor(3 * ITERS - 1, 3 * ITERS, 0, "poly"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_c))
    events.Reload()
    lrs = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lrs[first_new + 1] == pytest.approx(LR * lr_factor(first_new, 3 * ITERS, 0, "poly"), rel=1e-6)


def test_interrupted_checkpoint_write_keeps_old_file(base, monkeypatch):
    run_d = base["tmp"] / "run_d"
    shutil.copytree(base["run_a"], run_d)
    before = (run_d / "last.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save({"partial": torch.zeros(10)}, f)  # half a file reaches the disk, then the write dies
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        train.main(["--resume", str(run_d / "last.pt"), "train.epochs=3"])
    assert (run_d / "last.pt").read_bytes() == before
    assert not [p.name for p in run_d.iterdir() if p.name.endswith(".tmp")]


class NaNAfter(torch.nn.Module):
    """A loss that returns NaN from its ``n``-th call on (the n-th training iteration)."""

    def __init__(self, loss, n):
        super().__init__()
        self.loss, self.n, self.calls = loss, n, 0

    def forward(self, outputs, target):
        self.calls += 1
        value = self.loss(outputs, target)
        return value * float("nan") if self.calls >= self.n else value


def test_nonfinite_loss_stops_without_saving_that_step(base, monkeypatch):
    real_build = train.build_loss
    monkeypatch.setattr(train, "build_loss", lambda cfg, task: NaNAfter(real_build(cfg, task), ITERS + 2))
    out_dir = base["tmp"] / "run_nan"
    code, out, err = run(args(base, out_dir))
    assert code == 1
    assert f"non-finite loss (nan) at iteration {ITERS + 2} (epoch 2)" in err
    assert len(err.strip().splitlines()) == 1
    state = load_checkpoint(out_dir / "last.pt")  # from the end of epoch 1, not from the bad step
    assert (state["epoch"], state["iteration"]) == (1, ITERS)


def test_nonfinite_loss_skipped_when_asked(base, monkeypatch):
    real_build = train.build_loss
    monkeypatch.setattr(train, "build_loss", lambda cfg, task: NaNAfter(real_build(cfg, task), 2 * ITERS))
    out_dir = base["tmp"] / "run_skip"
    # also covers augmentation on the training device and HD95 in validation
    code, out, err = run(args(base, out_dir, "train.skip_nonfinite=true", "augment.device=train",
                              "train.val_hd95=true"))
    assert code == 0, err
    state = load_checkpoint(out_dir / "last.pt")
    assert state["skipped_steps"] == 1 and state["iteration"] == 2 * ITERS
    assert "skipped 1 non-finite steps" in out
    record = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(record["val"][region]["hd95"] >= 0 for region in ("WT", "TC", "ET"))


def test_ddp_two_processes_gloo(base, free_port):
    out_dir = base["tmp"] / "run_ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port}", str(ROOT / "train.py"), *args(base, out_dir, "train.epochs=1")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("effective batch 4 (2 x 2 processes)") == 1  # rank 0 alone prints
    assert "Grad strides do not match" not in proc.stderr  # 1x1x1 weights under channels_last_3d
    state = load_checkpoint(out_dir / "last.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert (state["epoch"], state["iteration"]) == (1, ITERS)
    assert not any(k.startswith("module.") for k in state["model"])  # unwrapped from DDP
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out_dir / "best.pt").is_file()
    assert sorted(p.name for p in out_dir.glob("*.pt")) == ["best.pt", "last.pt"]


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} if folder.exists() else {}


def test_bad_inputs_exit_2_with_one_line(base, tmp_path):
    run_a = base["run_a"]
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.pt").write_bytes(b"another run's checkpoint")
    cases = [
        (args(base, tmp_path / "o1", "trian.epochs=3"), "did you mean 'train'"),
        (args(base, tmp_path / "o2", "train.optimizer=lamb"), "train.optimizer"),
        (args(base, tmp_path / "o3", "train.epochs=0"), "train.epochs"),
        (args(base, tmp_path / "o4", f"data.root={empty}", "data.synthetic_cases=0"), "no BraTS cases"),
        (args(base, tmp_path / "o5", "data.patch_size=[64,64,64]"), "larger than every case"),
        (args(base, run_a), "--resume"),  # a fresh run into a folder holding last.pt
        (["--resume", str(run_a / "last.pt"), f"out_dir={other}"], "already exists"),  # another run's folder
        (["--resume", str(tmp_path / "missing.pt")], "not found"),
        (["--resume", str(corrupt)], "not a PyTorch checkpoint (a text file?)"),
        (["--resume", str(run_a / "last.pt"), "model.unet3d.features=[8,16,32]"], "model.unet3d.features"),
        (args(base, run_a, "--resume", str(run_a / "last.pt"), "loss.name=region_dice_bce"), "loss.name"),
        (args(base, tmp_path / "o6", "data.task=brats-gli-2042"), "did you mean 'brats-gli-2024'"),
        (args(base, tmp_path / "o7", "data.task=brats-men-rt"), "task brats-men-rt has 1 GTV"),
        (args(base, tmp_path / "o8", "data.modalities=[t1, adc]"), "'adc' is not a modality of task"),
        # infer.* in a training config: checked at load, not at the first validation after an epoch
        (args(base, tmp_path / "o9", "infer.overlap=1.5"), "infer.overlap: 1.5 must be in [0, 1)"),
        (args(base, tmp_path / "o10", "infer.min_component_size=[5, 5]"), "infer.min_component_size"),
        (args(base, tmp_path / "o11", "augment.flip_prob=2"), "augment.flip_prob: 2.0 is not a probability"),
    ]
    before = _snapshot(run_a)
    for argv, expected in cases:
        code, out, err = run(argv)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (argv, err)
        assert "Traceback" not in err
    assert _snapshot(run_a) == before
    assert _snapshot(other) == {"last.pt": b"another run's checkpoint"}
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))


# ----------------------------------------------------------------------------------------------
# The helpers train.py is built from: devices/ranks, progress lines, the validation panel.
# ----------------------------------------------------------------------------------------------
def test_single_process_distributed_helpers(monkeypatch):
    from core import distributed as dist
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = dist.setup("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert dist.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(3) == 3
    assert torch.equal(dist.all_reduce_sum(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))
    dist.barrier()
    dist.cleanup()


@pytest.mark.parametrize("attempt", ["0", "3"])
def test_each_torchrun_attempt_has_keys_of_its_own(monkeypatch, free_port, attempt):
    """torchrun keeps its store across --max-restarts: attempt n's keys go under default_pg/attempt_n,
    so a restarted group cannot read the dead workers' entries (set here under attempt 0)."""
    import datetime

    from core.distributed import attempt_store
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port), "RANK": "0", "WORLD_SIZE": "1",
           "TORCHELASTIC_RESTART_COUNT": attempt}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)  # rank 0 hosts the store
    store = attempt_store()
    store.set("rank_1", f"address of attempt {attempt}")
    raw = torch.distributed.TCPStore("127.0.0.1", free_port, is_master=False,
                                     timeout=datetime.timedelta(seconds=10))
    raw.set("default_pg/attempt_0/stale", "a dead worker's address")
    assert raw.get(f"default_pg/attempt_{attempt}/rank_1") == f"address of attempt {attempt}".encode()
    assert store.check(["stale"]) == (attempt == "0")


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_torchrun_worker_exits_without_interpreter_shutdown(world_size):
    """exit_process: sys.exit in a single process; in a worker, os._exit after flushing stdout and
    the log (gloo's threads outlive the group and may need the GIL of a finalizing interpreter)."""
    script = ("import atexit, logging, sys\n"
              "from core.distributed import exit_process\n"
              "atexit.register(lambda: print('interpreter shutdown'))\n"
              "logging.basicConfig(stream=sys.stderr)\n"
              "logging.getLogger('x').warning('logged')\n"
              "print('done', end='')\n"
              "exit_process(3)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": world_size}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout.startswith("done") and "logged" in proc.stderr
    assert ("interpreter shutdown" in proc.stdout) == (world_size == "1")


@pytest.mark.parametrize("name,match", [("meta", "unsupported device"), ("cuda:7", "CUDA|does not exist"),
                                        ("tpu", "unknown device"), ("gpu0", "unknown device")])
def test_resolve_device_rejects_bad_names(name, match):
    from core.distributed import resolve_device
    from core.errors import UserError
    if name.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(UserError, match=match):
        resolve_device(name)


@pytest.mark.parametrize("gpus, local_rank, expected", [(4, 3, 3), (4, 0, 0), (1, 3, 0), (1, 0, 0)])
def test_resolve_device_takes_the_local_rank_gpu(monkeypatch, gpus, local_rank, expected):
    """``cuda`` -> cuda:LOCAL_RANK, or cuda:0 where each process sees one GPU (SLURM)."""
    from core.distributed import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert resolve_device("cuda", local_rank) == torch.device("cuda", expected)


def test_setup_rejects_one_explicit_gpu_for_several_processes(monkeypatch):
    from core import distributed as dist
    from core.errors import UserError
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="'cuda:0' would put all 2 processes on one GPU"):
        dist.setup("cuda:0")


@pytest.mark.parametrize("device, capability, dtype, expected", [
    ("cuda", (7, 0), "bf16", torch.float16),   # V100: no bf16 convolutions
    ("cuda", (7, 5), "bf16", torch.float16),   # T4
    ("cuda", (8, 0), "bf16", torch.bfloat16),  # A100
    ("cuda", (9, 0), "bf16", torch.bfloat16),  # H100
    ("cuda", (7, 0), "fp16", torch.float16),
    ("cuda", (7, 0), "fp32", None),
    ("cpu", None, "bf16", torch.bfloat16),  # a CPU with native bf16 (patched below)
    ("cpu", None, "fp16", None),  # fp16 on the CPU runs fp32
])
def test_autocast_dtype_falls_back_to_fp16_before_ampere(monkeypatch, device, capability, dtype, expected):
    from core import distributed as dist
    monkeypatch.setattr(dist, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert dist.autocast_dtype(dtype, torch.device(device)) is expected


def test_progress_plain_lines_off_a_terminal():
    from core.logger import Progress
    stream = io.StringIO()
    bar = Progress(20, "epoch 1/3", initial=5, stream=stream)
    for _ in range(15):
        bar.update(loss=0.25, patches_per_s=12.5)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "epoch 1/3 [ 6/20] loss 0.25 patches_per_s 12.5"  # every 2nd iteration (10 %)
    assert lines[-1].startswith("epoch 1/3 [20/20]") and len(lines) == 8
    silent = io.StringIO()
    Progress(20, "x", enabled=False, stream=silent).update(loss=1.0)
    assert silent.getvalue() == ""


def test_validation_panel_is_the_case_picture():
    """val/panel: inference.render's picture (as infer.py --png draws it) of the chosen channel on the
    model grid (canonical L-P-S voxel axes at the model spacing), prediction and reference rows and
    the case's Dice line, as (3, H, W) floats in [0, 1], at least as large as the slices."""
    from types import SimpleNamespace

    import numpy as np

    from core.task import builtin_tasks
    from datasets.io import Geometry
    from inference.render import as_chw, dice_line, render_case
    task = builtin_tasks()["brats-gli-2024"]
    shape = (24, 20, 12)
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (4,) + shape).astype(np.float16)  # the cache's dtype may be float16
    ref = np.zeros(shape, np.uint8)
    ref[5:12, 6:12, 3:8] = 3
    pred = np.zeros_like(ref)
    pred[6:12, 6:12, 3:8] = 4
    case = SimpleNamespace(images=images, classes=ref,
                           geometry=Geometry(affine=np.diag([-1.0, -1.0, 2.0, 1.0]), header=None, shape=shape))
    metrics = {r: {"dice": 0.25} for r in task.region_names}
    panel = train.validation_panel("BraTS-GLI-00003-100", case, pred, ref, 3, task, metrics)
    np.testing.assert_array_equal(case.geometry.model_affine, np.diag([-1.0, -1.0, 2.0, 1.0]))  # L-P-S at 1x1x2
    expected = render_case(images[3].astype(np.float32), pred, ref, np.diag([-1.0, -1.0, 2.0, 1.0]), task,
                           "BraTS-GLI-00003-100", subtitle=dice_line(metrics, task))
    np.testing.assert_array_equal(panel, as_chw(expected))
    assert panel.dtype == np.float32 and panel.min() >= 0 and panel.max() <= 1
    assert panel.shape[0] == 3 and panel.shape[1] >= 2 * 10 * 20 and panel.shape[2] >= 3 * 10 * 20  # zoomed x10


def test_bf16_on_a_cpu_without_native_bf16_runs_fp32_with_one_line(monkeypatch, caplog):
    from core import distributed as dist
    dist._warn_once.cache_clear()
    monkeypatch.setattr(dist, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING"):
        assert dist.autocast_dtype("bf16", torch.device("cpu")) is None
        assert dist.autocast_dtype("bf16", torch.device("cpu")) is None
    lines = [r.getMessage() for r in caplog.records if "native bf16" in r.getMessage()]
    assert len(lines) == 1 and "running fp32" in lines[0]  # said once


def test_more_workers_than_cores_is_said_once_in_our_words():
    assert train.workers_note(1) == ""
    note = train.workers_note(10_000)
    assert "data.num_workers=10000" in note and "CPU core" in note and "\n" not in note
    import warnings
    assert any("This DataLoader will create" in str(f[1].pattern) for f in warnings.filters
               if f[0] == "ignore" and f[1] is not None)  # torch's own warning is silenced


def test_shell_command_quotes_paths_with_spaces():
    import shlex
    line = train.shell_command("python", "infer.py", "--checkpoint", "my runs/demo/best.pt", "-o", "a'b")
    assert shlex.split(line) == ["python", "infer.py", "--checkpoint", "my runs/demo/best.pt", "-o", "a'b"]


def test_ctrl_c_saves_at_the_step_and_resume_is_exact(base, monkeypatch):
    """A first Ctrl-C finishes the current step, saves last.pt at that iteration (no validation),
    exits 130 and says how to continue; resuming gives the uninterrupted run's weights."""
    import os
    import signal
    run_d = base["tmp"] / "run d"  # a space in the path: the printed command must still work
    real_build, calls = train.build_loss, []

    def interrupting(cfg, task):
        loss = real_build(cfg, task)

        def forward(prediction, target):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the second step
            return loss(prediction, target)
        return forward

    monkeypatch.setattr(train, "build_loss", lambda cfg, task: LossWrapper(interrupting(cfg, task)))
    code, out, err = run(args(base, run_d))
    monkeypatch.undo()
    assert code == 130, err
    assert "Ctrl-C: finishing this step" in err
    stopped = load_checkpoint(run_d / "last.pt")
    assert (stopped["epoch"], stopped["epoch_iteration"], stopped["iteration"]) == (0, 2, 2)
    assert not (run_d / "metrics.jsonl").exists() or not (run_d / "metrics.jsonl").read_text().strip()
    import shlex
    command = out.strip().splitlines()[-1].split("continue exactly with: ")[1]
    assert shlex.split(command) == ["python", "train.py", "--resume", str(run_d / "last.pt")]

    code, out, err = run(["--resume", str(run_d / "last.pt")])
    assert code == 0, err
    assert "resumed at epoch 1, iteration 2" in out and "best mean Dice none yet" in out
    a, b = load_checkpoint(base["run_a"] / "last.pt"), load_checkpoint(run_d / "last.pt")
    assert (b["epoch"], b["iteration"]) == (a["epoch"], a["iteration"])
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], rtol=1e-5, atol=1e-6), name


class LossWrapper(torch.nn.Module):
    """A callable loss as a module (train.py moves the loss to the device)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, prediction, target):
        return self.fn(prediction, target)


def test_unwritable_out_dir_or_cache_dir_exit_2_before_any_work(base, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for override, key in ((f"out_dir={blocker / 'run'}", "out_dir"), (f"data.cache_dir={blocker / 'cache'}",
                                                                        "data.cache_dir")):
        argv = ["-c", str(base["config"]), override] + ([f"out_dir={tmp_path / 'ok'}"] if key != "out_dir" else [])
        code, out, err = run(argv)
        assert code == 2, err
        line = err.strip().splitlines()
        assert len(line) == 1 and f"cannot write there (a file of that name is in the way); set {key}" in line[0]
        assert out == ""  # nothing started
    assert not (tmp_path / "ok").exists()  # the probe removed what it created


def test_missing_data_root_names_the_key(base, tmp_path):
    code, out, err = run(args(base, tmp_path / "o", f"data.root={tmp_path / 'nope'}", "data.synthetic_cases=0"))
    assert code == 2 and "data folder not found; set data.root=/path/to/BraTS" in err


def test_resume_auto_starts_fresh_then_resumes(base, tmp_path):
    run_e = tmp_path / "run_e"
    code, out, err = run(args(base, run_e, "--resume", "auto", "train.epochs=1"))
    assert code == 0, err
    assert f"--resume auto: no {run_e / 'last.pt'}, starting fresh" in out
    code, out, err = run(args(base, run_e, "--resume", "auto", "train.epochs=2"))  # the job resubmitted unchanged
    assert code == 0, err
    assert f"--resume auto: resuming {run_e / 'last.pt'}" in out and "resumed at epoch 2" in out
    assert load_checkpoint(run_e / "last.pt")["epoch"] == 2
    code, _, err = run(["--resume", "auto"])
    assert code == 2 and "--resume auto needs the config" in err


def test_checkpoint_every_saves_mid_epoch(base, tmp_path):
    """train.checkpoint_every=2 with 3 iterations per epoch: last.pt after iterations 2, 3, 4, 6; the
    file after the run is the end of the run (the mid-epoch saves were replaced atomically)."""
    import core.checkpoint
    saved = []
    real = core.checkpoint.save_checkpoint

    def spy(state, path):
        saved.append((Path(path).name, state["iteration"], state["epoch_iteration"]))
        return real(state, path)
    train.save_checkpoint = spy
    try:
        code, out, err = run(args(base, tmp_path / "run_f", "train.checkpoint_every=2"))
    finally:
        train.save_checkpoint = real
    assert code == 0, err
    assert [s for s in saved if s[0] == "last.pt"] == [("last.pt", 2, 2), ("last.pt", 3, 0), ("last.pt", 4, 1),
                                                       ("last.pt", 6, 0)]
    code, _, err = run(args(base, tmp_path / "run_g", "train.checkpoint_every=-1"))
    assert code == 2 and "train.checkpoint_every" in err


def test_tuning_off_stores_no_rules_and_ranks_by_the_raw_score(base, tmp_path):
    run_h = tmp_path / "run_h"
    code, out, err = run(args(base, run_h, "train.tune_postprocessing=false", "train.epochs=1"))
    assert code == 0, err
    assert "post-processed" not in out and not (run_h / "postprocessing.json").exists()
    record = json.loads((run_h / "metrics.jsonl").read_text())
    assert "postprocessing" not in record
    best = load_checkpoint(run_h / "best.pt")
    assert best["postprocessing"] is None and best["best"]["dice"] == record["mean_dice"]


@pytest.mark.parametrize("task, synthetic, expected", [
    ("auto", "auto", "brats-gli-2021"), ("brats-ped", "auto", "brats-ped"),  # the training task's cases
    ("brats-ped", "brats-gli-2023", "brats-gli-2023"), ("my_task.yaml", "auto", "brats-gli-2021")])
def test_generated_cases_follow_the_training_task(task, synthetic, expected):
    from core.config import DataConfig
    assert train.synthetic_task(DataConfig(task=task, synthetic_task=synthetic)) == expected


def test_resume_with_another_world_size_says_what_changes():
    from core import distributed as dist
    info = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    note = train.restore_rng([{}, {}], info, torch.device("cpu"), batch_size=2)
    assert "resumed with 1 process(es) instead of 2" in note and "effective batch is now 2" in note
    assert "instead of 4" in note and "fresh seeds" in note
