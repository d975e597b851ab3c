"""run_trial on the real sample: metrics, checkpoints and grids per epoch, exact resume, NaN -> failure."""

from __future__ import annotations

import json
import math

import pytest
import torch

from study.train import NonFiniteLossError, load_checkpoint, run_trial
from tests.conftest import tiny_trial_config

EXPECTED = {
    "train_elbo", "train_kl", "train_log_likelihood", "train_loss", "train_mse_255",
    "val_elbo", "val_kl", "val_log_likelihood", "val_loss", "val_mse_255", "val_bits_per_dim",
    "epoch", "epoch_seconds", "beta", "val_sharpness_ratio", "val_variance_loss",
}  # a Gaussian trial: no variance_minimiser_alpha, which only the structured likelihood has


def test_reports_every_epoch_with_checkpoint(prepared_32, tmp_path):
    seen = []

    def report(metrics, checkpoint):
        files = sorted(p.name for p in checkpoint.iterdir())
        seen.append((metrics, files, json.loads((checkpoint / "metrics.json").read_text())))

    final = run_trial(tiny_trial_config(prepared_32, epochs=3), report, workdir=tmp_path)
    assert [m["epoch"] for m, _, _ in seen] == [1, 2, 3]
    for metrics, files, on_disk in seen:
        assert set(metrics) == EXPECTED
        assert all(math.isfinite(v) for v in metrics.values())
        assert files == ["config.yaml", "metrics.json", "reconstructions.png", "samples.png", "state.pt"]
        assert on_disk == metrics
        # ELBO = log-likelihood - KL, and bits/dim = -ELBO / (D ln 2) with D = 3 * 32 * 32.
        assert math.isclose(metrics["val_elbo"], metrics["val_log_likelihood"] - metrics["val_kl"], rel_tol=1e-5)
        assert math.isclose(metrics["val_bits_per_dim"], -metrics["val_elbo"] / (3072 * math.log(2)), rel_tol=1e-9)
        assert metrics["val_kl"] >= 0 and 0 <= metrics["val_mse_255"] <= 255**2
    assert final == seen[-1][0]


def test_training_improves_the_elbo(prepared_32, tmp_path):
    history = []
    run_trial(tiny_trial_config(prepared_32, epochs=8, lr=2e-3), lambda m, _: history.append(m), workdir=tmp_path)
    assert history[-1]["train_elbo"] > history[0]["train_elbo"]
    assert history[-1]["train_mse_255"] < history[0]["train_mse_255"]


def test_resume_continues_exactly(prepared_32, tmp_path):
    straight = run_trial(tiny_trial_config(prepared_32, epochs=3), workdir=tmp_path / "a")
    run_trial(tiny_trial_config(prepared_32, epochs=2), workdir=tmp_path / "b")
    resumed = run_trial(
        tiny_trial_config(prepared_32, epochs=3), workdir=tmp_path / "c", resume_from=tmp_path / "b" / "checkpoint"
    )
    assert resumed["epoch"] == 3
    # Bit-for-bit on one device (the module docstring's claim): every metric and every tensor of the final state.
    for key in EXPECTED - {"epoch_seconds"}:
        assert resumed[key] == straight[key], key
    a = torch.load(tmp_path / "a" / "checkpoint" / "state.pt", weights_only=False)
    c = torch.load(tmp_path / "c" / "checkpoint" / "state.pt", weights_only=False)
    assert_same_tensors(a, c)


