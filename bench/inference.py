"""Inference benchmark (JSON out): seconds per full-size case end to end, sliding-window windows/s.

    python bench/inference.py [-o bench/results/inference_cpu.json]
    PYTHONPATH=/tmp/peer_pkgs python bench/inference.py          # + MONAI on the same case and network
    python bench/inference.py --device cuda --features 32 64 128 256 320 320 --sw-batch-size 4

1. One synthetic BraTS case (default 240 x 240 x 155, 4 int16 modalities, gzip NIfTI) and a U-Net
   checkpoint with random weights (default a tiny one, ``--features 4 8 16 32``: CPU time is
   then the sliding window's, not a real network's) are written to a work folder.
2. End to end: ``infer.py`` on the case without its seg file (read, brain crop + z-score,
   sliding window on the crop, softmax, argmax, write the NIfTI mask in the input geometry; no
   metrics), TTA off and on (on the GPU the 8 flips share the windows' forward passes, on the CPU
   they run one after another), with infer.py's read / predict / write split, for each backend of
   the network (``end_to_end_backends``): PyTorch eager (``infer.backend=torch``), the same with
   the network and its windows in ``channels_last_3d`` (``torch_channels_last``), ONNX Runtime on
   the checkpoint exported once by ``export.py``'s code (``onnxruntime``: ``infer.py --checkpoint
   unet.onnx``), and the .pt with ``infer.backend=onnxruntime`` (``onnxruntime_in_memory``: the
   export inside every run, ``--no-in-memory`` skips it). All timed alternately with MONAI's
   cropped pipeline (step 4) when MONAI is there, so machine load affects all of them alike.
   ``end_to_end`` is the default path (infer.py with the .pt). ``network_one_batch`` times the
   network alone on one batch of ``--sw-batch-size`` windows in the three backends, and
   ``onnxruntime_agreement`` compares ONNX Runtime with PyTorch on the whole volume (step 3's
   sliding window): max abs probability difference and the fraction of identical argmax voxels.
3. Sliding window alone on the whole z-scored volume (no crop; ours takes the softmax of each
   window before blending, as nnU-Net, MONAI blends logits and takes it once): windows/s for the
   U-Net and for a one-layer pointwise network (``Conv3d(4, 4, 1)``), whose time is almost all
   the sliding-window machinery (window extraction, Gaussian weighting, accumulation); with
   MONAI the two libraries are timed alternately.
4. With MONAI: ``monai.inferers.sliding_window_inference`` with the same network, window, overlap,
   Gaussian mode (sigma 0.125) and sw_batch_size on the same volume (step 3), and a MONAI
   end-to-end pipeline on the same files: ``LoadImaged`` -> ``EnsureChannelFirstd`` ->
   [``CropForegroundd``] -> ``NormalizeIntensityd(nonzero, channel_wise)`` ->
   ``sliding_window_inference`` (TTA: called once per flip, 8 calls, outputs flipped back and
   averaged) -> softmax -> argmax -> ``Invertd`` (undo the crop) -> ``SaveImage``. Timed with
   ``CropForegroundd`` (the brain crop, as ours) TTA off and on, and on the whole volume TTA off
   (MONAI's default usage; the whole volume with TTA is 8x that). The two sliding windows differ
   by design in window placement (MONAI: regular stride, last window moved back; ours: evenly
   spread, as nnU-Net) and MONAI floors its Gaussian map at 1e-3; ``agreement`` removes both
   differences on a sub-volume where the starts coincide and should be ~0.
Warm-up: one forward pass of a window batch first; the cheap measurements (TTA off on the brain
crop, the pointwise network) also get ``--warmup`` untimed runs, the expensive ones (TTA, whole
volume) none. ``--budget`` (30 s per library) stops repeating a measurement once spent, so on a
slow CPU the expensive ones are timed once unless it is raised (``runs`` in the JSON).
"""
from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import infer  # noqa: E402
from bench.common import (  # noqa: E402
    benchmark_parser,
    finish,
    import_monai,
    load_average,
    log,
    measure,
    measure_alternating,
    monai_skipped,
    per_second,
    ratio,
    setup,
    synthetic_cases,
    work_dir,
)
from core.boxes import bounding_box  # noqa: E402
from core.checkpoint import save_checkpoint  # noqa: E402
from core.config import Config, to_dict  # noqa: E402
from core.task import builtin_tasks  # noqa: E402
from datasets.io import read_case  # noqa: E402
from datasets.preprocess import brain_mask, zscore_in_mask
from inference import sliding_window  # noqa: E402
from inference.onnx_export import export_network, exporter_available  # noqa: E402
from inference.predict import auto_backend, load_model  # noqa: E402
from inference.sliding_window import FLIP_DIMS, sliding_window_predict, window_starts  # noqa: E402
from models import build_model, count_parameters  # noqa: E402

