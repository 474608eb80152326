"""The `digits` command line: `digits run` (the Prefect flow in-process) and one command per stage.

The per-stage commands are made from the stage graph (schemas.stages.GRAPH) when the command line is
built: each runs its stages through the stage runner directly, without Prefect's start-up cost. Exit
codes: 0 done, 2 bad input or usage (one line on stderr), 1 anything else (a bug: traceback).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Column, Table

import schemas.stages
from components.tensorflow_runtime import import_tensorflow
from flows import setup
from flows.local_api import LocalAPI
from schemas.config import Pipeline, PipelineConfig, apply_overrides, default_config
from schemas.errors import DigitsInputError, OutOfSpace, ServiceUnavailable, chain
from schemas.presets import PRESETS, preset
from schemas.runs import RunFolder, digits_home, scan_runs
from schemas.sources import SOURCES, Source

console = Console(highlight=False, soft_wrap=True)  # paths and run ids are never broken across lines

SET_HELP = "override a setting, SECTION.KEY=VALUE (repeatable; a wrong key says what it may have meant)"
SetOption = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help=SET_HELP)]
SET_EXAMPLES = {"validate": "validate.fail_on=warn", "convert": "convert.val_fraction=0.2", "tune": "tune.trials=10",
                "train": "train.epochs=3", "evaluate": "evaluate.threshold=0.98", "export": "seed=7"}
RunOption = Annotated[Optional[str], typer.Option("--run", help="run id (default: the newest run)")]
ForceOption = Annotated[bool, typer.Option("--force", help="run the stage again even when this run completed it "
                                                           "with the same inputs, settings and code (stages "
                                                           "downstream go stale when its output changes)")]
DataOption = Annotated[Optional[Path], typer.Option(
    "--data", help="input data, a file or folder: " + "; ".join(f"{s.name}: {s.data_help}" for s in SOURCES))]
PipelineArgument = Annotated[Pipeline, typer.Argument(
    help=" | ".join(f"{s.pipeline} ({s.title})" for s in SOURCES))]


PresetOption = Annotated[Optional[str], typer.Option(
    "--preset", help="a named set of settings, applied before --set: " + "; ".join(f"{p.name}: {p.help}"
                                                                                for p in PRESETS))]


def _config(pipeline: Pipeline | str, data: Path | None, overrides: list[str] | None,
            preset_name: str | None = None) -> PipelineConfig:
    """The config of a new run, its --data checked against the source's layout (without reading it): a wrong
    --data is one line before any run folder is made or Prefect starts."""
    pairs = list(overrides or [])
    if data is not None:
        pairs.insert(0, f"ingest.data={data.expanduser().resolve()}")
    if preset_name is not None:
        pairs[:0] = preset(preset_name).overrides
    config = apply_overrides(default_config(pipeline), pairs)
    if config.ingest.review:  # a label-review file: read and checked now (its ids against the data on ingest)
        from components.ingest import review

        config.ingest.review = str(Path(config.ingest.review).expanduser().resolve())
        review.read(Path(config.ingest.review))
    _check_services(config)
    if config.ingest.data:
        from components.ingest import input_files

        input_files(config.source, Path(config.ingest.data))
    elif config.source.spec.needs_data:
        raise DigitsInputError(f"{config.pipeline.value} needs --data: {config.source.spec.data_help}")
    return config


def _check_services(config: PipelineConfig) -> None:
    """What a run will talk to, checked in seconds before any work: the registry's store (a home that cannot hold
    its SQLite file, a tracking server that is down), the Dask scheduler of dask.address and tune's database."""
    from components.reach import check_scheduler
    from components.tracking import check_reachable, tracking_uri

    check_reachable(tracking_uri(digits_home()))
    if config.dask.address:
        check_scheduler(config.dask.address)
    if config.tune.trials and config.tune.storage:
        from components.tune import check_storage

        check_storage(config.tune.storage)


def run(
    pipeline: PipelineArgument,
    data: DataOption = None,
    overrides: SetOption = None,
    preset_name: PresetOption = None,
    require_promotion: Annotated[bool, typer.Option(
        "--require-promotion", help="exit 3 when the evaluation gate refuses to promote the model")] = False,
) -> None:
    """Run a whole pipeline through the Prefect flow `digits` (ephemeral API), in this process."""
    config = _config(pipeline, data, overrides, preset_name)
    api = LocalAPI.launch()  # boots while TensorFlow and Prefect are imported
    from flows.stages import start_run

    _run_flow(start_run(config), config, require_promotion, api)


