"""Segment BraTS cases with one checkpoint or an ensemble; write masks in the input's geometry and labels.

    python infer.py --checkpoint runs/unet3d/best.pt -i data/brats -o predictions/unet3d
    python infer.py --checkpoint a.pt --checkpoint b.pt -i BraTS2021_00000/ -o out infer.tta=true
    python infer.py ... --save-probabilities --png --overwrite infer.device=cpu infer.et_min_volume=100

INPUT is a dataset folder (one sub-folder per case, or the MSD layout with imagesTr/imagesTs) or
one case folder; the modalities the checkpoint was trained on are read under any naming (t1/t1n,
t1ce/t1c, t2/t2w, flair/t2f). Each case's task is found from its name and labels (preferring the
checkpoint's task): it must be the checkpoint's task or a naming variant of it (BraTS 2021 ET = 4
vs 2023 ET = 3); another task (e.g. PED data with a glioma checkpoint) fails the case.
Per case: the training preprocessing (brain crop, z-score), sliding-window inference (Gaussian
blending, optional mirror TTA, ensembles averaged), optional post-processing (``infer.*`` keys),
then ``OUTPUT/<case_id>.nii.gz``: uint8 labels pasted back into the original shape with the
input's affine and header, in the label values of the case's task (``infer.output_task``).

Cases are pipelined: while one is predicted, the next is read and preprocessed and the previous
one written and scored, in two background threads. ``--cases`` predicts only some cases of INPUT
(``runs/demo/split.json:val``, a text file of ids, or ``id1,id2``). ``OUTPUT/predictions.json``
records what produced the masks (checkpoint paths and SHA-256, task, the ``infer.*`` settings that
change masks, output task, time, case ids). Masks of an earlier run with the same checkpoint(s)
and settings are kept (an interrupted run continues; they are still evaluated, and reported as
kept); masks of another configuration, or of unknown origin, are refused (exit 2) unless
``--overwrite``. When a case has a label file, per-case metrics of every region of its task go to
``OUTPUT/metrics.json`` (with ``"kept"``: the cases scored from kept masks) and
``OUTPUT/metrics.csv`` (the format of ``evaluate.py``) and the summary table is printed; a label
file with values outside the task fails the case. ``--save-probabilities`` also writes
``OUTPUT/<case_id>_probs.nii.gz`` (4D, channel last); ``--png`` ``OUTPUT/<case_id>.png``, a
picture of three orthogonal slices through the tumour (radiological convention) with the
prediction (and reference) overlaid, the case's Dice line when it has a reference and a legend of
the task's labels (``inference/render.py``). Only ``infer.*`` and ``metrics.*`` keys can be
overridden. A failing case among many is reported and skipped (exit code 1 at the end); bad input
(checkpoint, empty folder, an unknown ``--cases`` id, an unwritable OUTPUT, checked before any
work, a single bad case or a failed write of its outputs) exits 2 with one line.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.atomic import atomic_write_text, check_writable
from core.checkpoint import file_sha256
from core.config import Config, parse_override
from core.errors import UserError, run_cli
from core.task import Task, TaskError, display_channels, load_task
from datasets.detect import case_facts, choose_from_facts, label_values, read_label_values
from datasets.io import (
    Case,
    CaseError,
    Geometry,
    discover_cases,
    read_case,
    to_original,
    write_probabilities,
    write_segmentation,
)
from datasets.preprocess import preprocess_case, restore_probabilities
from inference.postprocess import CONFIG_KEYS as POSTPROCESS_CONFIG_KEYS
from inference.postprocess import Rules, check_rules, postprocess_classes
from inference.predict import (
    ModelSpec,
    choose_backend,
    load_models,
    override_infer_config,
    predict_case,
    resolve_device,
)
from inference.render import dice_line, render_case, save_png
from inference.sliding_window import FLIP_DIMS
from metrics import aggregate, case_metrics, evaluate_files, format_table, write_report

PENDING_WRITES = 2  # predicted cases waiting for the writer thread before the prediction loop waits
PREDICTIONS_FILE = "predictions.json"  # OUTPUT/predictions.json: what produced the masks of OUTPUT
NOT_MASK_SETTINGS = ("device", "sw_batch_size", "precision", "backend")  # infer.* keys that only change speed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                        help="checkpoint (.pt); repeat for an ensemble (probabilities averaged)")
    parser.add_argument("-i", "--input", required=True, help="dataset folder or one case folder")
    parser.add_argument("-o", "--output", required=True,
                        help="output folder (outside INPUT, writable); OUTPUT/predictions.json records what wrote "
                             "its masks")
    parser.add_argument("--overwrite", action="store_true",
                        help="predict every case again, also into a folder of masks of other checkpoints/settings")
    parser.add_argument("--cases", metavar="SPEC",
                        help="predict only these cases of INPUT: FILE.json:KEY (e.g. runs/demo/split.json:val), "
                             "a text file with one case id per line, or comma-separated ids")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write OUTPUT/<case_id>_probs.nii.gz")
    parser.add_argument("--png", action="store_true", help="also write OUTPUT/<case_id>.png (3 slices, overlay, legend)")
    parser.add_argument("--postprocessing", metavar="JSON",
                        help="post-processing rules to apply (evaluate.py --tune-postprocessing, or a run's "
                             "postprocessing.json); default: the checkpoint's tuned rules (an ensemble: none)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="infer.* / metrics.* config overrides")
    return parser.parse_args(argv)


@dataclass
class Run:
    """Everything the per-case steps share."""

    models: list[torch.nn.Module]
    cfg: Config
    spec: ModelSpec  # the checkpoint's task, output mode and input modalities
    output_task: Task | None  # infer.output_task when set, else each case's own task
    device: torch.device
    output: Path
    checkpoints: list[str]  # --checkpoint paths, in order
    overwrite: bool = False  # --overwrite
    png: bool = False  # --png
    save_probabilities: bool = False  # --save-probabilities
    per_case: dict[str, dict] = field(default_factory=dict)  # case_id -> case_metrics(...)
    rules: Rules = field(default_factory=Rules)  # the post-processing applied (choose_postprocessing)
    configuration: dict = field(default_factory=dict)  # what makes the masks (mask_configuration)
    recorded: set[str] = field(default_factory=set)  # cases whose masks that configuration wrote to OUTPUT


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    input_dir, output = Path(args.input), Path(args.output)
    check_paths(input_dir, output)
    check_writable(output, "-o")  # before any long work
    wanted = read_case_spec(args.cases) if args.cases is not None else None
    models, spec = load_models(args.checkpoint, "cpu")
    cfg = override_infer_config(spec.cfg, args.overrides, spec.task)
    output_task = resolve_output_task(cfg.infer.output_task, spec.task)
    device = resolve_device(cfg.infer.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every window has the same shape: autotune once
    cases = discover_cases(input_dir, [spec.task.label_file])
    if wanted is not None:
        cases = select_cases(cases, wanted, args.cases, input_dir)
    run = Run(models, cfg, spec, output_task, device, output, list(args.checkpoint), args.overwrite, args.png,
              args.save_probabilities)
    run.rules, source = choose_postprocessing(args, cfg, spec)
    check_task_of_input(run, cases)
    run.configuration = mask_configuration(run)
    run.recorded = check_output_folder(run, cases)  # masks of other checkpoints/settings: exit 2 before any work
    to_predict = sum(args.overwrite or not (output / f"{case.case_id}.nii.gz").exists() for case in cases)
    passes = to_predict * (len(FLIP_DIMS) if cfg.infer.tta else 1)  # network passes over cases: auto backend
    models = choose_backend(models, args.checkpoint, spec, cfg.infer.backend, device, passes)
    run.models = [m.to(device) for m in models]
    output.mkdir(parents=True, exist_ok=True)
    with writing(output / PREDICTIONS_FILE):
        write_predictions_file(run)  # before the first mask: an interrupted run can continue
    say(f"{len(cases)} case(s), {len(models)} model(s), task {spec.task.name}, {spec.mode} output, device {device}, "
        f"tta={'on' if cfg.infer.tta else 'off'}, window {list(cfg.data.patch_size)}")
    say(f"post-processing: {run.rules.describe(spec.task)} ({source})")

    start = time.perf_counter()
    todo, kept, failures = [], [], []
    for case in cases:
        seg_path = output / f"{case.case_id}.nii.gz"
        if seg_path.exists() and not args.overwrite:
            kept.append(case.case_id)
            say(f"{case.case_id}: kept {seg_path} from an earlier run of the same checkpoint(s) and settings "
                "(--overwrite to predict it again)")
            evaluate_existing(run, case, seg_path, failures)
        else:
            todo.append((case, seg_path))
    written, predict_failures = predict_all(run, todo, raise_errors=len(cases) == 1)
    failures += predict_failures

    if run.per_case:
        report_metrics(run, kept)
    say(f"done: {written} predicted now, {len(kept)} kept from an earlier run of the same checkpoint(s) and "
        f"settings, {len(failures)} failed, {time.perf_counter() - start:.1f} s total -> {output}")
    if failures:
        print(f"error: {len(failures)} of {len(cases)} cases failed:", file=sys.stderr)
        for case_id, message in failures:
            print(f"  {case_id}: {message}", file=sys.stderr)
        return 1
    return 0


def choose_postprocessing(args: argparse.Namespace, cfg: Config, spec: ModelSpec) -> tuple[Rules, str]:
    """The post-processing rules to apply and where they come from: ``infer.*`` overrides of any of
    ``POSTPROCESS_CONFIG_KEYS`` win, then ``--postprocessing FILE``, then the rules tuned on the
    validation cases stored in a single checkpoint; an ensemble gets none without a file (its
    members were tuned on different cases)."""
    keys = {f"infer.{key}" for key in POSTPROCESS_CONFIG_KEYS}
    overridden = [o for o in args.overrides if parse_override(o)[0] in keys]
    if overridden:
        return Rules.from_config(cfg.infer), "infer.* overrides"
    if args.postprocessing:
        rules, source = read_postprocessing(Path(args.postprocessing), spec.task)
        return rules, f"{args.postprocessing}: {source}"
    if len(args.checkpoint) > 1:
        return Rules(), ("an ensemble: give --postprocessing FILE tuned on the union of the folds' validation cases "
                         "(evaluate.py --tune-postprocessing)")
    if spec.postprocessing:
        rules = Rules.from_dict(spec.postprocessing["rules"])
        return rules, f"{args.checkpoint[0]}: {spec.postprocessing.get('source', 'stored in the checkpoint')}"
    return Rules.from_config(cfg.infer), "the checkpoint's infer.* settings; no tuned rules in it"


def read_postprocessing(path: Path, task: Task) -> tuple[Rules, str]:
    """``(rules, source)`` of a post-processing JSON ``{"rules": {...}, "source": "..."}``;
    ``UserError`` naming the file when it is missing, not JSON, or does not fit ``task``."""
    if not path.is_file():
        raise UserError(f"{path}: post-processing file not found (--postprocessing)")
    try:
        raw = json.loads(path.read_text())
        rules = Rules.from_dict(raw["rules"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a post-processing file ({type(err).__name__}: {err}); expected "
                        '{"rules": {...}, "source": "..."}') from None
    try:
        check_rules(task, rules)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    return rules, str(raw.get("source", "no source recorded"))


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


def read_case_spec(spec: str) -> list[str]:
    """The case ids of ``--cases SPEC``: ``FILE.json:KEY`` (a list of a JSON object, e.g. the
    ``split.json`` of train.py), a text file with one id per line (blank lines and ``#`` comments
    ignored) or comma-separated ids; ``UserError`` (one line) for a missing or bad file."""
    head, colon, key = spec.rpartition(":")
    if colon and head.lower().endswith(".json"):
        ids = json_case_list(Path(head), key)
    elif spec.lower().endswith(".json"):
        ids = json_case_list(Path(spec), None)
    elif Path(spec).is_file():
        ids = [line.split("#", 1)[0].strip() for line in Path(spec).read_text(errors="replace").splitlines()]
    elif "/" in spec or spec.lower().endswith((".txt", ".csv", ".lst")):
        raise UserError(f"--cases: {spec}: file not found")
    else:
        ids = [part.strip() for part in spec.split(",")]
    ids = list(dict.fromkeys(i for i in ids if i))  # in order, once each
    if not ids:
        raise UserError(f"--cases {spec}: no case ids given")
    return ids


def json_case_list(path: Path, key: str | None) -> list[str]:
    """The list ``key`` of the JSON object in ``path`` (or the JSON list itself when ``key`` is None)."""
    if not path.is_file():
        raise UserError(f"--cases: {path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"--cases: {path}: invalid JSON ({err})") from None
    if key is None and isinstance(data, dict):
        raise UserError(f"--cases: {path}: name the list to use, e.g. {path}:{next(iter(data), 'val')} "
                        f"(keys: {', '.join(map(str, data)) or 'none'})")
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            keys = ", ".join(map(str, data)) if isinstance(data, dict) else "none, it is not an object"
            raise UserError(f'--cases: {path} has no list "{key}" (keys: {keys})')
        data = data[key]
    if not isinstance(data, list) or not all(isinstance(i, str) for i in data):
        raise UserError(f"--cases: {path}{':' + key if key else ''} is not a list of case ids (strings)")
    return data


def select_cases(cases: list[Case], wanted: list[str], spec: str, input_dir: Path) -> list[Case]:
    """The cases of ``wanted`` in INPUT's order; ``UserError`` naming the first id not in INPUT."""
    found = {case.case_id for case in cases}
    missing = [case_id for case_id in wanted if case_id not in found]
    if missing:
        more = f" (and {len(missing) - 1} other id(s) of --cases)" if len(missing) > 1 else ""
        raise UserError(f"--cases {spec}: case {missing[0]} is not in {input_dir}{more}; it has {len(cases)} case(s), "
                        f"e.g. {cases[0].case_id}")
    chosen = set(wanted)
    return [case for case in cases if case.case_id in chosen]


