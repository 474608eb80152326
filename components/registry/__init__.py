"""The model registry, as the pipeline sees it: `digits-<source>` registered models, a version per
gate-passing model, the alias `champion` on the promoted one, lineage carried as tags.

`Registry` is the interface the stages, `digits predict` and `digits registry` use; MLflow is its one
implementation (components.registry.mlflow; flows.stages.registry opens it). Users name models as
`models:/NAME@ALIAS` or `models:/NAME/VERSION`.

Every version records the file name and sha256 of its model (tags `digits.model_file`,
`digits.model_sha256`) when it is registered; `download` returns exactly that file and refuses one
whose bytes differ, so nothing but the registered model is ever loaded from the registry. Documents
kept with a version (its seen-image set, its model card) are recorded the same way (`digits.files`)
and read back only through `fetch`, which checks them too.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from schemas.errors import DigitsInputError

CHAMPION = "champion"
PREVIOUS = "digits.previous_champion"  # on a promoted version: the champion it replaced (for rollback)
MODEL_FILE = "digits.model_file"
MODEL_SHA256 = "digits.model_sha256"
FILES = "digits.files"  # JSON {file name: sha256} of the documents kept with a version (seen.npz, the model card)


def model_name(source: str) -> str:
    return f"digits-{source}"


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # a registered model (digits registers digits-<source>)
ALIAS = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,254}")  # MLflow's alias rule, less its reserved forms (below)


def checked_name(name: str) -> str:
    """A registered model's name, refused in one line unless it is letters, digits, '.', '_' and '-' (a name
    becomes a lock file's name and a search filter: `../x` or a quote must never reach either)."""
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise DigitsInputError(f"{name!r} is not a model name: letters, digits, '.', '_' and '-' (e.g. digits-mnist; "
                               "see `digits registry list`)")
    return name


def checked_version(version: str) -> str:
    """A version number, refused in one line unless it is one."""
    if not version.isascii() or not version.isdigit() or int(version) < 1:
        raise DigitsInputError(f"{version!r} is not a version number (1, 2, ...; see `digits registry show NAME`)")
    return str(int(version))


