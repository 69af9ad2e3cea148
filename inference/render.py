"""Pictures of one case: three orthogonal slices with the segmentation overlaid, labelled.

One renderer for ``infer.py --png`` and the TensorBoard panel of ``train.py``::

    picture = render_case(image, prediction, reference, affine, task, "BraTS-GLI-00001-000",
                          subtitle=dice_line(metrics, task))    # (H, W, 3) uint8
    save_png(picture, "out/BraTS-GLI-00001-000.png")            # atomic
    logger.image("val/panel", as_chw(picture), step)             # (3, H, W) float in [0, 1]

The picture: the case id (``title``) and an optional ``subtitle`` (the per-case Dice line) at the
top; the view names (axial, coronal, sagittal) above three slices through the centre of the
predicted tumour (else the reference's, else the volume's); a row per label map (prediction, and
reference when given) with its title on the left; orientation letters at the edges of every
slice; a legend naming each label of the task with its colour and file value at the bottom.

Slices are shown in the radiological convention, whatever the affine (LPS, RAS, oblique:
``nibabel.orientations`` picks the closest axes): the patient's right on the picture's left in
the axial and coronal views, anterior up in the axial view, superior up in the coronal and
sagittal views, anterior on the left in the sagittal view. Each slice is resampled for display
by its pixel spacing in mm (nearest neighbour for labels), so anisotropic voxels keep their
physical aspect; small volumes are zoomed by an integer factor so the largest extent is at least
``MIN_EXTENT`` pixels (a 240 x 240 slice is shown at its own size).
"""
from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np

from core.atomic import atomic_write_bytes
from core.task import Task

MIN_EXTENT = 256  # pixels: volumes whose largest extent (in voxels of the finest spacing) is smaller are zoomed
OVERLAY_ALPHA = 0.5  # opacity of the label colours over the grey image
BACKGROUND = (32, 32, 32)  # canvas (slices have black air, so their extent stays visible)
TEXT = (245, 245, 245)
PAD = 10  # pixels around and between the parts
GAP = 8  # pixels between slices
FONT_SIZES = {"title": 20, "subtitle": 15, "header": 15, "letter": 14, "legend": 14}
VIEWS = ("axial", "coronal", "sagittal")
# letters at the (left, right, top, bottom) edges of each view
EDGE_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1): columns x0..x1-1, rows y0..y1-1


def render_case(image: np.ndarray, prediction: np.ndarray, reference: np.ndarray | None, affine: np.ndarray,
                task: Task, title: str, subtitle: str | None = None) -> np.ndarray:
    """The picture of one case, ``(H, W, 3)`` uint8 (see the module docstring).

    ``image (X, Y, Z)``: intensities (grey between the 0.5 and 99.5 percentiles of its nonzero
    voxels); ``prediction``, ``reference`` ``(X, Y, Z)``: training classes of ``task`` (0
    background), drawn in ``task.colours``; ``affine``: the voxel-to-world (RAS+ mm) matrix of
    the arrays (the translation is not used, so a crop of a volume keeps its affine).
    """
    return render_case_layout(image, prediction, reference, affine, task, title, subtitle)[0]


def render_case_layout(image: np.ndarray, prediction: np.ndarray, reference: np.ndarray | None,
                       affine: np.ndarray, task: Task, title: str,
                       subtitle: str | None = None) -> tuple[np.ndarray, dict[str, Box]]:
    """``render_case`` and where each part was drawn: ``{"title", "subtitle" (with a subtitle),
    "view:<view>" (its name), "row:<row>" (its title), "slice:<row>:<view>", "legend"}`` ->
    ``(x0, y0, x1, y1)`` pixel boxes; rows are ``prediction`` and ``reference``."""
    image, prediction = np.asarray(image), np.asarray(prediction)
    if image.ndim != 3 or prediction.shape != image.shape or (reference is not None
                                                              and np.shape(reference) != image.shape):
        raise ValueError(f"expected image, prediction and reference of one 3D shape, got {image.shape}, "
                         f"{prediction.shape}, {None if reference is None else np.shape(reference)}")
    rows = {"prediction": prediction} if reference is None else {"prediction": prediction,
                                                                 "reference": np.asarray(reference)}
    slices, sizes = _slice_overlays(image, rows, affine, task)
    legend_items = [(f"{name} ({value})", tuple(int(c) for c in rgb))
                    for name, value, rgb in zip(task.class_names[1:], task.label_values[1:], task.colours[1:])]
    layout = _Layout(list(rows), sizes, title, subtitle, legend_items)
    return layout.draw(slices), layout.boxes


