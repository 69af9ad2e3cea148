"""BraTS case discovery and NIfTI I/O that keeps the geometry.

The contract (after nnU-Net): the reader returns ``(array, geometry)`` and the writer takes the
same ``geometry``, so a prediction is written back with the input's affine, header and shape by
construction::

    cases = discover_cases("data/brats")                  # any BraTS naming, or the MSD layout
    images, seg, geom = read_case(cases[0], task)         # task: core.task.Task
    # images: (C, X, Y, Z) float32, header scaling applied; seg: (X, Y, Z) uint8 file labels or None
    full = to_original(labels_on_the_cropped_canonical_grid, geom)  # after preprocessing (geom records it)
    write_segmentation(full, geom, "out/BraTS2021_00000.nii.gz")  # uint8, input's affine+header

Two layouts are found:

- ``brats``: one folder per case, ``NAME/NAME[_-]<suffix>.nii[.gz]``: a file per modality (any
  suffix, e.g. ``t1``/``t1n``, ``t1c``, ``flair``) and the label file (``seg``, or ``gtv`` for
  MEN-RT);
- ``msd`` (Medical Segmentation Decathlon): ``imagesTr/NAME.nii.gz`` (one 4D file holding every
  modality) with ``labelsTr/NAME.nii.gz``, and ``imagesTs/`` without labels.

Every problem with a file is a ``CaseError`` (a ``UserError``): one line naming the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from core.atomic import atomic_path
from core.errors import UserError
from core.task import Task, builtin_tasks, canonical_modality
from datasets.spatial import Orientation, canonical_affine, canonical_values, from_canonical, resampled_shape

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MSD_IMAGE_FOLDERS = {"imagesTr": "labelsTr", "imagesTs": "labelsTs"}  # image folder -> its label folder


class CaseError(UserError):
    """A problem with one case's files (missing, unreadable, inconsistent)."""


@dataclass
class Case:
    """One case. ``files`` maps each file suffix (lower case) of a case folder to its file;
    ``seg`` is the label file (``None``: inference only); ``volume`` is the MSD 4D image."""

    case_id: str
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    seg: Path | None = None
    layout: str = "brats"
    volume: Path | None = None

    def modalities_present(self) -> frozenset[str] | None:
        """Canonical modality names of the image files (``None`` for an MSD 4D file: not named)."""
        if self.layout == "msd":
            return None
        return frozenset(canonical_modality(suffix) for suffix in self.files)

    def image_sources(self, modalities: Sequence[str], task: Task) -> list[tuple[Path, int | None]]:
        """``(file, channel)`` of each of ``modalities`` (any alias), in that order: the case
        folder's file of that modality (channel ``None``), or the MSD 4D file and the channel
        the task gives the modality. ``CaseError`` naming what is missing."""
        sources = []
        for name in modalities:
            canonical = canonical_modality(name)
            if self.layout == "msd":
                if canonical not in task.modalities:
                    raise CaseError(f"{self.volume}: task {task.name} has no modality '{name}' "
                                    f"(its 4D images hold {', '.join(task.file_modalities)})")
                sources.append((self.volume, task.modalities.index(canonical)))
                continue
            matches = [path for suffix, path in self.files.items() if canonical_modality(suffix) == canonical]
            if not matches:
                found = ", ".join(sorted(self.files)) or "none"
                raise CaseError(f"{self.folder}: case {self.case_id} has no '{name}' image (found: {found})")
            sources.append((matches[0], None))
        return sources

    def source_files(self, modalities: Sequence[str], task: Task) -> list[Path]:
        """The distinct files read for ``modalities`` (and the label file), in order."""
        paths = [path for path, _ in self.image_sources(modalities, task)]
        paths += [self.seg] if self.seg is not None else []
        return list(dict.fromkeys(paths))


