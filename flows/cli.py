"""The `digits` command line: `digits run` (the Prefect flow in-process) and one command per stage.

Per-stage commands call the stages directly, without Prefect's start-up cost. Exit codes: 0 done,
2 bad input or usage (one line on stderr), 1 anything else (a bug: traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from components.tensorflow_runtime import import_tensorflow
from flows.local_api import LocalAPI
from schemas.config import PipelineConfig, Pipeline, apply_overrides, default_config
from schemas.dataset import Source
from schemas.errors import DigitsInputError, ServiceUnavailable
from schemas.runs import RunFolder, list_runs

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="digits: a TFX-style, Prefect-orchestrated pipeline for handwritten digits.")
console = Console(highlight=False, soft_wrap=True)  # paths and run ids are never broken across lines

SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="override a config field, e.g. --set ingest.limit=500 (repeatable)")]
RunOption = Annotated[Optional[str], typer.Option("--run", help="run id (default: the newest run)")]
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
    require_promotion: Annotated[bool, typer.Option(
        "--require-promotion", help="exit 3 when the evaluation gate refuses to promote the model")] = False,
) -> None:
    """Run a whole pipeline through the Prefect flow `digits` (ephemeral API), in this process."""
    config = _config(pipeline, data, overrides)
    api = LocalAPI.launch()  # boots while TensorFlow and Prefect are imported
    from flows.stages import start_run

    _run_flow(start_run(config), config, require_promotion, api)


@app.command()
def resume(
    run_id: Annotated[Optional[str], typer.Argument(help="the run to resume (default: the newest run)")] = None,
    require_promotion: Annotated[bool, typer.Option(
        "--require-promotion", help="exit 3 when the evaluation gate refuses to promote the model")] = False,
) -> None:
    """Run a failed or interrupted run's flow again in its own folder, with its recorded config: stages
    it completed are skipped, the failed one runs again (training continues from its last checkpoint)."""
    from flows import stages

    folder = RunFolder.open(run_id)
    _run_flow(folder, stages.config_of(folder), require_promotion, LocalAPI.launch())


def _run_flow(folder: RunFolder, config: PipelineConfig, require_promotion: bool, api: LocalAPI | None) -> None:
    console.print(f"[bold]run[/] {folder.run_id}\n[bold]folder[/] {folder.root}")
    import_tensorflow()  # every pipeline needs it (convert, train); imported while the API server boots
    from flows import pipeline as prefect_pipeline

    if api is not None:
        api.connect()
    prefect_pipeline.console_logs_to_stdout()
    try:
        prefect_pipeline.digits(config, run_id=folder.run_id)
    except ServiceUnavailable as exc:
        raise ServiceUnavailable(f"{exc}; then `digits resume {folder.run_id}`") from None
    finally:
        _print_stages(folder)
    record = folder.load()
    if require_promotion and not record.promoted:
        print(f"digits: not promoted: {record.promotion_reason}", file=sys.stderr)
        sys.exit(3)


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
def validate(run_id: RunOption = None, overrides: SetOption = None) -> None:
    """Validate a run's ingested data with its Great Expectations suites; stop (exit 2) on failures."""
    from flows import stages

    validation = _on_run("validate", run_id, overrides, lambda folder, config, progress: stages.validate(
        folder, config, stages.examples_of(folder), progress=progress))
    state = "[green]passed[/]" if validation.passed else "[yellow]failed, recorded as warnings[/]"
    console.print(f"validation {state}: {validation.evaluated} expectations\n[bold]report[/] {validation.report}")


@app.command()
def convert(run_id: RunOption = None, overrides: SetOption = None) -> None:
    """Convert a run's validated data into sharded TFRecords (train/val split + test) with Apache Beam."""
    from flows import stages

    converted = _on_run("convert", run_id, overrides, stages.convert)
    rows = ", ".join(f"{split} {n:,} ({converted.shards[split]} shards)" for split, n in converted.counts.items())
    how = f"reused from {converted.reused_from}" if converted.reused_from else f"on {converted.runner}"
    console.print(f"[green]converted[/] {rows} {how}\n[bold]fingerprint[/] {converted.fingerprint}\n"
                  f"[bold]folder[/] {converted.dir}")


@app.command()
def train(run_id: RunOption = None, overrides: SetOption = None) -> None:
    """Train the configured model on a run's TFRecords; an interrupted training resumes where it stopped."""
    from flows import stages

    trained = _on_run("train", run_id, overrides, stages.train, spinner=False)  # epoch lines stay on screen
    console.print(f"[green]trained[/] {trained.model}: val_accuracy {trained.val_accuracy:.2%} "
                  f"({trained.epochs} epochs, {trained.seconds:.1f} s this attempt)\n[bold]model[/] {trained.path}")


