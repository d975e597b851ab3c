"""Cost of the structured-residual likelihood (Dorta et al. 2018) relative to the factorised Gaussian.

Prints a Markdown table: for one training step (forward + backward) the time and peak memory of
``StructuredGaussianLikelihood`` at n_f = 3, 5, 7, with a learned basis and with dilations [1, 2], each as a
ratio to ``GaussianLikelihood(sigma_mode='per_pixel')`` measured in the same run; then the sampling time of the
banded back-substitution vs a dense triangular solve. Not a test.

Two step kinds: ``likelihood`` (log_prob + backward on a random ``params`` tensor that requires grad) and, with
``--model``, the full ``study.models.vae.VAE`` step (encoder, decoder, -log p + KL, backward).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the step (minus what was allocated before it); on
CPU each case runs in a fresh subprocess (glibc's mmap threshold fixed at 128 KiB so freed tensors leave the
RSS) and reports how far the first full-size step raises the process's ``ru_maxrss`` high-water mark above its
level after setup and a tiny (batch 1, 8 x 8) warm-up step, so the torch import, one-off lazy allocations and
the inputs are excluded. Times are the minimum over ``--repeats`` steps (noise on a shared machine only adds).

    uv run python benchmarks/likelihoods.py                       # 64 x 64, batch 64 (paper setting)
    uv run python benchmarks/likelihoods.py --batch 8 --size 32 --repeats 3 --model
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from machine_info import cpu_name  # benchmarks/ is on sys.path when a script there runs

from study.likelihoods.blur import BlurErrorLikelihood
from study.likelihoods.gaussian import GaussianLikelihood
from study.likelihoods.structured import StructuredGaussianLikelihood
from study.likelihoods.structured_sampling import dense_factor, solve_upper_banded, solve_upper_dense

# name -> constructor; the first is the baseline every ratio divides by.
CASES = {
    "gaussian per-pixel (baseline)": lambda: GaussianLikelihood(sigma_mode="per_pixel"),
    "structured n_f=3": lambda: StructuredGaussianLikelihood(3),
    "structured n_f=5": lambda: StructuredGaussianLikelihood(5),
    # the same likelihood through autograd of its composed operations (what the fused node replaces)
    "structured n_f=5 composed": lambda: StructuredGaussianLikelihood(5, fused=False),
    "structured n_f=7": lambda: StructuredGaussianLikelihood(7),
    "structured n_f=3, basis 4": lambda: StructuredGaussianLikelihood(3, num_basis=4),
    "structured n_f=7, basis 4": lambda: StructuredGaussianLikelihood(7, num_basis=4),
    "structured dilations [1, 2]": lambda: StructuredGaussianLikelihood(dilations=[1, 2]),
    # The blur likelihood estimates its kernel in closed form every step (Wiener least squares per image).
    "blur k=5, wiener_ls": lambda: BlurErrorLikelihood(5, noise_mode="learned_global", noise_sigma=0.1),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _maxrss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _make_step(case: str, kind: str, batch: int, size: int, channels: int, device: torch.device):
    """A closure running one forward + backward step of ``case`` on fresh random inputs."""
    g = torch.Generator(device=device).manual_seed(0)
    lik = CASES[case]().to(device)
    x = torch.rand(batch, channels, size, size, generator=g, device=device)
    if kind == "model":
        from study.models.vae import VAE

        model = VAE(lik, image_channels=channels, resolution=size, latent_dim=128, width=32).to(device)

        def step() -> None:
            out = model(x)
            kl = 0.5 * (out["mu"].square() + out["logvar"].exp() - 1.0 - out["logvar"]).sum(1)
            (kl - lik.log_prob(x, out["dist_params"])).mean().backward()
            model.zero_grad(set_to_none=True)

        return step
    params = torch.randn(batch, lik.param_channels(channels), size, size, generator=g, device=device)
    params.requires_grad_(True)

    def step() -> None:
        (-lik.log_prob(x, params)).mean().backward()
        params.grad = None
        lik.zero_grad(set_to_none=True)

    return step


def measure_step(case: str, kind: str, args: argparse.Namespace) -> dict[str, float]:
    """Time (min ms over ``repeats``) and peak extra memory (MiB) of one forward + backward step."""
    device = torch.device(args.device)
    step = _make_step(case, kind, args.batch, args.size, args.channels, device)
    # A tiny step of the same ops first, so one-off lazy allocations (thread pools, kernel scratch) are paid
    # before the high-water mark is read and only the real step's tensors raise it.
    _make_step(case, kind, 1, 8, args.channels, device)()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    else:
        before = _maxrss_mib()
        step()  # first full-size step: its high-water mark is not yet hidden by a warm-up at full size
        peak = _maxrss_mib() - before
    times = []
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    # Minimum, not median: on a shared machine the noise only ever adds time.
    return {"ms": 1e3 * min(times), "mib": peak}


def measure_sampling(args: argparse.Namespace) -> dict[str, float]:
    """Min ms of the banded solve, the dense solve alone, and dense build + solve (n_f = 3)."""
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(1)
    lik = StructuredGaussianLikelihood(3).to(device)
    shape = (args.sample_batch, args.channels, args.size, args.size)
    params = 0.3 * torch.randn(
        args.sample_batch, lik.param_channels(args.channels), *shape[2:], generator=g, device=device
    )
    with torch.no_grad():
        factor = lik.sparse_factor(params)
    u = torch.randn(shape, generator=g, device=device)

    def timed(fn) -> float:
        fn()  # warm-up
        out = []
        for _ in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
        return 1e3 * min(out)

    dense = dense_factor(factor)
    result = {
        "banded": timed(lambda: solve_upper_banded(factor, u)),
        "dense_solve": timed(lambda: solve_upper_dense(dense, u)),
        "dense_build_solve": timed(lambda: solve_upper_dense(dense_factor(factor), u)),
    }
    eps_b, eps_d = solve_upper_banded(factor, u), solve_upper_dense(dense, u)
    result["max_abs_diff"] = float((eps_b - eps_d).abs().max())
    return result


def _run_case(case: str, kind: str, args: argparse.Namespace) -> dict[str, float]:
    if args.device != "cpu":
        return measure_step(case, kind, args)
    # CPU peak memory via ru_maxrss needs a fresh process per case.
    cmd = [sys.executable, __file__, "--worker", case, "--kind", kind] + _forward_flags(args)
    # A fixed mmap threshold makes glibc return every large tensor's pages on free, so ru_maxrss follows the
    # live tensors instead of a heap that only grows (the default threshold adapts upwards after frees).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _forward_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--batch={args.batch}", f"--size={args.size}", f"--repeats={args.repeats}", f"--device={args.device}",
        f"--channels={args.channels}", f"--threads={args.threads}",
    ]  # fmt: skip


def _machine(device: str) -> str:
    cpu = cpu_name()
    text = f"CPU: {cpu} ({torch.get_num_threads()} torch threads); torch {torch.__version__}"
    if device.startswith("cuda"):
        text += f"; GPU: {torch.cuda.get_device_name(torch.device(device))}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="H = W")
    parser.add_argument("--channels", type=int, default=1, help="image channels (1: grey / Y, as in the paper)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--sample-batch", type=int, default=4, help="images per sampling call")
    parser.add_argument("--model", action="store_true", help="also time the full VAE step")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="likelihood", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure_step(args.worker, args.kind, args)))
        return

    kinds = ["likelihood"] + (["model"] if args.model else [])
    results = {kind: {case: _run_case(case, kind, args) for case in CASES} for kind in kinds}
    print(_machine(args.device))
    print()
    what = "log_prob + backward on random params (B, P, H, W) requiring grad"
    if args.model:
        what += "; and the full VAE step (VAE(..., latent_dim=128, width=32): encode, decode, -log p + KL, backward)"
    print(
        f"One training step, batch {args.batch}, {args.channels} x {args.size} x {args.size}, {args.device}, "
        f"min of {args.repeats}: {what}. Ratios are to the per-pixel Gaussian in the same run."
    )
    print()
    header = "| likelihood | P / channel |"
    rule = "|---|---:|"
    for kind in kinds:
        header += f" {kind} ms | time ratio | {kind} peak MiB | memory ratio |"
        rule += "---:|---:|---:|---:|"
    print(header)
    print(rule)
    for case in CASES:
        row = f"| {case} | {CASES[case]().param_channels(1)} |"
        for kind in kinds:
            r, base = results[kind][case], results[kind][next(iter(CASES))]
            mem_ratio = r["mib"] / base["mib"] if base["mib"] > 0 else float("nan")
            row += f" {r['ms']:.1f} | {r['ms'] / base['ms']:.2f} | {r['mib']:.1f} | {mem_ratio:.2f} |"
        print(row)

    s = measure_sampling(args)
    print()
    print(
        f"Sampling eps (n_f = 3), {args.sample_batch} x {args.channels} x {args.size} x {args.size}, "
        f"min of {args.repeats} (max |banded - dense| = {s['max_abs_diff']:.1e}):"
    )
    print()
    print("| solver | ms | ratio to banded |")
    print("|---|---:|---:|")
    for name, key in [
        ("banded row-wise back-substitution", "banded"),
        ("dense triangular solve (L given)", "dense_solve"),
        ("dense: build L + solve", "dense_build_solve"),
    ]:
        print(f"| {name} | {s[key]:.1f} | {s[key] / s['banded']:.2f} |")


if __name__ == "__main__":
    main()