TASK = builtin_tasks()["brats-gli-2021"]  # the task of the synthetic benchmark case
MODALITIES = ["t1", "t1ce", "t2", "flair"]
SIGMA = 0.125  # Gaussian sigma as a fraction of the window, both libraries


def unet_config(args) -> Config:
    """Config of the benchmarked U-Net (labels mode: softmax over 4 classes) and its inference."""
    cfg = Config()
    unet = cfg.model.unet3d
    unet.features = list(args.features)
    unet.strides = [1] + [2] * (len(args.features) - 1)
    unet.blocks_per_stage = [1] * len(args.features)
    unet.deep_supervision = False
    cfg.data.patch_size = list(args.window)
    cfg.infer.device = args.device
    cfg.infer.overlap = args.overlap
    cfg.infer.sw_batch_size = args.sw_batch_size
    cfg.infer.gaussian_sigma = SIGMA
    cfg.infer.precision = args.precision
    return cfg


def test_folder(case, work: Path) -> Path:
    """A dataset folder holding the case's images only (symlinks): infer.py computes no metrics."""
    folder = work / "test" / case.folder.parent.name / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    for path, _ in case.image_sources(MODALITIES, TASK):
        link = folder / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(path.resolve())
    return folder.parent


class ChannelsLast(nn.Module):
    """``model`` with its weights and every input in ``channels_last_3d`` (as train.py trains)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last_3d))


@contextlib.contextmanager
def channels_last_inference():
    """infer.py's networks wrapped in ``ChannelsLast`` while the block runs."""
    load = infer.load_models

    def load_channels_last(*args, **kwargs):
        models, spec = load(*args, **kwargs)
        return [ChannelsLast(m) for m in models], spec

    infer.load_models = load_channels_last
    try:
        yield
    finally:
        infer.load_models = load


def end_to_end_fn(ckpt: Path, data: Path, out: Path, tta: bool, logs: list[str], backend: str = "torch",
                  channels_last: bool = False):
    """``fn()`` running ``infer.main`` on the case (its printed lines appended to ``logs``) with
    ``infer.backend=backend`` (an .onnx ``ckpt`` always runs in ONNX Runtime)."""
    argv = ["--checkpoint", str(ckpt), "-i", str(data), "-o", str(out), "--overwrite",
            f"infer.tta={str(tta).lower()}", f"infer.backend={backend}"]

    def run():
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), (channels_last_inference() if channels_last
                                                  else contextlib.nullcontext()):
            code = infer.main(argv)
        if code:
            raise RuntimeError(f"infer.py exited with {code}")
        logs.append(stdout.getvalue())

    return run


def export_onnx(ckpt: Path, work: Path) -> tuple[Path | None, dict]:
    """``(unet.onnx, report)``: the checkpoint exported as export.py does (verified against
    PyTorch), or ``(None, {"skipped": why})`` without the ONNX packages."""
    if not exporter_available():
        return None, {"skipped": "onnx, onnxscript or onnxruntime is not importable (pip install -r "
                                 "requirements-test.txt)"}
    import onnxruntime

    model, spec = load_model(ckpt)
    data, report = export_network(model, spec, where=str(ckpt))
    path = work / "unet.onnx"
    path.write_bytes(data)
    return path, {**report, "onnxruntime": onnxruntime.__version__, "megabytes": round(len(data) / 1e6, 2)}


