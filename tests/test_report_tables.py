"""Paper-style tables on a hand-built frame of evaluated trials."""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest

from study.report_tables import (
    TABLES,
    avae_table,
    dorta_table1,
    dorta_table2,
    format_mean_std,
    format_value,
    paper_tables,
)

NAN = math.nan


@pytest.fixture()
def trials() -> pd.DataFrame:
    """Three trials: two normalised likelihoods (Dorta's Table 1 / 2 values) and an SSIM loss (not a density)."""
    return pd.DataFrame(
        [
            {"family": "gaussian", "setting": "fixed", "run_id": "r1", "elbo_valid": True,
             "test_nll": -4016.2, "test_nll_std": 813.4, "test_nll_bits_per_dim": -1.4146,
             "test_avg_kl": 339.69, "test_mutual_information": 9.87, "test_marginal_kl": 329.82,
             "test_max_mutual_information": 9.902, "test_mse_255": 704.2, "test_mse_255_std": 324.1,
             "test_mse": 0.0108, "test_mse_std": 0.00498, "test_mse_pm1": 0.0433, "test_mse_pm1_std": 0.0199,
             "test_lpips": 0.18, "test_lpips_std": 0.05, "test_fid_recon": 60.04, "test_fid_samples": NAN,
             "test_psnr": 20.31, "test_psnr_std": 2.2, "test_ssim": 0.61, "test_ssim_std": 0.08,
             "test_sharpness_ratio": 0.21, "test_gradient_ratio": 0.55, "test_variance_loss_recon": 0.0101,
             "test_variance_loss_samples": 0.013, "test_variance_loss_mse_ratio": 0.935},
            {"family": "structured", "setting": "f3", "run_id": "r2", "elbo_valid": "True",  # as MLflow returns it
             "test_nll": -8308.0, "test_nll_std": 1455.0, "test_avg_kl": 269.76, "test_mse_255": 695.0,
             "test_mse_255_std": 309.0},
            {"family": "ssim", "setting": "w1000", "run_id": "r3", "elbo_valid": False,
             "test_nll": 123.0, "test_nll_std": 4.0, "test_mse_255": 960.4, "test_mse_255_std": 400.2},
        ]
    )


@pytest.mark.parametrize(
    ("mean", "std", "expected"),
    [
        (-4016.2, 813.4, "-4016 +- 813"),  # Dorta Table 1: integer digits are never rounded away
        (704.2, 324.1, "704 +- 324"),
        (0.03012, 0.01234, "0.030 +- 0.012"),
        (15.0123, 0.25, "15.01 +- 0.25"),
        (NAN, 1.0, "unavailable"),
        (3.14159, NAN, "3.142"),
    ],
)
def test_mean_std_format(mean, std, expected):
    assert format_mean_std(mean, std) == expected


def test_value_format():
    assert format_value(339.69) == "339.7"
    assert format_value(0.012345) == "0.01235"
    assert format_value(None) == "unavailable"
    assert format_value(2.5e-7) == "2.500e-07"


def test_table1_lists_only_normalised_densities(trials):
    markdown, csv = dorta_table1(trials)
    assert "-4016 +- 813" in markdown and "-8308 +- 1455" in markdown
    assert "339.7" in markdown and "9.870" in markdown
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table_lines) == 3  # header + the two elbo-valid rows
    assert not any("ssim" in line for line in table_lines)
    assert "elbo_valid = false" in markdown and "ssim/w1000 (r3)" in markdown  # named in the note instead
    frame = pd.read_csv(io.StringIO(csv))
    assert list(frame["run_id"]) == ["r1", "r2"]
    assert frame.loc[0, "NLL (nats) mean"] == -4016.2  # raw numbers, not the rounded text
    assert frame.loc[1, "MI"] == "unavailable"  # missing column for that row


def test_table2_mse_255(trials):
    markdown, csv = dorta_table2(trials)
    for text in ("704 +- 324", "695 +- 309", "960 +- 400"):
        assert text in markdown
    frame = pd.read_csv(io.StringIO(csv))
    assert frame["run_id"].tolist() == ["r1", "r3", "r2"]  # ordered by (family, setting, run_id)
    assert frame["MSE [0, 255] mean"].tolist() == [704.2, 960.4, 695.0]


def test_avae_table_shows_unavailable(trials):
    markdown, _ = avae_table(trials)
    row = next(line for line in markdown.splitlines() if "| gaussian |" in line)
    assert "0.0108 +- 0.0050" in row and "0.180 +- 0.050" in row and "60.04" in row
    assert row.rstrip(" |").endswith("unavailable")  # FID of samples: NaN -> unavailable
    assert "[0, 1]" in markdown and "[-1, 1]" in markdown  # the scales are named
    structured = next(line for line in markdown.splitlines() if "| structured |" in line)
    assert structured.count("unavailable") == 5  # MSE [0, 1], MSE [-1, 1], LPIPS and both FIDs are missing


def test_all_tables(trials):
    tables = paper_tables(trials)
    assert set(tables) == set(TABLES) == {"dorta_table1", "dorta_table2", "avae", "all_metrics"}
    markdown, csv = tables["all_metrics"]
    assert "20.3 +- 2.2" in markdown and "0.610 +- 0.080" in markdown
    assert "0.9350" in markdown
    assert len(pd.read_csv(io.StringIO(csv))) == 3
    # With the number of test images, every caption that gives a +- over images says over how many.
    counted = paper_tables(trials, num_images=4)
    for name, (md, _) in tables.items():
        spread = md.count("std over test images")
        assert counted[name][0].count("std over 4 test images") == spread
        assert "std over test images" not in counted[name][0]
    assert sum(md.count("std over test images") for md, _ in tables.values()) >= 4
    # An empty frame still gives well-formed (empty) tables.
    for md, text in paper_tables(pd.DataFrame(columns=["family", "setting", "run_id", "elbo_valid"])).values():
        assert md.count("\n|---") == 1 and text.splitlines()[0].startswith("family,setting,run_id")