def _slice_overlays(image: np.ndarray, rows: dict[str, np.ndarray], affine: np.ndarray, task: Task
                    ) -> tuple[dict[tuple[str, str], np.ndarray], dict[str, tuple[int, int]]]:
    """Each row's label map over the image on the three views through the tumour centre, after
    reorienting to RAS (nearest axes): ``({(row, view): RGB uint8 (h, w, 3)}, {view: (w, h)})``;
    voxels keep their physical aspect (``sizes`` in pixels of the finest spacing, zoomed)."""
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = nib.affines.voxel_sizes(np.asarray(affine, dtype=np.float64))
    spacing = np.where(np.isfinite(spacing) & (spacing > 0), spacing, 1.0)  # a broken header: square voxels
    image = nib.orientations.apply_orientation(image, ornt)
    rows = {name: nib.orientations.apply_orientation(labels, ornt) for name, labels in rows.items()}
    centre = tumour_centre(*rows.values())
    grey = _to_grey(image)
    extent = np.asarray(image.shape) * spacing / spacing.min()  # in pixels of the finest spacing
    zoom = max(1, MIN_EXTENT // max(1, int(np.ceil(extent.max()))))
    sizes = {view: _display_size(view, extent, zoom) for view in VIEWS}  # (width, height)
    palette = np.asarray(task.colours, dtype=np.float32)
    slices = {(row, view): _overlay(_view(grey, view, centre), _view(labels, view, centre), sizes[view], palette)
              for row, labels in rows.items() for view in VIEWS}
    return slices, sizes


class _Layout:
    """Where the title, subtitle, view names, row names, slices and legend go (``boxes``, pixel
    ``(x0, y0, x1, y1)``; ``width`` x ``height``), and ``draw`` to paint them."""

    def __init__(self, rows: list[str], sizes: dict[str, tuple[int, int]], title: str, subtitle: str | None,
                 legend_items: list[tuple[str, tuple[int, int, int]]]):
        from PIL import Image, ImageDraw  # Pillow is only needed for pictures

        self.rows, self.title, self.subtitle, self.sizes = rows, title, subtitle, sizes
        self.fonts = {key: _font(size) for key, size in FONT_SIZES.items()}
        self._scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        fonts, text_size = self.fonts, self.text_size
        row_label_width = max(text_size(row, fonts["header"])[0] for row in rows) + 2 * PAD
        slices_width = sum(sizes[v][0] for v in VIEWS) + GAP * (len(VIEWS) - 1)
        title_w, title_h = text_size(title, fonts["title"])
        sub_w, sub_h = text_size(subtitle, fonts["subtitle"]) if subtitle else (0, 0)
        self.width = max(row_label_width + slices_width + PAD, title_w + 2 * PAD, sub_w + 2 * PAD)
        self.boxes: dict[str, Box] = {}
        y = PAD
        self.boxes["title"] = (PAD, y, PAD + title_w, y + title_h)
        y += title_h + PAD // 2
        if subtitle:
            self.boxes["subtitle"] = (PAD, y, PAD + sub_w, y + sub_h)
            y += sub_h + PAD // 2
        y = self._place_slices(y, row_label_width)
        self.height = self._place_legend(y + PAD - GAP, legend_items) + PAD

    def text_size(self, text: str, font) -> tuple[int, int]:
        left, top, right, bottom = self._scratch.textbbox((0, 0), text, font=font)
        return right, bottom  # from the origin, so text placed at (x, y) stays inside (x, y, x + w, y + h)

    def _place_slices(self, y: int, row_label_width: int) -> int:
        """View names in a header line, then one line per row: its name and its slices; returns
        the y below them."""
        sizes, font = self.sizes, self.fonts["header"]
        header_h = max(self.text_size(v, font)[1] for v in VIEWS)
        x = row_label_width
        for view in VIEWS:
            w, h = self.text_size(view, font)
            left = x + (sizes[view][0] - w) // 2
            self.boxes[f"view:{view}"] = (left, y + PAD // 2, left + w, y + PAD // 2 + h)
            x += sizes[view][0] + GAP
        y += header_h + PAD
        row_h = max(size[1] for size in sizes.values())
        for row in self.rows:
            w, h = self.text_size(row, font)
            self.boxes[f"row:{row}"] = (PAD, y + (row_h - h) // 2, PAD + w, y + (row_h - h) // 2 + h)
            x = row_label_width
            for view in VIEWS:
                w, h = sizes[view]
                top = y + (row_h - h) // 2
                self.boxes[f"slice:{row}:{view}"] = (x, top, x + w, top + h)
                x += w + GAP
            y += row_h + GAP
        return y

    def _place_legend(self, y: int, items: list[tuple[str, tuple[int, int, int]]]) -> int:
        """Legend items (a colour swatch and its text) in lines that fit the width; returns its bottom."""
        font, swatch = self.fonts["legend"], FONT_SIZES["legend"]
        self.legend_lines, line, line_w = [], [], 0
        for text, rgb in items:
            item_w = swatch + 6 + self.text_size(text, font)[0]
            if line and PAD + line_w + item_w > self.width - PAD:
                self.legend_lines.append(line)
                line, line_w = [], 0
            line.append((line_w, text, rgb))
            line_w += item_w + 2 * PAD
        self.legend_lines.append(line)
        self.legend_line_h = max(swatch, max(self.text_size(t, font)[1] for t, _ in items)) + 6
        self.boxes["legend"] = (PAD, y, self.width - PAD, y + self.legend_line_h * len(self.legend_lines))
        return self.boxes["legend"][3]

    def draw(self, slices: dict[tuple[str, str], np.ndarray]) -> np.ndarray:
        """The picture ``(height, width, 3)`` uint8 with ``slices`` (``_slice_overlays``) pasted in."""
        from PIL import Image, ImageDraw

        boxes, fonts = self.boxes, self.fonts
        canvas = Image.new("RGB", (self.width, self.height), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        draw.text(boxes["title"][:2], self.title, fill=TEXT, font=fonts["title"])
        if self.subtitle:
            draw.text(boxes["subtitle"][:2], self.subtitle, fill=TEXT, font=fonts["subtitle"])
        for view in VIEWS:
            draw.text(boxes[f"view:{view}"][:2], view, fill=TEXT, font=fonts["header"])
        for row in self.rows:
            draw.text(boxes[f"row:{row}"][:2], row, fill=TEXT, font=fonts["header"])
            for view in VIEWS:
                x0, y0, x1, y1 = boxes[f"slice:{row}:{view}"]
                canvas.paste(Image.fromarray(slices[row, view]), (x0, y0))
                _edge_letters(draw, boxes[f"slice:{row}:{view}"], EDGE_LETTERS[view], fonts["letter"], self.text_size)
        swatch, top = FONT_SIZES["legend"], boxes["legend"][1]
        for line in self.legend_lines:
            for offset, text, rgb in line:
                x = PAD + offset
                draw.rectangle([x, top + 3, x + swatch - 1, top + 3 + swatch - 1], fill=rgb)
                draw.text((x + swatch + 6, top + 3), text, fill=TEXT, font=fonts["legend"])
            top += self.legend_line_h
        return np.asarray(canvas, dtype=np.uint8).copy()


def tumour_centre(*label_maps: np.ndarray) -> np.ndarray:
    """Voxel ``(x, y, z)`` at the centre of the first map's foreground (else the next one's,
    else the centre of the volume)."""
    for labels in label_maps:
        found = np.argwhere(labels > 0)
        if len(found):
            return found.mean(axis=0).round().astype(int)
    return ((np.asarray(label_maps[0].shape) - 1) / 2).round().astype(int)


def dice_line(metrics: Mapping[str, Mapping[str, float]], task: Task) -> str:
    """``"Dice WT 0.94  TC 0.91  ET 0.88"`` of a case's ``metrics.case_metrics`` (every region of
    ``task``; lesion-wise Dice under the lesion-wise convention, which adds ``legacy_dice``)."""
    regions = [r for r in task.region_names if r in metrics]
    kind = "lesion-wise Dice" if any("legacy_dice" in metrics[r] for r in regions) else "Dice"
    return kind + " " + "  ".join(f"{r} {float(metrics[r]['dice']):.2f}" for r in regions)


def as_chw(picture: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in ``[0, 1]`` (``RunLogger.image``)."""
    return np.ascontiguousarray(np.asarray(picture).transpose(2, 0, 1), dtype=np.float32) / 255.0


def png_bytes(picture: np.ndarray) -> bytes:
    """``(H, W, 3)`` uint8 -> PNG file content."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(picture, dtype=np.uint8)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    """Write ``picture (H, W, 3)`` uint8 as a PNG, atomically (temporary file + rename)."""
    return atomic_write_bytes(path, png_bytes(picture))


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _to_grey(image: np.ndarray) -> np.ndarray:
    """Intensities -> ``[0, 255]`` float32 between the 0.5 and 99.5 percentiles of the nonzero
    voxels; voxels exactly 0 (the background, also of z-scored images) are black."""
    image = np.asarray(image, dtype=np.float32)
    background = image == 0
    inside = image[~background]
    low, high = np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0)
    grey = np.clip((image - low) / max(float(high - low), 1e-6), 0, 1) * 255.0
    grey[background] = 0.0
    return grey


def _view(volume: np.ndarray, view: str, centre: Sequence[int]) -> np.ndarray:
    """The slice of a RAS-ordered volume as picture rows x columns, radiological convention:
    axial (rows anterior -> posterior, columns right -> left), coronal (superior -> inferior,
    right -> left), sagittal (superior -> inferior, anterior -> posterior)."""
    cx, cy, cz = centre
    if view == "axial":
        return volume[::-1, ::-1, cz].T
    if view == "coronal":
        return volume[::-1, cy, ::-1].T
    return volume[cx, ::-1, ::-1].T


def _display_size(view: str, extent: np.ndarray, zoom: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a view: the extent in mm, in pixels of the finest spacing."""
    horizontal, vertical = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[view]
    return max(1, int(round(extent[horizontal] * zoom))), max(1, int(round(extent[vertical] * zoom)))


def _overlay(grey: np.ndarray, labels: np.ndarray, size: tuple[int, int], palette: np.ndarray) -> np.ndarray:
    """Grey slice + class slice, resampled to ``size`` (width, height) -> RGB uint8. Labels are
    resampled by nearest neighbour; the image too where the zoom is an integer (crisp voxels),
    bilinearly otherwise."""
    from PIL import Image

    height, width = grey.shape
    integer = size[0] % width == 0 and size[1] % height == 0
    grey = np.asarray(Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32)).resize(
        size, Image.NEAREST if integer else Image.BILINEAR))
    labels = np.asarray(Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8)).resize(size, Image.NEAREST))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    painted = labels > 0
    colours = palette[np.clip(labels[painted], 0, len(palette) - 1)]
    rgb[painted] = (1 - OVERLAY_ALPHA) * rgb[painted] + OVERLAY_ALPHA * colours
    return np.clip(rgb.round(), 0, 255).astype(np.uint8)


def _edge_letters(draw, box: Box, letters: Sequence[str], font, text_size) -> None:
    """The orientation letters (left, right, top, bottom) inside the edges of a slice."""
    x0, y0, x1, y1 = box
    margin = 3
    for letter, where in zip(letters, ("left", "right", "top", "bottom")):
        w, h = text_size(letter, font)
        x = {"left": x0 + margin, "right": x1 - margin - w}.get(where, (x0 + x1 - w) // 2)
        y = {"top": y0 + margin, "bottom": y1 - margin - h}.get(where, (y0 + y1 - h) // 2)
        try:
            draw.text((x, y), letter, fill=TEXT, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        except (TypeError, ValueError):  # a bitmap font without stroke support (old Pillow)
            draw.text((x, y), letter, fill=TEXT, font=font)


@functools.lru_cache(maxsize=None)
def _font(size: int):
    """Pillow's built-in scalable font at ``size`` pixels (Pillow >= 10.1), else its bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError, ImportError):
        return ImageFont.load_default()