def network_one_batch(model: nn.Module, onnx_path: Path | None, args, device) -> dict:
    """Seconds of the network alone on one batch of ``sw_batch_size`` windows: PyTorch eager,
    channels_last_3d, ONNX Runtime (alternated); speedups over eager."""
    from inference.onnx_model import OnnxModel

    batch = torch.randn((args.sw_batch_size, len(MODALITIES)) + args.window, generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)
    fast = ChannelsLast(build_model(unet_config(args).model, len(MODALITIES), 4, args.window)).to(device).eval()
    fast.model.load_state_dict(model.state_dict())
    runners = {"torch": model, "torch_channels_last": fast}
    if onnx_path is not None:
        runners["onnxruntime"] = OnnxModel(onnx_path, device)

    def call(net):
        def fn():
            with torch.inference_mode():
                net(batch)
        return fn

    timings = measure_alternating({k: call(v) for k, v in runners.items()}, args.repeats, args.warmup, args.budget,
                                  device)
    out = {"windows": args.sw_batch_size, **{f"{k}_seconds": v for k, v in timings.items()}}
    for name in list(timings)[1:]:
        out[f"speedup_{name}_over_torch"] = ratio(timings["torch"]["median_s"], timings[name]["median_s"], 2)
    return out


def onnxruntime_agreement(model: nn.Module, onnx_path: Path, volume: torch.Tensor, args, device) -> dict:
    """PyTorch vs ONNX Runtime on the whole volume (softmax probabilities blended by the sliding window)."""
    from inference.onnx_model import OnnxModel

    probs = [sliding_window_predict(net, volume, args.window, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                                    mode="labels", device=device, precision=args.precision).cpu()
             for net in (model, OnnxModel(onnx_path, device))]
    return {"max_abs_probability_difference": float((probs[0] - probs[1]).abs().max()),
            "identical_argmax_fraction": float((probs[0].argmax(0) == probs[1].argmax(0)).double().mean()),
            "voxels": int(probs[0][0].numel())}


def infer_split(log_text: str) -> dict:
    """infer.py's own read / predict / write split of a run, from its line
    "<case>: written in 8.7 s (read 0.6, predict 7.9, write 0.1)"."""
    split = re.search(r"written in [\d.]+ s \((.*)\)", log_text).group(1)
    return {k: float(v) for k, v in (part.split() for part in split.split(", "))}


# ----------------------------------------------------------------------------------------------
# MONAI.
# ----------------------------------------------------------------------------------------------
def monai_infer_fn(model: nn.Module, args):
    """``fn(volume (1, C, X, Y, Z), tta, softmax) -> (1, K, X, Y, Z)`` with MONAI's sliding window:
    blended logits, softmax applied after blending (as MONAI's post-transforms do); TTA = 8 calls."""
    from monai.inferers import sliding_window_inference

    def fn(volume: torch.Tensor, tta: bool = False, softmax: bool = True) -> torch.Tensor:
        with torch.inference_mode():
            total = None
            for dims in FLIP_DIMS if tta else ((),):
                flipped = volume.flip(dims) if dims else volume
                out = sliding_window_inference(flipped, args.window, args.sw_batch_size, model, overlap=args.overlap,
                                               mode="gaussian", sigma_scale=SIGMA, sw_device=args.device,
                                               device=args.device)
                out = out.flip(dims) if dims else out
                probs = torch.softmax(out, dim=1) if softmax else out
                total = probs if total is None else total + probs
            return total / (len(FLIP_DIMS) if tta else 1)

    return fn


