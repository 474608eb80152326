"""The run folder contract: where a run lives under $DIGITS_HOME and what run.json records.

    $DIGITS_HOME/runs/<run_id>/run.json        run_id = <UTC yyyymmddThhmmss>-<pipeline>-<short id>
    $DIGITS_HOME/runs/<run_id>/<stage>/        written complete or not at all (see flows.stages)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

from pydantic import BaseModel, Field

from schemas.errors import DamagedRun, DigitsInputError

RUN_JSON = "run.json"
TRACKED_PACKAGES = ("digits", "tensorflow-cpu", "keras", "apache-beam", "prefect", "tensorflow-datasets",
                    "pyarrow", "pandas", "numpy", "great-expectations", "scikit-learn", "mlflow")

# stale: completed, but a stage before it was run again afterwards (its inputs changed); re-run it
StageStatus = Literal["running", "completed", "failed", "skipped", "stale"]
RunStatus = Literal["running", "completed", "failed", "completed_with_warnings"]
RUN_ID = re.compile(r"[0-9]{8}T[0-9]{6}-[A-Za-z0-9_.-]+")  # <UTC yyyymmddThhmmss>-<pipeline>-<short id>


def digits_home() -> Path:
    """$DIGITS_HOME (unset or empty: ./.digits), as an absolute path (not created here). Raises DigitsInputError
    (one line) when it cannot be a folder: a file or device is there, or a file stands where a folder above it
    would be (so nothing can be made under it)."""
    home = Path(os.environ.get("DIGITS_HOME") or ".digits").expanduser().resolve()
    existing = next(path for path in (home, *home.parents) if path.exists())
    if not existing.is_dir():
        where = "it is" if existing == home else f"{existing} is"
        kind = "a device" if existing.is_char_device() or existing.is_block_device() else "a file"
        raise DigitsInputError(f"DIGITS_HOME {home} cannot be a folder: {where} {kind}; set DIGITS_HOME to a folder "
                               "(or unset it for ./.digits)")
    return home


class StageRecord(BaseModel):
    status: StageStatus
    started_at: str
    finished_at: str | None = None
    seconds: float | None = None
    error: str | None = None
    key: str | None = Field(None, description="sha256 of the stage's code, settings and inputs (schemas.stages)")
    hashes: dict[str, str] = Field(default_factory=dict, description="the output's content files -> sha256")
    outputs: dict[str, Any] = Field(default_factory=dict, description="counts, metrics, paths of the stage")


class RunRecord(BaseModel):
    run_id: str
    pipeline: str
    created_at: str
    status: RunStatus = "running"
    config: dict[str, Any]
    code_version: str
    package_versions: dict[str, str]
    data_fingerprints: dict[str, str] = Field(default_factory=dict, description="input file -> sha256")
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    registry_version: int | None = None
    promoted: bool | None = None
    promotion_reason: str | None = None
    prefect_flow_run_id: str | None = None  # the Prefect flow run that made this run folder, if any
    process: str | None = Field(None, description="host:pid of the process that last ran a stage of it")

    def effective_status(self) -> str:
        """The status, except that a run still marked running whose process is gone (on this host) was
        interrupted: killed, or its machine stopped, before it could write its final status."""
        if self.status != "running" or not self.process:
            return self.status
        host, _, pid = self.process.rpartition(":")
        if host != socket.gethostname() or not pid.isdigit():
            return self.status  # another machine's process: it cannot be checked from here
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return "interrupted"
        except PermissionError:
            pass  # alive, another user's
        return self.status


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def new_run_id(pipeline: str) -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{pipeline}-{uuid.uuid4().hex[:6]}"


def code_version() -> str:
    """The package version, plus the git commit (and '+dirty') when running from a checkout."""
    version = _version("digits")
    here = Path(__file__).resolve().parent.parent
    if (here / ".git").exists():
        try:
            sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
                                 capture_output=True, text=True, timeout=5, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            version += f"+g{sha}" + (".dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return version


def package_versions() -> dict[str, str]:
    return {name: _version(name) for name in TRACKED_PACKAGES}


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link src at dst (no second copy of the bytes); copy when a link is impossible (another
    file system). Usable as shutil.copytree's copy_function."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _atomic_text(path: Path, newline: str | None = None, encoding: str | None = None) -> Iterator[Any]:
    """A text file to write, opened under a temp name beside path and renamed over path when the block ends (removed
    if it fails): readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; run records are for the whole team to read
        with os.fdopen(fd, "w", newline=newline, encoding=encoding) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temp file beside path and rename it over path: readers never see half a file."""
    with _atomic_text(path) as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text (a page, a Markdown file) to a temp file beside path and rename it over path."""
    with _atomic_text(path, encoding="utf-8") as fh:
        fh.write(text)


