"""MLflow tracking of a sweep: one parent run per sweep, one child run per trial.

Ray Tune's own MLflow callback has no parent/child runs, so this module creates the parent on the driver and
tags every child with ``mlflow.parentRunId`` itself. All writes happen on the driver (the sweep's Tune
callback calls :class:`SweepTracker`), which keeps a local SQLite store free of concurrent writers and makes a
restarted or resumed trial reuse its run (looked up by its ``ray_trial_id`` tag) instead of duplicating it.

Each child run gets:
- params: the full resolved trial config, flattened (``likelihood.gaussian.sigma_mode`` ...);
- tags: ``mlflow.parentRunId``, ``ray_trial_id``, ``config_hash``, ``data_sha256`` (the prepared data's
  fingerprint from its manifest), ``likelihood_family``, ``elbo_valid``, and on completion ``epochs_run``,
  ``early_stopped`` and, for failed trials, ``failure_reason``;
- metrics: every per-epoch metric with ``step`` = epoch, including the effective ``beta`` and
  ``variance_minimiser_alpha`` of that epoch (PBT mutates them; MLflow params cannot change, metrics can) and,
  under PBT, ``pbt.<dotted path>`` for every mutated config value;
- tags set while it runs: ``ray_node_id``, ``ray_node_ip``, ``hostname``, ``ray_gpu_ids`` (the GPUs Ray gave
  the trial, ``none`` without; trials with fractional shares of one GPU all name it) and ``device`` (the torch device it trained
  on), all where the latest epoch ran, and ``ray_failures`` (restarts after a failure);
- artifacts: ``config/trial_config.yaml``, every PNG grid of the last checkpoint under ``images/``
  (``reconstructions.png``: validation inputs above their reconstructions; ``samples.png``: prior samples;
  ``sample_decomposition.png`` for the structured likelihood: mu, eps, mu + eps; AVAE's
  ``decoder_reconstructions.png``), ``checkpoint/state.pt`` + ``checkpoint/config.yaml`` (weights and what rebuilds the model, loadable with
  ``study.train.load_checkpoint``) and ``checkpoint/metrics.json``.

Training never waits on the tracking store: the sweep's Tune callback hands its writes to a
:class:`TrackingWriter`, whose thread sends them (consecutive writes of one trial merged into one ``log_batch``)
and retries them while the store does not answer. The console says once that the store stopped answering and
once that it is back; an outage longer than ``tracking.outage_budget_s`` ends the sweep with
:class:`TrackingOutageError`, and the re-run fills in from Ray's per-trial ``result.json`` what MLflow missed
(:meth:`SweepTracker.catch_up`).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from study.config import StudyParams, TrackingConfig, TrialConfig
from study.tracking_lineage import declare_model_training, entry_point, log_splits, source_tags
from study.tracking_summary import describe_sweep

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "ray_trial_id"
MAX_PARAM_LENGTH = 6000
# Per-epoch values logged as metrics besides the train_* and val_* ones.
EPOCH_METRICS = ("epoch_seconds", "beta", "variance_minimiser_alpha")
# Seconds a tracking server gets to answer the health check before the sweep gives up.
HEALTH_TIMEOUT_S = float(os.environ.get("STUDY_MLFLOW_HEALTH_TIMEOUT_S", "10"))
# Checkpoint entries needed only to resume training, left out of the copy logged to MLflow.
TRAINING_ONLY_STATE = {"optimiser", "optimisers", "auxiliary_optimiser", "generator", "torch_rng", "collapse_run"}
# A write in flight this long counts as the start of an outage (MLflow's own HTTP retries can hold one call for
# minutes before it fails, MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT).
NOTICE_AFTER_S = 30.0
# MLflow caps one log_batch at 1000 metrics and 100 tags.
MAX_BATCH_METRICS, MAX_BATCH_TAGS = 1000, 100


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be reached; raised before a sweep starts so no logs are lost."""


class TrackingOutageError(TrackingUnavailableError):
    """The tracking store stopped answering during a sweep for longer than ``tracking.outage_budget_s``: the
    sweep stopped (Ray kept every trial's results) and a re-run with the server back brings MLflow up to date."""


