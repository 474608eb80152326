"""The process set-up digits needs around Prefect, done explicitly — by the CLI (flows.cli.main), the flow
(flows.pipeline.digits), the local API (flows.local_api) and the Dask jobs (flows.on_dask) — never as a side
effect of importing a module.

- `environment()`: defaults for variables Prefect and TensorFlow read once, when first imported (so it runs
  before they are): no Prefect analytics; 120 s for the local API's first start (a fresh PREFECT_HOME's database
  migrations took 8-19 s on a busy 2-core machine, against Prefect's default limit of 20 s); TensorFlow's C++ log
  at errors, and its Python logger with it (its warnings, "tf.function retracing", are advice to TensorFlow's
  developers, and would reach Prefect's console handler on the root logger, which prints to stdout, where
  `digits predict` writes its answers); TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 (TensorFlow's x86 build puts every
  allocation of 4 KB or more of its oneDNN kernels in a BFC pool that grows to a training's peak and never
  shrinks; with malloc, what a stage freed goes back to the system between stages, flows.runner's
  release_memory — ~200 MB less held after a training, the same epoch time: docs/benchmarks.md). A value the
  user set wins.
- `one_line_errors()`: a DigitsInputError (the user's to fix), a ServiceUnavailable (names the server) or an
  OutOfSpace is logged by Prefect's flow- and task-run loggers as its message, not a traceback — in the CLI and in
  a Prefect worker's flow-run process alike (it imports the flow from its entrypoint and calls it).
- `console_logs_to_stdout()`: Prefect's console log lines (progress) to stdout, stderr kept for errors.
"""

from __future__ import annotations

import logging
import os
import sys

ENVIRONMENT = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
               "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"}


def environment() -> None:
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if os.environ["TF_CPP_MIN_LOG_LEVEL"].strip() in ("2", "3"):
        logging.getLogger("tensorflow").setLevel(logging.ERROR)


class _NoInputErrorTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from schemas.errors import DigitsInputError, OutOfSpace, ServiceUnavailable

        if record.exc_info and isinstance(record.exc_info[1], (DigitsInputError, ServiceUnavailable, OutOfSpace)):
            record.exc_info, record.exc_text = None, None
        return True


def _filtered(filterer: logging.Filterer) -> None:
    """The no-traceback filter on a logger or handler, once."""
    if not any(isinstance(f, _NoInputErrorTraceback) for f in filterer.filters):
        filterer.addFilter(_NoInputErrorTraceback())


def one_line_errors() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        _filtered(logging.getLogger(name))


class CurrentStream:
    """Writes to whatever sys.stdout (or sys.stderr) is at the time of writing — callers and tests may swap it;
    closing it closes nothing."""

    def __init__(self, name: str = "stdout") -> None:
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()

    def close(self) -> None:
        pass

    def isatty(self) -> bool:
        return getattr(sys, self.name).isatty()


def console_logs_to_stdout() -> None:
    one_line_errors()
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler":
            stream = CurrentStream("stdout")
            if getattr(handler.stream, "closed", False):  # the stream of its set-up time, closed since (a test's
                handler.stream = stream  # capture): setStream would flush it first, and raise
            else:
                handler.setStream(stream)
            handler.console.file = stream
            _filtered(handler)