def checked_alias(alias: str) -> str:
    """An alias, refused in one line unless MLflow can hold it: letters, digits, '_' and '-', not `latest` and not
    of the form v<number> (MLflow reserves both)."""
    if not ALIAS.fullmatch(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise DigitsInputError(f"{alias!r} is not an alias: letters, digits, '_' and '-', starting with a letter "
                               "(e.g. champion)")
    return alias


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`, each checked."""
    rest = uri.removeprefix("models:/")
    if rest == uri or not rest:
        raise DigitsInputError(f"'{uri}' is not a registry URI: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in name:
            return checked_name(name), checked_alias(alias), None
    else:
        name, _, number = rest.partition("/")
        if name and number.isdigit():
            return checked_name(name), None, checked_version(number)
    raise DigitsInputError(f"'{uri}' is not a registry URI: expected models:/NAME@ALIAS or models:/NAME/VERSION")


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    tags: dict[str, str]
    aliases: list[str]
    source: str = ""  # where the registry keeps its files (an MLflow artifact URI)
    description: str = ""  # why it was, or was not, promoted

    @property
    def champion(self) -> bool:
        return CHAMPION in self.aliases

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


Gate = Callable[[Version | None], bool]


class Registry(abc.ABC):
    """What the pipeline needs of a model registry."""

    location: str  # where it is, as people name it (a tracking URI)

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Every registered model."""

    @abc.abstractmethod
    def versions(self, name: str) -> list[Version]:
        """Every version of a model, oldest first; [] for an unknown model."""

    @abc.abstractmethod
    def champion(self, name: str) -> Version | None:
        """The version with the champion alias, or None (unknown model, or none promoted yet)."""

    @abc.abstractmethod
    def resolve(self, uri: str) -> Version:
        """The version a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI names. Raises DigitsInputError."""

    @abc.abstractmethod
    def alias_version(self, name: str, alias: str) -> str | None:
        """The version number an alias names now, in one cheap look-up (None: it names none); what a server
        following an alias asks before every answer."""

    def change_token(self) -> object | None:
        """Something that changes whenever the registry may have changed, cheaper to read than any look-up (a local
        store's file state), or None where no such thing is known (ask the registry)."""
        return None

    @abc.abstractmethod
    def download(self, version: Version, dst: Path) -> Path:
        """The version's registered model file, copied under dst and checked against its recorded sha256.
        Raises DigitsInputError when the version has no recorded file or its bytes differ."""

    @abc.abstractmethod
    def register(self, name: str, model_file: Path, lineage: dict[str, str], gate: Gate,
                 files: dict[str, Path] | None = None, example=None) -> tuple[Version, bool]:
        """Register model_file as a new version of name with the lineage tags and the documents `files`
        (name -> local file, see attach), and make it champion when gate(current champion) says so, that
        champion read under the registry's lock (two racing registrations cannot both win against a stale
        one). A Keras model is registered as a model the registry's own tools load and serve; example:
        canonical images (uint8 [N, 28, 28]), the first shown as its input example. Returns (version, promoted)."""

    @abc.abstractmethod
    def describe(self, version: Version, text: str) -> None:
        """Set the version's description (why it was, or was not, promoted)."""

    @abc.abstractmethod
    def migrate(self, name: str) -> list[tuple[Version, str]]:
        """Make every Keras version of name registered before versions were MLflow Models into one, in place (same
        version, model file, tags and aliases). Returns (version, what was done) per version."""

    @abc.abstractmethod
    def attach(self, version: Version, files: dict[str, Path]) -> dict[str, str]:
        """Keep documents with a version (name -> local file; a name already kept is replaced), their
        sha256 recorded. Returns name -> where the registry keeps each (a URI people can open)."""

    @abc.abstractmethod
    def fetch(self, version: Version, name: str, dst: Path) -> Path | None:
        """A document kept with the version, copied under dst and checked against its recorded sha256;
        None when the version has none of that name. Raises DigitsInputError when its bytes differ."""

    @abc.abstractmethod
    def location_of(self, version: Version, name: str) -> str | None:
        """Where the registry keeps a document of the version (a URI), or None."""

    @abc.abstractmethod
    def promote(self, name: str, version: str, reason: str = "", by: str = "") -> Version:
        """Make version the champion (the replaced one stays a version), recorded in its history with why and by
        whom. Raises DigitsInputError."""

    @abc.abstractmethod
    def rollback(self, name: str, reason: str = "", by: str = "") -> Version:
        """Move champion back to the version the current champion replaced, recorded in its history. Raises
        DigitsInputError."""

    @abc.abstractmethod
    def history(self, name: str) -> list[dict]:
        """Every move of the champion alias, oldest first: {at, alias, from, to, why, by}."""


def kept_files(version: Version) -> dict[str, str]:
    """name -> sha256 of the documents kept with a version."""
    import json

    try:
        found = json.loads(version.tags.get(FILES, "{}"))
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


LEDGER = "registry-ledger.json"  # in $DIGITS_HOME: the versions this home registered, per registry location


def registered_before(home: Path, registry: Registry) -> dict[str, list[str]]:
    """The versions this home registered at registry's location, per model (its ledger), newest last."""
    import json

    try:
        found = json.loads((home / LEDGER).read_text()).get(registry.location, {})
    except (OSError, ValueError, AttributeError):
        return {}
    return found if isinstance(found, dict) else {}


def check_not_replaced(home: Path, registry: Registry, name: str, *, allow_new: bool) -> None:
    """Refuse to register into a registry that lost what this home registered there (its database deleted
    or replaced: MLflow silently makes a new, empty one), unless allow_new."""
    earlier = registered_before(home, registry).get(name, [])
    if earlier and not allow_new and not registry.versions(name):
        raise DigitsInputError(
            f"the registry at {registry.location} has no {name}, but this home registered version"
            f"{'s' if len(earlier) > 1 else ''} {', '.join(earlier)} of it there: it was deleted or replaced. "
            "Restore it, or --set evaluate.allow_new_registry=true to start a new one")


def remember(home: Path, registry: Registry, version: Version) -> None:
    """Add a registration to this home's ledger (read, add, write under a lock: runs that register at
    once would otherwise each write the ledger they read, and the last would drop the others' versions)."""
    import json

    from schemas.runs import locked, write_json_atomic

    path = home / LEDGER
    with locked(path):
        try:
            ledger = json.loads(path.read_text())
        except (OSError, ValueError):
            ledger = {}
        versions = ledger.setdefault(registry.location, {}).setdefault(version.name, [])
        if version.version not in versions:
            versions.append(version.version)
        write_json_atomic(path, ledger)