def resume(
    run_id: Annotated[Optional[str], typer.Argument(help="the run to resume (default: the newest run)")] = None,
    require_promotion: Annotated[bool, typer.Option(
        "--require-promotion", help="exit 3 when the evaluation gate refuses to promote the model")] = False,
) -> None:
    """Run a failed or interrupted run's flow again in its own folder, with its recorded config: stages
    it completed are skipped, stale and failed ones run again (training continues from its last checkpoint)."""
    from flows import stages

    folder = RunFolder.open(run_id)
    config = stages.config_of(folder)
    _check_services(config)
    _run_flow(folder, config, require_promotion, LocalAPI.launch())


def _run_flow(folder: RunFolder, config: PipelineConfig, require_promotion: bool, api: LocalAPI | None) -> None:
    from flows import runner

    console.print(f"[bold]run[/] {folder.run_id}\n[bold]folder[/] {folder.root}")
    try:
        import_tensorflow()  # every pipeline needs it (convert, train); imported while the API server boots
        from flows import pipeline as prefect_pipeline

        if api is not None:
            api.connect()
        setup.console_logs_to_stdout()
        prefect_pipeline.digits(config, run_id=folder.run_id)
    except (ServiceUnavailable, OutOfSpace) as exc:
        runner.fail_run(folder, str(exc))
        raise type(exc)(f"{exc}; then `digits resume {folder.run_id}`") from None
    except BaseException as exc:
        runner.fail_run(folder, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if _unreachable(exc):
            url = os.environ.get("PREFECT_API_URL") or "(from the Prefect profile)"
            raise ServiceUnavailable(f"Prefect API {url} unreachable: start that server, or unset PREFECT_API_URL "
                                     f"to run on a local one; then `digits resume {folder.run_id}`") from None
        raise
    finally:
        _print_stages(folder)
        _print_summary(folder)
    record = folder.load()
    if require_promotion and not record.promoted:
        print(f"digits: not promoted: {record.promotion_reason}", file=sys.stderr)
        sys.exit(3)


def _unreachable(exc: BaseException) -> bool:
    """Whether exc is (or wraps) a failure to connect to an HTTP server (Prefect's client uses httpx)."""
    return any(type(cause).__module__.startswith("httpx") and type(cause).__name__ in ("ConnectError", "ConnectTimeout")
               for cause in chain(exc))


def ingest(
    source: Annotated[Source, typer.Option("--source", help=" | ".join(s.name for s in SOURCES))],
    data: DataOption = None,
    overrides: SetOption = None,
) -> None:
    """Start a new run with only the ingest stage: canonical Parquet per split + EDA."""
    from flows import stages

    config = _config(Pipeline.for_source(source), data, overrides)
    folder = stages.start_run(config)
    console.print(f"[bold]run[/] {folder.run_id}")
    _run_stages(folder, config, [schemas.stages.GRAPH.stage("ingest")])
    console.print(f"[bold]folder[/] {folder.stage_dir('ingest')}")


def _stage_command(name: str, stages_: list):
    """The per-stage command `digits NAME [--run RUN] [--set K=V]`: runs the stages of the graph whose
    command is NAME (those that apply to the run's pipeline) on the run's upstream artifacts."""
    def command(run_id: RunOption = None, overrides: SetOption = None, force: ForceOption = False) -> None:
        folder, config = _open_run(run_id, overrides)
        applicable = [s for s in stages_ if s.applies_to(config)]
        if not applicable:  # say so, instead of printing nothing
            console.print("; ".join(s.off or f"{s.name} does not apply to this run" for s in stages_))
            return
        _run_stages(folder, config, applicable, force=force)
        if overrides:  # run.json's config is what the run's stages were last run with (`digits resume` uses it)
            folder.update(lambda record: setattr(record, "config", config.model_dump(mode="json")))

    command.__doc__ = " ".join(dict.fromkeys(s.help for s in stages_))
    command.__name__ = name
    example = SET_EXAMPLES.get(name)
    command.__annotations__ = {**command.__annotations__, "overrides": Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help=SET_HELP + (f", e.g. --set {example}" if example else ""))]}
    return command


