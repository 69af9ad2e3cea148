"""I/O benchmark (JSON out): reading a full-size case from .nii.gz vs one training patch from the cache.

    python bench/io.py [-o bench/results/io_cpu.json] [--shape 240 240 155] [--patch 128 128 128]
    PYTHONPATH=/tmp/peer_pkgs python bench/io.py      # + MONAI's LoadImaged and PersistentDataset

One synthetic case of ``--shape`` (4 int16 modalities + uint8 seg, gzip NIfTI like BraTS) is written
to a work folder, then timed:

- ``nifti_read``: ``datasets.io.read_case`` (nibabel: 4 modalities as float32 + the seg file);
- ``preprocess``: ``datasets.preprocess.preprocess_case`` (brain crop, z-score) on the arrays in memory;
- ``cache_build_<dtype>``: ``datasets.cache.build_case`` (read + preprocess + write .npy) per case;
- ``cache_patch_read``: what a loader worker does per sample without augmentation: open the
  memory-mapped case, choose a random patch start (a third forced onto tumour) and copy the image
  (float32, as the loader hands it to CPU augmentation) and class (uint8) patch out, at a random place each call.
- ``resampling``: native-space data: a ``--shape`` case with 3 mm slices (4 channels, 1x1x3 mm)
  resampled to 1 mm (``datasets.spatial.resample``, ``"image"``), and 4-channel probabilities of
  the 1 mm grid resampled back (``"linear"``), on ``--device``;
- ``native_path``: peak memory (RSS, in a fresh process) of the inference path without the network
  for a ``--native-shape`` case at ``--native-spacing`` mm (default 500x500x40 at 0.5x0.5x5)
  resampled to 1 mm: reorient, crop, z-score, resample, probabilities back, labels, paste back.
``*_cold`` variants first drop the files from the OS page cache (``posix_fadvise(DONTNEED)``), as
when the dataset does not fit in RAM; the others read from the page cache. With MONAI:
``LoadImaged`` + ``EnsureChannelFirstd`` of the same files (its NIfTI reader), and reading one
sample of a ``PersistentDataset`` that cached the same preprocessing (crop to the foreground,
z-score in the nonzero mask) with ``torch.save``: MONAI's on-disk cache loads whole volumes.
(This file is ``bench/io.py``; the standard library's ``io`` is loaded before it could shadow it.)
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    ROOT,
    benchmark_parser,
    finish,
    import_monai,
    load_average,
    log,
    measure,
    monai_skipped,
    ratio,
    setup,
    synthetic_cases,
    work_dir,
)
from core.task import builtin_tasks  # noqa: E402
from datasets.cache import CacheIndex, build_case  # noqa: E402
from datasets.io import Geometry, read_case, to_original  # noqa: E402
from datasets.preprocess import preprocess_case, restore_probabilities  # noqa: E402
from datasets.sampling import choose_patch_start, extract_patch  # noqa: E402
from datasets.spatial import resample  # noqa: E402

MODALITIES = ["t1", "t1ce", "t2", "flair"]
TASK = builtin_tasks()["brats-gli-2021"]  # synthetic cases use the 2021 labels (ET = 4)
FOREGROUND_FRACTION = 0.33  # as configs/unet3d.yaml


def drop_from_page_cache(paths) -> None:
    """Ask the OS to forget the cached pages of ``paths`` (flushed first: dirty pages stay)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, repeats=5)
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], help="case shape X Y Z")
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128], help="training patch X Y Z")
    parser.add_argument("--patch-repeats", type=int, default=20, help="timed patch reads (each at a new place)")
    parser.add_argument("--native-shape", type=int, nargs=3, default=[500, 500, 40], help="native-space case X Y Z")
    parser.add_argument("--native-spacing", type=float, nargs=3, default=[0.5, 0.5, 5.0], help="its spacing, mm")
    args = parser.parse_args(argv)
    device = setup(args)
    load_at_start = load_average()
    cold_ok = hasattr(os, "posix_fadvise")
    monai = import_monai(args.no_monai)
    report: dict = {"benchmark": "io", "case_shape": args.shape, "patch": args.patch, "modalities": MODALITIES,
                    "repeats": args.repeats, "budget_s": args.budget,
                    "page_cache_eviction": "posix_fadvise(DONTNEED)" if cold_ok else "unavailable: no *_cold timings"}

    def timed(name: str, fn, repeats: int | None = None, warmup: int | None = None) -> dict:
        report[name] = measure(fn, repeats or args.repeats, args.warmup if warmup is None else warmup, args.budget)
        log(f"{name}: {report[name]}")
        return report[name]

    with work_dir(args) as work:
        (case,), generate_s = synthetic_cases(work / "data", 1, args.shape)
        report["generate_s"] = generate_s
        files = case.source_files(MODALITIES, TASK)
        report["nifti_mb"] = round(sum(p.stat().st_size for p in files) / 2**20, 2)

        # ---- the raw case: nibabel read, preprocessing, cache build ----
        timed("nifti_read", lambda: read_case(case, TASK, MODALITIES))
        if cold_ok:
            timed("nifti_read_cold", lambda: (drop_from_page_cache(files), read_case(case, TASK, MODALITIES)), warmup=0)
        images, seg, geometry = read_case(case, TASK, MODALITIES)
        timed("preprocess", lambda: preprocess_case(images, seg, geometry, TASK))
        cropped, classes, _ = preprocess_case(images, seg, geometry, TASK)
        report["brain_crop_shape"] = list(classes.shape)
        for dtype in ("float32", "float16"):
            folder = work / f"cache_{dtype}"
            folder.mkdir(exist_ok=True)
            timed(f"cache_build_{dtype}", lambda: build_case(case, MODALITIES, TASK, folder, dtype, rebuild=True),
                  warmup=0)
            npy = folder / f"{case.case_id}_image.npy"
            report[f"cache_{dtype}_mb"] = round((npy.stat().st_size + (folder / f"{case.case_id}_label.npy").stat()
                                                 .st_size) / 2**20, 2)

        # ---- one training patch from the memory-mapped cache ----
        for dtype in ("float32", "float16"):
            index = CacheIndex(folder=work / f"cache_{dtype}", task=TASK, modalities=TASK.modalities,
                               case_ids=[case.case_id])
            cached_files = [index.folder / f"{case.case_id}_{part}.npy" for part in ("image", "label")]
            rng = np.random.default_rng(0)

            def read_patch(cold: bool):
                if cold:
                    drop_from_page_cache(cached_files)
                cached = index.load(case.case_id, mmap=True)  # as a worker opening the case
                start = choose_patch_start(cached.classes.shape, args.patch, rng, cached.class_locations,
                                           bool(rng.random() < FOREGROUND_FRACTION))
                image = extract_patch(cached.images, start, args.patch, dtype=np.float32)  # as the loader
                label = extract_patch(cached.classes, start, args.patch)  # uint8
                return image, label

            timed(f"cache_patch_read_{dtype}", lambda: read_patch(False), repeats=args.patch_repeats)
            if cold_ok:
                timed(f"cache_patch_read_{dtype}_cold", lambda: read_patch(True), repeats=args.patch_repeats, warmup=0)

        report["resampling"] = resampling(images, device, args)
        report["native_path"] = native_path_memory(args.native_shape, args.native_spacing)
        log(f"resampling: {report['resampling']}; native path: {report['native_path']}")

        report["speedup_patch_over_nifti_read"] = {
            dtype: ratio(report["nifti_read"]["median_s"], report[f"cache_patch_read_{dtype}"]["median_s"], 1)
            for dtype in ("float32", "float16")}
        report["monai"] = monai_io(monai, case, work, args, timed, report) if monai else monai_skipped(args.no_monai)
    return finish(report, args, device, load_at_start)


