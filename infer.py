"""Segment BraTS cases with one checkpoint or an ensemble; write masks in the input's geometry.

    python infer.py --checkpoint runs/unet3d/best.pt -i data/brats -o predictions/unet3d
    python infer.py --checkpoint a.pt --checkpoint b.pt -i BraTS2021_00000/ -o out infer.tta=true
    python infer.py ... --save-probabilities --png --overwrite infer.device=cpu infer.et_min_volume=100

INPUT is a BraTS dataset folder (one sub-folder per case) or one case folder; the modalities the
checkpoint was trained on are read under either naming (t1/t1n, t1ce/t1c, t2/t2w, flair/t2f).
Per case: the training preprocessing (brain crop, z-score), sliding-window inference (Gaussian
blending, optional mirror TTA, ensembles averaged), optional post-processing (``infer.*`` keys),
then ``OUTPUT/<case_id>.nii.gz``: uint8 labels pasted back into the original shape with the
input's affine and header. Labels follow ``infer.output_convention``: by default the input's
convention (ET=4 for 2018-2021 data, ET=3 for 2023+), read from its seg file or else its file
names, and the checkpoint's training convention when neither tells.

Cases are pipelined: while one is predicted, the next is read and preprocessed and the previous
one written and scored, in two background threads. Existing outputs are kept (and still
evaluated) unless ``--overwrite``. When a case has a seg
file, per-case metrics go to ``OUTPUT/metrics.json`` and ``OUTPUT/metrics.csv`` (the format of
``evaluate.py``) and the summary table is printed. ``--save-probabilities`` also writes
``OUTPUT/<case_id>_probs.nii.gz`` (4D, channel last); ``--png`` a picture of three orthogonal slices
through the tumour with the prediction (and reference) overlaid. Only ``infer.*`` and
``metrics.*`` keys can be overridden. A failing case among many is reported and skipped (exit
code 1 at the end); bad input (checkpoint, empty folder, a single bad case) exits 2 with one line.
"""
from __future__ import annotations

import argparse
import logging
import struct
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from datasets.io import Case, Geometry, canonical_modality, discover_cases, read_case, uncrop, write_probabilities, \
    write_segmentation
from datasets.labels import NUM_CLASSES, classes_to_labels, detect_convention, labels_to_classes, \
    probabilities_to_classes
from datasets.preprocess import preprocess_case
from engine.config import Config
from engine.errors import UserError, run_cli
from engine.postprocess import postprocess
from engine.predict import load_models, override_infer_config, predict_case, resolve_device
from metrics import aggregate, case_metrics, evaluate_files, format_table, write_report

