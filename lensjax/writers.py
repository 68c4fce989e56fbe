"""Where the training loop writes its metrics, and its progress report.

    writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_scalars(step, {"train_loss": 0.41})
    progress = writers.ProgressReport(total_steps=1000, every_steps=50, writer=writer)
    progress(step)      # every `every_steps` steps: logs steps/s, % done and ETA
    writer.flush()

With TensorFlow installed, `create_writer` is clu's default writer: TensorBoard event
files in the workdir and the log. clu's writers import TensorFlow, which some GPU
images lack; there the same scalars go to `workdir/metrics.jsonl` (one JSON object
per write: {"step": 120, "train_loss": 0.41, ...}) and the log, and the run says so
once. Processes other than the first only log (`just_logging`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from lensjax import parallel

METRICS_FILE = "metrics.jsonl"
# Top-level modules whose absence makes clu's writers unusable (they import them).
TENSORFLOW_MODULES = ("tensorflow", "tensorboard")


def _scalar(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


class JsonLinesWriter:
    """Scalars to the log and, unless `path` is None, appended to a JSON-lines file.

    The methods the training loop uses of clu's `MetricWriter`: write_scalars,
    flush and close. Each write is a line {"step": s, name: value, ...}; the file is
    flushed at every write, so an interrupted run keeps what it wrote.
    """

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = {name: _scalar(value) for name, value in scalars.items()}
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
        if self._file is not None:
            # JSON has no NaN or infinity: they are written as null.
            row = {"step": int(step), **{k: (v if math.isfinite(v) else None)
                                         for k, v in values.items()}}
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a `metrics.jsonl` file, in the order written (null -> NaN)."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error.msg}); the run that "
                                 "wrote it may have been killed mid-line: delete that line") from None
            rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows


def _tensorflow_missing(error: ImportError) -> bool:
    return (isinstance(error, ModuleNotFoundError) and error.name is not None
            and error.name.split(".")[0] in TENSORFLOW_MODULES)


def create_writer(workdir: str | Path, *, just_logging: bool = False):
    """The training loop's metric writer for `workdir` (see the module docstring).

    Returns an object with write_scalars(step, {name: value}), flush() and close():
    clu's default writer (asynchronous) where TensorFlow imports, else a
    `JsonLinesWriter` on workdir/metrics.jsonl (or the log alone if `just_logging`).
    """
    try:
        from clu import metric_writers
    except ImportError as error:
        if not _tensorflow_missing(error):
            raise
        logging.warning("TensorFlow is not installed (%s), so no TensorBoard files: metrics go "
                        "to %s and the log. `pip install -r requirements.txt` adds TensorBoard.",
                        error.name, "the log" if just_logging else Path(workdir) / METRICS_FILE)
        return JsonLinesWriter(None if just_logging else Path(workdir) / METRICS_FILE)
    parallel.hide_accelerators_from_tensorflow()
    return metric_writers.create_default_writer(str(workdir), just_logging=just_logging,
                                                asynchronous=True)


def format_duration(seconds: float) -> str:
    """"1h 02m", "4m 18s", "12s" for a non-negative number of seconds."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class ProgressReport:
    """Every `every_steps` steps: log steps/s, the fraction done and the ETA, and write
    `steps_per_sec` to `writer`. Steps/s are measured between two reports, the first
    from the process's first step, whose compilation it therefore leaves out.

    progress(step) is called after each step; `clock` is for tests.
    """

    def __init__(self, total_steps: int, every_steps: int, writer=None, *,
                 clock: Callable[[], float] = time.monotonic):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.total_steps = int(total_steps)
        self.every_steps = int(every_steps)
        self.writer = writer
        self._clock = clock
        self._last: tuple[int, float] | None = None

    def __call__(self, step: int) -> float | None:
        """Report at `step` if it is one; returns the steps/s reported, else None."""
        if self._last is None:   # the first step of this process: rates are measured from it
            self._last = (step, self._clock())
        if step % self.every_steps and step != self.total_steps:
            return None
        now = self._clock()
        last, self._last = self._last, (step, now)
        if step <= last[0] or now <= last[1]:
            logging.info("step %d/%d", step, self.total_steps)
            return None
        rate = (step - last[0]) / (now - last[1])
        done = 100.0 * step / self.total_steps if self.total_steps else 100.0
        logging.info("step %d/%d (%.1f%%), %.3g steps/s, ETA %s", step, self.total_steps, done,
                     rate, format_duration((self.total_steps - step) / rate))
        if self.writer is not None:
            self.writer.write_scalars(step, {"steps_per_sec": rate})
        return rate