def resampling(images: np.ndarray, device: torch.device, args) -> dict:
    """A 1x1x3 mm version of the case (every third slice) to 1 mm, and 1 mm probabilities back."""
    thick = torch.from_numpy(np.ascontiguousarray(images[..., ::3])).to(device)
    full = tuple(thick.shape[1:3]) + (thick.shape[3] * 3,)
    probs = torch.softmax(torch.randn((4,) + full, generator=torch.Generator().manual_seed(0)), 0).to(device)
    return {
        "from_shape": list(thick.shape), "to_shape": [4, *full], "spacing": [1, 1, 3], "device": str(device),
        "forward_image": measure(lambda: resample(thick, full, "image", (1.0, 1.0, 3.0)), args.repeats,
                                 args.warmup, args.budget, device),
        "back_probabilities": measure(lambda: resample(probs, tuple(thick.shape[1:]), "linear"), args.repeats,
                                      args.warmup, args.budget, device),
    }


def native_path_memory(shape, spacing) -> dict:
    """``_native_path`` in a fresh Python process: its peak RSS above the imports, in MB."""
    code = (f"import json, sys; sys.argv = ['io.py']; from bench.io import _native_path; "
            f"print(json.dumps(_native_path({tuple(int(s) for s in shape)}, {tuple(float(s) for s in spacing)})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _native_path(shape, spacing) -> dict:
    """Inference on a native-space case without the network: an ellipsoid head of ``shape`` at
    ``spacing`` mm (4 channels), resampled to 1 mm, uniform probabilities back, labels pasted back."""
    torch.set_num_threads(1)
    baseline = peak_rss_kb()
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    head = sum(g * g for g in grid) < 0.8
    images = np.stack([np.where(head, 100.0 + 10 * c + grid[0], 0.0).astype(np.float32) for c in range(4)])
    del grid
    geometry = Geometry(affine=np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]), header=None, shape=shape)
    model_input, _, geometry = preprocess_case(images, None, geometry, TASK, (1.0, 1.0, 1.0))
    probs = torch.full((4,) + tuple(model_input.shape[1:]), 0.25)  # what the network's windows would give
    del model_input
    labels = TASK.decode(restore_probabilities(probs, geometry), "labels").numpy()
    del probs
    full = to_original(labels, geometry)
    peak = peak_rss_kb()
    return {"shape": list(shape), "spacing": list(spacing), "model_grid": list(geometry.model_shape),
            "output_shape": list(full.shape), "peak_rss_mb_above_imports": round((peak - baseline) / 1024, 1)}


