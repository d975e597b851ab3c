"""One bounded run that measures the training loop on a GPU and states each speed target met or not.

Written to run in at most about 6 minutes on one GPU (an H200 was the target) from one command, so a run and a
rerun fit a short lease on a lent machine; ``--device cpu --tiny`` dry-runs every section on a laptop CPU in a
couple of minutes. It measures, reusing ``benchmarks/train_throughput.py`` and ``benchmarks/likelihoods.py``:

- ``machine``: device name, torch / CUDA / Python versions, date (UTC), and the dense matrix rate of a large
  ``torch.matmul`` in fp32 and bf16 (``train_throughput.matmul_rate``; bf16 on CUDA is the "% peak" reference);
- ``throughput``: images/s of the real ``study.train.training_step`` (``train_throughput.Trial`` /
  ``measure``) for every family at every ``--batch`` (64 and 256) and option set (``fp32``, ``bf16``,
  ``bf16+cl`` channels-last, ``bf16+cl+compile``), with matrix FLOPs per step and the share of the measured
  bf16 matmul rate. The compiled rows of the Gaussian and structured n_f=5 run first (the targets need them);
  the other families' compiled rows run last, in whatever time is left;
- ``sampler``: the structured likelihood's banded sampler against a dense triangular solve at 64 x 64
  (``likelihoods.measure_sampling``: n_f = 3, 4 images, one channel);
- ``profile``: a ``torch.profiler`` table of one training step for the Gaussian and structured n_f=5 (top
  operators by device time; GPU kernel time against the step's wall time and the CPU time spent launching);
- ``pytest``: the CUDA cases of ``tests/test_speed.py`` and the structured likelihood's CUDA test (the ones
  skipped without a GPU: ``-k cuda``), run by pytest in a subprocess, output in ``pytest.log``;
- ``concurrent``: aggregate images/s of 1, 2, 4, 8 plain training processes sharing the device
  (``train_throughput.concurrent``; no Ray);
- ``epoch``: one CelebA-size epoch (162,770 train + 19,867 val images, 64 x 64 RGB, made by tiling the 32 real
  sample images in ``data/sample/celeba``, preprocessed as the ``prepare`` stage does) through the real
  ``study.train.run_trial`` loop (train + validation + checkpoint) for the Gaussian and structured n_f=5, at
  the fastest option set the throughput section measured for that family at ``--epoch-batch``; two epochs when
  compiling (the first one compiles), and the projected 110-epoch paper run = first epoch + 109 x the last.

Every section is wrapped: one that fails records its error and the others still run. A global time budget
(``--budget`` seconds) gives each section a share; a section (or row) that does not fit is recorded as
skipped, and an alarm at the budget plus a margin stops whatever runs then. JSON and Markdown are rewritten
after every section, so a run stopped from outside still leaves what it measured.

    PYTHONPATH=. python benchmarks/gpu_check.py --out "$OUT"                     # on a GPU machine
    uv run python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpucheck   # CPU dry run
    bash benchmarks/gpu_check.sh                                                # wrapper: carried wheels + log

Outputs under ``--out`` (default ``$OUT``, else ``benchmarks/results/gpu_check``): ``gpu_check.json``,
``gpu_check.md``, ``profile.md`` (the profiler tables) and ``pytest.log``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):  # study/ and the sibling benchmarks, whatever the working directory
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

import likelihoods as bench_likelihoods  # noqa: E402  (benchmarks/likelihoods.py)
import train_throughput as bench_train  # noqa: E402  (benchmarks/train_throughput.py)
import study.speed  # noqa: E402

GAUSSIAN = "gaussian per-pixel"
STRUCTURED = "structured n_f=5"
TARGET_FAMILIES = (GAUSSIAN, STRUCTURED)
CELEBA_TRAIN, CELEBA_VAL = 162_770, 19_867  # CelebA's official partition (Liu et al. 2015)
PAPER_EPOCHS = 110
SAMPLE_IMAGES = REPO / "data" / "sample" / "celeba" / "img_align_celeba"

# Share of --budget each section may use (the rest is slack); "throughput_rest" gets whatever is left.
SHARES = {"throughput": 0.27, "sampler": 0.02, "profile": 0.03, "pytest": 0.22, "concurrent": 0.16, "epoch": 0.30}
SECTIONS = ("machine", "throughput", "sampler", "profile", "pytest", "concurrent", "epoch", "throughput_rest")


class BudgetExceeded(RuntimeError):
    """The global time budget (plus its margin) ran out while a section was running."""


class _StopTrial(Exception):
    """Raised from run_trial's report callback when the next epoch would not fit the section's time."""


# -------------------------------------------------------------------------------------------------- options
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="output folder (default $OUT, else benchmarks/results/gpu_check)")
    p.add_argument("--tiny", action="store_true", help="small sizes for a CPU dry run (any flag given wins)")
    p.add_argument("--budget", type=float, default=None, help="global time budget, s (default 320; tiny 180)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    # model and throughput
    p.add_argument("--size", type=int, default=None, help="H = W (default 64; tiny 32)")
    p.add_argument("--latent-dim", type=int, default=None, help="default 128 (params.yaml); tiny 16")
    p.add_argument("--width", type=int, default=None, help="default 32 (params.yaml); tiny 8")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default 64 256; tiny 8 16")
    p.add_argument("--families", nargs="+", default=None, choices=list(bench_train.FAMILIES), metavar="FAMILY")
    p.add_argument("--options", nargs="+", default=None, help="default fp32 bf16 bf16+cl bf16+cl+compile")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; tiny on CPU aot_eager)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (default 10; tiny 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks, best reported (default 3; tiny 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 4 on CUDA, 1 on CPU)")
    # concurrency
    p.add_argument("--concurrent", type=int, nargs="+", default=None, help="process counts (default 1 2 4 8; tiny 1 2)")
    p.add_argument("--concurrent-batch", type=int, default=None, help="default: the first --batch")
    p.add_argument("--concurrent-options", default="bf16+cl", help="eager by default: 15 compiles cost minutes")
    p.add_argument("--duration", type=float, default=None, help="s each concurrent process runs (default 8; tiny 2)")
    # epoch
    p.add_argument("--train-images", type=int, default=None, help=f"default {CELEBA_TRAIN}; tiny 256")
    p.add_argument("--val-images", type=int, default=None, help=f"default {CELEBA_VAL}; tiny 64")
    p.add_argument("--epoch-batch", type=int, default=None, help="default: the last --batch")
    p.add_argument("--epoch-options", default="auto", help="auto: the fastest measured for the family, else bf16+cl")
    p.add_argument("--epoch-epochs", type=int, default=None, help="default 2 with compile (the 1st compiles), else 1")
    # sampler, profile, pytest
    p.add_argument("--sample-size", type=int, default=None, help="sampler H = W (default 64; tiny 16)")
    p.add_argument("--profile-batch", type=int, default=None, help="default: the last --batch")
    p.add_argument("--profile-options", default="bf16+cl")
    p.add_argument("--pytest-k", default="cuda", help="pytest -k expression; '' runs every case (default: the "
                   "cases skipped without CUDA)")
    args = p.parse_args(argv)

    cuda = torch.device(args.device).type == "cuda"
    full = dict(budget=320.0, size=64, latent_dim=128, width=32, batch=[64, 256], warmup=3, steps=10, repeats=3,
                concurrent=[1, 2, 4, 8], duration=8.0, train_images=CELEBA_TRAIN, val_images=CELEBA_VAL,
                sample_size=64, options=["fp32", "bf16", "bf16+cl", "bf16+cl+compile"])
    tiny = dict(budget=180.0, size=32, latent_dim=16, width=8, batch=[8, 16], warmup=1, steps=2, repeats=1,
                concurrent=[1, 2], duration=2.0, train_images=256, val_images=64, sample_size=16,
                families=[GAUSSIAN, STRUCTURED, "blur"], options=["fp32", "bf16", "bf16+cl", "bf16+cl+compile"])
    defaults = tiny if args.tiny else full
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.families is None:
        args.families = list(bench_train.FAMILIES)
    if args.threads is None:
        args.threads = 4 if cuda else 1
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if (args.tiny and not cuda) else "inductor"
    args.concurrent_batch = args.concurrent_batch or args.batch[0]
    args.epoch_batch = args.epoch_batch or args.batch[-1]
    args.profile_batch = args.profile_batch or args.batch[-1]
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results" / "gpu_check"
    return args


def bench_namespace(args: argparse.Namespace, **extra) -> SimpleNamespace:
    """The attributes ``train_throughput.Trial`` / ``measure`` / ``concurrent`` read from their argparse args."""
    ns = SimpleNamespace(size=args.size, latent_dim=args.latent_dim, width=args.width, warmup=args.warmup,
                         steps=args.steps, repeats=args.repeats, threads=args.threads, batch=list(args.batch),
                         duration=args.duration, concurrent=list(args.concurrent), concurrent_family=GAUSSIAN)
    for key, value in extra.items():
        setattr(ns, key, value)
    return ns


def options_of(text: str, args: argparse.Namespace) -> study.speed.SpeedOptions:
    options = bench_train.parse_options(text)
    return study.speed.SpeedOptions(options.precision, options.channels_last, options.compile, args.compile_backend)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ sections
def section_machine(args, device, result) -> dict:
    """Versions, device and the measured matmul rates (the '% peak' reference)."""
    info = bench_train.machine([device])
    import torchvision

    info["torchvision"] = torchvision.__version__
    info["device"] = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = f"{props.total_memory / 2**30:.1f}"
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown"
    n = (8192 if device.type == "cuda" else 1024) if not args.tiny else 512
    rates = {str(dt).removeprefix("torch."): bench_train.matmul_rate(device, dt, n)
             for dt in (torch.float32, torch.bfloat16)}
    peak = rates["bfloat16"] if device.type == "cuda" else max(rates.values())
    return {"info": info, "matmul": {**rates, "peak": peak, "n": n}}


def _throughput_plan(args) -> tuple[list, list]:
    """(first, rest) lists of (options, family, batch) rows. First: the target families' eager rows, then their
    compiled rows (the targets need them), then the other families' eager rows. Rest: the other families'
    compiled rows (plus, at run time, whatever ``first`` had to skip)."""
    target_eager, target_compiled, other_eager, rest = [], [], [], []
    for text in args.options:
        compiled = bench_train.parse_options(text).compile
        for batch in args.batch:
            for family in args.families:
                if family in TARGET_FAMILIES:
                    (target_compiled if compiled else target_eager).append((text, family, batch))
                else:
                    (rest if compiled else other_eager).append((text, family, batch))
    return target_eager + target_compiled + other_eager, rest


def run_throughput_rows(args, device, result, plan, deadline: float) -> dict:
    """Measure ``plan``'s (options, family, batch) rows into ``result['throughput']`` until ``deadline``."""
    store = result.setdefault("throughput", {"rows": [], "skipped": [], "errors": []})
    peak = (result.get("machine") or {}).get("matmul", {}).get("peak", float("nan"))
    ns = bench_namespace(args)
    flops: dict = store.setdefault("_flops", {})
    for text, family, batch in plan:
        label = f"{text} | {family} | {batch}"
        if time.monotonic() > deadline:
            store["skipped"].append(label)
            store.setdefault("_skipped_rows", []).append((text, family, batch))
            continue
        try:
            torch._dynamo.reset()  # fresh compile caches: no recompile limit across models
            trial = bench_train.Trial(family, batch, ns, device, options_of(text, args))
            key = f"{family}|{batch}"
            if key not in flops:
                flops[key] = trial.flops()
            row = {"options": text, "family": family, "batch": batch, **bench_train.measure(trial, ns),
                   "gflop_per_step": flops[key] / 1e9}
            row["step_ms"] = 1e3 * batch / row["images_per_s"]
            row["tflop_per_s"] = row["gflop_per_step"] / 1e3 * row["images_per_s"] / batch
            row["share_of_peak"] = row["tflop_per_s"] * 1e12 / peak
            store["rows"].append(row)
            print(f"  {label}: {row['images_per_s']:.0f} img/s, {row['step_ms']:.2f} ms/step, "
                  f"first step {row['first_step_s']:.1f} s", flush=True)
            del trial
        except BudgetExceeded:
            raise
        except Exception as err:  # one failing row (e.g. a compile error) must not lose the others
            store["errors"].append({"row": label, "error": f"{type(err).__name__}: {err}"})
            print(f"  {label}: ERROR {type(err).__name__}: {err}", flush=True)
    _ratios(store["rows"])
    return store


