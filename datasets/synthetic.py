"""Synthetic cases of every BraTS task: a brain with CSF/GM/WM, MR contrasts and a tumour.

Used by the CPU demo and the tests; the files look exactly like a release of the task (names,
label values, LPS affine, 1 mm voxels, int16 images, background exactly 0)::

    python -m datasets.synthetic data/synthetic --task brats-ped --cases 20 --seed 0 --shape 96 96 64
    paths = generate_dataset("data/synthetic", cases=20, task="brats-gli-2024", shape=(96, 96, 64))

Each case: an ellipsoid brain with a smoothly deformed surface, a cortical ribbon with folds,
ventricles and deep grey matter, and a tumour whose kind follows the task (``tumour_kind``):

- ``glioma`` (GLI 2021/2023, SSA, MEN pre-op, MSD): one tumour at a random place inside the
  brain with a necrotic core, an enhancing rim (absent or tiny in some cases) and irregular
  surrounding edema;
- ``post-treatment`` (GLI 2024): a smaller residual glioma (no enhancement in about a third of
  the cases) next to a resection cavity (most cases): a fluid-filled hole outside the tumour
  labels, lined by edema;
- ``metastases`` (MET): 1-4 small lesions (enhancing rim, necrotic centre when large enough,
  wide edema); some cases also have a resection cavity at another place;
- ``pediatric`` (PED): a large core with little edema, often without enhancement, most cases
  with a fluid cyst enclosed by the core;
- ``meningioma`` (MEN-RT): one compact, homogeneously enhancing mass against the brain surface.

Contrasts follow the usual relative intensities (T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: CSF
dark, edema bright; T1ce = T1 plus enhancement; cavities and cysts fluid-like), with per-case
intensity scaling, texture, a smooth multiplicative bias field and Gaussian noise. Every case is
determined by ``(seed, index, shape, task)`` alone; the glioma tasks share the same content (a
2021 case and a 2023 case of the same seed and index differ only in names and label values).

Synthetic lesions are written as the task's labels by the label NAMES of the task YAML
(``LABEL_LESIONS``: NCR/NETC/NET = necrosis, ED/SNFH = edema, ET, RC = cavity, CC = cyst,
GTV = meningioma mass); a task with another label name is a ``ValueError``.

Native-space data (``grid`` / ``--native``): the 1 mm case is resampled to another voxel
spacing and stored in another orientation (``GRIDS``: RAS, oblique), as scanners and the BraTS
2025 native-space releases write them; ``--native mixed`` cycles through ``NATIVE_MIX``.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from core.atomic import atomic_write_text
from core.errors import UserError, run_cli
from core.task import Task, builtin_tasks, load_task
from datasets.io import atomic_save

DEFAULT_TASK = "brats-gli-2021"
GRIDS = ("lps", "ras", "oblique")  # orientations of native-space cases (lps: the BraTS files' own)
NATIVE_MIX = (((1.0, 1.0, 1.0), "lps"), ((1.0, 1.0, 3.0), "ras"), ((0.8, 0.8, 2.0), "oblique"))
OBLIQUE_DEGREES = 12.0  # rotation of the oblique grid about the z axis
IMAGE_DTYPES = ("int16", "float32")
SEG_DTYPES = ("uint8", "int16")
CHANNELS = ("t1", "t1ce", "t2", "flair")  # canonical modality of each synthesized channel

# tissues: 0 background, 1 CSF, 2 GM, 3 WM, 4 NCR, 5 ED, 6 ET, 7 RC, 8 CC, 9 MASS
BG, CSF, GM, WM, NCR, ED, ET, RC, CC, MASS = range(10)
GLIOMA_TISSUES = 7  # BG..ET: the glioma kind draws its per-case intensities for these only
# lesion codes returned by synthesize_case (0 = no lesion)
LESIONS = ("background", "necrosis", "edema", "enhancing", "cavity", "cyst", "mass")
TISSUE_LESION = np.array([0, 0, 0, 0, 1, 2, 3, 4, 5, 6], dtype=np.uint8)
# task label name (upper case) -> lesion it is written for
LABEL_LESIONS = {"NCR": "necrosis", "NETC": "necrosis", "NET": "necrosis", "ED": "edema", "SNFH": "edema",
                 "ET": "enhancing", "RC": "cavity", "CC": "cyst", "GTV": "mass"}
# lesions each tumour kind paints (a task's labels must be exactly these)
KIND_LESIONS = {
    "glioma": ("necrosis", "edema", "enhancing"),
    "post-treatment": ("necrosis", "edema", "enhancing", "cavity"),
    "metastases": ("necrosis", "edema", "enhancing", "cavity"),
    "pediatric": ("necrosis", "edema", "enhancing", "cyst"),
    "meningioma": ("mass",),
}
# dataset.json label names of the MSD layout
MSD_LABEL_NAMES = {"necrosis": "non-enhancing tumor", "edema": "edema", "enhancing": "enhancing tumour",
                   "cavity": "resection cavity", "cyst": "cyst", "mass": "tumour"}
# mean intensity per (channel t1, t1ce, t2, flair) and tissue, arbitrary MR units
TISSUE_INTENSITY = np.array([
    #  bg   CSF    GM     WM    NCR     ED     ET     RC     CC   MASS
    [0.0, 250.0, 550.0, 750.0, 300.0, 480.0, 520.0, 230.0, 280.0, 560.0],    # T1: WM > GM > CSF
    [0.0, 280.0, 600.0, 780.0, 260.0, 500.0, 1300.0, 250.0, 300.0, 1250.0],  # T1ce: T1 plus enhancement
    [0.0, 1800.0, 1000.0, 700.0, 1600.0, 1400.0, 1100.0, 1900.0, 1850.0, 950.0],  # T2: CSF > GM > WM
    [0.0, 120.0, 650.0, 520.0, 500.0, 1200.0, 900.0, 150.0, 380.0, 700.0],  # FLAIR: fluid dark, edema bright
], dtype=np.float32)
NOISE_FRACTION = 0.03  # noise std relative to the WM intensity of each channel
MIN_SHAPE = 16
MIN_CORE_RADIUS = 3.0  # voxels: small volumes still get a visible tumour
MIN_SMALL_RADIUS = 2.0  # voxels: metastases, cavities and cysts
SURFACE_DEFORMATION = 0.06  # relative radius change of the brain surface per unit of the smooth field
CORE_DEFORMATION = 0.15  # relative radius change of the tumour core surface per unit of the smooth field
EDEMA_SHELL = 0.3  # minimum edema thickness around the core, in core radii
EDEMA_DEFORMATION = 0.2  # relative radius change of the edema surface per unit of the smooth field
BRAIN_MARGIN = 1.25  # brain box half-size in semi-axes; > 1 / (1 - 3 * SURFACE_DEFORMATION)
CAVITY_SHELL = 0.35  # edema lining a post-treatment cavity, in cavity radii


# ----------------------------------------------------------------------------------------------
# Tasks: naming, label mapping
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Naming:
    """Case ids ``{prefix}{number:0{width}d}{suffix}`` with ``number = index + offset``; files
    ``{id}{sep}{modality}.nii.gz`` in the brats layout (``sep`` is None in the msd layout)."""

    prefix: str
    width: int
    suffix: str
    sep: str | None
    offset: int = 0


BUILTIN_NAMING = {
    "brats-gli-2021": Naming("BraTS2021_", 5, "", "_"),
    "brats-gli-2024": Naming("BraTS-GLI-", 5, "-100", "-"),
    "brats-men-rt": Naming("BraTS-MEN-RT-", 4, "-1", "_"),
    "msd-brain": Naming("BRATS_", 3, "", None, 1),
}


def resolve_task(task: str | Path | Task) -> Task:
    """A ``Task`` as it is, or a built-in task name / task YAML path loaded (``TaskError`` if unknown)."""
    if isinstance(task, Task):
        return task
    if isinstance(task, (str, Path)):
        return load_task(task)
    raise TypeError(f"task must be a task name, a task YAML path or a Task, got {type(task).__name__}")


def naming(task: str | Path | Task) -> Naming:
    """How cases of ``task`` are named: the built-in table, else the literal prefix of the task's
    ``case_pattern`` (``^BraTS-XYZ-`` -> ``BraTS-XYZ-00007-000``), else ``Synthetic-00007-000``."""
    task = resolve_task(task)
    builtin = builtin_tasks().get(task.name)
    if builtin is not None and builtin == task and task.name in BUILTIN_NAMING:
        return BUILTIN_NAMING[task.name]
    prefix = _literal_prefix(task.case_pattern)
    if task.layout == "msd":
        return Naming(prefix or "case_", 3, "", None, 1)
    if prefix is None:
        return Naming("Synthetic-", 5, "-000", "-")
    return Naming(prefix, 5, "-000", "-") if prefix.endswith("-") else Naming(prefix, 5, "", "_")


def _literal_prefix(pattern: str) -> str | None:
    """``"^BraTS-MEN-(?!RT-)"`` -> ``"BraTS-MEN-"``; ``None`` when the pattern is not a plain prefix."""
    text = re.sub(r"\(\?[!=<][^)]*\)", "", pattern.replace("(?i)", ""))  # drop look-arounds
    text = re.sub(r"(\\d[+*]?)?\$?$", "", text)  # a trailing number pattern: the id supplies it
    if not text.startswith("^"):
        return None
    text = text[1:].replace("\\-", "-").replace("\\_", "_")
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else None


def case_id(index: int, task: str | Path | Task = DEFAULT_TASK) -> str:
    """``(7, "brats-gli-2021")`` -> ``"BraTS2021_00007"``, ``(7, "brats-ped")`` ->
    ``"BraTS-PED-00007-000"``, ``(7, "brats-gli-2024")`` -> ``"BraTS-GLI-00007-100"``,
    ``(7, "brats-men-rt")`` -> ``"BraTS-MEN-RT-0007-1"``, ``(7, "msd-brain")`` -> ``"BRATS_008"``."""
    names = naming(task)
    number = int(index) + names.offset
    if index < 0 or number >= 10 ** names.width:
        raise ValueError(f"index must be in 0..{10 ** names.width - 1 - names.offset} for {names.prefix} ids, "
                         f"got {index}")
    return f"{names.prefix}{number:0{names.width}d}{names.suffix}"


def case_files(folder: str | Path, task: str | Path | Task = DEFAULT_TASK) -> tuple[list[Path], Path]:
    """Image files (the task's channel order) and label file of the case folder ``folder``
    (brats layout; for the msd layout see ``msd_files``)."""
    task = resolve_task(task)
    names = naming(task)
    if names.sep is None:
        raise ValueError(f"task {task.name} uses the {task.layout} layout (no case folders): use msd_files")
    folder = Path(folder)
    stem = f"{folder.name}{names.sep}"
    images = [folder / f"{stem}{suffix}.nii.gz" for suffix in task.file_modalities]
    return images, folder / f"{stem}{task.label_file}.nii.gz"


def msd_files(root: str | Path, case: str) -> tuple[Path, Path]:
    """``ROOT/imagesTr/<case>.nii.gz`` (the 4D image) and ``ROOT/labelsTr/<case>.nii.gz``."""
    root = Path(root)
    return root / "imagesTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz"


def tumour_kind(task: str | Path | Task) -> str:
    """The kind of tumour synthesized for ``task`` (a key of ``KIND_LESIONS``), from its label
    names: GTV -> meningioma, CC -> pediatric, RC -> metastases (task name with "met") or
    post-treatment, otherwise glioma."""
    lesions = set(_label_lesions(resolve_task(task)).values())
    if "mass" in lesions:
        return "meningioma"
    if "cyst" in lesions:
        return "pediatric"
    if "cavity" in lesions:
        return "metastases" if re.search(r"(?i)(^|[^a-z])met", resolve_task(task).name) else "post-treatment"
    return "glioma"


def _label_lesions(task: Task) -> dict[int, str]:
    """``{class: lesion}``; ``ValueError`` for a label name that no synthetic lesion has."""
    out = {}
    for cls, name in enumerate(task.class_names[1:], start=1):
        lesion = LABEL_LESIONS.get(name.upper())
        if lesion is None:
            known = ", ".join(f"{k} ({v})" for k, v in LABEL_LESIONS.items())
            raise ValueError(f"task {task.name}: cannot synthesize label {name!r} (synthetic labels by name: {known})")
        if lesion in out.values():
            raise ValueError(f"task {task.name}: two labels are both {lesion} ({name} and "
                             f"{task.class_names[[c for c, v in out.items() if v == lesion][0]]})")
        out[cls] = lesion
    return out


@dataclass(frozen=True)
class _Plan:
    kind: str
    lesion_to_class: np.ndarray  # uint8 lookup: lesion code -> task class
    channels: tuple[int, ...]  # index into CHANNELS of each task channel


@functools.lru_cache(maxsize=64)
def _plan(task: Task) -> _Plan:
    kind = tumour_kind(task)
    classes = _label_lesions(task)
    missing = [lesion for lesion in KIND_LESIONS[kind] if lesion not in classes.values()]
    if missing:
        raise ValueError(f"task {task.name}: its {kind} tumour needs a label for {', '.join(missing)} "
                         f"(task labels: {task.describe_labels()})")
    lut = np.zeros(len(LESIONS), dtype=np.uint8)
    for cls, lesion in classes.items():
        lut[LESIONS.index(lesion)] = cls
    unknown = [m for m in task.modalities if m not in CHANNELS]
    if unknown:
        raise ValueError(f"task {task.name}: cannot synthesize modality {unknown[0]!r} "
                         f"(synthetic images: {', '.join(CHANNELS)})")
    return _Plan(kind, lut, tuple(CHANNELS.index(m) for m in task.modalities))


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
def synthesize_case(shape: tuple[int, int, int], rng: np.random.Generator,
                    kind: str = "glioma") -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case in memory.

    Returns ``images (4, X, Y, Z) float32`` (channels ``CHANNELS``: t1, t1ce, t2, flair; exactly 0
    outside the brain, >= 1 inside) and ``lesions (X, Y, Z) uint8`` (codes of ``LESIONS``: 0 none,
    1 necrosis, 2 edema, 3 enhancing, 4 cavity, 5 cyst, 6 mass; the glioma kind uses 0..3 only,
    which are its training classes 0 bg, 1 NCR, 2 ED, 3 ET). All the work happens inside the
    brain's bounding box (about a third of the volume).
    """
    if kind not in TUMOURS:
        raise ValueError(f"kind must be one of {', '.join(TUMOURS)}, got {kind!r}")
    shape = _check_shape(shape)
    size = np.asarray(shape, dtype=np.float64)
    centre = size / 2 + rng.uniform(-0.03, 0.03, 3) * size
    axes = size * np.array([0.30, 0.36, 0.40]) * rng.uniform(0.93, 1.05, 3)
    lo = np.maximum(np.floor(centre - BRAIN_MARGIN * axes), 0).astype(int)
    hi = np.minimum(np.ceil(centre + BRAIN_MARGIN * axes) + 1, size).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    tissue, brain = _anatomy(tuple(hi - lo), centre - lo, axes, rng)
    TUMOURS[kind](tissue, brain, rng)
    images = np.zeros((len(TISSUE_INTENSITY),) + shape, dtype=np.float32)
    images[(slice(None),) + box] = _contrasts(tissue, brain, rng, all_tissues=kind != "glioma")
    lesions = np.zeros(shape, dtype=np.uint8)
    lesions[box] = TISSUE_LESION[tissue]
    return images, lesions


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


# ----------------------------------------------------------------------------------------------
# Tumours (each paints lesion tissues into the brain-box tissue map in place)
# ----------------------------------------------------------------------------------------------
@dataclass
class _Lesion:
    box: tuple[slice, ...]  # of the tissue map
    lo: np.ndarray
    hi: np.ndarray
    core: np.ndarray  # bool, in the box: the tumour core (necrosis + enhancing)


def _add_tumour(tissue: np.ndarray, brain: np.ndarray, rng) -> None:
    """Glioma: edema, then the core (necrosis inside an enhancing rim)."""
    size = np.asarray(tissue.shape, dtype=np.float64)
    centre = _tumour_centre(brain, rng)
    core_radius = max(rng.uniform(0.05, 0.11) * size.mean(), MIN_CORE_RADIUS)
    edema_factor = rng.uniform(1.2, 1.9)
    _paint_lesion(tissue, brain, centre, core_radius, edema_factor, rng)


def _add_post_treatment(tissue: np.ndarray, brain: np.ndarray, rng) -> None:
    """GLI post-treatment: a residual glioma (often non-enhancing) and, in most cases, a
    resection cavity overlapping the original tumour site, lined by edema. The cavity replaces
    whatever tumour it covers: it never overlaps the tumour labels."""
    size = np.asarray(tissue.shape, dtype=np.float64)
    has_cavity = rng.random() < 0.85
    centre = _tumour_centre(brain, rng)
    core_radius = max(rng.uniform(0.04, 0.09) * size.mean(), MIN_CORE_RADIUS)
    edema_factor = rng.uniform(1.4, 2.1)
    _paint_lesion(tissue, brain, centre, core_radius, edema_factor, rng, rim=(0.5, 0.85), et_modes=(0.3, 0.45))
    if has_cavity:
        direction = _unit_vector(rng)
        if np.dot(direction, size / 2 - centre) < 0:  # towards the brain's inside, not out of it
            direction = -direction
        cavity_centre = centre + direction * core_radius * rng.uniform(0.8, 1.3)
        cavity_radius = max(core_radius * rng.uniform(0.8, 1.25), MIN_SMALL_RADIUS + 0.5)
        box, dist = _blob(tissue.shape, cavity_centre, cavity_radius * (1 + CAVITY_SHELL), rng, 0.1)
        dist *= np.float32(1 + CAVITY_SHELL)  # 1 = the cavity wall, 1 + CAVITY_SHELL = the edema lining
        region, inside = tissue[box], brain[box]
        region[inside & (dist < 1 + CAVITY_SHELL) & (region <= WM)] = ED
        region[inside & (dist < 1.0)] = RC


def _add_metastases(tissue: np.ndarray, brain: np.ndarray, rng) -> None:
    """MET: 1-4 small lesions (enhancing rim, necrotic centre, wide edema); a third of the cases
    with a resection cavity at another place (painted over normal tissue only)."""
    size = np.asarray(tissue.shape, dtype=np.float64)
    for _ in range(int(rng.integers(1, 5))):
        centre = _brain_point(brain, rng)
        radius = max(rng.uniform(0.02, 0.05) * size.mean(), MIN_SMALL_RADIUS)
        _paint_lesion(tissue, brain, centre, radius, rng.uniform(1.6, 2.6), rng, rim=(0.3, 0.7), et_modes=(0.0, 0.0))
    if rng.random() < 0.35:
        centre = _brain_point(brain, rng)
        radius = max(rng.uniform(0.03, 0.06) * size.mean(), MIN_SMALL_RADIUS + 0.5)
        box, dist = _blob(tissue.shape, centre, radius, rng, 0.1)
        region = tissue[box]
        region[brain[box] & (dist < 1.0) & (region <= WM)] = RC


def _add_pediatric(tissue: np.ndarray, brain: np.ndarray, rng) -> None:
    """PED: a large core with little edema, often without enhancement; in most cases a fluid
    cyst inside the core, at least one voxel away from its border (the cyst is enclosed by
    necrosis/enhancing tumour)."""
    size = np.asarray(tissue.shape, dtype=np.float64)
    centre = _tumour_centre(brain, rng)
    core_radius = max(rng.uniform(0.07, 0.12) * size.mean(), MIN_CORE_RADIUS)
    lesion = _paint_lesion(tissue, brain, centre, core_radius, rng.uniform(1.15, 1.5), rng,
                           rim=(0.55, 0.85), et_modes=(0.3, 0.5))
    if rng.random() < 0.75:
        cyst_centre = centre + rng.uniform(-0.3, 0.3, 3) * core_radius
        cyst_radius = max(core_radius * rng.uniform(0.4, 0.65), 1.5)
        dist = _blob_in(lesion.lo, lesion.hi, cyst_centre, cyst_radius, rng, 0.1)
        cyst = ndimage.binary_erosion(lesion.core) & (dist < 1.0)
        tissue[lesion.box][cyst] = CC


def _add_meningioma(tissue: np.ndarray, brain: np.ndarray, rng) -> None:
    """MEN-RT: one compact mass against the brain surface (flattened by it, as if dural-based),
    homogeneously enhancing, no labelled edema."""
    size = np.asarray(tissue.shape, dtype=np.float64)
    radius = max(rng.uniform(0.07, 0.12) * size.mean(), MIN_CORE_RADIUS)
    direction = _unit_vector(rng)
    start = size / 2
    if not brain[tuple(start.astype(int))]:
        start = _tumour_centre(brain, rng)
    step = 0.0
    while True:  # walk out from the centre to the brain surface along ``direction``
        point = np.rint(start + (step + 0.5) * direction).astype(int)
        if (point < 0).any() or (point >= size).any() or not brain[tuple(point)]:
            break
        step += 0.5
    centre = start + direction * (step - radius * rng.uniform(0.3, 0.7))
    box, dist = _blob(tissue.shape, centre, radius, rng, 0.08, stretch=(0.85, 1.15))
    tissue[box][brain[box] & (dist < 1.0)] = MASS


TUMOURS = {"glioma": _add_tumour, "post-treatment": _add_post_treatment, "metastases": _add_metastases,
           "pediatric": _add_pediatric, "meningioma": _add_meningioma}


def _tumour_centre(brain: np.ndarray, rng, inner: float = 0.3) -> np.ndarray:
    """A brain voxel (plus a random sub-grid offset) within ``inner`` of the box size from its centre."""
    size = np.asarray(brain.shape, dtype=np.float64)
    where = np.argwhere(brain[::4, ::4, ::4]) * 4
    central = where[np.all(np.abs(where - size / 2) < inner * size, axis=1)]
    candidates = central if len(central) else where
    return candidates[rng.integers(len(candidates))] + rng.uniform(0, 4, 3)


def _brain_point(brain: np.ndarray, rng, inner: float = 0.38) -> np.ndarray:
    """A point within half a voxel of a brain voxel at least 2 voxels inside the brain (any
    brain voxel if there is none), within ``inner`` of the box size from the box centre."""
    size = np.asarray(brain.shape, dtype=np.float64)
    deep = ndimage.binary_erosion(brain[::2, ::2, ::2])
    where = np.argwhere(deep if deep.any() else brain[::2, ::2, ::2]) * 2
    central = where[np.all(np.abs(where - size / 2) < inner * size, axis=1)]
    candidates = central if len(central) else where
    return candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, 3)


