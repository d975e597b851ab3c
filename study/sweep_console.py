"""What a sweep prints: one line per trial event and one progress bar for the whole sweep, from a driver-side Ray
Tune :class:`~ray.tune.Callback`; and Ray's / Tune's own console output, which is off unless asked for.

Lines (stdout, through ``tqdm.write`` so they never break the bar)::

    trial 3aea03c6 started: {'train.beta': 1.35}
    trial 3aea03c6 epoch 1/3: val_elbo -6976.6
    trial 3aea03c6 failed at epoch 1/3 (NonFiniteLossError: ...); restart 1 of 1 from its last checkpoint
    trial 3aea03c6 restarted from its epoch-1 checkpoint
    trial 3aea03c6 FAILED at epoch 1/3: NonFiniteLossError: non-finite training loss at epoch 2: nan
    trial 41d54758 stopped early by ASHA at epoch 5/40: val_elbo -6873.9
    trial 41d54758 finished 40/40 epochs: val_elbo -6873.9 {'train.beta': 1.07}

Epoch lines come at epoch 1, every ``ceil(epochs / 4)`` epochs and the last (every epoch in verbose mode), so
the embedded study's console stays on two screens. The bar (stderr): trials done of the sweep's total over all
arms, failed count, and the best value so far of the current arm's selection metric.

Verbose mode (``STUDY_VERBOSE=1`` in the environment, or ``python -m pipelines.sweep --verbose``) brings back
what quiet mode turns off, all of it Ray's own switches:

- Tune's console reporter: quiet runs the legacy reporter (``RAY_AIR_NEW_OUTPUT=0``) at ``RunConfig(verbose=0)``,
  which prints nothing; verbose runs Tune's default output engine at ``verbose=1`` (its tables per trial).
- Worker output forwarded to the driver (``ray.init(log_to_driver=...)``): the trials' ``ray.train`` INFO lines
  ("Checkpoint successfully created at: ...", "Restored on ... from checkpoint") come from the worker
  processes; quiet mode leaves them in Ray's session logs (``/tmp/ray/session_latest/logs/worker-*``).
- The driver-side ERROR records of ``ray.tune`` that repeat a trial's traceback ("Trial task failed for trial",
  "Trials did not complete"): the failure line above carries the reason, the trial's ``error.txt`` the traceback.
- Optuna's INFO line per study ("A new study created in memory").
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import study.sweep_ray  # noqa: F401  (first: it sets Ray's environment switches before ray is imported)

# isort: split
from ray.tune import Callback
from tqdm import tqdm

from study.sweep_ray import verbose

#: Driver-side ``ray.tune`` ERROR records that only repeat, with Ray's traceback, a failure the console prints.
_REPEATED_ERRORS = ("Trial task failed for trial", "Trials did not complete")
_SCHEDULER_NAMES = {"asha": "ASHA", "pbt": "PBT", "fifo": "the scheduler"}


class _DropRepeatedErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_REPEATED_ERRORS)


_FILTER = _DropRepeatedErrors()


def configure_output() -> None:
    """Quiet mode (the default): switch off Tune's reporter output, the ``ray.tune`` ERROR records that repeat a
    trial's traceback and Optuna's INFO lines. Verbose mode (:func:`study.sweep_ray.verbose`): undo all of it.
    Worker log forwarding is set where Ray starts (:func:`study.sweep_ray.init_ray`)."""
    import optuna

    loggers = [logging.getLogger(name) for name in ("ray.tune.execution.tune_controller", "ray.tune.tune")]
    if verbose():
        os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        for logger in loggers:
            logger.removeFilter(_FILTER)
        optuna.logging.set_verbosity(optuna.logging.INFO)
        return
    # Read by Tune at every fit (ray.tune.experimental.output.get_air_verbosity): the legacy reporter honours
    # verbose=0, the default engine still prints its header and a table per failed trial.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for logger in loggers:
        logger.addFilter(_FILTER)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def tune_verbosity() -> int:
    """``RunConfig.verbose``: 0 in quiet mode (this module prints instead), 1 in verbose mode (Tune's tables)."""
    return 1 if verbose() else 0


def _checkpoint_epoch(checkpoint) -> int:
    """The epoch a trial checkpoint holds (its ``metrics.json``, written by ``study.train.run_trial``); 0: none."""
    if checkpoint is None:
        return 0
    try:
        return int(json.loads((Path(checkpoint.path) / "metrics.json").read_text()).get("epoch", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _write(line: str) -> None:
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


class SweepProgress:
    """The sweep's progress bar over all its arms' trials (tqdm, on stderr).

    Args:
        name: the sweep's name (the bar's label).
        total: trials in the whole sweep (``num_trials`` x arms).
        done: trials already finished or failed (a resumed sweep's finished arms).
    """

    def __init__(self, name: str, total: int, done: int = 0) -> None:
        self.failed = 0
        self.best: str = ""
        self.bar = tqdm(total=total, initial=done, desc=f"sweep {name}", unit="trial", file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0, bar_format="{desc}: {n}/{total} trials |{bar}| "
                        "{elapsed}<{remaining}{postfix}")

    def trial_done(self, failed: bool = False) -> None:
        self.failed += failed
        self.bar.update(1)
        self._postfix()

    def set_best(self, text: str) -> None:
        self.best = text
        self._postfix()

    def sync(self, done: int) -> None:
        """Set the count to ``done`` (after an arm: trials a restored arm had finished before the restart)."""
        if done != self.bar.n:
            self.bar.n = done
            self.bar.refresh()

    def _postfix(self) -> None:
        parts = ([f"{self.failed} failed"] if self.failed else []) + ([f"best {self.best}"] if self.best else [])
        self.bar.set_postfix_str(", ".join(parts))

    def close(self) -> None:
        self.bar.close()


#: Progress bars of the sweeps this process runs, by parent run id (a callback unpickled by ``Tuner.restore``
#: finds its bar here; a tqdm bar does not pickle).
_PROGRESS: dict[str, SweepProgress] = {}


class SweepConsole(Callback):
    """Driver-side Tune callback: one console line per trial event of one arm, and the sweep's bar.

    Args:
        key: the sweep's parent run id, under which :func:`run_sweep` registered the bar in ``_PROGRESS``.
        variant: the arm's name; shown in each line when ``show_arm`` (sweeps of several arms).
        metric, mode: the arm's selection metric and its direction (``"max"`` / ``"min"``).
        epochs: the arm's ``train.epochs`` (the horizon; a trial completing before it was stopped early).
        scheduler: ``sweep.scheduler.kind`` (names who stopped a trial early).
    """

    def __init__(self, key: str, variant: str, metric: str, mode: str, epochs: int, scheduler: str,
                 show_arm: bool = False) -> None:
        self.key = key
        self.variant, self.metric, self.mode = variant, metric, mode
        self.epochs = epochs
        self.scheduler = _SCHEDULER_NAMES.get(scheduler, scheduler)
        self.prefix = f"[{variant}] " if show_arm else ""
        self.every = 1 if verbose() else max(1, math.ceil(epochs / 4))
        self.started: set[str] = set()
        self.best: tuple[float, str] | None = None

    @property
    def progress(self) -> SweepProgress | None:
        return _PROGRESS.get(self.key)

    def _line(self, trial, text: str) -> None:
        _write(f"{self.prefix}trial {trial.trial_id} {text}")

    def _epoch(self, trial) -> int:
        last = trial.last_result or {}
        return int(last.get("epoch", last.get("training_iteration", 0)) or 0)

    def _value(self, trial) -> str:
        value = (trial.last_result or {}).get(self.metric)
        return f"{self.metric} {value:.1f}" if isinstance(value, (int, float)) else f"{self.metric} n/a"

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if trial.trial_id in self.started or self._epoch(trial):  # after a failure, or in a resumed sweep
            saved = _checkpoint_epoch(getattr(trial, "checkpoint", None))
            self._line(trial, f"restarted from its epoch-{saved} checkpoint" if saved else
                       "restarted from epoch 0 (no checkpoint yet)")
        else:
            self._line(trial, f"started: {dict(trial.config)}")
        self.started.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        epoch = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
            if better:
                self.best = (float(value), trial.trial_id)
                if self.progress is not None:
                    self.progress.set_best(f"{self.metric} {value:.1f} ({self.prefix}trial {trial.trial_id})")
        if epoch == 1 or epoch % self.every == 0 or epoch >= self.epochs:
            shown = f"{self.metric} {value:.1f}" if isinstance(value, (int, float)) else f"{self.metric} n/a"
            self._line(trial, f"epoch {epoch}/{self.epochs}: {shown}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        from study.sweep_callback import _error_text

        failures = trial.run_metadata.num_failures
        limit = "unlimited" if trial.max_failures < 0 else trial.max_failures
        self._line(trial, f"failed at epoch {self._epoch(trial)}/{self.epochs} ({_error_text(trial)}); "
                          f"restart {failures} of {limit} from its last checkpoint")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        done = self._epoch(trial)
        if done < self.epochs:
            self._line(trial, f"stopped early by {self.scheduler} at epoch {done}/{self.epochs}: {self._value(trial)}")
        else:
            self._line(trial, f"finished {done}/{self.epochs} epochs: {self._value(trial)} {dict(trial.config)}")
        if self.progress is not None:
            self.progress.trial_done()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        from study.sweep_callback import _error_text

        where = f" (traceback: {trial.error_file})" if verbose() and getattr(trial, "error_file", None) else ""
        self._line(trial, f"FAILED at epoch {self._epoch(trial)}/{self.epochs}: {_error_text(trial)}{where}")
        if self.progress is not None:
            self.progress.trial_done(failed=True)

