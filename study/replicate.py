"""Seed replicates (the ``replicate`` stage, between ``sweep`` and ``evaluate``): the best trial of every sweep arm
trained again with ``replicate.num_seeds`` fresh seeds, so the report can give each arm a mean and a confidence
interval over seeds instead of one seed's number.

Why fresh seeds: the search picked each arm's best trial among several, partly for its seed's luck (the winner's
curse), so its own seed (its ``train.seed``, the search seed) is never a replicate. The seeds are
``search seed + 1000 + k`` (k = 0 .. num_seeds - 1) unless ``replicate.seeds`` lists them.

Each replicate is a Ray Tune trial of the sweep's own trainable (:func:`study.sweep.arm_trainable`: same
resources per trial, same checkpoint per epoch, same deterministic-error rule), under the sweep's
``failure_config`` and MLflow callback, with neither a searcher nor an early-stopping scheduler: one Tune
experiment per arm (``<storage_path>/<sweep>-replicate-<arm>``) whose grid is the seeds, every trial running the
arm's full ``max_epochs`` (not the epochs an early stop left the best trial). Each is an MLflow child run of the
sweep's parent run, tagged like a sweep trial (``sweep_variant`` = the arm, ``ray_trial_id`` ...) and, once its
arm's replicates ended, ``replicate=true``, ``replicate_of=<best trial's run id>`` and ``seed``. The sweep's parent
run keeps its status.

Failures: a replicate that fails (a non-finite loss, a lost worker after ``sweep.max_failures`` restarts) is
FAILED in MLflow and in the output with its reason, and the other replicates go on. Interrupted (Ctrl+C, SIGTERM
through ``pipelines/replicate.py``): the running replicates' runs are KILLED with ``interrupted_at``, and a re-run
with the same parameters resumes them (``Tuner.restore``, from the state file
``<storage_path>/<sweep>.replicate_state.json``) without training the finished ones again; a re-run after they
all finished rewrites the output from that state.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from study.sweep_ray import init_ray  # first: it sets Ray's environment switches

# isort: split
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from study.atomic import atomic_write_text
from study.config import StudyParams, TrialConfig
from study.data.store import data_fingerprint, verify_prepared
from study.sweep import _collect, _fit, arm_trainable
from study.sweep_callback import MlflowCallback, catch_up
from study.sweep_console import SweepConsole, tune_verbosity
from study.sweep_space import _overrides, resolve_overrides
from study.sweep_state import _read_state, acquire_lock
from study.sweep_trainable import _hooks_from_env
from study.system_metrics import monitor_settings
from study.tracking import PARENT_TAG, TRIAL_TAG, SweepTracker, TrackingOutageError, connect, tracking_uri

STATE_SUFFIX = ".replicate_state.json"  # <storage_path>/<sweep name><suffix>: what a re-run needs to resume


def _sweep_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the sweep first (`uv run dvc repro sweep`)")
    return json.loads(path.read_text())


def _plan(params: StudyParams, summary: dict[str, Any], base: TrialConfig) -> dict[str, dict[str, Any]]:
    """Per arm with a selected trial (in the sweep's arm order): what its replicates train.

    The arm's trial config is rebuilt from the base config with the arm's overrides as the summary recorded them
    (an ``arm:<name>`` reference already resolved to the checkpoint the sweep used), then the best trial's
    sampled values. Arms without a finished trial have nothing to replicate and are left out.

    Raises:
        ConfigError: an explicit ``replicate.seeds`` contains an arm's search seed.
    """
    plan = {}
    for arm, variant in summary["variants"].items():
        best = summary["best_per_variant"].get(arm)
        if best is None:
            print(f"arm {arm}: no finished trial in the sweep, nothing to replicate", flush=True)
            continue
        arm_base = resolve_overrides(base, variant.get("overrides") or {})
        sampled = _overrides(dict(best["config"]))
        trial = resolve_overrides(arm_base, sampled)
        epochs = int(best.get("max_epochs") or trial.train.epochs)
        plan[arm] = {
            "arm_base": arm_base,
            "metric": best.get("metric") or variant.get("metric") or params.sweep.metric,
            "mode": best.get("mode") or variant.get("mode") or params.sweep.mode,
            "record": {
                "trial_id": best["trial_id"],
                "trial_run_id": best["run_id"],
                "family": best.get("family") or trial.family,
                "elbo_valid": bool(best["elbo_valid"]),
                "search_seed": trial.train.seed,
                "epochs": epochs,
                "config": sampled,
            },
            "seeds": params.replicate.seeds_for(trial.train.seed),
        }
    return plan


def _param_space(entry: dict[str, Any]) -> dict[str, Any]:
    """The best trial's sampled values, its full epochs, and one trial per seed."""
    return entry["record"]["config"] | {"train.epochs": entry["record"]["epochs"],
                                        "train.seed": tune.grid_search(entry["seeds"])}


def _digest(params: StudyParams, summary: dict[str, Any], plan: dict[str, dict[str, Any]], fingerprint: str,
            uri: str) -> str:
    """What makes a re-run the same replicate set: the sweep's parent run, each arm's trial config and seeds,
    the data, the tracking store and how trials run."""
    key = {
        "parent_run_id": summary["parent_run_id"], "data": fingerprint, "tracking_uri": uri,
        "experiment": params.tracking.experiment, "max_failures": params.sweep.max_failures,
        "resources": params.sweep.resources_per_trial.model_dump(mode="json"),
        "arms": {arm: {"base": {k: v for k, v in e["arm_base"].model_dump(mode="json").items() if k != "data_dir"},
                       "record": e["record"], "seeds": e["seeds"]} for arm, e in plan.items()},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(state, indent=2, default=str) + "\n")


def _runs_exist(client, state: dict[str, Any]) -> bool:
    """Whether every replicate run a finished state names is still an active run in MLflow."""
    try:
        return all(client.get_run(r["run_id"]).info.lifecycle_stage == "active"
                   for arm in state["arms"].values() for r in arm["record"]["replicates"] if r["run_id"])
    except Exception:  # a run or the store is gone: train afresh
        return False


def _replicate_runs(client, experiment_id: str, parent_run_id: str, sweep_trials: set[str], since_ms: int,
                    status: str | None = None) -> list:
    """Child runs of the sweep's parent that are not the sweep's own trials and started at or after
    ``since_ms`` (this replicate set's start), optionally only those with ``status``."""
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" + (f" and attributes.status = '{status}'" if status else "")
    runs = client.search_runs([experiment_id], filter_string=query, max_results=10000)
    return [r for r in runs if r.data.tags.get(TRIAL_TAG) not in sweep_trials and r.info.start_time >= since_ms]


def _interrupt(client, experiment_id: str, parent_run_id: str, sweep_trials: set[str], since_ms: int) -> None:
    """The driver stops with replicates running: their runs become KILLED, tagged ``interrupted_at`` and ``resume``;
    the sweep's parent run is left as it is (the sweep itself finished)."""
    from datetime import datetime, timezone

    from mlflow.entities import RunTag

    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    hint = "re-run the replicate stage with the same params (uv run dvc repro) to resume into these runs"
    for run in _replicate_runs(client, experiment_id, parent_run_id, sweep_trials, since_ms, status="RUNNING"):
        client.log_batch(run.info.run_id, tags=[RunTag("interrupted_at", when), RunTag("resume", hint)])
        client.set_terminated(run.info.run_id, status="KILLED")


def _drop_orphans(client, experiment_id: str, parent_run_id: str, sweep_trials: set[str], since_ms: int,
                  known: set[str]) -> None:
    """Soft-delete the runs of replicate trials Ray no longer knows: a driver killed less than an experiment
    snapshot after starting a trial leaves its run behind, and the resumed experiment starts that seed again."""
    for run in _replicate_runs(client, experiment_id, parent_run_id, sweep_trials, since_ms):
        if run.data.tags.get(TRIAL_TAG) not in known and run.info.status != "FINISHED":
            print(f"removing MLflow run {run.info.run_id} of replicate trial {run.data.tags.get(TRIAL_TAG)}: the "
                  "killed driver started it after Ray's last experiment snapshot, so the resumed one replaced it",
                  flush=True)
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="KILLED")
            client.delete_run(run.info.run_id)