def tracking_uri(config: TrackingConfig) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``tracking.uri`` from params.yaml."""
    return os.environ.get("MLFLOW_TRACKING_URI") or config.uri


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{path}.")
        else:
            flat[path] = value
    return flat


def connect(config: TrackingConfig) -> tuple[MlflowClient, str]:
    """An MLflow client for the configured store and the id of the study's experiment (created if absent).

    Raises:
        TrackingUnavailableError: the store or server does not answer (the message names the URI).
    """
    # Artifact transfers are small files; per-file progress bars only clutter the stage logs.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri(config)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        experiment = client.get_experiment_by_name(config.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None
            if not uri.startswith(("http://", "https://", "databricks")):
                location = Path(config.artifact_root).resolve().as_uri()
            experiment_id = client.create_experiment(config.experiment, artifact_location=location)
        declare_model_training(client, experiment_id)  # the UI then opens on the runs table
        return client, experiment_id
    except Exception as err:  # MLflow raises many types for an unreachable store
        raise TrackingUnavailableError(
            f"cannot reach the MLflow tracking store at {uri!r}: {err}. Start the server, or fix tracking.uri in "
            "params.yaml / MLFLOW_TRACKING_URI."
        ) from err


def _check_server(uri: str) -> None:
    """One quick GET of the server's ``/health`` (MLflow's client would retry for minutes): any HTTP answer
    counts as reachable, no answer within ``HEALTH_TIMEOUT_S`` raises TrackingUnavailableError."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy, an older server): let MLflow's own calls judge
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnavailableError(
            f"the MLflow tracking server at {uri!r} did not answer within {HEALTH_TIMEOUT_S:g} s ({reason}). "
            "Start it (`mlflow server --host 127.0.0.1 --port ...`), or fix MLFLOW_TRACKING_URI / tracking.uri."
        ) from err


