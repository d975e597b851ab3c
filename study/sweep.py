"""Hyperparameter sweeps: Ray Tune trials, Optuna search, ASHA early stopping or PBT, MLflow runs.

The search space is declared in ``params.yaml`` (``sweep.search_space``): each key is a dotted path into the
trial config (``train.beta``), each value a distribution. Dimensions with ``when`` are sampled only when the
condition holds, which makes the space define-by-run and conditional (Optuna's native style, passed to Ray
Tune's ``OptunaSearch`` as a function). With ``sweep.objectives`` the Optuna search is multi-objective (TPE or
NSGA-II); ASHA then stops trials by the first objective.

Population-based training (``sweep.scheduler.kind: pbt``) runs without a search algorithm, as Ray requires:
the initial population is drawn from the same space by Tune's own random sampler (``searcher.kind: random``,
seeded), and every ``perturbation_interval`` epochs a weak trial continues from a strong trial's checkpoint
with mutated ``sweep.scheduler.mutations`` values (e.g. ``train.beta``, or the structured likelihood's
``likelihood.structured.variance_minimiser_alpha``, where a number means a constant schedule). MLflow params
cannot change, so the effective values are logged per epoch as metrics (``beta``, ``variance_minimiser_alpha``,
``pbt.<path>``).

Ray runs embedded in the process by default, bound to 127.0.0.1; with ``RAY_ADDRESS`` set it joins that cluster
instead (``ray job submit ... -- python -m pipelines.sweep`` sets it for the job). Every trial is one MLflow
child run under the sweep's parent run, written from the driver by :class:`MlflowCallback`.

Failures:
- A trial that raises (including a non-finite loss) or whose worker process or node dies is restarted from its
  last checkpoint (one per epoch) up to ``sweep.max_failures`` times, in the same MLflow run; after that it is
  an ERROR trial in Ray and a FAILED run in MLflow with ``failure_reason``, and the sweep goes on.
- A killed driver: re-running the sweep finds the unfinished sweep's state file
  (``<storage_path>/<name>.sweep_state.json``: parent run id, parameter digest, finished arms) and, when the
  parameters are unchanged, reuses the parent run and continues the unfinished arm with ``Tuner.restore``:
  finished and errored trials are kept, unfinished ones resume from their checkpoints in their own runs.
- An unreachable MLflow server fails the sweep before Ray starts (``study.tracking.connect``).

Test hooks (environment variables read on the driver and handed to the trials; for tests only):
- ``STUDY_TEST_NAN_TRIAL=<text>``: a trial whose directory name (``_trainable_<id>_<n>_<sampled values>``)
  or sampled-config JSON contains ``<text>`` raises ``NonFiniteLossError`` instead of reporting epoch
  ``STUDY_TEST_NAN_EPOCH`` (default 2) and every later one.
- ``STUDY_TEST_PID_DIR=<dir>``: each trial process writes ``<dir>/<trial_id>.json`` with its pid, the epoch it
  started from and its last reported epoch (to kill a trial's worker from outside).
- ``STUDY_TEST_EPOCH_SLEEP=<seconds>``: a trial pauses that long after reporting each epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from study.atomic import atomic_write_text
from study.config import ConfigError, SearchDimension, StudyParams, TrialConfig, get_path, resolve_trial_config
from study.data.store import data_fingerprint
from study.likelihoods import family_elbo_valid
from study.tracking import SweepTracker, close_abandoned, connect, tracking_uri

# Ray must not phone home or bind to the network interface: set before ray is imported anywhere (init_ray
# re-applies the cluster and uv switches where ray was imported first).
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
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining  # noqa: E402
from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

LOOPBACK = "127.0.0.1"
INDEX_SUFFIX = "@index"  # searcher-side bookkeeping keys in a trial's config; not config paths
STATE_SUFFIX = ".sweep_state.json"  # <storage_path>/<sweep name><suffix>: what a re-run needs to resume
HOOK_ENV = {
    "nan_trial": "STUDY_TEST_NAN_TRIAL",
    "nan_epoch": "STUDY_TEST_NAN_EPOCH",
    "pid_dir": "STUDY_TEST_PID_DIR",
    "epoch_sleep": "STUDY_TEST_EPOCH_SLEEP",
}
# Trackers of the sweeps this process runs, by parent run id: a callback unpickled by Tuner.restore finds its
# tracker here instead of carrying an MLflow client through a pickle.
_TRACKERS: dict[str, SweepTracker] = {}


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def init_ray(num_cpus: int | None = None) -> None:
    """Start an embedded Ray on loopback, or join ``RAY_ADDRESS`` when it is set. Idempotent."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    from ray._private import ray_constants

    # Ray reads these switches from the environment once, when it is first imported, which may have happened
    # before this module set them (a test session). Embedded or on a loopback cluster this process must
    # advertise 127.0.0.1, not the LAN address Ray substitutes for it; on a real cluster, its node's address.
    ray_constants.ENABLE_RAY_CLUSTER = bool(address) and not _is_loopback(address)
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"].lower() in ("1", "true")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
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