def peak_rss_kb() -> int:
    """This process's peak resident memory in kB: ``VmHWM`` of /proc (Linux; ``ru_maxrss`` would
    include the parent's peak, since it survives fork + exec), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def monai_io(monai, case, work: Path, args, timed, report: dict) -> dict:
    """MONAI's NIfTI loading and its on-disk cache (``PersistentDataset``) on the same case."""
    from monai.data import PersistentDataset
    from monai.transforms import Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd

    sample = {"image": [str(p) for p, _ in case.image_sources(MODALITIES, TASK)], "label": str(case.seg)}
    load = Compose([LoadImaged(keys=["image", "label"], image_only=True),
                    EnsureChannelFirstd(keys=["image", "label"])])
    read = timed("monai_load_imaged", lambda: load(dict(sample)))
    preprocess = Compose([*load.transforms, CropForegroundd(keys=["image", "label"], source_key="image"),
                          NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)])
    persistent = PersistentDataset([sample], preprocess, cache_dir=work / "monai_persistent")
    persistent[0]  # builds the cache entry
    cached = timed("monai_persistent_dataset_read", lambda: persistent[0])
    return {
        "version": monai.__version__,
        "nifti_read_ratio_monai_over_ours": ratio(read["median_s"], report["nifti_read"]["median_s"]),
        "cache_read_ratio_monai_persistent_over_ours_patch_float16":
            ratio(cached["median_s"], report["cache_patch_read_float16"]["median_s"], 1),
        "note": "MONAI LoadImaged reads the 4 modalities + seg (float32 image, label as stored); "
                "PersistentDataset reads the whole cached (cropped, z-scored float32) case per sample, "
                "before any random crop",
    }


if __name__ == "__main__":
    sys.exit(main())