@app.command()
def evaluate(run_id: RunOption = None, overrides: SetOption = None) -> None:
    """Evaluate a run's model on its validation split, gate it, and register it when it passes."""
    from flows import stages

    def evaluate_and_register(folder, config, progress):
        evaluation = stages.evaluate(folder, config, progress=progress)
        return evaluation, *stages.register(folder, config, evaluation, progress=progress)

    evaluation, version, promoted = _on_run("evaluate", run_id, overrides, evaluate_and_register)
    state = "[green]passed[/]" if evaluation.passed else "[yellow]refused[/]"
    console.print(f"val_accuracy {evaluation.val_accuracy:.2%}; gate {state}: {evaluation.reason}")
    if version:
        console.print(f"registered version {version}" + (" [green]champion[/]" if promoted else ""))
    console.print(f"[bold]report[/] {evaluation.report}")


@app.command()
def export(run_id: RunOption = None, overrides: SetOption = None) -> None:
    """Write a run's submission.csv and export its model (SavedModel + .keras), checked in a fresh process."""
    from flows import stages

    exported = _on_run("export", run_id, overrides, stages.export)
    console.print(f"[green]exported[/] {exported.test_rows:,} test rows; {exported.model} agreed with the in-flow "
                  f"predictions on {exported.infra_rows} rows in a fresh process\n"
                  f"[bold]submission[/] {exported.submission_path}\n[bold]model[/] {exported.dir / exported.model}")


def _on_run(stage: str, run_id: str | None, overrides: list[str] | None, call: Callable, *, spinner: bool = True):
    """One stage command: open the run (default: the newest) with this command's --set overrides, run
    call(folder, config, progress) under a spinner (or printing each progress line), mark the run done."""
    from flows import stages

    folder, config = _open_run(run_id, overrides)
    if spinner:
        with console.status(stage) as status:
            result = call(folder, config, lambda message: status.update(f"{stage}: {message}"))
    else:
        result = call(folder, config, lambda message: console.print(f"{stage}: {message}"))
    stages.finish_run(folder)
    return result


@app.command()
def predict(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, a .keras file or an "
                                                  "exported saved_model folder")],
    images: Annotated[list[Path], typer.Argument(help="PNG/JPEG files of one handwritten digit each")],
) -> None:
    """Classify images of handwritten digits: label and probability per image.

    Each image is prepared the way MNIST was made: grayscale, light ink on dark (inverted when the
    background is light), cropped to the ink, fitted in 20x20 and centred by centre of mass in 28x28.
    """
    from components import predict as predict_component
    from flows import stages

    batch = predict_component.prepare_files(images)  # bad images fail before the model is loaded
    model = predict_component.load(model_uri, stages.registry)
    rows = [(str(path), str(label), f"{probability:.4f}")
            for path, (label, probability) in zip(images, predict_component.classify(model, batch))]
    _print_rows([Column("image", overflow="fold"), Column("label"), Column("probability")], rows)


@app.command()
def serve() -> None:
    """Serve the deployments train-kaggle, train-mnist and train-noisy (schedules and parameters from
    infra/prefect.yaml) from this process, for users without a work pool and worker; Ctrl-C stops."""
    from flows import deployments

    deployments.definitions()  # a broken file is one line, before Prefect starts
    from flows.pipeline import console_logs_to_stdout

    console_logs_to_stdout()
    deployments.serve()


