"""run_avae_trial on the real sample: metrics, checkpoints and grids per epoch, exact resume, divergence guards."""

from __future__ import annotations

import json
import math

import pytest
import torch

from study.train import NonFiniteLossError, TrainingDivergedError
from study.train_avae import load_avae_checkpoint, run_avae_trial
from tests.conftest import tiny_trial_config
from tests.test_train import assert_same_tensors

EXPECTED = {
    "train_kl", "train_nll", "train_generator_loss", "train_discriminator_loss", "train_latent_loss",
    "val_mse_255", "val_decoder_mse_255", "beta", "epoch", "epoch_seconds",
}
FILES = [
    "config.yaml", "decoder_reconstructions.png", "metrics.json", "reconstructions.png", "samples.png", "state.pt",
]


def avae_config(data_dir, **train):
    config = tiny_trial_config(data_dir, **train)
    config.model.kind = "avae"
    return config


def test_reports_every_epoch_with_checkpoint(prepared_32, tmp_path):
    seen = []

    def report(metrics, checkpoint):
        files = sorted(p.name for p in checkpoint.iterdir())
        seen.append((metrics, files, json.loads((checkpoint / "metrics.json").read_text())))

    final = run_avae_trial(avae_config(prepared_32), report, workdir=tmp_path)
    assert [m["epoch"] for m, _, _ in seen] == [1, 2]
    for metrics, files, on_disk in seen:
        assert set(metrics) == EXPECTED
        assert all(math.isfinite(v) for v in metrics.values())
        assert files == FILES
        assert on_disk == metrics
        assert metrics["train_kl"] >= 0 and metrics["train_discriminator_loss"] >= 0
        assert 0 <= metrics["val_mse_255"] <= 255**2 and 0 <= metrics["val_decoder_mse_255"] <= 255**2
    assert final == seen[-1][0]

    config, model, state = load_avae_checkpoint(tmp_path / "checkpoint")
    assert state["epoch"] == 2 and config.model.kind == "avae"
    assert set(state["optimisers"]) == {"encoder", "decoder", "generator", "discriminator"}
    assert model.sample(2).shape == (2, 3, 32, 32)


def test_resume_continues_exactly(prepared_32, tmp_path):
    straight = run_avae_trial(avae_config(prepared_32, epochs=2), workdir=tmp_path / "a")
    run_avae_trial(avae_config(prepared_32, epochs=1), workdir=tmp_path / "b")
    resumed = run_avae_trial(
        avae_config(prepared_32, epochs=2), workdir=tmp_path / "c", resume_from=tmp_path / "b" / "checkpoint"
    )
    assert resumed["epoch"] == 2
    # Bit-for-bit on one device (the module docstring's claim): every metric and every tensor of the final state.
    for key in EXPECTED - {"epoch_seconds"}:
        assert resumed[key] == straight[key], key
    a = torch.load(tmp_path / "a" / "checkpoint" / "state.pt", weights_only=False)
    c = torch.load(tmp_path / "c" / "checkpoint" / "state.pt", weights_only=False)
    assert_same_tensors(a, c)


def test_discriminator_collapse_fails_the_trial(prepared_32, tmp_path):
    config = avae_config(prepared_32, epochs=2)
    config.model.avae.collapse_loss = 1e9  # every step counts as collapsed
    config.model.avae.collapse_steps = 1
    seen = []
    with pytest.raises(TrainingDivergedError, match="discriminator collapse at epoch 1") as raised:
        run_avae_trial(config, lambda m, _: seen.append(m), workdir=tmp_path)
    assert seen == [] and not (tmp_path / "checkpoint").exists()
    assert not isinstance(raised.value, NonFiniteLossError)  # no loss was NaN: a collapse is its own reason


def test_non_finite_loss_fails_the_trial(prepared_32, tmp_path, monkeypatch):
    import study.models.avae as avae

    monkeypatch.setattr(avae, "generator_loss", lambda logits: logits.sum() * float("nan"))
    with pytest.raises(NonFiniteLossError, match="epoch 1: train_generator_loss"):
        run_avae_trial(avae_config(prepared_32), workdir=tmp_path)


def test_refuses_a_plain_vae_config(prepared_32, tmp_path):
    with pytest.raises(ValueError, match="avae"):
        run_avae_trial(tiny_trial_config(prepared_32), workdir=tmp_path)


def test_beta_schedule_sets_each_epochs_kl_weight(prepared_32, tmp_path, monkeypatch):
    import study.train_avae as train_avae

    # Linear warm-up (Bowman et al. 2016): beta_e = start + (end - start) * e / warmup_epochs for 0-based e.
    start, end, warmup = 0.2, 1.0, 4
    expected = [start + (end - start) * e / warmup for e in range(2)]  # 0.2, 0.4
    config = avae_config(prepared_32, epochs=2, beta={"kind": "linear_warmup", "start": start, "end": end,
                                                      "warmup_epochs": warmup})
    used: list[float] = []  # the beta of every train_step call, in order
    real_step = train_avae.train_step

    def recording_step(model, optimisers, x, beta, *args, **kwargs):
        used.append(beta)
        return real_step(model, optimisers, x, beta, *args, **kwargs)

    monkeypatch.setattr(train_avae, "train_step", recording_step)
    per_epoch: list[list[float]] = []
    reported: list[float] = []

    def report(metrics, _checkpoint):
        per_epoch.append(used[sum(map(len, per_epoch)):])
        reported.append(metrics["beta"])

    metrics = run_avae_trial(config, report, workdir=tmp_path)
    assert math.isfinite(metrics["train_kl"]) and math.isfinite(metrics["val_mse_255"])
    assert reported == pytest.approx(expected, abs=1e-12)
    assert len(per_epoch) == 2 and all(per_epoch)
    for betas, beta in zip(per_epoch, expected, strict=True):
        assert betas == pytest.approx([beta] * len(betas), abs=1e-12)


def test_run_trial_dispatches_avae_configs(prepared_32, tmp_path):
    from study.train import run_trial

    metrics = run_trial(avae_config(prepared_32, epochs=1), workdir=tmp_path)
    assert set(metrics) == EXPECTED and (tmp_path / "checkpoint" / "decoder_reconstructions.png").is_file()
