"""MLflow system metrics of a sweep trial, sampled in the trial's Ray worker and logged to its MLflow child run.

The driver creates each trial's child run (``study.sweep_callback``, in Tune's ``on_trial_start``, which Tune
calls before it lets the trial's function run), so the worker finds its run by the tags the driver set
(``mlflow.parentRunId`` + ``ray_trial_id``) and runs MLflow's own ``SystemMetricsMonitor`` on it while the trial
trains. The monitor samples the worker's node every ``tracking.system_metrics_interval_s`` seconds and logs
``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes`` /
``system/system_memory_usage_percentage``, disk and network counters and, where ``nvidia-ml-py`` finds NVIDIA
GPUs, ``system/gpu_<i>_utilization_percentage`` / ``system/gpu_<i>_memory_usage_megabytes`` /
``..._percentage`` / power for every GPU of the node (NVML's indices, the physical ones Ray's ``ray_gpu_ids``
tag names). The values are the node's, not the trial's own process: trials sharing a node show the same load.

These are the only MLflow writes from a worker (one ``log_batch`` per sample, a ``get_run`` per sample to stop
when the run is no longer RUNNING); every other write of a sweep is the driver's. A worker that cannot see the
tracking store (a SQLite file that is not on its node) logs nothing rather than creating a stray store.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from study.config import absolute_sqlite_url

_logger = logging.getLogger(__name__)

#: Seconds a worker waits for the driver's child run of its trial to be visible in the tracking store.
FIND_RUN_TIMEOUT_S = 10.0
#: MLflow's HTTP client retries a failing call for minutes; a worker's monitor gives up on a sample instead
#: (set in the worker process only, where system metrics are its one use of MLflow), so that an unreachable
#: server never holds up a trial's end, where the monitor is joined.
WORKER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def monitor_settings(tracking, parent_run_id: str, experiment_id: str, cwd: str | Path) -> dict[str, Any] | None:
    """What a trial's worker needs to log system metrics (a plain dict Ray hands to the trainable), or None when
    ``tracking.system_metrics`` is off.

    Args:
        tracking: the validated ``tracking`` section (:class:`study.config.TrackingConfig`).
        parent_run_id / experiment_id: the sweep's parent run and its experiment.
        cwd: the driver's working directory (see :func:`absolute_sqlite_url`).
    """
    if not tracking.system_metrics:
        return None
    from study.tracking import tracking_uri

    return {
        "tracking_uri": absolute_sqlite_url(tracking_uri(tracking), cwd),
        "experiment_id": experiment_id,
        "parent_run_id": parent_run_id,
        "interval_s": float(tracking.system_metrics_interval_s),
    }


def _store_reachable(uri: str) -> bool:
    """False for a SQLite store whose file is not on this node (MLflow would create an empty one there)."""
    if uri.startswith("sqlite:///"):
        return Path(unquote(uri[len("sqlite:///"):])).is_file()
    return True


def find_trial_run(settings: dict[str, Any], trial_id: str, timeout_s: float = FIND_RUN_TIMEOUT_S) -> str | None:
    """The run id of trial ``trial_id``'s child run under ``settings['parent_run_id']``, polled for up to
    ``timeout_s`` seconds; None when it does not appear (the tracking store is unreachable from here)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings["tracking_uri"])
    query = (f"tags.`mlflow.parentRunId` = '{settings['parent_run_id']}' and tags.ray_trial_id = '{trial_id}'")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            runs = client.search_runs([settings["experiment_id"]], filter_string=query, max_results=1)
        except Exception as err:  # MLflow raises many types for an unreachable store
            _logger.warning("system metrics: cannot search the tracking store: %s", err)
            runs = []
        if runs:
            return runs[0].info.run_id
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


@contextmanager
def trial_system_metrics(settings: dict[str, Any] | None, trial_id: str) -> Iterator[str | None]:
    """Log MLflow system metrics to trial ``trial_id``'s run while the ``with`` block runs (in the trial's worker).

    Yields the run id it logs to, or None (``settings`` is None, or the store or run is not reachable from this
    node: the trial trains all the same). On exit the monitor stops and flushes what it sampled; samples are
    stepped 0, 1, ... and a restarted trial continues after its run's last system-metric step. A trial shorter
    than one sampling interval logs no sample (MLflow's monitor publishes only whole intervals).
    """
    if not settings:
        yield None
        return
    for key, value in WORKER_HTTP_ENV.items():
        os.environ.setdefault(key, value)
    if not _store_reachable(settings["tracking_uri"]):
        _logger.warning("system metrics: tracking store %s is not on this node; none logged",
                        settings["tracking_uri"])
        yield None
        return
    run_id = find_trial_run(settings, trial_id)
    if run_id is None:
        _logger.warning("system metrics: no MLflow run of trial %s found; none logged", trial_id)
        yield None
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=settings["interval_s"], samples_before_logging=1, resume_logging=True,
        tracking_uri=settings["tracking_uri"],
    )
    monitor.start()
    try:
        yield run_id
    finally:
        monitor.finish()


__all__ = ["absolute_sqlite_url", "find_trial_run", "monitor_settings", "trial_system_metrics"]
