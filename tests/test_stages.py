"""The stage runner: a stage's folder appears complete or not at all, and run.json says what happened."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows import stages
from schemas.artifacts import Artifact
from schemas.config import default_config


@dataclass(frozen=True)
class Note(Artifact):
    text: str = ""


def _write_note(text: str, fail_after_write: bool = False):
    def body(out: Path) -> Note:
        out.mkdir(parents=True)
        (out / "note.txt").write_text(text)
        if fail_after_write:
            raise KeyboardInterrupt  # as if the process were interrupted mid-stage
        return Note(dir=out, text=text)
    return body


def test_completed_stage_is_renamed_into_place_and_recorded(home):
    folder = stages.start_run(default_config("train-kaggle"))
    note = stages.execute(folder, "ingest", _write_note("first"))
    assert note.dir == folder.stage_dir("ingest") and (note.dir / "note.txt").read_text() == "first"
    record = json.loads(folder.path.read_text())
    assert record["stages"]["ingest"]["status"] == "completed"
    assert record["stages"]["ingest"]["outputs"] == {"text": "first"}
    assert not list(folder.root.glob(".ingest.*"))


def test_interrupted_stage_leaves_no_output_and_keeps_the_previous_one(home):
    folder = stages.start_run(default_config("train-kaggle"))
    stages.execute(folder, "ingest", _write_note("good"))
    with pytest.raises(KeyboardInterrupt):
        stages.execute(folder, "ingest", _write_note("half", fail_after_write=True))
    assert (folder.stage_dir("ingest") / "note.txt").read_text() == "good"  # the old output is untouched
    assert not list(folder.root.glob(".ingest.*"))
    record = json.loads(folder.path.read_text())
    assert record["status"] == "failed" and record["stages"]["ingest"]["status"] == "failed"


def test_rerun_replaces_the_output_whole_and_stale_temp_folders_go(home):
    folder = stages.start_run(default_config("train-kaggle"))
    stale = folder.root / ".ingest.tmp-deadbeef"  # what a kill -9 leaves behind
    stale.mkdir()
    (stale / "train.parquet").write_text("partial")
    stages.execute(folder, "ingest", _write_note("one"))
    stages.execute(folder, "ingest", _write_note("two"))
    assert sorted(p.name for p in folder.stage_dir("ingest").iterdir()) == ["note.txt"]
    assert (folder.stage_dir("ingest") / "note.txt").read_text() == "two"
    assert not stale.exists()


def test_ingest_killed_midway_leaves_nothing_a_later_stage_could_read(tmp_path):
    """kill -9 while the stage is writing: no ingest/ folder, later stages refuse the run, a new run works."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import datagen
    from schemas.errors import DigitsInputError
    from schemas.runs import RunFolder

    datagen.write_kaggle(tmp_path / "kaggle", n_train=3000, n_test=500)
    home = tmp_path / "home"
    env = {**os.environ, "DIGITS_HOME": str(home)}
    script = Path(sys.executable).with_name("digits")
    command = [str(script), "ingest", "--source", "kaggle", "--data", str(tmp_path / "kaggle")]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(home.glob("runs/*/.ingest.tmp-*/train.parquet")):  # it is writing its outputs
        assert proc.poll() is None and time.monotonic() < deadline, "ingest ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    (run,) = (home / "runs").iterdir()
    assert not (run / "ingest").exists()
    assert json.loads((run / "run.json").read_text())["stages"]["ingest"]["status"] == "running"
    with pytest.raises(DigitsInputError, match="no completed ingest stage"):
        stages.examples_of(RunFolder(run))

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    finished = [r for r in (home / "runs").iterdir() if r != run]
    assert [p.name for p in sorted((finished[0] / "ingest").glob("*.parquet"))] == ["test.parquet", "train.parquet"]
