"""A structured-likelihood trial trained through ``run_trial`` with the Gamma prior on the precision diagonal
(Dorta et al. 2018, Eq. 13) and a stepped variance-minimiser alpha (Eq. 14): every optimiser step's loss is the
-ELBO plus exactly those terms, with the alpha of the step's epoch.

Each step is replayed from a snapshot of the model and the generator taken as the step starts, and its loss is
recomputed here from independent references: the KL with ``torch.distributions``, the Gamma log-density with
``scipy.stats.gamma`` in float64, and alpha * ||x - mu||^2 in NumPy. (log p(x | z) comes from the likelihood,
whose value is checked against a dense MultivariateNormal in tests/likelihoods/test_structured.py.)
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import Normal, kl_divergence

import study.train as train_module
from study.config import TrialConfig
from study.train import run_trial
from tests.conftest import tiny_trial_config

CONCENTRATION, RATE = 2.0, 0.01
ALPHA = {"kind": "step", "initial": 50.0, "switch_epoch": 1, "final": 2.0}


@pytest.fixture()
def recorded_steps(prepared_32, tmp_path, monkeypatch):
    """Run a 2-epoch structured trial and record, per optimiser step, its inputs, snapshot and returned loss."""
    raw = tiny_trial_config(prepared_32, epochs=2).model_dump()
    raw["likelihood"]["family"] = "structured"
    raw["likelihood"]["structured"] |= {"neighbourhood_size": 3, "variance_minimiser_alpha": ALPHA,
                                        "gamma_prior": {"concentration": CONCENTRATION, "rate": RATE}}
    config = TrialConfig.model_validate(raw)
    real_step = train_module.training_step
    steps = []

    def recording_step(model, optimiser, x, generator, **kwargs):
        snapshot = {"model": copy.deepcopy(model), "generator": generator.get_state(), "x": x.clone(), **kwargs}
        result = real_step(model, optimiser, x, generator, **kwargs)
        steps.append(snapshot | {"loss": float(result.loss.detach())})
        return result

    monkeypatch.setattr(train_module, "training_step", recording_step)
    epochs = []
    run_trial(config, report=lambda metrics, _: epochs.append(metrics), workdir=tmp_path)
    return steps, epochs


def test_each_step_adds_the_gamma_prior_and_the_scheduled_alpha(recorded_steps):
    steps, epochs = recorded_steps
    steps_per_epoch = 3  # 24 training images, batch 8
    assert len(steps) == 2 * steps_per_epoch
    assert [s["alpha"] for s in steps] == [50.0] * steps_per_epoch + [2.0] * steps_per_epoch
    assert [m["variance_minimiser_alpha"] for m in epochs] == [50.0, 2.0]
    for step in steps:
        assert (step["gamma"].concentration, step["gamma"].rate) == (CONCENTRATION, RATE)
        model, x = step["model"].train(), step["x"]
        generator = torch.Generator().set_state(step["generator"])
        with torch.no_grad():
            out = model(x, generator=generator)  # the step's own z draw, replayed
            likelihood = model.likelihood
            params = out["dist_params"]
            log_lik = likelihood.log_prob(x, params).double()  # (B,)
            q = Normal(out["mu"].double(), torch.exp(0.5 * out["logvar"].double()))
            kl = kl_divergence(q, Normal(torch.zeros_like(q.loc), torch.ones_like(q.scale))).sum(1)  # (B,)
            mean = likelihood.mean(params).double().numpy()
            lam = likelihood.precision_diagonal(params).double().numpy().reshape(x.shape[0], -1)  # (B, H W)
        squared_error = ((x.double().numpy() - mean) ** 2).reshape(x.shape[0], -1).sum(1)  # (B,)
        log_prior = stats.gamma.logpdf(lam, a=CONCENTRATION, scale=1.0 / RATE).sum(1)  # (B,)
        neg_elbo = (-(log_lik - step["beta"] * kl)).numpy()
        expected = np.mean(neg_elbo + step["alpha"] * squared_error - log_prior)
        assert step["loss"] == pytest.approx(expected, rel=2e-5)
        # Both terms are there (not a loss that merely equals the -ELBO).
        assert abs(np.mean(log_prior)) > 1.0 and step["alpha"] * np.mean(squared_error) > 1.0
