"""DVC stage ``sweep`` (also the ``ray job submit`` entry point): Ray Tune + Optuna + ASHA / PBT, trials in MLflow.

Re-running it after the driver was killed resumes the unfinished sweep when params.yaml is unchanged
(``--no-resume`` starts afresh); re-running it after the same sweep finished rewrites its summary from MLflow.
SIGTERM, Ctrl+C or the death of the process that started it (``dvc repro``) stop the sweep: its MLflow runs are
marked KILLED (tag ``interrupted_at``) and a re-run resumes them. Exit status: 0 done; 1 no trial finished, the
prepared data is modified, Ray did not start, the tracking store is unreachable, or another driver runs this
sweep; 2 invalid parameters; 130 interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from pipelines.common import stage_arguments
from study.config import ConfigError

# Shells whose `-c` process may stay between `dvc repro` and the stage (see _watch_past_shell).
SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"}


def _options(parser) -> None:
    parser.add_argument("--no-resume", action="store_true",
                        help="start afresh even when an unfinished sweep with the same parameters can be resumed")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray's and Tune's own output (worker INFO lines such as 'Checkpoint "
                             "successfully created', Tune's tables); same as STUDY_VERBOSE=1")


def _stop_with_parent() -> None:
    """SIGTERM -> the Ctrl+C path (Tune stops its trials, the runs are marked KILLED, the state kept for a
    resume); and ask the kernel to send SIGTERM when the process that started this one dies (``dvc repro``
    killed outright does not pass its signal on), so no orphaned driver trains on (Linux ``PR_SET_PDEATHSIG``)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
        _watch_past_shell()


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...; index 19 is the start time)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _watch_past_shell(poll_s: float = 1.0) -> None:
    """``dvc repro`` runs a stage as ``$SHELL -c <cmd>`` (``/bin/sh`` without ``SHELL``). bash replaces itself
    with the command, so the parent that ``PR_SET_PDEATHSIG`` watches is ``dvc``; dash (``/bin/sh`` on Debian)
    stays as the parent, waiting, when ``dvc`` dies. With such a ``-c`` shell as the parent, a thread also watches
    the shell's parent (by pid and start time) and sends this process SIGTERM once it is gone."""
    parent = os.getppid()
    try:
        args = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if len(args) < 2 or Path(args[0].decode(errors="replace")).name not in SHELLS or b"-c" not in args[1:]:
        return
    fields = _proc_stat(parent)
    launcher = int(fields[1]) if fields else 1
    started = (_proc_stat(launcher) or [""] * 20)[19]
    if launcher <= 1:
        return

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            now = _proc_stat(launcher)
            if now is None or now[0] == "Z" or now[19] != started or os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args, params = stage_arguments(argv, __doc__, _options)
    if args.verbose:  # read by study.sweep_ray and study.sweep_console, and inherited by Ray's processes
        os.environ["STUDY_VERBOSE"] = "1"
    try:
        params.sweep.check_paths(params.base_trial_config())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _stop_with_parent()
    from study.data.store import DataIntegrityError
    from study.sweep import NoFinishedTrialError, run_sweep  # heavy (Ray); only after the params are valid
    from study.sweep_ray import RayStartError
    from study.sweep_state import SweepLockedError
    from study.tracking import TrackingUnavailableError

    try:
        summary = run_sweep(params, resume=not args.no_resume)
    except (TrackingUnavailableError, RayStartError, SweepLockedError, NoFinishedTrialError, DataIntegrityError,
            FileNotFoundError) as err:
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