def mask_configuration(run: Run) -> dict:
    """What decides the masks: the checkpoints (path and SHA-256), the task, every ``infer.*``
    setting except those that only change speed or placement (``NOT_MASK_SETTINGS``) and the
    output task. Two runs with equal hashes, task and settings write the same masks."""
    settings = {f"infer.{key}": value for key, value in dataclasses.asdict(run.cfg.infer).items()
                if key not in NOT_MASK_SETTINGS and key not in POSTPROCESS_CONFIG_KEYS}
    settings.update({f"postprocessing.{key}": value for key, value in run.rules.to_dict().items()})  # as applied
    return {
        "checkpoints": [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for p in run.checkpoints],
        "task": run.spec.task.name,
        "settings": json.loads(json.dumps(settings)),  # as it reads back from the file (tuples -> lists)
        "output_task": run.output_task.name if run.output_task else "auto (each case's own task)",
    }


def read_predictions_file(path: Path) -> tuple[dict | None, str]:
    """``(record, "")`` of an ``OUTPUT/predictions.json``, ``(None, "")`` when there is none and
    ``(None, problem)`` when it cannot be used."""
    if not path.exists():
        return None, ""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return None, f"{path} is unreadable ({err})"
    if not (isinstance(record, dict) and isinstance(record.get("checkpoints"), list)
            and all(isinstance(c, dict) and isinstance(c.get("sha256"), str) for c in record["checkpoints"])
            and isinstance(record.get("settings"), dict) and isinstance(record.get("cases"), list)
            and all(isinstance(i, str) for i in record["cases"])):
        return None, f"{path} is not a predictions record of infer.py"
    return record, ""


