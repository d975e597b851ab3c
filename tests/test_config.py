"""params.yaml validation: bad input fails at load time, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from study.config import ConfigError, TrialConfig, load_params, parse_params, resolve_trial_config

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.prepare.resolution == 64
    assert params.sweep.num_trials >= 4
    assert "train.beta" in params.sweep.search_space


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"train": {"betta": 1.0}}, "train.betta"),
        ({"nonsense": {}}, "nonsense"),
        ({"train": {"beta": -0.5}}, "train.beta"),
        ({"prepare": {"resolution": 48}}, "prepare.resolution"),
        ({"sweep": {"num_trials": 0}}, "sweep.num_trials"),
        ({"likelihood": {"gaussian": {"sigma_mode": "diagonal"}}}, "likelihood.gaussian.sigma_mode"),
        ({"sweep": {"search_space": {"train.beta": {"distribution": "loguniform", "low": 0, "high": 1}}}},
         "sweep.search_space.train.beta"),
    ],
)
def test_bad_params_name_the_field(raw, field):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert field in str(err.value)


def test_gpu_shares_follow_rays_rules():
    assert parse_params({"sweep": {"resources_per_trial": {"gpu": 0.25}}}).sweep.resources_per_trial.gpu == 0.25
    assert parse_params({"sweep": {"resources_per_trial": {"gpu": 2}}}).sweep.resources_per_trial.gpu == 2
    with pytest.raises(ConfigError, match="sweep.resources_per_trial.gpu.*whole number"):
        parse_params({"sweep": {"resources_per_trial": {"gpu": 1.5}}})
    # a CUDA trial that Ray would give no GPU fails at load, not after the sweep started
    with pytest.raises(ConfigError, match="resources_per_trial.gpu is 0"):
        parse_params({"train": {"device": "cuda"}})
    parse_params({"train": {"device": "cuda"}, "sweep": {"resources_per_trial": {"gpu": 0.5}}})


def test_search_space_key_must_exist():
    with pytest.raises(ConfigError, match="train.betaa"):
        parse_params({"sweep": {"search_space": {"train.betaa": {"distribution": "uniform", "low": 0, "high": 1}}}})


def test_load_params_rejects_bad_yaml_before_touching_data(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"beta": -1}, "prepare": {"root": str(tmp_path / "missing")}}))
    with pytest.raises(ConfigError, match="train.beta"):
        load_params(path)
    path.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "absent.yaml")


def test_resolve_trial_config_applies_and_validates_overrides():
    base = TrialConfig()
    cfg = resolve_trial_config(base, {"train.beta": 4.0, "likelihood.gaussian.sigma_mode": "per_pixel"})
    assert cfg.train.beta == 4.0 and cfg.likelihood.gaussian.sigma_mode == "per_pixel"
    assert base.train.beta == 1.0  # the base is not mutated
    assert cfg.digest() != base.digest()
    with pytest.raises(ConfigError, match="train.beta"):
        resolve_trial_config(base, {"train.beta": -1.0})
    with pytest.raises(ConfigError, match="no such field"):
        resolve_trial_config(base, {"train.nope": 1})
