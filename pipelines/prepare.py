"""DVC stage ``prepare``: raw CelebA -> ``data/prepared/celeba/{train,val,test}.npy`` + ``manifest.json``."""

from __future__ import annotations

import argparse
import sys
import time

from study.config import ConfigError, load_params
from study.data.celeba import prepare_celeba
from study.data.color import to_storage
from study.data.store import write_prepared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="study parameters (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = load_params(args.params).prepare
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        arrays = prepare_celeba(cfg.root, cfg.partition_file, cfg.resolution, cfg.workers)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    stored = {
        f"{split}{suffix}": array
        for split, rgb in arrays.items()
        for suffix, array in to_storage(rgb, cfg.color, cfg.chroma_factor).items()
    }
    manifest = write_prepared(
        cfg.output,
        stored,
        {
            "dataset": cfg.dataset,
            "color": cfg.color,
            "chroma_factor": cfg.chroma_factor if cfg.color == "ycbcr" else 1,
            "source": str(cfg.root),
            "partition_file": str(cfg.partition_file or cfg.root / "list_eval_partition.txt"),
            "params": cfg.model_dump(mode="json"),
            "preprocessing": "Larsen et al. 2016: img[40:188, 15:163], Gaussian sigma=sqrt(148/R)/2, bicubic",
        },
    )
    counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items() if k in arrays)
    print(f"prepared {cfg.dataset} ({cfg.color}) at {cfg.resolution}x{cfg.resolution} into {cfg.output}: {counts} "
          f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
