"""evaluate.py end to end on tiny NIfTI files: both reference layouts, tasks (detected and given),
both metric conventions, --subset, and every user error as one line with exit code 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import evaluate
from core.errors import run_cli
from core.task import builtin_tasks
from metrics import case_metrics, hd95

TASKS = builtin_tasks()
GLI23 = TASKS["brats-gli-2023"]
A, B = "BraTS-GLI-00001-000", "BraTS-GLI-00002-000"  # reference case ids (2023 naming)

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 14, 10)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # anisotropic: 2 mm along z


def classes_volume(shift: int = 0) -> np.ndarray:
    """Training classes: an ED box holding an NCR box holding an ET box (shifted along x)."""
    c = np.zeros(SHAPE, dtype=np.uint8)
    c[3 + shift:12 + shift, 3:11, 2:8] = 2
    c[5 + shift:10 + shift, 5:9, 3:7] = 1
    c[6 + shift:9 + shift, 6:8, 4:6] = 3
    return c


def to_labels(classes: np.ndarray, convention: str) -> np.ndarray:
    task = TASKS.get(convention) or TASKS[{"2021": "brats-gli-2021", "2023": "brats-gli-2023"}[convention]]
    return task.classes_to_labels(classes)


def save(data: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))
    return path


@pytest.fixture()
def flat(tmp_path):
    """Flat reference folder (2023 labels) and predictions for two cases; returns (pred, ref)."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    save(to_labels(classes_volume(), "2023"), ref_dir / f"{A}-seg.nii.gz")
    save(to_labels(classes_volume(), "2023"), ref_dir / f"{B}.nii.gz")
    save(to_labels(classes_volume(), "2023"), pred_dir / f"{A}.nii.gz")
    save(to_labels(classes_volume(shift=1), "2023"), pred_dir / f"{B}.nii.gz")
    return pred_dir, ref_dir


