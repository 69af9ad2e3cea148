"""BraTS case discovery and NIfTI I/O that keeps the geometry.

The contract (after nnU-Net): the reader returns ``(array, geometry)`` and the writer takes the
same ``geometry``, so a prediction is written back with the input's affine, header and shape by
construction::

    cases = discover_cases("data/brats")                  # both naming conventions
    images, seg, geom = read_case(cases[0], ["t1", "t1ce", "t2", "flair"])
    # images: (C, X, Y, Z) float32, header scaling applied; seg: (X, Y, Z) int file labels or None
    write_segmentation(labels, geom, "out/BraTS2021_00000.nii.gz")  # uint8, input's affine+header

Every problem with a file is a ``CaseError`` (a ``UserError``): one line naming the file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from engine.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# every accepted modality name -> canonical (2021) name
MODALITY_ALIASES = {
    "t1": "t1", "t1n": "t1",
    "t1ce": "t1ce", "t1c": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair",
}
LABEL_SUFFIX = "seg"


class CaseError(UserError):
    """A problem with one case's files (missing, unreadable, inconsistent)."""


@dataclass
class Case:
    """One BraTS case folder. ``images`` maps canonical modality names to files."""

    case_id: str
    folder: Path
    images: dict[str, Path]
    seg: Path | None = None

    def image_paths(self, modalities: list[str]) -> list[Path]:
        """Files for ``modalities`` (any alias) in that order; ``CaseError`` if one is missing."""
        paths = []
        for name in modalities:
            canonical = canonical_modality(name)
            if canonical not in self.images:
                found = ", ".join(sorted(self.images)) or "none"
                raise CaseError(f"{self.folder}: case {self.case_id} has no '{name}' image (found: {found})")
            paths.append(self.images[canonical])
        return paths


