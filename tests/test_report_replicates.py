"""The report's seed-replicate numbers against scipy, on a synthetic evaluate-stage output (no Ray, no MLflow).

A ``summary.json`` with a ``replicates`` block and a ``per_image.npz`` are built from fixed random arrays (arms
with 4, 3, 1 and 0 finished replicates, one that is not a density); every interval and test in the tables and in
``metrics.json`` is recomputed here with ``scipy.stats.t``, ``ttest_rel`` and ``wilcoxon``.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from study.config import ConfigError, parse_params
from study.report import write_paper_report
from study.report_replicates import (
    choose_baseline,
    load_evaluation,
    paired_comparisons,
    paired_table,
    replicate_metrics,
)
from study.report_tables import SPREAD_LABEL, paper_tables

N_IMAGES = 12
D = 3 * 32 * 32
# arm -> (family, elbo_valid, finished seeds); order is the sweep's, so the first Gaussian arm is not the first arm
ARMS = {
    "structured": ("structured", True, [11, 12, 13, 14]),
    "gaussian": ("gaussian", True, [21, 22, 23]),
    "ssim": ("ssim", False, [31, 32, 33]),
    "laplace": ("laplace", True, []),
    "blur": ("blur", True, [51]),
}
SCALAR_METRICS = ("test_avg_kl", "test_mutual_information", "test_marginal_kl", "test_max_mutual_information",
                  "test_psnr", "test_psnr_std", "test_ssim", "test_ssim_std", "test_sharpness_ratio",
                  "test_gradient_ratio", "test_sample_sharpness_ratio", "test_variance_loss_recon",
                  "test_variance_loss_samples", "test_variance_loss_mse_ratio", "test_fid_recon", "test_fid_samples")
DENSITY = ("test_nll", "test_nll_std", "test_nll_bits_per_dim")


def _record(rng: np.random.Generator, arm: str, run_id: str, elbo_valid: bool, shift: float,
            per_image: dict[str, np.ndarray], image_nll: np.ndarray, image_mse: np.ndarray) -> dict:
    """One evaluated run: per-image NLL / MSE (image effect + arm shift + seed noise) and metrics that agree."""
    # small arm effects against the seed noise, so the p-values spread over (0, 1) instead of all sitting at 0
    mse = np.abs(image_mse * (1 + 0.004 * shift) + rng.normal(0, 5, N_IMAGES))
    per_image[f"{arm}/{run_id}/mse_255"] = mse
    metrics = {"test_mse_255": mse.mean(), "test_mse_255_std": mse.std(), "test_mse": mse.mean() / 255**2,
               "test_mse_std": mse.std() / 255**2, "test_mse_pm1": 4 * mse.mean() / 255**2,
               "test_mse_pm1_std": 4 * mse.std() / 255**2}
    metrics |= {name: float(rng.normal(10, 2)) for name in SCALAR_METRICS}
    unavailable = {"test_lpips": "no alexnet weights", "test_lpips_std": "no alexnet weights"}
    if elbo_valid:
        nll = image_nll + 4 * shift + rng.normal(0, 30, N_IMAGES)
        per_image[f"{arm}/{run_id}/nll"] = nll
        metrics |= {"test_nll": nll.mean(), "test_nll_std": nll.std(),
                    "test_nll_bits_per_dim": nll.mean() / (D * math.log(2))}
    else:
        unavailable |= {name: "not a normalised density" for name in DENSITY}
    return {"run_id": run_id, "metrics": {k: float(v) for k, v in metrics.items()}, "unavailable": unavailable}


def build_evaluation(root: Path, with_replicates: bool = True) -> Path:
    """An evaluate-stage output directory: summary.json, per_image.npz, examples.npz."""
    rng = np.random.default_rng(7)
    image_nll = rng.normal(-3000, 300, N_IMAGES)  # the (large) spread between images that pairing removes
    image_mse = rng.gamma(4.0, 100.0, N_IMAGES)
    per_image: dict[str, np.ndarray] = {}
    arms, replicates, skipped = {}, {}, {}
    for shift, (arm, (family, valid, seeds)) in enumerate(ARMS.items()):
        selected = _record(rng, arm, f"sel-{arm}", valid, shift, per_image, image_nll, image_mse)
        arms[arm] = {"run_id": selected["run_id"], "trial_id": f"t-{arm}", "family": family, "elbo_valid": valid,
                     "metrics": selected["metrics"], "unavailable": selected["unavailable"], "implementations": {}}
        replicates[arm] = []
        for seed in seeds:
            rec = _record(rng, arm, f"{arm}-s{seed}", valid, shift, per_image, image_nll, image_mse)
            replicates[arm].append({"seed": seed, "trial_id": f"r-{arm}-{seed}", "epochs": 3, "elbo_valid": valid,
                                    **rec})
        skipped[arm] = [] if seeds else [{"seed": 41, "run_id": "laplace-s41", "status": "FAILED",
                                          "error": "NonFiniteLossError: loss is nan"}]
    summary = {"split": "test", "num_images": N_IMAGES, "color": "rgb", "arms": arms, "settings": {}}
    if with_replicates:
        summary |= {"replicates": replicates, "replicates_skipped": skipped}
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    np.savez_compressed(root / "per_image.npz", **per_image)
    examples = {f"{arm}/{kind}": rng.uniform(0, 1, (2, 8, 8, 3)) for arm in ARMS
                for kind in ("input", "reconstruction", "sample")}
    np.savez_compressed(root / "examples.npz", **examples)
    return root


def trials() -> pd.DataFrame:
    return pd.DataFrame({"status": ["FINISHED"] * 3, "family": ["gaussian", "structured", "ssim"],
                         "val_mse_255": [700.0, 650.0, 900.0], "val_sharpness_ratio": [0.2, 0.3, 0.25],
                         "val_variance_loss": [0.01, 0.009, 0.012]})


def seed_values(evaluation: dict, arm: str, metric: str) -> np.ndarray:
    return np.array([r["metrics"][metric] for r in evaluation["replicates"][arm]])


def scipy_interval(values: np.ndarray) -> tuple[float, float]:
    """(mean, half-width) of scipy's two-sided 95% Student-t interval of the mean."""
    mean = float(np.mean(values))
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, (high - low) / 2


