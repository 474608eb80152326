"""The stage runner: the one place a stage runs, is reused, goes stale and is recorded. No Prefect here:
the flow's tasks (flows.pipeline) and the per-stage CLI commands both call `run_stage`.

A stage writes into `<run>/.<stage>.tmp-<id>/` (`.<stage>.inprogress/` when it resumes) and that folder
is renamed to `<run>/<stage>/` only when the stage's function returned; a failed or killed stage leaves
no `<stage>/` folder a later stage could read. run.json records every attempt: status, seconds, the
stage's key, its output's digest and summary.

Reuse — one mechanism, keyed by content (schemas.stages): a stage this run already completed with an
equal key is skipped; a `content` stage completed by another run with an equal key is adopted (its
folder hard-linked into this run, `cached_from` recorded) through the index `$DIGITS_HOME/cache/`.
A stage run again with a different output makes every stage downstream of it (schemas.stages.GRAPH)
stale: kept, never read, re-run by `digits resume`.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import schemas.stages
from components.tensorflow_runtime import release_memory
from schemas.artifacts import Artifact
from schemas.config import PipelineConfig
from schemas.errors import DamagedArtifact, DigitsInputError, OutOfSpace
from schemas.runs import (RunFolder, RunRecord, StageRecord, digits_home, link_or_copy, this_process, utc_now,
                          write_json_atomic)
from schemas.stages import Stage

A = TypeVar("A", bound=Artifact)
Progress = Callable[[str], None]
KEY_FORMAT = 2  # bump when keys change meaning, so older cache entries stop matching
CACHE = "cache"  # under $DIGITS_HOME: <key>.json -> the run and stage that made that output


@dataclass(frozen=True)
class Outcome:
    artifact: Artifact
    how: Literal["ran", "skipped", "cached"]  # skipped: done in this run; cached: adopted from another run
    source: Path | None = None  # the stage folder a cached output was adopted from


def resolve(ref: str | Callable) -> Callable:
    """A `module:function` reference of the stage graph, imported now; a callable as it is."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def stage_key(stage: Stage, config: PipelineConfig, inputs: dict[str, Artifact]) -> str | None:
    """The stage's key: equal keys, equal outputs. None when an input's content is unknown (a download)."""
    external = None
    if stage.external is not None:
        external = resolve(stage.external)(config)
        if external is None:
            return None
    payload = [KEY_FORMAT, stage.name, stage.code_digest(), stage.settings_of(config),
               {name: artifact.digest for name, artifact in inputs.items()}, external]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def run_stage(folder: RunFolder, stage: Stage, config: PipelineConfig, inputs: dict[str, Artifact], *,
              progress: Progress = lambda _: None, on_output: Callable[[Artifact], None] | None = None,
              force: bool = False) -> Outcome:
    """Run one stage of a run on its input artifacts, or reuse its output; record it in run.json.

    on_output(artifact) runs once the output is in place, before the stage's `after` hook (which may
    stop the run): the flow publishes its Prefect artifacts there, so a failing validation's report
    is still shown. force: run the body even when this run completed the stage with an equal key or
    another run's output could be adopted (the old output is replaced only when the new one is in place).
    """
    try:
        key = stage_key(stage, config, inputs)  # may read the input (a source's layout and fingerprint)
    except BaseException as exc:
        _fail(folder, stage.name, _first_line(exc), None)
        raise
    done = None if force else _completed_here(folder, stage, key)
    if done is not None:
        progress(f"{stage.name}: already completed in this run, skipped")
        outcome = Outcome(done, "skipped")
    else:
        earlier = _cached(stage, key) if stage.reuse == "content" and key and not force else None
        if earlier is not None:
            progress(f"{stage.name}: reusing {earlier.dir} (same inputs, settings and code)")
            adopted = execute(folder, stage.name, lambda out: _link(earlier, out), key=key,
                              notes={"cached_from": str(earlier.dir)})
            outcome = Outcome(adopted, "cached", earlier.dir)
        else:
            body = resolve(stage.run)
            try:
                artifact = execute(folder, stage.name, lambda out: body(folder, config, out, progress, **inputs),
                                   resumable=stage.resumable, key=key)
            finally:
                release_memory()  # what the stage freed goes back to the system before the next stage grows
            outcome = Outcome(artifact, "ran")
            if stage.reuse == "content" and key:  # the run that made it: adopters hold links to it
                _index(key, folder, stage.name)
    if on_output is not None:
        on_output(outcome.artifact)
    if stage.after is not None and outcome.how != "skipped":
        try:
            resolve(stage.after)(folder, config, outcome.artifact)
        except BaseException as exc:
            _fail(folder, stage.name, _first_line(exc), None)
            raise
    return outcome