def _tune_domain(dim: SearchDimension):
    """The same distribution as a Tune search-space domain (Tune's random sampler and PBT's mutations)."""
    if dim.distribution == "categorical":
        return tune.choice(dim.choices)
    if dim.distribution == "int":
        return tune.randint(int(dim.low), int(dim.high) + 1)  # Tune's upper bound is exclusive
    if dim.distribution == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    return tune.uniform(dim.low, dim.high)


def _overrides(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config without the searcher's ``@index`` bookkeeping keys: dotted path -> value."""
    return {k: v for k, v in config.items() if not k.endswith(INDEX_SUFFIX)}


def resolve_overrides(base: TrialConfig, overrides: dict[str, Any]) -> TrialConfig:
    """:func:`study.config.resolve_trial_config`, where a number sampled for a schedule-valued field (the
    structured likelihood's ``variance_minimiser_alpha``) means the constant schedule of that value.

    Raises:
        ConfigError: an override names a missing field or gives an invalid value.
    """
    try:
        return resolve_trial_config(base, overrides)
    except ConfigError as err:
        coerced = dict(overrides)
        for path, value in overrides.items():
            try:
                current = get_path(base, path)
            except ValueError:
                continue
            if isinstance(value, int | float) and not isinstance(value, bool) and (
                current is None or (isinstance(current, dict) and "kind" in current)
            ):
                coerced[path] = {"kind": "constant", "value": float(value)}
        if coerced == overrides:
            raise
        try:
            return resolve_trial_config(base, coerced)
        except ConfigError:
            raise err from None


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


def _trainable(
    config: dict[str, Any],
    base: dict[str, Any],
    data_dir_relative: str | None = None,
    data_sha256: str | None = None,
    hooks: dict[str, str] | None = None,
) -> None:
    """Ray Tune function trainable: resolve the trial config, train, report every epoch with a checkpoint.

    Started again with the trial's latest checkpoint after a failure, after a resumed sweep, or by PBT with a
    mutated ``config`` and another trial's checkpoint: training then continues from that checkpoint's epoch
    with the config given now.
    """
    from study.train import NonFiniteLossError, run_trial  # imported in the worker; keeps the driver light

    hooks = hooks or {}
    overrides = _overrides(config)
    trial_config = _locate_data(
        resolve_overrides(TrialConfig.model_validate(base), overrides), data_dir_relative, data_sha256
    )
    context = tune.get_context()
    trial_id = context.get_trial_id()
    node_id = ray.get_runtime_context().get_node_id()
    label = f"{Path(context.get_trial_dir()).name} {json.dumps(overrides, sort_keys=True, default=str)}"
    nan_from = int(hooks["nan_epoch"]) if "nan_epoch" in hooks else 2
    forced_nan = bool(hooks.get("nan_trial")) and hooks["nan_trial"] in label
    sleep = float(hooks.get("epoch_sleep", 0))
    progress = {"pid": os.getpid(), "node_id": node_id, "start_epoch": 0, "epoch": 0}

    def report(metrics: dict[str, float], checkpoint_dir: Path) -> None:
        epoch = int(metrics.get("epoch", 0))
        if forced_nan and epoch >= nan_from:
            raise NonFiniteLossError(
                f"non-finite training loss at epoch {epoch}: nan (test hook {HOOK_ENV['nan_trial']})"
            )
        tune.report(metrics | {"node_id": node_id}, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)))
        if "pid_dir" in hooks:
            _write_progress(hooks["pid_dir"], trial_id, progress | {"epoch": epoch})
        if sleep:
            time.sleep(sleep)

    # A restarted trial (lost worker, resumed sweep, PBT exploit) continues from its checkpoint's epoch.
    checkpoint = tune.get_checkpoint()
    with (
        tempfile.TemporaryDirectory(prefix="trial-") as workdir,
        checkpoint.as_directory() if checkpoint is not None else nullcontext(None) as resume_from,
    ):
        if "pid_dir" in hooks:
            saved = Path(resume_from) / "metrics.json" if resume_from else None
            done = int(json.loads(saved.read_text()).get("epoch", 0)) if saved and saved.is_file() else 0
            progress |= {"start_epoch": done, "epoch": done}
            _write_progress(hooks["pid_dir"], trial_id, progress)
        run_trial(trial_config, report, workdir=workdir, resume_from=resume_from)


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
            trial.trial_id, _overrides(trial.config), config, family_elbo_valid(config.family),
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
             "hostname": result.get("hostname")},
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