def seed_matrix(evaluation: dict, per_image: dict, arm: str, metric: str) -> np.ndarray:
    return np.stack([per_image[f"{arm}/{r['run_id']}/{metric}"] for r in evaluation["replicates"][arm]])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, dict, Path]:
    """The written report (tables and figures) of the synthetic evaluation, shared: figures take seconds."""
    tmp_path = tmp_path_factory.mktemp("replicate_report")
    evaluation_dir = build_evaluation(tmp_path / "evaluation")
    out = tmp_path / "report"
    write_paper_report(evaluation_dir, out, trials())
    evaluation, per_image = load_evaluation(evaluation_dir)
    return evaluation, per_image, out / "tables"


def test_table_cells_are_student_t_intervals_over_seeds(report):
    evaluation, _, tables = report
    cases = [("dorta_table1", "NLL (nats)", "test_nll"), ("dorta_table1", "Avg KL", "test_avg_kl"),
             ("dorta_table2", "MSE [0, 255]", "test_mse_255"), ("all_metrics", "PSNR (dB)", "test_psnr"),
             ("all_metrics", "VL / MSE", "test_variance_loss_mse_ratio")]
    for table, header, metric in cases:
        frame = pd.read_csv(tables / f"{table}.csv").set_index("setting")
        for arm in ("structured", "gaussian"):
            values = seed_values(evaluation, arm, metric)
            mean, half = scipy_interval(values)
            row = frame.loc[arm]
            assert float(row[f"{header} seeds mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(row[f"{header} seeds CI half-width"]) == pytest.approx(half, rel=1e-10)
            assert int(row[f"{header} seeds n"]) == len(values)
        # the selected trial's own numbers stay in the CSV, as without replicates
        assert float(frame.loc["gaussian", f"{header} mean" if header in ("NLL (nats)", "MSE [0, 255]", "PSNR (dB)")
                               else header]) == pytest.approx(evaluation["arms"]["gaussian"]["metrics"][metric])
    table1 = (tables / "dorta_table1.md").read_text()
    assert f"NLL (nats): {SPREAD_LABEL}" in table1 and "NLL (nats): mean +- 95% CI (n seeds)" in table1
    gaussian = next(line for line in table1.splitlines() if line.startswith("| gaussian"))
    mean, half = scipy_interval(seed_values(evaluation, "gaussian", "test_nll"))
    assert f"{mean:.{max(0, 1 - math.floor(math.log10(half)))}f} +- " in gaussian and "(3 seeds)" in gaussian
    assert "| ssim" not in table1  # not a density: no NLL row
    blur = next(line for line in table1.splitlines() if line.startswith("| blur"))
    assert "+- n/a (1 seed)" in blur  # one seed: no spread estimate, never a zero-width interval
    table1_csv = pd.read_csv(tables / "dorta_table1.csv").set_index("setting")
    assert float(table1_csv.loc["blur", "NLL (nats) seeds CI half-width"]) == math.inf
    laplace = next(line for line in table1.splitlines() if line.startswith("| laplace"))
    assert "unavailable (no finished replicate)" in laplace
    assert "unavailable" in next(line for line in (tables / "avae.md").read_text().splitlines()
                                 if line.startswith("| gaussian")).split("|")[8]  # LPIPS in no seed


def test_paired_comparisons_match_scipy(report):
    evaluation, per_image, tables = report
    frame = pd.read_csv(tables / "paired_comparisons.csv")
    assert set(zip(frame["metric"], frame["arm"], strict=True)) == {
        ("nll", "structured"), ("nll", "blur"), ("mse_255", "structured"), ("mse_255", "ssim"), ("mse_255", "blur")}
    assert set(frame["baseline"]) == {"gaussian"}  # the first Gaussian arm, not the first arm
    for _, row in frame.iterrows():
        a = seed_matrix(evaluation, per_image, row["arm"], row["metric"]).mean(axis=0)
        b = seed_matrix(evaluation, per_image, "gaussian", row["metric"]).mean(axis=0)
        t = stats.ttest_rel(a, b)
        low, high = t.confidence_interval(0.95)
        assert row["mean_difference"] == pytest.approx(np.mean(a - b), rel=1e-12)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), rel=1e-10)
        assert row["p_t"] == pytest.approx(t.pvalue, rel=1e-10)
        assert row["p_wilcoxon"] == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-10)
        assert row["images"] == N_IMAGES
        assert (row["arm_seeds"], row["baseline_seeds"]) == (len(evaluation["replicates"][row["arm"]]), 3)
    markdown = (tables / "paired_comparisons.md").read_text()
    assert "p, paired t-test (two-sided)" in markdown and "p, Wilcoxon signed-rank test (two-sided)" in markdown
    assert len(set(frame["p_wilcoxon"].round(6))) > 2  # the fixture's effects are small enough to tell tests apart
    assert "NLL (nats per image), ssim: ssim is not a normalised density (elbo_valid = false)" in markdown
    assert "laplace: no finished replicate of laplace" in markdown


