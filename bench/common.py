"""Shared helpers of the benchmark scripts: timing, hardware description, optional MONAI, JSON output.

    parser = benchmark_parser(__doc__)                  # --device --repeats --warmup --budget --threads -o
    args = parser.parse_args(argv)
    device = setup(args)                                # torch threads, resolved device
    timing = measure(step, args.repeats, args.warmup, args.budget, device)
    # {"median_s", "min_s", "max_s", "runs", "cpu_median_s"}
    timings = measure_alternating({"ours": ours, "monai": theirs}, args.repeats, args.warmup, args.budget, device)
    report = {"benchmark": "loader", ..., "x": timing, "x_per_s": per_second(batch, timing)}
    finish(report, args, device)                        # + hardware and load average; stdout and -o FILE

Timings are wall-clock seconds of whole calls after ``warmup`` untimed calls. ``budget`` caps the
timed seconds of one measurement (at least one timed call), so heavy measurements on a slow
machine stop early; ``runs`` says how many were timed. ``cpu_median_s`` is the process CPU time
(all threads of this process, not DataLoader workers): a guide when other jobs share the cores.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MONAI_HINT = ("monai is not importable; install it outside the repo with `pip install --target /tmp/peer_pkgs "
              "--no-deps -r bench/requirements.txt` and run with PYTHONPATH=/tmp/peer_pkgs")


# ----------------------------------------------------------------------------------------------
# Command line and set-up.
# ----------------------------------------------------------------------------------------------
def benchmark_parser(doc: str, repeats: int = 3, warmup: int = 1, budget: float = 60.0) -> argparse.ArgumentParser:
    """Parser with the options every benchmark shares; add the script's own afterwards."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed calls per measurement (at most)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls before each measurement")
    parser.add_argument("--budget", type=float, default=budget,
                        help="seconds of timed calls per measurement; stops early once spent (at least one call)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--no-monai", action="store_true", help="skip the MONAI comparison even if importable")
    parser.add_argument("--work-dir", help="keep generated data here and reuse it on the next run "
                                           "(default: a temporary folder, deleted at the end)")
    parser.add_argument("-o", "--output", help="also write the JSON here (e.g. bench/results/<script>_cpu.json)")
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, check the other shared options and return the ``--device``."""
    if args.repeats < 1 or args.warmup < 0 or args.budget <= 0:
        raise SystemExit("error: need --repeats >= 1, --warmup >= 0 and --budget > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: CUDA is not available on this machine")
    return device


@contextlib.contextmanager
def work_dir(args: argparse.Namespace):
    """``--work-dir`` (created, kept) or a temporary folder removed on exit."""
    if args.work_dir:
        path = Path(args.work_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="brats_bench_") as tmp:
        yield Path(tmp)


def synthetic_cases(folder: Path, count: int, shape, seed: int = 0) -> tuple[list, float | None]:
    """``count`` synthetic BraTS cases (2021 naming) of ``shape`` under ``folder/<X>x<Y>x<Z>``,
    generated unless already there. Returns ``(cases, seconds per generated case or None)``."""
    from datasets.io import discover_cases
    from datasets.synthetic import generate_dataset

    root = Path(folder) / "x".join(str(int(s)) for s in shape)
    if root.is_dir() and len(discover_cases(root)) >= count:
        return discover_cases(root)[:count], None
    start = time.perf_counter()
    generate_dataset(root, count, seed=seed, shape=tuple(int(s) for s in shape))
    seconds = (time.perf_counter() - start) / count
    return discover_cases(root)[:count], round(seconds, 3)


# ----------------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------------
def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work (no-op elsewhere), so wall-clock times cover the work."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, budget: float | None = None,
            device: torch.device | str | None = None) -> dict:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeats`` timed calls, stopping once
    ``budget`` seconds have been timed (at least one). Returns ``summarize`` of the seconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    wall, cpu = [], []
    while len(wall) < repeats and (budget is None or not wall or sum(wall) < budget):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return {**summarize(wall), "cpu_median_s": round(statistics.median(cpu), 4)}


def measure_alternating(fns: dict[str, Callable[[], Any]], repeats: int = 3, warmup: int = 1,
                        budget: float | None = None, device: torch.device | str | None = None) -> dict[str, dict]:
    """``measure`` several functions in rounds (a, b, a, b, ...), so a change in the machine's
    load affects all of them alike; ``budget`` caps the timed seconds of all of them together."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    wall: dict[str, list[float]] = {name: [] for name in fns}
    for rounds in range(repeats):
        if rounds and budget is not None and sum(map(sum, wall.values())) >= budget:
            break
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            wall[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in wall.items()}


def summarize(seconds: list[float]) -> dict:
    """``{"median_s", "min_s", "max_s", "runs"}`` of a list of durations."""
    if not seconds:
        raise ValueError("summarize needs at least one duration")
    return {"median_s": round(statistics.median(seconds), 4), "min_s": round(min(seconds), 4),
            "max_s": round(max(seconds), 4), "runs": len(seconds)}


def per_second(count: float, timing: dict) -> dict:
    """Rates ``count / seconds`` of a ``summarize`` result: median, min (slowest run), max (fastest)."""
    return {"median": round(count / timing["median_s"], 3), "min": round(count / timing["max_s"], 3),
            "max": round(count / timing["min_s"], 3)}


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """``numerator / denominator`` rounded, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, digits)


# ----------------------------------------------------------------------------------------------
# Environment.
# ----------------------------------------------------------------------------------------------
def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other jobs on the machine skew every timing)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device | str | None = None) -> dict:
    """What the numbers were measured on: CPU, cores, memory, library versions, GPU if any."""
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": _memory_gb(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "os": platform.platform(),
        "cuda_device": None,
    }
    monai = import_monai()
    info["monai"] = getattr(monai, "__version__", None)
    if torch.cuda.is_available():
        index = torch.device(device).index if device is not None and torch.device(device).type == "cuda" else None
        index = torch.cuda.current_device() if index is None else index
        props = torch.cuda.get_device_properties(index)
        info["cuda_device"] = props.name
        info["cuda_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda_version"] = torch.version.cuda
    return info


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def import_monai(disabled: bool = False):
    """The ``monai`` module, or None when it is not importable (or ``disabled``)."""
    if disabled:
        return None
    try:
        import monai
    except ImportError:
        return None
    return monai


def monai_skipped(disabled: bool) -> dict:
    """The JSON note of a skipped MONAI comparison."""
    return {"skipped": "--no-monai given" if disabled else MONAI_HINT}


# ----------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------
def finish(report: dict, args: argparse.Namespace, device: torch.device | str | None = None,
           load_at_start: list[float] | None = None) -> int:
    """Add the hardware and load averages, print the JSON and write it to ``args.output``."""
    full = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "hardware": hardware(device),
            "device": str(device) if device is not None else None,
            "load_average_at_start": load_at_start, "load_average_at_end": load_average(), **report}
    return emit(full, args.output)


def emit(result: dict, output: str | None) -> int:
    """Print ``result`` as JSON and, if ``output`` is given, also write it there."""
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    return 0


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON)."""
    print(message, file=sys.stderr, flush=True)