def run_error(argv, capsys) -> str:
    """Run the CLI expecting a user error; return its single stderr line."""
    with pytest.raises(SystemExit) as exc:
        run_cli(evaluate.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_flat_references(flat, capsys):
    pred_dir, ref_dir = flat
    assert evaluate.main(["--pred", str(pred_dir), "--ref", str(ref_dir)]) == 0
    out = capsys.readouterr().out
    assert "WT" in out and "Dice" in out and "2 cases, task brats-gli-2023" in out
    report = json.loads((pred_dir / "evaluation.json").read_text())
    assert report["convention"] == "legacy" and "373.13" in report["rules"] and report["task"] == "brats-gli-2023"
    assert report["cases"][A]["ET"]["dice"] == 1.0 and report["cases"][A]["WT"]["hd95"] == 0.0
    expected = case_metrics(classes_volume(shift=1), classes_volume(), (1.0, 1.0, 2.0), GLI23)
    for region in ("WT", "TC", "ET"):
        for key in ("dice", "sensitivity", "specificity", "hd95", "nsd_0.5", "nsd_1.0"):
            assert report["cases"][B][region][key] == pytest.approx(expected[region][key])
    # HD95 used the header spacing (1, 1, 2): a one-voxel shift along x is 1 mm
    wt_shifted, wt = classes_volume(shift=1) > 0, classes_volume() > 0
    assert report["cases"][B]["WT"]["hd95"] == pytest.approx(hd95(wt_shifted, wt, (1, 1, 2)))
    assert report["mean"]["WT"]["dice"] == pytest.approx((1.0 + expected["WT"]["dice"]) / 2)
    csv_lines = (pred_dir / "evaluation.csv").read_text().splitlines()
    assert csv_lines[0].startswith("case_id,region,dice") and len(csv_lines) == 1 + 6


@pytest.mark.parametrize("folder, sep, ref_convention", [("BraTS2021_00007", "_", "2021"),
                                                         ("BraTS-GLI-00007-000", "-", "2023")])
def test_dataset_folder_references(tmp_path, folder, sep, ref_convention, capsys):
    ref_dir, pred_dir = tmp_path / "data", tmp_path / "pred"
    save(to_labels(classes_volume(), ref_convention), ref_dir / folder / f"{folder}{sep}seg.nii.gz")
    save(np.zeros(SHAPE), ref_dir / folder / f"{folder}{sep}{'t1' if sep == '_' else 't1n'}.nii.gz")
    # predictions in the other convention: read with --pred-task (a naming variant of the references' task)
    other = "2023" if ref_convention == "2021" else "2021"
    save(to_labels(classes_volume(), other), pred_dir / f"{folder}.nii.gz")
    out_json = tmp_path / "reports" / "lesionwise.json"
    argv = ["--pred", str(pred_dir), "--ref", str(ref_dir), "--convention", "lesionwise", "-o", str(out_json)]
    with pytest.raises(SystemExit):  # without it the other convention's values are refused
        run_cli(evaluate.main, argv)
    assert "label values" in capsys.readouterr().err
    assert evaluate.main(argv + ["--pred-task", f"brats-gli-{other}"]) == 0
    report = json.loads(out_json.read_text())
    assert report["convention"] == "lesionwise"
    case = report["cases"][folder]
    assert all(case[r]["dice"] == 1.0 and case[r]["hd95"] == 0.0 for r in ("WT", "TC", "ET"))
    assert case["ET"]["num_lesions"] == 0  # ET is 3*2*2 = 12 voxels * 2 mm^3 = 24 mm^3 <= 50: not scored
    assert case["WT"]["num_lesions"] == 1
    assert (tmp_path / "reports" / "lesionwise.csv").is_file()


def test_parallel_workers_give_the_same_report(flat, tmp_path):
    pred_dir, ref_dir = flat
    serial, parallel = tmp_path / "serial.json", tmp_path / "parallel.json"
    assert evaluate.main(["--pred", str(pred_dir), "--ref", str(ref_dir), "-o", str(serial)]) == 0
    assert evaluate.main(["--pred", str(pred_dir), "--ref", str(ref_dir), "-o", str(parallel), "-j", "2"]) == 0
    assert json.loads(serial.read_text()) == json.loads(parallel.read_text())


def test_no_hd95_flag(flat):
    pred_dir, ref_dir = flat
    assert evaluate.main(["--pred", str(pred_dir), "--ref", str(ref_dir), "--no-hd95"]) == 0
    report = json.loads((pred_dir / "evaluation.json").read_text())
    assert "hd95" not in report["cases"][B]["WT"] and "nsd_1.0" not in report["cases"][B]["WT"]


def test_shape_mismatch(flat, capsys):
    pred_dir, ref_dir = flat
    save(np.zeros((16, 14, 11)), pred_dir / f"{B}.nii.gz")
    line = run_error(["--pred", str(pred_dir), "--ref", str(ref_dir)], capsys)
    assert f"{B}.nii.gz" in line and "shape" in line


def test_affine_mismatch(flat, capsys):
    pred_dir, ref_dir = flat
    save(to_labels(classes_volume(), "2023"), pred_dir / f"{A}.nii.gz", affine=np.eye(4))
    line = run_error(["--pred", str(pred_dir), "--ref", str(ref_dir)], capsys)
    assert f"{A}.nii.gz" in line and "affine" in line


def test_missing_prediction(flat, capsys):
    pred_dir, ref_dir = flat
    (pred_dir / f"{B}.nii.gz").unlink()
    line = run_error(["--pred", str(pred_dir), "--ref", str(ref_dir)], capsys)
    assert f"{B}.nii.gz" in line and "1 of 2" in line


@pytest.mark.parametrize("bad_values", [(0, 5), (0, 3, 4)])
def test_unknown_label_values(flat, capsys, bad_values):
    pred_dir, ref_dir = flat
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1, 1, 1:1 + len(bad_values)] = bad_values
    save(labels, pred_dir / f"{A}.nii.gz")
    line = run_error(["--pred", str(pred_dir), "--ref", str(ref_dir)], capsys)
    assert f"{A}.nii.gz" in line and "label values" in line and "brats-gli-2023" in line


def test_empty_folders(tmp_path, flat, capsys):
    pred_dir, ref_dir = flat
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no predictions" in run_error(["--pred", str(empty), "--ref", str(ref_dir)], capsys)
    assert "no BraTS cases" in run_error(["--pred", str(pred_dir), "--ref", str(empty)], capsys)
    assert "not found" in run_error(["--pred", str(tmp_path / "nope"), "--ref", str(ref_dir)], capsys)


def test_refuses_to_write_inside_the_reference_folder(flat, capsys):
    pred_dir, ref_dir = flat
    line = run_error(["--pred", str(pred_dir), "--ref", str(ref_dir), "-o", str(ref_dir / "sub" / "m.json")], capsys)
    assert "reference folder" in line
    assert not (ref_dir / "sub").exists()