def monai_end_to_end_fn(case, model: nn.Module, out: Path, tta: bool, crop: bool, args):
    """``fn()``: MONAI's read -> preprocess -> sliding window -> argmax -> invert -> write of one case."""
    from monai.data import MetaTensor
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        NormalizeIntensityd,
        SaveImage,
    )

    preprocess = Compose([LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image"),
                          *([CropForegroundd(keys="image", source_key="image")] if crop else []),
                          NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)])
    invert = Invertd(keys="pred", transform=preprocess, orig_keys="image", nearest_interp=True)
    save = SaveImage(output_dir=str(out), output_postfix="seg", separate_folder=False, output_dtype=np.uint8,
                     print_log=False)
    labels = torch.tensor([0, 1, 2, 4], dtype=torch.uint8)  # classes -> 2021 label values, as ours writes
    infer_fn = monai_infer_fn(model, args)
    sample = {"image": [str(p) for p, _ in case.image_sources(MODALITIES, TASK)]}

    def run():
        data = preprocess(dict(sample))
        probs = infer_fn(data["image"][None], tta)[0]
        classes = probs.argmax(0, keepdim=True).to(torch.uint8).cpu()
        data["pred"] = MetaTensor(classes, meta=data["image"].meta, applied_operations=data["image"].applied_operations)
        pred = invert(data)["pred"] if crop else data["pred"]  # back to the full grid
        save(MetaTensor(labels[pred.long()], meta=pred.meta))

    return run


