"""``python -m pipelines.generate``: sample grids, Dorta-style residual rows and reconstructions of real CelebA
images from a tiny structured-likelihood VAE's MLflow run (by run id, and by its registered ``models:/`` URI).

References: the model rebuilt by ``study.train.load_checkpoint`` (means E[x | z] for the same seeded latents,
reconstructions E[x | z = mu(x)]) and the prepare stage's ``study.data.celeba.preprocess`` for the inputs, each
quantised as ``torchvision.utils.save_image`` does (round(255 x)).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import SAMPLE

NUM, TILE = 6, 32


def _tiles(path, rows: int, cols: int) -> np.ndarray:
    """The (rows * cols, TILE, TILE, 3) uint8 tiles of a torchvision grid with padding 1."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (rows * (TILE + 1) + 1, cols * (TILE + 1) + 1, 3)
    return np.stack([grid[1 + r * (TILE + 1): 1 + r * (TILE + 1) + TILE, 1 + c * (TILE + 1): 1 + c * (TILE + 1) + TILE]
                     for r in range(rows) for c in range(cols)])


def _quantised(x: torch.Tensor) -> np.ndarray:
    return x.clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)


@pytest.fixture(scope="module")
def structured_run(tmp_path_factory, structured_checkpoint):
    from mlflow.tracking import MlflowClient

    work = tmp_path_factory.mktemp("generate")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("gen", artifact_location=str(work / "mlartifacts")))
    for name in ("state.pt", "config.yaml"):
        client.log_artifact(run.info.run_id, str(structured_checkpoint / name), "checkpoint")
    client.set_terminated(run.info.run_id, "FINISHED")
    faces = work / "faces"
    faces.mkdir()
    for path in sorted((SAMPLE / "img_align_celeba").glob("*.jpg"))[:3]:
        shutil.copy(path, faces / path.name)
    return work, uri, client, run.info.run_id, faces


def test_generate_from_a_run_id(tmp_path, structured_run, structured_checkpoint):
    from pipelines.generate import main
    from study.data.celeba import preprocess
    from study.train import load_checkpoint

    work, uri, _, run_id, faces = structured_run
    out = tmp_path / "out"
    assert main(["--run", run_id, "--out", str(out), "--num", str(NUM), "--reconstruct", str(faces),
                 "--tracking-uri", uri]) == 0
    info = json.loads((out / "generate.json").read_text())
    assert info["files"] == ["samples.png", "residuals.png", "reconstructions.png", "reconstruction_residuals.png"]

    _, model, _ = load_checkpoint(structured_checkpoint, "cpu")
    z = torch.randn(NUM, model.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        means = model.likelihood.mean(model.decode(z))
    samples = _tiles(out / "samples.png", 2, 3)  # ceil(sqrt(6)) = 3 per row
    assert np.abs(samples.astype(int) - _quantised(means)).max() <= 1

    residuals = _tiles(out / "residuals.png", 3, NUM).astype(float)  # rows: mu, eps, mu + eps
    mu, shown_eps, total = residuals[:NUM], residuals[NUM:2 * NUM], residuals[2 * NUM:]
    assert np.abs(mu - _quantised(means)).max() <= 1
    for i in range(NUM):
        # eps is shown as an affine map of itself (0.5 + eps / 2 max|eps|); mu + eps minus mu is eps where
        # nothing was clipped, so the two must be strongly correlated, image by image.
        keep = (total[i] > 0) & (total[i] < 255)
        assert np.corrcoef((total[i] - mu[i])[keep], shown_eps[i][keep])[0, 1] > 0.9
        assert 120 <= np.median(shown_eps[i]) <= 136  # a zero-mean residual, centred on mid-grey

    pixels = [preprocess(np.asarray(Image.open(p).convert("RGB")), TILE) for p in sorted(faces.glob("*.jpg"))]
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    recon_tiles = _tiles(out / "reconstructions.png", 2, 3)  # inputs, then their reconstructions
    assert np.array_equal(recon_tiles[:3], np.stack(pixels))
    with torch.no_grad():
        reference = model.likelihood.mean(model.decode(model.encode(x)[0]))
    assert np.abs(recon_tiles[3:].astype(int) - _quantised(reference)).max() <= 1
    assert _tiles(out / "reconstruction_residuals.png", 4, 3).shape[0] == 12  # input, mu, eps, mu + eps


def test_generate_from_the_registered_model(tmp_path, structured_run, structured_checkpoint):
    from pipelines.generate import main
    from study.model_registry import register_run
    from study.train import load_checkpoint

    work, uri, client, run_id, _ = structured_run
    _, model, _ = load_checkpoint(structured_checkpoint, "cpu")
    example = torch.rand(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    record = register_run(client, uri, "gen-structured", run_id, "champion", example)
    by_run, by_uri = tmp_path / "run", tmp_path / "uri"
    assert main(["--run", run_id, "--out", str(by_run), "--num", "4", "--tracking-uri", uri]) == 0
    assert main(["--run", record["uri"], "--out", str(by_uri), "--num", "4", "--tracking-uri", uri]) == 0
    for name in ("samples.png", "residuals.png"):  # same weights, same seed: the same pixels
        assert np.array_equal(np.asarray(Image.open(by_run / name)), np.asarray(Image.open(by_uri / name)))


def test_unknown_run_is_an_error(tmp_path, structured_run, capsys):
    from pipelines.generate import main

    _, uri, _, _, _ = structured_run
    assert main(["--run", "0" * 32, "--out", str(tmp_path / "x"), "--tracking-uri", uri]) == 1
    assert "cannot load" in capsys.readouterr().err