def _run_stages(folder: RunFolder, config: PipelineConfig, stages_: list, *, force: bool = False) -> None:
    """Run stages of a run one after the other through the stage runner, showing progress (a spinner, or
    every line for stages that print per epoch), then mark the run done. force: run them even when completed."""
    from flows import runner

    for stage in stages_:
        inputs = runner.inputs_of(folder, stage, config)
        if stage.lines:  # epoch and trial lines stay on screen
            outcome = runner.run_stage(folder, stage, config, inputs, force=force,
                                       progress=lambda message, s=stage: console.print(f"{s.name}: {message}"))
        else:
            with console.status(stage.name) as status:
                outcome = runner.run_stage(folder, stage, config, inputs, force=force,
                                           progress=lambda message, s=stage: status.update(f"{s.name}: {message}"))
        how = {"ran": "", "skipped": " (already completed in this run)",
               "cached": f" (reused from {outcome.source})"}[outcome.how]
        console.print(f"[green]{stage.name}[/]{how}: {outcome.artifact.describe()}")
    runner.finish_run(folder)


def predict(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, a .keras file, or a "
                                                  "run's export/saved_model folder (a SavedModel is a TensorFlow "
                                                  "program: it is loaded only when it matches what its run recorded)")],
    images: Annotated[list[Path], typer.Argument(help="PNG/JPEG files of one handwritten digit each, or folders "
                                                      "of them")],
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="refuse larger images, from their header, "
                                            "before decoding them")] = 40_000_000,
    min_confidence: Annotated[Optional[float], typer.Option(
        "--min-confidence", min=0, max=1, help="below this probability the label is '?' and the two most likely "
                                               "digits are listed (choose it from the reliability diagram)")] = None,
    reject_ood: Annotated[bool, typer.Option(
        "--reject-ood", help="say 'not a digit' (label '-') for an image unlike every digit the model was trained "
                             "on: Mahalanobis distance on its features, fitted by the evaluate stage; it keeps about "
                             "99 % of real digits (evaluate.ood_keep)")] = False,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=10, help="also list the K most likely digits with "
                                                                      "their probabilities")] = 1,
    as_json: JsonOption = False,
) -> None:
    """Classify images of handwritten digits: label and probability per image.

    Each image is prepared the way MNIST was made: grayscale, light ink on dark (inverted when the
    background is light), cropped to the ink, fitted in 20x20 and centred by centre of mass in 28x28.
    Nothing in a model file runs as code: .keras files load in Keras' safe mode, a registry version only
    as the file and sha256 it recorded (a .joblib pickle only that way), a SavedModel only from a run's
    export/ whose files match run.json.
    """
    from components import predict as predict_component
    from flows import stages

    if model_uri.startswith("models:/"):  # a URI's syntax is checked before any image is read
        from components.registry import parse_model_uri

        parse_model_uri(model_uri)
    files = predict_component.image_files(images)
    if not files:
        raise DigitsInputError(f"{', '.join(map(str, images))}: no .png, .jpg or .jpeg images")
    files, batch, failures = predict_component.prepare_files(files, max_pixels)
    for failure in failures[:-1] if not files else failures:  # one line each; the others are still predicted
        print(f"digits: error: {failure}", file=sys.stderr)
    if not files:  # every image is bad: exit 2 before the model is loaded
        raise DigitsInputError(failures[-1] + (f" (none of the {len(failures)} images could be read)"
                                               if len(failures) > 1 else ""))
    model, judge = predict_component.load(model_uri, stages.registry, reject_ood=reject_ood)
    digit, score = judge(batch) if judge is not None else (None, None)
    ranked_all = predict_component.classify(model, batch)
    if as_json:
        found = []
        for i, (path, ranked) in enumerate(zip(files, ranked_all)):
            label, probability = ranked[0]
            abstained = min_confidence is not None and probability < min_confidence
            entry = {"image": str(path), "digit": None if abstained else label, "probability": probability,
                     "abstained": abstained, "top": [{"digit": d, "probability": q} for d, q in ranked[:top_k]],
                     "probabilities": [q for _, q in sorted(ranked)]}
            if score is not None:
                entry.update({"is_digit": bool(digit[i]), "ood_score": float(score[i])})
                entry["digit"] = entry["digit"] if digit[i] else None
            found.append(entry)
        _emit_json({"model": model_uri, "predictions": found, "failed": failures})
        if failures:
            sys.exit(1)
        return
    rows = []
    for i, (path, ranked) in enumerate(zip(files, ranked_all)):
        (label, probability), (second, second_probability) = ranked[0], ranked[1]
        row = [str(path), str(label), f"{probability:.4f}"]
        if min_confidence is not None:
            unsure = probability < min_confidence
            row[1] = "?" if unsure else row[1]
            row.append(f"{label} ({probability:.4f}) or {second} ({second_probability:.4f})" if unsure else "")
        if score is not None:
            row[1] = row[1] if digit[i] else "-"
            row.append("yes" if digit[i] else f"no (out-of-distribution score {score[i]:.1f})")
        if top_k > 1:
            row.append(" ".join(f"{d}:{q:.4f}" for d, q in ranked[:top_k]))
        rows.append(tuple(row))
    columns = [Column("image", overflow="fold"), Column("label"), Column("probability")]
    _print_rows(columns + ([Column("candidates")] if min_confidence is not None else [])
                + ([Column("digit?")] if reject_ood else []) + ([Column(f"top {top_k}")] if top_k > 1 else []), rows)
    if failures:
        sys.exit(1)


