"""The define-by-run search space: distributions and conditional (``when``) dimensions, with real Optuna."""

from __future__ import annotations

import optuna
import pytest

from study.config import parse_params

pytest.importorskip("ray")


def _space(search_space, likelihood=None):
    from study.sweep_space import DefineByRunSpace

    params = parse_params({"sweep": {"search_space": search_space}, **({"likelihood": likelihood} if likelihood else {})})
    return DefineByRunSpace(params.sweep.search_space, params.base_trial_config())


def test_samples_stay_in_their_distributions():
    space = _space(
        {
            "train.beta": {"distribution": "loguniform", "low": 0.1, "high": 10},
            "train.lr": {"distribution": "uniform", "low": 1e-4, "high": 1e-3},
            "model.latent_dim": {"distribution": "int", "low": 8, "high": 64},
            "likelihood.gaussian.sigma_mode": {"distribution": "categorical", "choices": ["fixed", "per_pixel"]},
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        space(trial)
        p = trial.params
        assert 0.1 <= p["train.beta"] <= 10 and 1e-4 <= p["train.lr"] <= 1e-3
        assert isinstance(p["model.latent_dim"], int) and 8 <= p["model.latent_dim"] <= 64
        assert p["likelihood.gaussian.sigma_mode"] in ("fixed", "per_pixel")
        study.tell(trial, 0.0)
    # Each config distribution maps to the Optuna distribution of the same law, which every told trial records.
    expected = {
        "train.beta": optuna.distributions.FloatDistribution(0.1, 10, log=True),
        "train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-3, log=False),
        "model.latent_dim": optuna.distributions.IntDistribution(8, 64),
        "likelihood.gaussian.sigma_mode": optuna.distributions.CategoricalDistribution(["fixed", "per_pixel"]),
    }
    assert len(study.trials) == 30
    for frozen in study.trials:
        assert frozen.distributions == expected


def test_when_clause_reads_sampled_then_base_values():
    space = _space(
        {
            "likelihood.gaussian.sigma_mode": {"distribution": "categorical", "choices": ["fixed", "per_pixel"]},
            "likelihood.gaussian.sigma": {
                "distribution": "loguniform", "low": 0.01, "high": 0.5,
                "when": {"likelihood.gaussian.sigma_mode": ["fixed"]},
            },
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        space(trial)
        mode = trial.params["likelihood.gaussian.sigma_mode"]
        assert ("likelihood.gaussian.sigma" in trial.params) == (mode == "fixed")
        seen.add(mode)
        study.tell(trial, 0.0)
    assert seen == {"fixed", "per_pixel"}

    # A condition on a path that is not searched reads the base config.
    base_only = _space(
        {"train.beta": {"distribution": "uniform", "low": 0, "high": 1, "when": {"likelihood.family": ["gaussian"]}}}
    )
    trial = optuna.create_study().ask()
    base_only(trial)
    assert "train.beta" in trial.params


def test_list_valued_choices_are_returned_as_constants():
    space = _space(
        {
            "likelihood.family": {"distribution": "categorical", "choices": ["gaussian", "structured"]},
            "likelihood.structured.dilations": {
                "distribution": "categorical", "choices": [None, [1, 2]],
                "when": {"likelihood.family": ["structured"]},
            },
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    seen = []
    for _ in range(20):
        trial = study.ask()
        constants = space(trial) or {}
        if trial.params["likelihood.family"] == "structured":
            index = trial.params["likelihood.structured.dilations@index"]
            assert constants == {"likelihood.structured.dilations": [None, [1, 2]][index]}
            seen.append(index)
        else:
            assert constants == {} and "likelihood.structured.dilations@index" not in trial.params
        study.tell(trial, 0.0)
    assert set(seen) == {0, 1}
