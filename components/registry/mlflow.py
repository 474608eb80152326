"""The registry on MLflow's model registry (components.registry.Registry's one implementation).

A version is an MLflow Model (components.registry.mlflow_model: MLmodel with the keras and python_function
flavors, signature, input example, and the trained model.keras byte for byte), logged as artifacts `model/` of an MLflow run — the training's run when the
lineage names one (`digits.mlflow_run_id`), else a run of the experiment `digits-registry`. Promotion
never deletes a version: it moves the alias, and remembers the alias it replaced in the new version's
`digits.previous_champion` tag so `rollback` can move it back. Promotions are serialised by a lock file
under $DIGITS_HOME; under it the champion is read again. Across machines that needs a $DIGITS_HOME whose
`flock` every client sees (NFSv4 and other POSIX shared file systems; not an object-store mount).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from components.registry import (
    CHAMPION,
    FILES,
    MODEL_FILE,
    MODEL_SHA256,
    PREVIOUS,
    Gate,
    Registry,
    Version,
    checked_name,
    checked_version,
    kept_files,
    parse_model_uri,
)
from components.registry import mlflow_model
from components.tracking import artifact_location, experiment_id, is_missing, mlflow_client
from schemas.artifacts import sha256_file
from schemas.errors import DigitsInputError
from schemas.runs import locked

HISTORY = "digits.history."  # registered-model tags: every move of the champion alias, numbered
MIGRATED = "digits.migrated"  # a version made an MLflow model by `digits registry migrate`
RUN_TAG = "digits.mlflow_run_id"  # lineage: the MLflow run the model was trained in
EXPERIMENT = "digits-registry"  # runs that hold models registered without a training run


class MlflowRegistry(Registry):
    def __init__(self, uri: str, lock_dir: Path) -> None:
        self.uri, self.lock_dir = uri, lock_dir
        self.location = uri

    def _client(self):
        return mlflow_client(self.uri)

    def _lock(self, name: str):
        return locked(self.lock_dir / f"registry-{name}")  # .registry-NAME.lock in the lock folder

    # reading
    def names(self) -> list[str]:
        return sorted(m.name for m in self._client().search_registered_models())

    def versions(self, name: str) -> list[Version]:
        checked_name(name)
        client = self._client()
        aliases = self._aliases(client, name)
        found = client.search_model_versions(f"name = '{name}'")
        return sorted((self._version(v, aliases) for v in found), key=lambda v: int(v.version))

    def champion(self, name: str) -> Version | None:
        checked_name(name)
        client = self._client()
        try:
            found = client.get_model_version_by_alias(name, CHAMPION)
        except Exception as exc:
            if is_missing(exc):
                return None
            raise
        return self._version(found, self._aliases(client, name))

    def resolve(self, uri: str) -> Version:
        name, alias, number = parse_model_uri(uri)
        client = self._client()
        try:
            found = (client.get_model_version_by_alias(name, alias) if alias
                     else client.get_model_version(name, number))
        except Exception as exc:
            if is_missing(exc):
                what = f"no alias '{alias}'" if alias else f"no version {number}"
                raise DigitsInputError(f"{uri}: the registry ({self.uri}) has {what} of model {name}") from None
            raise
        return self._version(found, self._aliases(client, name))

    def change_token(self) -> object | None:
        from components.tracking import sqlite_path

        path = sqlite_path(self.uri)  # SQLite: every write changes the database file (or its journal)
        if path is None:
            return None
        found = []
        for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-journal")):
            try:
                stat = part.stat()
            except OSError:
                found.append(None)
                continue
            found.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(found)

    def alias_version(self, name: str, alias: str) -> str | None:
        try:
            return str(self._client().get_model_version_by_alias(name, alias).version)
        except Exception as exc:
            if is_missing(exc):
                return None
            raise

    def download(self, version: Version, dst: Path) -> Path:
        recorded, expected = version.tags.get(MODEL_FILE), version.tags.get(MODEL_SHA256)
        if not recorded or not expected or "/" in recorded:
            raise DigitsInputError(f"{version.uri} has no recorded model file and sha256 (registered before "
                                   "digits recorded them): register the model again")
        return self._checked(version, f"model/{recorded}", expected, dst,
                             f"{version.uri}: the model file {recorded} in {version.source} is not the one "
                             "registered (its sha256 differs); refusing to load it")

    def fetch(self, version: Version, name: str, dst: Path) -> Path | None:
        expected = kept_files(version).get(name)
        if expected is None or "/" in name:
            return None
        return self._checked(version, f"{self._folder(version.version)}/{name}", expected, dst,
                             f"{version.uri}: its {name} in the registry is not the one recorded (its sha256 "
                             "differs); refusing to use it")

    def _checked(self, version: Version, artifact: str, sha256: str, dst: Path, refusal: str) -> Path:
        """A file of the version's MLflow run copied under dst, refused (DigitsInputError) unless its sha256 is
        the recorded one."""
        run_id = self._client().get_model_version(version.name, version.version).run_id
        local = Path(self._client().download_artifacts(run_id, artifact, str(dst)))
        if not local.is_file() or sha256_file(local) != sha256:
            raise DigitsInputError(refusal)
        return local

    def location_of(self, version: Version, name: str) -> str | None:
        if name not in kept_files(version):
            return None
        run_id = self._client().get_model_version(version.name, version.version).run_id
        return f"{self._client().get_run(run_id).info.artifact_uri}/{self._folder(version.version)}/{name}"

    @staticmethod
    def _folder(version: str) -> str:
        return f"version-{version}"  # a training run registered twice keeps each version's documents apart

    # writing
    def attach(self, version: Version, files: dict[str, Path]) -> dict[str, str]:
        client = self._client()
        run_id = client.get_model_version(version.name, version.version).run_id
        for name, path in files.items():
            if path.name != name:
                raise ValueError(f"a document is kept under its file name: {name} != {path.name}")
            client.log_artifact(run_id, str(path), artifact_path=self._folder(version.version))
        current = kept_files(self._version(client.get_model_version(version.name, version.version), {}))
        kept = {**current, **{name: sha256_file(path) for name, path in files.items()}}
        client.set_model_version_tag(version.name, version.version, FILES, json.dumps(kept, sort_keys=True))
        root = client.get_run(run_id).info.artifact_uri
        return {name: f"{root}/{self._folder(version.version)}/{name}" for name in files}

    def register(self, name: str, model_file: Path, lineage: dict[str, str], gate: Gate,
                 files: dict[str, Path] | None = None, example=None) -> tuple[Version, bool]:
        client = self._client()
        run_id = lineage.get(RUN_TAG)
        if not run_id or not self._has_run(client, run_id):  # none, or not in this store (a new registry)
            run_id = self._holding_run(client, name, artifact_location(self.uri, self.lock_dir / "mlartifacts"))
        mlflow_model.log(client, run_id, model_file, example=example, facts={"registered_model": name})
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        stored = mlflow_model.MODEL if model_file.suffix == ".keras" else model_file.name
        tags = {**lineage, RUN_TAG: run_id, MODEL_FILE: stored, MODEL_SHA256: sha256_file(model_file)}
        with self._lock(name):
            if not client.search_registered_models(f"name = '{name}'"):
                client.create_registered_model(name, description="digits models; alias 'champion' = the promoted one")
            created = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
            if files:
                self.attach(self._version(created, {}), files)
            current = self.champion(name)
            promoted = gate(current)
            if promoted:
                run = lineage.get("digits.run_id")
                self._move_champion(client, name, str(created.version), current,
                                    why="its run's evaluation gate passed", by=f"run {run}" if run else "register")
        return self._version(client.get_model_version(name, created.version), self._aliases(client, name)), promoted

    def promote(self, name: str, version: str, reason: str = "", by: str = "") -> Version:
        checked_name(name), checked_version(version)
        client = self._client()
        with self._lock(name):
            try:
                target = client.get_model_version(name, version)
            except Exception as exc:
                if is_missing(exc):
                    raise DigitsInputError(f"{name} has no version {version} (see `digits registry show {name}`)") from None
                raise
            self._move_champion(client, name, str(target.version), self.champion(name),
                                why=reason or "promoted by hand", by=by or "promote")
        return self._version(client.get_model_version(name, version), self._aliases(client, name))

    def rollback(self, name: str, reason: str = "", by: str = "") -> Version:
        checked_name(name)
        client = self._client()
        with self._lock(name):
            current = self.champion(name)
            if current is None:
                raise DigitsInputError(f"{name} has no champion to roll back")
            previous = current.tags.get(PREVIOUS)
            if not previous:
                raise DigitsInputError(f"{name} version {current.version} replaced no earlier champion")
            client.set_registered_model_alias(name, CHAMPION, previous)
            self._record(client, name, current.version, previous, why=reason or "rolled back", by=by or "rollback")
        return self._version(client.get_model_version(name, previous), self._aliases(client, name))

    def describe(self, version: Version, text: str) -> None:
        self._client().update_model_version(version.name, version.version, description=text)

    def migrate(self, name: str) -> list[tuple[Version, str]]:
        checked_name(name)
        client = self._client()
        done = []
        for version in self.versions(name):
            run_id = client.get_model_version(version.name, version.version).run_id
            held = {Path(f.path).name for f in client.list_artifacts(run_id, "model")}
            if mlflow_model.MLMODEL in held:
                done.append((version, "already an MLflow model"))
                continue
            if not version.tags.get(MODEL_FILE, "").endswith(".keras"):
                done.append((version, f"left as it is: {version.tags.get(MODEL_FILE) or 'no model file'} is not a "
                                      "Keras model"))
                continue
            with tempfile.TemporaryDirectory(prefix="digits-migrate-") as scratch:
                model_file = self.download(version, Path(scratch) / "download")  # checked against its sha256
                if model_file.name != mlflow_model.MODEL:
                    raise DigitsInputError(f"{version.uri}: its model file is {model_file.name}; expected "
                                           f"{mlflow_model.MODEL}")
                mlflow_model.log(client, run_id, model_file, facts={"registered_model": name})  # beside the same
                # model.keras: MLmodel and the rest added, the model file's bytes (and sha256) unchanged
            client.set_model_version_tag(name, version.version, MIGRATED, "true")
            done.append((version, "now an MLflow model"))
        return done

    @staticmethod
    def _has_run(client, run_id: str) -> bool:
        try:
            client.get_run(run_id)
        except Exception as exc:
            if is_missing(exc):
                return False
            raise
        return True

    @staticmethod
    def _holding_run(client, name: str, artifacts: str | None) -> str:
        """A new run of the `digits-registry` experiment to hold a model registered without a training run;
        its files where every digits experiment keeps them (components.tracking.artifact_location)."""
        run_id = client.create_run(experiment_id(client, EXPERIMENT, artifacts), run_name=name).info.run_id
        client.set_terminated(run_id, status="FINISHED")
        return run_id

    @classmethod
    def _move_champion(cls, client, name: str, version: str, current: Version | None, *, why: str, by: str) -> None:
        if current is not None and current.version != version:
            client.set_model_version_tag(name, version, PREVIOUS, current.version)
        client.set_registered_model_alias(name, CHAMPION, version)
        cls._record(client, name, current.version if current else None, version, why=why, by=by)

    @staticmethod
    def _record(client, name: str, before: str | None, after: str, *, why: str, by: str) -> None:
        """An alias move as the registered model's tag digits.history.NNNNN (under the registry's lock: numbered
        in order), so every registry client and the MLflow UI see the same history."""
        import datetime

        tags = client.get_registered_model(name).tags or {}
        number = 1 + sum(1 for key in tags if key.startswith(HISTORY))
        event = {"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "alias": CHAMPION,
                 "from": before, "to": after, "why": why[:2000], "by": by[:500]}
        client.set_registered_model_tag(name, f"{HISTORY}{number:05d}", json.dumps(event))

    def history(self, name: str) -> list[dict]:
        checked_name(name)
        try:
            tags = self._client().get_registered_model(name).tags or {}
        except Exception as exc:
            if is_missing(exc):
                raise DigitsInputError(f"no registered model '{name}' (see `digits registry list`)") from None
            raise
        events = []
        for key in sorted(k for k in tags if k.startswith(HISTORY)):
            try:
                events.append(json.loads(tags[key]))
            except ValueError:
                continue
        return events

    @staticmethod
    def _aliases(client, name: str) -> dict[str, list[str]]:
        try:
            model = client.get_registered_model(name)
        except Exception as exc:
            if is_missing(exc):
                return {}
            raise
        by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        return by_version

    @staticmethod
    def _version(found, aliases: dict[str, list[str]]) -> Version:
        return Version(name=found.name, version=str(found.version), source=found.source,
                       tags=dict(found.tags or {}), aliases=sorted(aliases.get(str(found.version), [])),
                       description=found.description or "")