def _unit_vector(rng) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / max(np.linalg.norm(v), 1e-6)


def _paint_lesion(tissue: np.ndarray, brain: np.ndarray, centre, core_radius: float, edema_factor: float,
                  rng, rim=(0.45, 0.8), et_modes=(0.1, 0.2)) -> _Lesion:
    """Paint edema (over normal tissue only), then the core (necrosis inside an enhancing rim).

    ``rim``: range of the rim's inner boundary in core radii; ``et_modes``: a uniform draw below
    ``et_modes[0]`` gives no enhancement at all, below ``et_modes[1]`` a few enhancing spots on the
    rim, otherwise the full rim.
    """
    size = np.asarray(tissue.shape, dtype=np.float64)
    stretch = rng.uniform(0.75, 1.25, 3)
    # the box holds the edema for any deformation: its radius is at most this
    half = core_radius * stretch.max() * max(edema_factor / (1.0 - 2.0 * EDEMA_DEFORMATION),
                                             (1.0 + EDEMA_SHELL) / (1.0 - 2.0 * CORE_DEFORMATION))
    lo, hi = _box(centre, half, size)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    box_shape = tuple(hi - lo)
    dist = _frame_distance(lo, hi, centre, core_radius, stretch, rng)
    core_dist = dist * (1.0 + CORE_DEFORMATION * _clipped_field(box_shape, 4, 2.0, rng))
    edema_deform = _clipped_field(box_shape, 5, 2.0, rng)
    edema_dist = dist / edema_factor * (1.0 + EDEMA_DEFORMATION * edema_deform)

    region = tissue[box]
    inside = brain[box]
    core = inside & (core_dist < 1.0)
    rim_mask = core & (core_dist >= rng.uniform(*rim))
    mode = rng.random()
    if mode < et_modes[0]:  # non-enhancing tumour: no ET at all
        enhancing = np.zeros_like(rim_mask)
    elif mode < et_modes[1]:  # a few small enhancing spots
        enhancing = rim_mask & (smooth_field(box_shape, 6, rng) > 1.0)
    else:
        enhancing = rim_mask
    # edema: the deformed outer ellipsoid, and at least a thin shell around the core
    region[inside & ((edema_dist < 1.0) | (core_dist < 1.0 + EDEMA_SHELL)) & ~core & (region <= WM)] = ED
    region[core] = NCR
    region[enhancing] = ET
    return _Lesion(box, lo, hi, core)


