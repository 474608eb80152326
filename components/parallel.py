"""Work spread over a Dask cluster in order: ingest's text blocks and validate's row groups (`dask.address`).

`ordered_map(fn, items, address)` is `map(fn, items)` whose calls run on the workers of the scheduler at
`address` (None: here, in this process), with at most `window` calls in flight: results come back in the
order of items, so a stage that writes what it is given writes the same bytes on one machine or many, and
memory holds a few items whatever the input's size. fn and the items travel to the workers by pickle: fn is
a module-level function of digits (the workers import digits, as for convert.runner=dask); a failure raised
by fn on a worker is raised here, as it would be in this process.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

WINDOW_PER_WORKER = 2  # calls in flight per worker: one running, one waiting for it


def ordered_map(fn: Callable[[T], R], items: Iterable[T], address: str | None) -> Iterator[R]:
    if address is None:
        yield from map(fn, items)
        return
    from distributed import Client

    from components.reach import check_scheduler

    check_scheduler(address)  # one line in seconds, not Dask's minutes of retries
    with Client(address, set_as_default=False) as client:
        window = max(1, WINDOW_PER_WORKER * len(client.scheduler_info(n_workers=-1).get("workers", {})))
        pending: deque = deque()
        try:
            for item in items:
                pending.append(client.submit(fn, item, pure=False))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # the consumer stopped early (a bad row in strict mode): drop the rest
                future.cancel()
