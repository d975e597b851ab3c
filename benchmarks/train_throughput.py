"""Throughput of the training step: images per second for every family and speed option, and its FLOP rate.

Prints Markdown tables (and, with ``--json PATH``, writes the same numbers as JSON). One row per device
(CPU, and CUDA when present), speed option set (``study.speed``: ``fp32``, ``bf16``, ``+cl`` channels-last,
``+compile``), family and batch size, for the real ``study.train.training_step`` (forward, likelihood and loss,
backward, Adam step, and the auxiliary step where the family has one) of the study's VAE (``--latent-dim``,
``--width``: params.yaml's 128 and 32) on a fixed synthetic batch already on the device:

- ``img/s``: best of ``--repeats`` timed blocks of ``--steps`` steps (noise on a shared machine only adds time),
  after ``--warmup`` untimed steps (which include ``torch.compile``'s compilation: ``first step s``);
- ``vs gaussian`` / ``vs fp32``: ratios to the per-pixel Gaussian, resp. the fp32 row, measured in the same run;
- ``GFLOP/step``: matrix FLOPs (convolutions and matrix products, forward and backward; one multiply-add = 2
  FLOPs) of one step, counted by ``torch.utils.flop_counter.FlopCounterMode`` on an eager fp32 copy; FFTs and
  element-wise work (most of the likelihoods) are not matrix FLOPs and are not counted;
- ``TFLOP/s`` = GFLOP/step x steps/s, and ``% peak``: its share of the device's matrix rate measured in the same
  run by a large ``torch.matmul`` (bf16 on CUDA: the tensor-core rate the bf16 option aims at; on a CPU the
  faster of fp32 and bf16 at the same thread count). A low share on a GPU says the step is bound by memory
  traffic and launches (small convolutions, element-wise likelihoods), not by arithmetic.

``--concurrent 1 2 4 8`` adds a section "concurrent trials": that many training processes of one family and
batch on one device, started together after their warm-ups, each running for ``--duration`` seconds; the
aggregate images/s is the sum of the processes' rates, each over its steps finished before the common
deadline. On a CPU every process has ``--threads`` threads (1 by default, as ``train.num_threads``); on a GPU
the processes share it as Ray's fractional GPUs do, each capped to 1/N of its memory
(``torch.cuda.set_per_process_memory_fraction``). Off by default: 8 processes on 2 cores are slow. Not a test.

    uv run python benchmarks/train_throughput.py                                  # 64 x 64, batch 64/128/256
    uv run python benchmarks/train_throughput.py --size 32 --batch 64 --repeats 3 --json out.json
    uv run python benchmarks/train_throughput.py --options fp32 bf16 bf16+cl bf16+cl+compile --concurrent 1 2 4 8
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine_info import cpu_name  # benchmarks/ is on sys.path when a script there runs
from torch.utils.flop_counter import FlopCounterMode

from study.config import LikelihoodConfig
from study.likelihoods import build_likelihood
from study.models.vae import VAE
from study.speed import SpeedOptions, prepare_model
from study.train import training_step

# name -> likelihood config; the first is the baseline of the "vs gaussian" ratios. Options not given are the
# study's defaults (study/config.py), e.g. the blur family's closed-form kernel and learned noise scale.
FAMILIES: dict[str, dict] = {
    "gaussian per-pixel": {"family": "gaussian", "gaussian": {"sigma_mode": "per_pixel"}},
    "structured n_f=3": {"family": "structured", "structured": {"neighbourhood_size": 3}},
    "structured n_f=5": {"family": "structured", "structured": {"neighbourhood_size": 5}},
    # the same likelihood through autograd of its composed operations instead of the fused node
    "structured n_f=5 composed": {"family": "structured", "structured": {"neighbourhood_size": 5}, "fused": False},
    "blur": {"family": "blur"},
    "laplace": {"family": "laplace"},
    "ffl": {"family": "ffl"},
    "ssim": {"family": "ssim"},
}
BASELINE = next(iter(FAMILIES))


def parse_options(text: str) -> SpeedOptions:
    """``fp32`` / ``bf16``, optionally followed by ``+cl`` (channels-last) and ``+compile``, e.g. ``bf16+cl``.

    Raises:
        ValueError: an unknown token.
    """
    tokens = text.split("+")
    unknown = [t for t in tokens[1:] if t not in ("cl", "compile")]
    if tokens[0] not in ("fp32", "bf16") or unknown:
        raise ValueError(f"options must look like fp32, bf16, bf16+cl, bf16+cl+compile; got {text!r}")
    return SpeedOptions(precision=tokens[0], channels_last="cl" in tokens, compile="compile" in tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trial:
    """One family's model, optimisers and fixed batch on a device, ready to run ``training_step``."""

    def __init__(self, family: str, batch: int, args: argparse.Namespace, device: torch.device,
                 options: SpeedOptions) -> None:
        torch.manual_seed(0)
        spec = dict(FAMILIES[family])
        fused = spec.pop("fused", True)
        likelihood = build_likelihood(LikelihoodConfig.model_validate(spec), latent_dim=args.latent_dim)
        if not fused:
            likelihood.fused = False  # StructuredGaussianLikelihood's composed path (study/likelihoods/structured_fused.py)
        self.model = VAE(likelihood, image_channels=3, resolution=args.size, latent_dim=args.latent_dim,
                         width=args.width).to(device)
        self.plain = copy.deepcopy(self.model)  # eager fp32 copy for the FLOP count
        self.options = options
        prepare_model(self.model, options)
        aux_ids = {id(p) for p in likelihood.auxiliary_parameters()}
        self.optimiser = torch.optim.Adam([p for p in self.model.parameters() if id(p) not in aux_ids], lr=1e-4)
        self.auxiliary = torch.optim.Adam(likelihood.auxiliary_parameters(), lr=1e-4) if aux_ids else None
        self.generator = torch.Generator(device).manual_seed(0)
        # Synthetic images in [0, 1] as the loader makes them (uint8 / 255), fixed for the whole measurement.
        self.x = torch.randint(0, 256, (batch, 3, args.size, args.size), generator=self.generator,
                               device=device, dtype=torch.uint8).float().div_(255.0)
        self.device = device

    def step(self) -> None:
        training_step(self.model, self.optimiser, self.x, self.generator, beta=1.0, auxiliary=self.auxiliary,
                      speed=self.options)

    def flops(self) -> int:
        """Matrix FLOPs of one plain fp32 step (forward + backward + the auxiliary step)."""
        optimiser = torch.optim.SGD(self.plain.parameters(), lr=0.0)  # lr 0: counting must not train the copy
        with FlopCounterMode(display=False) as counter:
            training_step(self.plain, optimiser, self.x, torch.Generator(self.device).manual_seed(0), beta=1.0)
        return int(counter.get_total_flops())


