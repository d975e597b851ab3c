"""Hyperparameter sweeps: Ray Tune trials, Optuna search, ASHA early stopping or PBT, MLflow runs.

:func:`run_sweep` drives one sweep: for every arm (likelihood family or variant) one Ray Tune search with the
same budget, then the summary (best trial per arm and overall, Pareto front) in ``sweep.output``. The pieces:

- :mod:`study.sweep_ray`: Ray's environment switches, an embedded Ray on 127.0.0.1 or the ``RAY_ADDRESS``
  cluster (``ray job submit ... -- python -m pipelines.sweep`` sets it for the job).
- :mod:`study.sweep_space`: the search space from ``params.yaml`` (``sweep.search_space``; conditional,
  define-by-run), the Optuna (single- or multi-objective) or random searcher, the ASHA / FIFO / PBT scheduler.
- :mod:`study.sweep_trainable`: the trial in its Ray worker, and the test hooks (``STUDY_TEST_*``).
- :mod:`study.sweep_callback`: every trial is one MLflow child run under the sweep's parent run, written from
  the driver by :class:`study.sweep_callback.MlflowCallback`.
- :mod:`study.sweep_state`: the state file that lets a re-run resume a sweep whose driver was killed.

Failures:
- Before Ray starts: the prepared arrays are checked against their manifest's sha256
  (:func:`study.data.store.verify_prepared`), a second live driver of the same sweep is refused (a lock on
  ``<storage_path>/<name>.lock`` names the first one's PID), and Ray is given ``sweep.ray_start_timeout_s`` to come
  up; the parent run and the state file are created only once it is up.
- A trial whose worker process or node dies, or that raises, is restarted from its last checkpoint (one per
  epoch) up to ``sweep.max_failures`` times, in the same MLflow run; an error a retry would only repeat (a
  non-finite loss, modified data, a bad config) is raised again at once on the retry, without training. After
  that it is an ERROR trial in Ray and a FAILED run in MLflow with ``failure_reason``, and the sweep goes on.
- A sweep in which no trial finished ends its parent run FAILED and writes no summary
  (:class:`NoFinishedTrialError`).
- Interrupted (Ctrl+C, SIGTERM, or the death of the ``dvc repro`` that started it; ``pipelines/sweep.py``): the
  parent run and its running trials are marked KILLED with ``interrupted_at``; a re-run resumes into them.
- A re-run after the same sweep finished (same parameters digest) rewrites the summary from the parent run's
  ``sweep_summary.json`` in MLflow instead of training again.
- A killed driver: re-running the sweep finds the unfinished sweep's state file
  (``<storage_path>/<name>.sweep_state.json``: parent run id, parameter digest, finished arms) and, when the
  parameters are unchanged, reuses the parent run and continues the unfinished arm with ``Tuner.restore``:
  finished and errored trials are kept, unfinished ones resume from their checkpoints in their own runs.
- An unreachable MLflow server fails the sweep before Ray starts (``study.tracking.connect``). One that goes
  away during the sweep does not stall it (the callback's writes are queued, ``study.tracking.TrackingWriter``);
  past ``tracking.outage_budget_s`` the sweep stops with ``TrackingOutageError``, and the re-run fills in what
  MLflow missed from Ray's results (``study.sweep_callback.catch_up``).
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

from study.sweep_ray import init_ray, node_addresses  # first: it sets Ray's environment switches

# isort: split
from ray import tune

from study.atomic import atomic_write_text
from study.config import StudyParams, TrialConfig
from study.data.store import data_fingerprint, verify_prepared
from study.likelihoods import family_elbo_valid, trial_elbo_valid
from study.selection import select_best
from study.sweep_callback import MlflowCallback, _error_line, catch_up
from study.sweep_console import _PROGRESS, SweepConsole, SweepProgress, configure_output, tune_verbosity
from study.sweep_references import check_references, referenced_arms, resolve_references
from study.sweep_space import _overrides, _param_space, _scheduler, _searcher, optuna_storage, resolve_overrides
from study.sweep_space import DefineByRunSpace  # noqa: F401  (named here in Ray state of sweeps started before the split)
from study.sweep_state import (
    STATE_SUFFIX,
    _drop_orphans,
    _params_digest,
    _resumable_state,
    _save_state,
    acquire_lock,
    finished_summary,
)
from study.sweep_trainable import _hooks_from_env, _trainable, scheduler_checkpoint_epochs
from study.system_metrics import monitor_settings
from study.tracking import SweepTracker, TrackingOutageError, connect, tracking_uri


def _fit(tuner) -> tuple[Any, bool]:
    """``tuner.fit()``, and whether a stop signal ended it early (Ctrl+C, or SIGTERM, which the sweep stage turns
    into SIGINT).

    Tune installs its own SIGINT handler for the run and puts back the handler it found only when a stop signal
    arrives (``ray.tune.tune._setup_signal_catching``); with a marker handler installed before the run, finding it
    again afterwards means the run was interrupted. Trials Tune stopped that way can look finished in the
    ResultGrid, so its counts alone do not tell. (Checked by tests/test_sweep_faults.py on the Ray version of the
    lock file.)
    """
    if threading.current_thread() is not threading.main_thread():
        results = tuner.fit()
        return results, results.num_terminated + results.num_errors < len(results)
    previous = signal.getsignal(signal.SIGINT)

    def marker(signum, frame):  # a second Ctrl+C once Tune has handed SIGINT back: stop at once
        signal.signal(signal.SIGINT, previous)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, marker)
    try:
        results = tuner.fit()
        interrupted = signal.getsignal(signal.SIGINT) is marker
    finally:
        signal.signal(signal.SIGINT, previous)
    return results, interrupted or results.num_terminated + results.num_errors < len(results)


class NoFinishedTrialError(RuntimeError):
    """Every trial of the sweep failed: its parent run is FAILED and no summary was written."""


def _collect(results, tracker: SweepTracker, variant: str, family: str, metric: str, mode: str, *,
             arm_base: TrialConfig | None = None, max_epochs: int) -> list[dict[str, Any]]:
    """One summary record per Ray result of an arm (the trial fields of ``results/sweep.json``).

    ``arm_base``: the arm's trial config; with each trial's sampled values it says whether that trial's
    reconstruction term is a normalised density (``elbo_valid``: e.g. the blur family only with the sampled
    ``estimator: network``; None: the family's defaults). ``max_epochs``: the arm's own ``train.epochs`` (a trial
    that ran fewer was stopped early), unless the trial sampled ``train.epochs`` itself.
    """
    trials = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        config = dict(result.config or {})
        elbo_valid = (trial_elbo_valid(resolve_overrides(arm_base, _overrides(config))) if arm_base is not None
                      else family_elbo_valid(family))
        trials.append(
            {
                "trial_id": trial_id,
                "run_id": tracker.run_id(trial_id),
                "variant": variant,
                "family": family,
                "elbo_valid": elbo_valid,
                "metric": metric,
                "mode": mode,
                "status": "FAILED" if result.error else "FINISHED",
                "error": _error_line(result.error) if result.error else None,
                "config": config,
                "max_epochs": int(config.get("train.epochs", max_epochs)),
                "epochs": int(metrics.get("epoch", metrics.get("training_iteration", 0))),
                "node_id": metrics.get("node_id"),
                "metrics": {k: v for k, v in metrics.items() if k.startswith(("train_", "val_"))},
            }
        )
    return trials


def best_trials(trials: list[dict[str, Any]], arms: list[str], metric: str, mode: str
                ) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """(best trial overall by the sweep's ``metric``, best trial of each arm by the arm's own metric), both by
    :func:`study.selection.select_best`, the rule the report applies too."""
    best_per_variant = {}
    for variant in arms:
        group = [t for t in trials if t["variant"] == variant]
        if group and (chosen := select_best(group, group[0]["metric"], group[0]["mode"], within_arm=True)) is not None:
            best_per_variant[variant] = chosen
    return select_best(trials, metric, mode), best_per_variant


def _pareto_trials(trials: list[dict[str, Any]], params: StudyParams) -> list[str]:
    """Trial ids of the finished trials that no other finished trial dominates on ``sweep.objectives``."""
    import pandas as pd

    from study.pareto import pareto_front

    objectives = params.sweep.objectives
    rows = [t for t in trials if t["status"] == "FINISHED" and all(o.metric in t["metrics"] for o in objectives)]
    if not rows:
        return []
    frame = pd.DataFrame([{o.metric: t["metrics"][o.metric] for o in objectives} for t in rows])
    mask = pareto_front(frame, minimise=[o.metric for o in objectives if o.mode == "min"],
                        maximise=[o.metric for o in objectives if o.mode == "max"])
    return [t["trial_id"] for t, keep in zip(rows, mask) if keep]


def arm_trainable(params: StudyParams, arm_base: TrialConfig, fingerprint: str, hooks: dict[str, str],
                  system_metrics: dict[str, Any] | None):
    """The Ray Tune trainable of one arm's trials (:func:`study.sweep_trainable._trainable` on ``arm_base``) with
    ``sweep.resources_per_trial``: the sweep's trials and the replicate stage's (``study.replicate``) alike.

    ``fingerprint``: the prepared data's sha256 (a worker on another node checks its copy against it);
    ``hooks``: :func:`study.sweep_trainable._hooks_from_env`; ``system_metrics``:
    :func:`study.system_metrics.monitor_settings`.
    """
    resources = params.sweep.resources_per_trial
    relative_data = None if params.dataset_dir().is_absolute() else str(params.dataset_dir())
    return tune.with_resources(
        tune.with_parameters(
            _trainable, base=arm_base.model_dump(mode="json"), data_dir_relative=relative_data,
            data_sha256=fingerprint, hooks=hooks, system_metrics=system_metrics,
            checkpoint_epochs=scheduler_checkpoint_epochs(params.sweep.scheduler, arm_base.train.epochs),
        ),
        {"cpu": resources.cpu, "gpu": resources.gpu, "custom_resources": dict(resources.custom)},
    )


def run_sweep(params: StudyParams, workdir: str | Path = ".", resume: bool = True) -> dict[str, Any]:
    """Run the sweep ``params.sweep`` describes and write its summary to ``sweep.output``.

    Args:
        params: the validated study parameters.
        workdir: paths in ``params`` are relative to it (the repository root under DVC).
        resume: continue an unfinished sweep with the same parameters found in ``sweep.storage_path``
            (False: always start afresh).

    Returns:
        The summary written to ``sweep.output``: parent run id, tracking URI, per-trial status and metrics,
        the best trial by ``sweep.metric`` and, with ``sweep.objectives``, the Pareto-optimal trials.

    Raises:
        ConfigError: a search or mutation path is not in the trial config.
        TrackingUnavailableError: MLflow cannot be reached (checked before any trial starts).
        FileNotFoundError / DataIntegrityError: the prepared data is missing or modified.
        KeyboardInterrupt: interrupted (Ctrl+C) with unfinished trials; running it again resumes them.
    """
    workdir = Path(workdir).resolve()
    sweep = params.sweep
    sweep.check_paths(params.base_trial_config())
    data_dir = (workdir / params.dataset_dir()).resolve()
    fingerprint = data_fingerprint(data_dir)  # fails early and clearly when prepare has not run
    tracking = params.tracking.model_copy(update={"artifact_root": workdir / params.tracking.artifact_root})
    client, experiment_id = connect(tracking)
    uri = tracking_uri(params.tracking)

    base = params.base_trial_config().model_copy(update={"data_dir": data_dir})
    arms = sweep.arms(base.likelihood.family)
    check_references(list(arms), {name: arm.overrides for name, arm in arms.items()})
    storage = (workdir / sweep.storage_path).resolve()
    state_path = storage / f"{sweep.name}{STATE_SUFFIX}"
    lock = acquire_lock(storage, sweep.name)  # noqa: F841 - held until this process exits
    digest = _params_digest(params, fingerprint, uri)
    if resume and (done := finished_summary(state_path, digest, client)) is not None:
        # The same sweep already finished (its stage was stopped before DVC recorded it): write its summary again
        # from MLflow rather than training it twice.
        print(f"sweep {sweep.name} already finished with these parameters (parent run {done['parent_run_id']}): "
              f"summary rewritten from MLflow, nothing trained (--no-resume trains afresh)", flush=True)
        atomic_write_text(workdir / sweep.output, json.dumps(done, indent=2, default=str) + "\n")
        return done
    verify_prepared(data_dir)  # every array's sha256, before Ray starts: a modified array fails here, once
    # Ray first: a sweep whose Ray never came up leaves no parent run or state file behind.
    init_ray(start_timeout_s=sweep.ray_start_timeout_s)
    state = _resumable_state(state_path, digest, client, experiment_id) if resume else None
    resumed = state is not None
    experiment_dirs = {v: storage / (sweep.name if len(arms) == 1 else f"{sweep.name}-{v}") for v in arms}
    if state is None:
        for path in experiment_dirs.values():  # a finished or abandoned sweep's Ray state: never resumed
            shutil.rmtree(path, ignore_errors=True)
        tracker = SweepTracker(client, experiment_id, params, fingerprint)
        state = {"parent_run_id": tracker.parent_run_id, "experiment_id": experiment_id, "tracking_uri": uri,
                 "params_digest": digest, "status": "running", "arms": {}}
    else:
        tracker = SweepTracker(client, experiment_id, params, fingerprint, parent_run_id=state["parent_run_id"])
        print(f"resuming sweep {sweep.name} into parent run {tracker.parent_run_id} "
              f"({len(state['arms'])} of {len(arms)} arms finished)", flush=True)

    hooks = _hooks_from_env()
    # Trials sample their node's MLflow system metrics into their own runs (tracking.system_metrics).
    system_metrics = monitor_settings(params.tracking, tracker.parent_run_id, experiment_id, Path.cwd())
    # One Optuna study per arm in sweep.searcher.storage (in memory when null), named <sweep>-<arm>.
    studies = optuna_storage(sweep.searcher.storage, workdir)
    trials: list[dict[str, Any]] = []
    known_trials: set[str] = set()
    configure_output()  # quiet unless STUDY_VERBOSE: one line per trial event and one bar for the sweep
    done_before = sum(len(a.get("trials", [])) for a in state["arms"].values() if a.get("status") == "finished")
    progress = _PROGRESS[tracker.parent_run_id] = SweepProgress(sweep.name, sweep.num_trials * len(arms), done_before)
    try:
        _save_state(state_path, state)
        # One search per arm with the same budget, so arms are compared at equal tuning effort.
        for index, (variant, arm) in enumerate(arms.items()):
            if referenced_arms(arm.overrides):  # e.g. the frozen-mean control on the Gaussian arm's selected model
                arm = arms[variant] = arm.model_copy(update={"overrides": resolve_references(
                    arm.overrides, trials, client, storage / f"{sweep.name}.references")})
            arm_base = resolve_overrides(base, arm.overrides)
            metric, mode = arm.metric or sweep.metric, arm.mode or sweep.mode
            if state["arms"].get(variant, {}).get("status") == "finished":
                trials += state["arms"][variant]["trials"]
                known_trials |= {t["trial_id"] for t in state["arms"][variant]["trials"]}
                continue
            trainable = arm_trainable(params, arm_base, fingerprint, hooks, system_metrics)
            # The arm's own epochs (a variant may override train.epochs): the scheduler's horizon, the callback's
            # count and the early-stop test all use it.
            arm_epochs = arm_base.train.epochs
            callback = MlflowCallback(tracker, arm_base, arm_epochs, variant, metric, mode,
                                      mutations=tuple(sweep.scheduler.mutations), uri=uri,
                                      outage_budget_s=params.tracking.outage_budget_s)
            path = experiment_dirs[variant]
            if resumed and tune.Tuner.can_restore(str(path)):
                # Finished and errored trials are kept as they are; unfinished ones continue from their latest
                # checkpoints. The callback comes back from the Tuner's pickle and reconnects by itself.
                tuner = tune.Tuner.restore(
                    str(path), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False,
                    param_space=_param_space(params),
                )
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=_param_space(params),
                    tune_config=tune.TuneConfig(
                        search_alg=_searcher(params, arm_base, metric, mode, seed_offset=index,
                                             study_name=f"{sweep.name}-{variant}", storage=studies),
                        scheduler=_scheduler(params, metric, mode, max_epochs=arm_epochs),
                        num_samples=sweep.num_trials,
                        max_concurrent_trials=None if sweep.searcher.kind == "random" else sweep.max_concurrent,
                        # Ray's default for function trainables is a fresh process per trial.
                        reuse_actors=sweep.reuse_actors,
                    ),
                    run_config=tune.RunConfig(
                        name=path.name,
                        storage_path=str(storage),
                        callbacks=[callback, SweepConsole(tracker.parent_run_id, variant, metric, mode, arm_epochs,
                                                          sweep.scheduler.kind, show_arm=len(arms) > 1)],
                        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                        # One checkpoint per trial, the latest (what a restart resumes and the tracker uploads).
                        # PBT keeps every checkpoint: it re-registers the checkpoints it asks a function
                        # trainable to save, and deleting old ones then fails and blocks its exploit step.
                        checkpoint_config=tune.CheckpointConfig(
                            num_to_keep=None if sweep.scheduler.kind == "pbt" else 1
                        ),
                        verbose=tune_verbosity(),  # quiet: SweepConsole prints one line per trial event
                    ),
                )
            results, interrupted = _fit(tuner)
            if interrupted:  # Ctrl+C or SIGTERM: Tune saved its state and returned early
                raise KeyboardInterrupt(f"sweep {sweep.name} interrupted with unfinished trials: run it again "
                                        "to resume them")
            # What the callback could not send (an earlier driver's tracking outage) comes from Ray's results.
            catch_up(tracker, results, arm_base, arm_epochs, variant, metric, mode,
                     mutations=tuple(sweep.scheduler.mutations))
            arm_trials = _collect(results, tracker, variant, arm_base.family, metric, mode, arm_base=arm_base,
                                  max_epochs=arm_epochs)
            trials += arm_trials
            progress.sync(len(trials))
            known_trials |= {t["trial_id"] for t in arm_trials}
            state["arms"][variant] = {"status": "finished", "trials": arm_trials}
            _save_state(state_path, state)
        if resumed:
            _drop_orphans(tracker, known_trials)
    except TrackingOutageError:
        raise  # the store is away: its runs are corrected by the re-run (catch_up), not now
    except KeyboardInterrupt:
        tracker.interrupt()  # parent and running trials KILLED, tagged interrupted_at; a re-run resumes them
        raise
    except BaseException:
        tracker.finish_sweep("FAILED")
        raise
    finally:
        _PROGRESS.pop(tracker.parent_run_id, progress).close()

    best, best_per_variant = best_trials(trials, list(arms), sweep.metric, sweep.mode)
    summary = {
        "sweep": sweep.name,
        "tracking_uri": uri,
        "experiment_id": experiment_id,
        "parent_run_id": tracker.parent_run_id,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "objectives": [o.model_dump() for o in sweep.objectives],
        "scheduler": sweep.scheduler.kind,
        "resumed": resumed,
        "data_sha256": fingerprint,
        "ray_node_addresses": node_addresses(),
        "num_trials": len(trials),
        "num_failed": sum(t["status"] == "FAILED" for t in trials),
        "num_early_stopped": sum(t["status"] == "FINISHED" and t["epochs"] < t["max_epochs"] for t in trials),
        # Each arm searches with its own seed (searcher.seed + the arm's index), so arms do not replay one
        # another's samples.
        "variants": {name: arm.model_dump(mode="json") | {"searcher_seed": sweep.searcher.seed + index}
                     for index, (name, arm) in enumerate(arms.items())},
        "best_trial": best,
        "best_per_variant": best_per_variant,
        "pareto_front": _pareto_trials(trials, params) if sweep.objectives else [],
        "trials": trials,
    }
    if not any(t["status"] == "FINISHED" for t in trials):
        # Nothing to hand on: the parent run says FAILED and no summary is written that DVC would take as a result.
        tracker.finish_sweep("FAILED", summary)
        state["status"] = "failed"
        _save_state(state_path, state)
        reasons = sorted({t["error"] for t in trials if t["error"]})
        raise NoFinishedTrialError(f"sweep {sweep.name}: none of its {len(trials)} trials finished "
                                   f"(parent run {tracker.parent_run_id} FAILED); errors: {'; '.join(reasons)}")
    tracker.finish_sweep("FINISHED", summary)
    atomic_write_text(workdir / sweep.output, json.dumps(summary, indent=2, default=str) + "\n")
    state["status"] = "finished"
    _save_state(state_path, state)
    return summary
