"""The tune stage: an Optuna study over train settings, whose winner the train stage uses.

Each trial is a short training (tune.epochs epochs, optionally on the first tune.rows train rows) of
train.model with settings drawn from tune.space by Optuna's TPE sampler, scored on the val split; the
pruner (median or Hyperband) sees the val accuracy after every epoch and stops trials that are behind.
A trial whose loss becomes NaN is recorded as failed and the study goes on. The study lives in Optuna's
RDB storage (SQLite under $DIGITS_HOME/tune/ unless tune.storage names a database), named after the run
and the stage's key: a killed tune, resumed, keeps its finished trials and runs only the rest.

Where trials run is the caller's choice (`execute`, as for ensemble members): one after another in this
process, or as Prefect tasks on a Dask cluster (flows.ensemble.on_dask), each worker asking the shared
study for its next settings. A trial is plain data (`TrialJob`) so it can be pickled to a worker.

Output: best.json (the winning settings: train.<field> -> value), trials.csv, curves.png (every trial's val
accuracy per epoch), history.png and importances.png (Optuna's matplotlib pictures), report.html.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from components.tracking import Tracking
from schemas.artifacts import Converted, Tuned
from schemas.config import Pruner, TrainConfig, TuneConfig
from schemas.errors import TrainingDiverged
from schemas.runs import write_json_atomic

Progress = Callable[[str], None]
TRIALS = "trials"  # the trials' work folders (removed once the study is done)
DIVERGED = "diverged"  # a trial's user attribute: why its training failed (a finished trial, unlike a killed one)


def distributions(space: dict[str, str]) -> dict[str, Any]:
    """Optuna distributions of a tune.space (validated by schemas.config.TuneConfig)."""
    import optuna.distributions as d

    found = {}
    for key, spec in space.items():
        kind, *values = spec.split()
        if kind == "choice":
            found[key] = d.CategoricalDistribution([_value(v) for v in values])
        elif kind == "int":
            found[key] = d.IntDistribution(int(float(values[0])), int(float(values[1])))
        else:
            found[key] = d.FloatDistribution(float(values[0]), float(values[1]), log=kind == "log")
    return found


def _value(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def storage_url(tune: TuneConfig, home: Path) -> str:
    if tune.storage:
        return tune.storage
    (home / "tune").mkdir(parents=True, exist_ok=True)
    from components.tracking import sqlite_uri

    return sqlite_uri(home / "tune" / "optuna.db")


def check_storage(storage: str) -> None:
    """Raise ServiceUnavailable (one line) within seconds when tune.storage names a database server that does
    not accept connections (a database file passes: opening it says what is wrong)."""
    from sqlalchemy.engine import make_url

    from components.reach import unreachable
    from schemas.errors import ServiceUnavailable

    url = make_url(storage)
    if url.host:
        reason = unreachable(f"tcp://{url.host}:{url.port or _DEFAULT_PORTS.get(url.get_backend_name(), 0)}", 0)
        if reason is not None:
            raise ServiceUnavailable(f"tune.storage {_shown(storage)} unreachable ({reason}): start its database "
                                     "server, or leave tune.storage unset for SQLite under $DIGITS_HOME/tune")


_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}


def _storage_error(exc: Exception, storage: str) -> Exception:
    """The one line for a study storage that cannot be opened: a database server that refuses connections is
    unavailable (ServiceUnavailable); a database or driver that is not there is the user's to fix; anything
    else is raised as it is."""
    from sqlalchemy.exc import ArgumentError, OperationalError

    from schemas.errors import DigitsInputError, ServiceUnavailable

    if isinstance(exc, OperationalError):
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        kind = ServiceUnavailable if "connect" in reason.lower() else DigitsInputError
        return kind(f"tune.storage {_shown(storage)} cannot be opened ({reason}): start its database server, or "
                    "leave tune.storage unset for SQLite under $DIGITS_HOME/tune")
    if isinstance(exc, (ArgumentError, ImportError)):
        return DigitsInputError(f"tune.storage {_shown(storage)} is not a usable SQLAlchemy URL "
                                f"({str(exc).splitlines()[0]})")
    return exc


def _shown(url: str) -> str:
    """A storage URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _pruner(tune: TuneConfig):
    import optuna

    if tune.pruner is Pruner.median:
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if tune.pruner is Pruner.hyperband:
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=tune.epochs)
    return optuna.pruners.NopPruner()


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial: the stage says its own


