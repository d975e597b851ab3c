"""The MLflow side of a running sweep: a driver-side Ray Tune callback that mirrors every trial into one MLflow
child run under the sweep's parent run (params, per-epoch metrics, checkpoints, node tags, restarts, the final
status with ``failure_reason``), through :class:`study.tracking.SweepTracker`. MLflow params cannot change, so
the values PBT mutates are logged per epoch as metrics (``beta``, ``variance_minimiser_alpha``, ``pbt.<path>``).

A trial that raises or loses its worker is restarted from its last checkpoint in the same MLflow run, up to
``sweep.max_failures`` times; after that it is a FAILED run and the sweep goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import study.sweep_ray  # noqa: F401  (first: it sets Ray's environment switches before ray is imported)

# isort: split
from ray.tune import Callback

from study.config import TrialConfig
from study.likelihoods import trial_elbo_valid
from study.sweep_space import _overrides, resolve_overrides
from study.tracking import SweepTracker

# Trackers of the sweeps this process runs, by parent run id: a callback unpickled by Tuner.restore finds its
# tracker here instead of carrying an MLflow client through a pickle.
_TRACKERS: dict[str, SweepTracker] = {}


class MlflowCallback(Callback):
    """Driver-side Tune callback that mirrors trials into MLflow child runs (see ``study.tracking``).

    Pickled with the Tuner's state without its tracker; an unpickled copy (``Tuner.restore``) takes the tracker
    that :func:`run_sweep` registered for the same parent run.
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
    ) -> None:
        self.tracker = tracker
        self.parent_run_id = tracker.parent_run_id
        _TRACKERS[self.parent_run_id] = tracker
        self.base = base
        self.epochs = epochs
        self.variant, self.metric, self.mode = variant, metric, mode
        self.mutations = mutations
        self.trial_ids: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "tracker"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.tracker = _TRACKERS.get(self.parent_run_id)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.trial_ids.add(trial.trial_id)
        config = resolve_overrides(self.base, _overrides(trial.config))
        self.tracker.start_trial(
            trial.trial_id, _overrides(trial.config), config, trial_elbo_valid(config),
            variant=self.variant, metric=self.metric, mode=self.mode,
        )
        last = trial.last_result or {}
        if "epoch" in last:  # restored from an experiment snapshot: its epochs so far
            self.tracker.epochs_run.setdefault(trial.trial_id, int(last["epoch"]))
        checkpoint = getattr(trial, "checkpoint", None)
        if checkpoint is not None and trial.trial_id not in self.tracker.checkpoints:
            self.tracker.remember_checkpoint(trial.trial_id, checkpoint.path)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        mutated = {f"pbt.{path}": trial.config.get(path) for path in self.mutations}
        self.tracker.log_epoch(trial.trial_id, result, extra=mutated)
        self.tracker.set_tags(
            trial.trial_id,
            {"ray_node_id": result.get("node_id"), "ray_node_ip": result.get("node_ip"),
             "hostname": result.get("hostname"), "ray_gpu_ids": result.get("gpu_ids"), "device": result.get("device")},
        )

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self.tracker.remember_checkpoint(trial.trial_id, checkpoint.path)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        failures = trial.run_metadata.num_failures
        self.tracker.set_tags(trial.trial_id, {"ray_failures": failures})
        print(f"trial {trial.trial_id} failed ({_error_text(trial)}); restart {failures} of "
              f"{'unlimited' if trial.max_failures < 0 else trial.max_failures} from its last checkpoint", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.tracker.finish_trial(trial.trial_id, "FINISHED", self.epochs)
        done = self.tracker.epochs_run.get(trial.trial_id, 0)
        last = trial.last_result or {}
        print(f"trial {trial.trial_id} finished after {done}/{self.epochs} epochs"
              f"{' (stopped early)' if done < self.epochs else ''}: {self.metric} {last.get(self.metric, float('nan')):.1f} "
              f"{dict(trial.config)}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        reason = _error_text(trial)
        self.tracker.finish_trial(trial.trial_id, "FAILED", self.epochs, reason=reason)
        print(f"trial {trial.trial_id} FAILED: {reason}", flush=True)

    def on_experiment_end(self, trials, **info) -> None:
        self.trial_ids |= {t.trial_id for t in trials}


def _error_text(trial) -> str:
    """The last line of a trial's latest error (e.g. ``NonFiniteLossError: non-finite training loss ...``)."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [line for line in Path(path).read_text().strip().splitlines() if line.strip()]
        return lines[-1].strip() if lines else "trial failed"
    return str(getattr(trial, "error_msg", None) or "trial failed")
