"""The Prefect API of a local `digits run`: Prefect's own ephemeral server, started before Prefect is imported.

With no PREFECT_API_URL, Prefect starts a temporary API server when a flow makes its first API call:
its client first imports Prefect's whole server package (~2 s) and then waits for the server to boot
(~3.5 s), in series with everything else. `digits run` instead launches the very same server (the
uvicorn command of Prefect's ephemeral mode: UI off, the database under PREFECT_HOME) as its first act,
so the boot overlaps the imports of TensorFlow and Prefect; the flow then runs against it, and it stops
when the command ends. A server configured by the user (PREFECT_API_URL in the environment, or in
Prefect's settings: the active profile, prefect.toml, .env) is used as is.

This module imports no Prefect until `connect` (it must run before Prefect is imported to gain anything).
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from schemas.errors import ServiceUnavailable

EXIT_STARTUP_FAILED = 3  # uvicorn's exit code when it could not start: its port taken, or its app's start-up failed
START_LOCK = ".digits-api-start.lock"  # in PREFECT_HOME: one server at a time creates or migrates its database
_SERVER_ENV = {  # as prefect.server.api.server.SubprocessASGIServer
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}


class LocalAPI:
    """One process's Prefect API server: `launch()` first, `connect()` before the flow, stopped at exit."""

    _current: LocalAPI | None = None

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.log = None  # the server's stderr, kept off the command's own (read when it fails)

    @classmethod
    def launch(cls) -> LocalAPI | None:
        """Start the server in the background (once per process); None when PREFECT_API_URL names one."""
        from flows import setup

        setup.environment()  # its start-up limit, before Prefect is imported
        if os.environ.get("PREFECT_API_URL"):
            return None
        if cls._current is None:
            api = cls()
            api._start()
            atexit.register(api.stop)
            cls._current = api
        return cls._current

    def _start(self) -> None:
        self.port = free_port()
        prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
        env = {**os.environ, **_SERVER_ENV}
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(os.getpid()), "--app-dir", str(prefect_dir.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stderr=self.log)

    def connect(self) -> None:
        """Point this process's Prefect at the server once it answers (the flow, its log and event
        workers, their flush at exit), unless the user's Prefect settings name a server: this one then
        stops. Raises RuntimeError when it does not answer within
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS."""
        from prefect.context import refresh_global_settings_context
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        if settings.api.url:
            self.stop()
            return
        self._wait(settings.server.ephemeral.startup_timeout_seconds)
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{self.port}/api"
        os.environ["PREFECT_UI_URL"] = ""  # UI off, as in Prefect's ephemeral mode: no "View at" links
        refresh_global_settings_context()

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == EXIT_STARTUP_FAILED and not _free(self.port):  # another process took the port: a new one
                self._start()
            elif code is not None:
                raise ServiceUnavailable(f"Prefect's local API server exited with code {code} while starting: "
                                         f"{self._last_error()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise ServiceUnavailable(f"Prefect's local API server did not answer within {timeout:g} s: on a busy machine "
                                 "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set PREFECT_API_URL to a "
                                 "running Prefect server")

    def _last_error(self) -> str:
        self.log.seek(0)
        lines = [line for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1].strip() if lines else "no output"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if LocalAPI._current is self:
            LocalAPI._current = None


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(parent: int, uvicorn_args: list[str]) -> None:
    """The server process: uvicorn with these arguments, stopped (SIGTERM) when the `digits` process
    that started it dies, even by SIGKILL (Linux; elsewhere at that process's exit only)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        sys.exit(1)
    # Bookkeeping yields to the pipeline: idle, the server still wakes ~190 times a second (docket's
    # polling, its in-memory Redis) for ~3 % of one core, which a 2-core machine would take from training.
    if hasattr(os, "nice"):
        os.nice(10)
    _start_alone(int(uvicorn_args[uvicorn_args.index("--port") + 1]))
    sys.argv = ["uvicorn", *uvicorn_args]
    runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)


def _start_alone(port: int) -> None:
    """Hold PREFECT_HOME's start lock until this server answers: its start-up creates or migrates the
    database and registers block types, and two servers doing that at once on a new PREFECT_HOME crashed
    one of them mid-migration (`no such index`). A second `digits run` waits the few seconds it takes."""
    import fcntl
    import threading

    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    lock = open(home / START_LOCK, "w")  # closed (released) when this process ends, whatever ends it
    fcntl.flock(lock, fcntl.LOCK_EX)

    def release_once_up() -> None:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()

    threading.Thread(target=release_once_up, daemon=True).start()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2:])