@dataclass(frozen=True)
class TrialJob:
    """One trial, picklable: it asks the shared study for its settings, trains, and tells the study."""

    number: int  # the job's index in this attempt (not Optuna's trial number)
    study: str
    storage: str
    tune: TuneConfig
    config: TrainConfig  # the run's train config: the trial's settings are drawn over it
    seed: int
    converted: Converted
    work_dir: Path  # trials/ of the stage folder
    deadline: float | None  # time.time() after which no trial starts
    tracking: Tracking | None = None

    def describe(self) -> str:
        return f"tune job {self.number + 1}"

    def run(self, progress: Progress = lambda _: None, worker: str | None = None) -> dict:
        import optuna

        from components import train
        from components.tensorflow_runtime import import_tensorflow

        if self.deadline is not None and time.time() > self.deadline:
            return {"skipped": True}
        _quiet_optuna()
        import_tensorflow()  # quietly, before Keras (the pruning callback) imports it
        study = optuna.load_study(study_name=self.study, storage=self.storage,
                                  sampler=optuna.samplers.TPESampler(seed=self.seed + self.number),
                                  pruner=_pruner(self.tune))
        trial = study.ask(distributions(self.tune.space))
        config = trial_config(self.config, self.tune, trial.params)
        trial.set_user_attr("worker", worker)
        name = f"trial-{trial.number:03d}"
        said = lambda message: progress(f"{name}: {message}")  # noqa: E731
        chosen = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        progress(f"{name}: {chosen}")
        tracking = None
        if self.tracking is not None:
            tracking = Tracking(self.tracking.uri, self.tracking.experiment, f"{self.tracking.run_name}-{name}",
                                {**self.tracking.tags, "digits.trial": str(trial.number)},
                                artifact_root=self.tracking.artifact_root)
        try:
            trained = train.run(self.converted, config, self.seed, self.work_dir / name, tracking=tracking,
                                progress=lambda m: said(m) if "epoch" in m else None, rows=self.tune.rows,
                                callbacks=[_Report(trial)])
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            said(f"pruned ({pruned})")
            return {"trial": trial.number, "state": "PRUNED"}
        except TrainingDiverged as exc:
            trial.set_user_attr(DIVERGED, str(exc))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            said(f"failed: {exc}")
            return {"trial": trial.number, "state": "FAIL"}
        finally:
            shutil.rmtree(self.work_dir / name, ignore_errors=True)  # checkpoints of a short trial: not kept
        study.tell(trial, trained.val_accuracy)
        said(f"val_accuracy {trained.val_accuracy:.2%}")
        return {"trial": trial.number, "state": "COMPLETE", "value": trained.val_accuracy}


def trial_config(config: TrainConfig, tune: TuneConfig, params: dict[str, Any]) -> TrainConfig:
    """What one trial trains: the run's train config, as a single model of tune.epochs epochs, with the drawn
    `params`. Without train.clean_epochs (they polish a finished model; a trial ranks settings) unless the space
    draws them. The drawn values are checked like any --set."""
    config = config.single(**{"clean_epochs": 0, **params}, epochs=tune.epochs)
    return TrainConfig.model_validate(config.model_dump())


