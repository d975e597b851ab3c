"""Per-epoch weight schedules: Dorta et al.'s variance-minimiser alpha (Eq. 14) and KL-weight (beta) schedules.

Dorta et al. 2018 ("Training VAEs Under Structured Residuals", Eq. 14) train with

    loss = -ELBO + alpha(epoch) * ||x - mu(z)||_2^2,

alpha = 5e3 for the first 10 epochs and 10 afterwards on CelebA (:func:`paper_variance_minimiser_schedule`). The
large early weight makes the mean fit the data before the predicted precision can explain residuals away.

A schedule is any callable ``epoch -> float`` with 0-based epochs (:class:`Schedule`). ``params.yaml`` describes
one as a tagged mapping validated by :data:`ScheduleConfig`, e.g.
``{kind: step, initial: 5000.0, switch_epoch: 10, final: 10.0}``, and :func:`build_schedule` turns it into an
object. Weights are non-negative; configs reject negative values with a pydantic ``ValidationError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, Union, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

__all__ = [
    "Schedule",
    "ConstantSchedule",
    "StepSchedule",
    "ExponentialDecaySchedule",
    "LinearWarmupSchedule",
    "ConstantScheduleConfig",
    "StepScheduleConfig",
    "ExponentialDecayScheduleConfig",
    "LinearWarmupScheduleConfig",
    "ScheduleConfig",
    "build_schedule",
    "paper_variance_minimiser_schedule",
]


@runtime_checkable
class Schedule(Protocol):
    """A weight as a function of the 0-based epoch."""

    def __call__(self, epoch: int) -> float: ...


def _check_epoch(epoch: int) -> None:
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")


def _check_non_negative(**values: float) -> None:
    for name, v in values.items():
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {v}")


@dataclass(frozen=True)
class ConstantSchedule:
    """``value`` at every epoch (>= 0)."""

    value: float

    def __post_init__(self) -> None:
        _check_non_negative(value=self.value)

    def __call__(self, epoch: int) -> float:
        _check_epoch(epoch)
        return float(self.value)


@dataclass(frozen=True)
class StepSchedule:
    """``initial`` for epochs 0 .. switch_epoch - 1, then ``final``.

    Dorta et al.'s variance minimiser: ``StepSchedule(5e3, 10, 10.0)`` gives 5e3 at epochs 0..9 and 10 from epoch
    10 on. ``switch_epoch = 0`` means ``final`` throughout.
    """

    initial: float
    switch_epoch: int
    final: float

    def __post_init__(self) -> None:
        _check_non_negative(initial=self.initial, final=self.final)
        if self.switch_epoch < 0:
            raise ValueError(f"switch_epoch must be >= 0, got {self.switch_epoch}")

    def __call__(self, epoch: int) -> float:
        _check_epoch(epoch)
        return float(self.initial if epoch < self.switch_epoch else self.final)


@dataclass(frozen=True)
class ExponentialDecaySchedule:
    """``max(initial * decay_rate ** epoch, final)``: multiplied by ``decay_rate`` every epoch, floored at ``final``.

    ``initial`` >= 0, 0 < ``decay_rate`` <= 1, optional floor 0 <= ``final`` <= ``initial`` (None: no floor, the
    weight tends to 0).
    """

    initial: float
    decay_rate: float
    final: float | None = None

    def __post_init__(self) -> None:
        _check_non_negative(initial=self.initial)
        if not 0 < self.decay_rate <= 1:
            raise ValueError(f"decay_rate must be in (0, 1], got {self.decay_rate}")
        if self.final is not None:
            _check_non_negative(final=self.final)
            if self.final > self.initial:
                raise ValueError(f"floor final={self.final} is above initial={self.initial}")

    def __call__(self, epoch: int) -> float:
        _check_epoch(epoch)
        value = self.initial * self.decay_rate**epoch
        return float(value if self.final is None else max(value, self.final))


@dataclass(frozen=True)
class LinearWarmupSchedule:
    """Linear ramp from ``start`` at epoch 0 to ``end`` at epoch ``warmup_epochs``, constant ``end`` afterwards.

    The usual KL annealing for beta (Bowman et al. 2016; start 0, end 1). ``warmup_epochs = 0`` means ``end``
    throughout. Values >= 0; ``start`` may exceed ``end`` (a linear decay).
    """

    start: float
    end: float
    warmup_epochs: int

    def __post_init__(self) -> None:
        _check_non_negative(start=self.start, end=self.end)
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")

    def __call__(self, epoch: int) -> float:
        _check_epoch(epoch)
        if epoch >= self.warmup_epochs:
            return float(self.end)
        return float(self.start + (self.end - self.start) * epoch / self.warmup_epochs)


def paper_variance_minimiser_schedule() -> StepSchedule:
    """Dorta et al. 2018's CelebA alpha for Eq. 14: 5e3 for epochs 0..9, then 10."""
    return StepSchedule(initial=5e3, switch_epoch=10, final=10.0)


