"""Export a trained checkpoint to ONNX, with everything infer.py needs in its metadata.

    python export.py --checkpoint runs/unet3d/best.pt -o unet3d.onnx [--window 128 128 128] [--opset 20]
    python export.py --checkpoint fold0/best.pt --checkpoint fold1/best.pt -o folds.onnx   # folds-1.onnx, folds-2.onnx
    python infer.py --checkpoint unet3d.onnx -i /data/BraTS2021_Validation -o predictions/unet3d   # ONNX Runtime

The graph takes one sliding window: float32 ``image (batch, C, X, Y, Z)`` -> ``logits (batch, K, X, Y,
Z)``, the window (``--window``, default the training patch size) fixed, the batch dimension dynamic
(windows and their TTA flips are batched). Its ``metadata_props`` hold the resolved config, the task
(``Task.to_dict``), the modalities in channel order, the preprocessing (normalisation), the voxel
spacing, the output mode (softmax labels or sigmoid regions) and how it decodes into labels, the
window, post-processing tuned at training time and a format version (``inference/onnx_model.py``).

Each export is checked with ``onnx.checker`` and, unless ``--no-verify``, by running one random
window through PyTorch and ONNX Runtime: probabilities must agree within 1e-3 (the figure is
printed), else nothing is written. Both networks export (unet3d, swin_unetr).

Ensembles: several ``--checkpoint`` (they must agree as infer.py's ensembles do) give one file per
member, ``OUT-1.onnx``, ``OUT-2.onnx``, ... in the order given; ``infer.py`` averages their
probabilities after each member's sliding window, as it does for checkpoints.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from core.atomic import atomic_write_bytes, check_writable
from core.checkpoint import file_sha256
from core.errors import UserError, run_cli
from inference.onnx_export import DEFAULT_OPSET, export_network
from inference.predict import check_ensemble, load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                        help="checkpoint (.pt); repeat for an ensemble (one .onnx per member)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx",
                        help="the ONNX file; with several checkpoints OUT-1.onnx, OUT-2.onnx, ...")
    parser.add_argument("--window", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="sliding window the graph takes (default: the training patch size, data.patch_size)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the PyTorch vs ONNX Runtime check on a random window")
    return parser.parse_args(argv)


def output_paths(output: Path, count: int) -> list[Path]:
    """``OUT.onnx`` for one checkpoint, ``OUT-1.onnx`` ... ``OUT-k.onnx`` for ``count`` members."""
    if output.suffix.lower() != ".onnx":
        raise UserError(f"-o {output}: the file name must end in .onnx (infer.py recognises ONNX models by it)")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, count + 1)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for path in args.checkpoint:
        if path.lower().endswith(".onnx"):
            raise UserError(f"{path}: already an ONNX model; export.py takes PyTorch checkpoints (.pt)")
    paths = output_paths(Path(args.output), len(args.checkpoint))
    check_writable(paths[0].parent if str(paths[0].parent) else Path("."), "-o")  # before any long work
    members = [load_model(checkpoint, "cpu") for checkpoint in args.checkpoint]
    check_ensemble(args.checkpoint, [member_spec for _, member_spec in members])  # they must agree, as in infer.py
    for checkpoint, (model, member_spec), path in zip(args.checkpoint, members, paths):
        extra = {"model": {"name": member_spec.cfg.model.name,
                           "parameters": sum(p.numel() for p in model.parameters())},
                 "source": {"checkpoint": Path(checkpoint).name, "sha256": file_sha256(Path(checkpoint)),
                            "exporter": "export.py, torch.onnx.export (dynamo)"}}
        data, report = export_network(model, member_spec, args.window, opset=args.opset, extra=extra,
                                      verify=not args.no_verify, where=checkpoint)
        atomic_write_bytes(path, data)
        checked = ("" if args.no_verify else
                   f"; PyTorch vs ONNX Runtime on a random window: max |probability difference| "
                   f"{report['max_abs_probability_difference']:.2g}")
        print(f"wrote {path} ({len(data) / 1e6:.1f} MB) from {checkpoint}: {member_spec.cfg.model.name}, "
              f"window {report['window']}, batch dynamic, opset {report['opset']}, exported in "
              f"{report['seconds']:.1f} s{checked}")
    command = " ".join(f"--checkpoint {shlex.quote(str(p))}" for p in paths)
    print(f"next: python infer.py {command} -i INPUT -o OUTPUT   (ONNX Runtime; pip install onnxruntime)")
    return 0


if __name__ == "__main__":
    run_cli(main)