PENDING_WRITES = 2  # predicted cases waiting for the writer thread before the prediction loop waits
# file-name suffixes that identify each release's naming (and so its label convention)
NAMING_CONVENTIONS = {"2021": {"t1", "t1ce", "t2", "flair"}, "2023": {"t1n", "t1c", "t2w", "t2f"}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                        help="checkpoint (.pt); repeat for an ensemble (probabilities averaged)")
    parser.add_argument("-i", "--input", required=True, help="BraTS dataset folder or one case folder")
    parser.add_argument("-o", "--output", required=True, help="output folder (outside INPUT)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing predictions")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write OUTPUT/<case_id>_probs.nii.gz")
    parser.add_argument("--png", action="store_true", help="also write OUTPUT/<case_id>.png (3 slices, overlay)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="infer.* / metrics.* config overrides")
    return parser.parse_args(argv)


@dataclass
class Run:
    """Everything the per-case steps share."""

    models: list[torch.nn.Module]
    cfg: Config
    convention: str  # the checkpoint's training convention
    mode: str  # "labels" or "regions"
    device: torch.device
    output: Path
    args: argparse.Namespace
    per_case: dict[str, dict] = field(default_factory=dict)  # case_id -> case_metrics(...)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    input_dir, output = Path(args.input), Path(args.output)
    check_paths(input_dir, output)
    models, cfg, convention, mode = load_models(args.checkpoint, "cpu")
    cfg = override_infer_config(cfg, args.overrides)
    device = resolve_device(cfg.infer.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every window has the same shape: autotune once
    models = [m.to(device) for m in models]
    cases = discover_cases(input_dir)
    output.mkdir(parents=True, exist_ok=True)
    run = Run(models, cfg, convention, mode, device, output, args)
    say(f"{len(cases)} case(s), {len(models)} model(s), {mode} output, device {device}, "
        f"tta={'on' if cfg.infer.tta else 'off'}, window {list(cfg.data.patch_size)}")

    start = time.perf_counter()
    todo, skipped = [], 0
    for case in cases:
        seg_path = output / f"{case.case_id}.nii.gz"
        if seg_path.exists() and not args.overwrite:
            skipped += 1
            say(f"{case.case_id}: {seg_path} exists, skipped (--overwrite to replace)")
            evaluate_existing(run, case, seg_path)
        else:
            todo.append((case, seg_path))
    written, failures = predict_all(run, todo, raise_errors=len(cases) == 1)

    if run.per_case:
        report_metrics(run)
    say(f"done: {written} written, {skipped} skipped, {len(failures)} failed, "
        f"{time.perf_counter() - start:.1f} s total -> {output}")
    if failures:
        print(f"error: {len(failures)} of {len(cases)} cases failed:", file=sys.stderr)
        for case_id, message in failures:
            print(f"  {case_id}: {message}", file=sys.stderr)
        return 1
    return 0


def say(message: str) -> None:
    tqdm.write(message, file=sys.stdout)


def check_paths(input_dir: Path, output: Path) -> None:
    """``UserError`` unless INPUT is a folder and OUTPUT is a folder (or new) outside INPUT."""
    if not input_dir.is_dir():
        raise UserError(f"{input_dir}: input folder not found")
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: output exists and is not a folder")
    inp, out = input_dir.resolve(), output.resolve()
    if out == inp or inp in out.parents:
        raise UserError(f"{output}: the output folder must be outside the input folder {input_dir} "
                        "(the input is never written to)")


def predict_all(run: Run, todo: list[tuple[Case, Path]], raise_errors: bool) -> tuple[int, list[tuple[str, str]]]:
    """Predict and write every ``(case, seg_path)``: ``(written, [(case_id, error), ...])``.

    A pipeline, as in nnU-Net: while case ``i`` is predicted, case ``i + 1`` is read and
    preprocessed and case ``i - 1`` written (and scored) in background threads, so the device does
    not wait for file I/O (at most ``PENDING_WRITES`` cases wait to be written). A failing case is
    reported and skipped; with ``raise_errors`` (a single case) its error is raised instead.
    """
    written, failures, writes = 0, [], deque()

    def fail(case: Case, err: Exception) -> None:
        if raise_errors:
            raise err
        message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        failures.append((case.case_id, message))
        say(f"{case.case_id}: FAILED: {message}")

    def finish_oldest() -> None:
        nonlocal written
        case, timing, future = writes.popleft()
        try:
            timing.update(future.result())
        except Exception as err:
            fail(case, err)
            return
        written += 1
        say(f"{case.case_id}: written in {sum(timing.values()):.1f} s "
            f"({', '.join(f'{k} {v:.1f}' for k, v in timing.items())})")

    with ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
        reads = [reader.submit(read_stage, run, todo[0][0])] if todo else []
        for i, (case, seg_path) in enumerate(tqdm(todo, desc="infer", unit="case", disable=None)):
            if i + 1 < len(todo):
                reads.append(reader.submit(read_stage, run, todo[i + 1][0]))
            try:
                loaded = reads[i].result()
                reads[i] = None  # the writer keeps what it needs; drop the future's reference
                classes, probs, seconds = predict_stage(run, loaded)
            except Exception as err:
                fail(case, err)
                continue
            future = writer.submit(write_stage, run, loaded, classes, probs, seg_path)
            writes.append((case, {"read": loaded.seconds, "predict": seconds}, future))
            while writes and (writes[0][2].done() or len(writes) > PENDING_WRITES):
                finish_oldest()
        while writes:
            finish_oldest()
    return written, failures


@dataclass
class Loaded:
    """One case read and preprocessed."""

    case: Case
    overlay: np.ndarray | None  # (X, Y, Z) the image drawn under the PNG overlay, only with --png
    crop_images: np.ndarray  # (C, x, y, z) brain crop, z-scored
    geometry: Geometry  # with the crop box and the output convention
    ref_classes: np.ndarray | None  # (X, Y, Z) training classes of a usable seg file
    out_convention: str
    seconds: float


def read_stage(run: Run, case: Case) -> Loaded:
    """Read the case's files and apply the training preprocessing."""
    tick = time.perf_counter()
    images, seg, geometry = read_case(case, run.cfg.data.modalities, with_label=True)
    has_reference, seg_convention = reference_convention(case, seg)
    out_convention = output_convention(run.cfg.infer.output_convention, case, seg_convention, run.convention)
    crop_images, _, geometry = preprocess_case(images, None, geometry, out_convention)
    # an ET-free reference reads the same in both conventions
    ref_classes = labels_to_classes(seg, seg_convention or out_convention) if has_reference else None
    overlay = images[overlay_channel(run.cfg.data.modalities)] if run.args.png else None  # not all C channels
    return Loaded(case, overlay, crop_images, geometry, ref_classes, out_convention, time.perf_counter() - tick)


def predict_stage(run: Run, loaded: Loaded) -> tuple[np.ndarray, np.ndarray | None, float]:
    """``(classes (x, y, z) uint8 post-processed, probabilities (K, x, y, z) if they are saved,
    seconds)`` of the cropped case."""
    tick = time.perf_counter()
    cfg = run.cfg
    probs = predict_case(run.models, loaded.crop_images, cfg.infer, cfg.data.patch_size, run.mode, run.device)
    classes = probabilities_to_classes(probs, run.mode, cfg.infer.region_threshold).cpu().numpy()
    classes = postprocess(classes, cfg.infer)
    kept = probs.cpu().numpy() if run.args.save_probabilities else None
    return classes, kept, time.perf_counter() - tick


def write_stage(run: Run, loaded: Loaded, classes: np.ndarray, probs: np.ndarray | None,
                seg_path: Path) -> dict[str, float]:
    """Write the mask (and probabilities / PNG), then score it; returns seconds per step."""
    tick = time.perf_counter()
    case, geometry, cfg = loaded.case, loaded.geometry, run.cfg
    write_segmentation(classes_to_labels(classes, loaded.out_convention), geometry, seg_path)
    if probs is not None:
        write_probabilities(full_probabilities(probs, geometry, run.mode), geometry,
                            run.output / f"{case.case_id}_probs.nii.gz")
    full_classes = uncrop(classes, geometry)
    if run.args.png:
        write_overlay_png(run.output / f"{case.case_id}.png", loaded.overlay, full_classes, loaded.ref_classes,
                          geometry.affine)
    timing = {"write": time.perf_counter() - tick}
    if loaded.ref_classes is not None:
        tick = time.perf_counter()
        run.per_case[case.case_id] = case_metrics(
            full_classes, loaded.ref_classes, geometry.spacing, cfg.metrics.convention, hd95=True,
            dilation=cfg.metrics.lesion_dilation, min_volume=cfg.metrics.lesion_min_volume)
        timing["metrics"] = time.perf_counter() - tick
    return timing


def reference_convention(case: Case, seg: np.ndarray | None) -> tuple[bool, str | None]:
    """``(usable, convention)`` of the case's seg file: ``convention`` is ``None`` when it has no
    ET (both conventions read it the same); values of neither convention make it unusable."""
    if seg is None:
        return False, None
    try:
        return True, detect_convention(np.flatnonzero(np.bincount(seg.ravel())))
    except ValueError as err:
        say(f"{case.case_id}: {case.seg}: {err}; no metrics for this case")
        return False, None


def output_convention(setting: str, case: Case, seg_convention: str | None, checkpoint_convention: str) -> str:
    """Label convention to write: ``setting`` unless "auto"; then the seg file's (when it has ET),
    else the file naming's (t1n/t1c/t2w/t2f -> 2023, t1/t1ce/t2/flair -> 2021), else the checkpoint's."""
    if setting != "auto":
        return setting
    if seg_convention is not None:
        return seg_convention
    suffixes = {path.name[len(case.case_id) + 1:].split(".")[0].lower() for path in case.images.values()}
    naming = next((conv for conv, names in NAMING_CONVENTIONS.items() if suffixes and suffixes <= names), None)
    return naming or checkpoint_convention


def full_probabilities(probs: np.ndarray, geometry: Geometry, mode: str) -> np.ndarray:
    """Cropped probabilities ``(K, x, y, z)`` -> full shape; outside the brain crop background is
    certain (probability 1 for the background class in labels mode, 0 elsewhere)."""
    full = uncrop(probs, geometry, fill=0.0)
    if mode == "labels" and full is not probs and probs.shape[0] == NUM_CLASSES:
        outside = uncrop(np.ones(probs.shape[1:], dtype=bool), geometry, fill=False)
        full[0][~outside] = 1.0
    return full


def evaluate_existing(run: Run, case: Case, seg_path: Path) -> None:
    """Metrics of a kept prediction against the case's reference, so the report covers every case."""
    if case.seg is None:
        return
    metrics_cfg = run.cfg.metrics
    try:
        run.per_case[case.case_id] = evaluate_files(seg_path, case.seg, metrics_cfg.convention, hd95=True,
                                                    dilation=metrics_cfg.lesion_dilation,
                                                    min_volume=metrics_cfg.lesion_min_volume)
    except UserError as err:
        say(f"{case.case_id}: cannot evaluate the existing prediction ({err})")


def report_metrics(run: Run) -> None:
    metrics_cfg = run.cfg.metrics
    per_case = dict(sorted(run.per_case.items()))
    summary = aggregate(per_case)
    json_path, csv_path = run.output / "metrics.json", run.output / "metrics.csv"
    write_report(per_case, summary, json_path, csv_path, metrics_cfg.convention, metrics_cfg.lesion_dilation,
                 metrics_cfg.lesion_min_volume)
    say(f"metrics of {len(per_case)} case(s) with a reference ({metrics_cfg.convention} convention):")
    say(format_table(summary))
    say(f"wrote {json_path} and {csv_path}")


# ----------------------------------------------------------------------------------------------
# PNG overlay: three orthogonal slices through the tumour centre, dependency-free encoder.
# ----------------------------------------------------------------------------------------------
CLASS_COLOURS = np.array([[0, 0, 0], [230, 40, 40], [40, 200, 60], [250, 220, 30]], dtype=np.float32)  # bg NCR ED ET
OVERLAY_ALPHA = 0.5
PNG_MIN_SIZE = 256  # volumes smaller than this (largest axis, voxels) are zoomed by an integer factor


def overlay_channel(modalities: list[str]) -> int:
    """Index of FLAIR among the input channels (else T1ce, else the first)."""
    names = [canonical_modality(m) for m in modalities]
    for wanted in ("flair", "t1ce"):
        if wanted in names:
            return names.index(wanted)
    return 0


def write_overlay_png(path: Path, image: np.ndarray, pred: np.ndarray, ref: np.ndarray | None,
                      affine: np.ndarray) -> Path:
    """Axial, coronal and sagittal slices of ``image (X, Y, Z)`` through the centre of the
    predicted tumour (else the reference's, else the volume's), reoriented to RAS (anterior and
    superior up, patient's left on the left of the picture). Top row: prediction; bottom row:
    reference (when given). NCR red, ED green, ET yellow."""
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.axcodes2ornt("RAS"))
    image, pred = (nib.orientations.apply_orientation(a, transform) for a in (image, pred))
    ref = None if ref is None else nib.orientations.apply_orientation(ref, transform)
    tumour = pred > 0 if (pred > 0).any() else (ref > 0 if ref is not None else np.zeros_like(pred, bool))
    centre = (np.argwhere(tumour).mean(axis=0) if tumour.any() else (np.array(pred.shape) - 1) / 2).round().astype(int)
    grey = _to_grey(image)
    rows = [_slice_row(grey, labels, centre) for labels in ([pred] if ref is None else [pred, ref])]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    picture = np.concatenate(rows, axis=0)
    scale = max(1, PNG_MIN_SIZE // max(pred.shape))  # small volumes: integer nearest-neighbour zoom
    path.write_bytes(encode_png(picture.repeat(scale, axis=0).repeat(scale, axis=1)))
    return path


def _to_grey(image: np.ndarray) -> np.ndarray:
    inside = image[image != 0]
    low, high = (np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0))
    return np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255.0


def _slice_row(grey: np.ndarray, labels: np.ndarray, centre) -> np.ndarray:
    cx, cy, cz = centre
    views = [(grey[:, :, cz], labels[:, :, cz]), (grey[:, cy, :], labels[:, cy, :]), (grey[cx, :, :], labels[cx, :, :])]
    panels = []
    for g, lab in views:  # array (horizontal axis, vertical axis) -> picture rows top-down
        g, lab = np.flipud(g.T), np.flipud(lab.T)
        rgb = np.repeat(g[..., None], 3, axis=2)
        tumour = lab > 0
        rgb[tumour] = (1 - OVERLAY_ALPHA) * rgb[tumour] + OVERLAY_ALPHA * CLASS_COLOURS[lab[tumour]]
        panels.append(rgb)
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 2), (0, 0))) for p in panels]
    return np.concatenate(panels, axis=1).round().astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """``(H, W, 3)`` uint8 -> PNG bytes (8-bit RGB, no filtering, zlib-compressed)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


if __name__ == "__main__":
    run_cli(main)
