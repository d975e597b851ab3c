"""The Ray Tune trainable: one trial in its worker process, from the sampled values to ``study.train.run_trial``,
reporting every epoch's metrics, with a checkpoint when one was written (``train.checkpoint_interval_s``, the
last epoch, and the epochs the scheduler needs: :func:`scheduler_checkpoint_epochs`); where its prepared data is
on the worker's node; the test hooks.

Ray pickles :func:`_trainable` by reference to this module: a worker imports this module (not the driver,
``study.sweep``). A trial's directory is named after the function (``_trainable_<id>_<n>_...``), which the
``STUDY_TEST_NAN_TRIAL`` hook matches.

Test hooks (environment variables read on the driver and handed to the trials; for tests only):
- ``STUDY_TEST_NAN_TRIAL=<text>``: a trial whose directory name (``_trainable_<id>_<n>_<sampled values>``)
  or sampled-config JSON contains ``<text>`` raises ``NonFiniteLossError`` instead of reporting epoch
  ``STUDY_TEST_NAN_EPOCH`` (default 2) and every later one.
- ``STUDY_TEST_PID_DIR=<dir>``: each trial process writes ``<dir>/<trial_id>.json`` with its pid, the epoch it
  started from and its last reported epoch (to kill a trial's worker from outside), and wall-clock times
  (``time.time()``, seconds): ``entered_at`` (the trainable started), and per reported epoch ``report_times``:
  [epoch, before ``tune.report``, after it] (``benchmarks/sweep_overhead.py`` reads them).
- ``STUDY_TEST_EPOCH_SLEEP=<seconds>``: a trial pauses that long after reporting each epoch.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import study.sweep_ray  # noqa: F401  (first: it sets Ray's environment switches before ray is imported)

# isort: split
import ray
from ray import tune
from ray.tune import Checkpoint

from study.atomic import atomic_write_text
from study.config import TrialConfig
from study.data.store import data_fingerprint
from study.sweep_space import _overrides, resolve_overrides
from study.system_metrics import trial_system_metrics

HOOK_ENV = {
    "nan_trial": "STUDY_TEST_NAN_TRIAL",
    "nan_epoch": "STUDY_TEST_NAN_EPOCH",
    "pid_dir": "STUDY_TEST_PID_DIR",
    "epoch_sleep": "STUDY_TEST_EPOCH_SLEEP",
}


#: A failed trial's record of an error that a retry would only repeat (see :func:`_deterministic_errors`).
DETERMINISTIC_MARKER = "deterministic_failure.json"


def _deterministic_errors() -> dict[str, type[BaseException]]:
    """Errors a retry of the same trial would raise again: the prepared data missing or modified, a bad config,
    a non-finite loss or another divergence (the retry starts from the same checkpoint with the same seed)."""
    from study.config import ConfigError
    from study.data.store import DataIntegrityError
    from study.train import NonFiniteLossError, TrainingDivergedError

    return {cls.__name__: cls for cls in (NonFiniteLossError, TrainingDivergedError, DataIntegrityError, ConfigError,
                                          FileNotFoundError)}


def _hooks_from_env() -> dict[str, str]:
    """The test hooks set in the driver's environment (see the module docstring)."""
    return {name: os.environ[var] for name, var in HOOK_ENV.items() if os.environ.get(var)}


def _locate_data(config: TrialConfig, relative: str | None, fingerprint: str | None) -> TrialConfig:
    """The trial config with a data directory that exists on this node.

    The driver resolves ``data_dir`` on its own machine. A worker where that path does not exist (another
    machine that received the data inside the job's ``--working-dir``) looks for ``relative`` next to the code
    it runs, and accepts it only when its manifest has the driver's fingerprint.
    """
    if config.data_dir.is_dir() or not relative:
        return config
    import study

    candidate = Path(study.__file__).resolve().parents[1] / relative
    if not candidate.is_dir():
        return config  # run_trial raises FileNotFoundError naming the driver's path
    if fingerprint and data_fingerprint(candidate) != fingerprint:
        raise FileNotFoundError(
            f"prepared data {config.data_dir} is not on this node, and {candidate} holds different data "
            "(its manifest's sha256 differs from the driver's)"
        )
    return config.model_copy(update={"data_dir": candidate})


def _write_progress(pid_dir: str, trial_id: str, info: dict[str, Any]) -> None:
    atomic_write_text(Path(pid_dir) / f"{trial_id}.json", json.dumps(info) + "\n")


