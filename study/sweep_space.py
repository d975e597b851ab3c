"""What a sweep searches and how: the search space from ``sweep.search_space``, the searcher that samples it, the
scheduler that stops or perturbs trials, and how a trial's sampled values become its config.

Each key of the space is a dotted path into the trial config (``train.beta``), each value a distribution.
Dimensions with ``when`` are sampled only when the condition holds, which makes the space define-by-run and
conditional (Optuna's native style, passed to Ray Tune's ``OptunaSearch`` as a function). With
``sweep.objectives`` the Optuna search is multi-objective (TPE or NSGA-II); ASHA then stops trials by the first
objective.

Population-based training (``sweep.scheduler.kind: pbt``) runs without a search algorithm, as Ray requires:
the initial population is drawn from the same space by Tune's own random sampler (``searcher.kind: random``,
seeded), and every ``perturbation_interval`` epochs a weak trial continues from a strong trial's checkpoint
with mutated ``sweep.scheduler.mutations`` values (e.g. ``train.beta``, or the structured likelihood's
``likelihood.structured.variance_minimiser_alpha``, where a number means a constant schedule:
:func:`resolve_overrides`).
"""

from __future__ import annotations

from typing import Any

import study.sweep_ray  # noqa: F401  (first: it sets Ray's environment switches before ray is imported)

# isort: split
import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from study.config import (
    ConfigError,
    SearchDimension,
    StudyParams,
    TrialConfig,
    absolute_sqlite_url,
    get_path,
    resolve_trial_config,
)

INDEX_SUFFIX = "@index"  # searcher-side bookkeeping keys in a trial's config; not config paths


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


def _objectives(params: StudyParams, metric: str, mode: str) -> tuple[list[str], list[str]]:
    """(metrics, modes) the search optimises: ``sweep.objectives``, else the arm's one metric."""
    if params.sweep.objectives:
        return [o.metric for o in params.sweep.objectives], [o.mode for o in params.sweep.objectives]
    return [metric], [mode]


def optuna_storage(url: str | None, workdir) -> "optuna.storages.RDBStorage | None":
    """The Optuna RDB storage of ``sweep.searcher.storage`` (a relative SQLite path resolved against
    ``workdir``, the repository root), or None for in-memory studies. Only the driver opens it: Ray Tune's
    ``OptunaSearch`` asks and tells on the driver, so a SQLite file has one writer."""
    if url is None:
        return None
    return optuna.storages.RDBStorage(absolute_sqlite_url(url, workdir))


def _fresh_study(storage, study_name: str) -> None:
    """Drop a study of that name left by an earlier sweep (finished, or abandoned after its parameters changed):
    a new search must not read another sweep's trials as its own history. Its trials stay in MLflow."""
    try:
        optuna.delete_study(study_name=study_name, storage=storage)
    except KeyError:
        pass


def _searcher(params: StudyParams, base: TrialConfig, metric: str, mode: str, seed_offset: int = 0,
              study_name: str = "optuna", storage=None):
    """The arm's search algorithm. ``study_name`` / ``storage`` (from :func:`optuna_storage`): the Optuna study
    it fills, replaced when it exists (this is only called for a search that starts afresh; a resumed one
    comes back with its study from Tune's state)."""
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
    if storage is not None:
        _fresh_study(storage, study_name)
    if len(metrics) == 1:
        return OptunaSearch(space=space, metric=metrics[0], mode=modes[0], sampler=sampler, study_name=study_name,
                            storage=storage)
    return OptunaSearch(space=space, metric=metrics, mode=modes, sampler=sampler, study_name=study_name,
                        storage=storage)


def _param_space(params: StudyParams) -> dict[str, Any] | None:
    """Tune's param_space for ``searcher.kind: random``: the search space, plus PBT's mutated paths (so their
    initial values are drawn by the seeded sampler too); None for Optuna, which samples by itself."""
    sweep = params.sweep
    if sweep.searcher.kind != "random":
        return None
    dims = dict(sweep.scheduler.mutations) | dict(sweep.search_space)
    return {path: _tune_domain(dim) for path, dim in dims.items()}


def _scheduler(params: StudyParams, metric: str, mode: str, max_epochs: int | None = None):
    """The arm's trial scheduler; ``max_epochs``: the arm's ``train.epochs`` (default the base config's), ASHA's
    horizon."""
    sched = params.sweep.scheduler
    epochs = max_epochs if max_epochs is not None else params.train.epochs
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
        max_t=epochs,
        grace_period=min(sched.grace_period, epochs),
        reduction_factor=sched.reduction_factor,
    )