# ----------------------------------------------------------------------------------------------- configs
class _ScheduleConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConstantScheduleConfig(_ScheduleConfigBase):
    """``{kind: constant, value: 1.0}``."""

    kind: Literal["constant"] = "constant"
    value: float = Field(ge=0.0, allow_inf_nan=False)

    def build(self) -> ConstantSchedule:
        return ConstantSchedule(self.value)


class StepScheduleConfig(_ScheduleConfigBase):
    """``{kind: step, initial: 5000.0, switch_epoch: 10, final: 10.0}`` (Dorta et al. 2018, Eq. 14 defaults)."""

    kind: Literal["step"] = "step"
    initial: float = Field(default=5e3, ge=0.0, allow_inf_nan=False)
    switch_epoch: int = Field(default=10, ge=0)
    final: float = Field(default=10.0, ge=0.0, allow_inf_nan=False)

    def build(self) -> StepSchedule:
        return StepSchedule(self.initial, self.switch_epoch, self.final)


class ExponentialDecayScheduleConfig(_ScheduleConfigBase):
    """``{kind: exponential, initial: 5000.0, decay_rate: 0.5, final: 10.0}``."""

    kind: Literal["exponential"] = "exponential"
    initial: float = Field(ge=0.0, allow_inf_nan=False)
    decay_rate: float = Field(gt=0.0, le=1.0)
    final: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _floor_below_initial(self) -> "ExponentialDecayScheduleConfig":
        if self.final is not None and self.final > self.initial:
            raise ValueError(f"floor final={self.final} is above initial={self.initial}")
        return self

    def build(self) -> ExponentialDecaySchedule:
        return ExponentialDecaySchedule(self.initial, self.decay_rate, self.final)


class LinearWarmupScheduleConfig(_ScheduleConfigBase):
    """``{kind: linear_warmup, start: 0.0, end: 1.0, warmup_epochs: 10}``."""

    kind: Literal["linear_warmup"] = "linear_warmup"
    start: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    end: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    warmup_epochs: int = Field(ge=0)

    def build(self) -> LinearWarmupSchedule:
        return LinearWarmupSchedule(self.start, self.end, self.warmup_epochs)


#: Any schedule config, told apart by ``kind``; use as a field type in ``study.config`` models.
ScheduleConfig = Annotated[
    Union[
        ConstantScheduleConfig,
        StepScheduleConfig,
        ExponentialDecayScheduleConfig,
        LinearWarmupScheduleConfig,
    ],
    Field(discriminator="kind"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(ScheduleConfig)


def build_schedule(config: ScheduleConfig | dict[str, Any]) -> Schedule:
    """Turn a schedule config (model, or a plain mapping from YAML) into a :class:`Schedule`.

    Raises:
        pydantic.ValidationError: a mapping with an unknown ``kind``, unknown keys or out-of-range values.
    """
    if isinstance(config, dict):
        config = _ADAPTER.validate_python(config)
    return config.build()

