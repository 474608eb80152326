"""MLflow tracking for the stages: one MLflow run per pipeline run and stage, through MlflowClient
(no process-global active run). The tracking URI comes from the caller: `MLFLOW_TRACKING_URI` when
set, else SQLite under $DIGITS_HOME (see flows.stages)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from schemas.errors import DigitsInputError, ServiceUnavailable, chain
from schemas.runs import locked


def tracking_uri(home: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(home / "mlflow.db")


URI_SYNTAX = "%?#"  # what SQLAlchemy reads as URI syntax in a sqlite:/// path


def sqlite_uri(path: Path) -> str:
    """The SQLAlchemy URI of a SQLite file under $DIGITS_HOME (MLflow's and Optuna's stores). A path holding `%`,
    `?` or `#` is refused (DigitsInputError): SQLAlchemy unquotes `%XX` and ends the path at `?`, so the store
    would open in another folder (`p%20q` -> `p q/`), outside this home and its locks; quoting them does not
    help, since MLflow also creates the quoted name as a folder beside the home."""
    path = path.resolve()
    odd = sorted({c for c in str(path) if c in URI_SYNTAX})
    if odd:
        raise DigitsInputError(f"{path.parent}: a folder whose path holds {' or '.join(repr(c) for c in odd)} cannot "
                               "hold a SQLite store (the URI would open another folder); choose a DIGITS_HOME "
                               "without them, or set MLFLOW_TRACKING_URI (and tune.storage)")
    return f"sqlite:///{path}"


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` URI; None for any other URI."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str, root: Path | None) -> str | None:
    """Where a new experiment keeps its files: `root` (under $DIGITS_HOME) for a store on this machine
    (SQLite, a folder), where MLflow's own default would be ./mlruns in whatever folder the command ran
    from; for a tracking server, None: the server's default, so that with `mlflow server
    --artifacts-destination` the files go through the server and clients need no disk it can see."""
    if root is None or uri.split(":", 1)[0] in ("http", "https", "databricks"):
        return None
    return root.resolve().as_uri()


# MLflow's HTTP client retries a refused connection 7 times with a backoff factor of 2 (about four minutes)
# and waits 120 s for an answer. A tracking server that is down should be said in seconds: three retries, 1 s
# apart and doubling (about 7 s in all), 30 s for an answer. A user's own settings of these win.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def check_reachable(uri: str) -> None:
    """Raise ServiceUnavailable (one line) within seconds (components.reach) when an http(s) tracking server
    does not accept connections; any other URI (SQLite, a folder) passes. Called before long work starts and
    when a process first opens a client for the URI."""
    from components.reach import unreachable

    scheme = uri.split("://", 1)[0]
    if scheme not in ("http", "https") or uri in _REACHED:
        return
    reason = unreachable(uri, 443 if scheme == "https" else 80)
    if reason is not None:
        raise ServiceUnavailable(f"MLflow tracking server {uri} unreachable ({reason}): start it, or unset "
                                 "MLFLOW_TRACKING_URI to track in SQLite under $DIGITS_HOME")
    _REACHED.add(uri)


_REACHED: set[str] = set()


def mlflow_client(uri: str):
    """An MlflowClient for tracking and registry at uri, quiet: MLflow and alembic log at INFO to stderr
    (database creation, migrations) and draw download progress bars there, and stderr is for errors. An
    http(s) server is checked to accept connections first, and MLflow's retries are bounded (HTTP_SETTINGS)."""
    import logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    check_reachable(uri)
    from mlflow.tracking import MlflowClient  # configures MLflow's loggers: quiet them after it

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    database = sqlite_path(uri)
    if database is not None and uri not in _CREATED:
        # held while this process first opens the store: MLflow creates or migrates its tables then, and two
        # processes doing that at once on a new home collided (a UNIQUE constraint, a half-made schema)
        with locked(database):
            client = _open(MlflowClient, uri)
            client.search_experiments(max_results=1)  # the tracking store's tables, created or migrated
            client.search_registered_models(max_results=1)  # the registry store's
        _CREATED.add(uri)
        return client
    return _open(MlflowClient, uri)


_CREATED: set[str] = set()  # SQLite stores this process has opened (and so created or migrated)


def _open(client_class, uri: str):
    try:
        return _Reachable(client_class(tracking_uri=uri, registry_uri=uri), uri)
    except Exception as exc:
        shown = _one_line(exc, uri)
        if shown is exc:
            raise
        raise shown from None


class _Reachable:
    """An MlflowClient whose calls raise ServiceUnavailable (one line) when the server cannot be
    reached, instead of MLflow's exception wrapping a connection error's traceback."""

    def __init__(self, client, uri: str) -> None:
        self._client, self._uri = client, uri

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                shown = _one_line(exc, self._uri)
                if shown is exc:
                    raise
                raise shown from None
        return call


def _one_line(exc: Exception, uri: str) -> Exception:
    """The error to show for an MLflow failure: an unreachable server or a damaged SQLite store as one
    line; anything else as it is (a bug, with its traceback)."""
    reason = _connection_failure(exc)
    if reason is not None:
        return ServiceUnavailable(f"MLflow tracking server {uri} unreachable ({reason}): start it, or unset "
                                  "MLFLOW_TRACKING_URI to track in SQLite under $DIGITS_HOME")
    damaged = _damaged_store(exc)
    if damaged is not None:
        return DigitsInputError(f"{sqlite_path(uri) or uri}: not a readable MLflow database ({damaged}); "
                                "restore it from a backup, or move it aside to start a new, empty registry")
    return exc


def _damaged_store(exc: BaseException) -> str | None:
    """What sqlite said, when exc is (or wraps) a database that is not one (garbage, truncated)."""
    for cause in chain(exc):
        if type(cause).__name__ == "DatabaseError" and type(cause).__module__ in ("sqlite3", "sqlalchemy.exc"):
            return str(getattr(cause, "orig", None) or cause).splitlines()[0]
    return None


def is_missing(exc: BaseException) -> bool:
    """Whether an MLflow error says the model, version, alias or run asked for does not exist: the one
    place its error codes are matched (MlflowException and RestException carry `error_code`). MLflow
    reports an unknown model or version as RESOURCE_DOES_NOT_EXIST, but an unknown alias of a known
    model as INVALID_PARAMETER_VALUE ("Registered model alias NAME not found.")."""
    code = getattr(exc, "error_code", None)
    text = str(exc)
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "Registered model alias " in text and "not found" in text)


def experiment_id(client, name: str, artifacts: str | None) -> str:
    """The id of experiment `name`, created (its files at `artifacts`) when missing. Runs started at once
    (three deployments of one pipeline on a new server) may all find it missing: the creations after the
    first fail with RESOURCE_ALREADY_EXISTS, and read the one that won."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except Exception as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.get_experiment_by_name(name).experiment_id


def ui_link(uri: str, model_uri: str) -> str | None:
    """The MLflow UI's page of a registry version (models:/NAME/VERSION) when uri is a tracking server (http, https);
    None for a local store, which has no UI running."""
    if not uri.startswith(("http://", "https://")) or not model_uri.startswith("models:/"):
        return None
    name, _, version = model_uri.removeprefix("models:/").partition("/")
    return f"{uri.rstrip('/')}/#/models/{name}/versions/{version}" if version.isdigit() else None


_RUN_PAGES: dict[tuple[str, str], str] = {}  # (uri, run id) -> its page: a run never changes experiment


def ui_run_link(uri: str, run_id: str | None) -> str | None:
    """The MLflow UI's page of a run when uri is a tracking server (http, https); None for a local store (no UI
    running), or when the server cannot say which experiment the run is in (a link is a courtesy: a page is
    written without it rather than not at all). Asked of the server once per run and process."""
    if not run_id or not uri.startswith(("http://", "https://")):
        return None
    if (uri, run_id) not in _RUN_PAGES:
        try:
            experiment = mlflow_client(uri).get_run(run_id).info.experiment_id
        except Exception:
            return None
        _RUN_PAGES[uri, run_id] = f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return _RUN_PAGES[uri, run_id]


def _connection_failure(exc: BaseException) -> str | None:
    """What failed, when exc is (or wraps) a failure to reach a server; None for any other error.
    (MLflow talks HTTP through requests: its ConnectionError or Timeout, matched by name, not imported.)"""
    for cause in chain(exc):
        if any(c.__module__.startswith("requests") and c.__name__ in ("ConnectionError", "Timeout")
               for c in type(cause).__mro__):
            text = str(cause)
            for words in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
                if words in text:
                    return words.lower()
            return type(cause).__name__
    return None


class Tracking:
    """The MLflow run of one stage of one pipeline run (experiment `digits-<source>`)."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str],
                 artifact_root: Path | None = None) -> None:
        self.uri, self.experiment, self.run_name, self.tags = uri, experiment, run_name, tags
        self.artifact_root = artifact_root
        self.run_id: str | None = None

    def _client(self):
        return mlflow_client(self.uri)

    def start(self, run_id: str | None, params: dict[str, Any]) -> str:
        """Continue run_id (a resumed stage), or create a run with these params. Returns its id."""
        client = self._client()
        if run_id is not None:
            self.run_id = client.get_run(run_id).info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return self.run_id
        experiment = experiment_id(client, self.experiment, artifact_location(self.uri, self.artifact_root))
        self.run_id = client.create_run(experiment, run_name=self.run_name, tags=self.tags).info.run_id
        from mlflow.entities import Param

        client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client().log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish(self, metrics: dict[str, float], step: int) -> None:
        self.log_metrics(metrics, step=step)
        self._client().set_terminated(self.run_id, status="FINISHED")

    def log_files(self, *paths: Path) -> None:
        """Files kept with the run (its artifacts), each at the top of the run's artifact folder."""
        client = self._client()
        for path in paths:
            client.log_artifact(self.run_id, str(path))