def app_command(
    model: Annotated[str, typer.Option("--model", help="the registered model to try: " + ", ".join(
        s.registry_model for s in SOURCES))] = "digits-mnist",
    alias: Annotated[str, typer.Option("--alias", help="the alias it follows: a promotion or rollback is picked up "
                                                       "at the next prediction")] = "champion",
    host: Annotated[str, typer.Option("--host", help="the address to listen on (127.0.0.1: this machine only)")]
        = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8765,
    min_confidence: Annotated[float, typer.Option(
        "--min-confidence", min=0, max=1, help="below this probability the page says 'not sure' (the model "
                                               "abstains)")] = 0.0,
) -> None:
    """Start a local web page to try a registered model: draw a digit or drop PNG/JPEG files, and see the digit,
    its ten probabilities and which version answered. Works offline; Ctrl-C stops."""
    import socket

    from components import app as app_component
    from components.registry import checked_alias, checked_name
    from flows import stages

    checked_name(model), checked_alias(alias)
    follower = app_component.Follower(stages.registry, model, alias)
    try:
        loaded = follower.current()
    except DigitsInputError as exc:
        spec = next((s for s in SOURCES if s.registry_model == model), None)
        hint = (f"run `digits run {spec.pipeline} --data DIR` to train and promote one" if spec
                else "see `digits registry list`")
        raise DigitsInputError(f"nothing to serve: {exc}; {hint}") from None
    with socket.socket() as probe:  # a port in use is one line, before uvicorn logs its own traceback
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise DigitsInputError(f"cannot listen on {host}:{port} ({exc.strerror.lower()}): choose another with "
                                   "--port") from None
    import uvicorn

    version = loaded.version
    console.print(f"digits app: http://{host}:{port}/ answers with {model}@{alias} (version {version.version}); "
                  "Ctrl-C stops")
    uvicorn.run(app_component.build(follower, min_confidence), host=host, port=port, log_level="warning")


def serve() -> None:
    """Serve the deployments of infra/prefect.yaml (one per pipeline, with their schedules and parameters)
    from this process, for users without a work pool and worker; Ctrl-C stops."""
    from flows import deployments

    deployments.definitions()  # a broken file is one line, before Prefect starts
    setup.console_logs_to_stdout()
    deployments.serve()


JsonOption = Annotated[bool, typer.Option("--json", help="print JSON (for scripts) instead of a table")]


def _emit_json(value) -> None:
    print(json.dumps(value, indent=2, default=str))


def _version_facts(version) -> dict:
    """A registry version as --json shows it: number, aliases, description, lineage, every tag."""
    from components.registration import tag
    from components.registry import MODEL_SHA256

    tags = version.tags
    return {"name": version.name, "version": version.version, "aliases": version.aliases,
            "description": version.description, "uri": version.uri,
            "val_accuracy": float(tags[tag("val_accuracy")]) if tag("val_accuracy") in tags else None,
            "model": tags.get(tag("model")), "run_id": tags.get(tag("run_id")),
            "data_fingerprint": tags.get(tag("data_fingerprint")), "model_sha256": tags.get(MODEL_SHA256),
            "tags": dict(sorted(tags.items()))}


