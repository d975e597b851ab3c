"""Hyperparameter sweeps: Ray Tune trials, Optuna search, ASHA early stopping, MLflow runs.

The search space is declared in ``params.yaml`` (``sweep.search_space``): each key is a dotted path into the
trial config (``train.beta``), each value a distribution. Dimensions with ``when`` are sampled only when the
condition holds, which makes the space define-by-run and conditional (Optuna's native style, passed to Ray
Tune's ``OptunaSearch`` as a function).

Ray runs embedded in the process by default, bound to 127.0.0.1; with ``RAY_ADDRESS`` set it joins that cluster
instead (``ray job submit ... -- python -m pipelines.sweep`` sets it for the job). Every trial is one MLflow
child run under the sweep's parent run, written from the driver by :class:`MlflowCallback`; a trial that
raises (including a non-finite loss) is recorded as FAILED with its reason and the sweep goes on.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from study.atomic import atomic_write_text
from study.config import SearchDimension, StudyParams, TrialConfig, get_path, resolve_trial_config
from study.data.store import data_fingerprint
from study.likelihoods import family_elbo_valid
from study.tracking import SweepTracker, connect, tracking_uri

# Ray must not phone home or bind to the network interface: set before ray is imported anywhere.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Workers run the driver's interpreter (the project's venv) rather than re-resolving it through `uv run`.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# A checkpoint every epoch of a seconds-long trial is expected here, not a bottleneck worth a warning.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

import optuna  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune import Callback, Checkpoint  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

LOOPBACK = "127.0.0.1"
INDEX_SUFFIX = "@index"  # searcher-side bookkeeping keys in a trial's config; not config paths


def init_ray(num_cpus: int | None = None) -> None:
    """Start an embedded Ray on loopback, or join ``RAY_ADDRESS`` when it is set. Idempotent."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            # "local": always a new embedded instance; with no address Ray would attach to any cluster a
            # `ray start` left running on this machine.
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            configure_logging=True,
            logging_level="WARNING",
        )


def node_addresses() -> list[str]:
    """IP addresses of the live Ray nodes (for checks that an embedded Ray stayed on loopback)."""
    return [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]


class DefineByRunSpace:
    """An Optuna define-by-run space sampling ``dimensions`` in order, honouring their ``when`` clauses.

    A condition on a path reads the value sampled earlier in the same trial, else the base config's value.
    Categorical choices that Optuna cannot store (lists such as ``dilations: [null, [1, 2]]``) are sampled as
    an index under ``<path>@index`` and the value itself is returned as a constant, which Tune merges into
    the trial's config. A class (not a closure) because Tune pickles the searcher with its experiment state.
    """

    def __init__(self, dimensions: dict[str, SearchDimension], base: TrialConfig) -> None:
        self.dimensions = dimensions
        self.base = base

    def __call__(self, trial: optuna.Trial) -> dict[str, Any] | None:
        sampled: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for path, dim in self.dimensions.items():
            if dim.when and not all(
                (sampled[cond] if cond in sampled else get_path(self.base, cond)) in values
                for cond, values in dim.when.items()
            ):
                continue
            if dim.distribution == "categorical" and not all(
                c is None or isinstance(c, bool | int | float | str) for c in dim.choices
            ):
                index = trial.suggest_categorical(f"{path}{INDEX_SUFFIX}", list(range(len(dim.choices))))
                sampled[path] = constants[path] = dim.choices[index]
            elif dim.distribution == "categorical":
                sampled[path] = trial.suggest_categorical(path, dim.choices)
            elif dim.distribution == "int":
                sampled[path] = trial.suggest_int(path, int(dim.low), int(dim.high))
            else:
                sampled[path] = trial.suggest_float(path, dim.low, dim.high, log=dim.distribution == "loguniform")
        return constants or None