@dataclass
class Geometry:
    """Everything needed to write a prediction back where it came from.

    ``affine``/``header`` come from the first image file; ``shape`` is its 3D shape (the original
    grid). Preprocessing (``datasets.preprocess``) records the rest: ``orientation`` (original ->
    canonical axes, ``datasets.spatial``; ``None`` = already canonical), ``crop_box`` ``((x0, x1),
    (y0, y1), (z0, z1))`` of the foreground in the canonical grid, and, when the crop was resampled,
    ``target_spacing`` and ``resampled_shape`` (the model's grid). ``task`` is the name of the
    case's task once known; ``source`` the first image file (for messages).
    """

    affine: np.ndarray
    header: nib.Nifti1Header | None
    shape: tuple[int, int, int]
    crop_box: tuple[tuple[int, int], ...] | None = None
    task: str | None = None
    source: str = ""
    orientation: Orientation | None = None
    target_spacing: tuple[float, float, float] | None = None
    resampled_shape: tuple[int, int, int] | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the original array axes (from the affine's column norms)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return canonical_values(self.shape, self.orientation)

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        return canonical_values(self.spacing, self.orientation)

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        """The foreground crop in the canonical grid (the whole canonical grid before cropping)."""
        if self.crop_box is None:
            return self.canonical_shape
        return tuple(int(b - a) for a, b in self.crop_box)

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """The crop on the grid the network sees (resampled or not)."""
        return self.resampled_shape or self.cropped_shape

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        return self.target_spacing or self.canonical_spacing

    @property
    def model_affine(self) -> np.ndarray:
        """Voxel-to-world matrix (orientation and spacing, no translation) of the model grid."""
        return canonical_affine(self.model_spacing)

    @property
    def model_full_shape(self) -> tuple[int, ...]:
        """The whole (uncropped) canonical volume at the model's spacing."""
        return resampled_shape(self.canonical_shape, self.canonical_spacing, self.target_spacing)

    def to_json(self) -> dict:
        """JSON-safe record (without the binary header) for the preprocessing cache."""
        return {
            "affine": self.affine.tolist(), "shape": list(self.shape),
            "crop_box": [list(b) for b in self.crop_box] if self.crop_box else None,
            "task": self.task, "source": self.source,
            "orientation": [[axis, flip] for axis, flip in self.orientation] if self.orientation else None,
            "target_spacing": list(self.target_spacing) if self.target_spacing else None,
            "resampled_shape": list(self.resampled_shape) if self.resampled_shape else None,
        }

    @classmethod
    def from_json(cls, record: dict) -> "Geometry":
        box, orientation = record.get("crop_box"), record.get("orientation")
        return cls(affine=np.asarray(record["affine"], dtype=np.float64), header=None,
                   shape=tuple(record["shape"]),
                   crop_box=tuple(tuple(b) for b in box) if box else None,
                   task=record.get("task"), source=record.get("source", ""),
                   orientation=tuple((int(a), bool(f)) for a, f in orientation) if orientation else None,
                   target_spacing=tuple(record["target_spacing"]) if record.get("target_spacing") else None,
                   resampled_shape=tuple(record["resampled_shape"]) if record.get("resampled_shape") else None)


def label_suffixes(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """File suffixes that mark a label file: every built-in task's (``seg``, ``gtv``) and ``extra``."""
    names = [t.label_file for t in builtin_tasks().values()] + [s.lower() for s in extra]
    return tuple(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------
def discover_cases(root: str | Path, extra_label_suffixes: Sequence[str] = ()) -> list[Case]:
    """Cases under ``root`` (sorted by id): case folders (``root`` itself may be one), or the MSD
    layout (``root`` holding ``imagesTr``/``imagesTs``, or being one of those folders).

    A case folder ``NAME/`` holds ``NAME[_-]<suffix>.nii[.gz]`` files; the label file's suffix
    is one of ``label_suffixes(extra_label_suffixes)``. Cases without a label file are
    inference-only (``case.seg is None``). Files starting with ``.`` are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found")
    labels = label_suffixes(extra_label_suffixes)
    msd = _discover_msd(root)
    if msd is not None:
        return msd
    single = _parse_case_folder(root, labels)
    if single is not None:
        return [single]
    cases = [c for c in (_parse_case_folder(p, labels) for p in sorted(root.iterdir()) if p.is_dir()) if c]
    if not cases:
        raise UserError(f"{root}: no BraTS cases found (expected case folders like "
                        "BraTS2021_00000/BraTS2021_00000_t1.nii.gz or BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz, "
                        "or an MSD folder with imagesTr/)")
    return cases


def _parse_case_folder(folder: Path, labels: Sequence[str]) -> Case | None:
    case_id = folder.name
    pattern = re.compile(re.escape(case_id) + r"[_-]([A-Za-z0-9]+)(\.nii\.gz|\.nii)$", re.IGNORECASE)
    files: dict[str, Path] = {}
    seg = None
    for path in sorted(folder.iterdir()):
        match = pattern.fullmatch(path.name)
        if not match or not path.is_file():
            continue
        suffix = match.group(1).lower()
        if suffix in labels:
            seg = seg or path
        else:
            files[suffix] = path
    if not files and seg is None:
        return None
    return Case(case_id=case_id, folder=folder, files=files, seg=seg)


def _discover_msd(root: Path) -> list[Case] | None:
    """MSD cases of ``root`` (holding ``imagesTr``/``imagesTs``, or being one), else ``None``."""
    if root.name in MSD_IMAGE_FOLDERS:
        pairs = [(root, root.parent / MSD_IMAGE_FOLDERS[root.name])]
    else:
        pairs = [(root / i, root / l) for i, l in MSD_IMAGE_FOLDERS.items() if (root / i).is_dir()]
    if not pairs:
        return None
    cases: dict[str, Case] = {}
    for images, labels in pairs:
        for path in sorted(images.iterdir()):
            case_id = nifti_stem(path)
            if case_id is None:
                continue
            if case_id in cases:
                raise CaseError(f"{path}: case {case_id} is also in {cases[case_id].volume.parent}")
            seg = next((labels / f"{case_id}{s}" for s in NIFTI_SUFFIXES if (labels / f"{case_id}{s}").is_file()), None)
            cases[case_id] = Case(case_id=case_id, folder=images, seg=seg, layout="msd", volume=path)
    if not cases:
        raise UserError(f"{root}: the MSD image folders ({', '.join(str(i) for i, _ in pairs)}) hold no .nii.gz files")
    return [cases[k] for k in sorted(cases)]


def nifti_stem(path: Path) -> str | None:
    """``'BRATS_001'`` for ``BRATS_001.nii.gz``; ``None`` for hidden files and other files."""
    if not path.is_file() or path.name.startswith("."):
        return None
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def load_nifti(path: str | Path, channels: bool = False) -> nib.Nifti1Image:
    """Load a NIfTI header (data stays on disk); ``CaseError`` if unreadable or not 3D (with
    ``channels``: 3D or 4D, the 4th axis holding modalities)."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for corrupt files
        raise CaseError(f"{path}: cannot read NIfTI ({_one_line(err)})") from None
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1 and not channels:
        img = img.slicer[..., 0]
    elif len(shape) != 3 and not (channels and len(shape) == 4):
        raise CaseError(f"{path}: expected a {'3D or 4D' if channels else '3D'} volume, got shape {tuple(shape)}")
    return img


def read_image(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """Voxel data as float32 with the header's scl_slope/scl_inter applied; no NaN/inf."""
    try:
        data = img.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as err:
        raise CaseError(f"{path}: cannot read voxel data ({_one_line(err)})") from None
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise CaseError(f"{path}: {bad} voxels are NaN or infinite")
    return data


def read_label(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """Label values as uint8; ``CaseError`` if non-integer or outside 0..255."""
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise CaseError(f"{path}: cannot read voxel data ({_one_line(err)})") from None
    if not np.issubdtype(data.dtype, np.integer):
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise CaseError(f"{path}: label file has non-integer values")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise CaseError(f"{path}: label values out of range [{data.min()}, {data.max()}]")
    return data.astype(np.uint8)


def read_case(case: Case, task: Task, modalities: Sequence[str] | None = None, with_label: bool = True
              ) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Read ``modalities`` (default: the task's) and, if present and ``with_label``, the label
    file of one case.

    Returns ``images (C, X, Y, Z) float32``, ``seg (X, Y, Z) uint8 file labels or None`` and the
    ``Geometry`` of the first image file. Every file must share its shape and affine.
    """
    sources = case.image_sources(task.modalities if modalities is None else modalities, task)
    ref_path = sources[0][0]
    ref = load_nifti(ref_path, channels=case.layout == "msd")
    check_voxel_spacing(ref.affine, ref_path)
    shape = tuple(int(s) for s in ref.shape[:3])
    images = np.empty((len(sources),) + shape, dtype=np.float32)
    volumes: dict[Path, np.ndarray] = {}
    for i, (path, channel) in enumerate(sources):
        if channel is None:
            img = ref if i == 0 else load_nifti(path)
            _check_same_grid(img, ref, path, ref_path)
            images[i] = read_image(img, path)
            continue
        if path not in volumes:  # an MSD 4D file: decompressed once for all its channels
            volumes[path] = _read_channels(ref if path == ref_path else load_nifti(path, channels=True), path, task)
        images[i] = volumes[path][..., channel]
    geometry = Geometry(affine=ref.affine.copy(), header=ref.header.copy(), shape=shape, source=str(ref_path))
    seg = None
    if with_label and case.seg is not None:
        seg_img = load_nifti(case.seg)
        _check_same_grid(seg_img, ref, case.seg, ref_path)
        seg = read_label(seg_img, case.seg)
    return images, seg, geometry


def check_voxel_spacing(affine: np.ndarray, path: Path) -> tuple[float, float, float]:
    """The voxel spacing of ``affine``; ``CaseError`` naming the file when it is 0 or not a number."""
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    if not np.isfinite(affine).all() or not (spacing > 1e-6).all():
        raise CaseError(f"{path}: voxel spacing {tuple(round(float(v), 6) for v in spacing)} from the header "
                        "is zero or not a number (broken pixdim / sform / qform)")
    return tuple(float(v) for v in spacing)


def _read_channels(img: nib.Nifti1Image, path: Path, task: Task) -> np.ndarray:
    """A 4D ``(X, Y, Z, C)`` image whose C must be the task's modality count."""
    count = img.shape[3] if len(img.shape) == 4 else 1
    if count != len(task.modalities):
        raise CaseError(f"{path}: the 4D image has {count} channel(s), task {task.name} expects "
                        f"{len(task.modalities)} ({', '.join(task.file_modalities)})")
    data = read_image(img, path)
    return data if data.ndim == 4 else data[..., None]


def _check_same_grid(img, ref, path: Path, ref_path: Path) -> None:
    if tuple(img.shape[:3]) != tuple(ref.shape[:3]):
        raise CaseError(f"{path}: shape {tuple(img.shape)} differs from {ref_path.name} {tuple(ref.shape[:3])}")
    if not np.allclose(img.affine, ref.affine, atol=1e-3):
        raise CaseError(f"{path}: affine differs from {ref_path.name} (modalities are not co-registered)")


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def to_original(array: np.ndarray, geometry: Geometry, fill: float | Sequence[float] = 0) -> np.ndarray:
    """``array (..., x, y, z)`` on the canonical crop (at the original spacing) -> ``(..., *geometry.shape)``
    on the original grid: pasted into the canonical volume (``fill`` outside the crop: one value,
    or one per channel of a ``(C, x, y, z)`` array), then brought back to the original axis order
    (the exact inverse of the reorientation)."""
    spatial = tuple(array.shape[-3:])
    if spatial != geometry.cropped_shape:
        raise ValueError(f"array shape {spatial} is not the canonical crop {geometry.cropped_shape}")
    full = array
    if geometry.crop_box is not None and spatial != geometry.canonical_shape:
        full = np.empty(array.shape[:-3] + geometry.canonical_shape, dtype=array.dtype)
        full[...] = np.reshape(fill, (-1, 1, 1, 1)) if np.ndim(fill) else fill
        (x0, x1), (y0, y1), (z0, z1) = geometry.crop_box
        full[..., x0:x1, y0:y1, z0:z1] = array
    return np.ascontiguousarray(from_canonical(full, geometry.orientation))


def write_segmentation(labels: np.ndarray, geometry: Geometry, path: str | Path) -> Path:
    """Write file labels ``(X, Y, Z)`` on the original grid as uint8 NIfTI with the input's affine
    and header (sform/qform codes kept, no scaling), atomically."""
    labels = _on_original_grid(np.asarray(labels), geometry)
    return _write_nifti(labels.astype(np.uint8), geometry, path, np.uint8, slope=1.0)


def write_probabilities(probs: np.ndarray, geometry: Geometry, path: str | Path) -> Path:
    """Write probabilities ``(C, X, Y, Z)`` in [0, 1] on the original grid as a 4D NIfTI ``(X, Y, Z, C)``.

    NIfTI-1 has no float16, so values are stored as uint8 with ``scl_slope = 1/255``: every
    reader (nibabel's ``get_fdata``, ITK-SNAP, Slicer) returns floats within 0.002 of the input.
    """
    full = _on_original_grid(np.asarray(probs, dtype=np.float32), geometry)
    quantized = np.clip(np.rint(full * 255.0), 0, 255).astype(np.uint8)
    return _write_nifti(np.moveaxis(quantized, 0, -1), geometry, path, np.uint8, slope=1.0 / 255.0)


def _on_original_grid(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    if tuple(array.shape[-3:]) != tuple(geometry.shape):
        raise ValueError(f"array shape {tuple(array.shape[-3:])} is not the original grid {geometry.shape} "
                         "(use to_original first)")
    return array


def _write_nifti(data: np.ndarray, geometry: Geometry, path: str | Path, dtype, slope: float) -> Path:
    path = Path(path)
    if geometry.header is not None:
        header = geometry.header.copy()
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    else:
        header, image_class = None, nib.Nifti1Image
    img = image_class(data, geometry.affine, header)
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(slope, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    if header is not None:
        # keep the input's sform/qform and their codes exactly
        sform, scode = header.get_sform(coded=True)
        qform, qcode = header.get_qform(coded=True)
        if scode:
            img.header.set_sform(sform, int(scode))
        if qcode:
            img.header.set_qform(qform, int(qcode))
    return atomic_save(img, path)


def atomic_save(img, path: Path) -> Path:
    """``nib.save`` to a temporary name in the same folder, then rename over ``path``."""
    with atomic_path(path) as tmp:
        img.set_data_dtype(img.header.get_data_dtype())
        nib.save(img, str(tmp))
    return Path(path)


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}" if text != type(err).__name__ else text