def _stamp(client, records: list[dict[str, Any]], trial_run_id: str, sweep: str, arm: str) -> None:
    """The replicate tags and a readable run name on each replicate's run."""
    from mlflow.entities import RunTag

    for r in records:
        if r["run_id"]:
            client.log_batch(r["run_id"], tags=[
                RunTag("replicate", "true"), RunTag("replicate_of", trial_run_id), RunTag("seed", str(r["seed"])),
                RunTag("mlflow.runName", f"{sweep}-{arm}-seed{r['seed']}"),
            ])


def _replicates(results, tracker: SweepTracker, arm: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The replicate records of one arm's results, by seed (the sweep's trial records, :func:`study.sweep._collect`,
    reduced to the output's fields)."""
    trials = _collect(results, tracker, arm, entry["arm_base"].family, entry["metric"], entry["mode"],
                      arm_base=entry["arm_base"], max_epochs=entry["record"]["epochs"])
    records = [{"seed": int(t["config"]["train.seed"]), "run_id": t["run_id"], "trial_id": t["trial_id"],
                "status": t["status"], "error": t["error"], "epochs": t["epochs"], "max_epochs": t["max_epochs"],
                "metrics": t["metrics"]} for t in trials]
    return sorted(records, key=lambda r: entry["seeds"].index(r["seed"]))


def run_replicates(params: StudyParams, workdir: str | Path = ".", resume: bool = True) -> dict[str, Any]:
    """Train every sweep arm's best configuration with ``replicate.num_seeds`` fresh seeds; write
    ``replicate.output``.

    Args:
        params: the validated study parameters (``replicate``, and the sections trials are built from).
        workdir: paths in ``params`` are relative to it (the repository root under DVC).
        resume: continue an unfinished replicate set with the same parameters found in ``sweep.storage_path``,
            and rewrite a finished one's output without training (False: always start afresh).

    Returns:
        What is written to ``replicate.output``: ``sweep``, ``parent_run_id``, ``num_seeds``, ``seeds_rule`` and
        per arm its best trial (``trial_id``, ``trial_run_id``, ``family``, ``elbo_valid``, ``search_seed``,
        ``epochs``, ``config``: the sampled values) and ``replicates``: per seed ``seed``, ``run_id``,
        ``trial_id``, ``status`` (FINISHED / FAILED), ``error`` (the failure's last line, else None), ``epochs``
        (run), ``max_epochs`` and ``metrics`` (the last epoch's ``train_*`` / ``val_*``). With ``num_seeds: 0``
        ``arms`` is empty, and neither Ray nor MLflow is started.

    Raises:
        FileNotFoundError: the sweep's summary or the prepared data is missing.
        ConfigError: an explicit ``replicate.seeds`` contains an arm's search seed (before anything starts).
        DataIntegrityError: the prepared data was modified since it was prepared.
        TrackingUnavailableError / RayStartError / SweepLockedError: as for the sweep.
        KeyboardInterrupt: interrupted with unfinished replicates; running it again resumes them.
    """
    workdir = Path(workdir).resolve()
    rep, sweep = params.replicate, params.sweep
    summary = _sweep_summary(workdir / sweep.output)
    out = workdir / rep.output
    result: dict[str, Any] = {"sweep": summary["sweep"], "parent_run_id": summary["parent_run_id"],
                              "num_seeds": rep.num_seeds, "seeds_rule": rep.seeds_rule(), "arms": {}}
    if rep.num_seeds == 0:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        return result

    data_dir = (workdir / params.dataset_dir()).resolve()
    fingerprint = data_fingerprint(data_dir)  # fails early and clearly when prepare has not run
    base = params.base_trial_config().model_copy(update={"data_dir": data_dir})
    plan = _plan(params, summary, base)  # a bad explicit seed list fails here, before Ray or MLflow
    tracking = params.tracking.model_copy(update={"artifact_root": workdir / params.tracking.artifact_root})
    client, experiment_id = connect(tracking)
    uri = tracking_uri(params.tracking)
    storage = (workdir / sweep.storage_path).resolve()
    lock = acquire_lock(storage, f"{sweep.name}-replicate")  # noqa: F841 - held until this process exits
    state_path = storage / f"{sweep.name}{STATE_SUFFIX}"
    digest = _digest(params, summary, plan, fingerprint, uri)
    parent = summary["parent_run_id"]
    sweep_trials = {t["trial_id"] for t in summary.get("trials", [])}
    state = _read_state(state_path) if resume else None
    if state is not None and state.get("digest") != digest:
        print(f"the replicates in {storage} had other parameters: starting afresh", flush=True)
        if state.get("status") != "finished" and state.get("parent_run_id") == parent:
            _interrupt(client, experiment_id, parent, sweep_trials, state.get("started_ms", 0))
        state = None
    if state is not None and state.get("status") == "finished":
        if _runs_exist(client, state):
            result["arms"] = {arm: state["arms"][arm]["record"] for arm in plan}
            print(f"replicates of sweep {sweep.name} already trained with these parameters: {rep.output} rewritten "
                  "from their state, nothing trained (--no-resume trains afresh)", flush=True)
            atomic_write_text(out, json.dumps(result, indent=2, default=str) + "\n")
            return result
        state = None
    experiment_dirs = {arm: storage / f"{sweep.name}-replicate-{arm}" for arm in plan}
    resumed = state is not None
    if state is None:
        for path in experiment_dirs.values():  # another replicate set's Ray state: never resumed
            shutil.rmtree(path, ignore_errors=True)
        state = {"digest": digest, "parent_run_id": parent, "experiment_id": experiment_id, "status": "running",
                 "started_ms": int(time.time() * 1000), "arms": {}}
    else:
        print(f"resuming the replicates of sweep {sweep.name} ({len(state['arms'])} of {len(plan)} arms finished)",
              flush=True)
    verify_prepared(data_dir)  # every array's sha256, before Ray starts
    init_ray(start_timeout_s=sweep.ray_start_timeout_s)
    # The sweep's parent run is only written into (its status stays the sweep's).
    tracker = SweepTracker(client, experiment_id, params, fingerprint, parent_run_id=parent, attach=True)
    hooks = _hooks_from_env()
    system_metrics = monitor_settings(params.tracking, parent, experiment_id, Path.cwd())
    known: set[str] = set()
    try:
        _save_state(state_path, state)
        for arm, entry in plan.items():
            if state["arms"].get(arm, {}).get("status") == "finished":
                result["arms"][arm] = state["arms"][arm]["record"]
                known |= {r["trial_id"] for r in result["arms"][arm]["replicates"]}
                continue
            epochs, arm_base = entry["record"]["epochs"], entry["arm_base"]
            trainable = arm_trainable(params, arm_base, fingerprint, hooks, system_metrics)
            path = experiment_dirs[arm]
            if resumed and tune.Tuner.can_restore(str(path)):
                tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False,
                                           restart_errored=False, param_space=_param_space(entry))
            else:
                callback = MlflowCallback(tracker, arm_base, epochs, arm, entry["metric"], entry["mode"], uri=uri,
                                          outage_budget_s=params.tracking.outage_budget_s)
                tuner = tune.Tuner(
                    trainable,
                    param_space=_param_space(entry),
                    tune_config=tune.TuneConfig(
                        # No search and no early stop: every seed of the grid runs the full epochs.
                        search_alg=BasicVariantGenerator(max_concurrent=sweep.max_concurrent),
                        scheduler=FIFOScheduler(),
                        num_samples=1,
                        reuse_actors=sweep.reuse_actors,
                    ),
                    run_config=tune.RunConfig(
                        name=path.name,
                        storage_path=str(storage),
                        # One line per seed's start / progress / end, as the sweep prints.
                        callbacks=[callback, SweepConsole(parent, f"{arm} replicates", entry["metric"],
                                                          entry["mode"], epochs, "fifo", show_arm=True)],
                        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the latest: what a resume needs
                        verbose=tune_verbosity(),
                    ),
                )
            results, interrupted = _fit(tuner)
            if interrupted:
                raise KeyboardInterrupt(f"replicates of sweep {sweep.name} interrupted with unfinished trials: run "
                                        "the stage again to resume them")
            catch_up(tracker, results, arm_base, epochs, arm, entry["metric"], entry["mode"])
            records = _replicates(results, tracker, arm, entry)
            _stamp(client, records, entry["record"]["trial_run_id"], sweep.name, arm)
            known |= {r["trial_id"] for r in records}
            result["arms"][arm] = entry["record"] | {"replicates": records}
            state["arms"][arm] = {"status": "finished", "record": result["arms"][arm]}
            _save_state(state_path, state)
            failed = [r for r in records if r["status"] == "FAILED"]
            print(f"arm {arm}: {len(records) - len(failed)} of {len(records)} replicates of trial "
                  f"{entry['record']['trial_id']} finished ({epochs} epochs, seeds {entry['seeds']})"
                  + "".join(f"; seed {r['seed']} FAILED: {r['error']}" for r in failed), flush=True)
        if resumed:
            _drop_orphans(client, experiment_id, parent, sweep_trials, state["started_ms"], known)
    except TrackingOutageError:
        raise  # the store is away: the re-run brings the runs up to date (catch_up), not now
    except BaseException:  # interrupted, or an error: no replicate run stays RUNNING; a re-run resumes them
        _interrupt(client, experiment_id, parent, sweep_trials, state["started_ms"])
        raise
    atomic_write_text(out, json.dumps(result, indent=2, default=str) + "\n")
    state["status"] = "finished"
    _save_state(state_path, state)
    return result