def measure(trial: Trial, args: argparse.Namespace) -> dict[str, float]:
    """Best and median images/s over ``repeats`` blocks of ``steps`` steps, after timed warm-up."""
    _sync(trial.device)
    t0 = time.perf_counter()
    trial.step()
    _sync(trial.device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        trial.step()
    rates = []
    for _ in range(args.repeats):
        _sync(trial.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trial.step()
        _sync(trial.device)
        rates.append(trial.x.shape[0] * args.steps / (time.perf_counter() - t0))
    return {"images_per_s": max(rates), "images_per_s_median": statistics.median(rates), "first_step_s": first}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Measured dense matrix rate, FLOP/s, of an n x n x n ``torch.matmul`` (best of ``repeats``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    calls = 20 if device.type == "cuda" else 1
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.matmul(a, b)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / calls)
    return 2.0 * n**3 / best


def machine(devices: list[torch.device]) -> dict[str, str]:
    """Date (UTC), CPU, thread count and versions, and the GPU and CUDA version when ``devices`` has CUDA."""
    cpu = cpu_name()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} logical cores, {torch.backends.cpu.get_cpu_capability()}",
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if any(d.type == "cuda" for d in devices):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = str(torch.version.cuda)
    return info


# ------------------------------------------------------------------------------------------ concurrent trials
def worker(args: argparse.Namespace) -> None:
    """One process of the concurrency section: warm up, say READY, wait for GO on stdin, run ``duration``."""
    device = torch.device(args.device[0])
    if device.type == "cuda" and args.processes > 1:
        torch.cuda.set_per_process_memory_fraction(1.0 / args.processes, device)
    trial = Trial(args.concurrent_family, args.batch[0], args, device, parse_options(args.options[0]))
    for _ in range(args.warmup):
        trial.step()
    _sync(device)
    print("READY", flush=True)
    sys.stdin.readline()
    # Count only blocks finished before the common deadline, over the time up to the last of them: all processes
    # are busy throughout that window, so one finishing early cannot give the others a faster tail.
    # Synchronise per block (every step on a CPU, where it costs nothing), so a GPU's queue stays full.
    block = args.steps if device.type == "cuda" else 1
    steps, t0 = 0, time.perf_counter()
    last = t0
    while True:
        for _ in range(block):
            trial.step()
        _sync(device)
        now = time.perf_counter()
        if now - t0 > args.duration:
            break
        steps, last = steps + block, now
    if steps == 0:
        raise RuntimeError(f"no step finished within --duration {args.duration} s; raise it")
    print(json.dumps({"images": steps * trial.x.shape[0], "seconds": last - t0}), flush=True)


def concurrent(args: argparse.Namespace, device: torch.device, options: str) -> list[dict[str, float]]:
    """Aggregate images/s of N simultaneous training processes on ``device``, for N in ``--concurrent``, each
    training ``--concurrent-family`` at the first ``--batch`` with the speed option set ``options``."""
    rows = []
    for n in args.concurrent:
        cmd = [
            sys.executable, __file__, "--worker", f"--device={device}", f"--batch={args.batch[0]}",
            f"--size={args.size}", f"--latent-dim={args.latent_dim}", f"--width={args.width}",
            f"--threads={args.threads}", f"--warmup={args.warmup}", f"--steps={args.steps}",
            f"--duration={args.duration}", f"--options={options}", f"--processes={n}",
            f"--concurrent-family={args.concurrent_family}",
        ]  # fmt: skip
        procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(n)]
        for p in procs:  # every process warmed up (and compiled) before any is timed
            line = p.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"worker failed before READY: {line!r}")
        for p in procs:
            p.stdin.write("GO\n")
            p.stdin.flush()
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        rates = [r["images"] / r["seconds"] for r in results]
        rows.append({"processes": n, "aggregate_images_per_s": sum(rates), "per_process_images_per_s": rates})
    base = rows[0]["aggregate_images_per_s"] if rows else 1.0
    for row in rows:
        row["scaling"] = row["aggregate_images_per_s"] / base
    return rows


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--size", type=int, default=64, help="H = W (32 or 64)")
    parser.add_argument("--latent-dim", type=int, default=128)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES), metavar="FAMILY")
    parser.add_argument("--options", nargs="+", default=None,
                        help="speed option sets, e.g. fp32 bf16 bf16+cl bf16+cl+compile "
                             "(default: fp32 bf16 on CPU, those four on CUDA)")
    parser.add_argument("--device", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (as train.num_threads)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation included)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the best is reported")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--concurrent", type=int, nargs="*", default=[], help="process counts, e.g. 1 2 4 8")
    parser.add_argument("--concurrent-family", default=BASELINE, choices=list(FAMILIES))
    parser.add_argument("--duration", type=float, default=20.0, help="seconds each concurrent process runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.worker:
        worker(args)
        return

    devices = [torch.device(d) for d in args.device]
    info = machine(devices)
    print("# Training-step throughput\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print(f"- model: VAE {args.size} x {args.size} x 3, latent {args.latent_dim}, width {args.width}; "
          f"{args.warmup} warm-up steps, best of {args.repeats} blocks of {args.steps} steps")
    result: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "matmul": {}, "rows": []}

    for device in devices:
        cuda = device.type == "cuda"
        n = 8192 if cuda else 1024
        rates = {str(dt).removeprefix("torch."): matmul_rate(device, dt, n) for dt in (torch.float32, torch.bfloat16)}
        peak = rates["bfloat16"] if cuda else max(rates.values())
        result["matmul"][str(device)] = {**rates, "peak": peak, "n": n}
        print(f"\n## {device}\n")
        print(f"Measured matmul ({n}^3): " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in rates.items())
              + f"; peak used for '% peak': {peak / 1e12:.3f} TFLOP/s\n")
        print("| options | family | batch | img/s | median | vs gaussian | vs fp32 | GFLOP/step | TFLOP/s "
              "| % peak | first step s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        option_sets = args.options or (["fp32", "bf16", "bf16+cl", "bf16+cl+compile"] if cuda else ["fp32", "bf16"])
        flops: dict[tuple[str, int], int] = {}
        rows: dict[tuple[str, str, int], dict] = {}
        for text in option_sets:
            options = parse_options(text)
            for batch in args.batch:
                for family in args.families:
                    torch._dynamo.reset()  # fresh compile caches: no recompile limit across models
                    trial = Trial(family, batch, args, device, options)
                    if (family, batch) not in flops:
                        flops[(family, batch)] = trial.flops()
                    row = {"device": str(device), "options": text, "family": family, "batch": batch,
                           **measure(trial, args), "gflop_per_step": flops[(family, batch)] / 1e9}
                    row["tflop_per_s"] = row["gflop_per_step"] / 1e3 * row["images_per_s"] / batch
                    row["share_of_peak"] = row["tflop_per_s"] * 1e12 / peak
                    rows[(text, family, batch)] = row
                    base = rows.get((text, BASELINE, batch))  # nan when the baseline was not measured
                    row["vs_gaussian"] = row["images_per_s"] / base["images_per_s"] if base else float("nan")
                    fp32 = rows.get(("fp32", family, batch))
                    row["vs_fp32"] = row["images_per_s"] / fp32["images_per_s"] if fp32 else float("nan")
                    result["rows"].append(row)
                    print(f"| {text} | {family} | {batch} | {row['images_per_s']:.1f} | "
                          f"{row['images_per_s_median']:.1f} | {row['vs_gaussian']:.2f} | {row['vs_fp32']:.2f} | "
                          f"{row['gflop_per_step']:.2f} | {row['tflop_per_s']:.4f} | "
                          f"{100 * row['share_of_peak']:.1f} | {row['first_step_s']:.2f} |", flush=True)
                    del trial

        if args.concurrent:
            print(f"\n### concurrent trials on {device}: {args.concurrent_family}, batch {args.batch[0]}, "
                  f"{option_sets[0]}, {args.threads} thread(s) per process, {args.duration:.0f} s each\n")
            print("| processes | aggregate img/s | per process img/s | scaling vs 1 |")
            print("|---:|---:|---|---:|")
            conc = concurrent(args, device, option_sets[0])
            for row in conc:
                per = ", ".join(f"{r:.1f}" for r in row["per_process_images_per_s"])
                print(f"| {row['processes']} | {row['aggregate_images_per_s']:.1f} | {per} | {row['scaling']:.2f} |")
            result.setdefault("concurrent", {})[str(device)] = conc

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
