"""Resuming a sweep whose driver was killed: the state file ``<storage_path>/<name>.sweep_state.json`` (parent run
id, parameter digest, finished arms), the digest that says whether a re-run is the same sweep, and the clean-up
of MLflow runs that the resumed search replaced.

When the parameters are unchanged, a re-run reuses the parent run and continues the unfinished arm with
``Tuner.restore``: finished and errored trials are kept, unfinished ones resume from their checkpoints in their
own runs. An unfinished sweep with other parameters is closed in MLflow and started afresh.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from study.atomic import atomic_write_text
from study.config import StudyParams
from study.tracking import SweepTracker, close_abandoned

STATE_SUFFIX = ".sweep_state.json"  # <storage_path>/<sweep name><suffix>: what a re-run needs to resume


def _params_digest(params: StudyParams, fingerprint: str, uri: str) -> str:
    """What makes a re-run the same sweep: the trial sections, the sweep (not its output path), the data and
    the tracking store."""
    dump = params.model_dump(mode="json")
    key = {
        "model": dump["model"], "likelihood": dump["likelihood"], "train": dump["train"],
        "sweep": {k: v for k, v in dump["sweep"].items() if k not in ("output", "ray_start_timeout_s")},
        "experiment": dump["tracking"]["experiment"], "tracking_uri": uri, "data": fingerprint,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read_state(state_path: Path) -> dict[str, Any] | None:
    """The saved sweep state, or None when there is none or it is unreadable (then the sweep starts afresh)."""
    if not state_path.is_file():
        return None
    try:
        return json.loads(state_path.read_text())
    except json.JSONDecodeError:
        return None


def _resumable_state(state_path: Path, digest: str, client, experiment_id: str) -> dict[str, Any] | None:
    """The saved state of an unfinished sweep with the same parameters, else None (a fresh sweep; an
    unfinished one with other parameters is closed in MLflow first)."""
    state = _read_state(state_path)
    if state is None or state.get("status") == "finished":
        return None
    if state.get("params_digest") != digest:
        print(f"an unfinished sweep in {state_path.parent} had other parameters: starting afresh "
              f"(its parent run {state.get('parent_run_id')} is marked KILLED)", flush=True)
        if state.get("experiment_id") == experiment_id and state.get("parent_run_id"):
            close_abandoned(client, experiment_id, state["parent_run_id"])
        return None
    try:
        client.get_run(state["parent_run_id"])
    except Exception:
        return None  # the parent run is gone (store reset): nothing to resume into
    return state


def _drop_orphans(tracker: SweepTracker, known: set[str]) -> None:
    """Soft-delete child runs of trials that Ray no longer knows: a driver killed less than an experiment
    snapshot (~10 s) after starting a trial leaves its run behind, and the resumed search replaces the trial."""
    client = tracker.client
    runs = client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'",
        max_results=10000,
    )
    for run in runs:
        trial_id = run.data.tags.get("ray_trial_id")
        if trial_id and trial_id not in known:
            print(f"removing MLflow run {run.info.run_id} of trial {trial_id}: the killed driver started it after "
                  "Ray's last experiment snapshot, so the resumed sweep replaced it", flush=True)
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="KILLED")
            client.delete_run(run.info.run_id)


def _save_state(state_path: Path, state: dict[str, Any]) -> None:
    """Write the sweep's state file atomically (a killed driver leaves the previous version, never half a file)."""
    atomic_write_text(state_path, json.dumps(state, indent=2, default=str) + "\n")


class SweepLockedError(RuntimeError):
    """Another live driver holds this sweep's lock (the message names its PID)."""


def acquire_lock(storage: Path, name: str):
    """Hold ``<storage>/<name>.lock`` for the life of this process (``fcntl.flock``), so two drivers never share one
    sweep's Ray results and state file. The kernel drops the lock when the holder dies, however it dies, so a
    killed driver never leaves a stale lock. Returns the open lock file (keep a reference to it).

    Raises:
        SweepLockedError: a live process holds it; the message names its PID.
    """
    import fcntl
    import os

    storage.mkdir(parents=True, exist_ok=True)
    path = storage / f"{name}.lock"
    handle = open(path, "a+")  # noqa: SIM115 - held open until the process exits
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise SweepLockedError(
            f"sweep {name!r} is already running in process {holder} (lock {path}); wait for it to finish or stop "
            f"it (kill {holder}) before running the sweep again"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def finished_summary(state_path: Path, digest: str, client) -> dict[str, Any] | None:
    """The summary of a sweep that already finished with these parameters, read back from its MLflow parent run
    (``sweep_summary.json``), or None (no such sweep, other parameters, or its runs are gone from MLflow).

    A stage that is re-run after its sweep finished but before DVC recorded it (e.g. ``dvc repro`` stopped while
    the sweep was ending) rewrites the summary from this instead of training the same sweep again.
    """
    import tempfile

    state = _read_state(state_path)
    if state is None or state.get("status") != "finished" or state.get("params_digest") != digest:
        return None
    try:
        run = client.get_run(state["parent_run_id"])
        if run.info.status != "FINISHED" or run.info.lifecycle_stage != "active":
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(state["parent_run_id"], "sweep_summary.json", tmp)
            return json.loads(Path(path).read_text())
    except Exception:  # the run or its artifact is gone: train afresh
        return None
