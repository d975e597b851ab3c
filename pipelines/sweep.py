"""DVC stage ``sweep`` (also the ``ray job submit`` entry point): Ray Tune + Optuna + ASHA / PBT, trials in MLflow.

Re-running it after the driver was killed resumes the unfinished sweep when params.yaml is unchanged
(``--no-resume`` starts afresh). Exit status: 0 done, 1 no trial finished or the tracking store is unreachable,
2 invalid parameters.
"""

from __future__ import annotations

import sys

from pipelines.common import stage_arguments
from study.config import ConfigError


def _options(parser) -> None:
    parser.add_argument("--no-resume", action="store_true",
                        help="start afresh even when an unfinished sweep with the same parameters can be resumed")


def main(argv: list[str] | None = None) -> int:
    args, params = stage_arguments(argv, __doc__, _options)
    try:
        params.sweep.check_paths(params.base_trial_config())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from study.sweep import run_sweep  # heavy (Ray); only after the params are known to be valid
    from study.tracking import TrackingUnavailableError

    try:
        summary = run_sweep(params, resume=not args.no_resume)
    except TrackingUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"error: {err or 'interrupted: run the stage again to resume the sweep'}", file=sys.stderr)
        return 130
    best = summary["best_trial"]
    print(
        f"sweep {summary['sweep']}: {summary['num_trials']} trials, {summary['num_early_stopped']} stopped early "
        f"by the scheduler, {summary['num_failed']} failed; parent MLflow run {summary['parent_run_id']}"
    )
    if not summary["best_per_variant"]:
        print("error: no trial finished", file=sys.stderr)
        return 1
    for variant, trial in summary["best_per_variant"].items():
        print(f"best {variant} trial {trial['trial_id']}: {trial['metric']} = {trial['metrics'][trial['metric']]:.2f} "
              f"with {trial['config']}")
    if best is not None:
        print(f"best overall by {summary['metric']}: {best['variant']} trial {best['trial_id']}")
    if summary["objectives"]:
        names = ", ".join(f"{o['metric']} ({o['mode']})" for o in summary["objectives"])
        print(f"Pareto front on {names}: trials {', '.join(summary['pareto_front']) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
