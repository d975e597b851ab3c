"""Use a trained model: sample grids and reconstructions as PNG files.

    uv run python -m pipelines.generate --run <run id | models:/<name>@champion | runs:/<id>/model> --out DIR
                                        [--num 64] [--reconstruct FOLDER] [--seed 0]

``--run``: an MLflow run id of a trial (its ``checkpoint/`` artifact), or an MLflow model URI (a model the
evaluate stage registered, loaded with ``mlflow.pytorch.load_model``). The tracking store is
``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``tracking.uri`` of ``--params`` (default params.yaml).

Writes in ``DIR``:

- ``samples.png``: ``--num`` samples E[x | z], z ~ N(0, I) (an AVAE: G([z, xi])), in a square-ish grid.
- ``residuals.png`` (structured likelihood only): for the first min(num, 8) of those latents, three rows as in
  Dorta et al. 2018, Figs. 1 and 7: the mean mu, a correlated residual eps ~ N(0, Lambda(z)^{-1}) and the sample
  mu + eps (clipped to [0, 1]). eps is shown as 0.5 + eps / (2 max |eps|) per image, so 0 is mid-grey.
- with ``--reconstruct FOLDER`` (every .jpg / .jpeg / .png under it, sorted, at most ``--num``): aligned CelebA
  images (218 x 178) get the prepare stage's face crop and resize, others a centre square crop and a bicubic
  resize to the model's resolution. ``reconstructions.png``: rows of inputs and their reconstructions (eight per
  row pair); with a structured likelihood also ``reconstruction_residuals.png``: input, mu, eps, mu + eps at
  z = mu(x).
- ``generate.json``: what was written, the model's source, seed, shapes.

Exit status: 0 done; 1 the run or model cannot be loaded, or the folder holds no image; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _tracking_uri(args: argparse.Namespace) -> str | None:
    if args.tracking_uri:
        return args.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if Path(args.params).is_file():
        from study.config import load_params
        from study.tracking import tracking_uri

        return tracking_uri(load_params(args.params).tracking)
    return None


def load_model(source: str, tracking_uri: str | None):
    """A :class:`study.model_registry.ServableModel` from a run id (its ``checkpoint/``, else its logged
    ``model``) or an MLflow model URI (``models:/...``, ``runs:/...``), on the CPU."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from study.model_registry import ARTIFACT_NAME, fluent_store, servable_from_checkpoint

    store = tracking_uri or mlflow.get_tracking_uri()
    with fluent_store(store):  # no process-wide URI outlives the call
        if ":/" in source:
            return mlflow.pytorch.load_model(source, map_location="cpu")
        client = MlflowClient(tracking_uri=store, registry_uri=store)
        client.get_run(source)  # an unknown run id fails here, naming it
        names = {f.path for f in client.list_artifacts(source)}
        if "checkpoint" in names:
            with tempfile.TemporaryDirectory() as tmp:
                return servable_from_checkpoint(client.download_artifacts(source, "checkpoint", tmp), "cpu")
        return mlflow.pytorch.load_model(f"runs:/{source}/{ARTIFACT_NAME}", map_location="cpu")


