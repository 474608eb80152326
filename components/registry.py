"""The model registry (MLflow): `digits-<source>` registered models, a version per gate-passing model,
the alias `champion` on the promoted one.

A version's files are the train stage's model, logged as artifacts of the training's MLflow run
(`model/`), with lineage tags. Promotion never deletes a version: it moves the alias, and remembers
the alias it replaced in the new version's `digits.previous_champion` tag so `rollback` can move it
back. Promotions are serialised by a lock file under $DIGITS_HOME (for stores reached from one
machine: SQLite, a local server); under it the champion is read again, so two racing promotions
cannot both win against a stale champion.
"""

from __future__ import annotations

import contextlib
import fcntl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from components.tracking import mlflow_client
from schemas.errors import DigitsInputError

CHAMPION = "champion"
PREVIOUS = "digits.previous_champion"


def model_name(source: str) -> str:
    return f"digits-{source}"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    rest = uri.removeprefix("models:/")
    if rest == uri or not rest:
        raise DigitsInputError(f"'{uri}' is not a registry URI: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in name:
            return name, alias, None
    else:
        name, _, number = rest.partition("/")
        if name and number.isdigit():
            return name, None, number
    raise DigitsInputError(f"'{uri}' is not a registry URI: expected models:/NAME@ALIAS or models:/NAME/VERSION")


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str]
    aliases: list[str]

    @property
    def champion(self) -> bool:
        return CHAMPION in self.aliases


class Registry:
    def __init__(self, uri: str, lock_dir: Path) -> None:
        self.uri, self.lock_dir = uri, lock_dir

    def _client(self):
        return mlflow_client(self.uri)

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_dir / f".registry-{name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # reading
    def versions(self, name: str) -> list[Version]:
        client = self._client()
        aliases = self._aliases(client, name)
        found = client.search_model_versions(f"name = '{name}'")
        return sorted((self._version(v, aliases) for v in found), key=lambda v: int(v.version))

    def names(self) -> list[str]:
        return sorted(m.name for m in self._client().search_registered_models())

    def champion(self, name: str) -> Version | None:
        client = self._client()
        try:
            found = client.get_model_version_by_alias(name, CHAMPION)
        except Exception as exc:  # MLflow raises RestException for an unknown model or alias
            if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
                return None
            raise
        return self._version(found, self._aliases(client, name))

    def resolve(self, uri: str) -> Version:
        """The version a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI names; one clear error if none."""
        name, alias, number = parse_model_uri(uri)
        client = self._client()
        try:
            found = (client.get_model_version_by_alias(name, alias) if alias
                     else client.get_model_version(name, number))
        except Exception as exc:  # MLflow's RestException/MlflowException for an unknown model, alias or version
            if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
                what = f"no alias '{alias}'" if alias else f"no version {number}"
                raise DigitsInputError(f"{uri}: the registry ({self.uri}) has {what} of model {name}") from None
            raise
        return self._version(found, self._aliases(client, name))

    def download(self, version: Version, dst: Path) -> Path:
        """The version's model file, copied under dst."""
        local = Path(self._client().download_artifacts(version.run_id, "model", str(dst)))
        files = sorted(p for p in local.iterdir() if p.suffix in (".keras", ".joblib"))
        if not files:
            raise DigitsInputError(f"{version.name} version {version.version} has no model file in {version.source}")
        return files[0]

    # writing
    def log_model(self, run_id: str, model_file: Path) -> None:
        """The model's file as artifacts `model/` of its MLflow run (registered or not)."""
        self._client().log_artifact(run_id, str(model_file), artifact_path="model")

    def register(self, name: str, run_id: str, model_file: Path, tags: dict[str, str],
                 gate: Callable[[Version | None], bool]) -> tuple[Version, bool]:
        """Log model_file to run_id, register it as a new version, and make it champion when
        gate(current champion) says so, the champion read under the lock. Returns (version, promoted)."""
        client = self._client()
        self.log_model(run_id, model_file)
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        with self._lock(name):
            if not client.search_registered_models(f"name = '{name}'"):
                client.create_registered_model(name, description="digits models; alias 'champion' = the promoted one")
            created = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
            current = self.champion(name)
            promoted = gate(current)
            if promoted:
                self._move_champion(client, name, str(created.version), current)
        return self._version(client.get_model_version(name, created.version), self._aliases(client, name)), promoted

    def promote(self, name: str, version: str) -> Version:
        client = self._client()
        with self._lock(name):
            try:
                target = client.get_model_version(name, version)
            except Exception as exc:  # MLflow's RestException/MlflowException for an unknown model or version
                if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
                    raise DigitsInputError(f"{name} has no version {version} (see `digits registry show {name}`)") from None
                raise
            self._move_champion(client, name, str(target.version), self.champion(name))
        return self._version(client.get_model_version(name, version), self._aliases(client, name))

    def rollback(self, name: str) -> Version:
        """Move champion back to the version it replaced."""
        client = self._client()
        with self._lock(name):
            current = self.champion(name)
            if current is None:
                raise DigitsInputError(f"{name} has no champion to roll back")
            previous = current.tags.get(PREVIOUS)
            if not previous:
                raise DigitsInputError(f"{name} version {current.version} replaced no earlier champion")
            client.set_registered_model_alias(name, CHAMPION, previous)
        return self._version(client.get_model_version(name, previous), self._aliases(client, name))

    def _move_champion(self, client, name: str, version: str, current: Version | None) -> None:
        if current is not None and current.version != version:
            client.set_model_version_tag(name, version, PREVIOUS, current.version)
        client.set_registered_model_alias(name, CHAMPION, version)

    @staticmethod
    def _aliases(client, name: str) -> dict[str, list[str]]:
        try:
            model = client.get_registered_model(name)
        except Exception as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc):
                return {}
            raise
        by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        return by_version

    @staticmethod
    def _version(found, aliases: dict[str, list[str]]) -> Version:
        return Version(name=found.name, version=str(found.version), run_id=found.run_id, source=found.source,
                       tags=dict(found.tags or {}), aliases=sorted(aliases.get(str(found.version), [])))