def configuration_differences(old: dict, new: dict) -> list[str]:
    """What differs between the configuration of ``old`` (a predictions record) and ``new``, in words."""
    def checkpoints(record: dict) -> str:
        return " + ".join(f"{c.get('path', '?')} (sha256 {c['sha256'][:12]})" for c in record["checkpoints"])

    def value(settings: dict, key: str) -> str:
        return json.dumps(settings[key]) if key in settings else "(not recorded)"

    diffs = []
    if sorted(c["sha256"] for c in old["checkpoints"]) != sorted(c["sha256"] for c in new["checkpoints"]):
        diffs.append(f"checkpoint(s) {checkpoints(old)} there, {checkpoints(new)} now")
    if old.get("task") != new["task"]:
        diffs.append(f"task {old.get('task')} there, {new['task']} now")
    for key in sorted(set(old["settings"]) | set(new["settings"])):
        if old["settings"].get(key, ...) != new["settings"].get(key, ...):
            diffs.append(f"{key}={value(old['settings'], key)} there, {value(new['settings'], key)} now")
    return diffs


def check_output_folder(run: Run, cases: list[Case]) -> set[str]:
    """Refuse (``UserError``, before any work) to mix masks of different checkpoints or settings in
    OUTPUT; returns the cases already recorded in ``OUTPUT/predictions.json`` for this
    configuration (kept masks).

    Without ``--overwrite``, masks of the cases to predict must have been written by this
    configuration: listed in a predictions.json of the same checkpoints (by SHA-256) and mask
    settings. Masks listed in a predictions.json of another configuration are refused too, also
    of other cases, as are masks of these cases without a (usable) predictions.json.
    """
    output, path = run.output, run.output / PREDICTIONS_FILE
    old, problem = read_predictions_file(path) if output.is_dir() else (None, "")
    diffs = configuration_differences(old, run.configuration) if old is not None else []
    listed = set(old["cases"]) if old is not None else set()

    def masks(ids) -> list[str]:
        return sorted(i for i in ids if (output / f"{i}.nii.gz").is_file())

    existing = masks(case.case_id for case in cases)
    hint = "use --overwrite to predict them again, or another -o"
    if run.overwrite:
        others = masks(listed - {case.case_id for case in cases}) if diffs else []
        if others:
            say(f"note: {output} keeps {len(others)} mask(s) of other cases from another configuration "
                f"(first: {others[0]}.nii.gz); {PREDICTIONS_FILE} will list only this configuration's")
        return set() if old is None or diffs else set(masks(listed))
    if old is None:
        if existing:
            why = problem or f"no {PREDICTIONS_FILE} says which checkpoint(s) and settings wrote them"
            raise UserError(f"{output}: holds {len(existing)} mask(s) of these cases (first: {existing[0]}.nii.gz) "
                            f"but {why}; {hint}")
        return set()
    if diffs:
        mixed = masks(set(existing) | listed)
        if mixed:
            raise UserError(f"{output}: holds {len(mixed)} mask(s) (first: {mixed[0]}.nii.gz) written by another "
                            f"configuration ({'; '.join(diffs)}; see {path}); {hint}")
        return set()
    unlisted = [i for i in existing if i not in listed]
    if unlisted:
        raise UserError(f"{output}: {len(unlisted)} mask(s) (first: {unlisted[0]}.nii.gz) are not listed in {path}, "
                        f"so not known to come from these checkpoint(s) and settings; {hint}")
    return set(masks(listed))