def _objectives(params: StudyParams, metric: str, mode: str) -> tuple[list[str], list[str]]:
    """(metrics, modes) the search optimises: ``sweep.objectives``, else the arm's one metric."""
    if params.sweep.objectives:
        return [o.metric for o in params.sweep.objectives], [o.mode for o in params.sweep.objectives]
    return [metric], [mode]


def _searcher(params: StudyParams, base: TrialConfig, metric: str, mode: str, seed_offset: int = 0):
    sweep = params.sweep
    seed = sweep.searcher.seed + seed_offset
    if sweep.searcher.kind == "random":
        # Tune's own sampler over param_space (see _param_space); seeded for a reproducible population. It
        # limits concurrency itself (Tune ignores max_concurrent_trials for it).
        return BasicVariantGenerator(random_state=seed, max_concurrent=sweep.max_concurrent)
    sampler = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }[sweep.searcher.sampler]()
    space = DefineByRunSpace(sweep.search_space, base)
    metrics, modes = _objectives(params, metric, mode)
    # metric and mode go to the searcher and scheduler themselves: Tune does not forward them through the
    # ConcurrencyLimiter that max_concurrent_trials wraps around the searcher.
    if len(metrics) == 1:
        return OptunaSearch(space=space, metric=metrics[0], mode=modes[0], sampler=sampler)
    return OptunaSearch(space=space, metric=metrics, mode=modes, sampler=sampler)


def _param_space(params: StudyParams) -> dict[str, Any] | None:
    """Tune's param_space for ``searcher.kind: random``: the search space, plus PBT's mutated paths (so their
    initial values are drawn by the seeded sampler too); None for Optuna, which samples by itself."""
    sweep = params.sweep
    if sweep.searcher.kind != "random":
        return None
    dims = dict(sweep.scheduler.mutations) | dict(sweep.search_space)
    return {path: _tune_domain(dim) for path, dim in dims.items()}


def _scheduler(params: StudyParams, metric: str, mode: str):
    sched = params.sweep.scheduler
    if sched.kind == "fifo":
        return FIFOScheduler()
    if sched.kind == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            metric=metric,
            mode=mode,
            perturbation_interval=sched.perturbation_interval,
            quantile_fraction=sched.quantile_fraction,
            resample_probability=sched.resample_probability,
            hyperparam_mutations={
                path: list(dim.choices) if dim.distribution == "categorical" else _tune_domain(dim)
                for path, dim in sched.mutations.items()
            },
        )
    metrics, modes = _objectives(params, metric, mode)  # ASHA stops by one metric: the first objective
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=metrics[0],
        mode=modes[0],
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
                "run_id": tracker.run_id(trial_id),
                "variant": variant,
                "family": family,
                "metric": metric,
                "mode": mode,
                "status": "FAILED" if result.error else "FINISHED",
                "error": str(result.error).strip().splitlines()[-1] if result.error else None,
                "config": dict(result.config or {}),
                "epochs": int(metrics.get("epoch", metrics.get("training_iteration", 0))),
                "node_id": metrics.get("node_id"),
                "metrics": {k: v for k, v in metrics.items() if k.startswith(("train_", "val_"))},
            }
        )
    return trials


def _pareto_trials(trials: list[dict[str, Any]], params: StudyParams) -> list[str]:
    """Trial ids of the finished trials that no other finished trial dominates on ``sweep.objectives``."""
    import pandas as pd

    from study.report_figures import pareto_front

    objectives = params.sweep.objectives
    rows = [t for t in trials if t["status"] == "FINISHED" and all(o.metric in t["metrics"] for o in objectives)]
    if not rows:
        return []
    frame = pd.DataFrame([{o.metric: t["metrics"][o.metric] for o in objectives} for t in rows])
    mask = pareto_front(frame, minimise=[o.metric for o in objectives if o.mode == "min"],
                        maximise=[o.metric for o in objectives if o.mode == "max"])
    return [t["trial_id"] for t, keep in zip(rows, mask) if keep]


