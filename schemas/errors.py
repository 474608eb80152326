"""Errors a user can cause or fix. The CLI renders each as one line: DigitsInputError exits 2,
ServiceUnavailable exits 1 (design: 1 for anything that is not bad input); anything else is a bug."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    """An exception and every exception it was raised from or while handling, outermost first: where a
    library's wrapped cause (a refused connection, a damaged database) is looked for."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class DigitsInputError(Exception):
    """Bad input or usage: a file, value or option the user can fix."""


class DataFormatError(DigitsInputError):
    """A data file that does not have the expected layout, located to file, line and column."""

    def __init__(self, path: str | Path, message: str, *, line: int | None = None,
                 column: int | None = None) -> None:
        self.path, self.line, self.column, self.reason = str(path), line, column, message
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {message}")


class DamagedArtifact(DigitsInputError):
    """A stage output that is not what its stage wrote (changed, missing or added since run.json recorded
    it): nothing reads it."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class DamagedRun(DigitsInputError):
    """A run whose run.json cannot be read or is not a run record."""


class ConfigError(DigitsInputError):
    """A `--set key=value` override or config file the config models reject."""


class ValidationFailed(DigitsInputError):
    """The data failed its expectation suites: the run stops before conversion."""


class LabelHealthFailed(DigitsInputError):
    """The label review estimates more wrong labels than review.fail_share allows: the run stops before training."""


class OutOfSpace(Exception):
    """The disk filled up (ENOSPC): not bad input, the environment; the run is resumable once space is
    freed. The CLI renders it as one line, exit 1."""


class ServiceUnavailable(Exception):
    """A server the pipeline talks to (an MLflow tracking server) cannot be reached. Not bad input: it
    may pass on a later try (`digits resume` continues the run once it is back; the ingest task's
    Prefect retries count it as transient, like every error that is not bad input)."""


class TrainingDiverged(DigitsInputError):
    """A training whose loss became NaN or infinite: its settings (a learning rate too high) are the user's to
    change. Nothing after it runs, so no such model is evaluated or registered."""