def write_predictions_file(run: Run) -> None:
    """``OUTPUT/predictions.json``: the configuration, the time and the cases it wrote (atomic)."""
    record = {**run.configuration, "time": datetime.now().astimezone().isoformat(timespec="seconds"),
              "cases": sorted(run.recorded)}
    atomic_write_text(run.output / PREDICTIONS_FILE, json.dumps(record, indent=1) + "\n")


@contextlib.contextmanager
def writing(path: Path):
    """An ``OSError`` while writing ``path`` (full disk, read-only folder) -> one-line ``UserError``
    naming it (writes are atomic: nothing half-written is left, an earlier file is unchanged)."""
    try:
        yield
    except OSError as err:
        raise UserError(f"{path}: cannot write it ({err.strerror or err}); no partial file was left, an earlier "
                        f"{path.name} is unchanged") from None


def resolve_output_task(setting: str, trained: Task) -> Task | None:
    """``infer.output_task``: ``None`` for "auto" (each case's own task), else a task that must be
    a naming variant of the checkpoint's (same classes and regions)."""
    if setting == "auto":
        return None
    task = load_task(setting)
    if not task.compatible_with(trained):
        raise UserError(f"infer.output_task: task {task.name} ({task.describe_labels()}) has other classes or "
                        f"regions than the checkpoint's task {trained.name} ({trained.describe_labels()})")
    return task


