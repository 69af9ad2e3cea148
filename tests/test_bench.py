"""Smoke tests of the benchmark scripts in bench/: each runs at toy sizes in a subprocess, as a user
runs it, and its JSON must have the benchmark's fields with positive, finite timings.

The scripts are run from a temporary folder with ``--work-dir`` / ``-o`` under it, without
PYTHONPATH and with ``--no-monai`` where the script has it, so nothing is written into the
repository; ``bench/results/`` is checked to be left untouched. The optional peers (MONAI, medpy)
may be installed next to the project or not: a test whose script compares with a peer it cannot
turn off checks the peer's fields when the script can import it and their absence otherwise.
Each process spends ~2 s importing torch, so the selected runs are started up front, two at a
time (``runs`` fixture); each test waits for its own run's JSON and checks it.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
TIMEOUT_S = 300  # per script; each takes a few seconds at these sizes


def results_snapshot() -> dict:
    """``{relative path: (size, mtime)}`` of the files under bench/results."""
    if not RESULTS.is_dir():
        return {}
    return {str(p.relative_to(RESULTS)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in RESULTS.rglob("*") if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def results_untouched():
    before = results_snapshot()
    yield
    assert results_snapshot() == before, "a benchmark test wrote into bench/results/"


def bench_env(pythonpath: Path | None = None) -> dict:
    """The environment the scripts run in: this one without PYTHONPATH (the scripts find the
    repository themselves), one thread, and ``pythonpath`` when given."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def importable_by_scripts(module: str, pythonpath: Path | None = None) -> bool:
    """Whether a benchmark script run with ``bench_env(pythonpath)`` can import ``module`` (e.g. MONAI
    installed next to the project)."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], env=bench_env(pythonpath),
                          capture_output=True, timeout=TIMEOUT_S)
    return proc.returncode == 0


def run_bench(script: str, args, cwd: Path, output: Path | None = None, pythonpath: Path | None = None) -> dict:
    """Run ``bench/<script> args [-o output]`` and return its JSON (stdout carries only the JSON;
    with ``output`` the file must hold the same). Every number in it must be finite."""
    env = bench_env(pythonpath)
    command = [sys.executable, str(BENCH / script), *map(str, args)]
    if output is not None:
        command += ["-o", str(output)]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    printed = json.loads(proc.stdout)
    if output is not None:
        assert json.loads(output.read_text()) == printed
    assert_finite(printed)
    return printed


def assert_finite(value, where: str = "$") -> None:
    """No NaN or infinity anywhere in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_finite(item, f"{where}[{i}]")
    elif isinstance(value, float):
        assert math.isfinite(value), f"{where} = {value}"


def assert_timing(timing: dict, runs: int | None = 1) -> None:
    """A ``bench.common.summarize`` result: positive seconds, min <= median <= max."""
    assert 0 < timing["min_s"] <= timing["median_s"] <= timing["max_s"], timing
    assert timing["runs"] == runs if runs is not None else timing["runs"] >= 1
    if "cpu_median_s" in timing:
        assert timing["cpu_median_s"] >= 0


def assert_rate(rate: dict, count: float, timing: dict) -> None:
    """A ``bench.common.per_second(count, timing)`` result."""
    assert rate["median"] == pytest.approx(count / timing["median_s"], abs=2e-3)
    assert rate["min"] == pytest.approx(count / timing["max_s"], abs=2e-3)
    assert rate["max"] == pytest.approx(count / timing["min_s"], abs=2e-3)


def assert_common(report: dict, benchmark: str) -> None:
    """The fields ``bench.common.finish`` adds (``--threads 1``, ``--no-monai``)."""
    assert report["benchmark"] == benchmark
    assert report["device"] == "cpu"
    assert report["hardware"]["torch_threads"] == 1
    assert report["hardware"]["logical_cpus"] >= 1
    assert len(report["load_average_at_end"]) == 3