@dataclass
class Geometry:
    """Everything needed to write a prediction back where it came from.

    ``affine``/``header`` come from the first modality file; ``shape`` is its 3D shape;
    ``crop_box`` is ``((x0, x1), (y0, y1), (z0, z1))`` of the brain crop (full volume until
    preprocessing sets it); ``label_dtype`` is the on-disk dtype of the seg file (if any);
    ``convention`` is the label convention ("2021"/"2023") once known.
    """

    affine: np.ndarray
    header: nib.Nifti1Header | None
    shape: tuple[int, int, int]
    label_dtype: str = "uint8"
    crop_box: tuple[tuple[int, int], ...] | None = None
    convention: str | None = None
    source: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes (from the affine's column norms)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        if self.crop_box is None:
            return self.shape
        return tuple(int(b - a) for a, b in self.crop_box)

    def to_json(self) -> dict:
        """JSON-safe record (without the binary header) for the preprocessing cache."""
        return {
            "affine": self.affine.tolist(), "shape": list(self.shape), "label_dtype": self.label_dtype,
            "crop_box": [list(b) for b in self.crop_box] if self.crop_box else None,
            "convention": self.convention, "source": self.source,
        }

    @classmethod
    def from_json(cls, record: dict) -> "Geometry":
        box = record.get("crop_box")
        return cls(affine=np.asarray(record["affine"], dtype=np.float64), header=None,
                   shape=tuple(record["shape"]), label_dtype=record.get("label_dtype", "uint8"),
                   crop_box=tuple(tuple(b) for b in box) if box else None,
                   convention=record.get("convention"), source=record.get("source", ""))


def canonical_modality(name: str) -> str:
    """``'t2f'`` -> ``'flair'``; unknown names are a ``UserError`` listing the valid ones."""
    key = name.lower()
    if key not in MODALITY_ALIASES:
        raise UserError(f"unknown modality '{name}' (valid: {', '.join(MODALITY_ALIASES)})")
    return MODALITY_ALIASES[key]


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------
def discover_cases(root: str | Path) -> list[Case]:
    """Cases under ``root`` (sorted by id), or ``root`` itself if it is one case folder.

    A case folder ``NAME/`` holds ``NAME_{t1,t1ce,t2,flair,seg}.nii[.gz]`` (2018-2021) or
    ``NAME-{t1n,t1c,t2w,t2f,seg}.nii[.gz]`` (2023+, any ``BraTS-XXX-`` prefix). Cases without a
    seg file are inference-only (``case.seg is None``).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found")
    single = _parse_case_folder(root)
    if single is not None:
        return [single]
    cases = [c for c in (_parse_case_folder(p) for p in sorted(root.iterdir()) if p.is_dir()) if c]
    if not cases:
        raise UserError(f"{root}: no BraTS cases found (expected case folders like "
                        "BraTS2021_00000/BraTS2021_00000_t1.nii.gz or BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz)")
    return cases


def _parse_case_folder(folder: Path) -> Case | None:
    case_id = folder.name
    pattern = re.compile(re.escape(case_id) + r"[_-]([A-Za-z0-9]+)(\.nii\.gz|\.nii)$", re.IGNORECASE)
    images: dict[str, Path] = {}
    seg = None
    for path in sorted(folder.iterdir()):
        match = pattern.fullmatch(path.name)
        if not match or not path.is_file():
            continue
        suffix = match.group(1).lower()
        if suffix == LABEL_SUFFIX:
            seg = path
        elif suffix in MODALITY_ALIASES:
            images[MODALITY_ALIASES[suffix]] = path
    if not images and seg is None:
        return None
    return Case(case_id=case_id, folder=folder, images=images, seg=seg)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Load a NIfTI header (data stays on disk); ``CaseError`` if unreadable or not 3D."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for corrupt files
        raise CaseError(f"{path}: cannot read NIfTI ({_one_line(err)})") from None
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) != 3:
        raise CaseError(f"{path}: expected a 3D volume, got shape {tuple(shape)}")
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
    if data.min() < 0 or data.max() > 255:
        raise CaseError(f"{path}: label values out of range [{data.min()}, {data.max()}]")
    return data.astype(np.uint8)


def read_case(case: Case, modalities: list[str], with_label: bool = True
              ) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Read ``modalities`` (and the seg file, if present and ``with_label``) of one case.

    Returns ``images (C, X, Y, Z) float32``, ``seg (X, Y, Z) uint8 file labels or None`` and the
    ``Geometry`` of the first modality. Every file must share its shape and affine.
    """
    paths = case.image_paths(modalities)
    ref = load_nifti(paths[0])
    shape = tuple(int(s) for s in ref.shape)
    images = np.empty((len(paths),) + shape, dtype=np.float32)
    for i, path in enumerate(paths):
        img = ref if i == 0 else load_nifti(path)
        _check_same_grid(img, ref, path, paths[0])
        images[i] = read_image(img, path)
    geometry = Geometry(affine=ref.affine.copy(), header=ref.header.copy(), shape=shape,
                        source=str(paths[0]))
    seg = None
    if with_label and case.seg is not None:
        seg_img = load_nifti(case.seg)
        _check_same_grid(seg_img, ref, case.seg, paths[0])
        seg = read_label(seg_img, case.seg)
        geometry.label_dtype = str(seg_img.get_data_dtype())
    return images, seg, geometry


def _check_same_grid(img, ref, path: Path, ref_path: Path) -> None:
    if tuple(img.shape) != tuple(ref.shape):
        raise CaseError(f"{path}: shape {tuple(img.shape)} differs from {ref_path.name} {tuple(ref.shape)}")
    if not np.allclose(img.affine, ref.affine, atol=1e-3):
        raise CaseError(f"{path}: affine differs from {ref_path.name} (modalities are not co-registered)")


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def uncrop(array: np.ndarray, geometry: Geometry, fill: float = 0) -> np.ndarray:
    """Paste ``array (..., x, y, z)`` of the cropped shape back into ``(..., *geometry.shape)``.

    An array already of the full shape is returned unchanged.
    """
    spatial = tuple(array.shape[-3:])
    if spatial == geometry.shape:
        return array
    if geometry.crop_box is None or spatial != geometry.cropped_shape:
        raise ValueError(f"array shape {spatial} matches neither the original shape {geometry.shape} "
                         f"nor the crop {geometry.cropped_shape}")
    full = np.full(array.shape[:-3] + geometry.shape, fill, dtype=array.dtype)
    (x0, x1), (y0, y1), (z0, z1) = geometry.crop_box
    full[..., x0:x1, y0:y1, z0:z1] = array
    return full


def write_segmentation(labels: np.ndarray, geometry: Geometry, path: str | Path) -> Path:
    """Write file labels ``(X, Y, Z)`` (full or cropped shape) as uint8 NIfTI with the input's
    affine and header (sform/qform codes kept, no scaling), atomically."""
    full = uncrop(np.asarray(labels).astype(np.uint8), geometry)
    return _write_nifti(full, geometry, path, np.uint8, slope=1.0)


def write_probabilities(probs: np.ndarray, geometry: Geometry, path: str | Path) -> Path:
    """Write probabilities ``(C, X, Y, Z)`` in [0, 1] as a 4D NIfTI ``(X, Y, Z, C)``.

    NIfTI-1 has no float16, so values are stored as uint8 with ``scl_slope = 1/255``: every
    reader (nibabel's ``get_fdata``, ITK-SNAP, Slicer) returns floats within 0.002 of the input.
    """
    full = uncrop(np.asarray(probs, dtype=np.float32), geometry)
    quantized = np.clip(np.rint(full * 255.0), 0, 255).astype(np.uint8)
    return _write_nifti(np.moveaxis(quantized, 0, -1), geometry, path, np.uint8, slope=1.0 / 255.0)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        img.set_data_dtype(img.header.get_data_dtype())
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}" if text != type(err).__name__ else text
