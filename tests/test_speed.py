"""Speed options of the training step (study/speed.py) compute what the plain float32 path computes.

Each option runs one training step (and a second one, after the first Adam update, so the backward pass and
the optimiser are covered too) from the same initial weights on the same batch of real images as the plain
path, and the losses must agree within a stated tolerance:

* bf16 autocast: relative 2^-8 = 3.9e-3, one bf16 unit roundoff, i.e. the loss must be as exact as a single
  bf16 rounding of the loss itself would leave it; rounding errors of the network's bf16 products must not add
  up coherently. Measured on CPU: 3e-7 - 2e-5 (step 1) and 5e-5 - 2e-4 (step 2). The likelihood and the loss
  run in float32 (``study.speed``), so this is the network's bf16 error alone.
* channels_last: relative 1e-5, float32 reduction-order noise only (measured 0 - 1e-7).
* compile: relative 1e-5 (on CPU ``aot_eager``, which traces forward and backward through AOTAutograd without
  generating code: measured bitwise equal). Inductor is opt-in on CPU (``STUDY_TEST_INDUCTOR=1``: about 25 s
  of C++ compilation per model on 2 cores when its cache is cold; measured 0 - 8e-8) and the default on CUDA.

On a CUDA machine every test also runs on the GPU, and one more checks that the step never synchronises with
the host. Without a GPU those are skipped.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from study.config import LikelihoodConfig, TrainConfig, TrialConfig
from study.data.loader import DeviceSplit
from study.likelihoods import build_likelihood
from study.models.vae import VAE
from study.speed import SpeedOptions, autocast_context, maybe_compile, prepare_model, to_memory_format
from study.train import load_checkpoint, run_trial, training_step
from tests.conftest import tiny_trial_config

BF16_RTOL = 2.0**-8  # one bf16 unit roundoff (8 significand bits), see the module docstring
EXACT_RTOL = 1e-5  # float32 reduction-order noise: channels_last and compile

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
FAMILIES = {
    "gaussian": {"family": "gaussian", "gaussian": {"sigma_mode": "per_pixel"}},
    "structured": {"family": "structured", "structured": {"neighbourhood_size": 3}},
}


def _compile_backend(device: str) -> str:
    if device == "cuda" or os.environ.get("STUDY_TEST_INDUCTOR") == "1":
        return "inductor"
    return "aot_eager"


@pytest.fixture(scope="module")
def real_batch(prepared_32) -> torch.Tensor:
    """16 real CelebA images, float32 (16, 3, 32, 32) in [0, 1], on the CPU."""
    split = DeviceSplit(prepared_32, "train", torch.device("cpu"))
    return split.take(torch.arange(16))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles fresh models; stale cache entries of VAE.forward would count against dynamo's
    # recompile limit, after which it silently runs eagerly.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(family: str, device: str) -> VAE:
    torch.manual_seed(0)
    likelihood = build_likelihood(LikelihoodConfig.model_validate(FAMILIES[family]))
    return VAE(likelihood, image_channels=3, resolution=32, latent_dim=32, width=16).to(device)


def _two_step_losses(model: VAE, x: torch.Tensor, options: SpeedOptions) -> list[float]:
    """Losses of two consecutive training steps (the second after one Adam update), same noise seed."""
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator(x.device).manual_seed(1)
    losses = []
    for _ in range(2):
        step = training_step(model, optimiser, x, generator, beta=1.0, speed=options)
        assert step.loss.dtype == torch.float32 and step.terms.log_likelihood.dtype == torch.float32
        losses.append(float(step.loss.detach()))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast casts copies, never weights
    return losses


CASES = {
    "bf16": (dict(precision="bf16"), BF16_RTOL),
    "channels_last": (dict(channels_last=True), EXACT_RTOL),
    "compile": (dict(compile=True), EXACT_RTOL),
    "all": (dict(precision="bf16", channels_last=True, compile=True), BF16_RTOL),
}


# Every option alone for both families; all of them together (the GPU configuration) on the structured one
# only, whose channel unflattening is the layout-sensitive code (the combination costs a compile per case).
CASE_FAMILIES = [(case, family) for case in ("bf16", "channels_last", "compile") for family in sorted(FAMILIES)]
CASE_FAMILIES.append(("all", "structured"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("case", "family"), CASE_FAMILIES)
def test_step_loss_matches_plain_path(case, family, device, real_batch):
    from torch._dynamo.testing import CompileCounterWithBackend

    kwargs, rtol = CASES[case]
    x = real_batch.to(device)
    plain = _model(family, device)
    candidate = copy.deepcopy(plain)
    backend = CompileCounterWithBackend(_compile_backend(device)) if kwargs.get("compile") else None
    options = SpeedOptions(**kwargs, compile_backend=backend)
    prepare_model(candidate, options)

    expected = _two_step_losses(plain, x, SpeedOptions())
    got = _two_step_losses(candidate, x, options)

    if backend is not None:
        assert backend.frame_count >= 1  # it really was compiled (dynamo falls back to eager silently)
    if kwargs.get("channels_last"):
        assert candidate.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)
    for step, (a, b) in enumerate(zip(got, expected), start=1):
        assert math.isfinite(a)
        assert a == pytest.approx(b, rel=rtol), f"step {step}: {case} {a} vs fp32 {b} (rel {abs(a - b) / abs(b):.2e})"


def test_prepared_model_checkpoints_are_interchangeable():
    """In-place compilation and NHWC keep the state dict's keys and values: a plain model loads it."""
    model = _model("gaussian", "cpu")
    keys = list(model.state_dict())
    prepare_model(model, SpeedOptions(channels_last=True, compile=True, compile_backend="aot_eager"))
    state = model.state_dict()
    assert list(state) == keys
    plain = _model("gaussian", "cpu")
    plain.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32)
    plain.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.encode(x)[0], model.encode(x)[0], rtol=1e-5, atol=1e-6)