SKIPPED = {"skipped": "--no-monai given"}
WORK = "<work>"  # replaced by the run's own --work-dir
TOY = ["--repeats", 1, "--warmup", 0, "--threads", 1, "--no-monai", "--work-dir", WORK]
# test_<name> checks run <name>: bench/<script> and its arguments (-o <folder>/out.json added where supported).
# Slowest first: two at a time, they then finish together.
RUNS = {
    "metrics_cpu": ["metrics_cpu.py", "--repeats", 1],  # no size option: a 240 x 240 x 155 case
    "models_cpu": ["models_cpu.py", "--models", "unet3d_tiny", "swin_unetr_tiny+ckpt", "no_such_config",
                   "--size", 32, "--batch", 1, *TOY],
    "train_step": ["train_step.py", "--configs", "configs/unet3d_tiny.yaml", "--size", 16, "--batch", 1,
                   "--precisions", "fp32", "--channels-last", "off", "on", "--no-estimate", "--e2e-workers", 0,
                   "--e2e-steps", 1, "--e2e-cases", 1, "--e2e-case-shape", 32, 32, 32, *TOY],
    "loader": ["loader.py", "--scenarios", "demo", "--workers", 0, 1, "--batches", 2, "--batch-size", 2, *TOY],
    "inference": ["inference.py", "--shape", 48, 48, 32, "--window", 32, 32, 32, "--features", 4, 8, *TOY],
    "io": ["io.py", "--shape", 48, 48, 32, "--patch", 32, 32, 32, "--patch-repeats", 2, "--native-shape", 60, 60, 8,
           *TOY],
    "compare_metrics": ["compare_metrics.py", "--cases", 4],  # PYTHONPATH: FAKE_MEDPY
    "augment_cpu": ["augment_cpu.py", "--size", 16, "--batch", 1, "--repeats", 1, "--threads", 1],  # stdout only
}
FAKE_MEDPY = '''"""Stand-in for medpy.metric.binary: this repository's metrics, offset by known amounts."""
from metrics.overlap import dice_from_counts, mask_counts
from metrics.surface import hd95 as _hd95


def dc(result, reference):
    return dice_from_counts(mask_counts(result, reference)) - 0.25


def hd95(result, reference, voxelspacing=None):
    return _hd95(result, reference, voxelspacing) + 0.5
'''


def fake_medpy(folder: Path) -> Path:
    """A ``medpy`` package (``FAKE_MEDPY``) under ``folder``, for PYTHONPATH."""
    package = folder / "medpy" / "metric"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "binary.py").write_text(FAKE_MEDPY)
    return folder


