"""Preloaded into each worker of the LocalCluster that `convert.runner=dask` starts (dask's `preload`).

A worker unpickles the pipeline's DoFns, which imports Apache Beam; imported plainly, Beam's BigQuery
client logs a warning through the root logger that would land on the user's terminal once per
worker. Importing it here, quietly, first keeps the workers' stderr for real errors. Workers of a
cluster you run yourself (`dask.address`) can preload this module too:
`dask worker --preload components.convert.dask_worker SCHEDULER`.

When the conversion is done the cluster closes its workers, then its scheduler. On a busy machine a
worker's process can outlive the wait for it, and its next heartbeat finds the scheduler gone: dask
logs that as an ERROR with two chained tracebacks, on a run that succeeded (CI saw it once in about
twenty runs). A scheduler lost in the middle of a conversion fails the Beam job, which `digits convert`
reports as its one line, so that log record says nothing the user needs and is dropped here.
"""

import logging

from components.convert.transforms import import_beam

HEARTBEAT_LOST = "Failed to communicate with scheduler during heartbeat"


class _DropLostHeartbeat(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HEARTBEAT_LOST)


logging.getLogger("distributed.worker").addFilter(_DropLostHeartbeat())
import_beam()