def _pending(result: dict) -> list:
    """The rows an earlier throughput pass skipped, removed from its skipped list (they get another chance)."""
    store = result.get("throughput") or {}
    rows = store.pop("_skipped_rows", [])
    store["skipped"] = []
    return rows


def _ratios(rows: list[dict]) -> None:
    by = {(r["options"], r["family"], r["batch"]): r for r in rows}
    for r in rows:
        base = by.get((r["options"], GAUSSIAN, r["batch"]))
        fp32 = by.get(("fp32", r["family"], r["batch"]))
        r["vs_gaussian"] = r["images_per_s"] / base["images_per_s"] if base else float("nan")
        r["vs_fp32"] = r["images_per_s"] / fp32["images_per_s"] if fp32 else float("nan")


def section_sampler(args, device, result) -> dict:
    """Banded sampler vs dense triangular solve (``benchmarks/likelihoods.py``'s ``measure_sampling``)."""
    ns = SimpleNamespace(device=str(device), size=args.sample_size, channels=1, sample_batch=4,
                         repeats=max(3, args.repeats))
    out = bench_likelihoods.measure_sampling(ns)
    out["speedup_vs_dense_solve"] = out["dense_solve"] / out["banded"]
    out["speedup_vs_dense_build_solve"] = out["dense_build_solve"] / out["banded"]
    out["setting"] = f"n_f=3, {ns.sample_batch} x 1 x {ns.size} x {ns.size}, min of {ns.repeats}"
    return out


