"""The `digits` command line: `digits run` (the Prefect flow in-process) and one command per stage.

Per-stage commands call the stages directly, without Prefect's start-up cost. Exit codes: 0 done,
2 bad input or usage (one line on stderr), 1 anything else (a bug: traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from schemas.config import PipelineConfig, Pipeline, apply_overrides, default_config
from schemas.dataset import Source
from schemas.errors import DigitsInputError
from schemas.runs import RunFolder, list_runs

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="digits: a TFX-style, Prefect-orchestrated pipeline for handwritten digits.")
console = Console(highlight=False, soft_wrap=True)  # paths and run ids are never broken across lines

SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="override a config field, e.g. --set ingest.limit=500 (repeatable)")]
DataOption = Annotated[Optional[Path], typer.Option(
    "--data", help="input data: a file or folder (see `digits run --help`)")]


def _config(pipeline: Pipeline | str, data: Path | None, overrides: list[str] | None) -> PipelineConfig:
    pairs = list(overrides or [])
    if data is not None:
        pairs.insert(0, f"ingest.data={data.expanduser().resolve()}")
    return apply_overrides(default_config(pipeline), pairs)


@app.command()
def run(
    pipeline: Annotated[Pipeline, typer.Argument(help="train-kaggle | train-mnist | train-noisy")],
    data: DataOption = None,
    overrides: SetOption = None,
) -> None:
    """Run a whole pipeline through the Prefect flow `digits` (ephemeral API), in this process."""
    config = _config(pipeline, data, overrides)
    from flows import pipeline as prefect_pipeline
    from flows.stages import start_run

    folder = start_run(config)
    console.print(f"[bold]run[/] {folder.run_id}\n[bold]folder[/] {folder.root}")
    prefect_pipeline.console_logs_to_stdout()
    try:
        prefect_pipeline.digits(config, run_id=folder.run_id)
    finally:
        _print_stages(folder)


@app.command()
def ingest(
    source: Annotated[Source, typer.Option("--source", help="kaggle | mnist | noisy")],
    data: DataOption = None,
    overrides: SetOption = None,
) -> None:
    """Start a new run with only the ingest stage: canonical Parquet per split + EDA."""
    from flows import stages

    config = _config(Pipeline.for_source(source), data, overrides)
    folder = stages.start_run(config)
    console.print(f"[bold]run[/] {folder.run_id}")
    with console.status("ingest") as status:
        examples = stages.ingest(folder, config, progress=lambda msg: status.update(f"ingest: {msg}"))
    stages.finish_run(folder)
    rows = ", ".join(f"{split} {n:,}" + (f" ({examples.rejected[split]:,} rejected)" if examples.rejected[split] else "")
                     for split, n in examples.counts.items())
    console.print(f"[green]ingested[/] {rows}\n[bold]folder[/] {examples.dir}")


@app.command()
def validate(run_id: Annotated[Optional[str], typer.Option("--run", help="run id (default: the newest run)")] = None,
             overrides: SetOption = None) -> None:
    """Validate a run's ingested data with its Great Expectations suites; stop (exit 2) on failures."""
    from flows import stages

    folder = RunFolder.open(run_id)
    config = apply_overrides(stages.config_of(folder), list(overrides or []))
    examples = stages.examples_of(folder)
    with console.status("validate") as status:
        validation = stages.validate(folder, config, examples, progress=lambda m: status.update(f"validate: {m}"))
    stages.finish_run(folder)
    state = "[green]passed[/]" if validation.passed else "[yellow]failed, recorded as warnings[/]"
    console.print(f"validation {state}: {validation.evaluated} expectations\n[bold]report[/] {validation.report}")


@app.command()
def convert(run_id: Annotated[Optional[str], typer.Option("--run", help="run id (default: the newest run)")] = None,
            overrides: SetOption = None) -> None:
    """Convert a run's validated data into sharded TFRecords (train/val split + test) with Apache Beam."""
    from flows import stages

    folder = RunFolder.open(run_id)
    config = apply_overrides(stages.config_of(folder), list(overrides or []))
    with console.status("convert") as status:
        converted = stages.convert(folder, config, progress=lambda m: status.update(f"convert: {m}"))
    stages.finish_run(folder)
    rows = ", ".join(f"{split} {n:,} ({converted.shards[split]} shards)" for split, n in converted.counts.items())
    how = f"reused from {converted.reused_from}" if converted.reused_from else f"on {converted.runner}"
    console.print(f"[green]converted[/] {rows} {how}\n[bold]fingerprint[/] {converted.fingerprint}\n"
                  f"[bold]folder[/] {converted.dir}")


@app.command()
def train(run_id: Annotated[Optional[str], typer.Option("--run", help="run id (default: the newest run)")] = None,
          overrides: SetOption = None) -> None:
    """Train the configured model on a run's TFRecords; an interrupted training resumes where it stopped."""
    from flows import stages

    folder = RunFolder.open(run_id)
    config = apply_overrides(stages.config_of(folder), list(overrides or []))
    trained = stages.train(folder, config, progress=lambda m: console.print(f"train: {m}"))
    stages.finish_run(folder)
    console.print(f"[green]trained[/] {trained.model}: val_accuracy {trained.val_accuracy:.2%} "
                  f"({trained.epochs} epochs, {trained.seconds:.1f} s this attempt)\n[bold]model[/] {trained.path}")


@app.command()
def reports(run_id: Annotated[Optional[str], typer.Argument(help="a run id (default: list runs, newest last)")] = None) -> None:
    """List runs, or print where one run's reports are."""
    if run_id is None:
        rows = [(r.run_id, r.pipeline, r.status, " ".join(f"{name}:{s.status}" for name, s in r.stages.items()))
                for r in (folder.load() for folder in list_runs())]
        if not console.is_terminal:  # piped: one tab-separated line per run, nothing cut
            for row in rows:
                print("\t".join(row))
            return
        table = Table(Column("run id", no_wrap=True), Column("pipeline", no_wrap=True), "status",
                      Column("stages", overflow="fold"))
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    folder = RunFolder.open(run_id)
    for label, path in (("EDA", folder.stage_dir("ingest") / "eda"),
                        ("rejected rows", folder.stage_dir("ingest") / "rejected.csv"),
                        ("validation report", folder.stage_dir("validate") / "index.html"),
                        ("evaluation report", folder.stage_dir("evaluate") / "report.html")):
        if path.exists():
            console.print(f"{label}: {path}")
    console.print(f"run.json: {folder.path}")


def _print_stages(folder: RunFolder) -> None:
    record = folder.load()
    table = Table("stage", "status", "seconds", title=f"run {record.status}")
    for name, stage in record.stages.items():
        table.add_row(name, stage.status, f"{stage.seconds:.1f}" if stage.seconds is not None else "")
    console.print(table)


def main() -> None:
    """Console-script entry point: render user-caused errors as one line and exit 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        app()
    except DigitsInputError as exc:
        print(f"digits: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