def _overrides(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config without the searcher's ``@index`` bookkeeping keys: dotted path -> value."""
    return {k: v for k, v in config.items() if not k.endswith(INDEX_SUFFIX)}


def _trainable(config: dict[str, Any], base: dict[str, Any]) -> None:
    """Ray Tune function trainable: resolve the trial config, train, report every epoch with a checkpoint."""
    from study.train import run_trial  # imported in the worker; keeps the driver light

    trial_config = resolve_trial_config(TrialConfig.model_validate(base), _overrides(config))

    def report(metrics: dict[str, float], checkpoint_dir: Path) -> None:
        tune.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)))

    checkpoint = tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="trial-") as workdir:
        if checkpoint is None:
            run_trial(trial_config, report, workdir=workdir)
        else:  # a restored trial (node loss, resumed sweep) continues from its last epoch
            with checkpoint.as_directory() as resume_from:
                run_trial(trial_config, report, workdir=workdir, resume_from=resume_from)


class MlflowCallback(Callback):
    """Driver-side Tune callback that mirrors trials into MLflow child runs (see ``study.tracking``)."""

    def __init__(self, tracker: SweepTracker, base: TrialConfig, epochs: int, variant: str, metric: str, mode: str) -> None:
        self.tracker = tracker
        self.base = base
        self.epochs = epochs
        self.variant, self.metric, self.mode = variant, metric, mode

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        config = resolve_trial_config(self.base, _overrides(trial.config))
        self.tracker.start_trial(
            trial.trial_id, _overrides(trial.config), config, family_elbo_valid(config.family),
            variant=self.variant, metric=self.metric, mode=self.mode,
        )

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.tracker.log_epoch(trial.trial_id, result)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self.tracker.remember_checkpoint(trial.trial_id, checkpoint.path)

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


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = Path(path).read_text().strip().splitlines()
        return lines[-1] if lines else "trial failed"
    return str(getattr(trial, "error_msg", None) or "trial failed")


def _searcher(params: StudyParams, base: TrialConfig, metric: str, mode: str, seed_offset: int = 0) -> OptunaSearch:
    sweep = params.sweep
    seed = sweep.searcher.seed + seed_offset
    sampler = (
        optuna.samplers.TPESampler(seed=seed)
        if sweep.searcher.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    space = DefineByRunSpace(sweep.search_space, base)
    # metric and mode go to the searcher and scheduler themselves: Tune does not forward them through the
    # ConcurrencyLimiter that max_concurrent_trials wraps around the searcher.
    return OptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler)


def _scheduler(params: StudyParams, metric: str, mode: str):
    sched = params.sweep.scheduler
    if sched.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=metric,
        mode=mode,
        max_t=params.train.epochs,
        grace_period=min(sched.grace_period, params.train.epochs),
        reduction_factor=sched.reduction_factor,
    )


def _elbo_based(metric: str) -> bool:
    return any(part in metric for part in ("elbo", "log_likelihood", "bits_per_dim", "nll"))


def _collect(results, tracker: SweepTracker, variant: str, family: str, metric: str, mode: str) -> list[dict[str, Any]]:
    trials = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        trials.append(
            {
                "trial_id": trial_id,
                "run_id": tracker.children.get(trial_id),
                "variant": variant,
                "family": family,
                "metric": metric,
                "mode": mode,
                "status": "FAILED" if result.error else "FINISHED",
                "error": str(result.error).strip().splitlines()[-1] if result.error else None,
                "config": dict(result.config or {}),
                "epochs": int(metrics.get("training_iteration", 0)),
                "metrics": {k: v for k, v in metrics.items() if k.startswith(("train_", "val_"))},
            }
        )
    return trials


