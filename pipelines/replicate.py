"""DVC stage ``replicate``: every sweep arm's best configuration trained again with ``replicate.num_seeds`` fresh
seeds (Ray Tune trials, MLflow child runs of the sweep's parent run tagged ``replicate_of`` / ``seed``), written to
``replicate.output`` for the evaluate and report stages.

``num_seeds: 0`` writes an empty ``arms`` mapping at once (neither Ray nor MLflow starts). Re-running it after the
driver was killed resumes the unfinished replicates when the parameters are unchanged (``--no-resume`` starts
afresh); after they all finished it rewrites the output without training. SIGTERM, Ctrl+C or the death of the
process that started it stop it as they stop the sweep stage. Exit status: 0 done (a failed replicate is recorded
FAILED in the output, not an exit status); 1 no sweep summary, the prepared data is missing or modified, Ray did
not start, the tracking store is unreachable, or another driver runs these replicates; 2 invalid parameters
(also an explicit ``replicate.seeds`` holding a search seed); 130 interrupted.
"""

from __future__ import annotations

import sys

from pipelines.common import stage_arguments
from pipelines.sweep import _stop_with_parent
from study.config import ConfigError


def _options(parser) -> None:
    parser.add_argument("--no-resume", action="store_true",
                        help="start afresh even when unfinished or finished replicates with the same parameters exist")


def main(argv: list[str] | None = None) -> int:
    args, params = stage_arguments(argv, __doc__, _options)
    _stop_with_parent()
    from study.data.store import DataIntegrityError
    from study.replicate import run_replicates  # heavy (Ray); only after the params are valid
    from study.sweep_ray import RayStartError
    from study.sweep_state import SweepLockedError
    from study.tracking import TrackingUnavailableError

    try:
        result = run_replicates(params, resume=not args.no_resume)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (TrackingUnavailableError, RayStartError, SweepLockedError, DataIntegrityError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"error: {err or 'interrupted: run the stage again to resume the replicates'}", file=sys.stderr)
        return 130
    if not result["arms"]:
        print(f"replicate: num_seeds {result['num_seeds']}: no replicates ({params.replicate.output} lists no arms)")
    for arm, entry in result["arms"].items():
        done = [r for r in entry["replicates"] if r["status"] == "FINISHED"]
        print(f"replicates of {arm} trial {entry['trial_id']} (search seed {entry['search_seed']}): "
              f"{len(done)} of {len(entry['replicates'])} finished, seeds {[r['seed'] for r in entry['replicates']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
