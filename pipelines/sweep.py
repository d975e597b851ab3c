"""DVC stage ``sweep`` (also the ``ray job submit`` entry point): Ray Tune + Optuna + ASHA, trials in MLflow."""

from __future__ import annotations

import sys

from pipelines.common import stage_arguments


def main(argv: list[str] | None = None) -> int:
    _, params = stage_arguments(argv, __doc__)
    from study.sweep import run_sweep  # heavy (Ray); only after the params are known to be valid

    summary = run_sweep(params)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