def test_metrics_json_block_matches_scipy(tmp_path):
    evaluation, per_image = load_evaluation(build_evaluation(tmp_path / "evaluation"))
    block = replicate_metrics(evaluation, per_image)
    json.dumps(block, allow_nan=False)  # strict JSON: an infinite half-width is null
    assert block["baseline"] == "gaussian" and "Gaussian" in block["baseline_rule"]
    for arm in ("structured", "gaussian", "ssim"):
        for metric in ("test_mse_255", "test_psnr"):
            mean, half = scipy_interval(seed_values(evaluation, arm, metric))
            entry = block["arms"][arm]["metrics"][metric]
            assert (entry["mean"], entry["ci_half_width"]) == pytest.approx((mean, half), rel=1e-10)
            assert (entry["ci_low"], entry["ci_high"]) == pytest.approx((mean - half, mean + half), rel=1e-10)
    assert block["arms"]["blur"]["metrics"]["test_nll"]["ci_half_width"] is None
    assert block["arms"]["laplace"] == {"n_seeds": 0, "seeds": [], "run_ids": [], "failed": [41], "metrics": {}}
    a = seed_matrix(evaluation, per_image, "structured", "nll").mean(axis=0)
    b = seed_matrix(evaluation, per_image, "gaussian", "nll").mean(axis=0)
    assert block["paired"]["nll"]["structured"]["p_t"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-10)
    assert "elbo_valid" in block["not_compared"]["nll"]["ssim"]