def start_run(pool: ThreadPoolExecutor, name: str, folder: Path) -> Future:
    """Submit ``RUNS[name]`` with its work folder, output file and PYTHONPATH under ``folder``."""
    script, *args = RUNS[name]
    args = [folder / "work" if arg == WORK else arg for arg in args]
    output = None if name == "augment_cpu" else folder / "out.json"
    pythonpath = fake_medpy(folder / "peers") if name == "compare_metrics" else None
    return pool.submit(run_bench, script, args, folder, output, pythonpath)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """``{name: (Future of the run's JSON, its folder)}`` of the runs whose test is selected, all
    started at once, two at a time (2 cores; the scripts run with one thread)."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = {}
        for name in RUNS:
            if f"test_{name}" in selected:
                folder = tmp_path_factory.mktemp(name)
                started[name] = (start_run(pool, name, folder), folder)
        yield started


# ----------------------------------------------------------------------------------------------
def test_augment_cpu(runs):
    report = runs["augment_cpu"][0].result()
    assert report["batch"] == [1, 4, 16, 16, 16]
    assert report["threads"] == 1 and report["repeats"] == 1
    assert set(report["seconds_per_batch"]) == {"default_config", "all_prob1_no_elastic", "all_prob1_with_elastic"}
    for timing in report["seconds_per_batch"].values():
        assert timing["wall_median"] > 0 and timing["wall_mean"] > 0 and timing["cpu_median"] >= 0
    assert set(report["stage_seconds"]) == {"draw_parameters", "spatial_rotate_scale", "spatial_rotate_scale_elastic",
                                            "flip_3_axes", "noise", "blur", "scale_shift", "gamma"}
    for timing in report["stage_seconds"].values():  # sub-millisecond stages may round to 0
        assert timing["wall_median"] >= 0 and timing["cpu_median"] >= 0


def test_io(runs):
    future, folder = runs["io"]
    report = future.result()
    assert_common(report, "io")
    assert report["case_shape"] == [48, 48, 32] and report["patch"] == [32, 32, 32]
    assert report["monai"] == SKIPPED
    for name in ("nifti_read", "preprocess", "cache_build_float32", "cache_build_float16"):
        assert_timing(report[name])
    for dtype in ("float32", "float16"):
        assert_timing(report[f"cache_patch_read_{dtype}"], runs=2)  # --patch-repeats
        assert report[f"cache_{dtype}_mb"] > 0
        assert report["speedup_patch_over_nifti_read"][dtype] > 0
    cold = report["page_cache_eviction"].startswith("posix_fadvise")
    for name in ("nifti_read_cold", "cache_patch_read_float32_cold", "cache_patch_read_float16_cold"):
        assert (name in report) == cold
    assert report["nifti_mb"] > 0
    resampling = report["resampling"]  # 48 x 48 x 32 at 1 x 1 x 3 mm (every third slice) to 1 mm and back
    assert resampling["from_shape"] == [4, 48, 48, 11] and resampling["to_shape"] == [4, 48, 48, 33]
    assert_timing(resampling["forward_image"])
    assert_timing(resampling["back_probabilities"])
    native = report["native_path"]  # 60 x 60 x 8 at 0.5 x 0.5 x 5 mm -> 1 mm, and back to the input grid
    assert native["shape"] == [60, 60, 8] and native["output_shape"] == [60, 60, 8]
    assert native["peak_rss_mb_above_imports"] >= 0 and min(native["model_grid"]) > 0
    assert len(report["brain_crop_shape"]) == 3
    assert all(0 < c <= s for c, s in zip(report["brain_crop_shape"], report["case_shape"]))
    assert (folder / "work" / "data" / "48x48x32").is_dir()  # generated in --work-dir, kept


def test_inference(runs):
    future, folder = runs["inference"]
    report = future.result()
    assert_common(report, "inference")
    assert report["monai"] == SKIPPED and "monai_end_to_end" not in report and "ratios_monai_over_ours" not in report
    assert report["model"]["features"] == [4, 8] and report["model"]["parameters"] > 0
    assert len(report["brain_crop_shape"]) == 3
    assert all(0 < c <= s for c, s in zip(report["brain_crop_shape"], [48, 48, 32]))
    # window 32 at overlap 0.5: 2 starts (0, 16) along 48, 1 along 32
    assert report["windows"]["whole_volume"] == 2 * 2 * 1
    assert 1 <= report["windows"]["brain_crop"] <= report["windows"]["whole_volume"]
    assert set(report["end_to_end"]) == {"tta_off", "tta_on"}
    for entry in report["end_to_end"].values():
        assert_timing(entry["seconds"])
        assert all(entry[part] >= 0 for part in ("read", "predict", "write"))  # infer.py's split, 0.1 s steps
    # the network's backends side by side: PyTorch eager, channels_last, ONNX Runtime (the exported .onnx);
    # infer.backend=auto keeps this tiny network in PyTorch, so the default path is the eager column
    onnx = "skipped" not in report["onnx_export"]  # the ONNX packages (requirements-test.txt) are there
    backends = ("torch", "torch_channels_last") + (("onnxruntime", "onnxruntime_in_memory") if onnx else ())
    assert set(report["end_to_end_backends"]) == set(backends)
    assert report["end_to_end"] == report["end_to_end_backends"]["torch"]
    for entries in report["end_to_end_backends"].values():
        assert set(entries) == {"tta_off", "tta_on"}
        for entry in entries.values():
            assert_timing(entry["seconds"])
    assert set(report["end_to_end_speedups"]) == {f"{name}_over_torch_{key}" for name in backends[1:]
                                                  for key in ("tta_off", "tta_on")}
    network = report["network_one_batch"]
    assert network["windows"] == 2
    for name in backends[:3]:
        assert_timing(network[f"{name}_seconds"])
    if onnx:
        assert report["onnx_export"]["window"] == [32, 32, 32]
        assert report["onnx_export"]["max_abs_probability_difference"] <= 1e-3
        agreement = report["onnxruntime_agreement"]
        assert agreement["max_abs_probability_difference"] <= 1e-3 and agreement["identical_argmax_fraction"] >= 0.999
    for name in ("pointwise", "unet"):
        entry = report["sliding_window_whole_volume"][name]
        assert entry["windows"] == 4
        assert_timing(entry["ours_seconds"])
        assert_rate(entry["ours_windows_per_s"], 4, entry["ours_seconds"])
    assert sorted(p.name for p in (folder / "work" / "out").iterdir()) == [  # infer.py's mask and its record
        "BraTS2021_00000.nii.gz", "predictions.json"]


def test_loader(runs):
    future, folder = runs["loader"]
    report = future.result()
    assert_common(report, "loader")
    assert report["monai"] == SKIPPED and report["workers"] == [0, 1]
    assert set(report["scenarios"]) == {"demo"}
    demo = report["scenarios"]["demo"]
    assert demo["config"] == "configs/demo.yaml" and demo["cases"] == 6
    assert demo["case_shape"] == [64, 64, 48] and demo["patch"] == [32, 32, 32]
    assert demo["generate_s_per_case"] > 0 and demo["cache_build_s_per_case"] > 0
    assert "device" not in demo["augment"] and 0 <= demo["augment"]["flip_prob"] <= 1
    assert set(demo["rates"]) == {f"ours_{mode}_workers{w}" for mode in ("off", "loader", "train") for w in (0, 1)}
    for rate in demo["rates"].values():
        assert_timing(rate["seconds"])
        assert_rate(rate["patches_per_s"], 2 * 2, rate["seconds"])  # --batches x --batch-size
    assert demo["ratios_ours_over_monai"] == {}
    assert (folder / "work" / "demo" / "cache").is_dir()


def test_train_step(runs):
    report = runs["train_step"][0].result()
    assert_common(report, "train_step")
    assert report["patch"] == [16, 16, 16] and report["batch"] == 1
    assert report["compile"] == "off" and report["monai"] == SKIPPED and "memory_estimate" not in report
    entry = report["models"]["unet3d_tiny"]
    assert entry["model"] == "unet3d" and entry["loss"] == "region_dice_bce"
    assert set(entry["variants"]) == {"fp32", "fp32_channels_last"}
    for variant in entry["variants"].values():
        assert variant["parameters"] > 0
        assert_timing(variant["seconds_per_step"])
        assert_rate(variant["iterations_per_s"], 1, variant["seconds_per_step"])
        assert_rate(variant["patches_per_s"], 1, variant["seconds_per_step"])  # --batch 1
        assert variant["saved_activations_mb"] > 0 and variant["params_grads_optimizer_mb"] > 0
    (e2e,) = entry["end_to_end"]
    assert e2e["workers"] == 0 and e2e["steps"] == 1 and e2e["case_shape"] == [32, 32, 32]
    assert_timing(e2e["seconds_per_step"])
    assert_rate(e2e["patches_per_s"], 1, e2e["seconds_per_step"])
    assert 0 <= e2e["waiting_for_data_fraction"] <= 1 and e2e["waiting_s_median"] >= 0


def test_train_step_memory_estimate():
    """The fake-tensor estimate train_step.py makes without --no-estimate (all full configs at
    128^3: ~15 s), here for the full U-Net at 64^3: checkpointing keeps fewer activations."""
    from bench.train_step import estimate_memory

    config = ROOT / "configs" / "unet3d.yaml"
    plain = estimate_memory(config, 64, 1, "fp32", checkpointing=False)
    checkpointed = estimate_memory(config, 64, 1, "fp32", checkpointing=True)
    assert 0 < checkpointed["saved_activations_gb"] < plain["saved_activations_gb"]
    assert plain["params_grads_optimizer_gb"] == checkpointed["params_grads_optimizer_gb"] > 0


def test_models_cpu(runs):
    report = runs["models_cpu"][0].result()
    assert_common(report, "models")
    assert report["input"] == [1, 4, 32, 32, 32]
    assert report["ratios_ours_over_monai"] == SKIPPED
    models = report["models"]
    assert set(models) == {"unet3d_tiny", "swin_unetr_tiny+ckpt", "no_such_config"}
    assert "no_such_config" in models["no_such_config"]["error"]  # reported; the others still run
    for name in ("unet3d_tiny", "swin_unetr_tiny+ckpt"):
        assert "error" not in models[name]
        assert models[name]["parameters"] > 0
        assert_timing(models[name]["forward_backward"])
        assert_timing(models[name]["forward_eval"])


def test_metrics_cpu(runs):
    report = runs["metrics_cpu"][0].result()
    assert report["shape"] == [240, 240, 155] and report["repeats"] == 1
    assert set(report["seconds_per_case"]) == {"legacy_without_hd95", "legacy_with_hd95", "lesionwise_with_hd95"}
    assert set(report["seconds_parts"]) == {"confusion_matrix", "hd95_WT_full_volume", "hd95_TC_full_volume",
                                            "hd95_ET_full_volume"}
    assert all(s > 0 for s in [*report["seconds_per_case"].values(), *report["seconds_parts"].values()])
    assert set(report["seconds_tuning_per_case"]) == {f"{case}_{convention}" for case in ("case", "noisy")
                                                      for convention in ("legacy", "lesionwise")}
    assert all(s > 0 for s in report["seconds_tuning_per_case"].values())
    voxels = report["voxels"]
    assert voxels["WT_ref"] > voxels["TC_ref"] > voxels["ET_ref"] > 0  # nested regions
    for region in ("WT", "TC", "ET"):
        scores = report["scores_legacy"][region]
        assert scores["ref_voxels"] == voxels[f"{region}_ref"]
        assert 0 < scores["dice"] < 1 and scores["hd95"] > 0  # the prediction is shifted and eroded


def test_compare_metrics(runs):
    """The comparison loop, with a fake medpy whose Dice / HD95 differ from ours by 0.25 / 0.5
    (medpy and MONAI are not dependencies; without either the script only prints a skip note).
    The fake medpy comes first on the script's path, so a real medpy installed next to the project
    does not change the result; MONAI, when the script can import it, is compared too: same Dice,
    and an HD95 never smaller than ours (the larger of the two directed percentiles)."""
    future, folder = runs["compare_metrics"]
    report = future.result()
    with_monai = importable_by_scripts("monai.metrics", folder / "peers")
    assert len(report["spacings"]) == 4
    assert set(report) == {"spacings", "noise", "blobs"}  # case 0 is noise, cases 1-3 blobs
    assert report["noise"]["cases"] == 1 and 1 <= report["blobs"]["cases"] <= 3
    for kind in ("noise", "blobs"):
        entry = report[kind]
        assert entry["medpy_dice"]["max_abs_diff"] == pytest.approx(0.25)
        assert entry["medpy_hd95"]["max_abs_diff"] == pytest.approx(0.5)
        assert 0 < entry["ours_hd95"]["min"] <= entry["ours_hd95"]["mean"] <= entry["ours_hd95"]["max"]
        if with_monai:
            assert entry["monai_dice"]["max_abs_diff"] < 1e-6
            assert entry["monai_hd95_minus_ours"]["min"] >= -1e-6
        else:
            assert "monai_dice" not in entry and "monai_hd95_minus_ours" not in entry


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