def case_task(run: Run, case: Case, values: list[int] | None = None) -> Task:
    """The task of one case, from its name and layout (and ``values``, its label values, when
    known), preferring the checkpoint's; ``CaseError`` unless it is the checkpoint's task or a
    naming variant of it."""
    facts = dataclasses.replace(case_facts(case, values), modalities=None)  # read_case names a missing image
    try:
        task = choose_from_facts([facts], "auto", prefer=run.spec.task).task
    except TaskError as err:
        raise CaseError(str(err)) from None
    if not task.compatible_with(run.spec.task):
        raise CaseError(f"{case.seg or case.volume or case.folder}: case {case.case_id} is task {task.name} "
                        f"({task.describe_labels()}) but the checkpoint was trained on task {run.spec.task.name} "
                        f"({run.spec.task.describe_labels()})")
    return task


def check_task_of_input(run: Run, cases: list[Case]) -> None:
    """``UserError`` (exit 2) when, judged by names alone, no case is of the checkpoint's task."""
    errors = []
    for case in cases:
        try:
            case_task(run, case)
            return
        except CaseError as err:
            errors.append(str(err))
    if errors:
        raise UserError(errors[0] + (f" (and {len(errors) - 1} other case(s))" if len(errors) > 1 else ""))


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
    task: Task  # the case's own task (its names and labels)
    out_task: Task  # whose label values are written
    overlay: np.ndarray | None  # (X, Y, Z) the image drawn under the PNG overlay, only with --png
    crop_images: np.ndarray  # (C, x, y, z) brain crop, z-scored
    geometry: Geometry  # with the crop box
    ref_classes: np.ndarray | None  # (X, Y, Z) training classes of the case's label file
    seconds: float