class SweepTracker:
    """Creates and fills a sweep's parent run and its trials' child runs (driver side only).

    Args:
        client: from :func:`connect`.
        experiment_id: the study's experiment.
        params: the whole validated params.yaml (logged on the parent run).
        data_fingerprint: sha256 of the prepared data (``study.data.store.data_fingerprint``).
        parent_run_id: reuse an existing parent run (resuming a sweep) instead of creating one; it is set
            back to RUNNING.
        attach: with ``parent_run_id``, only write into it (the sweep callback's own tracker): no MLflow call here.
    """

    def __init__(
        self,
        client: MlflowClient,
        experiment_id: str,
        params: StudyParams,
        data_fingerprint: str,
        parent_run_id: str | None = None,
        attach: bool = False,
    ) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.params = params
        self.data_fingerprint = data_fingerprint
        self.children: dict[str, str] = {}
        self.epochs_run: dict[str, int] = {}
        self.checkpoints: dict[str, Path] = {}
        # Last epoch already in MLflow for a child run found again by a new driver (a resumed sweep): epochs
        # the trial repeats after resuming from an older experiment snapshot are not logged twice.
        self.logged_steps: dict[str, int] = {}
        self.tags_set: dict[str, dict[str, str]] = {}
        if parent_run_id is not None:
            if not attach:
                client.update_run(parent_run_id, status="RUNNING")
        else:
            run = client.create_run(
                experiment_id,
                run_name=params.sweep.name,
                tags={"sweep_name": params.sweep.name, "data_sha256": data_fingerprint, "kind": "sweep",
                      **source_tags(entry_point())},
            )
            parent_run_id = run.info.run_id
            sweep_params = flatten({"sweep": params.sweep.model_dump(mode="json")})
            self._log_params(parent_run_id, sweep_params)
            client.log_text(parent_run_id, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False),
                            "config/params.yaml")
        self.parent_run_id = parent_run_id

    # ------------------------------------------------------------------------------------------ helpers
    def _log_params(self, run_id: str, flat: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(flat.items())]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[start : start + 100])

    def _find_child(self, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.{TRIAL_TAG} = '{trial_id}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    # ------------------------------------------------------------------------------------------ trials
    def start_trial(
        self,
        trial_id: str,
        overrides: dict[str, Any],
        config: TrialConfig,
        elbo_valid: bool,
        variant: str = "",
        metric: str = "",
        mode: str = "",
    ) -> str:
        """The child run of a trial: the existing one (a restored trial) or a new one. Returns its run id."""
        if trial_id in self.children:
            return self.children[trial_id]
        existing = self._find_child(trial_id)
        if existing is not None:
            self.children[trial_id] = existing
            self.client.update_run(existing, status="RUNNING")
            if not self.client.get_run(existing).data.params:  # created, then the store went away: finish it
                self._log_trial_config(existing, overrides, config)
            steps = [m.step for m in self.client.get_metric_history(existing, "epoch_seconds")]
            if steps:
                self.logged_steps[trial_id] = self.epochs_run[trial_id] = max(steps)
            return existing
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.params.sweep.name}-{trial_id}",
            tags={
                PARENT_TAG: self.parent_run_id,
                TRIAL_TAG: trial_id,
                "config_hash": config.digest(),
                "data_sha256": self.data_fingerprint,
                "likelihood_family": config.family,
                "elbo_valid": str(elbo_valid).lower(),
                "sweep_name": self.params.sweep.name,
                "sweep_variant": variant or config.family,
                "selection_metric": metric or self.params.sweep.metric,
                "selection_mode": mode or self.params.sweep.mode,
                **source_tags(entry_point()),
            },
        )
        run_id = run.info.run_id
        self.children[trial_id] = run_id
        self._log_trial_config(run_id, overrides, config)
        log_splits(self.client, run_id, config.data_dir, {"train": "training", "val": "validation"})
        return run_id

    def _log_trial_config(self, run_id: str, overrides: dict[str, Any], config: TrialConfig) -> None:
        self._log_params(run_id, flatten(config.model_dump(mode="json")))
        self.client.log_dict(run_id, {k: v for k, v in overrides.items()}, "config/sampled.yaml")
        self.client.log_text(run_id, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
                             "config/trial_config.yaml")

    def run_id(self, trial_id: str) -> str | None:
        """The child run of a trial, also one that an earlier driver of a resumed sweep created."""
        if trial_id not in self.children and (found := self._find_child(trial_id)) is not None:
            self.children[trial_id] = found
        return self.children.get(trial_id)

    def log_epoch(self, trial_id: str, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Log one epoch's numeric metrics (step = ``epoch``) and ``extra`` values as metrics of that step."""
        self.send(trial_id, epoch_metrics(metrics, extra), {})

    def set_tags(self, trial_id: str, tags: dict[str, Any]) -> None:
        """Set tags on a trial's run, skipping a write when none changed (e.g. where the trial runs)."""
        self.send(trial_id, [], tags)

    def send(self, trial_id: str, metrics: list[Metric], tags: dict[str, Any]) -> None:
        """One trial's metrics (of any epochs) and tags, in as few ``log_batch`` calls as MLflow allows. Epochs
        an earlier driver of a resumed sweep logged already and tags that did not change are left out."""
        run_id = self.children.get(trial_id)
        if run_id is None:  # its start was refused by the store (reported then): nothing to write into
            return
        logged = self.logged_steps.get(trial_id, 0)
        metrics = [m for m in metrics if m.step > logged]
        known = self.tags_set.setdefault(trial_id, {})
        changed = {k: str(v) for k, v in tags.items() if v is not None and known.get(k) != str(v)}
        self._log_batches(run_id, metrics, [RunTag(k, v) for k, v in changed.items()])
        known |= changed
        if metrics:
            self.epochs_run[trial_id] = max(self.epochs_run.get(trial_id, 0), max(m.step for m in metrics))

    def _log_batches(self, run_id: str, metrics: list[Metric], tags: list[RunTag]) -> None:
        chunks = max(-(-len(metrics) // MAX_BATCH_METRICS), -(-len(tags) // MAX_BATCH_TAGS))
        for i in range(chunks):
            self.client.log_batch(run_id, metrics=metrics[i * MAX_BATCH_METRICS : (i + 1) * MAX_BATCH_METRICS],
                                  tags=tags[i * MAX_BATCH_TAGS : (i + 1) * MAX_BATCH_TAGS])

    def catch_up(
        self,
        trial_id: str,
        rows: list[dict[str, Any]],
        status: str,
        epochs: int,
        start: Callable[[], str],
        reason: str | None = None,
        checkpoint: Path | None = None,
        extra: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> tuple[int, bool]:
        """Bring a trial's run up to date with Ray's own record of the trial, e.g. on the re-run after a tracking
        outage that ended the sweep: the epochs of ``rows`` (the trial's ``result.json`` lines, one per report;
        for an epoch reported twice, after a restore, the later line) that MLflow lacks are logged with their own
        step and time, and a run whose status is not ``status`` (FINISHED / FAILED, Ray's verdict) is finished
        as the callback would have finished it (checkpoint artifacts, ``epochs_run`` tags).

        Args:
            start: creates the trial's run when the store never saw its start (returns its run id).
            extra: per row, values logged as metrics of that epoch besides the row's own (PBT's ``pbt.<path>``).

        Returns:
            (number of epochs logged, whether the run's status was corrected).
        """
        run_id = self.run_id(trial_id) or start()
        self.children[trial_id] = run_id
        by_step = {int(row.get("epoch", row.get("training_iteration", 0))): row for row in rows}
        by_step.pop(0, None)
        logged = {m.step for m in self.client.get_metric_history(run_id, "epoch_seconds")}
        missing = [step for step in sorted(by_step) if step not in logged]
        metrics = [
            metric
            for step in missing
            for metric in epoch_metrics(by_step[step], extra(by_step[step]) if extra else None,
                                        timestamp_ms=int(float(by_step[step].get("timestamp", time.time())) * 1000))
        ]
        self._log_batches(run_id, metrics, [])
        corrected = False
        if self.client.get_run(run_id).info.status != status:
            self.epochs_run[trial_id] = max(by_step, default=0)
            if checkpoint is not None:
                self.checkpoints[trial_id] = Path(checkpoint)
            self.finish_trial(trial_id, status, epochs, reason=reason)
            corrected = True
        return len(missing), corrected

    def remember_checkpoint(self, trial_id: str, directory: str | Path) -> None:
        self.checkpoints[trial_id] = Path(directory)

    def finish_trial(self, trial_id: str, status: str, epochs: int, reason: str | None = None) -> None:
        """Upload the trial's last checkpoint artifacts and close its run as FINISHED or FAILED."""
        run_id = self.children.get(trial_id)
        if run_id is None:  # failed before it started (e.g. could not be scheduled)
            return
        checkpoint = self.checkpoints.get(trial_id)
        if checkpoint is not None and checkpoint.is_dir():
            for image in sorted(checkpoint.glob("*.png")):  # every grid the training loop drew
                self.client.log_artifact(run_id, str(image), "images")
            if (checkpoint / "metrics.json").is_file():
                self.client.log_artifact(run_id, str(checkpoint / "metrics.json"), "checkpoint")
            if (checkpoint / "state.pt").is_file():
                self._log_model_weights(run_id, checkpoint)
        done = self.epochs_run.get(trial_id, 0)
        tags = [RunTag("epochs_run", str(done)), RunTag("early_stopped", str(status == "FINISHED" and done < epochs).lower())]
        if reason:
            tags.append(RunTag("failure_reason", reason[:5000]))
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, status=status)

    def _log_model_weights(self, run_id: str, checkpoint: Path) -> None:
        """A slim, loadable copy of the checkpoint (``study.train.load_checkpoint`` reads it): the weights and
        what rebuilds the model, without optimiser and RNG states."""
        import tempfile

        import torch

        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
        slim = {k: v for k, v in state.items() if k not in TRAINING_ONLY_STATE}
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(slim, Path(tmp) / "state.pt")
            (Path(tmp) / "config.yaml").write_text((checkpoint / "config.yaml").read_text())
            self.client.log_artifact(run_id, str(Path(tmp) / "state.pt"), "checkpoint")
            self.client.log_artifact(run_id, str(Path(tmp) / "config.yaml"), "checkpoint")

    def interrupt(self) -> None:
        """The driver is stopping before the sweep finished (SIGINT / SIGTERM, or the process that started it died):
        the parent run and its still-RUNNING trials become KILLED, tagged ``interrupted_at`` (UTC, ISO 8601) and
        ``resume`` (how to continue). Re-running the sweep with the same parameters sets them RUNNING again and
        continues in the same runs."""
        from datetime import datetime, timezone

        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        hint = "re-run the sweep stage with the same params.yaml (uv run dvc repro) to resume into these runs"
        running = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and attributes.status = 'RUNNING'",
            max_results=10000,
        )
        for run_id in [r.info.run_id for r in running] + [self.parent_run_id]:
            self.client.log_batch(run_id, tags=[RunTag("interrupted_at", when), RunTag("resume", hint)])
            self.client.set_terminated(run_id, status="KILLED")

    def finish_sweep(self, status: str = "FINISHED", summary: dict[str, Any] | None = None) -> None:
        if summary:
            self.client.log_dict(self.parent_run_id, summary, "sweep_summary.json")
            describe_sweep(self.client, self.parent_run_id, summary)  # metrics, best-trial tags, run description
        self.client.set_terminated(self.parent_run_id, status=status)


def epoch_metrics(result: dict[str, Any], extra: dict[str, Any] | None = None,
                  timestamp_ms: int | None = None) -> list[Metric]:
    """One epoch's report as MLflow metrics with ``step`` = its ``epoch``: the ``train_*`` and ``val_*`` values,
    ``EPOCH_METRICS`` and ``extra``, numbers only; ``timestamp_ms`` defaults to now (ms since the epoch, UTC)."""
    step = int(result.get("epoch", result.get("training_iteration", 0)))
    when = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    values = {k: v for k, v in result.items() if k.startswith(("train_", "val_")) or k in EPOCH_METRICS} | (extra or {})
    return [Metric(k, float(v), when, step) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]


def read_results(trial_dir: str | Path) -> list[dict[str, Any]]:
    """A Ray trial's reports, from its ``result.json`` (one JSON object per line; a torn last line, from a
    killed driver, is skipped). Empty when the trial reported nothing."""
    path = Path(trial_dir) / "result.json"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _transient(error: BaseException) -> bool:
    """Whether a failed write may succeed later (the store did not answer, or answered with a server error),
    as opposed to a refusal that retrying would only repeat (an invalid value, a deleted run)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                                    "DEADLINE_EXCEEDED", "SERVICE_UNDER_MAINTENANCE")
    try:
        import requests

        if isinstance(error, requests.RequestException):
            return True
    except ImportError:  # pragma: no cover - MLflow depends on requests
        pass
    return isinstance(error, OSError | TimeoutError) or type(error).__name__ == "OperationalError"


class TrackingWriter:
    """Sends a :class:`SweepTracker`'s writes from a thread of its own, in the order they were queued, so that a
    sweep's driver (and so every trial's next epoch) never waits on the tracking store.

    Writes that fail because the store does not answer are retried (every ``retry_s``, doubling to 10 s) until
    it answers again; the console says once that it stopped answering (a failed write, or one in flight for more
    than ``notice_after_s``) and once that it is back. After ``budget_s`` seconds without an answer the writer
    gives up: :meth:`check` returns, and :meth:`drain` raises, a :class:`TrackingOutageError` whose message says
    how the re-run completes MLflow. A write the store refuses (an invalid value) is reported and dropped.
    Consecutive metrics and tags of one trial go out as one ``log_batch``.

    Args:
        tracker: the tracker whose methods the queued writes call (used from the writer's thread only).
        uri: the tracking URI, for the console lines.
        budget_s: seconds of outage after which the sweep is stopped (``tracking.outage_budget_s``).
        notice_after_s: seconds a single write may take before it counts as the start of an outage.
        retry_s: first wait before a failed write is retried.
        echo: where the console lines go (``print`` by default).
    """

    def __init__(self, tracker: SweepTracker, uri: str, budget_s: float, notice_after_s: float = NOTICE_AFTER_S,
                 retry_s: float = 1.0, echo: Callable[[str], None] | None = None) -> None:
        self.tracker, self.uri, self.budget_s = tracker, uri, float(budget_s)
        self.notice_after_s, self.retry_s = float(notice_after_s), float(retry_s)
        self._echo = echo or (lambda line: print(line, flush=True))
        self._queue: deque[tuple] = deque()
        self._cond = threading.Condition()
        self._inflight: tuple | None = None
        self._busy_since: float | None = None  # monotonic start of the write being sent
        self._failing_since: float | None = None  # monotonic start of the current outage
        self._announced = False
        self._closing = False
        self.fatal: TrackingOutageError | None = None
        self._thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ queueing (any thread)
    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue ``method(*args, **kwargs)`` (a tracker method)."""
        self._put(("call", method, args, kwargs))

    def log(self, trial_id: str, metrics: list[Metric] = (), tags: dict[str, Any] | None = None) -> None:
        """Queue metrics and tags of one trial (merged with the trial's neighbouring queued ones)."""
        self._put(("batch", trial_id, list(metrics), dict(tags or {})))

    def _put(self, item: tuple) -> None:
        with self._cond:
            if self.fatal is None:
                self._queue.append(item)
                self._cond.notify_all()

    def pending(self) -> int:
        """Writes queued or being sent."""
        with self._cond:
            return len(self._queue) + (self._inflight is not None)

    # ------------------------------------------------------------------ state (any thread)
    def outage_s(self) -> float | None:
        """Seconds the store has not answered (None: it answers)."""
        with self._cond:
            return self._outage_s_locked()

    def _outage_s_locked(self) -> float | None:
        now = time.monotonic()
        since = self._failing_since
        if since is None and self._busy_since is not None and now - self._busy_since > self.notice_after_s:
            since = self._busy_since
        return None if since is None else now - since

    def check(self) -> TrackingOutageError | None:
        """Print the outage line once an outage starts; the :class:`TrackingOutageError` once it has lasted
        longer than the budget (then nothing more is sent), else None."""
        with self._cond:
            outage = self._outage_s_locked()
            if outage is not None and not self._announced:
                self._announced = True
                self._echo(f"MLflow tracking store {self.uri} is not answering (for {outage:.0f} s): trials keep "
                           f"training and their logs are queued ({self._pending_locked()} writes); the sweep stops "
                           f"if it stays unreachable for tracking.outage_budget_s = {self.budget_s:g} s")
            if outage is not None and outage > self.budget_s and self.fatal is None:
                self.fatal = TrackingOutageError(
                    f"the MLflow tracking store {self.uri} did not answer for {outage:.0f} s, longer than "
                    f"tracking.outage_budget_s = {self.budget_s:g} s: the sweep stopped with "
                    f"{self._pending_locked()} writes unsent; Ray kept every trial's results, so re-running the "
                    "stage once the server is back resumes the sweep and brings MLflow up to date"
                )
                self._cond.notify_all()
            return self.fatal

    def _pending_locked(self) -> int:
        return len(self._queue) + (self._inflight is not None)

    def drain(self) -> None:
        """Wait until every queued write is sent.

        Raises:
            TrackingOutageError: the store stayed unreachable past the budget (now, or earlier).
        """
        while True:
            if (fatal := self.check()) is not None:
                raise fatal
            with self._cond:
                if not self._queue and self._inflight is None:
                    return
                self._cond.wait(0.5)

    def close(self) -> None:
        """Stop the thread once the queue is empty (after :meth:`drain`) or at once after an outage."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self.fatal is None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the writer's thread
    def _take(self) -> tuple | None:
        """The next write, with the queued metrics and tags of the same trial that follow it merged in."""
        item = self._queue.popleft()
        if item[0] != "batch":
            return item
        _, trial_id, metrics, tags = item
        while self._queue and self._queue[0][0] == "batch" and self._queue[0][1] == trial_id:
            _, _, more_metrics, more_tags = self._queue.popleft()
            metrics, tags = metrics + more_metrics, tags | more_tags
        return ("batch", trial_id, metrics, tags)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing and self.fatal is None:
                    self._cond.wait()
                if self.fatal is not None or not self._queue:
                    return
                self._inflight = self._take()
            self._send(self._inflight)
            with self._cond:
                self._inflight = None
                self._cond.notify_all()

    def _send(self, item: tuple) -> None:
        wait = self.retry_s
        while self.fatal is None:
            with self._cond:
                self._busy_since = time.monotonic()
            try:
                if item[0] == "call":
                    item[1](*item[2], **item[3])
                else:
                    self.tracker.send(item[1], item[2], item[3])
            except Exception as err:  # noqa: BLE001 - sorted into transient (retried) and refused (dropped)
                if not _transient(err):
                    lines = str(err).strip().splitlines()
                    self._echo(f"MLflow refused a write ({getattr(item[1], '__name__', item[1])}), dropped: "
                               f"{lines[-1] if lines else type(err).__name__}")
                    break
                with self._cond:
                    if self._failing_since is None:
                        self._failing_since = self._busy_since
                self.check()
                with self._cond:
                    self._busy_since = None
                    self._cond.wait_for(lambda: self.fatal is not None, timeout=wait)
                wait = min(2 * wait, 10.0)
                continue
            with self._cond:
                outage = self._outage_s_locked()
                back = self._announced
                self._failing_since = self._busy_since = None
                self._announced = False
                if back:
                    self._echo(f"MLflow tracking store {self.uri} answers again after {outage or 0:.0f} s: sending "
                               f"the {self._pending_locked()} queued writes")
            return
        with self._cond:
            self._busy_since = None


def close_abandoned(client: MlflowClient, experiment_id: str, parent_run_id: str) -> None:
    """Mark an unfinished sweep that will not be resumed (its parameters changed) and its still-RUNNING
    trials as KILLED, so the store shows no run as live forever."""
    try:
        parent = client.get_run(parent_run_id)
    except Exception:  # deleted, or another store: nothing to close
        return
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    )
    for run in children:
        client.set_terminated(run.info.run_id, status="KILLED")
    if parent.info.status in ("RUNNING", "FAILED"):
        client.set_terminated(parent_run_id, status="KILLED")


__all__ = ["SweepTracker", "TrackingOutageError", "TrackingUnavailableError", "TrackingWriter", "close_abandoned",
           "connect", "epoch_metrics", "flatten", "read_results", "tracking_uri"]
