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
import time
import urllib.error
import urllib.request
from pathlib import Path

EXIT_PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind its port
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

    @classmethod
    def launch(cls) -> LocalAPI | None:
        """Start the server in the background (once per process); None when PREFECT_API_URL names one."""
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
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(os.getpid()), "--app-dir", str(prefect_dir.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL)

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
            if code == EXIT_PORT_IN_USE:  # another process took the port first: a new one
                self._start()
            elif code is not None:
                raise RuntimeError(f"Prefect's local API server exited with code {code} while starting")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Prefect's local API server did not answer within {timeout:.0f} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

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
    sys.argv = ["uvicorn", *uvicorn_args]
    runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2:])
