"""YCbCr and grey trials end to end on the real sample: prepare stage -> run_trial -> evaluate_checkpoint.

Checked against independent references computed here in NumPy float64:
- the RGB kept beside the YCbCr arrays is byte-identical to the RGB the RGB pipeline prepares;
- bits per dimension divide by the dimensions modelled: H W + 2 (H / 4)(W / 4) for YCbCr with 4x chroma
  downsampling (Dorta et al. 2018, Eq. 8-12), H W for grey, both in training and in the evaluator;
- pixel metrics of YCbCr models compare with the RGB *before* the conversion to YCbCr (Dorta et al. measure MSE
  "using the RGB before the conversion to YCbCr"), with the YCbCr -> RGB map written here with JFIF's printed
  coefficients, and the chroma floor (stored YCbCr vs original RGB) is reported;
- the structured likelihood's sample decomposition (Dorta et al. Fig. 1 / 7) is drawn on the luma.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from study.data.store import load_split, read_manifest, sha256_file
from study.evaluate import evaluate_checkpoint
from study.train import load_checkpoint, run_trial
from tests.conftest import tiny_trial_config

RES = 32
YCBCR_DIMS = RES * RES + 2 * (RES // 4) * (RES // 4)  # 1,152: Y at 32 x 32 and Cb, Cr at 8 x 8


def jfif_ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """(..., 3) Y, Cb, Cr in [0, 1] -> RGB in [0, 1], JFIF 1.02's printed inverse (independent of study.data.color)."""
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 0.5, ycc[..., 2] - 0.5
    return np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)


def stored_ycbcr(data_dir: Path, split: str) -> np.ndarray:
    """The stored split as float64 (N, H, W, 3) Y, Cb, Cr in [0, 1], chroma repeated over its 4 x 4 blocks."""
    luma = load_split(data_dir, split).astype(np.float64) / 255.0  # (N, H, W, 1)
    chroma = load_split(data_dir, f"{split}_chroma").astype(np.float64) / 255.0  # (N, H / 4, W / 4, 2)
    chroma = chroma.repeat(4, axis=1).repeat(4, axis=2)  # (N, H, W, 2)
    return np.concatenate([luma, chroma], axis=-1)


@torch.no_grad()
def decoder_means(checkpoint: Path, data_dir: Path, split: str) -> np.ndarray:
    """E[x | z = mu(x)] of a checkpoint on a split, float64 (N, H, W, C) in model space, unclipped."""
    _, model, _ = load_checkpoint(checkpoint)
    if read_manifest(data_dir)["color"] == "ycbcr":
        x = stored_ycbcr(data_dir, split)
    else:
        x = load_split(data_dir, split).astype(np.float64) / 255.0
    xt = torch.from_numpy(x).float().permute(0, 3, 1, 2)
    recon = model.likelihood.mean(model.decode(model.encode(xt)[0]))
    return recon.permute(0, 2, 3, 1).double().numpy()


@pytest.fixture(scope="module")
def ycbcr_trial(prepared_ycbcr_32, tmp_path_factory) -> tuple[dict, Path]:
    """A 2-epoch structured (n_f = 3) trial on YCbCr data: its last metrics and its checkpoint directory."""
    work = tmp_path_factory.mktemp("ycbcr_trial")
    config = tiny_trial_config(prepared_ycbcr_32).model_copy(deep=True)
    config.likelihood.family = "structured"
    config.likelihood.structured.neighbourhood_size = 3
    metrics = run_trial(config, workdir=work)
    return metrics, work / "checkpoint"


def test_prepare_keeps_the_rgb_before_ycbcr(prepared_ycbcr_32, prepared_32):
    manifest = read_manifest(prepared_ycbcr_32)
    assert manifest["rgb_reference"] == {"val": "val_rgb", "test": "test_rgb"}
    assert "train_rgb" not in manifest["splits"]  # the train split needs no pixel reference
    for split in ("val", "test"):
        entry = manifest["splits"][f"{split}_rgb"]
        assert entry["sha256"] == sha256_file(prepared_ycbcr_32 / entry["file"])
        # Byte-identical to what the RGB pipeline prepares from the same photographs.
        np.testing.assert_array_equal(load_split(prepared_ycbcr_32, f"{split}_rgb"), load_split(prepared_32, split))


def test_ycbcr_trial_bits_per_dim_and_rgb_mse(ycbcr_trial, prepared_ycbcr_32):
    metrics, checkpoint = ycbcr_trial
    assert metrics["val_bits_per_dim"] == pytest.approx(-metrics["val_elbo"] / (YCBCR_DIMS * math.log(2)), rel=1e-12)
    # val_mse_255 against the original RGB, not RGB rebuilt from 8 x 8 chroma.
    recon_rgb = jfif_ycbcr_to_rgb(decoder_means(checkpoint, prepared_ycbcr_32, "val"))
    original = load_split(prepared_ycbcr_32, "val_rgb").astype(np.float64) / 255.0
    expected = np.mean((recon_rgb - original) ** 2) * 255.0**2
    assert metrics["val_mse_255"] == pytest.approx(expected, rel=1e-4)


