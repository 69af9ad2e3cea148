"""Multi-node torchrun on localhost (CPU, gloo): two "nodes" with node-local caches, the same result
as one node with two processes, and a worker killed mid-epoch under --max-restarts with --resume auto."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from core.checkpoint import load_checkpoint
from datasets.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    generate_dataset(tmp / "data", 5, seed=3, task="brats-gli-2021", shape=(32, 32, 24))
    config = {
        "data": {"root": str(tmp / "data"), "patch_size": [16, 16, 16], "batch_size": 1, "num_workers": 0,
                 "folds": 3, "cache_workers": 1},
        "model": {"name": "unet3d", "unet3d": {"features": [4, 8], "strides": [1, 2], "blocks_per_stage": [1, 1]}},
        "train": {"epochs": 2, "iters_per_epoch": 3, "precision": "fp32", "device": "cpu", "deterministic": True,
                  "log_every": 1, "cpu_threads": 1},
        "infer": {"sw_batch_size": 2},
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # the reference: one node, two processes, one cache
    reference = run_torchrun(["--standalone", "--nproc_per_node=2"], tmp, "single", env,
                             [f"data.cache_dir={tmp / 'cache_single'}"])
    return {"tmp": tmp, "env": env, "reference": reference}


def run_torchrun(launcher: list[str], tmp: Path, name: str, env: dict, overrides: list[str],
                 script: list[str] = ("train.py",)) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, *script, "-c", str(tmp / "tiny.yaml"),
               f"out_dir={tmp / name}", *overrides]
    process = start(command, env)
    out, err = finish(process)
    assert process.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def start(command: list[str], env: dict) -> subprocess.Popen:
    """torchrun in its own process group, so that ``finish`` can stop its workers too."""
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    """``(stdout, stderr)``; past ``timeout`` the whole group is killed (workers waiting in a
    collective would otherwise outlive the test) and the test fails."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s: {err[-2000:]}")


def same_parameters(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    for name, tensor in first.items():
        assert torch.allclose(tensor, second[name], rtol=1e-6, atol=1e-7), name


def test_two_nodes_with_node_local_caches_equal_one_node(setup, free_port):
    tmp, env = setup["tmp"], setup["env"]
    port = free_port
    launchers = [start(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes", "train.py",
         "-c", str(tmp / "tiny.yaml"), f"out_dir={tmp / 'two_nodes'}", f"data.cache_dir={tmp / f'node{node}' / 'cache'}"],
        env) for node in (0, 1)]
    try:
        outputs = [finish(p) for p in launchers]
    finally:
        for p in launchers:  # one node failed: the other waits for it forever
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, (out, err) in zip(launchers, outputs):
        assert p.returncode == 0, err[-3000:]
    for node in (0, 1):  # each node built its own cache
        cases = list((tmp / f"node{node}" / "cache").glob("*/BraTS2021_*.json"))
        assert len(cases) == 5, node
    logs = "".join(out for out, _ in outputs)
    assert logs.count("final validation Dice") == 1  # global rank 0 alone logs and writes
    assert "parameters identical on all 2 processes" in logs
    assert sorted(p.name for p in (tmp / "two_nodes").glob("*.pt")) == ["best.pt", "last.pt"]
    state = load_checkpoint(tmp / "two_nodes" / "last.pt")
    assert (state["iteration"], state["world_size"], len(state["rng"])) == (6, 2, 2)
    same_parameters(tmp / "two_nodes" / "last.pt", tmp / "single" / "last.pt")


def test_a_killed_worker_restarts_and_resumes_exactly(setup):
    """Rank 1 dies at step 4 (0-based) of the first attempt; last.pt was saved at iteration 4
    (train.checkpoint_every=2); torchrun restarts the group, --resume auto continues from there,
    and the final parameters equal the uninterrupted run's (deterministic mode)."""
    tmp, env = setup["tmp"], setup["env"]
    done = run_torchrun(["--standalone", "--nproc_per_node=2", "--max-restarts=1"], tmp, "restarted", env,
                        [f"data.cache_dir={tmp / 'cache_single'}", "train.checkpoint_every=2", "--resume", "auto"],
                        script=("tests/flaky_train.py", "4"))
    out = done.stdout
    assert "--resume auto: no" in out and "starting fresh" in out  # first attempt
    assert "--resume auto: resuming" in out and "resumed at epoch 2, iteration 4" in out  # after the restart
    state = load_checkpoint(tmp / "restarted" / "last.pt")
    assert state["iteration"] == 6
    same_parameters(tmp / "restarted" / "last.pt", tmp / "single" / "last.pt")
