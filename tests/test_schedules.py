"""Weight schedules (study.schedules) and the variance-minimiser term (study.objectives), Dorta et al. 2018 Eq. 14."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from study.schedules import (
    ConstantSchedule,
    ExponentialDecaySchedule,
    LinearWarmupSchedule,
    Schedule,
    ScheduleConfig,
    StepSchedule,
    StepScheduleConfig,
    build_schedule,
    paper_variance_minimiser_schedule,
)
from study.objectives import variance_minimiser_loss


def test_paper_default_step() -> None:
    sched = build_schedule({"kind": "step", "initial": 5000.0, "switch_epoch": 10, "final": 10.0})
    assert [sched(e) for e in range(10)] == [5e3] * 10
    assert [sched(e) for e in (10, 11, 109)] == [10.0] * 3
    assert sched == paper_variance_minimiser_schedule()
    assert build_schedule(StepScheduleConfig()) == paper_variance_minimiser_schedule()  # defaults are the paper's
    assert isinstance(sched, Schedule)


def test_constant() -> None:
    sched = build_schedule({"kind": "constant", "value": 2.5})
    assert sched == ConstantSchedule(2.5)
    assert {sched(e) for e in range(5)} == {2.5}


def test_linear_warmup() -> None:
    sched = build_schedule({"kind": "linear_warmup", "start": 0.0, "end": 1.0, "warmup_epochs": 4})
    assert [sched(e) for e in range(7)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert LinearWarmupSchedule(0.2, 1.0, 0)(0) == 1.0  # no warm-up
    assert LinearWarmupSchedule(1.0, 0.0, 2)(1) == pytest.approx(0.5)  # a ramp down is allowed


def test_exponential() -> None:
    sched = build_schedule({"kind": "exponential", "initial": 5000.0, "decay_rate": 0.5})
    assert [sched(e) for e in range(4)] == pytest.approx([5000.0 * 0.5**e for e in range(4)])
    floored = ExponentialDecaySchedule(5000.0, 0.1, final=10.0)
    assert [floored(e) for e in range(5)] == pytest.approx([5000.0, 500.0, 50.0, 10.0, 10.0])


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "step", "initial": -1.0, "switch_epoch": 10, "final": 10.0},
        {"kind": "step", "initial": 5e3, "switch_epoch": -1, "final": 10.0},
        {"kind": "step", "initial": 5e3, "switch_epoch": 10, "final": 10.0, "typo": 1},
        {"kind": "constant", "value": -0.1},
        {"kind": "constant", "value": float("inf")},
        {"kind": "exponential", "initial": 1.0, "decay_rate": 0.0},
        {"kind": "exponential", "initial": 1.0, "decay_rate": 1.5},
        {"kind": "exponential", "initial": 1.0, "decay_rate": 0.5, "final": 2.0},
        {"kind": "linear_warmup", "start": 0.0, "end": 1.0, "warmup_epochs": -3},
        {"kind": "cosine", "value": 1.0},
        {"value": 1.0},
    ],
)
def test_config_rejects_bad_input(bad: dict) -> None:
    with pytest.raises(ValidationError):
        build_schedule(bad)


def test_config_assignment_is_validated() -> None:
    cfg = StepScheduleConfig()
    with pytest.raises(ValidationError):
        cfg.switch_epoch = -1


def test_config_round_trips_through_dump() -> None:
    adapter = TypeAdapter(ScheduleConfig)
    cfg = adapter.validate_python({"kind": "exponential", "initial": 3.0, "decay_rate": 0.9, "final": 1.0})
    again = adapter.validate_python(cfg.model_dump())
    assert again == cfg and build_schedule(again)(3) == pytest.approx(3.0 * 0.9**3)


def test_direct_construction_and_epochs_validate() -> None:
    with pytest.raises(ValueError):
        StepSchedule(1.0, -1, 0.0)
    with pytest.raises(ValueError):
        ConstantSchedule(-1.0)
    with pytest.raises(ValueError):
        ExponentialDecaySchedule(1.0, 0.0)
    with pytest.raises(ValueError):
        ConstantSchedule(1.0)(-1)


def test_variance_minimiser_loss_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x, mu = rng.random((3, 3, 8, 8)), rng.random((3, 3, 8, 8))
    ours = variance_minimiser_loss(torch.from_numpy(x), torch.from_numpy(mu))
    ref = np.array([np.sum((x[b] - mu[b]) ** 2) for b in range(3)])
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12)
    with pytest.raises(ValueError):
        variance_minimiser_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4))