def load_folder(folder: Path, resolution: int, color: str, limit: int):
    """Images under ``folder`` as float32 (N, C, R, R) in [0, 1] in colour space ``color``, and their paths.

    Raises:
        ValueError: no image file under ``folder``.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from study.data.celeba import ALIGNED_SHAPE, preprocess
    from study.data.color import rgb_to_ycbcr
    from study.data.folder import resize_square

    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise ValueError(f"no .jpg / .jpeg / .png image under {folder}")
    images = []
    for path in paths:
        with Image.open(path) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        if rgb.shape[:2] == ALIGNED_SHAPE:
            small = preprocess(rgb, resolution)  # the prepare stage's CelebA crop and resize
        else:
            side = min(rgb.shape[:2])
            top, left = (rgb.shape[0] - side) // 2, (rgb.shape[1] - side) // 2
            small = resize_square(rgb[top : top + side, left : left + side], resolution)
        images.append(small)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, R, R)
    if color == "ycbcr":
        x = rgb_to_ycbcr(x)
    elif color == "grey":
        x = rgb_to_ycbcr(x)[:, :1]
    return x, paths


def _show_residual(eps, color: str):
    """eps (B, C, H, W) as RGB 0.5 + eps / (2 max |eps|) per image, in [0, 1]; of YCbCr or grey data, the Y
    residual in grey."""
    eps = eps if color == "rgb" else eps[:, :1]
    scale = eps.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (0.5 + eps / (2 * scale)).expand(-1, 3, -1, -1)


def _pairs_of_rows(top, bottom, per_row: int = 8):
    """Rows of ``per_row`` images of ``top`` each followed by the matching row of ``bottom`` (zero-padded)."""
    import torch

    if top.shape[0] <= per_row:
        return torch.cat([top, bottom]), top.shape[0]
    pad = -top.shape[0] % per_row
    top, bottom = (torch.cat([t, torch.zeros(pad, *t.shape[1:])]) for t in (top, bottom))
    rows = [r for start in range(0, top.shape[0], per_row)
            for r in (top[start : start + per_row], bottom[start : start + per_row])]
    return torch.cat(rows), per_row


def generate(model, out: Path, num: int = 64, seed: int = 0, reconstruct: Path | None = None) -> dict:
    """Write the PNG files the module docstring lists for ``model`` into ``out``; returns ``generate.json``'s
    content (file names, shapes, seed)."""
    import torch
    from torchvision.utils import save_image

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    written: dict[str, object] = {"seed": seed, "num": num, "image_shape": list(model.image_shape),
                                  "color": model.color, "family": model.family, "files": []}
    rgb = model.to_rgb
    if model.is_vae:
        z = torch.randn(num, model.model.latent_dim, generator=generator)
        samples = model.model.likelihood.mean(model.model.decode(z)) if num else z
    else:
        z, samples = None, model.sample(num, generator=generator)
    save_image(rgb(samples), out / "samples.png", nrow=math.ceil(math.sqrt(num)), padding=1)
    written["files"].append("samples.png")
    if model.has_residual:
        mu, eps, x = model.residual_samples(z[: min(num, 8)], generator=generator)
        grid = torch.cat([rgb(mu), _show_residual(eps, model.color), rgb(x)])
        save_image(grid, out / "residuals.png", nrow=mu.shape[0], padding=1)
        written["files"].append("residuals.png")
    if reconstruct is not None:
        x_in, paths = load_folder(reconstruct, model.image_shape[1], model.color, num)
        recon = model.reconstruct(x_in, generator=generator)
        grid, per_row = _pairs_of_rows(rgb(x_in), rgb(recon))
        save_image(grid, out / "reconstructions.png", nrow=per_row, padding=1)
        written["files"].append("reconstructions.png")
        written["inputs"] = [str(p) for p in paths]
        if model.has_residual:
            mu, eps, sample = model.residual_samples(model.encode_mean(x_in[:8]), generator=generator)
            grid = torch.cat([rgb(x_in[:8]), rgb(mu), _show_residual(eps, model.color), rgb(sample)])
            save_image(grid, out / "reconstruction_residuals.png", nrow=mu.shape[0], padding=1)
            written["files"].append("reconstruction_residuals.png")
    (out / "generate.json").write_text(json.dumps(written, indent=2) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="an MLflow run id, or a model URI (models:/<name>@champion)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the PNG files")
    parser.add_argument("--num", type=int, default=64, help="samples (and at most this many reconstructions)")
    parser.add_argument("--reconstruct", type=Path, default=None, help="a folder of images to reconstruct")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents and residual draws")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                                              "else tracking.uri of --params)")
    parser.add_argument("--params", default="params.yaml", help="study parameters, for tracking.uri")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be at least 1")
    if args.reconstruct is not None and not args.reconstruct.is_dir():
        parser.error(f"--reconstruct {args.reconstruct} is not a folder")

    from mlflow.exceptions import MlflowException

    try:
        model = load_model(args.run, _tracking_uri(args))
    except (MlflowException, OSError) as err:
        print(f"error: cannot load {args.run}: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    try:
        written = generate(model, args.out, num=args.num, seed=args.seed, reconstruct=args.reconstruct)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(written['files'])} to {args.out}/ ({model.family} likelihood, "
          f"{'x'.join(map(str, model.image_shape))} {model.color})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