def registry_list(as_json: JsonOption = False) -> None:
    """Registered models with their champion and number of versions."""
    from flows import stages

    from components.registry import registered_before

    reg = stages.registry()
    names = reg.names()
    if not names:
        earlier = registered_before(stages.digits_home(), reg)
        if as_json:
            _emit_json([])
            return
        print(f"no registered models in {reg.location}: a new or empty registry"
              + (f" — but this home registered {', '.join(earlier)} there: was it deleted or replaced?"
                 if earlier else ""))
        return
    found = []
    for name in names:
        champion = reg.champion(name)
        found.append({"name": name, "champion": champion.version if champion else None,
                      "versions": len(reg.versions(name))})
    if as_json:
        _emit_json(found)
        return
    _print_rows([Column("model", no_wrap=True), Column("champion"), Column("versions")],
                [(f["name"], f["champion"] or "-", str(f["versions"])) for f in found])


def registry_show(name: Annotated[str, typer.Argument(help="e.g. digits-mnist")],
                  version: Annotated[Optional[str], typer.Argument(help="one version: its details and model card")] = None,
                  as_json: JsonOption = False) -> None:
    """Every version of a model (aliases, val accuracy, run id, lineage), or one version with why it is (or is
    not) champion, when it became so, and where its model card is."""
    from flows import stages

    from components.registration import tag
    from components.registry import checked_name, checked_version

    reg = stages.registry()
    if version is not None:
        _show_version(reg, reg.resolve(f"models:/{checked_name(name)}/{checked_version(version)}"), as_json)
        return
    versions = reg.versions(name)
    if not versions and name in reg.names():
        if as_json:
            _emit_json({"name": name, "versions": []})
            return
        print(f"{name} is registered but has no versions (they were deleted); `digits run` registers new ones")
        return
    if not versions:
        raise DigitsInputError(f"no registered model '{name}' (see `digits registry list`)")
    if as_json:
        _emit_json({"name": name, "versions": [_version_facts(v) for v in versions]})
        return
    _print_rows([Column("version"), Column("aliases"), Column("val_accuracy"), Column("model"),
                 Column("run id", no_wrap=True), Column("data", no_wrap=True)],
                [(v.version, ",".join(v.aliases), v.tags.get(tag("val_accuracy"), ""), v.tags.get(tag("model"), ""),
                  v.tags.get(tag("run_id"), ""), v.tags.get(tag("data_fingerprint"), "")[:12]) for v in versions])


def _show_version(reg, version, as_json: bool = False) -> None:
    """One version's facts, its moves as champion, and where its model card is (the registry's copy, and the
    run's when on this home)."""
    from components.model_card import HTML, MARKDOWN
    from components.registration import tag
    from components.registry import MODEL_SHA256
    from schemas.runs import RunFolder

    tags = version.tags
    moves = [e for e in reg.history(version.name) if version.version in (e.get("to"), e.get("from"))]
    card = reg.location_of(version, HTML)
    local = None
    try:
        candidate = RunFolder.open(tags.get(tag("run_id"), "")).stage_dir("register") / HTML
        local = candidate if candidate.is_file() else None
    except DigitsInputError:
        pass
    if as_json:
        _emit_json({**_version_facts(version), "champion_history": moves, "model_card": card,
                    "model_card_markdown": reg.location_of(version, MARKDOWN),
                    "model_card_in_run": str(local) if local else None})
        return
    rows = [("version", version.version), ("aliases", ",".join(version.aliases) or "-")]
    rows += [("description", version.description)] if version.description else []
    shown = [(field, tag(field)) for field in ("val_accuracy", "model", "run_id", "pipeline", "base",
                                               "seen_val_images", "seen_test_images", "allow_seen_val")]
    rows += [(field, tags[key]) for field, key in [*shown, ("model_sha256", MODEL_SHA256)] if key in tags]
    rows += [("champion since" if e.get("to") == version.version else "champion until",
              f"{e.get('at')}: {e.get('why')} ({e.get('by')})") for e in moves]
    _print_rows([Column("field", no_wrap=True), Column("value", overflow="fold")], rows)
    if card is None:
        console.print(f"{version.uri} has no model card (registered before digits wrote them)")
        return
    console.print(f"model card: {card}")
    console.print(f"model card (Markdown): {reg.location_of(version, MARKDOWN)}")
    if local is not None:
        console.print(f"model card in its run: {local}")