def test_default_report_does_not_replace_the_metrics_of_infer(flat, capsys):
    """infer.py writes PRED_DIR/metrics.json; evaluate.py's default report is evaluation.json."""
    pred_dir, ref_dir = flat
    (pred_dir / "metrics.json").write_text('{"written by": "infer.py"}')
    (pred_dir / "metrics.csv").write_text("case_id,region\n")
    assert evaluate.main(["--pred", str(pred_dir), "--ref", str(ref_dir)]) == 0
    assert f"wrote {pred_dir / 'evaluation.json'} and {pred_dir / 'evaluation.csv'}" in capsys.readouterr().out
    assert (pred_dir / "metrics.json").read_text() == '{"written by": "infer.py"}'
    assert (pred_dir / "metrics.csv").read_text() == "case_id,region\n"
    assert list(json.loads((pred_dir / "evaluation.json").read_text())["cases"]) == [A, B]
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    assert "PRED_DIR/evaluation.json" in capsys.readouterr().out


def test_unwritable_report_folder_exits_2_before_reading_cases(tmp_path, flat, unwritable, capsys):
    pred_dir, _ = flat
    folder, reason = unwritable
    # the references do not exist: the report's folder is checked before any case is read
    argv = ["--pred", str(pred_dir), "--ref", str(tmp_path / "no-refs"), "-o", str(folder / "report.json")]
    line = run_error(argv, capsys)
    assert f"{folder}: cannot write there ({reason}); set -o to a writable folder" in line


def test_read_only_prediction_folder_needs_o(tmp_path, flat, capsys):
    pred_dir, ref_dir = flat
    pred_dir.chmod(0o500)
    try:
        if os.access(pred_dir, os.W_OK):
            pytest.skip("chmod does not stop writes here (root)")
        line = run_error(["--pred", str(pred_dir), "--ref", str(ref_dir)], capsys)
        assert f"{pred_dir}: cannot write there (Permission denied); set -o to a writable folder" in line
        assert evaluate.main(["--pred", str(pred_dir), "--ref", str(ref_dir), "-o", str(tmp_path / "r.json")]) == 0
    finally:
        pred_dir.chmod(0o700)


def test_output_folder_instead_of_a_report_path(tmp_path, flat, capsys):
    pred_dir, ref_dir = flat
    (tmp_path / "reports").mkdir()
    line = run_error(["--pred", str(pred_dir), "--ref", str(ref_dir), "-o", str(tmp_path / "reports")], capsys)
    assert "-o is a folder" in line and str(tmp_path / "reports" / "evaluation.json") in line
    assert list((tmp_path / "reports").iterdir()) == []


