"""Import TensorFlow (and TFDS) without its native start-up chatter on stderr; hand the memory a finished stage
freed back to the system (`release_memory`).

TensorFlow's C++ side writes absl's "All log messages before absl::InitializeLog()" preamble and
an oneDNN info line straight to file descriptor 2 during import, whatever TF_CPP_MIN_LOG_LEVEL
says. Stderr is where the CLI puts its one-line errors, so the import runs with fd 2 captured and
every captured line except those known notices is written back.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from types import ModuleType

_NOTICE = re.compile(rb"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
                     rb"TF-TRT Warning|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|"
                     rb"This TensorFlow binary is optimized to use available CPU instructions|"
                     rb"To enable the following instructions|rebuild TensorFlow with the appropriate compiler flags")


def import_tensorflow() -> ModuleType:
    """`import tensorflow`, quietly. Returns the module."""
    return _quiet_import("tensorflow")


def import_tfds() -> ModuleType:
    """`import tensorflow_datasets`, quietly, with its progress bars off. Returns the module."""
    _quiet_import("tensorflow")  # TFDS imports it lazily, outside any capture
    tfds = _quiet_import("tensorflow_datasets")
    tfds.disable_progress_bar()
    return tfds


_IMPORTING = threading.RLock()


def _quiet_import(name: str) -> ModuleType:
    """One thread at a time: a second thread (Beam's multi-threaded DirectRunner sets up its DoFns at once) would
    find the module in sys.modules half-imported and fail on a name it has not defined yet, and the two would
    swap file descriptor 2 under each other."""
    with _IMPORTING:
        return _import_capturing_stderr(name)


def _import_capturing_stderr(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            module = __import__(name)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not _NOTICE.search(line)]
            if kept:
                os.write(2, b"".join(kept))
    return module


def release_memory() -> None:
    """Give back to the system what a finished stage freed: Python's cycles collected, Arrow's memory pool's unused
    pages (the data stages' record batches), then glibc's malloc_trim, which returns the free pages of every malloc
    arena (TensorFlow frees a training's tensors from its many threads' arenas, where they would otherwise stay
    counted in the process's RSS; off glibc there is nothing to call)."""
    import ctypes
    import gc

    gc.collect()
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