def _by(command: str) -> str:
    """Who moved an alias by hand: the command, the user and the machine."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"digits registry {command} ({user}@{socket.gethostname()})"


ReasonOption = Annotated[str, typer.Option("--reason", help="why, kept in the model's history (`digits registry "
                                                             "history NAME`)")]


def registry_promote(name: Annotated[str, typer.Argument()], version: Annotated[str, typer.Argument()],
                     reason: ReasonOption = "") -> None:
    """Make VERSION the champion (the replaced champion stays a version; `rollback` returns to it). The move is
    kept in the model's history with the reason."""
    from flows import stages

    promoted = stages.registry().promote(name, version, reason=reason, by=_by("promote"))
    console.print(f"{name}: champion is now version {promoted.version}")


def registry_rollback(name: Annotated[str, typer.Argument()], reason: ReasonOption = "") -> None:
    """Move champion back to the version the current champion replaced (kept in the model's history)."""
    from flows import stages

    restored = stages.registry().rollback(name, reason=reason, by=_by("rollback"))
    console.print(f"{name}: champion is back to version {restored.version}")


def registry_history(name: Annotated[str, typer.Argument(help="e.g. digits-mnist")], as_json: JsonOption = False) -> None:
    """Every move of NAME's champion alias, oldest first: when, from which version to which, why, and by which run
    or command."""
    from flows import stages

    events = stages.registry().history(name)
    if as_json:
        _emit_json(events)
        return
    if not events:
        console.print(f"{name}: no champion yet")
        return
    _print_rows([Column("when", no_wrap=True), Column("from"), Column("to"), Column("why", overflow="fold"),
                 Column("by", overflow="fold")],
                [(e.get("at", ""), e.get("from") or "-", e.get("to", ""), e.get("why", ""), e.get("by", ""))
                 for e in events])


def registry_migrate(name: Annotated[str, typer.Argument(help="e.g. digits-mnist")]) -> None:
    """Make the versions of NAME registered before digits registered MLflow Models into MLflow Models, in place:
    the same version numbers, model files, tags and aliases (MLmodel, signature and input files are added beside
    each model file, which is checked against its recorded sha256 first)."""
    from flows import stages

    from components.registry import checked_name

    reg = stages.registry()
    if checked_name(name) not in reg.names():
        raise DigitsInputError(f"no registered model '{name}' (see `digits registry list`)")
    for version, done in reg.migrate(name):
        console.print(f"{name} version {version.version}: {done}")


def reports(run_id: Annotated[Optional[str], typer.Argument(help="a run id (default: list runs, newest last)")] = None,
            as_json: JsonOption = False) -> None:
    """List runs, or print where one run's reports are (its entry page first)."""
    if run_id is None:
        found = [{"run_id": folder.run_id, "pipeline": record.pipeline, "status": record.effective_status(),
                  "stages": {name: s.status for name, s in record.stages.items()},
                  "registry_version": record.registry_version, "promoted": record.promoted} if record else
                 {"run_id": folder.run_id, "pipeline": None, "status": "damaged", "why": why}
                 for folder, record, why in scan_runs()]
        if as_json:
            _emit_json(found)
            return
        _print_rows([Column("run id", no_wrap=True), Column("pipeline", no_wrap=True), Column("status"),
                     Column("stages", overflow="fold")],
                    [(f["run_id"], f["pipeline"] or "?", f["status"],
                      " ".join(f"{n}:{st}" for n, st in f["stages"].items()) if "stages" in f else f["why"])
                     for f in found])
        return
    from components import run_page

    folder = RunFolder.open(run_id)
    page = run_page.write(folder, schemas.stages.GRAPH)
    found = [(stage.name, report.label, folder.stage_dir(stage.name) / report.path)
             for stage in schemas.stages.GRAPH for report in stage.reports
             if (folder.stage_dir(stage.name) / report.path).exists()]
    if as_json:
        _emit_json({"run_id": folder.run_id, "run_page": str(page), "run_json": str(folder.path),
                    "reports": [{"stage": name, "report": label, "path": str(path)} for name, label, path in found],
                    "summary": run_page.summary(folder)})
        return
    console.print(f"run page: {page}")
    for _, label, path in found:
        console.print(f"{label}: {path}")
    console.print(f"run.json: {folder.path}")


