"""inference/render.py: the picture of a case (infer.py --png and the TensorBoard panel of train.py).

Orientation is checked against world coordinates computed here from the affine (not with
nibabel's orientation code the renderer uses): a marker on the patient's right, anterior and
superior of the centre must land left and up in the axial and coronal views, and left (anterior)
and up in the sagittal view.
"""
import math
import os

import numpy as np
import pytest

from core.task import builtin_tasks
from inference import render
from inference.render import as_chw, dice_line, render_case, render_case_layout, save_png

TASKS = builtin_tasks()
GLI = TASKS["brats-gli-2021"]  # NCR (1) red, ED (2) green, ET (4) yellow


def rotation(axis: int, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def affine_of(kind: str) -> np.ndarray:
    affine = np.eye(4)
    if kind == "lps":  # BraTS / SRI24: the array's first axis runs to the patient's left
        affine[:3, :3] = np.diag([-1.0, -1.0, 1.0])
        affine[:3, 3] = [239, 239, 0]
    elif kind == "ras":
        pass
    elif kind == "oblique":  # tilted by 20 and 15 degrees, flipped first axis, anisotropic voxels
        affine[:3, :3] = rotation(2, 20) @ rotation(0, 15) @ np.diag([-1.0, 1.1, 2.0])
        affine[:3, 3] = [3, -4, 5]
    else:
        raise ValueError(kind)
    return affine


def painted(picture: np.ndarray, box, colour) -> np.ndarray:
    """``(rows, columns)`` relative to ``box`` of the pixels where ``colour`` is overlaid on black."""
    x0, y0, x1, y1 = box
    expected = np.round(render.OVERLAY_ALPHA * np.asarray(colour))
    return np.argwhere((picture[y0:y1, x0:x1] == expected).all(axis=-1))


def text_pixels(picture: np.ndarray, box) -> int:
    """Bright grey pixels (drawn text) inside ``box``."""
    x0, y0, x1, y1 = box
    part = picture[y0:y1, x0:x1].astype(int)
    grey = (part.max(axis=-1) - part.min(axis=-1) < 10) & (part.min(axis=-1) > 150)
    return int(grey.sum())


@pytest.mark.parametrize("kind", ["lps", "ras", "oblique"])
def test_patient_right_is_on_the_left_anterior_and_superior_up(kind):
    shape = (26, 24, 20)
    affine = affine_of(kind)
    centre = (np.asarray(shape) - 1) / 2
    # 7 mm to the patient's right (+x in RAS), anterior (+y) and superior (+z) of the centre
    offset = np.linalg.solve(affine[:3, :3], [7.0, 7.0, 7.0])
    assert (np.abs(offset) >= 2.5).all(), offset  # clearly off-centre along every array axis
    marker = np.round(centre + offset).astype(int)
    labels = np.zeros(shape, np.uint8)
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    labels[((grid - marker) ** 2).sum(-1) <= 2] = 1  # NCR, red
    image = np.zeros(shape, np.float32)  # black: the overlay is exactly half the colour
    picture, boxes = render_case_layout(image, labels, None, affine, GLI, "orientation")
    for view in render.VIEWS:
        box = boxes[f"slice:prediction:{view}"]
        found = painted(picture, box, GLI.colours[1])
        assert len(found), view  # the slices go through the marker (the predicted tumour)
        row, column = found.mean(axis=0)
        height, width = box[3] - box[1], box[2] - box[0]
        # axial, coronal: the patient's right on the left; sagittal: anterior on the left
        assert column < 0.4 * width, (view, column, width)
        assert row < 0.4 * height, (view, row, height)  # axial: anterior up; coronal, sagittal: superior up


def test_orientation_letters_are_drawn_at_the_edges():
    shape = (20, 20, 20)
    picture, boxes = render_case_layout(np.zeros(shape), np.zeros(shape, np.uint8), None, np.eye(4), GLI, "x")
    for view in render.VIEWS:
        x0, y0, x1, y1 = boxes[f"slice:prediction:{view}"]
        w, h = x1 - x0, y1 - y0
        edges = {"left": (x0, y0 + h // 3, x0 + w // 8, y1 - h // 3), "right": (x1 - w // 8, y0 + h // 3, x1, y1 - h // 3),
                 "top": (x0 + w // 3, y0, x1 - w // 3, y0 + h // 8), "bottom": (x0 + w // 3, y1 - h // 8, x1 - w // 3, y1)}
        for edge, box in edges.items():
            assert text_pixels(picture, box) > 5, (view, edge)
        assert text_pixels(picture, (x0 + w // 3, y0 + h // 3, x1 - w // 3, y1 - h // 3)) == 0  # nothing in the middle
    assert render.EDGE_LETTERS == {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"),
                                   "sagittal": ("A", "P", "S", "I")}


def test_anisotropic_voxels_keep_their_physical_aspect():
    """1 x 1 x 3 mm voxels: a 30 x 30 x 10 volume is a 30 mm cube, a 9 mm ball is round."""
    shape, affine = (30, 30, 10), np.diag([1.0, 1.0, 3.0, 1.0])
    grid = np.indices(shape).astype(float)
    mm = [(grid[0] - 15) * 1.0, (grid[1] - 15) * 1.0, (grid[2] - 5) * 3.0]
    labels = (sum(m ** 2 for m in mm) <= 9.0 ** 2).astype(np.uint8) * 3  # ET, yellow
    picture, boxes = render_case_layout(np.zeros(shape), labels, None, affine, GLI, "anisotropic")
    for view in render.VIEWS:
        x0, y0, x1, y1 = boxes[f"slice:prediction:{view}"]
        assert x1 - x0 == y1 - y0 >= render.MIN_EXTENT - 30, view  # square: not squashed 3x
        found = painted(picture, boxes[f"slice:prediction:{view}"], GLI.colours[3])
        extent = found.max(axis=0) - found.min(axis=0) + 1
        assert abs(extent[0] - extent[1]) <= 0.15 * extent.max(), (view, extent)  # round, not an ellipse


def test_small_volumes_are_zoomed_and_a_full_slice_is_shown_at_least_at_its_size():
    small = render_case_layout(np.zeros((22, 19, 14)), np.zeros((22, 19, 14), np.uint8), None, np.eye(4), GLI, "s")[1]
    zoom = render.MIN_EXTENT // 22
    assert small["slice:prediction:axial"][2] - small["slice:prediction:axial"][0] == 22 * zoom
    assert small["slice:prediction:axial"][3] - small["slice:prediction:axial"][1] == 19 * zoom
    assert small["slice:prediction:sagittal"][2] - small["slice:prediction:sagittal"][0] == 19 * zoom
    shape = (240, 240, 155)
    full = render_case_layout(np.zeros(shape, np.float32), np.zeros(shape, np.uint8), None,
                              affine_of("lps"), GLI, "full")[1]
    x0, y0, x1, y1 = full["slice:prediction:axial"]
    assert (x1 - x0, y1 - y0) == (240, 240)
    x0, y0, x1, y1 = full["slice:prediction:coronal"]
    assert (x1 - x0, y1 - y0) == (240, 155)


def test_title_views_rows_and_legend_are_drawn():
    task = TASKS["brats-ped"]  # ET, NETC, CC, ED: other names, values and colours than the glioma tasks
    shape = (24, 24, 16)
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, shape).astype(np.float32)
    pred = np.zeros(shape, np.uint8)
    pred[8:14, 8:14, 6:10] = 2
    ref = np.zeros_like(pred)
    ref[9:15, 8:14, 6:10] = 4
    picture, boxes = render_case_layout(image, pred, ref, np.eye(4), task, "BraTS-PED-00001-000",
                                        subtitle="Dice WT 0.50  TC 0.40  ET 1.00")
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    for part in ("title", "subtitle", "view:axial", "view:coronal", "view:sagittal", "row:prediction",
                 "row:reference", "legend"):
        assert text_pixels(picture, boxes[part]) > 20, part
    title, first_slice = boxes["title"], boxes["slice:prediction:axial"]
    assert title[3] <= boxes["subtitle"][1] < boxes["subtitle"][3] <= boxes["view:axial"][1] < first_slice[1]
    assert boxes["row:prediction"][2] <= first_slice[0]  # row titles left of the slices
    assert boxes["slice:prediction:axial"][3] <= boxes["slice:reference:axial"][1] <= boxes["legend"][1]
    legend = picture[boxes["legend"][1]:boxes["legend"][3]].reshape(-1, 3)
    for rgb in task.colours[1:]:  # a swatch of every label's colour
        assert (legend == rgb).all(axis=1).sum() >= 100, rgb
    other = render_case(image, pred, ref, np.eye(4), TASKS["brats-gli-2024"], "BraTS-PED-00001-000",
                        subtitle="Dice WT 0.50  TC 0.40  ET 1.00")
    assert not np.array_equal(picture, other)  # the legend names the task's labels
    # each row shows its own label map, in the task's colours (on a black image: exactly half the colour)
    black = render_case_layout(np.zeros(shape), pred, ref, np.eye(4), task, "x")
    for view in render.VIEWS:
        pred_box, ref_box = black[1][f"slice:prediction:{view}"], black[1][f"slice:reference:{view}"]
        assert len(painted(black[0], pred_box, task.colours[2])) and not len(painted(black[0], pred_box, task.colours[4]))
        assert len(painted(black[0], ref_box, task.colours[4])) and not len(painted(black[0], ref_box, task.colours[2]))


def test_subtitle_only_when_given():
    shape = (20, 20, 20)
    args = (np.zeros(shape), np.zeros(shape, np.uint8), np.zeros(shape, np.uint8), np.eye(4), GLI, "case")
    with_line, boxes = render_case_layout(*args, subtitle="Dice WT 1.00  TC 1.00  ET 1.00")
    without, plain = render_case_layout(*args)
    assert "subtitle" in boxes and "subtitle" not in plain
    assert with_line.shape[0] > without.shape[0]
    assert text_pixels(with_line, boxes["subtitle"]) > 20


def test_dice_line():
    metrics = {"WT": {"dice": 0.9412}, "TC": {"dice": 0.905}, "ET": {"dice": 0.88}}
    assert dice_line(metrics, GLI) == "Dice WT 0.94  TC 0.91  ET 0.88"
    lesionwise = {r: {"dice": 0.5, "legacy_dice": 0.9} for r in ("WT", "TC", "ET")}
    assert dice_line(lesionwise, GLI) == "lesion-wise Dice WT 0.50  TC 0.50  ET 0.50"
    gli24 = TASKS["brats-gli-2024"]
    line = dice_line({r: {"dice": 1.0} for r in gli24.region_names}, gli24)
    assert line.split()[1::2] == list(gli24.region_names)  # every region, in the task's order


def test_slices_through_the_predicted_tumour_else_the_reference():
    shape = (30, 30, 30)
    pred, ref = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    pred[3:6, 20:23, 10:13] = 1
    ref[20:24, 5:8, 25:28] = 1
    assert render.tumour_centre(pred, ref).tolist() == [4, 21, 11]
    assert render.tumour_centre(np.zeros(shape), ref).tolist() == [22, 6, 26]
    assert render.tumour_centre(np.zeros((31, 21, 11)), np.zeros((31, 21, 11))).tolist() == [15, 10, 5]


def test_background_is_black_also_for_z_scored_images():
    """The cache's images are z-scored inside the brain (values around 0) and exactly 0 outside."""
    shape = (20, 20, 20)
    rng = np.random.default_rng(0)
    image = np.zeros(shape, np.float32)
    image[5:15, 5:15, 5:15] = rng.normal(0, 1, (10, 10, 10))
    picture, boxes = render_case_layout(image, np.zeros(shape, np.uint8), None, np.eye(4), GLI, "z")
    x0, y0, x1, y1 = boxes["slice:prediction:axial"]
    tile = picture[y0:y1, x0:x1]
    h, w = y1 - y0, x1 - x0
    corner = tile[h // 8:h // 5, w // 3:w // 2]  # outside the "brain", away from the letters
    assert (corner == 0).all()
    assert tile[h // 2 - 10:h // 2 + 10, w // 2 - 10:w // 2 + 10].mean() > 60  # the brain is grey


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="one 3D shape"):
        render_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 5), np.uint8), None, np.eye(4), GLI, "x")


def test_as_chw_for_tensorboard():
    picture = np.zeros((5, 7, 3), np.uint8)
    picture[1, 2] = (255, 0, 51)
    chw = as_chw(picture)
    assert chw.shape == (3, 5, 7) and chw.dtype == np.float32
    assert chw[:, 1, 2].tolist() == pytest.approx([1.0, 0.0, 0.2])


def test_save_png_is_atomic(tmp_path, monkeypatch):
    from PIL import Image
    picture = render_case(np.zeros((16, 16, 16)), np.zeros((16, 16, 16), np.uint8), None, np.eye(4), GLI, "x")
    path = save_png(picture, tmp_path / "case.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and np.array_equal(np.asarray(png.convert("RGB")), picture)
    before = path.read_bytes()
    renamed = []
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append((src, dst)), (_ for _ in ()).throw(OSError("disk full"))))
    with pytest.raises(OSError, match="disk full"):
        save_png(np.zeros((4, 4, 3), np.uint8), path)
    (src, dst), = renamed
    assert os.path.dirname(src) == str(tmp_path) and str(dst) == str(path)  # a temporary file renamed over it
    assert path.read_bytes() == before  # the old picture is intact
    assert [p.name for p in tmp_path.iterdir()] == ["case.png"]  # no temporary file left