def run_sweep(params: StudyParams, workdir: str | Path = ".") -> dict[str, Any]:
    """Run the sweep ``params.sweep`` describes and write its summary to ``sweep.output``.

    Args:
        params: the validated study parameters.
        workdir: paths in ``params`` are relative to it (the repository root under DVC).

    Returns:
        The summary written to ``sweep.output``: parent run id, tracking URI, per-trial status and metrics,
        and the best trial by ``sweep.metric``.

    Raises:
        TrackingUnavailableError: MLflow cannot be reached (checked before any trial starts).
        FileNotFoundError / DataIntegrityError: the prepared data is missing or modified.
    """
    workdir = Path(workdir).resolve()
    data_dir = (workdir / params.dataset_dir()).resolve()
    fingerprint = data_fingerprint(data_dir)  # fails early and clearly when prepare has not run
    tracking = params.tracking.model_copy(update={"artifact_root": workdir / params.tracking.artifact_root})
    client, experiment_id = connect(tracking)

    base = params.base_trial_config().model_copy(update={"data_dir": data_dir})
    tracker = SweepTracker(client, experiment_id, params, fingerprint)
    sweep = params.sweep
    resources = {"cpu": sweep.resources_per_trial.cpu, "gpu": sweep.resources_per_trial.gpu}
    arms = sweep.arms(base.likelihood.family)

    init_ray()
    trials: list[dict[str, Any]] = []
    try:
        # One search per arm with the same budget, so arms are compared at equal tuning effort.
        for index, (variant, arm) in enumerate(arms.items()):
            arm_base = resolve_trial_config(base, arm.overrides)
            metric, mode = arm.metric or sweep.metric, arm.mode or sweep.mode
            trainable = tune.with_resources(
                tune.with_parameters(_trainable, base=arm_base.model_dump(mode="json")), resources
            )
            name = sweep.name if len(arms) == 1 else f"{sweep.name}-{variant}"
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=_searcher(params, arm_base, metric, mode, seed_offset=index),
                    scheduler=_scheduler(params, metric, mode),
                    num_samples=sweep.num_trials,
                    max_concurrent_trials=sweep.max_concurrent,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=str((workdir / sweep.storage_path).resolve()),
                    callbacks=[MlflowCallback(tracker, arm_base, params.train.epochs, variant, metric, mode)],
                    failure_config=tune.FailureConfig(max_failures=0),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    verbose=0,  # one line per finished trial comes from MlflowCallback instead
                ),
            )
            trials += _collect(tuner.fit(), tracker, variant, arm_base.family, metric, mode)
    except BaseException:
        tracker.finish_sweep("FAILED")
        raise

    def score(t: dict[str, Any]) -> float:
        return (1 if t["mode"] == "max" else -1) * t["metrics"][t["metric"]]

    finished = [t for t in trials if t["status"] == "FINISHED" and t["metric"] in t["metrics"]]
    best_per_variant = {
        variant: max(group, key=score) for variant in arms if (group := [t for t in finished if t["variant"] == variant])
    }
    # Across arms only trials selected by the sweep's own metric compete, and an ELBO-based metric only ranks
    # families whose log_prob is a density (never the comparison losses or the AVAE).
    rankable = [
        t for t in finished
        if t["metric"] == sweep.metric and (family_elbo_valid(t["family"]) or not _elbo_based(sweep.metric))
    ]
    best = max(rankable, key=score) if rankable else None
    summary = {
        "sweep": sweep.name,
        "tracking_uri": tracking_uri(params.tracking),
        "experiment_id": experiment_id,
        "parent_run_id": tracker.parent_run_id,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "data_sha256": fingerprint,
        "ray_node_addresses": node_addresses(),
        "num_trials": len(trials),
        "num_failed": sum(t["status"] == "FAILED" for t in trials),
        "num_early_stopped": sum(t["status"] == "FINISHED" and t["epochs"] < params.train.epochs for t in trials),
        "variants": {name: arm.model_dump(mode="json") for name, arm in arms.items()},
        "best_trial": best,
        "best_per_variant": best_per_variant,
        "trials": trials,
    }
    tracker.finish_sweep("FINISHED", summary)
    atomic_write_text(workdir / sweep.output, json.dumps(summary, indent=2, default=str) + "\n")
    return summary
