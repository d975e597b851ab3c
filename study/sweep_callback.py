"""The MLflow side of a running sweep: a driver-side Ray Tune callback that mirrors every trial into one MLflow
child run under the sweep's parent run (params, per-epoch metrics, checkpoints, node tags, restarts, the final
status with ``failure_reason``), through :class:`study.tracking.SweepTracker`. MLflow params cannot change, so
the values PBT mutates are logged per epoch as metrics (``beta``, ``variance_minimiser_alpha``, ``pbt.<path>``).

Training never waits on the tracking store: the callback only queues its writes, and a
:class:`study.tracking.TrackingWriter` thread sends them. While the store does not answer, the console says so
once (and once more when it is back) and the trials train on; an outage longer than ``tracking.outage_budget_s``
stops the sweep (Tune's own stop, which saves the experiment's state) with one :class:`TrackingOutageError`.
What MLflow missed is filled in from Ray's ``result.json`` of each trial after the arm's search
(:func:`catch_up`), on the run that ends the outage or on the re-run.

A trial that raises or loses its worker is restarted from its last checkpoint in the same MLflow run, up to
``sweep.max_failures`` times; after that it is a FAILED run and the sweep goes on.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import study.sweep_ray  # noqa: F401  (first: it sets Ray's environment switches before ray is imported)

# isort: split
from ray.tune import Callback

from study.config import StudyParams, TrialConfig
from study.likelihoods import trial_elbo_valid
from study.sweep_space import _overrides, resolve_overrides
from study.tracking import SweepTracker, TrackingOutageError, TrackingWriter, epoch_metrics, read_results

# What the callback's pickle (Tune keeps it in the experiment's tuner.pkl for Tuner.restore) leaves out: the
# MLflow client and the writer thread, rebuilt from the carried tracking URI, experiment and parent run ids.
_RUNTIME = ("_tracker", "_writer", "_stopping")


class MlflowCallback(Callback):
    """Driver-side Tune callback that mirrors trials into MLflow child runs (see ``study.tracking``).

    It carries what reconnects it to the sweep (tracking URI, experiment id, parent run id, the params and data
    fingerprint the child runs are tagged with), so a copy unpickled by ``Tuner.restore`` opens its own client
    and writer on first use.

    Args:
        tracker: the driver's tracker of the sweep (its experiment, parent run, params and data fingerprint are
            taken; the callback writes through a tracker of its own, from the writer's thread).
        base: the arm's trial config; epochs: the arm's ``train.epochs``; variant, metric, mode: the arm's name
            and selection metric; mutations: PBT's mutated paths.
        uri: the tracking URI (``study.tracking.tracking_uri``).
        outage_budget_s: ``tracking.outage_budget_s``.
    """

    def __init__(
        self,
        tracker: SweepTracker,
        base: TrialConfig,
        epochs: int,
        variant: str,
        metric: str,
        mode: str,
        mutations: tuple[str, ...] = (),
        *,
        uri: str,
        outage_budget_s: float,
    ) -> None:
        self.uri = uri
        self.experiment_id = tracker.experiment_id
        self.parent_run_id = tracker.parent_run_id
        self.params: StudyParams = tracker.params
        self.data_fingerprint = tracker.data_fingerprint
        self.outage_budget_s = float(outage_budget_s)
        self.base = base
        self.epochs = epochs
        self.variant, self.metric, self.mode = variant, metric, mode
        self.mutations = mutations
        self.trial_ids: set[str] = set()
        self._tracker: SweepTracker | None = None
        self._writer: TrackingWriter | None = None
        self._stopping = False

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _RUNTIME}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tracker, self._writer, self._stopping = None, None, False

    @property
    def writer(self) -> TrackingWriter:
        """The writer thread of this callback, started on first use (also in an unpickled copy)."""
        if self._writer is None:
            from mlflow.tracking import MlflowClient

            self._tracker = SweepTracker(MlflowClient(tracking_uri=self.uri), self.experiment_id, self.params,
                                         self.data_fingerprint, parent_run_id=self.parent_run_id, attach=True)
            self._writer = TrackingWriter(self._tracker, self.uri, self.outage_budget_s)
        return self._writer

    def setup(self, **info) -> None:
        self.writer  # noqa: B018 - start the writer before the first trial

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.trial_ids.add(trial.trial_id)
        config = resolve_overrides(self.base, _overrides(trial.config))
        writer, tracker = self.writer, self._tracker
        writer.call(tracker.start_trial, trial.trial_id, _overrides(trial.config), config, trial_elbo_valid(config),
                    variant=self.variant, metric=self.metric, mode=self.mode)
        last = trial.last_result or {}
        if "epoch" in last:  # restored from an experiment snapshot: its epochs so far
            writer.call(tracker.epochs_run.setdefault, trial.trial_id, int(last["epoch"]))
        checkpoint = getattr(trial, "checkpoint", None)
        if checkpoint is not None:
            writer.call(tracker.checkpoints.setdefault, trial.trial_id, Path(checkpoint.path))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        mutated = {f"pbt.{path}": trial.config.get(path) for path in self.mutations}
        self.writer.log(
            trial.trial_id, epoch_metrics(result, mutated),
            {"ray_node_id": result.get("node_id"), "ray_node_ip": result.get("node_ip"),
             "hostname": result.get("hostname"), "ray_gpu_ids": result.get("gpu_ids"), "device": result.get("device")},
        )

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self.writer.call(self._tracker.remember_checkpoint, trial.trial_id, checkpoint.path)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        failures = trial.run_metadata.num_failures
        self.writer.log(trial.trial_id, [], {"ray_failures": failures})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.writer.call(self._tracker.finish_trial, trial.trial_id, "FINISHED", self.epochs)
        # The console line for this event comes from study.sweep_console.SweepConsole.

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        reason = _error_text(trial)
        self.writer.call(self._tracker.finish_trial, trial.trial_id, "FAILED", self.epochs, reason=reason)

    def on_step_end(self, iteration, trials, **info) -> None:
        if (fatal := self.writer.check()) is not None and not self._stopping:
            self._stopping = True
            _stop_tune(fatal)

    def on_experiment_end(self, trials, **info) -> None:
        """Every queued write sent before the driver goes on (it reads MLflow next); raises
        :class:`TrackingOutageError` when the store stayed away past the budget."""
        self.trial_ids |= {t.trial_id for t in trials}
        writer = self.writer
        try:
            writer.drain()
        finally:
            writer.close()


def _stop_tune(error: TrackingOutageError) -> None:
    """End the running Tune loop: with Tune's SIGINT handler in place (the driver's main thread), the stop it
    offers for Ctrl+C, which saves the experiment's state for ``Tuner.restore`` before ``on_experiment_end``
    raises ``error``; elsewhere by raising ``error`` at once."""
    if threading.current_thread() is threading.main_thread() and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER",
                                                                                  "0") in ("", "0"):
        signal.raise_signal(signal.SIGINT)
    else:
        raise error


def catch_up(tracker: SweepTracker, results, base: TrialConfig, epochs: int, variant: str, metric: str, mode: str,
             mutations: tuple[str, ...] = ()) -> tuple[int, int]:
    """After an arm's search: every trial's run in MLflow completed from Ray's record of the trial (its
    ``result.json`` and final state), for what the callback could not send (a tracking outage that ended an
    earlier driver, or a driver killed before its queue was sent). Returns (epochs logged, runs corrected)."""
    logged = corrected = 0
    for result in results:
        path = Path(result.path)
        trial_id = (result.metrics or {}).get("trial_id") or path.name
        config = resolve_overrides(base, _overrides(dict(result.config or {})))

        def start(trial_id=trial_id, config=config, sampled=_overrides(dict(result.config or {}))) -> str:
            return tracker.start_trial(trial_id, sampled, config, trial_elbo_valid(config), variant=variant,
                                       metric=metric, mode=mode)

        def extra(row: dict[str, Any]) -> dict[str, Any]:
            trial_config = row.get("config") or {}
            return {f"pbt.{p}": trial_config.get(p) for p in mutations}

        checkpoint = getattr(result, "checkpoint", None)
        n, fixed = tracker.catch_up(
            trial_id, read_results(path), "FAILED" if result.error else "FINISHED", epochs, start,
            reason=_error_line(result.error) if result.error else None,
            checkpoint=Path(checkpoint.path) if checkpoint is not None else None, extra=extra,
        )
        logged, corrected = logged + n, corrected + fixed
    if logged or corrected:
        print(f"MLflow brought up to date from Ray's results: {logged} epochs logged, {corrected} runs' status "
              "corrected", flush=True)
    return logged, corrected


def _error_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def _error_text(trial) -> str:
    """The last line of a trial's latest error (e.g. ``NonFiniteLossError: non-finite training loss ...``)."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [line for line in Path(path).read_text().strip().splitlines() if line.strip()]
        return lines[-1].strip() if lines else "trial failed"
    return str(getattr(trial, "error_msg", None) or "trial failed")