def test_command_line_subprocess(flat):
    # one real process (importing torch is the slow part): the error path, exit code 2, one line
    pred_dir, ref_dir = flat
    (pred_dir / f"{A}.nii.gz").unlink()
    bad = subprocess.run([sys.executable, "evaluate.py", "--pred", str(pred_dir), "--ref", str(ref_dir)],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    assert f"{A}.nii.gz" in bad.stderr and not (pred_dir / "evaluation.json").exists()


def test_subset_scores_only_the_predicted_cases(flat, capsys):
    pred_dir, ref_dir = flat
    (pred_dir / f"{B}.nii.gz").unlink()
    assert evaluate.main(["--pred", str(pred_dir), "--ref", str(ref_dir), "--subset"]) == 0
    captured = capsys.readouterr()
    assert f"1 reference case(s) without a prediction are not scored: {B}" in captured.err
    assert list(json.loads((pred_dir / "evaluation.json").read_text())["cases"]) == [A]


def test_unnamed_references_need_the_task(tmp_path, capsys):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    save(to_labels(classes_volume(), "2023"), ref_dir / "patient1.nii.gz")
    save(to_labels(classes_volume(), "2023"), pred_dir / "patient1.nii.gz")
    line = run_error(["--pred", str(pred_dir), "--ref", str(ref_dir)], capsys)
    assert "cannot tell the task" in line and "brats-gli-2023" in line and "data.task" in line
    argv = ["--pred", str(pred_dir), "--ref", str(ref_dir), "--task", "brats-men", "--convention", "lesionwise"]
    assert evaluate.main(argv) == 0
    report = json.loads((pred_dir / "evaluation.json").read_text())
    assert report["task"] == "brats-men" and "WT: 1 dilation(s), lesions <= 50 mm^3 not scored" in report["rules"]


@pytest.mark.parametrize("name, prefix", [("brats-ped", "BraTS-PED-00003-000"), ("brats-gli-2024", "BraTS-GLI-00003-100"),
                                          ("brats-men-rt", "BraTS-MEN-RT-0003-1")])
def test_every_region_of_the_task_is_reported(tmp_path, name, prefix):
    task = TASKS[name]
    classes = np.zeros(SHAPE, np.uint8)
    for cls in task.foreground_classes:  # one box per class
        classes[2 * cls:2 * cls + 2, 3:9, 2:6] = cls
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    save(task.classes_to_labels(classes), ref_dir / f"{prefix}.nii.gz")
    save(task.classes_to_labels(classes), pred_dir / f"{prefix}.nii.gz")
    assert evaluate.main(["--pred", str(pred_dir), "--ref", str(ref_dir), "--convention", "lesionwise"]) == 0
    report = json.loads((pred_dir / "evaluation.json").read_text())
    assert report["task"] == name and list(report["cases"][prefix]) == list(task.region_names)
    assert all(report["cases"][prefix][r]["dice"] == 1.0 for r in task.region_names)
    csv_regions = [line.split(",")[1] for line in (pred_dir / "evaluation.csv").read_text().splitlines()[1:]]
    assert csv_regions == list(task.region_names)


def test_tune_postprocessing_writes_rules_infer_reads(tmp_path, capsys):
    """Two prediction folders (two folds' validation cases) scored together. Case A: no ET in the
    reference, 2 stray ET voxels (8 mm^3) predicted; case B: a real 12-voxel (24 mm^3) ET. The rules
    written must remove A's ET, keep B's, and be readable by infer.py --postprocessing."""
    ref_dir = tmp_path / "ref"
    no_et = classes_volume()
    no_et[no_et == 3] = 1
    save(to_labels(no_et, "2023"), ref_dir / f"{A}.nii.gz")
    save(to_labels(classes_volume(), "2023"), ref_dir / f"{B}.nii.gz")
    stray = no_et.copy()
    stray[7, 7, 4:6] = 3
    save(to_labels(stray, "2023"), tmp_path / "fold0" / f"{A}.nii.gz")
    save(to_labels(classes_volume(), "2023"), tmp_path / "fold1" / f"{B}.nii.gz")
    rules_path = tmp_path / "rules.json"
    code = run_cli_code(["--pred", str(tmp_path / "fold0"), "--pred", str(tmp_path / "fold1"),
                         "--ref", str(ref_dir), "--tune-postprocessing", str(rules_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "2 cases, task brats-gli-2023, legacy convention" in out and str(rules_path) in out
    record = json.loads(rules_path.read_text())
    assert record["dice_before"]["ET"] == 0.5 and record["dice_after"]["ET"] == 1.0
    assert record["mean_dice_before"] == pytest.approx(5 / 6) and record["mean_dice_after"] == 1.0
    assert "tuned on 2 validation case(s)" in record["source"]
    assert not (tmp_path / "fold0" / "evaluation.json").exists()  # the rules file instead of a report

    from infer import read_postprocessing
    from inference.postprocess import postprocess_classes
    task = TASKS["brats-gli-2023"]
    rules, source = read_postprocessing(rules_path, task)
    assert rules.unit == "mm3" and source == record["source"]  # both units separate them: mm^3 wins the tie
    spacing = (1.0, 1.0, 2.0)
    assert not (postprocess_classes(stray, task, rules, spacing) == 3).any()  # the stray ET: gone
    assert (postprocess_classes(classes_volume(), task, rules, spacing) == 3).sum() == 12  # the real one: kept


def test_the_same_case_in_two_prediction_folders_is_refused(tmp_path, flat, capsys):
    pred, ref = flat
    other = tmp_path / "other"
    other.mkdir()
    (other / f"{A}.nii.gz").write_bytes((pred / f"{A}.nii.gz").read_bytes())
    line = run_error(["--pred", str(pred), "--pred", str(other), "--ref", str(ref)], capsys)
    assert f"case {A} is also predicted in {pred}" in line


def run_cli_code(argv) -> int:
    with pytest.raises(SystemExit) as exc:
        run_cli(evaluate.main, argv)
    return exc.value.code