def read_stage(run: Run, case: Case) -> Loaded:
    """Find the case's task, read its files and apply the training preprocessing. A label file
    whose values are not labels of the case's task fails the case (its metrics would be wrong)."""
    tick = time.perf_counter()
    task = case_task(run, case)
    images, seg, geometry = read_case(case, task, run.spec.modalities, with_label=True)
    ref_classes = None
    if seg is not None:
        values = label_values(seg)
        if task.unexpected_values(values):
            task = case_task(run, case, values)  # e.g. ET = 4 labels in a 2023-named case
        try:
            ref_classes = task.labels_to_classes(seg)
        except ValueError as err:
            raise CaseError(f"{case.seg}: {err}") from None
    crop_images, _, geometry = preprocess_case(images, None, geometry, task, run.spec.spacing)
    overlay = images[display_channels(run.spec.modalities)[0]] if run.png else None  # not all C channels
    return Loaded(case, task, run.output_task or task, overlay, crop_images, geometry, ref_classes,
                  time.perf_counter() - tick)


def predict_stage(run: Run, loaded: Loaded) -> tuple[np.ndarray, np.ndarray | None, float]:
    """``(classes (x, y, z) uint8 post-processed, probabilities (K, x, y, z) if they are saved,
    seconds)`` of the cropped case."""
    tick = time.perf_counter()
    cfg, spec = run.cfg, run.spec
    probs = predict_case(run.models, loaded.crop_images, cfg.infer, cfg.data.patch_size, spec.mode, run.device)
    probs = restore_probabilities(probs, loaded.geometry)  # to the crop's own grid, before labels are decided
    classes = spec.task.decode(probs, spec.mode, cfg.infer.region_threshold).cpu().numpy()
    classes = postprocess_classes(classes, spec.task, run.rules, loaded.geometry.canonical_spacing)
    kept = probs.cpu().numpy() if run.save_probabilities else None
    return classes, kept, time.perf_counter() - tick


