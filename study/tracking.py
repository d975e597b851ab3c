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
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from study.config import StudyParams, TrackingConfig, TrialConfig

# Artifact transfers are small files; per-file progress bars only clutter the stage logs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "ray_trial_id"
MAX_PARAM_LENGTH = 6000
# Per-epoch values logged as metrics besides the train_* and val_* ones.
EPOCH_METRICS = ("epoch_seconds", "beta", "variance_minimiser_alpha")
# Seconds a tracking server gets to answer the health check before the sweep gives up.
HEALTH_TIMEOUT_S = float(os.environ.get("STUDY_MLFLOW_HEALTH_TIMEOUT_S", "10"))
# Checkpoint entries needed only to resume training, left out of the copy logged to MLflow.
TRAINING_ONLY_STATE = {"optimiser", "optimisers", "auxiliary_optimiser", "generator", "torch_rng", "collapse_run"}


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be reached; raised before a sweep starts so no logs are lost."""


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
    uri = tracking_uri(config)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        experiment = client.get_experiment_by_name(config.experiment)
        if experiment is not None:
            return client, experiment.experiment_id
        location = None
        if not uri.startswith(("http://", "https://", "databricks")):
            location = Path(config.artifact_root).resolve().as_uri()
        return client, client.create_experiment(config.experiment, artifact_location=location)
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
    """

    def __init__(
        self,
        client: MlflowClient,
        experiment_id: str,
        params: StudyParams,
        data_fingerprint: str,
        parent_run_id: str | None = None,
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
            client.update_run(parent_run_id, status="RUNNING")
        else:
            run = client.create_run(
                experiment_id,
                run_name=params.sweep.name,
                tags={"sweep_name": params.sweep.name, "data_sha256": data_fingerprint, "kind": "sweep"},
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
            },
        )
        run_id = run.info.run_id
        self.children[trial_id] = run_id
        flat = flatten(config.model_dump(mode="json"))
        self._log_params(run_id, flat)
        self.client.log_dict(run_id, {k: v for k, v in overrides.items()}, "config/sampled.yaml")
        self.client.log_text(run_id, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
                             "config/trial_config.yaml")
        return run_id

    def run_id(self, trial_id: str) -> str | None:
        """The child run of a trial, also one that an earlier driver of a resumed sweep created."""
        if trial_id not in self.children and (found := self._find_child(trial_id)) is not None:
            self.children[trial_id] = found
        return self.children.get(trial_id)

    def log_epoch(self, trial_id: str, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Log one epoch's numeric metrics (step = ``epoch``) and ``extra`` values as metrics of that step."""
        run_id = self.children[trial_id]
        step = int(metrics.get("epoch", metrics.get("training_iteration", 0)))
        if step <= self.logged_steps.get(trial_id, 0):
            return  # already logged by the driver that ran this epoch first
        now = int(time.time() * 1000)
        values = {
            k: v for k, v in metrics.items() if k.startswith(("train_", "val_")) or k in EPOCH_METRICS
        } | (extra or {})
        batch = [
            Metric(k, float(v), now, step)
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if batch:
            self.client.log_batch(run_id, metrics=batch)
        self.epochs_run[trial_id] = step

    def set_tags(self, trial_id: str, tags: dict[str, Any]) -> None:
        """Set tags on a trial's run, skipping a write when none changed (e.g. where the trial runs)."""
        known = self.tags_set.setdefault(trial_id, {})
        changed = {k: str(v) for k, v in tags.items() if v is not None and known.get(k) != str(v)}
        if changed:
            self.client.log_batch(self.children[trial_id], tags=[RunTag(k, v) for k, v in changed.items()])
            known |= changed

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
        self.client.set_terminated(self.parent_run_id, status=status)


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


__all__ = ["SweepTracker", "TrackingUnavailableError", "close_abandoned", "connect", "flatten", "tracking_uri"]
