"""DVC stage ``photos`` of ``studies/reproduce``: real photographs reachable offline, written into one folder.

Two sources, both shipped with what the project installs, so the study needs no download:

- the photographs bundled inside scikit-image's wheel (:data:`SKIMAGE_PHOTOS`; ``skimage.data`` functions that
  load from the installed package, never the ones that fetch from the network), written as lossless PNG;
- the CelebA aligned images of the embedded sample (``data/sample/celeba/img_align_celeba``), copied byte for byte.

The folder is then cut into seeded patches by the ``folder`` dataset kind (``study.data.folder``), split by
source image so that no photograph gives patches to two splits. The output directory is replaced atomically and
carries ``sources.json`` (file, origin, size, sha256 of each written file).

Usage: ``python -m pipelines.photos --out data/reproduce/photos [--celeba data/sample/celeba/img_align_celeba]``.
Exit code 1 with one ``error:`` line when a source is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

# Natural photographs among skimage.data's bundled images (scikit-image 0.26): synthetic test patterns
# (checkerboard, colorwheel, logo, shepp_logan_phantom), binary masks (horse), images too small for a patch
# (microaneurysms, 102 x 102) and the second copy of one photograph (``cat`` is ``chelsea``) are left out.
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)


def write_photos(out_dir: Path, celeba_dir: Path | None) -> list[dict]:
    """Write the photographs into ``out_dir`` (which must exist and be empty); return one record per file.

    Raises:
        FileNotFoundError: ``celeba_dir`` is given but holds no ``*.jpg``.
        AttributeError / OSError: an entry of :data:`SKIMAGE_PHOTOS` is not bundled with the installed
            scikit-image (a different version); the message names it.
    """
    import numpy as np
    import skimage.data
    from PIL import Image

    records = []
    (out_dir / "skimage").mkdir()
    for name in SKIMAGE_PHOTOS:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception as err:  # a renamed or download-only image in another scikit-image version
            raise OSError(f"skimage.data.{name} did not load offline ({type(err).__name__}: {err}); this stage "
                          f"expects the images bundled with scikit-image 0.26") from err
        if image.dtype != np.uint8:
            raise OSError(f"skimage.data.{name} is {image.dtype}, expected uint8 photograph data")
        path = out_dir / "skimage" / f"{name}.png"
        Image.fromarray(image).save(path, format="PNG")
        records.append({"file": str(path.relative_to(out_dir)), "origin": f"skimage.data.{name}",
                        "size": list(image.shape[:2])})
    if celeba_dir is not None:
        jpegs = sorted(Path(celeba_dir).glob("*.jpg"))
        if not jpegs:
            raise FileNotFoundError(f"no *.jpg in {celeba_dir}: point --celeba at img_align_celeba/ of the sample")
        (out_dir / "celeba").mkdir()
        for jpeg in jpegs:
            target = out_dir / "celeba" / jpeg.name
            shutil.copyfile(jpeg, target)
            with Image.open(target) as im:
                size = [im.height, im.width]
            records.append({"file": str(target.relative_to(out_dir)), "origin": f"CelebA {jpeg.name}", "size": size})
    for record in records:
        record["sha256"] = hashlib.sha256((out_dir / record["file"]).read_bytes()).hexdigest()
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (replaced whole)")
    parser.add_argument("--celeba", type=Path, default=Path("data/sample/celeba/img_align_celeba"),
                        help="folder of CelebA JPEGs to add (default: the embedded sample)")
    args = parser.parse_args(argv)

    from study.atomic import atomic_directory

    try:
        with atomic_directory(args.out) as tmp:
            records = write_photos(tmp, args.celeba)
            (tmp / "sources.json").write_text(json.dumps(records, indent=2) + "\n")
    except (OSError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"photos: {len(records)} photographs ({len(SKIMAGE_PHOTOS)} from scikit-image, "
          f"{len(records) - len(SKIMAGE_PHOTOS)} CelebA) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