def _box(centre, half: float, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel bounds ``[lo, hi)`` of the cube of half-size ``half`` around ``centre``, in the volume
    (never empty)."""
    lo = np.maximum(np.floor(centre - half), 0).astype(int)
    hi = np.minimum(np.ceil(centre + half) + 1, size).astype(int)
    lo = np.minimum(lo, size.astype(int) - 1)
    return lo, np.maximum(hi, lo + 1)


def _frame_distance(lo, hi, centre, radius: float, stretch, rng) -> np.ndarray:
    """Distance from ``centre`` in a randomly rotated frame stretched by ``stretch``, in units of
    ``radius``, over the voxels ``[lo, hi)`` (float32)."""
    rotation, upper = np.linalg.qr(rng.standard_normal((3, 3)))
    rotation = (rotation * np.sign(np.diag(upper))).astype(np.float32)
    offsets = [_axis_grid(np.arange(a, b, dtype=np.float32) - np.float32(c), d)
               for d, (a, b, c) in enumerate(zip(lo, hi, centre))]
    dist2 = np.zeros(tuple(hi - lo), dtype=np.float32)
    for row, s in zip(rotation, stretch):
        dist2 += (sum(r * o for r, o in zip(row, offsets)) / np.float32(radius * s)) ** 2
    return np.sqrt(dist2)


def _blob(shape, centre, radius: float, rng, deformation: float,
          stretch=(0.8, 1.2)) -> tuple[tuple[slice, ...], np.ndarray]:
    """A deformed, stretched, rotated ball: its box and the normalized distance there (< 1 inside)."""
    size = np.asarray(shape, dtype=np.float64)
    half = radius * stretch[1] / (1.0 - 2.0 * deformation)
    lo, hi = _box(centre, half, size)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), _blob_in(lo, hi, centre, radius, rng, deformation, stretch)


def _blob_in(lo, hi, centre, radius: float, rng, deformation: float, stretch=(0.8, 1.2)) -> np.ndarray:
    """``_blob``'s normalized distance over the given voxel bounds."""
    dist = _frame_distance(lo, hi, centre, radius, rng.uniform(*stretch, 3), rng)
    return dist * (1.0 + deformation * _clipped_field(tuple(hi - lo), 4, 2.0, rng))


def _contrasts(tissue: np.ndarray, brain: np.ndarray, rng, all_tissues: bool = False) -> np.ndarray:
    """Four MR channels from the tissue map: per-case scaling, texture, bias field, noise.

    Per-case intensities are drawn for the glioma tissues, then (``all_tissues``) for the others,
    so the glioma cases keep their random stream whatever tissues exist."""
    shape = tissue.shape
    base = TISSUE_INTENSITY[:, :GLIOMA_TISSUES]
    intensity = base * rng.uniform(0.95, 1.05, base.shape).astype(np.float32)
    if all_tissues:
        extra = TISSUE_INTENSITY[:, GLIOMA_TISSUES:]
        intensity = np.concatenate([intensity, extra * rng.uniform(0.95, 1.05, extra.shape).astype(np.float32)], 1)
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
def case_arrays(index: int, seed: int = 0, task: str | Path | Task = DEFAULT_TASK,
                shape: tuple[int, int, int] = (240, 240, 155)) -> tuple[np.ndarray, np.ndarray]:
    """Case ``index`` in memory: ``images (C, X, Y, Z) float32`` in the task's channel order and
    ``labels (X, Y, Z) uint8`` in the task's label values (what ``generate_case`` writes)."""
    task = resolve_task(task)
    plan = _plan(task)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    images, lesions = synthesize_case(_check_shape(shape), np.random.default_rng([seed, index]), plan.kind)
    return images[list(plan.channels)], task.classes_to_labels(plan.lesion_to_class[lesions])


def generate_case(out_dir: str | Path, index: int, seed: int = 0, task: str | Path | Task = DEFAULT_TASK,
                  shape: tuple[int, int, int] = (240, 240, 155), dtype: str = "int16",
                  seg_dtype: str = "uint8", grid: tuple | None = None) -> Path:
    """Write case number ``index`` of ``task`` (a name, a task YAML path or a ``Task``) under
    ``out_dir`` and return its folder ``out_dir/<case id>/`` (brats layout) or its 4D image
    ``out_dir/imagesTr/<case id>.nii.gz`` (msd layout, label in ``labelsTr/``; ``generate_dataset``
    writes ``dataset.json``).

    The content depends only on ``(seed, index, shape, task)``; ``dtype`` is the image dtype on disk.
    ``grid = (spacing, orientation)`` writes it on a native grid (``native_grid``).
    """
    task = resolve_task(task)
    _check_choice("dtype", dtype, IMAGE_DTYPES)
    _check_choice("seg_dtype", seg_dtype, SEG_DTYPES)
    name = case_id(index, task)
    shape = _check_shape(shape)
    images, labels = case_arrays(index, seed, task, shape)
    affine = brats_affine(shape)
    if grid is not None:
        images, labels, affine = native_grid(images, labels, *grid)
    images = np.rint(images).astype(np.int16) if dtype == "int16" else images
    labels = labels.astype(seg_dtype)
    if task.layout == "msd":
        image_path, label_path = msd_files(out_dir, name)
        data = np.ascontiguousarray(np.moveaxis(images, 0, -1)) if len(images) > 1 else images[0]
        atomic_save(_nifti(data, affine), image_path)
        atomic_save(_nifti(labels, affine), label_path)
        return image_path
    folder = Path(out_dir) / name
    image_paths, label_path = case_files(folder, task)
    for image, path in zip(images, image_paths):
        atomic_save(_nifti(image, affine), path)
    atomic_save(_nifti(labels, affine), label_path)
    return folder


def native_grid(images: np.ndarray, labels: np.ndarray, spacing, orientation: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1 mm L-P-S arrays ``(C, X, Y, Z)`` / ``(X, Y, Z)`` -> the same head on a grid of ``spacing`` mm
    stored in ``orientation`` (``GRIDS``): images resampled linearly, labels by one-hot + argmax;
    ``ras`` reverses the first two axes, ``oblique`` rotates the grid by ``OBLIQUE_DEGREES``.
    Returns ``(images, labels, affine)``."""
    from datasets.spatial import resample, resample_classes  # the pipeline's own interpolation

    _check_choice("orientation", orientation, GRIDS)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")
    shape = tuple(max(MIN_SHAPE, int(round(n / s))) for n, s in zip(labels.shape, spacing))
    images = np.maximum(resample(images, shape, "linear"), 0.0) * (resample(
        (images != 0).any(0, keepdims=True).astype(np.float32), shape, "linear")[0] > 0.5)
    labels = resample_classes(labels, shape, int(labels.max()) + 1)
    linear = np.diag([-spacing[0], -spacing[1], spacing[2]])
    if orientation == "ras":
        images, labels = images[:, ::-1, ::-1], labels[::-1, ::-1]
        linear = np.diag(spacing)
    elif orientation == "oblique":
        a = np.radians(OBLIQUE_DEGREES)
        linear = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ (np.asarray(shape) - 1) / 2  # the volume centred on the origin
    return np.ascontiguousarray(images, dtype=np.float32), np.ascontiguousarray(labels), affine


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0, 0.0)
    return img


def write_dataset_json(root: str | Path, task: str | Path | Task = "msd-brain") -> Path:
    """``ROOT/dataset.json`` of an msd-layout folder, in the MSD form (name, description,
    tensorImageSize, modality, labels, numTraining, numTest, training [{image, label}], test),
    listing every ``imagesTr`` image that has a ``labelsTr`` label and every ``imagesTs`` image."""
    task = resolve_task(task)
    root = Path(root)

    def listed(folder: str) -> list[str]:
        path = root / folder
        return sorted(p.name for p in path.glob("*.nii.gz") if not p.name.startswith(".")) if path.is_dir() else []

    labelled = set(listed("labelsTr"))
    training = [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in listed("imagesTr") if n in labelled]
    test = [f"./imagesTs/{n}" for n in listed("imagesTs")]
    lesions = _label_lesions(task)
    labels = {"0": "background"}
    for cls in sorted(lesions, key=lambda c: task.label_values[c]):
        labels[str(task.label_values[cls])] = MSD_LABEL_NAMES[lesions[cls]]
    content = {
        "name": "BRATS" if task.name == "msd-brain" else task.name,
        "description": f"synthetic cases of task {task.name} (datasets/synthetic.py)",
        "reference": "synthetic", "licence": "synthetic", "release": "synthetic",
        "tensorImageSize": "4D" if len(task.modalities) > 1 else "3D",
        "modality": {str(i): m for i, m in enumerate(task.file_modalities)},
        "labels": labels,
        "numTraining": len(training), "numTest": len(test),
        "training": training, "test": test,
    }
    return atomic_write_text(root / "dataset.json", json.dumps(content, indent=4) + "\n")


def generate_dataset(out_dir: str | Path, cases: int, seed: int = 0, task: str | Path | Task = DEFAULT_TASK,
                     shape: tuple[int, int, int] = (240, 240, 155), dtype: str = "int16",
                     seg_dtype: str = "uint8", workers: int = 1, native: str | None = None) -> list[Path]:
    """Write cases ``0 .. cases-1`` of ``task`` under ``out_dir`` (``workers`` processes); return
    what ``generate_case`` returned for each (case folders, or the 4D images of the msd layout,
    which also gets ``dataset.json``). ``native="mixed"``: case ``i`` on grid ``NATIVE_MIX[i % 3]``."""
    task = resolve_task(task)
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _plan(task)  # a task that cannot be synthesized fails here, not in a worker
    if native not in (None, "mixed"):
        raise ValueError(f"native must be None or 'mixed', got {native!r}")
    args = [(out_dir, i, seed, task, tuple(shape), dtype, seg_dtype, NATIVE_MIX[i % 3] if native else None)
            for i in range(cases)]
    if workers == 1 or cases == 1:
        paths = [generate_case(*a) for a in args]
    else:
        with ProcessPoolExecutor(min(workers, cases)) as pool:
            paths = list(pool.map(generate_case, *zip(*args)))
    if task.layout == "msd":
        write_dataset_json(out_dir, task)
    return paths


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _cli_task(spec: str) -> Task:
    """``--task``: a built-in name or a task YAML path; an unknown name is one line."""
    builtins = builtin_tasks()
    if spec in builtins or spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        return load_task(spec)
    close = difflib.get_close_matches(spec, list(builtins), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"datasets.synthetic: unknown --task '{spec}'{hint} (built-in: {', '.join(builtins)}; "
                    "or the path of a task YAML)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic cases of a BraTS task.")
    parser.add_argument("out_dir", help="folder that receives one sub-folder per case (MSD: imagesTr/labelsTr)")
    parser.add_argument("--task", default=DEFAULT_TASK,
                        help=f"built-in task ({', '.join(builtin_tasks())}) or task YAML (default {DEFAULT_TASK})")
    parser.add_argument("--cases", type=int, default=10, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="random seed (case i depends on seed, i, shape, task)")
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], metavar=("X", "Y", "Z"))
    parser.add_argument("--dtype", choices=IMAGE_DTYPES, default="int16", help="image dtype on disk")
    parser.add_argument("--workers", type=int, default=1, help="processes")
    parser.add_argument("--native", choices=["mixed"], default=None,
                        help="native-space grids: cycle 1x1x1 mm LPS, 1x1x3 mm RAS, 0.8x0.8x2 mm oblique")
    args = parser.parse_args(argv)
    task = _cli_task(args.task)
    try:
        paths = generate_dataset(args.out_dir, args.cases, args.seed, task, tuple(args.shape), args.dtype,
                                 workers=args.workers, native=args.native)
    except ValueError as err:  # bad --cases/--shape/--workers, a task it cannot synthesize: one line, exit 2
        raise UserError(f"datasets.synthetic: {err}") from None
    print(f"wrote {len(paths)} cases of {task.name} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
