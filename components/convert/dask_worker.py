"""Preloaded into each worker of the LocalCluster that `convert.runner=dask` starts (dask's `preload`).

A worker unpickles the pipeline's DoFns, which imports Apache Beam; imported plainly, Beam's BigQuery
client logs a warning through the root logger that would land on the user's terminal once per
worker. Importing it here, quietly, first keeps the workers' stderr for real errors. Workers of a
cluster you run yourself (`convert.dask_address`) can preload this module too:
`dask worker --preload components.convert.dask_worker SCHEDULER`.
"""

from components.convert.transforms import import_beam

import_beam()
