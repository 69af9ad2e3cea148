"""CPU inference benchmark (JSON out): seconds per full-size case end to end, sliding-window throughput.

    python bench/inference_cpu.py [-o bench/results/inference_cpu.json]
    PYTHONPATH=/tmp/peer_pkgs python bench/inference_cpu.py   # also times MONAI (pip install --target /tmp/peer_pkgs --no-deps monai)

1. One synthetic BraTS case (``datasets.synthetic``, default 240 x 240 x 155, 4 int16 modalities)
   and a tiny U-Net checkpoint with random weights are written to a temporary folder.
2. End to end: ``infer.py`` on that case without its seg file (read, preprocess, sliding window,
   post-process, write; no metrics), TTA off and on: wall-clock seconds and infer.py's split.
3. Sliding window alone on the whole (uncropped, z-scored) volume, no activation: windows/second,
   and, when MONAI is importable, ``monai.inferers.sliding_window_inference`` with the same network,
   window, overlap, Gaussian weighting (sigma 0.125) and sw_batch_size, with the time ratio and the
   differences between the two outputs. They differ by design in two ways: window starts (MONAI:
   a regular stride with the last window moved back; ours: evenly spread, as nnU-Net), which
   changes the output of a network with instance norm; and MONAI's floor of 1e-3 on the Gaussian
   map (ours keeps the exact ratios, as nnU-Net, so window borders barely count at the volume's
   corners). A third number removes both (a sub-volume where the starts coincide, our map
   floored like MONAI's) and should be ~0.
Each timing is the best of ``--repeats`` runs after one warm-up forward pass.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import infer  # noqa: E402
from datasets.io import discover_cases, read_case  # noqa: E402
from datasets.preprocess import brain_mask, zscore_in_mask  # noqa: E402
from datasets.synthetic import generate_case  # noqa: E402
from engine.checkpoint import save_checkpoint  # noqa: E402
from engine.config import Config, to_dict  # noqa: E402
from engine import sliding_window  # noqa: E402
from engine.sliding_window import sliding_window_predict, window_starts  # noqa: E402
from models import build_model, count_parameters  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], help="case shape (X Y Z)")
    parser.add_argument("--window", type=int, nargs=3, default=[128, 128, 128], help="sliding window (X Y Z)")
    parser.add_argument("--features", type=int, nargs="+", default=[4, 8, 16, 32], help="U-Net channels per stage")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (best is kept)")
    parser.add_argument("--no-tta", action="store_true", help="skip the end-to-end run with TTA (8x slower)")
    parser.add_argument("-o", "--output", default=str(Path(__file__).parent / "results" / "inference_cpu.json"))
    return parser.parse_args(argv)


def best_time(fn, repeats: int) -> tuple[float, object]:
    """``(fastest wall-clock seconds of repeats calls, that call's result)``."""
    best, best_result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        if seconds < best:
            best, best_result = seconds, result
    return best, best_result


def tiny_unet_config(args) -> Config:
    cfg = Config()
    unet = cfg.model.unet3d
    unet.features = list(args.features)
    unet.strides = [1] + [2] * (len(args.features) - 1)
    unet.blocks_per_stage = [1] * len(args.features)
    unet.deep_supervision = False
    cfg.data.patch_size = list(args.window)
    cfg.infer.device = "cpu"
    cfg.infer.overlap = args.overlap
    cfg.infer.sw_batch_size = args.sw_batch_size
    return cfg


def end_to_end(ckpt: Path, data: Path, out: Path, tta: bool, repeats: int) -> dict:
    """Wall-clock seconds of ``infer.main`` on the case, with infer.py's own per-step split."""
    argv = ["--checkpoint", str(ckpt), "-i", str(data), "-o", str(out), "--overwrite", f"infer.tta={str(tta).lower()}"]

    def run():
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = infer.main(argv)
        if code:
            raise RuntimeError(f"infer.py exited with {code}")
        return stdout.getvalue()

    seconds, log = best_time(run, repeats)
    steps = re.search(r"written in [\d.]+ s \((.*)\)", log).group(1)  # "read 1.2, predict 3.4, write 0.5"
    return {"seconds": seconds, **{k: float(v) for k, v in (part.split() for part in steps.split(", "))}}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    cfg = tiny_unet_config(args)
    model = build_model(cfg.model, 4, 4, cfg.data.patch_size).eval()
    window = tuple(args.window)
    results: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "case_shape": args.shape, "window": list(window), "overlap": args.overlap,
        "sw_batch_size": args.sw_batch_size, "model": {"name": "unet3d", "features": args.features,
                                                     "parameters": count_parameters(model)},
        "repeats": args.repeats,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = generate_case(tmp / "data", 0, seed=0, convention="2021", shape=tuple(args.shape))
        for seg in folder.glob("*_seg.nii.gz"):  # a test case: no reference, so no metrics in the timing
            seg.unlink()
        ckpt = save_checkpoint({"config": to_dict(cfg), "convention": "2021", "model": model.state_dict()},
                               tmp / "tiny.pt")
        with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
            model(torch.zeros((args.sw_batch_size, 4) + window))

        images, _, geometry = read_case(discover_cases(tmp / "data")[0], cfg.data.modalities)
        mask = brain_mask(images)
        crop = [int(s) for s in np.ptp(np.argwhere(mask), axis=0) + 1]
        results["brain_crop_shape"] = crop
        results["windows_cropped"] = len(window_starts([max(c, w) for c, w in zip(crop, window)], window, args.overlap))
        results["end_to_end"] = {}
        for tta in ([False] if args.no_tta else [False, True]):
            key = "tta_on" if tta else "tta_off"
            results["end_to_end"][key] = end_to_end(ckpt, tmp / "data", tmp / "out", tta, args.repeats)
            print(f"end to end, {key}: {results['end_to_end'][key]}", file=sys.stderr)

        volume = torch.from_numpy(zscore_in_mask(images, mask))
        results["sliding_window_full_volume"], results["monai"] = full_volume(model, volume, window, args)
    print(json.dumps(results, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def full_volume(model, volume: torch.Tensor, window, args) -> tuple[dict, dict]:
    """Our sliding window and MONAI's on the whole volume, timed alternately (same machine load)."""
    try:
        import monai
        from monai.inferers import sliding_window_inference
    except ImportError:
        sliding_window_inference = None

    def ours_fn():
        return sliding_window_predict(model, volume, window, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                                      mode=None, device="cpu")

    def monai_fn():
        with torch.inference_mode():
            return sliding_window_inference(volume[None], window, args.sw_batch_size, model, overlap=args.overlap,
                                            mode="gaussian", sigma_scale=0.125)[0]

    times: dict[str, float] = {"ours": math.inf, "monai": math.inf}
    for _ in range(args.repeats):
        seconds, ours = best_time(ours_fn, 1)
        times["ours"] = min(times["ours"], seconds)
        if sliding_window_inference is not None:
            seconds, theirs = best_time(monai_fn, 1)
            times["monai"] = min(times["monai"], seconds)
    n_windows = len(window_starts(volume.shape[1:], window, args.overlap))
    ours_summary = {"windows": n_windows, "seconds": times["ours"], "windows_per_second": n_windows / times["ours"]}
    print(f"sliding window, full volume: {ours_summary}", file=sys.stderr)
    if sliding_window_inference is None:
        return ours_summary, {"skipped": "monai not importable (pip install --target /tmp/peer_pkgs --no-deps monai; "
                                         "PYTHONPATH=/tmp/peer_pkgs)"}
    diff = (theirs.float() - ours).abs()
    monai_summary = {
        "version": monai.__version__, "seconds": times["monai"], "ours_seconds": times["ours"],
        "time_ratio_monai_over_ours": times["monai"] / times["ours"],
        "max_abs_difference_of_logits": float(diff.max()), "mean_abs_difference_of_logits": float(diff.mean()),
        "mean_abs_logit": float(ours.abs().mean()),
        "fraction_of_voxels_differing_over_0.1": float((diff > 0.1).float().mean()),
        "fraction_of_voxels_with_another_argmax": float((theirs.argmax(0) != ours.argmax(0)).float().mean()),
        "same_placement_and_floor_max_abs_difference": same_placement_difference(
            model, volume, window, args, sliding_window_inference),
    }
    print(f"MONAI: {monai_summary}", file=sys.stderr)
    return ours_summary, monai_summary


def same_placement_difference(model, volume: torch.Tensor, window, args, monai_inference) -> float:
    """Largest output difference on a centred sub-volume where both libraries place the same windows
    (size = window + k * step), with our Gaussian floored at 1e-3 like MONAI's: ~0 when the two
    implement the same weighted blending."""
    step = [max(1, int(w * (1 - args.overlap))) for w in window]
    size = [w + (s - w) // st * st for s, w, st in zip(volume.shape[1:], window, step)]
    start = [(s - n) // 2 for s, n in zip(volume.shape[1:], size)]
    sub = volume[(slice(None),) + tuple(slice(a, a + n) for a, n in zip(start, size))]
    with torch.inference_mode():
        theirs = monai_inference(sub[None], window, args.sw_batch_size, model, overlap=args.overlap,
                                 mode="gaussian", sigma_scale=0.125)[0]
    exact = sliding_window.gaussian_importance_map
    sliding_window.gaussian_importance_map = lambda w, s, device="cpu", dtype=torch.float32: exact(
        w, s, device, dtype).clamp(min=1e-3)
    try:
        ours = sliding_window.sliding_window_predict(model, sub, window, overlap=args.overlap,
                                                     sw_batch_size=args.sw_batch_size, mode=None, device="cpu")
    finally:
        sliding_window.gaussian_importance_map = exact
    return float((theirs.float() - ours).abs().max())


if __name__ == "__main__":
    sys.exit(main())