def test_ycbcr_evaluation_uses_the_original_rgb_and_modelled_dims(ycbcr_trial, prepared_ycbcr_32, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))
    _, checkpoint = ycbcr_trial
    result = evaluate_checkpoint(checkpoint, prepared_ycbcr_32, "test", num_importance_samples=4, batch_size=4,
                                 device="cpu")
    original = load_split(prepared_ycbcr_32, "test_rgb").astype(np.float64) / 255.0  # (4, H, W, 3)
    recon_rgb = np.clip(jfif_ycbcr_to_rgb(decoder_means(checkpoint, prepared_ycbcr_32, "test")), 0.0, 1.0)
    per_image = ((recon_rgb - original) ** 2).mean(axis=(1, 2, 3)) * 255.0**2
    assert result.metrics["test_mse_255"] == pytest.approx(per_image.mean(), rel=1e-4)
    # The error of the stored YCbCr itself (4x chroma downsampling): about the least a YCbCr model can reach.
    floor = np.mean((np.clip(jfif_ycbcr_to_rgb(stored_ycbcr(prepared_ycbcr_32, "test")), 0, 1) - original) ** 2)
    assert result.metrics["test_chroma_floor_mse_255"] == pytest.approx(floor * 255.0**2, rel=1e-3)
    assert result.metrics["test_chroma_floor_mse_255"] > 1.0
    # Bits per dimension over H W + 2 (H / 4)(W / 4), as the training loop's val_bits_per_dim.
    assert result.settings["num_dims"] == YCBCR_DIMS
    assert result.metrics["test_nll_bits_per_dim"] == pytest.approx(
        result.metrics["test_nll"] / (YCBCR_DIMS * math.log(2)), rel=1e-9)
    assert "before the conversion" in result.settings["pixel_space"]


def test_structured_ycbcr_sample_decomposition_is_on_the_luma(ycbcr_trial):
    _, checkpoint = ycbcr_trial
    grid = np.asarray(Image.open(checkpoint / "sample_decomposition.png").convert("RGB")).astype(int)
    # Three rows (mu, 0.5 + eps, mu + eps) of one-channel images shown as grey: R = G = B everywhere.
    assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()
    assert grid.shape[0] == 3 * (RES + 2) + 2
    assert grid[..., 0].std() > 1.0  # not a blank canvas


def test_grey_trial_end_to_end(prepared_grey_32, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))
    config = tiny_trial_config(prepared_grey_32).model_copy(deep=True)
    config.likelihood.family = "structured"
    config.likelihood.structured.neighbourhood_size = 3
    metrics = run_trial(config, workdir=tmp_path)
    checkpoint = tmp_path / "checkpoint"
    dims = RES * RES  # one channel
    assert metrics["val_bits_per_dim"] == pytest.approx(-metrics["val_elbo"] / (dims * math.log(2)), rel=1e-12)
    luma = load_split(prepared_grey_32, "val").astype(np.float64) / 255.0  # (N, H, W, 1): pixel metrics in grey
    recon = decoder_means(checkpoint, prepared_grey_32, "val")
    assert recon.shape == luma.shape
    assert metrics["val_mse_255"] == pytest.approx(np.mean((recon - luma) ** 2) * 255.0**2, rel=1e-4)
    result = evaluate_checkpoint(checkpoint, prepared_grey_32, "test", num_importance_samples=4, batch_size=4,
                                 device="cpu")
    assert result.settings["color"] == "grey" and result.settings["num_dims"] == dims
    assert result.metrics["test_nll_bits_per_dim"] == pytest.approx(
        result.metrics["test_nll"] / (dims * math.log(2)), rel=1e-9)
    assert "test_chroma_floor_mse_255" not in result.metrics
    grid = np.asarray(Image.open(checkpoint / "sample_decomposition.png").convert("RGB")).astype(int)
    assert (grid[..., 0] == grid[..., 2]).all() and grid.shape[0] == 3 * (RES + 2) + 2
    json.loads((checkpoint / "metrics.json").read_text())  # the checkpoint's metrics are valid JSON


def test_table2_states_the_chroma_floor_for_ycbcr_arms():
    import pandas as pd

    from study.report_tables import dorta_table2

    rows = pd.DataFrame([
        {"family": "structured", "setting": "ycbcr", "run_id": "a", "elbo_valid": True, "test_mse_255": 700.0,
         "test_mse_255_std": 300.0, "test_chroma_floor_mse_255": 25.2},
        {"family": "gaussian", "setting": "rgb", "run_id": "b", "elbo_valid": True, "test_mse_255": 710.0,
         "test_mse_255_std": 310.0, "test_chroma_floor_mse_255": float("nan")},
    ])
    markdown, csv = dorta_table2(rows)
    assert "Chroma floor [0, 255]" in markdown and "25.20" in markdown and "before the conversion" in markdown
    assert "Chroma floor [0, 255]" in csv.splitlines()[0]
    markdown, _ = dorta_table2(rows.drop(columns="test_chroma_floor_mse_255"))
    assert "Chroma floor" not in markdown