def agreement(model, volume: torch.Tensor, args, monai_fn) -> float:
    """Largest output difference on a centred sub-volume where both libraries place the same
    windows (size = window + k * step), with our Gaussian floored at 1e-3 like MONAI's; raw logits
    blended (no activation) on both sides."""
    step = [max(1, int(w * (1 - args.overlap))) for w in args.window]
    size = [w + (s - w) // st * st for s, w, st in zip(volume.shape[1:], args.window, step)]
    start = [(s - n) // 2 for s, n in zip(volume.shape[1:], size)]
    sub = volume[(slice(None),) + tuple(slice(a, a + n) for a, n in zip(start, size))]
    theirs = monai_fn(sub[None], False, False)[0]
    exact = sliding_window.gaussian_importance_map
    sliding_window.gaussian_importance_map = lambda w, s, device="cpu", dtype=torch.float32: exact(
        w, s, device, dtype).clamp(min=1e-3)
    try:
        ours = sliding_window.sliding_window_predict(model, sub, args.window, overlap=args.overlap,
                                                     sw_batch_size=args.sw_batch_size, mode=None,
                                                     device=args.device, precision=args.precision)
    finally:
        sliding_window.gaussian_importance_map = exact
    return float((theirs.float().cpu() - ours.cpu()).abs().max())


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, repeats=3, budget=30.0)
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], help="case shape X Y Z")
    parser.add_argument("--window", type=int, nargs=3, default=[128, 128, 128], help="sliding window X Y Z")
    parser.add_argument("--features", type=int, nargs="+", default=[4, 8, 16, 32], help="U-Net channels per stage")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast on CUDA")
    parser.add_argument("--no-tta", action="store_true", help="skip the TTA runs (8x the windows)")
    parser.add_argument("--no-in-memory", action="store_true",
                        help="skip the .pt run with infer.backend=onnxruntime (its export is inside every run)")
    args = parser.parse_args(argv)
    device = setup(args)
    args.device = str(device)
    args.window = tuple(args.window)
    load_at_start = load_average()
    monai = import_monai(args.no_monai)
    cfg = unet_config(args)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(MODALITIES), 4, cfg.data.patch_size).to(device).eval()
    pointwise = nn.Conv3d(len(MODALITIES), 4, 1).to(device).eval()
    report: dict = {
        "benchmark": "inference", "case_shape": args.shape, "window": list(args.window), "overlap": args.overlap,
        "sw_batch_size": args.sw_batch_size, "gaussian_sigma": SIGMA, "precision": args.precision,
        "model": {"name": "unet3d", "features": args.features, "parameters": count_parameters(model)},
        "repeats": args.repeats, "budget_s": args.budget,
        "monai": monai.__version__ if monai else monai_skipped(args.no_monai),
    }
    ttas = [False] if args.no_tta else [False, True]
    with work_dir(args) as work:
        (case,), report["generate_s"] = synthetic_cases(work / "data", 1, args.shape)
        ckpt = save_checkpoint({"config": to_dict(cfg), "task": TASK.to_dict(), "modalities": MODALITIES,
                                "model": model.cpu().state_dict()},
                               work / "unet.pt")
        model.to(device)
        onnx_path, report["onnx_export"] = export_onnx(ckpt, work)
        report["infer_backend_auto_one_case"] = {  # what infer.backend=auto picks for this run of one case
            key: auto_backend([ckpt], device, len(FLIP_DIMS) if tta else 1)[0]
            for key, tta in (("tta_off", False), ("tta_on", True))}
        images, _, _ = read_case(case, TASK, MODALITIES, with_label=False)
        mask = brain_mask(images)
        box = bounding_box(mask)
        crop = [b - a for a, b in box]
        report["brain_crop_shape"] = crop
        report["windows"] = {
            "brain_crop": len(window_starts([max(c, w) for c, w in zip(crop, args.window)], args.window, args.overlap)),
            "whole_volume": len(window_starts(args.shape, args.window, args.overlap))}

        with torch.inference_mode():  # first-call allocations and kernel choices, once for all timings
            model(torch.zeros((args.sw_batch_size, len(MODALITIES)) + args.window, device=device))
        report["network_one_batch"] = network_one_batch(model, onnx_path, args, device)
        log(f"network alone, one batch of windows: {report['network_one_batch']}")
        # ---- end to end: ours (infer.py, each backend) and MONAI with CropForeground, alternated, TTA off / on ----
        data = test_folder(case, work)
        report["end_to_end"], report["end_to_end_backends"], report["monai_end_to_end"] = {}, {}, {}
        for tta in ttas:
            key = "tta_on" if tta else "tta_off"
            logs: dict[str, list[str]] = {}
            fns = {}
            for name, path, backend, last in (
                    ("torch", ckpt, "torch", False), ("torch_channels_last", ckpt, "torch", True),
                    ("onnxruntime", onnx_path, "torch", False),  # an .onnx always runs in ONNX Runtime
                    ("onnxruntime_in_memory", ckpt if onnx_path and not args.no_in_memory else None, "onnxruntime",
                     False)):
                if path is None:
                    continue
                logs[name] = []
                fns[name] = end_to_end_fn(path, data, work / "out", tta, logs[name], backend, last)
            if monai:
                fns["monai"] = monai_end_to_end_fn(case, model, work / "monai_out", tta, True, args)
            timings = measure_alternating(fns, args.repeats, args.warmup if not tta else 0,
                                          args.budget * len(fns), device)
            for name in logs:
                entry = {"seconds": timings[name], **infer_split(logs[name][-1])}
                report["end_to_end_backends"].setdefault(name, {})[key] = entry
                log(f"ours end to end {name} {key}: {entry}")
            report["end_to_end"][key] = report["end_to_end_backends"]["torch"][key]
            if monai:
                report["monai_end_to_end"][f"crop_foreground_{key}"] = timings["monai"]
                log(f"MONAI end to end crop_foreground_{key}: {timings['monai']}")
        if not monai:
            del report["monai_end_to_end"]

        # ---- sliding window alone on the whole volume: ours, MONAI ----
        volume = torch.from_numpy(zscore_in_mask(images, mask)).to(device)
        if onnx_path is not None:
            report["onnxruntime_agreement"] = onnxruntime_agreement(model, onnx_path, volume, args, device)
            log(f"ONNX Runtime vs PyTorch, whole volume: {report['onnxruntime_agreement']}")
        monai_fns = {"unet": monai_infer_fn(model, args), "pointwise": monai_infer_fn(pointwise, args)} if monai else {}
        report["sliding_window_whole_volume"] = {}
        for name, net in (("pointwise", pointwise), ("unet", model)):
            windows = report["windows"]["whole_volume"]

            def ours_fn(net=net):
                return sliding_window_predict(net, volume, args.window, overlap=args.overlap,
                                              sw_batch_size=args.sw_batch_size, mode="labels", device=device,
                                              precision=args.precision)

            warmup = args.warmup if name == "pointwise" else 0  # the U-Net was warmed up on one window batch
            fns = {"ours": ours_fn}
            if monai:
                fns["monai"] = lambda fn=monai_fns[name]: fn(volume[None])
            timings = measure_alternating(fns, args.repeats, warmup, args.budget, device)
            entry = {"windows": windows}
            for who, timing in timings.items():
                entry[f"{who}_seconds"], entry[f"{who}_windows_per_s"] = timing, per_second(windows, timing)
            if monai:
                entry["time_ratio_monai_over_ours"] = ratio(timings["monai"]["median_s"], timings["ours"]["median_s"])
            report["sliding_window_whole_volume"][name] = entry
            log(f"sliding window, whole volume, {name}: {entry}")

        # ---- MONAI end to end on the whole volume (its default usage), TTA off ----
        if monai:
            report["monai_end_to_end"]["whole_volume_tta_off"] = measure(
                monai_end_to_end_fn(case, model, work / "monai_out", False, False, args), args.repeats, 0,
                args.budget, device)
            log(f"MONAI end to end whole_volume_tta_off: {report['monai_end_to_end']['whole_volume_tta_off']}")
            report["agreement_max_abs_difference"] = agreement(model, volume, args, monai_fns["unet"])
            report["ratios_monai_over_ours"] = ratios(report)
    report["end_to_end_speedups"] = backend_ratios(report)
    return finish(report, args, device, load_at_start)