def scheduler_checkpoint_epochs(scheduler: Any, max_epochs: int) -> tuple[int, ...]:
    """Epochs (1-based) at which a trial must write a checkpoint for the sweep's scheduler (the
    ``sweep.scheduler`` section: ``kind`` and its fields), besides those ``train.checkpoint_interval_s`` makes due.

    - PBT: every ``perturbation_interval`` epochs: its exploit step restarts a trial from another trial's latest
      checkpoint, which must be the state at the perturbation point.
    - ASHA: its rungs, ``grace_period * reduction_factor**k`` (Ray's ``_Bracket``, one bracket): a trial it stops
      there ends with a checkpoint of its last epoch, whose grids and metrics the tracker uploads.
    - FIFO: none.
    """
    if scheduler.kind == "pbt":
        step = max(1, int(scheduler.perturbation_interval))
        return tuple(range(step, max_epochs + 1, step))
    if scheduler.kind == "asha":
        grace, factor = min(scheduler.grace_period, max_epochs), float(scheduler.reduction_factor)
        rungs = int(math.log(max_epochs / grace) / math.log(factor) + 1)
        return tuple(sorted({min(max_epochs, math.ceil(grace * factor**k)) for k in range(rungs)}))
    return ()


def _trainable(
    config: dict[str, Any],
    base: dict[str, Any],
    data_dir_relative: str | None = None,
    data_sha256: str | None = None,
    hooks: dict[str, str] | None = None,
    system_metrics: dict[str, Any] | None = None,
    checkpoint_epochs: tuple[int, ...] = (),
) -> None:
    """Ray Tune function trainable: resolve the trial config, train, report every epoch's metrics, with the
    checkpoint on the epochs that wrote one (``checkpoint_epochs``: :func:`scheduler_checkpoint_epochs`).

    Started again with the trial's latest checkpoint after a failure, after a resumed sweep, or by PBT with a
    mutated ``config`` and another trial's checkpoint: training then continues from that checkpoint's epoch
    with the config given now. ``system_metrics`` (:func:`study.system_metrics.monitor_settings`, None: off):
    where the trial's run is, to log its node's MLflow system metrics there while it trains.
    """
    entered_at = time.time()
    from study.train import NonFiniteLossError, run_trial, select_device  # in the worker: keeps the driver light

    hooks = hooks or {}
    overrides = _overrides(config)
    trial_config = _locate_data(
        resolve_overrides(TrialConfig.model_validate(base), overrides), data_dir_relative, data_sha256
    )
    context = tune.get_context()
    trial_id = context.get_trial_id()
    runtime = ray.get_runtime_context()
    node_id = runtime.get_node_id()
    # Where the trial runs: Ray's GPU ids for it (a fractional share names the GPU it shares; with gpu: 0 Ray
    # hides every GPU) and the torch device run_trial picks from them.
    gpu_ids = ",".join(map(str, runtime.get_accelerator_ids().get("GPU", []))) or "none"
    placement = {"node_id": node_id, "gpu_ids": gpu_ids, "device": str(select_device(trial_config.train.device))}
    label = f"{Path(context.get_trial_dir()).name} {json.dumps(overrides, sort_keys=True, default=str)}"
    nan_from = int(hooks["nan_epoch"]) if "nan_epoch" in hooks else 2
    forced_nan = bool(hooks.get("nan_trial")) and hooks["nan_trial"] in label
    sleep = float(hooks.get("epoch_sleep", 0))
    progress = {"pid": os.getpid(), "node_id": node_id, "start_epoch": 0, "epoch": 0, "entered_at": entered_at,
                "report_times": []}

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        epoch = int(metrics.get("epoch", 0))
        if forced_nan and epoch >= nan_from:
            raise NonFiniteLossError(
                f"non-finite training loss at epoch {epoch}: nan (test hook {HOOK_ENV['nan_trial']})"
            )
        before = time.time()
        saved = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        tune.report(metrics | placement, checkpoint=saved)
        if "pid_dir" in hooks:
            progress["report_times"].append([epoch, before, time.time()])
            _write_progress(hooks["pid_dir"], trial_id, progress | {"epoch": epoch})
        if sleep:
            time.sleep(sleep)

    # Ray's FailureConfig retries every error; one that would only happen again (bad data or config, a
    # diverged loss from the same checkpoint) is recorded on its first occurrence and raised again at once on the
    # retry, so retries are spent on lost workers and nodes, not on training the same failure twice.
    marker = Path(context.get_trial_dir()) / DETERMINISTIC_MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        raise _deterministic_errors()[recorded["type"]](recorded["message"])

    # A restarted trial (lost worker, resumed sweep, PBT exploit) continues from its checkpoint's epoch.
    checkpoint = tune.get_checkpoint()
    with (
        tempfile.TemporaryDirectory(prefix="trial-") as workdir,
        checkpoint.as_directory() if checkpoint is not None else nullcontext(None) as resume_from,
        trial_system_metrics(system_metrics, trial_id),  # MLflow system metrics into the trial's run, if on
    ):
        if "pid_dir" in hooks:
            saved = Path(resume_from) / "metrics.json" if resume_from else None
            done = int(json.loads(saved.read_text()).get("epoch", 0)) if saved and saved.is_file() else 0
            progress |= {"start_epoch": done, "epoch": done}
            _write_progress(hooks["pid_dir"], trial_id, progress)
        try:
            run_trial(trial_config, report, workdir=workdir, resume_from=resume_from,
                      checkpoint_epochs=checkpoint_epochs)
        except tuple(_deterministic_errors().values()) as err:
            atomic_write_text(marker, json.dumps({"type": type(err).__name__, "message": str(err)}))
            raise
