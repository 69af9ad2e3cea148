"""Model benchmark (JSON out): parameter counts and seconds per training step / eval forward.

    python bench/models_cpu.py [-o bench/results/models_cpu.json] [--size 96] [--repeats 3] [--device cpu]
    PYTHONPATH=/tmp/peer_pkgs python bench/models_cpu.py   # also MONAI SwinUNETR and DynUNet
        # (pip install --target /tmp/peer_pkgs --no-deps -r bench/requirements.txt; not a repo dependency)

Networks: ``unet3d``, ``unet3d_tiny``, ``swin_unetr``, ``swin_unetr_tiny`` built from the configs of
the same names (4 input modalities, 3 region outputs; gradient checkpointing off so the numbers
compare with MONAI's defaults; a ``+ckpt`` suffix turns it on: the tiny ones are timed both ways by
default), and when MONAI is importable: ``monai_swin_unetr`` (``SwinUNETR(feature_size=48)``) and
``monai_dynunet`` (``DynUNet`` with the nnU-Net plan of ``unet3d``: 3x3x3 kernels, strides
[1, 2, 2, 2, 2, 2], filters [32, 64, 128, 256, 320, 320], instance norm, deep supervision with 3
extra outputs).

All networks are built first. Per mode (train-mode forward + backward of the mean of all outputs;
eval-mode forward under ``torch.no_grad``), on a ``(batch, 4, size, size, size)`` random float32
input: ``--warmup`` untimed steps per network (at least one), then up to ``--repeats`` rounds, each timing one step
of every network in turn (interleaved, so a change in machine load hits all networks alike),
stopping early once a round ends past ``--budget`` seconds. Reports median / min / max seconds per
network and ours / MONAI ratios of parameters and median times. On a shared machine the min is the
best guide to uncontended speed.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    ROOT,
    benchmark_parser,
    finish,
    import_monai,
    load_average,
    log,
    monai_skipped,
    ratio,
    setup,
    summarize,
    synchronize,
)
from core.config import load_config  # noqa: E402
from models import build_model, count_parameters  # noqa: E402

IN_CHANNELS, OUT_CHANNELS = 4, 3
OURS = ("unet3d", "unet3d_tiny", "unet3d_tiny+ckpt", "swin_unetr", "swin_unetr_tiny", "swin_unetr_tiny+ckpt")
MONAI = ("monai_swin_unetr", "monai_dynunet")
PAIRS = {"swin_unetr / monai_swin_unetr": ("swin_unetr", "monai_swin_unetr"),
         "unet3d / monai_dynunet": ("unet3d", "monai_dynunet")}
MODES = ("forward_backward", "forward_eval")


def build_ours(name: str) -> nn.Module:
    """``name`` = a config in configs/ (``+ckpt``: with gradient checkpointing)."""
    config, _, option = name.partition("+")
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", [f"model.checkpointing={option == 'ckpt'}"])
    return build_model(cfg.model, IN_CHANNELS, OUT_CHANNELS)


def build_monai(name: str) -> nn.Module:
    from monai.networks.nets import DynUNet, SwinUNETR

    if name == "monai_swin_unetr":
        return SwinUNETR(in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, feature_size=48)
    strides = [1, 2, 2, 2, 2, 2]
    return DynUNet(3, IN_CHANNELS, OUT_CHANNELS, kernel_size=[3] * 6, strides=strides, upsample_kernel_size=strides[1:],
                   filters=[32, 64, 128, 256, 320, 320], norm_name="instance", deep_supervision=True, deep_supr_num=3)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_monai(name) if name in MONAI else build_ours(name)


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    out = model(x)
    outputs = out if isinstance(out, (list, tuple)) else [out]
    sum(o.float().mean() for o in outputs).backward()


def eval_step(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def timed_rounds(models: dict[str, nn.Module], step: Callable, x: torch.Tensor, repeats: int, budget: float,
                 device: torch.device) -> dict[str, dict]:
    """Up to ``repeats`` interleaved rounds (one ``step`` per network each) within ``budget`` seconds."""
    times: dict[str, list[float]] = {name: [] for name in models}
    start = time.perf_counter()
    for _ in range(repeats):
        for name, model in models.items():
            begin = time.perf_counter()
            step(model, x)
            synchronize(device)
            times[name].append(time.perf_counter() - begin)
            log(f"  {step.__name__} {name}: {times[name][-1]:.2f} s")
        if time.perf_counter() - start > budget:
            break
    return {name: summarize(seconds) for name, seconds in times.items()}


def ratios(results: dict) -> dict:
    out = {}
    for label, (ours, theirs) in PAIRS.items():
        a, b = results.get(ours, {}), results.get(theirs, {})
        if "parameters" in a and "parameters" in b:
            out[label] = {"parameters": ratio(a["parameters"], b["parameters"])}
            for mode in MODES:
                if mode in a and mode in b:
                    out[label][f"{mode}_median"] = ratio(a[mode]["median_s"], b[mode]["median_s"])
                    out[label][f"{mode}_min"] = ratio(a[mode]["min_s"], b[mode]["min_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, repeats=3, warmup=1, budget=900.0)
    parser.add_argument("--models", nargs="+", help=f"default: {' '.join(OURS)} (+ {' '.join(MONAI)} with MONAI)")
    parser.add_argument("--size", type=int, default=96, help="input edge in voxels (multiple of 32 for the defaults)")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.threads:
        args.threads = 2  # the CPU numbers of this repository are for 2 cores
    device = setup(args)
    load_at_start = load_average()
    monai = import_monai(args.no_monai)
    names = args.models or list(OURS) + (list(MONAI) if monai else [])

    x = torch.randn(args.batch, IN_CHANNELS, args.size, args.size, args.size, device=device)
    models, results = {}, {}
    for name in names:
        try:
            models[name] = build(name).to(device)
            results[name] = {"parameters": count_parameters(models[name])}
        except Exception as err:  # a network that cannot be built is reported, the others still run
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    for mode, step in zip(MODES, (train_step, eval_step)):
        for name in list(models):
            try:  # warm-up (at least one step: a network that fails, e.g. on an input size it cannot take,
                for _ in range(max(args.warmup, 1)):  # is reported and dropped before the timed rounds)
                    step(models[name].train(mode == "forward_backward"), x)
            except Exception as err:
                results[name]["error"] = f"{type(err).__name__}: {err}"
                del models[name]
        for name, timing in timed_rounds(models, step, x, args.repeats, args.budget, device).items():
            results[name][mode] = timing
            log(f"{mode} {name}: {timing}")

    report = {
        "benchmark": "models",
        "input": [args.batch, IN_CHANNELS, args.size, args.size, args.size],
        "step": "forward_backward: train-mode forward + backward of the mean of all outputs (float32); "
                "forward_eval: eval-mode forward under no_grad",
        "models": results,
        "ratios_ours_over_monai": ratios(results) if monai else monai_skipped(args.no_monai),
    }
    return finish(report, args, device, load_at_start)


if __name__ == "__main__":
    sys.exit(main())
