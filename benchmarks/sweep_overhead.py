"""Where a sweep's time goes: the sweep stage against the trials' own compute, and the per-trial overheads.

Runs, in a temporary folder (the repository's ``results/``, ``ray_results/``, ``mlflow.db`` and ``mlartifacts/`` are
never touched), the stages of a params file (the embedded default ``params.yaml`` unless ``--params``):

1. ``prepare`` of the sweep's dataset (timed, not part of the ratios);
2. Ray's own start-up and shut-down: ``study.sweep_ray.init_ray()`` then ``ray.shutdown()`` in a fresh process;
3. the ``sweep`` stage (``python -m pipelines.sweep``), timed as a whole, with the ``STUDY_TEST_PID_DIR`` hook of
   ``study.sweep_trainable`` so every trial's worker records its wall-clock times;
4. the same trial configs (same sampled values, same number of epochs each) through bare
   ``study.train.run_trial(report=None)`` with the checkpoint write replaced by a no-op, ``max_concurrent`` at a
   time in plain processes: what the trials cost without Ray, MLflow or checkpoints;
5. with ``--stages evaluate report``, those stages after the sweep (timed; a failure is recorded, not raised).

Definitions (seconds; "compute" is a trial's ``epoch_seconds`` summed, i.e. its training + validation time):

- ideal = sum of all trials' compute / ``sweep.max_concurrent``; the headline ratio is stage wall / ideal, and
  (stage wall - Ray start-up) / ideal for the target that allows Ray's start-up;
- per trial, from the MLflow run's start and end times (driver side) and the worker's ``time.time()`` stamps:
  *start* = first report - first epoch's ``epoch_seconds`` - the trial's median per-epoch overhead - MLflow run
  start (worker start and imports, data load, model build, MLflow run creation);
  *per-epoch* = the interval between successive ``tune.report`` returns minus that epoch's ``epoch_seconds``
  (checkpoint write and grids, ``tune.report`` with Ray's checkpoint persistence, the hook's own small write),
  split into *report* (inside ``tune.report``) and the rest; *end* = MLflow run end - last report's return
  (the trial's shut-down, the driver's artifact upload, closing the run), less the epochs after that report
  at the trial's median cadence (a trial the scheduler stops never returns from its last ``tune.report``);
- shares are of the trial's compute (per-epoch: of the mean epoch's compute).

Every ratio is measured in one run, so a loaded machine slows both sides alike; absolute seconds are not
comparable across machines or loads. Not a test.

    uv run python benchmarks/sweep_overhead.py --json out.json --md out.md
    uv run python benchmarks/sweep_overhead.py --params studies/compare/params.yaml --stages evaluate report
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from machine_info import cpu_name  # benchmarks/ is on sys.path when a script there runs

REPO = Path(__file__).resolve().parents[1]
RAY_TIMING = """
import json, time
t0 = time.perf_counter()
from study.sweep_ray import init_ray
import ray
t1 = time.perf_counter()
init_ray(start_timeout_s=300)
t2 = time.perf_counter()
ray.shutdown()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "start_s": t2 - t1, "shutdown_s": t3 - t2}))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    return env