def median(entry: dict) -> float:
    return entry["seconds"]["median_s"] if "seconds" in entry else entry["median_s"]


def backend_ratios(report: dict) -> dict:
    """End to end: each backend's speedup over PyTorch eager and, with MONAI, MONAI's cropped
    pipeline over each backend (> 1: ours is faster)."""
    out = {}
    torch_entry, theirs = report["end_to_end_backends"]["torch"], report.get("monai_end_to_end", {})
    for name, entries in report["end_to_end_backends"].items():
        for key, entry in entries.items():
            if name != "torch":
                out[f"{name}_over_torch_{key}"] = ratio(median(torch_entry[key]), median(entry), 2)
            if f"crop_foreground_{key}" in theirs:
                out[f"monai_crop_foreground_over_{name}_{key}"] = ratio(median(theirs[f"crop_foreground_{key}"]),
                                                                      median(entry), 2)
    return out


def ratios(report: dict) -> dict:
    """MONAI's median seconds over ours (> 1: ours is faster)."""
    ours, theirs = report["end_to_end"], report["monai_end_to_end"]
    out = {}
    for key, (mine, other) in {
        "end_to_end_tta_off_vs_monai_crop_foreground": ("tta_off", "crop_foreground_tta_off"),
        "end_to_end_tta_on_vs_monai_crop_foreground_8_calls": ("tta_on", "crop_foreground_tta_on"),
        "end_to_end_tta_off_vs_monai_whole_volume": ("tta_off", "whole_volume_tta_off"),
    }.items():
        if mine in ours and other in theirs:
            out[key] = ratio(median(theirs[other]), median(ours[mine]), 2)
    for name, entry in report["sliding_window_whole_volume"].items():
        out[f"sliding_window_whole_volume_{name}"] = entry.get("time_ratio_monai_over_ours")
    return out


if __name__ == "__main__":
    sys.exit(main())