def _damaged(folder: RunFolder, exc: DamagedArtifact) -> DamagedArtifact:
    """A stage read a file its producer did not write (checked where it is read: schemas.artifacts). When
    that producer is a stage of this run, it is marked stale, so `digits resume` makes its output again;
    returns the error to show, with that hint."""
    path = Path(exc.path)
    try:
        producer = path.relative_to(folder.root).parts[0]
    except ValueError:
        return exc  # another run's output (a cache adoption verifies before it links)

    def damaged(record: RunRecord) -> None:
        if producer in record.stages:
            record.stages[producer].status, record.stages[producer].error = "stale", str(exc)
    folder.update(damaged)
    _write_page(folder)
    return DamagedArtifact(path, f"{str(exc).removeprefix(exc.path + ': ')}; `digits resume {folder.run_id}` "
                                 f"makes {producer}'s output again")


def execute(folder: RunFolder, stage: str, body: Callable[[Path], A], *, resumable: bool = False,
            key: str | None = None, notes: dict[str, Any] | None = None) -> A:
    """Run body(temp_dir) and rename temp_dir to the stage folder when it returns; record the outcome
    (key, the output's digest and summary, `notes` beside it).

    resumable: the temp folder is `.<stage>.inprogress` and survives a failed or killed attempt, so the
    next attempt's body can continue from what it left (training checkpoints); it is still renamed
    into place only when the body returns, and no later stage reads it.
    """
    final = folder.stage_dir(stage)
    for stale in folder.root.glob(f".{stage}.tmp-*"):  # left by a killed process; never read
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.root / (f".{stage}.inprogress" if resumable else f".{stage}.tmp-{uuid.uuid4().hex[:8]}")
    previous = folder.load().stages.get(stage)
    folder.update(lambda r: _mark(r, stage, StageRecord(status="running", started_at=utc_now())))
    started = time.perf_counter()
    try:
        artifact = body(tmp)
        if final.exists():  # a re-run replaces the old output: move it aside, then swap
            old = folder.root / f".{stage}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)
        _fail(folder, stage, _first_line(exc), round(time.perf_counter() - started, 3),
              keep=previous if previous is not None and previous.status == "completed" and final.is_dir() else None)
        if isinstance(exc, DamagedArtifact):
            raise _damaged(folder, exc) from None
        if _out_of_space(exc):
            raise OutOfSpace(f"no space left on the device holding {folder.root} ({stage} stage): free some "
                             "space, then run it again") from None
        raise
    artifact = artifact.moved_to(final).with_content_hashed()
    seconds = round(time.perf_counter() - started, 3)
    changed = previous is None or previous.hashes != artifact.hashes

    def completed(record: RunRecord) -> None:
        stage_record = record.stages[stage]
        stage_record.status, stage_record.finished_at, stage_record.seconds = "completed", utc_now(), seconds
        stage_record.key, stage_record.hashes = key, artifact.hashes
        stage_record.outputs = {**artifact.summary(), **(notes or {})}
        fingerprints = getattr(artifact, "fingerprints", None)
        if isinstance(fingerprints, dict):  # the input files a source stage read
            record.data_fingerprints.update(fingerprints)
        if changed:
            _stale_downstream(record, stage)

    folder.update(completed)
    _write_page(folder)
    return artifact


def _stale_downstream(record: RunRecord, stage: str) -> None:
    """A stage whose output changed makes the completed stages downstream of it stale: they were made from
    its old output. Their folders stay (nothing is lost) but no later stage reads them, and a resumed run
    re-runs them; the run-level facts they recorded (e.g. the promotion) no longer stand."""
    graph = schemas.stages.GRAPH
    if stage not in graph.names():
        return
    for later in graph.downstream(stage):
        later_record = record.stages.get(later)
        if later_record is not None and later_record.status == "completed":
            later_record.status, later_record.error = "stale", f"{stage} was run again after it"
            for field in graph.stage(later).run_fields:
                setattr(record, field, None)


def _mark(record: RunRecord, stage: str, stage_record: StageRecord) -> None:
    record.stages[stage] = stage_record
    record.status, record.process = "running", this_process()


def _fail(folder: RunFolder, stage: str, message: str, seconds: float | None, keep: StageRecord | None = None) -> None:
    """Record a failed attempt: the run failed. keep: the stage's earlier completed record, whose output is
    untouched (the attempt never replaced it) and stays the stage's output, with the attempt's error noted."""
    def failed(record: RunRecord) -> None:
        record.status = "failed"
        if keep is not None:
            record.stages[stage] = keep.model_copy(update={"error": f"a later attempt failed: {message}"})
            return
        stage_record = record.stages.get(stage) or StageRecord(status="failed", started_at=utc_now())
        record.stages[stage] = stage_record
        stage_record.status, stage_record.error = "failed", message
        stage_record.finished_at = utc_now()
        if seconds is not None:
            stage_record.seconds = seconds

    folder.update(failed)
    _write_page(folder)