def write_stage(run: Run, loaded: Loaded, classes: np.ndarray, probs: np.ndarray | None,
                seg_path: Path) -> dict[str, float]:
    """Write the mask (and probabilities), score it, then draw the PNG (with the case's Dice line
    when it has a reference); returns seconds per step."""
    tick = time.perf_counter()
    case, geometry, cfg = loaded.case, loaded.geometry, run.cfg
    full_classes = to_original(classes, geometry)  # the input's grid: pasted, reoriented back
    with writing(seg_path):
        write_segmentation(loaded.out_task.classes_to_labels(full_classes), geometry, seg_path)
    run.recorded.add(case.case_id)  # only this (writer) thread changes it while cases are predicted
    with writing(run.output / PREDICTIONS_FILE):
        write_predictions_file(run)
    if probs is not None:
        probs_path = run.output / f"{case.case_id}_probs.nii.gz"
        with writing(probs_path):
            write_probabilities(full_probabilities(probs, geometry, run.spec.mode), geometry, probs_path)
    timing = {"write": time.perf_counter() - tick}
    metrics = None
    if loaded.ref_classes is not None:
        tick = time.perf_counter()
        metrics = case_metrics(full_classes, loaded.ref_classes, geometry.spacing, loaded.task,
                               cfg.metrics.convention, hd95=True)
        run.per_case[case.case_id] = metrics
        timing["metrics"] = time.perf_counter() - tick
    if run.png:  # three slices through the tumour, prediction and reference rows, legend (inference/render.py)
        tick = time.perf_counter()
        picture = render_case(loaded.overlay, full_classes, loaded.ref_classes, geometry.affine, loaded.task,
                              case.case_id, subtitle=None if metrics is None else dice_line(metrics, loaded.task))
        with writing(run.output / f"{case.case_id}.png"):
            save_png(picture, run.output / f"{case.case_id}.png")
        timing["write"] += time.perf_counter() - tick
    return timing


def full_probabilities(probs: np.ndarray, geometry: Geometry, mode: str) -> np.ndarray:
    """Probabilities ``(K, x, y, z)`` of the canonical crop -> the original grid; outside the crop
    background is certain (probability 1 for the background class in labels mode, 0 elsewhere)."""
    fill = [1.0] + [0.0] * (probs.shape[0] - 1) if mode == "labels" else 0.0
    return to_original(probs, geometry, fill=fill)


def evaluate_existing(run: Run, case: Case, seg_path: Path, failures: list[tuple[str, str]]) -> None:
    """Metrics of a kept prediction against the case's reference, so the report covers every
    case; a reference that cannot be scored is a failure."""
    if case.seg is None:
        return
    try:
        task = case_task(run, case, read_label_values(case.seg))
        run.per_case[case.case_id] = evaluate_files(seg_path, case.seg, task, run.cfg.metrics.convention, hd95=True,
                                                    pred_task=run.output_task or task)
    except UserError as err:
        failures.append((case.case_id, f"cannot evaluate the existing prediction: {err}"))
        say(f"{case.case_id}: FAILED: cannot evaluate the existing prediction ({err})")


def report_metrics(run: Run, kept: list[str]) -> None:
    """Write metrics.json (with ``"kept"``: the cases scored from masks kept from an earlier run)
    and metrics.csv, print the summary table."""
    metrics_cfg = run.cfg.metrics
    per_case = dict(sorted(run.per_case.items()))
    summary = aggregate(per_case)
    json_path, csv_path = run.output / "metrics.json", run.output / "metrics.csv"
    kept_scored = [case_id for case_id in per_case if case_id in set(kept)]
    with writing(json_path):
        write_report(per_case, summary, json_path, csv_path, metrics_cfg.convention, run.spec.task)
        report = json.loads(json_path.read_text())
        report = {"kept": kept_scored, **report}  # which scores are not of masks predicted now
        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    of_kept = f"; {len(kept_scored)} of them of masks kept from an earlier run, not predicted now" \
        if kept_scored else ""
    say(f"metrics of {len(per_case)} case(s) with a reference ({metrics_cfg.convention} convention, "
        f"task {run.spec.task.name}{of_kept}):")
    say(format_table(summary))
    say(f"wrote {json_path} and {csv_path}")


if __name__ == "__main__":
    run_cli(main)
