"""Run logging: TensorBoard scalars and images, ``metrics.jsonl``, and a progress bar.

    log = RunLogger("runs/demo")                  # main process only
    log.scalars({"train/loss": 0.7, "train/lr": 1e-2}, step=120)
    log.validation({"epoch": 3, "dice": {...}}, step=750)   # one JSON line + TensorBoard
    log.image("val/panel", inference.render.as_chw(picture), step=750)   # (3, H, W) in [0, 1]
    bar = Progress(total=250, desc="epoch 3")     # tqdm on a terminal, plain lines otherwise
    bar.update(loss=0.71, patches_per_s=9.5); bar.close()
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from core.atomic import json_default


class RunLogger:
    """TensorBoard event files and ``metrics.jsonl`` (one JSON object per validation) in ``out_dir``."""

    def __init__(self, out_dir: str | Path, purge_step: int | None = None):
        """``purge_step``: on resume, TensorBoard hides events at or after this step left by the
        interrupted run."""
        from torch.utils.tensorboard import SummaryWriter  # imported here: slow, main process only

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.out_dir), purge_step=purge_step)
        self.metrics_path = self.out_dir / "metrics.jsonl"

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Write each finite ``tag -> value`` at ``step``."""
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), step)

    def validation(self, record: dict[str, Any], scalars: dict[str, float], step: int) -> None:
        """Append ``record`` as one line of ``metrics.jsonl`` and write ``scalars`` to TensorBoard."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record, default=json_default) + "\n")
        self.scalars(scalars, step)
        self.writer.flush()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """A Markdown text (e.g. the colour legend of the image panels)."""
        self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image (3, H, W)`` float in ``[0, 1]``."""
        self.writer.add_image(tag, image, step, dataformats="CHW")

    def close(self) -> None:
        self.writer.close()


class Progress:
    """Per-epoch progress: a tqdm bar on a terminal, else a plain line every ~10% of ``total``.

    ``update(**stats)`` advances by one iteration and shows ``stats`` (e.g. loss, patches/s).
    ``enabled=False`` (non-main ranks) makes every call a no-op.
    """

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool = True,
                 stream: TextIO | None = None):
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total}")
        self.total, self.desc, self.count, self.enabled = total, desc, initial, enabled
        self.stream = stream or sys.stdout
        self.every = max(1, math.ceil(total / 10))
        self.bar = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream,
                            dynamic_ncols=True, leave=False)

    def update(self, **stats: float) -> None:
        if not self.enabled:
            return
        self.count += 1
        text = {k: _fmt(v) for k, v in stats.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(1)
        elif self.count % self.every == 0 or self.count == self.total:
            stats_text = " ".join(f"{k} {v}" for k, v in text.items())
            width = len(str(self.total))
            self.stream.write(f"{self.desc} [{self.count:>{width}}/{self.total}] {stats_text}".rstrip() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _fmt(value: float) -> str:
    return f"{float(value):.4g}"