def _stage(work: Path, module: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m <module> --params params.yaml`` in ``work``; wall seconds, exit status, output tail."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, "--params", "params.yaml", *args], cwd=work,
                          env=env or _env(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    (work / f"{module.rsplit('.', 1)[-1]}.log").write_text(proc.stdout + proc.stderr)
    return {"wall_s": wall, "rc": proc.returncode, "tail": (proc.stdout + proc.stderr).strip().splitlines()[-3:]}


def copy_params(source: Path, work: Path) -> dict[str, Any]:
    """The params file with its dataset paths made absolute (relative ones are relative to the file's folder,
    where DVC runs its stages) and ``sweep.ray_start_timeout_s`` at least 300 s; every output path stays
    relative, so it lands in ``work``."""
    raw = yaml.safe_load(source.read_text())
    for dataset in (raw.get("datasets") or {}).values():
        for key in ("root", "partition_file", "checksums"):
            if dataset.get(key) and not Path(dataset[key]).is_absolute():
                dataset[key] = str((source.parent / dataset[key]).resolve())
    # A loaded machine can miss Ray's fixed 30 s raylet registration; retrying longer keeps the run going.
    raw["sweep"]["ray_start_timeout_s"] = max(300, raw["sweep"].get("ray_start_timeout_s") or 0)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def _bare_epoch_seconds(config_json: str) -> dict[str, Any]:
    """One trial through run_trial with the checkpoint write a no-op and a report that only records every epoch's
    ``epoch_seconds`` (runs in a pool process)."""
    started = time.perf_counter()
    import study.train as train
    from study.config import TrialConfig

    imported = time.perf_counter()
    train._write_checkpoint = lambda *args, **kwargs: None
    seconds: list[float] = []
    with tempfile.TemporaryDirectory() as workdir:
        config = TrialConfig.model_validate_json(config_json)
        t0 = time.perf_counter()
        train.run_trial(config, report=lambda m, _: seconds.append(float(m["epoch_seconds"])), workdir=workdir)
        wall = time.perf_counter() - t0
    return {"import_s": imported - started, "wall_s": wall, "epoch_seconds": seconds}


def bare_trials(work: Path, summary: dict[str, Any], max_concurrent: int) -> dict[str, Any]:
    """Every trial of the sweep again, same config and epochs, through bare run_trial, max_concurrent at once."""
    from study.config import load_params
    from study.sweep_space import _overrides, resolve_overrides

    os.chdir(work)
    params = load_params(work / "params.yaml")
    base = params.base_trial_config().model_copy(update={"data_dir": (work / params.dataset_dir()).resolve()})
    arms = params.sweep.arms(base.likelihood.family)
    configs = []
    for trial in summary["trials"]:
        config = resolve_overrides(resolve_overrides(base, arms[trial["variant"]].overrides), _overrides(trial["config"]))
        config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": max(1, trial["epochs"])})})
        configs.append(config.model_dump_json())
    started = time.perf_counter()
    with futures.ProcessPoolExecutor(max_concurrent, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(_bare_epoch_seconds, configs))
    wall = time.perf_counter() - started
    for trial, row in zip(summary["trials"], rows):
        row["trial_id"] = trial["trial_id"]
        row["compute_s"] = sum(row["epoch_seconds"])
        row["in_process_overhead_s"] = row["wall_s"] - row["compute_s"]
    compute = sum(r["compute_s"] for r in rows)
    return {"wall_s": wall, "compute_s": compute, "ideal_s": compute / max_concurrent,
            "wall_over_ideal": wall / (compute / max_concurrent), "trials": rows}


def sweep_trials(work: Path, summary: dict[str, Any], progress_dir: Path) -> list[dict[str, Any]]:
    """Per trial: compute and the start / per-epoch / end overheads (see the module docstring)."""
    from mlflow.tracking import MlflowClient

    from study.config import load_params
    from study.tracking import tracking_uri

    os.chdir(work)  # the params' relative tracking URI (sqlite:///mlflow.db) is relative to the stage's folder
    params = load_params(work / "params.yaml")
    client = MlflowClient(tracking_uri=tracking_uri(params.tracking))
    rows = []
    for trial in summary["trials"]:
        run = client.get_run(trial["run_id"]) if trial.get("run_id") else None
        info = json.loads((progress_dir / f"{trial['trial_id']}.json").read_text())
        history = sorted(client.get_metric_history(trial["run_id"], "epoch_seconds"), key=lambda m: m.step)
        compute = {m.step: m.value for m in history}
        reports = sorted(info.get("report_times", []))
        if run is None or not reports:
            continue
        start_ms, end_ms = run.info.start_time, run.info.end_time
        per_epoch, in_report = [], []
        for (e0, _, after0), (e1, before1, after1) in zip(reports, reports[1:]):
            if e1 == e0 + 1 and e1 in compute:
                per_epoch.append(after1 - after0 - compute[e1])
                in_report.append(after1 - before1)
        epoch_overhead = statistics.median(per_epoch) if per_epoch else float("nan")
        overhead = epoch_overhead if per_epoch else 0.0
        first_epoch, _, first_after = reports[0]
        start_cost = first_after - compute.get(first_epoch, 0.0) - overhead - start_ms / 1e3
        # A trial the scheduler stops (ASHA at a rung or at max_t) is stopped inside its last tune.report, which
        # never returns: its last epochs are counted at the trial's median cadence before the end cost.
        last_recorded = reports[-1][0]
        unrecorded = [e for e in compute if e > last_recorded]
        end_cost = end_ms / 1e3 - reports[-1][2] - sum(compute[e] for e in unrecorded) - overhead * len(unrecorded)
        total_compute = sum(compute.values())
        mean_epoch = total_compute / max(1, len(compute))
        rows.append({
            "trial_id": trial["trial_id"], "epochs": len(compute), "compute_s": total_compute,
            "span_s": (end_ms - start_ms) / 1e3,
            "worker_entered_after_run_start_s": info["entered_at"] - start_ms / 1e3,
            "start_s": start_cost,
            "per_epoch_s": epoch_overhead,
            "per_epoch_report_s": statistics.median(in_report) if in_report else float("nan"),
            "per_epoch_share": epoch_overhead / mean_epoch if per_epoch else float("nan"),
            "end_s": end_cost,
            "mean_epoch_compute_s": mean_epoch,
            "raw": {"run_start_ms": start_ms, "run_end_ms": end_ms, "epoch_seconds": compute, "progress": info},
        })
    return rows


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    trials = result["sweep"]["trials"]
    max_concurrent = result["max_concurrent"]
    compute = sum(t["compute_s"] for t in trials)
    ideal = compute / max_concurrent
    wall = result["sweep"]["stage"]["wall_s"]
    ray_start = result["ray"]["start_s"]
    med = lambda key: statistics.median(t[key] for t in trials) if trials else float("nan")  # noqa: E731
    mean_epoch = statistics.median(t["mean_epoch_compute_s"] for t in trials) if trials else float("nan")
    return {
        "trials": len(trials), "epochs": sum(t["epochs"] for t in trials), "compute_s": compute, "ideal_s": ideal,
        "stage_wall_s": wall, "stage_over_ideal": wall / ideal,
        "stage_minus_ray_start_over_ideal": (wall - ray_start) / ideal,
        "start_s_median": med("start_s"), "per_epoch_s_median": med("per_epoch_s"),
        "per_epoch_report_s_median": med("per_epoch_report_s"), "per_epoch_share_median": med("per_epoch_share"),
        "end_s_median": med("end_s"), "mean_epoch_compute_s": mean_epoch,
        "span_over_compute_total": sum(t["span_s"] for t in trials) / compute,
    }


def markdown(result: dict[str, Any]) -> str:
    s, m = result["summary"], result["machine"]
    lines = [
        f"# Sweep overhead: {result['params']}", "",
        f"- date: {result['date']}",
        f"- machine: {m['cpu']}, {m['cores']} logical cores{'; ' + m['note'] if m.get('note') else ''}",
        f"- python {m['python']}, torch {m['torch']}, ray {m['ray']}, mlflow {m['mlflow']}",
        f"- trials: {s['trials']} ({s['epochs']} epochs in all), {result['max_concurrent']} at a time", "",
        "## Stage against ideal", "",
        "| quantity | seconds | ratio |", "|---|---:|---:|",
        f"| sum of the trials' compute (train + val, `epoch_seconds`) | {s['compute_s']:.1f} | |",
        f"| ideal = compute / max_concurrent | {s['ideal_s']:.1f} | 1.00 |",
        f"| sweep stage wall (`python -m pipelines.sweep`) | {s['stage_wall_s']:.1f} | {s['stage_over_ideal']:.2f} |",
        f"| stage wall - Ray start-up | {s['stage_wall_s'] - result['ray']['start_s']:.1f} | "
        f"{s['stage_minus_ray_start_over_ideal']:.2f} |",
        f"| Ray start-up (`init_ray`) | {result['ray']['start_s']:.1f} | |",
        f"| Ray shut-down | {result['ray']['shutdown_s']:.1f} | |",
        f"| importing study.sweep_ray + ray | {result['ray']['import_s']:.1f} | |",
    ]
    bare = result.get("bare")
    if bare:
        lines.append(f"| bare `run_trial` x {s['trials']}, {result['max_concurrent']} at a time, no checkpoints: wall "
                     f"| {bare['wall_s']:.1f} | {bare['wall_s'] / s['ideal_s']:.2f} |")
        lines.append(f"| bare: sum of compute / max_concurrent | {bare['ideal_s']:.1f} | {bare['ideal_s'] / s['ideal_s']:.2f} |")
    prepare = result.get("prepare")
    if prepare:
        lines.append(f"| prepare stage | {prepare['wall_s']:.1f} | |")
    for name, stage in result.get("stages", {}).items():
        shown = f"{stage['wall_s']:.1f}" if stage["rc"] == 0 else f"failed (rc {stage['rc']})"
        lines.append(f"| {name} stage | {shown} | |")
    lines += [
        "", "## Per trial (medians over the trials; shares of the trial's compute, per-epoch of an epoch's)", "",
        "| cost | seconds | share |", "|---|---:|---:|",
        f"| mean epoch compute | {s['mean_epoch_compute_s']:.2f} | 1.00 |",
        f"| fixed start (worker, imports, data, model, MLflow run) | {s['start_s_median']:.2f} | |",
        f"| per epoch beyond compute | {s['per_epoch_s_median']:.3f} | {s['per_epoch_share_median']:.2f} |",
        f"| of which inside `tune.report` (Ray's checkpoint persistence) | {s['per_epoch_report_s_median']:.3f} | |",
        f"| end (trial shut-down, artifact upload) | {s['end_s_median']:.2f} | |",
        f"| sum of trial spans / sum of compute | | {s['span_over_compute_total']:.2f} |",
        "", "| trial | epochs | compute s | span s | start s | per-epoch s | share | in report s | end s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in result["sweep"]["trials"]:
        lines.append(f"| {t['trial_id']} | {t['epochs']} | {t['compute_s']:.1f} | {t['span_s']:.1f} | {t['start_s']:.2f} "
                     f"| {t['per_epoch_s']:.3f} | {t['per_epoch_share']:.2f} | {t['per_epoch_report_s']:.3f} "
                     f"| {t['end_s']:.2f} |")
    if bare:
        lines += ["", "Bare `run_trial` per trial (in-process overhead = wall - compute: data load, model build):", "",
                  "| trial | epochs | compute s | wall s | in-process overhead s |", "|---|---:|---:|---:|---:|"]
        for t in bare["trials"]:
            lines.append(f"| {t['trial_id']} | {len(t['epoch_seconds'])} | {t['compute_s']:.1f} | {t['wall_s']:.1f} "
                         f"| {t['in_process_overhead_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--json", type=Path, help="write the numbers as JSON here")
    parser.add_argument("--md", type=Path, help="write the Markdown here too")
    parser.add_argument("--stages", nargs="*", default=[], choices=["evaluate", "report"])
    parser.add_argument("--no-bare", action="store_true", help="skip the bare run_trial comparison")
    parser.add_argument("--note", default="", help="a note on the machine (e.g. its load) for the header")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--reanalyse", nargs=2, type=Path, metavar=("JSON", "FOLDER"),
                        help="recompute the per-trial figures of an earlier run's JSON from its kept folder "
                             "(progress/, params.yaml, mlflow.db, the sweep summary) instead of running anything")
    args = parser.parse_args()
    if args.reanalyse:
        earlier, folder = args.reanalyse
        result = json.loads(earlier.read_text())
        raw = yaml.safe_load((folder / "params.yaml").read_text())
        summary = json.loads((folder / raw["sweep"].get("output", "results/sweep.json")).read_text())
        result["sweep"]["trials"] = sweep_trials(folder.resolve(), summary, folder / "progress")
        result["summary"] = summarise(result)
        os.chdir(REPO)
        _write(result, args)
        return

    import mlflow
    import ray
    import torch

    source = args.params.resolve()
    work = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    result: dict[str, Any] = {
        "params": str(source.relative_to(REPO)) if source.is_relative_to(REPO) else str(source),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__, "mlflow": mlflow.__version__,
                    "note": args.note},
    }
    try:
        raw = copy_params(source, work)
        result["max_concurrent"] = int(raw["sweep"].get("max_concurrent", 1))
        dataset = raw["sweep"]["dataset"]
        result["prepare"] = _stage(work, "pipelines.prepare", "--dataset", dataset)
        if result["prepare"]["rc"] != 0:
            raise SystemExit(f"prepare failed: {result['prepare']['tail']}")
        ray_proc = subprocess.run([sys.executable, "-c", RAY_TIMING], cwd=work, env=_env(), capture_output=True,
                                  text=True)
        if ray_proc.returncode != 0:  # e.g. a start-up past its timeout on a loaded machine: recorded, not fatal
            result["ray"] = {"import_s": float("nan"), "start_s": float("nan"), "shutdown_s": float("nan"),
                             "error": (ray_proc.stdout + ray_proc.stderr).strip().splitlines()[-1:]}
        else:
            result["ray"] = json.loads(ray_proc.stdout.strip().splitlines()[-1])
        progress = work / "progress"
        progress.mkdir()
        stage = _stage(work, "pipelines.sweep", env=_env() | {"STUDY_TEST_PID_DIR": str(progress)})
        if stage["rc"] != 0:
            raise SystemExit(f"sweep failed: {stage['tail']}")
        summary_path = work / raw["sweep"].get("output", "results/sweep.json")
        summary = json.loads(summary_path.read_text())
        result["sweep"] = {"stage": stage, "trials": sweep_trials(work, summary, progress)}
        for name in args.stages:
            result.setdefault("stages", {})[name] = _stage(work, f"pipelines.{name}")
        if not args.no_bare:
            result["bare"] = bare_trials(work, summary, result["max_concurrent"])
        result["summary"] = summarise(result)
    finally:
        os.chdir(REPO)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    _write(result, args)


def _write(result: dict[str, Any], args: argparse.Namespace) -> None:
    text = markdown(result)
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
