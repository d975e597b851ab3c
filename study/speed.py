"""Speed options of the training step: bf16 autocast, channels-last memory format, ``torch.compile``.

Each option changes how the same maths runs, never what is computed, and each is checked against the plain
float32 path (``tests/test_speed.py``: one step from the same weights on the same batch gives the same loss
within a stated tolerance). ``study.train.training_step`` applies them; ``benchmarks/train_throughput.py``
measures what they buy.

* ``precision="bf16"``: the network forward (encoder, reparameterisation, decoder) runs under
  ``torch.autocast(device_type, dtype=torch.bfloat16)``, so convolutions and linear layers use bf16 inputs
  with float32 accumulation (CUDA tensor cores; on CPU oneDNN, fast only where the CPU has bf16 units, e.g.
  AVX512-BF16 / AMX). Its outputs are cast back to float32 and the likelihood and the loss run with autocast
  **off**, for three reasons: (1) ``log_prob`` sums 3 * 64 * 64 = 12,288 per-pixel terms of size ~1 into a
  number of size ~1e4, and bf16's 8-bit significand would lose it all (spacing 64 at 1e4); (2) autocast would
  silently lower the likelihoods' own convolutions and matrix products (structured basis mode, SSIM windows,
  LPIPS) to bf16, including the whitening y = L^T r whose square is the Gaussian's quadratic form; (3)
  ``torch.fft`` has no bf16 (blur, focal frequency). The likelihood is element-wise or small next to the
  network, so little speed is lost. bf16 keeps float32's exponent range, so no loss scaling
  (``GradScaler``) is needed. Parameters, gradients and Adam's state stay float32 (autocast casts copies).
* ``channels_last``: the model's 4-D weights and every input batch in ``torch.channels_last`` (NHWC) strides,
  the layout cuDNN's tensor-core convolutions and oneDNN prefer; convolutions then also emit NHWC, so the
  decoder's output and the likelihood's inputs are NHWC. Values are unchanged; only reduction orders can
  differ (float32 rounding, ~1e-7 relative).
* ``compile``: ``torch.compile`` of the model's forward, in place (``nn.Module.compile``), so state-dict keys,
  checkpoints and optimiser parameter groups are unchanged. Dynamo splits the forward in two graphs (encoder
  and decoder) around the seeded ``torch.randn(..., generator=...)`` of the reparameterisation, which it cannot
  trace (graph break gb0055) and which therefore draws exactly the same noise as the eager path. The first
  step compiles (inductor on CPU: ~25 s with a C++ compiler on 2 cores; it needs ``gcc``/``g++``), switching
  to eval mode or a new batch size recompiles once. ``backend="aot_eager"`` runs the same AOTAutograd
  tracing without code generation: no compiler needed and no speed-up, used by the tests as a correctness
  check of the traced graphs on CPU.

None of the helpers synchronises with the host (no ``.item()``, no printing of tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from study.config import TrainConfig

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")

#: Backend ``maybe_compile`` uses when none is given: inductor, the one that generates fused kernels.
#: Tests set it to ``aot_eager`` to exercise ``run_trial(compile=True)`` without a minute of C++ compilation.
DEFAULT_COMPILE_BACKEND = "inductor"

_T = TypeVar("_T", nn.Module, Tensor)


@dataclass(frozen=True)
class SpeedOptions:
    """The speed options of one trial (``TrainConfig.precision``, ``channels_last``, ``compile``).

    Args:
        precision: ``fp32`` (the plain path) or ``bf16`` (autocast of the network forward, see module).
        channels_last: model weights and batches in NHWC memory format.
        compile: ``torch.compile`` the model's forward with ``compile_backend``.
        compile_backend: a ``torch.compile`` backend name; None means ``DEFAULT_COMPILE_BACKEND``.

    Raises:
        ValueError: an unknown precision.
    """

    precision: Precision = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_backend: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @classmethod
    def from_train_config(cls, train: "TrainConfig") -> "SpeedOptions":
        """The options a trial's ``train`` section sets (the compile backend stays ``DEFAULT_COMPILE_BACKEND``)."""
        return cls(precision=train.precision, channels_last=train.channels_last, compile=train.compile)

    @property
    def is_plain(self) -> bool:
        """True for the plain float32, contiguous, eager path (every option off)."""
        return self.precision == "fp32" and not self.channels_last and not self.compile

    def label(self) -> str:
        """Short name for tables, e.g. ``bf16+cl+compile``; ``fp32`` for the plain path."""
        parts = [self.precision] + (["cl"] if self.channels_last else []) + (["compile"] if self.compile else [])
        return "+".join(parts)


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The autocast dtype of a precision: ``torch.bfloat16`` for ``bf16``, None (no autocast) for ``fp32``.

    Raises:
        ValueError: an unknown precision.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def autocast_context(device: torch.device | str, precision: Precision) -> contextlib.AbstractContextManager:
    """Context for the network forward: ``torch.autocast(device.type, dtype=torch.bfloat16)`` for ``bf16``,
    a no-op for ``fp32`` (so the plain path runs exactly the code it ran before these options existed).

    Args:
        device: the device the forward runs on (``cuda``, ``cpu``; only its type matters).
        precision: ``fp32`` or ``bf16``.

    Raises:
        ValueError: an unknown precision.
        RuntimeError: from ``torch.autocast`` when the device type does not support bf16 autocast.
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def float32_context(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device``'s type: for likelihood and loss maths that must stay float32 even
    when a caller wraps the whole step in an autocast region."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def to_memory_format(obj: _T, channels_last: bool) -> _T:
    """``obj`` in ``torch.channels_last`` memory format when ``channels_last``, else unchanged.

    Args:
        obj: an ``nn.Module`` (converted in place: its 4-D parameters and buffers get NHWC strides, the
            ``Parameter`` objects stay the same, so optimisers built before or after both work) or a tensor
            (a 4-D tensor (B, C, H, W) is copied to NHWC strides, values and shape unchanged; tensors of other
            ranks are returned as they are, since the format only exists for 4-D).
        channels_last: whether to convert.

    Returns:
        The module itself, or the (possibly new) tensor.
    """
    if not channels_last:
        return obj
    if isinstance(obj, nn.Module):
        return obj.to(memory_format=torch.channels_last)
    if obj.dim() == 4:
        return obj.contiguous(memory_format=torch.channels_last)
    return obj


def maybe_compile(module: nn.Module, enabled: bool, backend: str | None = None, **kwargs) -> nn.Module:
    """``module.compile(backend=...)`` in place when ``enabled`` (``torch.compile`` of its forward), else nothing.

    In-place compilation (``nn.Module.compile``) keeps ``state_dict`` keys free of the ``_orig_mod.`` prefix
    that ``torch.compile(module)`` adds, so checkpoints of compiled and eager runs are interchangeable.
    Compilation itself is lazy: it happens, and may fail (e.g. inductor without a C++ compiler), on the first
    call.

    Args:
        module: the module whose forward to compile.
        enabled: whether to compile.
        backend: a ``torch.compile`` backend (``inductor``, ``aot_eager``, ``eager``...); None means
            ``DEFAULT_COMPILE_BACKEND``.
        **kwargs: passed to ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``...).

    Returns:
        The same module.
    """
    if enabled:
        module.compile(backend=backend or DEFAULT_COMPILE_BACKEND, **kwargs)
    return module


def prepare_model(model: nn.Module, options: SpeedOptions) -> nn.Module:
    """Apply the model-side options in place: memory format, then compilation. Returns the same module."""
    to_memory_format(model, options.channels_last)
    return maybe_compile(model, options.compile, backend=options.compile_backend)


def vae_forward(
    model: nn.Module, x: Tensor, generator: torch.Generator | None, options: SpeedOptions
) -> dict[str, Tensor]:
    """The VAE's reparameterised pass ``model(x, generator=generator)`` under the options.

    Args:
        model: a ``study.models.vae.VAE`` already passed through :func:`prepare_model`.
        x: images, float32 (B, C, H, W) in [0, 1], on the model's device (converted to NHWC here when
            ``channels_last``).
        generator: seeds the reparameterisation noise (as ``VAE.forward``).
        options: the speed options.

    Returns:
        ``mu``, ``logvar``, ``z`` float32 (B, d) and ``params`` float32 (B, P, H, W), as ``VAE.forward``; under
        ``bf16`` the values carry bf16 rounding (relative ~2^-9) but are float32 tensors, so everything
        downstream (likelihood, KL, loss, metrics) runs in float32.
    """
    x = to_memory_format(x, options.channels_last)
    with autocast_context(x.device, options.precision):
        out = model(x, generator=generator)
    if options.precision == "fp32":
        return out
    return _float32(out)


def _float32(out: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # .float() keeps the autograd edge (the cast's backward casts gradients back to bf16 for the network).
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


__all__ = [
    "DEFAULT_COMPILE_BACKEND", "PRECISIONS", "Precision", "SpeedOptions", "autocast_context", "autocast_dtype",
    "float32_context", "vae_forward", "maybe_compile", "prepare_model", "to_memory_format",
]