def write_csv_atomic(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV (header, then rows) to a temp file beside path and rename it over path."""
    import csv

    with _atomic_text(path, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on path while the block runs: `flock` on `.NAME.lock` beside it (path itself need not
    exist), seen by every process on this machine and by every client of a POSIX shared file system (NFSv4).
    Released when the block ends, or when the process does, however it ends."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class RunFolder:
    """One run's folder and its run.json. Single writer: the process executing the run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run_id = root.name

    @classmethod
    def create(cls, pipeline: str, config: dict[str, Any], home: Path | None = None) -> RunFolder:
        runs = (home or digits_home()) / "runs"
        run_id = new_run_id(pipeline)
        root = runs / run_id
        root.mkdir(parents=True, exist_ok=False)
        folder = cls(root)
        record = RunRecord(run_id=run_id, pipeline=pipeline, created_at=utc_now(), config=config,
                           code_version=code_version(), package_versions=package_versions())
        folder.save(record)
        return folder

    @classmethod
    def open(cls, run_id: str | None = None, home: Path | None = None) -> RunFolder:
        """The run with this id — a folder directly under $DIGITS_HOME/runs, never a path elsewhere — or the
        newest readable run when run_id is None. Raises DigitsInputError."""
        runs = (home or digits_home()) / "runs"
        if run_id is None:
            every = list_runs(home)
            if not every:
                raise DigitsInputError(f"no runs under {runs}; start one with `digits ingest` or `digits run`")
            return every[-1]
        if not RUN_ID.fullmatch(run_id) or run_id.endswith((".", "..")):
            raise DigitsInputError(f"'{run_id}' is not a run id (expected <yyyymmddThhmmss>-<pipeline>-<id>, a "
                                   f"folder of {runs}; see `digits reports`)")
        root = runs / run_id
        if not (root / RUN_JSON).is_file():
            raise DigitsInputError(f"no run '{run_id}' under {runs}")
        return cls(root)

    @property
    def path(self) -> Path:
        return self.root / RUN_JSON

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def load(self) -> RunRecord:
        """The run's record. Raises DamagedRun (one line) when run.json is unreadable or not a run record."""
        try:
            return RunRecord.model_validate_json(self.path.read_bytes())
        except ValueError as exc:  # invalid JSON or not a run record (pydantic's ValidationError is one)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if hasattr(exc, "errors"):
                first = exc.errors()[0]
                reason = f"{'.'.join(map(str, first['loc'])) or 'record'}: {first['msg']}"
            raise DamagedRun(f"{self.path}: damaged run record ({reason}); the run is skipped") from None
        except FileNotFoundError:
            raise DamagedRun(f"{self.path}: missing run record") from None

    def save(self, record: RunRecord) -> None:
        """Write run.json atomically. On a full disk, the record is written over the old file in place,
        compactly, when it fits in the space that file already holds — so a failure (the disk filling up
        mid-stage) can still be recorded — and the error is raised only when even that is impossible."""
        payload = record.model_dump(mode="json")
        try:
            write_json_atomic(self.path, payload)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not _write_in_place(self.path, payload):
                raise

    def update(self, change: Callable[[RunRecord], None]) -> RunRecord:
        record = self.load()
        change(record)
        self.save(record)
        return record


def scan_runs(home: Path | None = None) -> list[tuple[RunFolder, RunRecord | None, str | None]]:
    """Every run under $DIGITS_HOME/runs, oldest first, as (folder, record, None) — or (folder, None, why)
    for a run whose run.json is damaged: listed, never read further."""
    runs = (home or digits_home()) / "runs"
    if not runs.is_dir():
        return []
    found = []
    for path in runs.iterdir():
        if (path / RUN_JSON).is_file():
            folder = RunFolder(path)
            try:
                found.append((folder, folder.load(), None))
            except DamagedRun as exc:
                found.append((folder, None, str(exc)))
    return sorted(found, key=lambda f: (f[1].created_at if f[1] else _created_of(f[0].run_id), f[0].run_id))


def _created_of(run_id: str) -> str:
    """The creation time a run id starts with, in created_at's format (for a run whose record is damaged)."""
    try:
        return datetime.strptime(run_id[:15], "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc).isoformat()
    except ValueError:
        return ""


def list_runs(home: Path | None = None) -> list[RunFolder]:
    """Every run under $DIGITS_HOME/runs whose record can be read, oldest first (damaged ones skipped)."""
    return [folder for folder, record, _ in scan_runs(home) if record is not None]


def _write_in_place(path: Path, payload: Any) -> bool:
    data = json.dumps(payload, separators=(",", ":"), default=str).encode() + b"\n"
    try:
        if len(data) > path.stat().st_size:
            return False
        with path.open("r+b") as fh:
            fh.write(data)
            fh.truncate()
        return True
    except OSError:
        return False