def _out_of_space(exc: BaseException) -> bool:
    """A full disk, however it surfaced: an OSError, or a library's own error (Beam, TensorFlow) that wraps
    it and keeps only its message."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(os.strerror(code) in str(exc) for code in (errno.ENOSPC, errno.EDQUOT))


def fail_run(folder: RunFolder, reason: str) -> None:
    """Mark a run failed when something outside its stages failed (its status must not stay `running`)."""
    def failed(record: RunRecord) -> None:
        if record.status == "running":
            record.status = "failed"
            record.warnings.append(f"failed outside its stages: {reason}")
    try:
        folder.update(failed)
        _write_page(folder)
    except (OSError, DigitsInputError):
        pass  # the run's folder is gone, damaged or on a full disk: nothing more can be recorded


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _completed_here(folder: RunFolder, stage: Stage, key: str | None) -> Artifact | None:
    record = folder.load().stages.get(stage.name)
    if record is None or record.status != "completed" or not folder.stage_dir(stage.name).is_dir():
        return None
    if key is not None and record.key != key:
        return None
    return stage.artifact.load(folder.stage_dir(stage.name), record.outputs, record.hashes)


def _link(earlier: Artifact, out: Path) -> Artifact:
    shutil.copytree(earlier.dir, out, copy_function=link_or_copy)
    return earlier.moved_to(out)


def _cache_entry(key: str) -> Path:
    return digits_home() / CACHE / f"{key}.json"


def _index(key: str, folder: RunFolder, stage: str) -> None:
    write_json_atomic(_cache_entry(key), {"run_id": folder.run_id, "stage": stage})


def _cached(stage: Stage, key: str) -> Artifact | None:
    """The output another run made with this key, when it is still there and still complete."""
    entry = _cache_entry(key)
    try:
        found = json.loads(entry.read_text())
        earlier = RunFolder(digits_home() / "runs" / found["run_id"])
        record = earlier.load().stages[found["stage"]]
    except (OSError, ValueError, KeyError, TypeError, DigitsInputError):  # gone, or its run.json damaged
        return None
    stage_dir = earlier.stage_dir(found["stage"])
    earlier_output = stage.artifact.load(stage_dir, record.outputs, record.hashes)
    try:
        if record.status != "completed" or record.key != key or not stage_dir.is_dir():
            raise DamagedArtifact(stage_dir, "gone")
        earlier_output.verify()
    except DamagedArtifact:
        entry.unlink(missing_ok=True)  # its run was deleted, its stage re-run or its files changed
        return None
    return earlier_output


def output_of(folder: RunFolder, stage: str) -> Artifact:
    """A completed stage's artifact, for a command that starts from a run id: never one that failed, is
    half-written or stale. Raises DigitsInputError saying what to run."""
    graph = schemas.stages.GRAPH
    record = folder.load().stages.get(stage)
    if record is not None and record.status == "stale":
        command = graph.stage(stage).cli_command
        raise DigitsInputError(f"run {folder.run_id}'s {stage} stage is stale ({record.error}): run "
                               f"`digits {command} --run {folder.run_id}`, or `digits resume {folder.run_id}`")
    if record is not None and record.status == "failed":
        raise DigitsInputError(f"run {folder.run_id}'s {stage} stage failed ({record.error}): once its cause is "
                               f"fixed, run `digits {graph.stage(stage).cli_command} --run {folder.run_id}`")
    if record is None or record.status != "completed" or not folder.stage_dir(stage).is_dir():
        raise DigitsInputError(f"run {folder.run_id} has no completed {stage} stage")
    return graph.stage(stage).artifact.load(folder.stage_dir(stage), record.outputs, record.hashes)


def inputs_of(folder: RunFolder, stage: Stage, config: PipelineConfig) -> dict[str, Artifact]:
    """The artifacts a stage consumes, from the stages of this run that produced them."""
    graph = schemas.stages.GRAPH
    return {name: output_of(folder, graph.producer(name, config, before=stage.name).name)
            for name in graph.consumed(stage, config)}


def finish_run(folder: RunFolder) -> RunRecord:
    """Mark the run completed (with warnings when a stage recorded any)."""
    def done(record: RunRecord) -> None:
        record.status = "completed_with_warnings" if record.warnings else "completed"
    record = folder.update(done)
    _write_page(folder)
    return record


def _write_page(folder: RunFolder) -> None:
    """Rewrite the run's entry page; best effort (on a full disk the record matters, the page is
    written again by the next update or `digits reports RUN`)."""
    from components import run_page

    try:
        run_page.write(folder, schemas.stages.GRAPH)
    except OSError:
        pass