def suites_show(source: Annotated[Source, typer.Argument(help=" | ".join(s.name for s in SOURCES))]) -> None:
    """Print the Great Expectations suites a source's data is validated with (templates + its overrides)."""
    import json

    from schemas.suites import resolve

    conditions = {"train": [], "test": ["labelled", "unlabelled"], "dataset": ["test"]}
    for batch, held in conditions.items():
        print(json.dumps(resolve(source, batch, held), indent=1))


def _open_run(run_id: str | None, overrides: list[str] | None):
    """A run (default: the newest) and its recorded config with this command's --set overrides applied.
    They are recorded only once the command's stages succeeded: a setting that fails is not kept."""
    from flows import stages

    folder = RunFolder.open(run_id)
    config = apply_overrides(stages.config_of(folder), list(overrides or []))
    _check_services(config)
    return folder, config


def _print_rows(columns: list[Column], rows: list[tuple[str, ...]]) -> None:
    """A table on a terminal; piped, a tab-separated header line, then one line per row with nothing cut."""
    if not console.is_terminal:
        print("\t".join(str(c.header) for c in columns))
        for row in rows:
            print("\t".join(row))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _print_summary(folder: RunFolder) -> None:
    """What the run did, in a few lines (components.run_page.summary); the run page as a link a terminal opens."""
    from components import run_page

    try:
        lines = run_page.summary(folder)
    except (OSError, DigitsInputError):
        return  # the run's folder is gone or damaged: the error line says what happened
    for line in lines:
        if line.startswith("run page: "):
            uri = line.removeprefix("run page: ")
            console.print(f"run page: [link={uri}]{uri}[/link]")
        else:
            console.print(line, markup=False)


def _print_stages(folder: RunFolder) -> None:
    record = folder.load()
    table = Table("stage", "status", "seconds", title=f"run {record.status}")
    for name, stage in record.stages.items():
        table.add_row(name, stage.status, f"{stage.seconds:.1f}" if stage.seconds is not None else "")
    console.print(table)


def _help(function) -> str:
    """A command's help from its docstring, as sentences: the lines of a paragraph joined (a terminal of any width
    wraps them), paragraphs kept apart."""
    import inspect

    text = inspect.cleandoc(function.__doc__ or "")
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n") if paragraph.strip())


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"digits {version('digits')}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    """The command line, with one command per stage command of the current stage graph."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                      help="digits: a TFX-style, Prefect-orchestrated pipeline for handwritten digits.")

    @app.callback()
    def _options(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                                       help="Print digits' version and exit.")] = False) -> None:
        pass

    def add(typer_app: typer.Typer, function, name: str | None = None) -> None:
        typer_app.command(name, help=_help(function))(function)

    for function in (run, resume, ingest):
        add(app, function)
    for name, stages_ in schemas.stages.GRAPH.commands().items():
        if name != "ingest":  # ingest starts a run (--source, --data); the others work on one
            add(app, _stage_command(name, stages_), name)
    for function in (predict, serve):
        add(app, function)
    add(app, app_command, "app")
    add(app, reports)
    registry_app = typer.Typer(help="The model registry: " + ", ".join(s.registry_model for s in SOURCES) + ".",
                               no_args_is_help=True)
    for name, function in (("list", registry_list), ("show", registry_show), ("history", registry_history),
                           ("promote", registry_promote), ("rollback", registry_rollback), ("migrate", registry_migrate)):
        add(registry_app, function, name)
    app.add_typer(registry_app, name="registry")
    suites_app = typer.Typer(help="The validation suites of each source.", no_args_is_help=True)
    add(suites_app, suites_show, "show")
    app.add_typer(suites_app, name="suites")
    return app


def main() -> None:
    """Console-script entry point: bad input and usage errors are one line and exit 2; an unreachable
    tracking server is one line and exits 1; --require-promotion refused exits 3."""
    setup.environment()
    # typer (pinned) vendors click as typer._click: its usage errors come here, to be one line as well
    from typer import Abort
    from typer._click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = build_app()(standalone_mode=False, prog_name="digits")
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
    except (ServiceUnavailable, OutOfSpace) as exc:
        print(f"digits: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # a folder the user cannot write: theirs to fix
            print(f"digits: error: {exc.filename or 'writing'}: {exc.strerror.lower()}: digits writes its runs and "
                  "registry under DIGITS_HOME, which must be a folder it can write", file=sys.stderr)
            sys.exit(2)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"digits: error: no space left on device ({exc.filename or 'writing'}): free some space and run "
              "the command again (`digits resume RUN` continues a run)", file=sys.stderr)
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