# ----------------------------------------------------------------------------------------------- resume
def _params_digest(params: StudyParams, fingerprint: str, uri: str) -> str:
    """What makes a re-run the same sweep: the trial sections, the sweep (not its output path), the data and
    the tracking store."""
    dump = params.model_dump(mode="json")
    key = {
        "model": dump["model"], "likelihood": dump["likelihood"], "train": dump["train"],
        "sweep": {k: v for k, v in dump["sweep"].items() if k != "output"},
        "experiment": dump["tracking"]["experiment"], "tracking_uri": uri, "data": fingerprint,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _resumable_state(state_path: Path, digest: str, client, experiment_id: str) -> dict[str, Any] | None:
    """The saved state of an unfinished sweep with the same parameters, else None (a fresh sweep; an
    unfinished one with other parameters is closed in MLflow first)."""
    if not state_path.is_file():
        return None
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError:
        return None
    if state.get("status") == "finished":
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
    storage = (workdir / sweep.storage_path).resolve()
    state_path = storage / f"{sweep.name}{STATE_SUFFIX}"
    digest = _params_digest(params, fingerprint, uri)
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
    atomic_write_text(state_path, json.dumps(state, indent=2, default=str) + "\n")
    _TRACKERS[tracker.parent_run_id] = tracker

    resources = {
        "cpu": sweep.resources_per_trial.cpu, "gpu": sweep.resources_per_trial.gpu,
        "custom_resources": dict(sweep.resources_per_trial.custom),
    }
    relative_data = None if params.dataset_dir().is_absolute() else str(params.dataset_dir())
    hooks = _hooks_from_env()
    init_ray()
    trials: list[dict[str, Any]] = []
    known_trials: set[str] = set()
    try:
        # One search per arm with the same budget, so arms are compared at equal tuning effort.
        for index, (variant, arm) in enumerate(arms.items()):
            arm_base = resolve_overrides(base, arm.overrides)
            metric, mode = arm.metric or sweep.metric, arm.mode or sweep.mode
            if state["arms"].get(variant, {}).get("status") == "finished":
                trials += state["arms"][variant]["trials"]
                known_trials |= {t["trial_id"] for t in state["arms"][variant]["trials"]}
                continue
            trainable = tune.with_resources(
                tune.with_parameters(
                    _trainable, base=arm_base.model_dump(mode="json"), data_dir_relative=relative_data,
                    data_sha256=fingerprint, hooks=hooks,
                ),
                resources,
            )
            callback = MlflowCallback(tracker, arm_base, params.train.epochs, variant, metric, mode,
                                      mutations=tuple(sweep.scheduler.mutations))
            path = experiment_dirs[variant]
            if resumed and tune.Tuner.can_restore(str(path)):
                # Finished and errored trials are kept as they are; unfinished ones continue from their latest
                # checkpoints. The callback comes back from the Tuner's pickle and finds `tracker` by parent id.
                tuner = tune.Tuner.restore(
                    str(path), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False,
                    param_space=_param_space(params),
                )
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=_param_space(params),
                    tune_config=tune.TuneConfig(
                        search_alg=_searcher(params, arm_base, metric, mode, seed_offset=index),
                        scheduler=_scheduler(params, metric, mode),
                        num_samples=sweep.num_trials,
                        max_concurrent_trials=None if sweep.searcher.kind == "random" else sweep.max_concurrent,
                    ),
                    run_config=tune.RunConfig(
                        name=path.name,
                        storage_path=str(storage),
                        callbacks=[callback],
                        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                        # PBT keeps every checkpoint: it re-registers the checkpoints it asks a function
                        # trainable to save, and deleting old ones then fails and blocks its exploit step.
                        checkpoint_config=tune.CheckpointConfig(
                            num_to_keep=None if sweep.scheduler.kind == "pbt" else 2
                        ),
                        verbose=0,  # one line per finished trial comes from MlflowCallback instead
                    ),
                )
            results = tuner.fit()
            if results.num_terminated + results.num_errors < len(results):  # Ctrl+C: Tune returns early
                raise KeyboardInterrupt(f"sweep {sweep.name} interrupted with unfinished trials: run it again "
                                        "to resume them")
            arm_trials = _collect(results, tracker, variant, arm_base.family, metric, mode)
            trials += arm_trials
            known_trials |= {t["trial_id"] for t in arm_trials}
            state["arms"][variant] = {"status": "finished", "trials": arm_trials}
            atomic_write_text(state_path, json.dumps(state, indent=2, default=str) + "\n")
        if resumed:
            _drop_orphans(tracker, known_trials)
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
        "num_early_stopped": sum(t["status"] == "FINISHED" and t["epochs"] < params.train.epochs for t in trials),
        "variants": {name: arm.model_dump(mode="json") for name, arm in arms.items()},
        "best_trial": best,
        "best_per_variant": best_per_variant,
        "pareto_front": _pareto_trials(trials, params) if sweep.objectives else [],
        "trials": trials,
    }
    tracker.finish_sweep("FINISHED", summary)
    atomic_write_text(workdir / sweep.output, json.dumps(summary, indent=2, default=str) + "\n")
    state["status"] = "finished"
    atomic_write_text(state_path, json.dumps(state, indent=2, default=str) + "\n")
    return summary