registry_app = typer.Typer(help="the MLflow model registry: digits-kaggle, digits-mnist, digits-noisy",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("list")
def registry_list() -> None:
    """Registered models with their champion and number of versions."""
    from flows import stages

    reg = stages.registry()
    rows = []
    for name in reg.names():
        champion = reg.champion(name)
        rows.append((name, champion.version if champion else "-", str(len(reg.versions(name)))))
    _print_rows([Column("model", no_wrap=True), Column("champion"), Column("versions")], rows)


@registry_app.command("show")
def registry_show(name: Annotated[str, typer.Argument(help="e.g. digits-mnist")]) -> None:
    """Every version of a model: aliases, val accuracy, run id, lineage."""
    from flows import stages

    versions = stages.registry().versions(name)
    if not versions:
        raise DigitsInputError(f"no registered model '{name}' (see `digits registry list`)")
    _print_rows([Column("version"), Column("aliases"), Column("val_accuracy"), Column("model"),
                 Column("run id", no_wrap=True), Column("data", no_wrap=True)],
                [(v.version, ",".join(v.aliases), v.tags.get("digits.val_accuracy", ""), v.tags.get("digits.model", ""),
                  v.tags.get("digits.run_id", ""), v.tags.get("digits.data_fingerprint", "")[:12]) for v in versions])


@registry_app.command("promote")
def registry_promote(name: Annotated[str, typer.Argument()], version: Annotated[str, typer.Argument()]) -> None:
    """Make VERSION the champion (the replaced champion stays a version; `rollback` returns to it)."""
    from flows import stages

    promoted = stages.registry().promote(name, version)
    console.print(f"{name}: champion is now version {promoted.version}")


@registry_app.command("rollback")
def registry_rollback(name: Annotated[str, typer.Argument()]) -> None:
    """Move champion back to the version the current champion replaced."""
    from flows import stages

    restored = stages.registry().rollback(name)
    console.print(f"{name}: champion is back to version {restored.version}")


@app.command()
def reports(run_id: Annotated[Optional[str], typer.Argument(help="a run id (default: list runs, newest last)")] = None) -> None:
    """List runs, or print where one run's reports are."""
    if run_id is None:
        rows = [(r.run_id, r.pipeline, r.status, " ".join(f"{name}:{s.status}" for name, s in r.stages.items()))
                for r in (folder.load() for folder in list_runs())]
        _print_rows([Column("run id", no_wrap=True), Column("pipeline", no_wrap=True), Column("status"),
                     Column("stages", overflow="fold")], rows)
        return
    folder = RunFolder.open(run_id)
    for label, path in (("EDA", folder.stage_dir("ingest") / "eda"),
                        ("rejected rows", folder.stage_dir("ingest") / "rejected.csv"),
                        ("validation report", folder.stage_dir("validate") / "index.html"),
                        ("convert manifest", folder.stage_dir("convert") / "manifest.json"),
                        ("model", folder.stage_dir("train") / "model.keras"),
                        ("TensorBoard logs", folder.stage_dir("train") / "logs"),
                        ("fine-tuned model", folder.stage_dir("transfer") / "model.keras"),
                        ("TensorBoard logs", folder.stage_dir("transfer") / "logs"),
                        ("evaluation report", folder.stage_dir("evaluate") / "report.html"),
                        ("submission", folder.stage_dir("export") / "submission.csv"),
                        ("SavedModel", folder.stage_dir("export") / "saved_model")):
        if path.exists():
            console.print(f"{label}: {path}")
    console.print(f"run.json: {folder.path}")


def _open_run(run_id: str | None, overrides: list[str] | None):
    """A run (default: the newest) and its recorded config with this command's --set overrides applied
    (and recorded)."""
    from flows import stages

    folder = RunFolder.open(run_id)
    config = apply_overrides(stages.config_of(folder), list(overrides or []))
    if overrides:  # run.json records the config the run's stages were last run with (`digits resume` uses it)
        folder.update(lambda record: setattr(record, "config", config.model_dump(mode="json")))
    return folder, config


def _print_rows(columns: list[Column], rows: list[tuple[str, ...]]) -> None:
    """A table on a terminal; piped, one tab-separated line per row with nothing cut."""
    if not console.is_terminal:
        for row in rows:
            print("\t".join(row))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _print_stages(folder: RunFolder) -> None:
    record = folder.load()
    table = Table("stage", "status", "seconds", title=f"run {record.status}")
    for name, stage in record.stages.items():
        table.add_row(name, stage.status, f"{stage.seconds:.1f}" if stage.seconds is not None else "")
    console.print(table)


def main() -> None:
    """Console-script entry point: bad input and usage errors are one line and exit 2; an unreachable
    tracking server is one line and exits 1; --require-promotion refused exits 3."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # typer (pinned) vendors click as typer._click: its usage errors come here, to be one line as well
    from typer import Abort
    from typer._click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = app(standalone_mode=False, prog_name="digits")
    except NoArgsIsHelpError:
        sys.exit(2)  # `digits` alone: the help was printed
    except UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "digits"
        message = " ".join(exc.format_message().replace("Value error, ", "").split())
        print(f"digits: error: {message} (see `{command} --help`)", file=sys.stderr)
        sys.exit(2)
    except Abort:
        print("digits: aborted", file=sys.stderr)
        sys.exit(130)
    except DigitsInputError as exc:
        print(f"digits: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except ServiceUnavailable as exc:
        print(f"digits: error: {exc}", file=sys.stderr)
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
