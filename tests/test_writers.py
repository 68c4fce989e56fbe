"""The training loop's metric writer without TensorFlow, and its progress report."""

import json
import logging
import math

import pytest

from lensjax import writers


def test_json_lines_writer_appends_rows_that_read_back(tmp_path):
    path = tmp_path / "run" / writers.METRICS_FILE
    writer = writers.JsonLinesWriter(path)
    writer.write_scalars(1, {"train_loss": 0.5, "train_accuracy": 1})
    writer.write_scalars(2, {"train_loss": float("nan")})
    writer.close()
    # A resumed run appends to the same file.
    writers.JsonLinesWriter(path).write_scalars(3, {"selection_auc": 0.75})
    lines = path.read_text().splitlines()
    assert json.loads(lines[1]) == {"step": 2, "train_loss": None}   # strict JSON: no NaN
    rows = writers.read_metrics(path)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[0] == {"step": 1, "train_loss": 0.5, "train_accuracy": 1.0}
    assert math.isnan(rows[1]["train_loss"])
    assert rows[2]["selection_auc"] == 0.75


def test_read_metrics_names_the_file_and_line_of_a_torn_write(tmp_path):
    path = tmp_path / writers.METRICS_FILE
    path.write_text('{"step": 1, "train_loss": 0.5}\n{"step": 2, "train_lo')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON"):
        writers.read_metrics(path)


def test_just_logging_writes_no_file(tmp_path, caplog):
    writer = writers.JsonLinesWriter(None)
    with caplog.at_level(logging.INFO):
        writer.write_scalars(7, {"train_loss": 0.25})
    writer.close()
    assert "[7] train_loss=0.25" in caplog.text
    assert not list(tmp_path.iterdir())


class _Recorder:
    def __init__(self):
        self.rows = []

    def write_scalars(self, step, scalars):
        self.rows.append((step, dict(scalars)))


def test_progress_report_measures_steps_per_second_between_reports(caplog):
    times = iter([100.0, 104.0, 109.0, 111.0])  # steps 1 (first), 5, 10, 12 (the last)
    writer = _Recorder()
    progress = writers.ProgressReport(12, 5, writer, clock=lambda: next(times))
    with caplog.at_level(logging.INFO):
        rates = [progress(step) for step in range(1, 13)]
    # Step 5: 4 steps in 4 s, from the first step (whose compilation is left out);
    # step 10: 5 steps in 5 s; step 12, the last: 2 steps in 2 s.
    assert rates == [None] * 4 + [1.0] + [None] * 4 + [1.0, None, 1.0]
    assert writer.rows == [(5, {"steps_per_sec": 1.0}), (10, {"steps_per_sec": 1.0}),
                           (12, {"steps_per_sec": 1.0})]
    assert "step 10/12 (83.3%), 1 steps/s, ETA 2s" in caplog.text


def test_progress_report_after_resume_and_bad_settings():
    times = iter([50.0, 60.0])
    progress = writers.ProgressReport(100, 10, clock=lambda: next(times))
    assert progress(41) is None           # a resumed run's first step
    assert progress(50) == pytest.approx(9 / 10.0)
    with pytest.raises(ValueError, match="every_steps"):
        writers.ProgressReport(100, 0)


def test_format_duration():
    assert [writers.format_duration(s) for s in (0, 12.4, 258, 3720, -3)] == [
        "0s", "12s", "4m 18s", "1h 02m", "0s"]


def test_create_writer_falls_back_only_when_tensorflow_is_missing(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__
    failure = {}

    def fake_import(name, *args, **kwargs):
        if name == "clu" and args and args[2] and "metric_writers" in args[2]:
            raise failure["error"]
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    failure["error"] = ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
    writer = writers.create_writer(tmp_path)
    assert isinstance(writer, writers.JsonLinesWriter)
    assert writer.path == tmp_path / writers.METRICS_FILE
    writer.close()
    assert writers.create_writer(tmp_path, just_logging=True).path is None
    # Any other import failure is a real error, not a reason to fall back.
    failure["error"] = ModuleNotFoundError("No module named 'etils'", name="etils")
    with pytest.raises(ModuleNotFoundError, match="etils"):
        writers.create_writer(tmp_path)