def _kernel_time_us(prof) -> float:
    """Summed duration of the device-side events (kernels, memcpy, memset) of a finished profile, us."""
    from torch.autograd import DeviceType

    try:
        return float(sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA))
    except (AttributeError, TypeError):  # a profiler whose events lack these fields: say unknown, not 0
        return float("nan")


def _is_launch(name: str) -> bool:
    # Runtime and driver API launches (eager ATen kernels, Triton's cuLaunchKernel, CUDA graph replays).
    return name.startswith(("cudaLaunch", "cuLaunch", "cudaGraphLaunch"))


def section_profile(args, device, result) -> dict:
    """One training step of the Gaussian and structured n_f=5 under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ns = bench_namespace(args)
    out = {"options": args.profile_options, "batch": args.profile_batch, "families": {}}
    for family in TARGET_FAMILIES:
        torch._dynamo.reset()
        trial = bench_train.Trial(family, args.profile_batch, ns, device, options_of(args.profile_options, args))
        for _ in range(max(2, args.warmup)):
            trial.step()
        sync(device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            trial.step()
            sync(device)
            wall = time.perf_counter() - t0
        averages = prof.key_averages()
        sort = "self_cpu_time_total"
        if cuda:
            sort = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
        table = averages.table(sort_by=sort, row_limit=20, max_name_column_width=60)
        # GPU time: every kernel's duration (one stream, so they do not overlap); against the step's wall
        # time it says whether the GPU waits for the CPU to launch work.
        gpu_us = _kernel_time_us(prof) if cuda else 0.0
        launches = [e for e in averages if _is_launch(e.key)]
        launch_us = sum(e.self_cpu_time_total for e in launches)
        out["families"][family] = {
            "wall_ms": 1e3 * wall,
            "gpu_kernel_ms": gpu_us / 1e3,
            "gpu_busy_share": (gpu_us / 1e6) / wall if cuda else float("nan"),
            "kernel_launches": int(sum(e.count for e in launches)),
            "launch_cpu_ms": launch_us / 1e3,
            "cpu_total_ms": sum(e.self_cpu_time_total for e in averages) / 1e3,
            "table": table,
        }
        del trial
    return out


def section_pytest(args, device, result, timeout: float) -> dict:
    """``tests/test_speed.py`` and the structured CUDA test through pytest, output kept in ``pytest.log``."""
    targets = ["tests/test_speed.py", "tests/likelihoods/test_structured.py::test_cuda_matches_cpu"]
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-rA", "-p", "no:cacheprovider"]
    if args.pytest_k:
        cmd += ["-k", args.pytest_k]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "pytest.log"
    t0 = time.monotonic()
    with open(log, "w") as fh:  # straight to the file: a run stopped at its timeout keeps what it printed
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = log.read_text()
    if rc == "timeout":
        text += f"\n[gpu_check: pytest stopped after {timeout:.0f} s]\n"
        log.write_text(text)
    outcomes = {}
    for line in text.splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\[\d+\]\s+)?(\S+)", line)
        if m:
            outcomes.setdefault(m.group(1), []).append(m.group(3))
    summary = next((ln.strip("= ") for ln in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary)}
    return {"command": " ".join(cmd[1:]), "rc": rc, "summary": summary, "counts": counts,
            "failed": outcomes.get("FAILED", []) + outcomes.get("ERROR", []), "seconds": time.monotonic() - t0,
            "log": "pytest.log"}


def section_concurrent(args, device, result, allowance: float) -> dict:
    """Aggregate images/s of N plain processes sharing the device (``train_throughput.concurrent``, one call
    per N so a count that would not fit the allowance is skipped instead of overrunning it)."""
    counts = list(args.concurrent)
    deadline = time.monotonic() + allowance
    # A count costs process start-up (imports, CUDA context) + warm-up + the duration; guess 12 s of start-up
    # until the first count has measured it, and shorten the duration so every count fits (never below 2 s).
    startup = 12.0 if device.type == "cuda" else 8.0
    duration = max(2.0, min(args.duration, allowance / len(counts) - startup))
    # One CPU thread per process, as a sweep's trials get (train.num_threads).
    ns = bench_namespace(args, duration=duration, batch=[args.concurrent_batch], concurrent_family=GAUSSIAN,
                         threads=1)
    rows, skipped, last_cost = [], [], None
    for n in counts:
        if last_cost is not None and time.monotonic() + 1.2 * last_cost > deadline:
            skipped.append(n)
            continue
        t0 = time.monotonic()
        ns.concurrent = [n]
        row = bench_train.concurrent(ns, device, args.concurrent_options)[0]
        last_cost = time.monotonic() - t0
        row["wall_s"] = last_cost
        rows.append(row)
        print(f"  {n} process(es): {row['aggregate_images_per_s']:.0f} img/s in all ({last_cost:.0f} s)", flush=True)
    base = next((r["aggregate_images_per_s"] for r in rows if r["processes"] == 1), None)
    for row in rows:
        row["scaling"] = row["aggregate_images_per_s"] / base if base else float("nan")
    return {"family": GAUSSIAN, "batch": args.concurrent_batch, "options": args.concurrent_options,
            "duration_s": duration, "rows": rows, "skipped_counts": skipped}


def _tiled_celeba(args, root: Path) -> Path:
    """A prepared CelebA-size directory: the real sample images, preprocessed as ``prepare`` does, tiled."""
    import numpy as np

    from study.data.celeba import load_image, preprocess
    from study.data.store import write_prepared

    paths = sorted(SAMPLE_IMAGES.glob("*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no sample images in {SAMPLE_IMAGES}")
    images = np.stack([preprocess(load_image(p), args.size) for p in paths])  # uint8 (32, R, R, 3)
    train = images[np.arange(args.train_images) % len(images)]
    val = images[np.arange(args.val_images) % len(images)]
    out = root / "celeba_tiled"
    write_prepared(out, {"train": train, "val": val},
                   {"dataset": "celeba", "source": f"{len(paths)} sample images tiled", "color": "rgb"})
    return out


def _measured(result, family: str, batch: int) -> list[dict]:
    """Throughput rows of ``family`` at ``batch``, fastest first."""
    rows = [r for r in (result.get("throughput") or {}).get("rows", []) if r["family"] == family and r["batch"] == batch]
    return sorted(rows, key=lambda r: -r["images_per_s"])


def _fastest(result, family: str, batch: int) -> str | None:
    rows = _measured(result, family, batch)
    return rows[0]["options"] if rows else None


def _epoch_estimate(row: dict, args) -> float:
    """Seconds of one run_trial epoch at ``row``'s rate; with compile, plus the first epoch's compilations
    (train and eval mode, full and last partial batch: about 4 x the first step's compile time)."""
    epoch = 1.3 * (args.train_images + args.val_images) / row["images_per_s"]
    compiled = bench_train.parse_options(row["options"]).compile
    return (4 * row["first_step_s"] + 2 * epoch) if compiled else epoch


def _epoch_choice(result, family: str, args, allowance: float) -> tuple[str, str]:
    """(option set, why) for the epoch: the given one, or the fastest measured whose run fits ``allowance``."""
    if args.epoch_options != "auto":
        return args.epoch_options, "given"
    rows = _measured(result, family, args.epoch_batch)
    for row in rows:
        if _epoch_estimate(row, args) <= allowance:
            why = "fastest measured" if row is rows[0] else (
                f"fastest measured that fits the time left ({rows[0]['options']} would need "
                f"~{_epoch_estimate(rows[0], args):.0f} s)")
            return row["options"], why
    if not rows:
        return "bf16+cl", "default (no throughput rows measured at this batch)"
    return rows[0]["options"], "no measured option set fits the time left"


def section_epoch(args, device, result, deadline: float) -> dict:
    """One (or two, when compiling) CelebA-size epochs of ``run_trial`` per target family."""
    from study.config import TrialConfig
    from study.train import run_trial

    out = {"train_images": args.train_images, "val_images": args.val_images, "batch": args.epoch_batch,
           "families": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        t0 = time.monotonic()
        data_dir = _tiled_celeba(args, Path(tmp))
        out["data_build_s"] = time.monotonic() - t0
        threads = torch.get_num_threads()
        for family in TARGET_FAMILIES:
            entry: dict = {"epochs": []}
            out["families"][family] = entry
            left = (deadline - time.monotonic()) / (len(TARGET_FAMILIES) - list(TARGET_FAMILIES).index(family))
            text, why = _epoch_choice(result, family, args, left)
            options = options_of(text, args)
            epochs = args.epoch_epochs or (2 if options.compile else 1)
            entry["options"], entry["options_why"] = text, why
            if time.monotonic() > deadline or why.startswith("no measured"):
                entry["skipped"] = f"time budget ({why})"
                continue
            config = TrialConfig.model_validate({
                "data_dir": str(data_dir),
                "model": {"latent_dim": args.latent_dim, "width": args.width},
                "likelihood": bench_train.FAMILIES[family],
                "train": {"epochs": epochs, "batch_size": args.epoch_batch, "device": device.type,
                          "num_threads": args.threads, "grid_size": 16, "precision": options.precision,
                          "channels_last": options.channels_last, "compile": options.compile},
            })  # fmt: skip
            started = time.monotonic()

            def report(metrics, _checkpoint, entry=entry, started=started, epochs=epochs):
                entry["epochs"].append({k: metrics[k] for k in ("epoch", "epoch_seconds", "train_loss", "val_elbo")})
                print(f"  {family}: epoch {metrics['epoch']} {metrics['epoch_seconds']:.1f} s", flush=True)
                left = deadline - time.monotonic()
                if metrics["epoch"] < epochs and left < 1.2 * metrics["epoch_seconds"]:
                    raise _StopTrial

            torch._dynamo.reset()
            old_backend = study.speed.DEFAULT_COMPILE_BACKEND
            study.speed.DEFAULT_COMPILE_BACKEND = args.compile_backend  # run_trial compiles with the default
            try:
                run_trial(config, report, workdir=Path(tmp) / family.replace(" ", "_").replace("=", ""))
            except _StopTrial:
                entry["stopped"] = "next epoch would not fit the time budget"
            finally:
                study.speed.DEFAULT_COMPILE_BACKEND = old_backend
                torch.set_num_threads(threads)  # run_trial set train.num_threads for the whole process
            entry["run_trial_s"] = time.monotonic() - started
            ep = entry["epochs"]
            if ep:
                first, last = ep[0]["epoch_seconds"], ep[-1]["epoch_seconds"]
                entry["first_epoch_s"] = first
                entry["steady_epoch_s"] = last
                entry["steady_is_first"] = len(ep) == 1
                entry["train_images_per_epoch_s"] = args.train_images / last
                entry["projected_110_epochs_s"] = first + (PAPER_EPOCHS - 1) * last
                entry["load_and_setup_s"] = entry["run_trial_s"] - sum(e["epoch_seconds"] for e in ep)
    return out


# --------------------------------------------------------------------------------------------------- targets
def _row(result, options: str, family: str, batch: int) -> dict | None:
    for r in (result.get("throughput") or {}).get("rows", []):
        if (r["options"], r["family"], r["batch"]) == (options, family, batch):
            return r
    return None


def targets(result: dict, args) -> list[dict]:
    """Each speed target with its figure: met True / False, or None where its section did not measure it."""
    out = []
    scale = CELEBA_TRAIN / args.train_images  # tiny runs: their epoch is scaled to the real size for the verdict
    epoch = (result.get("epoch") or {}).get("families", {})
    gauss = epoch.get(GAUSSIAN, {})
    conc = (result.get("concurrent") or {}).get("rows", [])
    best_single = max((r["images_per_s"] for r in (result.get("throughput") or {}).get("rows", [])
                       if r["family"] == GAUSSIAN), default=None)
    best_aggregate = max((r["aggregate_images_per_s"] for r in conc), default=None)

    # 1. Gaussian CelebA epoch <= 5 s, or >= 33,000 img/s for one trial or in aggregate.
    figure, met = [], None
    if "steady_epoch_s" in gauss:
        s = gauss["steady_epoch_s"] * scale
        figure.append(f"run_trial epoch {s:.1f} s ({gauss['options']}, batch {(result.get('epoch') or {}).get('batch')})")
        met = s <= 5.0
    if best_single is not None:
        figure.append(f"best single-trial step rate {best_single:,.0f} img/s")
        met = bool(met) or best_single >= 33_000
    if best_aggregate is not None:
        figure.append(f"best aggregate {best_aggregate:,.0f} img/s")
        met = bool(met) or best_aggregate >= 33_000
    out.append({"target": "Gaussian CelebA epoch <= 5 s (>= 33,000 img/s, one trial or aggregate)",
                "figure": "; ".join(figure) or "not measured", "met": met})

    # 2. 110-epoch paper run <= 10 minutes.
    if "projected_110_epochs_s" in gauss:
        s = gauss["projected_110_epochs_s"] * scale
        extra = epoch.get(STRUCTURED, {}).get("projected_110_epochs_s")
        fig = f"Gaussian {s / 60:.1f} min" + (f"; structured n_f=5 {extra * scale / 60:.1f} min" if extra else "")
        out.append({"target": "110-epoch paper run <= 10 min", "figure": fig, "met": s <= 600.0})
    else:
        out.append({"target": "110-epoch paper run <= 10 min", "figure": "not measured", "met": None})

    # 3. Structured n_f=5 step <= 1.5x the Gaussian's (same options and batch; judged at the structured
    # family's fastest option set for each batch).
    figures, verdicts = [], []
    for batch in args.batch:
        best = _fastest(result, STRUCTURED, batch)
        s, g = (_row(result, best, STRUCTURED, batch), _row(result, best, GAUSSIAN, batch)) if best else (None, None)
        if s and g:
            ratio = s["step_ms"] / g["step_ms"]
            figures.append(f"batch {batch} {best}: {ratio:.2f}x")
            verdicts.append(ratio <= 1.5)
    ep_s, ep_g = epoch.get(STRUCTURED, {}).get("steady_epoch_s"), gauss.get("steady_epoch_s")
    if ep_s and ep_g:
        figures.append(f"run_trial epoch {ep_s / ep_g:.2f}x")
    out.append({"target": "structured n_f=5 step <= 1.5x the Gaussian's", "figure": "; ".join(figures) or "not measured",
                "met": all(verdicts) if verdicts else None})

    # 4. Four trials sharing the device >= 1.5x the aggregate of one.
    four = next((r for r in conc if r["processes"] == 4), None)
    if four:
        out.append({"target": "4 concurrent trials >= 1.5x the aggregate of 1",
                    "figure": f"{four['scaling']:.2f}x ({four['aggregate_images_per_s']:,.0f} img/s)",
                    "met": four["scaling"] >= 1.5})
    else:
        out.append({"target": "4 concurrent trials >= 1.5x the aggregate of 1", "figure": "not measured", "met": None})

    # 5. Sampler >= 10x faster than the dense solve.
    smp = result.get("sampler") or {}
    if "speedup_vs_dense_solve" in smp:
        out.append({"target": "banded sampler >= 10x faster than the dense triangular solve",
                    "figure": f"{smp['speedup_vs_dense_solve']:.1f}x vs the solve given L "
                              f"({smp['banded']:.2f} vs {smp['dense_solve']:.2f} ms); "
                              f"{smp['speedup_vs_dense_build_solve']:.1f}x vs build + solve",
                    "met": smp["speedup_vs_dense_solve"] >= 10.0})
    else:
        out.append({"target": "banded sampler >= 10x faster than the dense triangular solve", "figure": "not measured",
                    "met": None})

    # 6. The CUDA test cases pass.
    pt = result.get("pytest") or {}
    if pt:
        passed, failed = pt["counts"].get("passed", 0), pt["counts"].get("failed", 0) + pt["counts"].get("errors", 0) + pt["counts"].get("error", 0)
        out.append({"target": "CUDA test cases (tests/test_speed.py, structured CUDA test) pass",
                    "figure": pt["summary"] or f"rc {pt['rc']}",
                    "met": (pt["rc"] == 0 and failed == 0 and passed > 0) if args.device.startswith("cuda") else None})
    return out


# ---------------------------------------------------------------------------------------------------- output
def _fmt(v, spec=".1f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def write_outputs(result: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    result["targets"] = targets(result, args)
    clean = {k: v for k, v in result.items()}
    if "throughput" in clean:
        clean["throughput"] = {k: v for k, v in clean["throughput"].items() if not k.startswith("_")}
    (args.out / "gpu_check.json").write_text(json.dumps(clean, indent=2, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(result, args))
    prof = result.get("profile")
    if prof and "families" in prof:
        text = [f"# Profile of one training step ({prof['options']}, batch {prof['batch']}, {args.device})\n"]
        for family, p in prof["families"].items():
            text += [f"## {family}\n", f"wall {p['wall_ms']:.2f} ms, GPU kernels {p['gpu_kernel_ms']:.2f} ms, "
                     f"{p['kernel_launches']} launches costing {p['launch_cpu_ms']:.2f} ms of CPU\n",
                     "```", p["table"], "```\n"]
        (args.out / "profile.md").write_text("\n".join(text))


def markdown(result: dict, args) -> str:
    info = (result.get("machine") or {}).get("info", {})
    mm = (result.get("machine") or {}).get("matmul", {})
    on_gpu = args.device.startswith("cuda")
    lines = ["# GPU check" if on_gpu else "# GPU check: CPU dry run (not GPU figures)", ""]
    for key in ("gpu", "device", "cuda", "torch", "torchvision", "python", "cpu", "date", "git_commit"):
        if key in info:
            lines.append(f"- {key}: {info[key]}")
    lines += [f"- sizes: {args.size} x {args.size} x 3, latent {args.latent_dim}, width {args.width}, "
              f"compile backend {args.compile_backend}{' (tiny)' if args.tiny else ''}; budget {args.budget:.0f} s, "
              f"ran {result.get('wall_s', 0):.0f} s"]
    if mm:
        lines.append(f"- matmul {mm['n']}^3: fp32 {mm['float32'] / 1e12:.3f}, bf16 {mm['bfloat16'] / 1e12:.3f} "
                     f"TFLOP/s; '% peak' uses {mm['peak'] / 1e12:.3f}")
    lines += ["", "## Targets", "", "| target | figure | met |", "|---|---|---|"]
    for t in result.get("targets", []):
        verdict = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['figure']} | {verdict} |")
    if not on_gpu:
        lines += ["", "Verdicts of a CPU dry run say nothing about a GPU."]

    tp = result.get("throughput") or {}
    if tp.get("rows"):
        lines += ["", "## Training-step throughput", "",
                  "| options | family | batch | img/s | ms/step | vs gaussian | vs fp32 | GFLOP/step | TFLOP/s | % peak | first step s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in tp["rows"]:
            lines.append(f"| {r['options']} | {r['family']} | {r['batch']} | {r['images_per_s']:.0f} | {r['step_ms']:.2f} | "
                         f"{_fmt(r['vs_gaussian'], '.2f')} | {_fmt(r['vs_fp32'], '.2f')} | {r['gflop_per_step']:.2f} | "
                         f"{r['tflop_per_s']:.3f} | {_fmt(100 * r['share_of_peak'], '.2f')} | {r['first_step_s']:.1f} |")
    for key in ("skipped", "errors"):
        if tp.get(key):
            lines += ["", f"Throughput rows {key}: " + "; ".join(map(str, tp[key]))]

    conc = result.get("concurrent") or {}
    if conc.get("rows"):
        lines += ["", f"## Concurrent trials ({conc['family']}, batch {conc['batch']}, {conc['options']}, "
                  f"{conc['duration_s']:.0f} s each, plain processes)", "",
                  "| processes | aggregate img/s | per process img/s | scaling vs 1 |", "|---:|---:|---|---:|"]
        for r in conc["rows"]:
            per = ", ".join(f"{x:.0f}" for x in r["per_process_images_per_s"])
            lines.append(f"| {r['processes']} | {r['aggregate_images_per_s']:.0f} | {per} | {r['scaling']:.2f} |")
        if conc.get("skipped_counts"):
            lines.append(f"\nNot run (time budget): {conc['skipped_counts']} processes.")

    ep = result.get("epoch") or {}
    if ep.get("families"):
        lines += ["", f"## CelebA-size epoch through run_trial ({ep['train_images']:,} train + {ep['val_images']:,} val, "
                  f"batch {ep['batch']}; data built in {_fmt(ep.get('data_build_s'))} s)", "",
                  "| family | options | epochs | first epoch s | last epoch s | train img/s | projected 110 epochs | load + setup s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for family, e in ep["families"].items():
            if "first_epoch_s" not in e:
                lines.append(f"| {family} | {e.get('options')} | 0 | {e.get('skipped', e.get('error', 'n/a'))} | | | | |")
                continue
            lines.append(f"| {family} | {e['options']} | {len(e['epochs'])} | {e['first_epoch_s']:.1f} | "
                         f"{e['steady_epoch_s']:.1f} | {e['train_images_per_epoch_s']:.0f} | "
                         f"{e['projected_110_epochs_s'] / 60:.1f} min | {e['load_and_setup_s']:.1f} |")

    smp = result.get("sampler") or {}
    if "banded" in smp:
        lines += ["", f"## Structured sampler ({smp['setting']}; max |banded - dense| = {smp['max_abs_diff']:.1e})", "",
                  "| solver | ms | vs banded |", "|---|---:|---:|",
                  f"| banded row-wise back-substitution | {smp['banded']:.2f} | 1.00 |",
                  f"| dense triangular solve (L given) | {smp['dense_solve']:.2f} | {smp['speedup_vs_dense_solve']:.2f} |",
                  f"| dense: build L + solve | {smp['dense_build_solve']:.2f} | {smp['speedup_vs_dense_build_solve']:.2f} |"]

    prof = result.get("profile") or {}
    if prof.get("families"):
        lines += ["", f"## Profile of one step ({prof['options']}, batch {prof['batch']}; tables in profile.md)", "",
                  "| family | wall ms | GPU kernel ms | GPU busy | kernel launches | launch CPU ms |",
                  "|---|---:|---:|---:|---:|---:|"]
        for family, p in prof["families"].items():
            lines.append(f"| {family} | {p['wall_ms']:.2f} | {p['gpu_kernel_ms']:.2f} | {_fmt(100 * p['gpu_busy_share'], '.0f')}% | "
                         f"{p['kernel_launches']} | {p['launch_cpu_ms']:.2f} |")

    pt = result.get("pytest") or {}
    if pt:
        lines += ["", "## CUDA tests", "", f"`{pt['command']}`: rc {pt['rc']}, {pt['summary']} ({pt['seconds']:.0f} s; "
                  "full output in pytest.log)"]
        if pt.get("failed"):
            lines.append("failed: " + ", ".join(pt["failed"]))

    sections = result.get("sections", {})
    lines += ["", "## Sections", "", "| section | status | seconds |", "|---|---|---:|"]
    for name, s in sections.items():
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.1f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes throughout: let cuDNN pick its fastest algorithms
    start = time.monotonic()
    deadline = start + args.budget

    def on_alarm(signum, frame):
        raise BudgetExceeded(f"global budget {args.budget:.0f} s (+ margin) exceeded")

    margin = max(15.0, 0.05 * args.budget)  # the alarm's grace for a row or epoch started just in time
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(int(args.budget + margin))

    result: dict = {"kind": "gpu" if device.type == "cuda" else "cpu-dry-run", "args": {k: str(v) for k, v in vars(args).items()},
                    "sections": {}}
    first, rest = _throughput_plan(args)
    selected = [n for n in SECTIONS if n in args.sections]

    def allowance(name: str) -> float:
        """The time left, split among this and the later sections by their shares (what an earlier section
        did not use flows on); the last pass over the throughput rows gets whatever is left."""
        left = deadline - time.monotonic()
        if name not in SHARES:
            return left
        later = selected[selected.index(name):]
        return left * SHARES[name] / sum(SHARES[n] for n in later if n in SHARES)

    runners = {
        "machine": lambda a: section_machine(args, device, result),
        "throughput": lambda a: run_throughput_rows(args, device, result, first, time.monotonic() + a),
        "sampler": lambda a: section_sampler(args, device, result),
        "profile": lambda a: section_profile(args, device, result),
        "pytest": lambda a: section_pytest(args, device, result, timeout=a),
        "concurrent": lambda a: section_concurrent(args, device, result, a),
        "epoch": lambda a: section_epoch(args, device, result, time.monotonic() + a),
        "throughput_rest": lambda a: run_throughput_rows(args, device, result, _pending(result) + rest,
                                                         time.monotonic() + a),
    }
    for name in SECTIONS:
        if name not in args.sections:
            continue
        a = allowance(name) if name != "machine" else float("inf")
        if a < 1.0:
            result["sections"][name] = {"status": "skipped: time budget", "seconds": 0.0}
            print(f"== {name}: skipped (time budget)", flush=True)
            write_outputs(result, args)
            continue
        print(f"== {name} (allowance {a:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            value = runners[name](a)
            if name in ("throughput", "throughput_rest"):
                pass  # stored in result["throughput"] already
            else:
                result[name] = value
            status = "ok"
        except BudgetExceeded as err:
            status = f"stopped: {err}"
            print(f"   {status}", flush=True)
        except Exception as err:
            status = f"error: {type(err).__name__}: {err}"
            result.setdefault("tracebacks", {})[name] = traceback.format_exc()
            print(f"   {status}", flush=True)
        result["sections"][name] = {"status": status, "seconds": time.monotonic() - t0}
        result["wall_s"] = time.monotonic() - start
        write_outputs(result, args)
        if status.startswith("stopped"):
            break
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)
    result["wall_s"] = time.monotonic() - start
    write_outputs(result, args)
    print(f"\nwrote {args.out / 'gpu_check.json'} and gpu_check.md ({result['wall_s']:.0f} s)")
    for t in result["targets"]:
        print(f"- {t['target']}: {t['figure']} -> {t['met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