def test_explicit_baseline_and_its_validation(tmp_path):
    evaluation, per_image = load_evaluation(build_evaluation(tmp_path / "evaluation"))
    default = {(r["metric"], r["arm"]): r for r in paired_comparisons(evaluation, per_image).rows}
    swapped = paired_comparisons(evaluation, per_image, baseline="structured")
    assert swapped.baseline == "structured" and "report.baseline" in swapped.baseline_rule
    for row in swapped.rows:
        if row["arm"] == "gaussian":  # the same comparison the other way round
            before = default[(row["metric"], "structured")]
            assert row["mean_difference"] == pytest.approx(-before["mean_difference"], rel=1e-12)
            assert row["p_t"] == pytest.approx(before["p_t"], rel=1e-10)
    # no Gaussian arm and no baseline named: nothing is compared, and the table says why
    no_gaussian = {**evaluation, "arms": {k: v for k, v in evaluation["arms"].items() if v["family"] != "gaussian"}}
    no_gaussian["replicates"] = {k: v for k, v in evaluation["replicates"].items() if k != "gaussian"}
    assert choose_baseline(no_gaussian, None)[0] is None
    markdown, _ = paired_table(paired_comparisons(no_gaussian, per_image))
    assert "No comparison could be made" in markdown and "set report.baseline" in markdown
    # the config accepts only one of the sweep's arms
    base = {"sweep": {"families": ["gaussian", "structured"]}}
    assert parse_params(base | {"report": {"baseline": "structured"}}).report.baseline == "structured"
    assert parse_params(base).report.baseline is None
    with pytest.raises(ConfigError, match=r"report.baseline 'lsun' is not one of the sweep's arms"):
        parse_params(base | {"report": {"baseline": "lsun"}})


def test_a_non_finite_replicate_is_shown_not_averaged_away(tmp_path):
    root = build_evaluation(tmp_path / "evaluation")
    evaluation, per_image = load_evaluation(root)
    bad = evaluation["replicates"]["structured"][1]
    bad["metrics"]["test_nll"] = float("nan")
    per_image[f"structured/{bad['run_id']}/nll"][5] = np.nan
    (root / "summary.json").write_text(json.dumps(evaluation))
    np.savez_compressed(root / "per_image.npz", **per_image)
    write_paper_report(root, tmp_path / "report", trials())
    table1 = (tmp_path / "report" / "tables" / "dorta_table1.md").read_text()
    structured = next(line for line in table1.splitlines() if line.startswith("| structured"))
    assert "unavailable (1 of 4 seeds not finite)" in structured
    paired = (tmp_path / "report" / "tables" / "paired_comparisons.md").read_text()
    assert "NLL (nats per image), structured: a: 1 of 48 values are NaN or infinite (first: seed 1, image 5" in paired
    assert "| MSE [0, 255] | structured |" in paired  # the other metric is still compared


def test_without_replicates_the_tables_are_single_trial(tmp_path):
    root = build_evaluation(tmp_path / "evaluation", with_replicates=False)
    written = write_paper_report(root, tmp_path / "report", trials())
    assert "paired_comparisons.md" not in written
    evaluation, per_image = load_evaluation(root)
    assert replicate_metrics(evaluation, per_image) is None
    rows = [{"family": r["family"], "setting": arm, "run_id": r["run_id"], "elbo_valid": r["elbo_valid"]}
            | r["metrics"] | {name: float("nan") for name in r["unavailable"]} for arm, r in evaluation["arms"].items()]
    for name, (markdown, csv) in paper_tables(pd.DataFrame(rows), num_images=evaluation["num_images"]).items():
        assert written[f"{name}.md"].read_text() == markdown and written[f"{name}.csv"].read_text() == csv
        assert "seeds" not in csv and SPREAD_LABEL not in markdown
    frame = pd.read_csv(io.StringIO(written["dorta_table2.csv"].read_text())).set_index("setting")
    assert frame.loc["gaussian", "MSE [0, 255] mean"] == pytest.approx(
        evaluation["arms"]["gaussian"]["metrics"]["test_mse_255"])
