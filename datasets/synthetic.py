"""Synthetic BraTS-format cases: a brain with CSF/GM/WM, four MR contrasts and a glioma.

Used by the CPU demo and the tests; the files look exactly like a BraTS release (names, label
values, LPS affine, 1 mm voxels, int16 images, background exactly 0)::

    python -m datasets.synthetic data/synthetic --cases 20 --seed 0 --convention 2023 --shape 96 96 64
    paths = generate_dataset("data/synthetic", cases=20, convention="2021", shape=(96, 96, 64))

Each case: an ellipsoid brain with a smoothly deformed surface, a cortical ribbon with folds,
ventricles and deep grey matter; a tumour at a random place inside the brain with a necrotic
core, an enhancing rim (absent or tiny in some cases) and irregular surrounding edema. Contrasts
follow the usual relative intensities (T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: CSF dark,
edema bright; T1ce = T1 plus a bright enhancing rim), with per-case intensity scaling, texture,
a smooth multiplicative bias field and Gaussian noise. Every case is determined by
``(seed, index)`` alone.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from engine.errors import UserError, run_cli
from datasets.io import atomic_save
from datasets.labels import CONVENTIONS, classes_to_labels

# file suffix of each channel (canonical order t1, t1ce, t2, flair) per naming convention
MODALITY_SUFFIXES = {"2021": ("t1", "t1ce", "t2", "flair"), "2023": ("t1n", "t1c", "t2w", "t2f")}
IMAGE_DTYPES = ("int16", "float32")
SEG_DTYPES = ("uint8", "int16")

# tissues: 0 background, 1 CSF, 2 GM, 3 WM, 4 NCR, 5 ED, 6 ET
BG, CSF, GM, WM, NCR, ED, ET = range(7)
# training class of each tissue (0 bg, 1 NCR, 2 ED, 3 ET)
TISSUE_CLASS = np.array([0, 0, 0, 0, 1, 2, 3], dtype=np.uint8)
# mean intensity per (channel t1, t1ce, t2, flair) and tissue, arbitrary MR units
TISSUE_INTENSITY = np.array([
    #  bg   CSF    GM    WM   NCR    ED    ET
    [0.0, 250.0, 550.0, 750.0, 300.0, 480.0, 520.0],    # T1: WM > GM > CSF
    [0.0, 280.0, 600.0, 780.0, 260.0, 500.0, 1300.0],   # T1ce: T1 plus bright enhancement
    [0.0, 1800.0, 1000.0, 700.0, 1600.0, 1400.0, 1100.0],  # T2: CSF > GM > WM
    [0.0, 120.0, 650.0, 520.0, 500.0, 1200.0, 900.0],   # FLAIR: CSF dark, edema bright
], dtype=np.float32)
NOISE_FRACTION = 0.03  # noise std relative to the WM intensity of each channel
MIN_SHAPE = 16
MIN_CORE_RADIUS = 3.0  # voxels: small volumes still get a visible tumour
SURFACE_DEFORMATION = 0.06  # relative radius change of the brain surface per unit of the smooth field
CORE_DEFORMATION = 0.15  # relative radius change of the tumour core surface per unit of the smooth field
EDEMA_SHELL = 0.3  # minimum edema thickness around the core, in core radii
EDEMA_DEFORMATION = 0.2  # relative radius change of the edema surface per unit of the smooth field
BRAIN_MARGIN = 1.25  # brain box half-size in semi-axes; > 1 / (1 - 3 * SURFACE_DEFORMATION)


def case_id(index: int, convention: str) -> str:
    """``(7, "2021")`` -> ``"BraTS2021_00007"``; ``(7, "2023")`` -> ``"BraTS-GLI-00007-000"``."""
    if convention == "2021":
        return f"BraTS2021_{index:05d}"
    return f"BraTS-GLI-{index:05d}-000"


def case_files(folder: Path, convention: str) -> tuple[list[Path], Path]:
    """Image files (canonical channel order) and seg file of the case folder ``folder``."""
    sep = "_" if convention == "2021" else "-"
    name = folder.name
    images = [folder / f"{name}{sep}{suffix}.nii.gz" for suffix in MODALITY_SUFFIXES[convention]]
    return images, folder / f"{name}{sep}seg.nii.gz"


def brats_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """LPS voxel-to-world matrix of the BraTS (SRI24 grid) files: ``diag(-1, -1, 1)``, 1 mm,
    origin offset ``(0, Y - 1, 0)`` (239 mm for the 240 x 240 x 155 grid)."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape[1] - 1
    return affine


