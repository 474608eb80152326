"""Ensemble members and tune trials as Prefect tasks on a Dask cluster, through prefect-dask's DaskTaskRunner.

`train.workers > 1` (`tune.workers > 1`) starts a LocalCluster of that many worker processes on
127.0.0.1 (never more workers than jobs); `dask.address` sends them to a scheduler you run (`dask
scheduler`, then `dask worker tcp://HOST:8786` on every machine). Each member (trial) is one task of
the flow `ensemble-members` (`tune-trials`), a sub-flow of the stage that asked for it, so the Prefect
UI shows every job's state, logs and the worker it ran on.

What a worker needs: digits installed (the same version), the run folder at the same path
($DIGITS_HOME on a shared POSIX file system with atomic rename and flock: NFSv4, CephFS, Lustre with
-o flock; not an object-store mount) — jobs read the run's TFRecord shards and write into the stage
folder there — the same MLflow tracking URI (a server, not SQLite, when
workers are on other machines) and, for trials, a study storage they can all reach (tune.storage).
A job's TensorFlow gets the host's cores divided by the workers on that host, so N workers on one
machine do not oversubscribe it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows import setup
from flows.local_api import LocalAPI


def on_dask(address: str | None, workers: int, progress, *, flow_name: str = "ensemble-members",
            task_name: str = "train-member", what: str = "members") -> Callable[[list[Any]], list[dict]]:
    """An executor that runs jobs (ensemble members, tune trials: objects with `run(progress, worker)` and
    `describe()`) as Prefect tasks on Dask: on `address`, or on a LocalCluster of `workers` processes."""
    def execute(jobs: list[Any]) -> list[dict]:
        if address:  # seconds, where Dask's client would retry for minutes
            from components.reach import check_scheduler

            check_scheduler(address)
        api = LocalAPI.launch()  # the jobs report to the same Prefect API as this process (Prefect's settings
        if api is not None:  # context travels with each task to its worker)
            api.connect()
        from prefect import flow
        from prefect_dask import DaskTaskRunner

        if address:
            runner = DaskTaskRunner(address=address)
            where = f"the Dask cluster at {address}"
        else:
            n = min(workers, len(jobs))
            runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
                "n_workers": n, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
                "dashboard_address": ":0", "silence_logs": logging.ERROR,  # a free port (None still takes 8787)
                "preload": ["components.convert.dask_worker"]})
            where = f"a LocalCluster of {n} worker processes"
        progress(f"running {len(jobs)} {what} on {where}")
        job_task = _run_job.with_options(name=task_name)

        @flow(name=flow_name, task_runner=runner, log_prints=True)
        def jobs_on_dask() -> list[dict]:
            setup.console_logs_to_stdout()
            futures = [job_task.submit(job) for job in jobs]
            return [future.result() for future in futures]

        with _quiet("distributed", logging.ERROR), _quiet("prefect.task_runner.dask", logging.WARNING):
            return jobs_on_dask()

    return execute


@task(name="job", cache_policy=NO_CACHE)
def _run_job(job: Any) -> dict:
    """One job, in a Dask worker: TensorFlow limited to this host's share of the cores."""
    from distributed import get_client, get_worker
    from prefect import get_run_logger

    setup.console_logs_to_stdout()
    worker = get_worker()
    host = _host(worker.address)
    on_host = sum(1 for w in get_client().scheduler_info(n_workers=-1)["workers"] if _host(w) == host) or 1
    threads = max(1, (os.cpu_count() or 1) // on_host)
    _limit_tensorflow_threads(threads)
    logger = get_run_logger()
    name = worker.name if worker.name is not None else worker.address
    logger.info("%s on worker %s (%s), %d TensorFlow threads", job.describe(), name, worker.address, threads)
    return job.run(logger.info, worker=f"{name} ({worker.address})")


@contextlib.contextmanager
def _quiet(logger: str, level: int) -> Iterator[None]:
    """The cluster's own INFO chatter (every connection, the scheduler's start and close: Prefect's console
    handler shows the `distributed` loggers) off the console while the members run."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(max(level, before))
    try:
        yield
    finally:
        log.setLevel(before)


def _host(address: str) -> str:
    return address.split("://", 1)[-1].rsplit(":", 1)[0]


def _limit_tensorflow_threads(threads: int) -> None:
    from components.tensorflow_runtime import import_tensorflow

    tf = import_tensorflow()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:  # this worker process trained a member already: its runtime keeps its threads
        pass