def test_helpers_are_no_ops_when_off():
    x = torch.rand(2, 3, 8, 8)
    assert to_memory_format(x, False) is x
    assert to_memory_format(torch.rand(2, 3), True).is_contiguous()  # only 4-D tensors have an NHWC format
    assert to_memory_format(x, True).is_contiguous(memory_format=torch.channels_last)
    module = torch.nn.Linear(2, 2)
    assert maybe_compile(module, False) is module and module._compiled_call_impl is None
    with autocast_context("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="precision"):
        SpeedOptions(precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def test_bf16_trial_ends_near_the_fp32_trial(prepared_32, tmp_path):
    """Same seed, 2 epochs x 3 steps on the real sample: bf16 moves the final validation ELBO by less than
    1e-3 of its size. Measured: 0.08 nats of 6,874 (1.2e-5); for scale, changing the seed moves it by 60 -
    150 nats. Validation itself runs in float32, so this is the drift of six bf16 training steps."""
    fp32 = run_trial(tiny_trial_config(prepared_32), workdir=tmp_path / "fp32")
    bf16 = run_trial(tiny_trial_config(prepared_32, precision="bf16"), workdir=tmp_path / "bf16")
    difference = bf16["val_elbo"] - fp32["val_elbo"]
    print(f"val ELBO fp32 {fp32['val_elbo']:.4f}, bf16 {bf16['val_elbo']:.4f}, difference {difference:+.4f} nats")
    assert abs(difference) < 1e-3 * abs(fp32["val_elbo"])
    assert bf16["train_elbo"] == pytest.approx(fp32["train_elbo"], rel=1e-3)


def test_trial_with_every_option_checkpoints_a_plain_model(prepared_32, tmp_path, monkeypatch):
    """run_trial with bf16 + channels_last + compile (aot_eager: no C++ compiler needed) trains, evaluates
    (a recompile in eval mode) and writes a checkpoint that loads into an eager, contiguous model."""
    monkeypatch.setattr("study.speed.DEFAULT_COMPILE_BACKEND", "aot_eager")
    config = tiny_trial_config(prepared_32, epochs=1, precision="bf16", channels_last=True, compile=True)
    metrics = run_trial(config, workdir=tmp_path)
    assert all(math.isfinite(v) for v in metrics.values())
    loaded_config, model, _ = load_checkpoint(tmp_path / "checkpoint")
    assert loaded_config.train.precision == "bf16" and loaded_config.train.compile
    assert model.decode(torch.zeros(1, 16)).shape == (1, 3, 32, 32)


def test_avae_refuses_speed_options(prepared_32, tmp_path):
    config = tiny_trial_config(prepared_32, precision="bf16")
    config = TrialConfig.model_validate({**config.model_dump(mode="json"), "model": {"kind": "avae"}})
    with pytest.raises(ValueError, match="avae"):
        run_trial(config, workdir=tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_step_never_synchronises_on_cuda(family, real_batch):
    """With every option on, a warmed-up training step issues no host synchronisation (CUDA raises on one)."""
    x = real_batch.cuda()
    model = _model(family, "cuda")
    options = SpeedOptions(precision="bf16", channels_last=True, compile=True)
    prepare_model(model, options)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator("cuda").manual_seed(0)
    training_step(model, optimiser, x, generator, beta=1.0, speed=options)  # compiles (that may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        training_step(model, optimiser, x, generator, beta=1.0, speed=options)
    finally:
        torch.cuda.set_sync_debug_mode("default")
