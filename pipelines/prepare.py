"""DVC stage ``prepare@<dataset>``: raw images -> ``<prepare.output_root>/<dataset>/`` arrays + ``manifest.json``.

CelebA (``kind: celeba``) is cropped as Larsen et al. 2016; LSUN (``kind: lsun``) is centre-cropped and resized,
with LSUN's validation LMDB as the test split; a folder of images (``kind: folder``) is split by source image
and centre-cropped or cut into seeded patches (``study.data.folder``). The output directory is replaced
atomically: an interrupted run (Ctrl-C or SIGTERM) leaves the previous complete output, or nothing.

Source integrity of CelebA and LSUN (``study.data.integrity``): a checksum list, ``datasets.<name>.checksums`` or
else ``<root>/SHA256SUMS`` when present (the embedded sample ships one), is verified before decoding, and a JPEG
that libjpeg decodes only with a warning counts as corrupt. A corrupt image stops the stage (exit 1, the file
named, the previous output untouched) unless ``skip_corrupt``, which leaves it out and lists it in the manifest.
"""

from __future__ import annotations

import signal
import sys
import time

from pipelines.common import stage_arguments
from study.config import CelebADatasetConfig, FolderDatasetConfig


def _terminate(signum, frame) -> None:  # SIGTERM -> SystemExit, so the atomic writer removes its temporary
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    def configure(parser) -> None:
        parser.add_argument("--dataset", help="entry of `datasets` to prepare (default: all of them)")
        parser.add_argument("--skip-corrupt", action="store_true", default=None,
                            help="skip undecodable images / records and count them in the manifest (default: "
                                 "prepare.skip_corrupt, false: stop at the first one)")

    signal.signal(signal.SIGTERM, _terminate)
    args, params = stage_arguments(argv, __doc__, configure)
    names = [args.dataset] if args.dataset else list(params.datasets)
    unknown = [n for n in names if n not in params.datasets]
    if unknown:
        print(f"error: no dataset {unknown[0]!r} in params.yaml (datasets: {sorted(params.datasets)})", file=sys.stderr)
        return 2
    cfg = params.prepare
    skip = cfg.skip_corrupt if args.skip_corrupt is None else args.skip_corrupt

    from study.data.color import storage_arrays
    from study.data.store import write_prepared

    for name in names:
        dataset = params.datasets[name]
        started = time.perf_counter()
        try:
            if isinstance(dataset, CelebADatasetConfig):
                from study.data.celeba import prepare_celeba

                arrays, info = prepare_celeba(dataset.root, dataset.partition_file, cfg.resolution, cfg.workers, skip,
                                              checksums=dataset.checksums_file())
            elif isinstance(dataset, FolderDatasetConfig):
                from study.data.folder import prepare_folder

                patches = dataset.patches
                arrays, info = prepare_folder(
                    dataset.root, cfg.resolution, val_fraction=dataset.splits.val, test_fraction=dataset.splits.test,
                    seed=dataset.seed, patch_size=None if patches is None else patches.size,
                    patches_per_image=1 if patches is None else patches.per_image,
                    patch_seed=0 if patches is None else patches.seed, workers=cfg.workers, skip_corrupt=skip,
                )
            else:
                from study.data.lsun import prepare_lsun

                arrays, info = prepare_lsun(
                    dataset.root / f"{dataset.category}_train_lmdb", dataset.root / f"{dataset.category}_val_lmdb",
                    cfg.resolution, val_fraction=dataset.val_fraction, seed=dataset.seed, workers=cfg.workers,
                    skip_corrupt=skip, checksums=dataset.checksums_file(),
                )
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        stored = storage_arrays(arrays, cfg.color, cfg.chroma_factor)
        output = params.dataset_dir(name)
        manifest = write_prepared(
            output,
            stored,
            {
                **info,
                "name": name,
                "color": cfg.color,
                "chroma_factor": cfg.chroma_factor if cfg.color == "ycbcr" else 1,
                # The original RGB of these splits, for pixel metrics of YCbCr models (Dorta et al. 2018).
                "rgb_reference": {s: f"{s}_rgb" for s in arrays if f"{s}_rgb" in stored},
                "params": {"dataset": dataset.model_dump(mode="json"), "prepare": cfg.model_dump(mode="json")},
            },
        )
        counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items() if k in arrays)
        skipped = info.get("skipped_count", 0)
        skipped = sum(skipped.values()) if isinstance(skipped, dict) else skipped  # LSUN counts per split
        print(f"prepared {name} ({cfg.color}) at {cfg.resolution}x{cfg.resolution} into {output}: {counts}"
              f"{f', {skipped} corrupt skipped' if skipped else ''} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
