"""The Gamma prior on the precision diagonal (Dorta et al. 2018, Eq. 13) as configured, and the comparison study's
search space: a prior must have its mode at a positive precision (concentration > 1) unless the user opts out,
and the Gaussian arm searches Dorta's per-pixel diagonal baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from scipy import stats

from study.config import ConfigError, GammaPriorConfig, load_params, parse_params, resolve_trial_config
from study.priors import gamma_log_prob

REPO = Path(__file__).resolve().parents[1]
COMPARE = REPO / "studies" / "compare" / "params.yaml"


def _with_prior(prior: dict) -> dict:
    return {"likelihood": {"family": "structured", "structured": {"gamma_prior": prior}}}


@pytest.mark.parametrize("concentration", [1.0, 0.5, 0.999])
def test_decreasing_prior_is_rejected_naming_the_key(concentration):
    with pytest.raises(ConfigError) as err:
        parse_params(_with_prior({"concentration": concentration, "rate": 1e-4}))
    message = str(err.value)
    assert "likelihood.structured.gamma_prior" in message
    assert "concentration" in message and "allow_decreasing" in message


def test_decreasing_prior_is_accepted_when_allowed():
    params = parse_params(_with_prior({"concentration": 1.0, "rate": 1e-4, "allow_decreasing": True}))
    prior = params.likelihood.structured.gamma_prior
    assert prior.concentration == 1.0 and prior.allow_decreasing and prior.mode is None


def test_default_prior_has_its_mode_at_a_large_precision():
    prior = GammaPriorConfig()
    assert prior.concentration > 1
    grid = np.linspace(1.0, 5000.0, 499_901)  # step 0.01
    argmax = grid[np.argmax(stats.gamma.logpdf(grid, a=prior.concentration, scale=1.0 / prior.rate))]
    assert prior.mode == pytest.approx(argmax, abs=0.01)
    assert prior.mode == pytest.approx(400.0)


@pytest.mark.parametrize("path", [COMPARE, None])
def test_prior_log_density_matches_scipy(path):
    """The configured prior (the comparison study's, and the default) through ``study.priors.gamma_log_prob``, the
    function training adds to the bound, against scipy's Gamma log-density on precisions around the mode; below
    the mode the density increases with the precision (it favours larger precisions there)."""
    prior = load_params(path).likelihood.structured.gamma_prior if path else GammaPriorConfig()
    assert prior is not None
    lam = np.random.default_rng(0).uniform(1.0, 3.0 * prior.mode, size=(3, 1, 5, 5))  # (B, 1, H, W) precisions
    ours = gamma_log_prob(torch.from_numpy(lam), prior.concentration, prior.rate).numpy()
    ref = stats.gamma.logpdf(lam, a=prior.concentration, scale=1.0 / prior.rate).reshape(3, -1).sum(1)
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    below = np.linspace(1.0, 0.99 * prior.mode, 50)
    assert np.all(np.diff(stats.gamma.logpdf(below, a=prior.concentration, scale=1.0 / prior.rate)) > 0)


def test_repository_params_files_load():
    for path in (REPO / "params.yaml", REPO / "studies" / "avae" / "params.yaml", COMPARE):
        load_params(path)


def _arm_samples(params, arm: str, n: int) -> list:
    """``n`` trial configs of one arm of the study, sampled by the study's own define-by-run space."""
    pytest.importorskip("ray")
    from study.sweep_space import DefineByRunSpace, _overrides, resolve_overrides

    base = resolve_trial_config(params.base_trial_config(), params.sweep.variants[arm].overrides)
    space = DefineByRunSpace(params.sweep.search_space, base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    configs = []
    for _ in range(n):
        trial = study.ask()
        constants = space(trial) or {}
        # as a trial sees them: searcher bookkeeping dropped, list-valued choices as constants; validated
        configs.append(resolve_overrides(base, _overrides({**trial.params, **constants})))
        study.tell(trial, 0.0)
    return configs


def test_compare_study_searches_the_per_pixel_gaussian():
    params = load_params(COMPARE)
    dim = params.sweep.search_space["likelihood.gaussian.sigma_mode"]
    assert "per_pixel" in dim.choices
    modes = {c.likelihood.gaussian.sigma_mode for c in _arm_samples(params, "gaussian", 20)}
    assert "per_pixel" in modes and len(modes) > 1
    # Only the Gaussian arm varies it: the other arms' chroma Gaussian keeps the base setting.
    structured = _arm_samples(params, "structured", 20)
    assert {c.likelihood.gaussian.sigma_mode for c in structured} == {params.likelihood.gaussian.sigma_mode}
    # Every sampled Gamma prior of the structured arm has a mode at a positive precision.
    assert all(c.likelihood.structured.gamma_prior.mode > 0 for c in structured)