def _Report(trial):
    """A Keras callback reporting each epoch's val accuracy to the trial, raising TrialPruned when the pruner
    says so (imported with Keras)."""
    import keras
    import optuna

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            value = float((logs or {}).get("val_accuracy", 0.0))
            trial.report(value, step=epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_accuracy {value:.2%} after epoch {epoch + 1}")

    return Report()


Execute = Callable[[list[TrialJob]], list[dict]]


def run(converted: Converted, tune: TuneConfig, config: TrainConfig, seed: int, out: Path, *, study: str,
        storage: str, execute: Execute, tracking: Tracking | None = None,
        progress: Progress = lambda _: None) -> Tuned:
    """Run (or resume) the study `study` until it holds tune.trials finished trials or the budget is spent;
    write its results into out."""
    import optuna

    _quiet_optuna()
    started = time.perf_counter()
    deadline = time.time() + 60 * tune.budget_minutes if tune.budget_minutes else None
    try:
        created = optuna.create_study(study_name=study, storage=storage, direction="maximize", load_if_exists=True,
                                      sampler=optuna.samplers.TPESampler(seed=seed), pruner=_pruner(tune))
    except Exception as exc:
        raise _storage_error(exc, storage) from None
    _fail_unfinished(created)
    finished = _finished(created)
    if finished:
        progress(f"resuming the study {study}: {len(finished)} trials finished by an earlier attempt")
    remaining = max(0, tune.trials - len(finished))
    children = None  # each trial's MLflow run: a child of the stage's
    if tracking is not None:
        parent = tracking.start(None, {"tune.trials": tune.trials, "tune.epochs": tune.epochs, "tune.rows": tune.rows,
                                       "tune.space": json.dumps(tune.space), "tune.pruner": tune.pruner.value,
                                       "study": study})
        children = Tracking(tracking.uri, tracking.experiment, tracking.run_name,
                            {**tracking.tags, "mlflow.parentRunId": parent}, artifact_root=tracking.artifact_root)
    jobs = [TrialJob(number=len(finished) + i, study=study, storage=storage, tune=tune, config=config, seed=seed,
                     converted=converted, work_dir=out / TRIALS, deadline=deadline, tracking=children)
            for i in range(remaining)]
    if jobs:
        progress(f"{len(jobs)} trials of {tune.epochs} epochs" + (f" on {tune.rows:,} train rows" if tune.rows else "")
                 + (f", within {tune.budget_minutes:g} minutes" if deadline else "") + f"; study {study}")
        execute(jobs)
    shutil.rmtree(out / TRIALS, ignore_errors=True)
    loaded = optuna.load_study(study_name=study, storage=storage)
    done = _finished(loaded)
    complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise TrainingDiverged(f"tune: none of {len(done)} trials completed (each diverged or was pruned); "
                               "narrow tune.space (a lower learning_rate range) or raise tune.epochs")
    best = max(complete, key=lambda t: (t.value, -t.number))
    out.mkdir(parents=True, exist_ok=True)
    _write_trials(done, out / "trials.csv")
    pictures = _pictures(loaded, out)
    counts = {state: sum(1 for t in done if t.state.name == state) for state in ("COMPLETE", "PRUNED", "FAIL")}
    write_json_atomic(out / "best.json", {"params": best.params, "value": best.value, "trial": best.number,
                                          "study": study, "trials": len(done), **{k.lower(): v for k, v in counts.items()}})
    _report(out, best, done, pictures, study)
    if tracking is not None:
        tracking.finish({"best_val_accuracy": best.value, "trials": len(done)}, step=0)
    progress(f"best: trial {best.number}, val_accuracy {best.value:.2%} after {tune.epochs} epochs")
    return Tuned(dir=out, best_params=dict(best.params), best_value=float(best.value), best_trial=best.number,
                 trials=len(done), complete=counts["COMPLETE"], pruned=counts["PRUNED"], failed=counts["FAIL"],
                 study=study, storage=_shown(storage), resumed_trials=len(finished),
                 seconds=round(time.perf_counter() - started, 2))


def _finished(study) -> list:
    """The trials that count: complete, pruned, or failed because their training diverged (not those a killed
    attempt left behind)."""
    import optuna

    states = optuna.trial.TrialState
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (states.COMPLETE, states.PRUNED) or (t.state == states.FAIL and DIVERGED in t.user_attrs)]