def assert_same_tensors(a, b, where: str = "state") -> None:
    """Nested dicts / lists of a checkpoint are equal: tensors by torch.equal (bits, dtype and shape), the rest by ==."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_checkpoint_reloads_the_model(prepared_32, tmp_path):
    run_trial(tiny_trial_config(prepared_32, epochs=1), workdir=tmp_path)
    config, model, state = load_checkpoint(tmp_path / "checkpoint")
    assert state["epoch"] == 1 and config.model.latent_dim == 16
    assert model.decode(torch.zeros(1, 16)).shape == (1, 3, 32, 32)


def test_non_finite_loss_fails_the_trial(prepared_32, tmp_path, monkeypatch):
    from study.likelihoods.gaussian import GaussianLikelihood

    monkeypatch.setattr(GaussianLikelihood, "log_prob", lambda self, x, p: torch.full((x.shape[0],), float("nan")))
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        run_trial(tiny_trial_config(prepared_32, epochs=2), workdir=tmp_path)


def test_streamed_val_blur_metrics_equal_direct_computation(prepared_32, tmp_path):
    """evaluate_split's streamed variance loss and sharpness ratio equal the set-level formulas (numpy /
    study.metrics.pixel on all images at once), with batches that do not divide the split."""
    import numpy as np

    from study.data.loader import DeviceSplit
    from study.metrics.pixel import laplacian_variance
    from study.train import evaluate_split

    run_trial(tiny_trial_config(prepared_32, epochs=1), workdir=tmp_path)
    _, model, _ = load_checkpoint(tmp_path / "checkpoint")
    split = DeviceSplit(prepared_32, "train", torch.device("cpu"))
    metrics = evaluate_split(model, split, batch_size=5, seed=0, prefix="t")
    with torch.no_grad():
        x = split.take(torch.arange(len(split)))
        recon = model.likelihood.mean(model.decode(model.encode(x)[0])).clamp(0, 1)
    xs, rs = x.double().numpy(), recon.double().numpy()
    expected_vl = np.mean(np.var(xs, axis=0)) - np.mean(np.var(rs, axis=0))
    assert metrics["t_variance_loss"] == pytest.approx(expected_vl, rel=1e-6, abs=1e-9)
    ratio = laplacian_variance(recon).double().mean() / laplacian_variance(x).double().mean()
    assert metrics["t_sharpness_ratio"] == pytest.approx(float(ratio), rel=1e-5)
    unclamped = model.likelihood.mean(model.decode(model.encode(x)[0])).detach()
    assert metrics["t_mse_255"] == pytest.approx(float(((unclamped.double() - x.double()) ** 2).mean()) * 255**2, rel=1e-5)


def test_saved_grids_name_their_rows_without_touching_the_images(tmp_path):
    """``save_image(row_labels=...)``: the grid's own pixels sit unchanged right of a white margin, and each row
    band of the margin holds its label's dark text (the MLflow UI shows the PNG alone)."""
    import numpy as np
    from PIL import Image

    from study.train import _grid_pairs, save_image

    g = torch.Generator().manual_seed(0)
    inputs, recons = torch.rand(6, 3, 16, 16, generator=g), torch.rand(6, 3, 16, 16, generator=g)
    grid = _grid_pairs(inputs, recons, per_row=3)  # 4 rows: input, recon, input, recon
    save_image(grid, tmp_path / "plain.png")
    save_image(grid, tmp_path / "labelled.png", row_labels=("input", "recon"), tile_height=16)
    plain = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))
    labelled = np.asarray(Image.open(tmp_path / "labelled.png").convert("RGB"))
    margin = labelled.shape[1] - plain.shape[1]
    assert labelled.shape[0] == plain.shape[0] and margin > 0
    np.testing.assert_array_equal(labelled[:, margin:], plain)
    dark = labelled[:, :margin].min(axis=-1) < 128  # text pixels, (H, margin)
    for row in range(4):
        top = 2 + row * 18
        assert dark[top : top + 16].any(), f"row {row} has no label"
    # Alternating labels: rows 0 and 2 ("input") look alike, and unlike row 1 ("recon").
    band = [dark[2 + r * 18 : 2 + r * 18 + 16] for r in range(4)]
    assert (band[0] == band[2]).all() and (band[1] == band[3]).all() and not (band[0] == band[1]).all()
