"""Whether a server accepts connections, found out in seconds: MLflow's HTTP client and Dask's would otherwise
retry for minutes (about 4 and 5½) before failing with a traceback."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

TIMEOUT = 5.0  # seconds to wait for a TCP connection


def unreachable(url: str, default_port: int, timeout: float = TIMEOUT) -> str | None:
    """Why `url` (scheme://host:port) does not accept a TCP connection within timeout seconds ("connection
    refused", "timed out", "name or service not known", ...), or None when it does."""
    try:
        parts = urlsplit(url if "://" in url else f"tcp://{url}")
        port = parts.port or default_port
        socket.create_connection((parts.hostname or "localhost", port), timeout=timeout).close()
    except TimeoutError:
        return "timed out"
    except socket.gaierror as exc:
        return (exc.strerror or str(exc)).lower()
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    except ValueError as exc:  # a port that is not a number or out of range
        return f"not a host:port address ({exc})"
    return None


def check_scheduler(address: str) -> None:
    """Raise ServiceUnavailable (one line) within seconds when the Dask scheduler at `address` (dask.address)
    does not accept connections: Dask's client would retry for minutes and then print tracebacks."""
    from schemas.errors import ServiceUnavailable

    reason = unreachable(address, 8786)
    if reason is not None:
        raise ServiceUnavailable(f"Dask scheduler {address} unreachable ({reason}): start it (`dask scheduler`, "
                                 "then `dask worker ADDRESS` on each machine), or unset dask.address to run on a "
                                 "LocalCluster")