def _fail_unfinished(study) -> None:
    """Trials an earlier attempt left RUNNING (it was killed) are marked FAIL: they are not counted, and the
    sampler does not wait on them."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


def _write_trials(trials: list, path: Path) -> None:
    keys = sorted({k for t in trials for k in t.params})
    steps = max((max(t.intermediate_values) for t in trials if t.intermediate_values), default=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "state", "val_accuracy", *keys, *(f"val_accuracy_epoch_{s}" for s in range(1, steps + 1)),
                     "seconds", "worker"])
    for t in sorted(trials, key=lambda t: t.number):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else ""
        writer.writerow([t.number, t.state.name, "" if t.value is None else t.value, *(t.params.get(k, "") for k in keys),
                         *(t.intermediate_values.get(s, "") for s in range(1, steps + 1)), seconds,
                         t.user_attrs.get("worker") or ""])
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(buffer.getvalue())
    os.replace(partial, path)


def _pictures(study, out: Path) -> list[str]:
    """Optuna's optimisation history and parameter importances, as PNG (importances need 2+ complete trials
    and a parameter that varied)."""
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    made = []
    curves = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    if curves:  # every trial's val accuracy per epoch: where the pruner stopped the ones behind
        figure, ax = plt.subplots(figsize=(8, 4.5))
        for t in sorted(curves, key=lambda t: t.number):
            steps = sorted(t.intermediate_values)
            ax.plot(steps, [t.intermediate_values[s] for s in steps], marker="o", markersize=3,
                    linestyle="-" if t.state.name == "COMPLETE" else ":", label=f"trial {t.number} ({t.state.name.lower()})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("val accuracy")
        ax.set_title("Each trial's val accuracy per epoch (dotted: pruned or failed)")
        ax.grid(alpha=0.3)
        if len(curves) <= 12:
            ax.legend(fontsize=7)
        figure.tight_layout()
        partial = out / ".curves.partial.png"
        figure.savefig(partial, dpi=100)
        plt.close(figure)
        os.replace(partial, out / "curves.png")
        made.append("curves.png")
    for name, plot in (("history.png", vis.plot_optimization_history), ("importances.png", vis.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "plot_... is experimental"
                axes = plot(study)
            figure = axes.figure if hasattr(axes, "figure") else axes
            figure.set_size_inches(8, 4.5)
            figure.tight_layout()
            partial = out / f".{name}.partial.png"
            figure.savefig(partial, dpi=100)
            plt.close(figure)
            os.replace(partial, out / name)
            made.append(name)
        except (ValueError, RuntimeError, ZeroDivisionError):
            plt.close("all")
    return made


def _report(out: Path, best, trials: list, pictures: list[str], study: str) -> None:
    import base64

    rows = "".join(
        f"<tr><td>{t.number}</td><td>{t.state.name}</td><td>{'' if t.value is None else f'{100 * t.value:.2f}%'}</td>"
        f"<td>{html.escape(', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in t.params.items()))}"
        f"</td></tr>" for t in sorted(trials, key=lambda t: t.number))
    images = "".join(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode((out / name).read_bytes()).decode()}">'
                     for name in pictures)
    chosen = html.escape(", ".join(f"train.{k}={v:.4g}" if isinstance(v, float) else f"train.{k}={v}"
                                   for k, v in best.params.items()))
    from components import pages

    body = f"""<h1>Tuning study <code>{html.escape(study)}</code></h1>
<p>Best: trial {best.number}, validation accuracy <b>{100 * best.value:.2f}%</b> with <code>{chosen}</code>
(the train stage uses these).</p>{images}
<h2>Trials</h2><table><tr><th>trial</th><th>state</th><th>val accuracy</th><th>settings</th></tr>{rows}</table>"""
    pages.write(out / "report.html", f"digits tune: {study}", body, pages.nav(out.parent, "tune"))