# ----------------------------------------------------------------------------------------------
# Random smooth fields
# ----------------------------------------------------------------------------------------------
def smooth_field(shape: tuple[int, ...], nodes: int | tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Smooth random field of ``shape`` with zero mean and unit variance at every voxel (float32).

    White noise on a coarse grid of ``nodes`` points per axis, interpolated with Gaussian basis
    functions (rows of unit L2 norm, hence unit variance). Separable, so the cost is a few
    tensor products, not a zoom of the whole volume.
    """
    nodes = (nodes,) * len(shape) if np.isscalar(nodes) else tuple(nodes)
    field = rng.standard_normal(nodes).astype(np.float32)
    for n, k in zip(shape, nodes):
        # contract the leading (coarse) axis; the fine axis is appended last
        field = np.tensordot(field, _basis(n, k), axes=([0], [1]))
    return np.ascontiguousarray(field)


def _clipped_field(shape, nodes, limit: float, rng: np.random.Generator) -> np.ndarray:
    """``smooth_field`` clipped to ``[-limit, limit]`` (bounds the deformations it drives)."""
    field = smooth_field(shape, nodes, rng)
    return np.minimum(np.maximum(field, np.float32(-limit), out=field), np.float32(limit), out=field)


def _basis(n: int, k: int) -> np.ndarray:
    """``(n, k)`` Gaussian interpolation weights from ``k`` coarse nodes to ``n`` voxels."""
    k = max(int(k), 2)
    centres = np.linspace(0.0, n - 1.0, k)
    sigma = max((n - 1.0) / (k - 1.0), 1.0)
    weights = np.exp(-0.5 * ((np.arange(n)[:, None] - centres[None]) / sigma) ** 2)
    return (weights / np.linalg.norm(weights, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Anatomy
# ----------------------------------------------------------------------------------------------
def synthesize_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case in memory.

    Returns ``images (4, X, Y, Z) float32`` (channels t1, t1ce, t2, flair; exactly 0 outside the
    brain, >= 1 inside) and ``classes (X, Y, Z) uint8`` (0 bg, 1 NCR, 2 ED, 3 ET). All the work
    happens inside the brain's bounding box (about a third of the volume).
    """
    shape = _check_shape(shape)
    size = np.asarray(shape, dtype=np.float64)
    centre = size / 2 + rng.uniform(-0.03, 0.03, 3) * size
    axes = size * np.array([0.30, 0.36, 0.40]) * rng.uniform(0.93, 1.05, 3)
    lo = np.maximum(np.floor(centre - BRAIN_MARGIN * axes), 0).astype(int)
    hi = np.minimum(np.ceil(centre + BRAIN_MARGIN * axes) + 1, size).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    tissue, brain = _anatomy(tuple(hi - lo), centre - lo, axes, rng)
    _add_tumour(tissue, brain, rng)
    images = np.zeros((len(TISSUE_INTENSITY),) + shape, dtype=np.float32)
    images[(slice(None),) + box] = _contrasts(tissue, brain, rng)
    classes = np.zeros(shape, dtype=np.uint8)
    classes[box] = TISSUE_CLASS[tissue]
    return images, classes


def _anatomy(shape, centre, axes, rng) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map (uint8 CSF/GM/WM, 0 outside) and brain mask of a deformed ellipsoid brain
    with the given voxel ``centre`` and semi-``axes``."""
    # normalized coordinates: the undeformed brain is the unit ball
    grids = [_axis_grid((np.arange(n, dtype=np.float32) - c) / a, d)
             for d, (n, c, a) in enumerate(zip(shape, centre, axes))]
    deform = _clipped_field(shape, 5, 3.0, rng)
    radius = np.sqrt(sum(g * g for g in grids)) * (1.0 + SURFACE_DEFORMATION * deform)
    brain = radius < 1.0
    depth = 1.0 - radius  # 0 at the surface, 1 at the centre
    # folded cortical ribbon: the GM/WM boundary depth varies quickly, sulci reach in with CSF
    folds = smooth_field(shape, tuple(max(4, n // 10) for n in shape), rng)
    tissue = np.full(shape, WM, dtype=np.uint8)
    tissue[depth < 0.13 + 0.05 * folds] = GM
    tissue[(depth < 0.03) | ((depth < 0.09) & (folds > 1.2))] = CSF
    for side in (-1.0, 1.0):
        _paint_ellipsoid(tissue, grids, (0.25 * side, 0.0, -0.05), (0.12, 0.2, 0.15), GM)  # deep grey matter
        _paint_ellipsoid(tissue, grids, (0.10 * side, 0.05, 0.12), (0.07, 0.35, 0.14), CSF)  # lateral ventricle
    tissue[~brain] = BG
    return tissue, brain


def _axis_grid(values: np.ndarray, axis: int) -> np.ndarray:
    """1D ``values`` shaped to broadcast along ``axis`` of a 3D array."""
    return values.reshape([-1 if i == axis else 1 for i in range(3)])


def _paint_ellipsoid(tissue: np.ndarray, grids, centre, axes, value: int) -> None:
    """Set ``tissue`` to ``value`` inside an ellipsoid given in normalized coordinates."""
    box = tuple(slice(int(np.searchsorted(g.ravel(), c - a)), int(np.searchsorted(g.ravel(), c + a)))
                for g, c, a in zip(grids, centre, axes))
    dist = sum(_axis_grid((g.ravel()[b] - c) / a, d) ** 2
               for d, (g, b, c, a) in enumerate(zip(grids, box, centre, axes)))
    tissue[box][dist < 1.0] = value


def _add_tumour(tissue: np.ndarray, brain: np.ndarray, rng) -> None:
    """Paint edema, then the core (necrosis inside an enhancing rim) into ``tissue`` in place."""
    shape = tissue.shape
    size = np.asarray(shape, dtype=np.float64)
    # centre: a brain voxel in the inner part of the brain box
    where = np.argwhere(brain[::4, ::4, ::4]) * 4
    inner = where[np.all(np.abs(where - size / 2) < 0.3 * size, axis=1)]
    candidates = inner if len(inner) else where
    centre = candidates[rng.integers(len(candidates))] + rng.uniform(0, 4, 3)
    core_radius = max(rng.uniform(0.05, 0.11) * size.mean(), MIN_CORE_RADIUS)
    edema_factor = rng.uniform(1.2, 1.9)
    stretch = rng.uniform(0.75, 1.25, 3)
    # the box holds the edema for any deformation: its radius is at most this
    half = core_radius * stretch.max() * max(edema_factor / (1.0 - 2.0 * EDEMA_DEFORMATION),
                                             (1.0 + EDEMA_SHELL) / (1.0 - 2.0 * CORE_DEFORMATION))
    lo = np.maximum(np.floor(centre - half), 0).astype(int)
    hi = np.minimum(np.ceil(centre + half) + 1, size).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    box_shape = tuple(hi - lo)

    # distance from the centre in a randomly rotated and stretched frame, in core radii
    rotation, upper = np.linalg.qr(rng.standard_normal((3, 3)))
    rotation = (rotation * np.sign(np.diag(upper))).astype(np.float32)
    offsets = [_axis_grid(np.arange(a, b, dtype=np.float32) - np.float32(c), d)
               for d, (a, b, c) in enumerate(zip(lo, hi, centre))]
    dist2 = np.zeros(box_shape, dtype=np.float32)
    for row, s in zip(rotation, stretch):
        dist2 += (sum(r * o for r, o in zip(row, offsets)) / np.float32(core_radius * s)) ** 2
    dist = np.sqrt(dist2)
    core_dist = dist * (1.0 + CORE_DEFORMATION * _clipped_field(box_shape, 4, 2.0, rng))
    edema_deform = _clipped_field(box_shape, 5, 2.0, rng)
    edema_dist = dist / edema_factor * (1.0 + EDEMA_DEFORMATION * edema_deform)

    region = tissue[box]
    inside = brain[box]
    core = inside & (core_dist < 1.0)
    rim = core & (core_dist >= rng.uniform(0.45, 0.8))
    mode = rng.random()
    if mode < 0.1:  # non-enhancing tumour: no ET at all
        enhancing = np.zeros_like(rim)
    elif mode < 0.2:  # a few small enhancing spots
        enhancing = rim & (smooth_field(box_shape, 6, rng) > 1.0)
    else:
        enhancing = rim
    # edema: the deformed outer ellipsoid, and at least a thin shell around the core
    region[inside & ((edema_dist < 1.0) | (core_dist < 1.0 + EDEMA_SHELL)) & ~core] = ED
    region[core] = NCR
    region[enhancing] = ET


def _contrasts(tissue: np.ndarray, brain: np.ndarray, rng) -> np.ndarray:
    """Four MR channels from the tissue map: per-case scaling, texture, bias field, noise."""
    shape = tissue.shape
    intensity = TISSUE_INTENSITY * rng.uniform(0.95, 1.05, TISSUE_INTENSITY.shape).astype(np.float32)
    intensity *= rng.uniform(0.8, 1.2, (len(intensity), 1)).astype(np.float32)
    texture = 0.04 * smooth_field(shape, tuple(max(4, n // 8) for n in shape), rng)
    # one white-noise volume; each channel reads it at a different circular shift, which keeps
    # every channel's noise white and independent of the others' at each voxel
    noise = rng.standard_normal(shape, dtype=np.float32)
    images = np.empty((len(intensity),) + shape, dtype=np.float32)
    for c, table in enumerate(intensity):
        image = ndimage.gaussian_filter(table[tissue], 0.5, truncate=2.0)  # partial-volume blur
        image *= np.exp(texture + 0.12 * smooth_field(shape, 4, rng))  # texture and bias field
        shift = tuple(int(s) for s in rng.integers(1, shape)) if c else (0, 0, 0)
        image += np.roll(noise, shift, axis=(0, 1, 2)) * np.float32(NOISE_FRACTION * table[WM])
        images[c] = np.where(brain, np.maximum(image, np.float32(1.0)), np.float32(0.0))
    return images


def _check_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < MIN_SHAPE:
        raise ValueError(f"shape must be 3 sizes >= {MIN_SHAPE}, got {shape}")
    return shape


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def generate_case(out_dir: str | Path, index: int, seed: int = 0, convention: str = "2021",
                  shape: tuple[int, int, int] = (240, 240, 155), dtype: str = "int16",
                  seg_dtype: str = "uint8") -> Path:
    """Write case number ``index`` to ``out_dir/<case id>/`` and return that folder.

    The content depends only on ``(seed, index, shape)``; ``convention`` sets the names and the
    label values (ET = 4 for "2021", 3 for "2023"); ``dtype`` is the image dtype on disk.
    """
    _check_choice("convention", convention, CONVENTIONS)
    _check_choice("dtype", dtype, IMAGE_DTYPES)
    _check_choice("seg_dtype", seg_dtype, SEG_DTYPES)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    shape = _check_shape(shape)
    images, classes = synthesize_case(shape, np.random.default_rng([seed, index]))
    folder = Path(out_dir) / case_id(index, convention)
    image_paths, seg_path = case_files(folder, convention)
    affine = brats_affine(shape)
    for image, path in zip(images, image_paths):
        data = np.rint(image).astype(np.int16) if dtype == "int16" else image
        atomic_save(_nifti(data, affine), path)
    labels = classes_to_labels(classes, convention).astype(seg_dtype)
    atomic_save(_nifti(labels, affine), seg_path)
    return folder


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0, 0.0)
    return img


def generate_dataset(out_dir: str | Path, cases: int, seed: int = 0, convention: str = "2021",
                     shape: tuple[int, int, int] = (240, 240, 155), dtype: str = "int16",
                     seg_dtype: str = "uint8", workers: int = 1) -> list[Path]:
    """Write cases ``0 .. cases-1`` under ``out_dir`` (``workers`` processes); return their folders."""
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    args = [(out_dir, i, seed, convention, tuple(shape), dtype, seg_dtype) for i in range(cases)]
    if workers == 1 or cases == 1:
        return [generate_case(*a) for a in args]
    with ProcessPoolExecutor(min(workers, cases)) as pool:
        return list(pool.map(generate_case, *zip(*args)))


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic BraTS-format cases.")
    parser.add_argument("out_dir", help="folder that receives one sub-folder per case")
    parser.add_argument("--cases", type=int, default=10, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="random seed (case i depends on seed and i only)")
    parser.add_argument("--convention", choices=CONVENTIONS, default="2021", help="file names and label values")
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], metavar=("X", "Y", "Z"))
    parser.add_argument("--dtype", choices=IMAGE_DTYPES, default="int16", help="image dtype on disk")
    parser.add_argument("--workers", type=int, default=1, help="processes")
    args = parser.parse_args(argv)
    try:
        folders = generate_dataset(args.out_dir, args.cases, args.seed, args.convention, tuple(args.shape),
                                   args.dtype, workers=args.workers)
    except ValueError as err:  # bad --cases/--shape/--workers: one line, exit code 2
        raise UserError(f"datasets.synthetic: {err}") from None
    print(f"wrote {len(folders)} cases to {args.out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
