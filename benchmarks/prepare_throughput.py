"""Throughput of the ``prepare`` stage: CelebA-format JPEG files vs LSUN-format LMDB records.

Prints a Markdown table: images per second, in total and per worker process, for

- CelebA input: the 32 real sample JPEGs (178 x 218) in ``data/sample/celeba/img_align_celeba``, listed
  ``--copies`` times (224 images by default), through ``study.data.celeba.prepare_split`` (Larsen crop, Gaussian
  pre-blur, order-3 spline resize with scikit-image);
- LSUN input: an LMDB in the official format (40-hex keys, JPEG values with short side 256, quality 75) built in a
  temporary folder from the same 32 photographs, each stored ``--copies`` times under different keys, through
  ``study.data.lsun.prepare_records`` (decode, centre crop, Pillow antialiased bicubic resize);

at R x R (64 by default) with 1 and 2 workers, and the time that rate implies for the full data sets: CPU time
per core (N / per-worker rate) and wall time at that worker count. Times are the minimum over ``--repeats`` runs
(noise on a shared machine only adds). Not a test.

Caveat: the LSUN stand-in images are CelebA portraits scaled to 256 x 313; real church_outdoor images are
256 x (usually) 341 or more, so real LSUN decoding costs a little more per image.

    uv run python benchmarks/prepare_throughput.py
    uv run python benchmarks/prepare_throughput.py --resolution 32 --copies 3 --workers 1
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import tempfile
import time
from pathlib import Path

from machine_info import cpu_name  # benchmarks/ is on sys.path when a script there runs
from PIL import Image

from study.data.celeba import prepare_split
from study.data.lsun import encode_lsun_jpeg, list_keys, prepare_records, write_lsun_lmdb

REPO = Path(__file__).resolve().parents[1]
CELEBA = REPO / "data" / "sample" / "celeba" / "img_align_celeba"
FULL = {"celeba": 202_599, "lsun": 126_227 + 300}  # aligned CelebA; church_outdoor train + val LMDBs


def build_lsun(path: Path, files: list[Path], copies: int) -> int:
    values = []
    for file in files:
        with Image.open(file) as im:
            values.append((file.name, encode_lsun_jpeg(im)))
    items = (
        (hashlib.sha1(f"{name}#{c}".encode()).hexdigest().encode(), value)
        for c in range(copies)
        for name, value in values
    )
    return write_lsun_lmdb(path, items, map_size=1 << 28)


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--copies", type=int, default=7, help="times the 32 sample images are listed (7: 224)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    files = sorted(CELEBA.glob("*.jpg"))
    names = [f.name for f in files] * args.copies
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lmdb_path = Path(tmp) / "church_outdoor_train_lmdb"
        build_lsun(lmdb_path, files, args.copies)
        keys = list_keys(lmdb_path)
        cases = {
            "celeba": (len(names), lambda w: prepare_split(CELEBA, names, args.resolution, w, desc="celeba")),
            "lsun": (len(keys), lambda w: prepare_records(lmdb_path, keys, args.resolution, w, desc="lsun")),
        }
        for case, (count, run) in cases.items():
            run(1)  # warm-up: imports, page cache
            for workers in args.workers:
                seconds = best_of(args.repeats, lambda run=run, workers=workers: run(workers))
                rows.append((case, workers, count, seconds))

    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs); {datetime.date.today().isoformat()}")
    print()
    print(
        f"prepare at {args.resolution} x {args.resolution}, min of {args.repeats} runs. CelebA: "
        f"{len(files)} real aligned JPEGs x {args.copies} via study.data.celeba.prepare_split. LSUN: an "
        f"official-format LMDB of the same photographs (short side 256, q75) x {args.copies} via "
        "study.data.lsun.prepare_records. Full sets: CelebA 202,599; LSUN church_outdoor 126,227 + 300."
    )
    print()
    print("| input | workers | images | wall s | img/s | img/s per worker | full set, CPU time | full set, wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case, workers, count, seconds in rows:
        rate = count / seconds
        per_worker = rate / workers
        print(
            f"| {case} | {workers} | {count} | {seconds:.2f} | {rate:.0f} | {per_worker:.0f} | "
            f"{hours(FULL[case] / per_worker)} | {hours(FULL[case] / rate)} |"
        )


if __name__ == "__main__":
    main()
