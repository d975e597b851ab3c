"""One Adversarial-VAE training run (a sweep trial): ``run_avae_trial(config, report)``.

The same contract as :func:`study.train.run_trial` (``study.train`` dispatches here when
``config.model.kind == "avae"``): seeded, device chosen automatically, prepared splits held on the device as
uint8 (:class:`study.data.loader.DeviceSplit`), horizontal flips, per-epoch sums kept on the device and read once
per epoch, a checkpoint directory rewritten atomically whenever one is due (``study.train.CheckpointPolicy``) and
handed to ``report`` with the epoch's metrics (None on the other epochs), and an exact
(bit-for-bit on one device) resume from such a directory.

Training follows the official AVAE code (Plumerault et al. 2020): one forward pass per batch,
four losses, four Adam optimisers, each network updated only by its own loss (:func:`study.models.avae.train_step`).
Encoder and decoder use ``train.lr``; generator and discriminator ``model.avae.generator_lr`` /
``discriminator_lr``; all betas (``model.avae.adam_beta1``, 0.999). ``train.beta`` (a number or a schedule over
epochs) weights L_KL in the encoder's objective; ``model.avae.latent_weight`` weights L_Z in the generator's.
``likelihood`` is ignored: the AVAE reconstruction term is the official sigma_x = 1 Gaussian on [-1, 1] images.

Metrics per epoch (training losses are per-image means over the epoch, in the official [-1, 1] units):
    train_kl, train_nll, train_generator_loss, train_discriminator_loss,
    train_latent_loss (L_Z per image: the official loss is a batch *sum*, divided here by the batch size),
    beta (the KL weight of ``train.beta`` used in every step of the epoch),
    val_mse_255 (per-pixel MSE on the [0, 255] scale of the AVAE reconstruction G([mu + sigma eps, xi]) against
    the input; the sweep metric for AVAE studies, minimised), val_decoder_mse_255 (the same for D(mu(x)), the
    VAE half), epoch, epoch_seconds.
There is no ELBO: the generator's reconstructions have no tractable likelihood, so no ``val_elbo`` is reported.
Validation runs the networks in eval mode (batch-norm running statistics), with one seeded (eps, xi) draw per
image that is the same every epoch. (The official code keeps batch norm in training mode even at test time.)

Divergence guard: the trial raises :class:`study.train.NonFiniteLossError` (recorded as FAILED) when any
training loss is NaN or infinite in an epoch, and :class:`study.train.TrainingDivergedError` (its base class, also
FAILED) when the discriminator has collapsed: its loss has stayed below
``model.avae.collapse_loss`` for ``model.avae.collapse_steps`` consecutive steps (counted across epochs, and
restored on resume). Both are checked on the device every step and read at the end of the epoch, so the
error is raised at the end of the epoch in which the condition first held.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection
from pathlib import Path

import torch
import yaml
from torch import Tensor

from study.atomic import atomic_directory
from study.config import TrialConfig
from study.data.loader import DeviceSplit
from study.models.avae import AVAE, NETWORKS, make_optimisers, train_step
from study.schedules import build_schedule

# A module import, not ``from study.train import ...``: ``study.train`` dispatches to this module, so either may
# be imported first; names are looked up at call time, when both modules are complete.
import study.train as _train

__all__ = ["LOSS_METRICS", "build_avae", "evaluate_avae", "load_avae_checkpoint", "run_avae_trial"]

#: Per-epoch training metrics, in the order of :meth:`study.models.avae.AVAELosses.stacked`.
LOSS_METRICS = (
    "train_kl",
    "train_nll",
    "train_generator_loss",
    "train_discriminator_loss",
    "train_latent_loss",
)


def build_avae(config: TrialConfig, image_shape: tuple[int, int, int]) -> AVAE:
    """The AVAE a trial config describes, for images of shape (C, H, W).

    Raises:
        ValueError: non-square images or an unsupported resolution.
    """
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"the AVAE expects square images, got {height} x {width}")
    return AVAE(
        image_channels=channels,
        resolution=height,
        latent_dim=config.model.latent_dim,
        width=config.model.width,
        input_dependent_sigma=config.model.avae.input_dependent_sigma,
    )


def _beta_at(config: TrialConfig, epoch: int) -> float:
    """``train.beta`` at a 0-based epoch: the number itself, or its schedule's value."""
    beta = config.train.beta
    if isinstance(beta, int | float):
        return float(beta)
    return float(build_schedule(beta)(epoch))


class _GuardState:
    """On-device divergence bookkeeping: the current run of low-discriminator-loss steps and a trip flag."""

    def __init__(self, device: torch.device, run: int = 0) -> None:
        self.run = torch.tensor(run, dtype=torch.int64, device=device)  # consecutive steps below the threshold
        self.tripped = torch.zeros((), dtype=torch.bool, device=device)

    def update(self, discriminator_loss: Tensor, threshold: float, steps: int) -> None:
        below = discriminator_loss < threshold  # False for NaN: the non-finite check reports those
        self.run = torch.where(below, self.run + 1, torch.zeros_like(self.run))
        self.tripped |= self.run >= steps


@torch.no_grad()
def evaluate_avae(model: AVAE, split: DeviceSplit, batch_size: int, seed: int) -> dict[str, float]:
    """Reconstruction MSEs over a whole split, in eval mode.

    Args:
        model: the AVAE (put in eval mode here).
        split: the images, read in order.
        batch_size: images per forward pass.
        seed: the (eps, xi) draws come from a generator seeded with ``seed + 1`` (as ``study.train``).

    Returns:
        ``val_mse_255``: per-pixel MSE on the [0, 255] scale of G([mu + sigma eps, xi]) against the inputs;
        ``val_decoder_mse_255``: the same for D(mu(x)). Both in [0, 255^2].
    """
    model.eval()
    generator = torch.Generator(split.device).manual_seed(seed + 1)
    sums = torch.zeros(2, dtype=torch.float64, device=split.device)  # generator, decoder squared errors
    pixels = 0
    for x in split.batches(batch_size):
        gen = model.reconstruct_generator(x, generator=generator)  # (B, C, H, W) in (0, 1)
        dec = model.reconstruct_decoder(x)
        sums += torch.stack([(gen - x).square().sum(), (dec - x).square().sum()]).double()
        pixels += x.numel()
    gen_sq, dec_sq = sums.tolist()
    scale = 255.0**2 / pixels
    return {"val_mse_255": gen_sq * scale, "val_decoder_mse_255": dec_sq * scale}


def _write_checkpoint(
    directory: Path,
    config: TrialConfig,
    model: AVAE,
    optimisers: dict[str, torch.optim.Optimizer],
    generator: torch.Generator,
    guard_run: int,
    epoch: int,
    metrics: dict[str, float],
    val: DeviceSplit,
) -> None:
    grid_n = min(config.train.grid_size, len(val))
    seed = config.train.seed
    model.eval()
    with torch.no_grad():
        x = val.take(torch.arange(grid_n, device=val.device))  # (n, C, H, W) in [0, 1]
        gen_recon = model.reconstruct_generator(x, generator=torch.Generator(val.device).manual_seed(seed))
        dec_recon = model.reconstruct_decoder(x)
        samples = model.sample(config.train.grid_size, generator=torch.Generator(val.device).manual_seed(seed))
    with atomic_directory(directory) as tmp:
        torch.save(
            {
                "epoch": epoch,
                "image_shape": tuple(val.image_shape),
                "model": model.state_dict(),
                "optimisers": {name: opt.state_dict() for name, opt in optimisers.items()},
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "collapse_run": guard_run,
            },
            tmp / _train.CHECKPOINT_FILE,
        )
        (tmp / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        labels = {"row_labels": _train.RECONSTRUCTION_ROWS, "tile_height": x.shape[-2]}
        _train.save_image(_train._grid_pairs(x, gen_recon), tmp / "reconstructions.png", **labels)
        _train.save_image(_train._grid_pairs(x, dec_recon), tmp / "decoder_reconstructions.png", **labels)
        _train.save_image(samples, tmp / "samples.png", nrow=8, padding=2, pad_value=1.0, row_labels=("sample",),
                          tile_height=x.shape[-2])


def load_avae_checkpoint(
    directory: str | Path, device: torch.device | str = "cpu"
) -> tuple[TrialConfig, AVAE, dict]:
    """Rebuild a trained AVAE from a checkpoint directory written by :func:`run_avae_trial`.

    Returns:
        (config, model in eval mode on ``device``, the raw state dict with ``epoch``, ``optimisers`` etc.).

    Raises:
        FileNotFoundError: ``config.yaml`` or ``state.pt`` is missing.
    """
    directory = Path(directory)
    config = TrialConfig.model_validate(yaml.safe_load((directory / "config.yaml").read_text()))
    state = torch.load(directory / _train.CHECKPOINT_FILE, map_location=device, weights_only=False)
    model = build_avae(config, tuple(state["image_shape"]))
    model.load_state_dict(state["model"])
    return config, model.to(device).eval(), state


def run_avae_trial(
    config: TrialConfig,
    report: _train.ReportFn | None = None,
    workdir: str | Path = "trial",
    resume_from: str | Path | None = None,
    checkpoint_epochs: Collection[int] = (),
) -> dict[str, float]:
    """Train one AVAE and return the last epoch's metrics.

    Args:
        config: the resolved trial config; ``model.kind`` must be ``avae``.
        report: called after every epoch with (metrics, checkpoint directory or None when this epoch wrote
            none); it may raise to stop the run.
        workdir: the checkpoint directory ``<workdir>/checkpoint`` is (re)written there whenever one is due
            (``study.train.CheckpointPolicy``: by ``train.checkpoint_interval_s``, at ``checkpoint_epochs`` and at
            the last epoch), holding
            ``state.pt`` (four networks, four optimisers, RNG states, guard counter), ``config.yaml``,
            ``metrics.json``, ``reconstructions.png`` (inputs above G reconstructions),
            ``decoder_reconstructions.png`` (inputs above D reconstructions) and ``samples.png`` (G([z, xi])).
        resume_from: a checkpoint directory of this run to continue from (same config).
        checkpoint_epochs: epochs (1-based) that always write a checkpoint (a scheduler's needs).

    Returns:
        The final epoch's metrics (see the module docstring).

    Raises:
        ValueError: ``config.model.kind`` is not ``avae``, the data are YCbCr, or the images are not square.
        NonFiniteLossError: a loss became NaN or infinite (the message names it).
        TrainingDivergedError: the discriminator collapsed (the message gives the threshold and step count).
        FileNotFoundError / DataIntegrityError: the prepared data is missing or was modified.
    """
    if config.model.kind != "avae":
        raise ValueError(f"run_avae_trial needs model.kind 'avae', got {config.model.kind!r}")
    train_cfg, avae_cfg = config.train, config.model.avae
    torch.set_num_threads(train_cfg.num_threads)
    torch.manual_seed(train_cfg.seed)
    device = _train.select_device(train_cfg.device)
    generator = torch.Generator(device).manual_seed(train_cfg.seed)

    train = DeviceSplit(config.data_dir, "train", device)
    val = DeviceSplit(config.data_dir, "val", device)
    if getattr(train, "color", "rgb") == "ycbcr":  # Y + upsampled chroma is not an image the GAN should model
        raise ValueError("the AVAE trains on rgb or grey data; prepare the data set without color: ycbcr")
    model = build_avae(config, train.image_shape).to(device)
    optimisers = make_optimisers(
        model, train_cfg.lr, avae_cfg.generator_lr, avae_cfg.discriminator_lr, avae_cfg.adam_beta1
    )

    start_epoch, guard_run = 0, 0
    if resume_from is not None:
        state = torch.load(Path(resume_from) / _train.CHECKPOINT_FILE, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        for name in NETWORKS:
            optimisers[name].load_state_dict(state["optimisers"][name])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, guard_run = int(state["epoch"]), int(state["collapse_run"])

    checkpoint_dir = Path(workdir) / "checkpoint"
    policy = _train.CheckpointPolicy(train_cfg.checkpoint_interval_s, train_cfg.epochs, checkpoint_epochs)
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, train_cfg.epochs):
        started = time.perf_counter()
        beta = _beta_at(config, epoch)
        model.train()
        guard = _GuardState(device, guard_run)
        sums = torch.zeros(len(LOSS_METRICS), dtype=torch.float64, device=device)
        images = 0
        for x in train.batches(train_cfg.batch_size, shuffle=True, hflip=train_cfg.hflip, generator=generator):
            losses = train_step(model, optimisers, x, beta, avae_cfg.latent_weight, generator=generator)
            n = x.shape[0]
            # kl, nll, gen, dis are batch means (x n -> sums over images); L_Z is already a batch sum.
            weights = torch.tensor([n, n, n, n, 1.0], dtype=torch.float64, device=device)
            sums += losses.stacked().double() * weights
            guard.update(losses.discriminator, avae_cfg.collapse_loss, avae_cfg.collapse_steps)
            images += n

        # The epoch's single host read: loss sums, the guard's flag and its current run.
        values = sums.tolist()
        tripped, guard_run = bool(guard.tripped), int(guard.run)
        metrics = {name: v / images for name, v in zip(LOSS_METRICS, values, strict=True)}
        bad = [name for name, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise _train.NonFiniteLossError(f"non-finite AVAE loss at epoch {epoch + 1}: {', '.join(bad)}")
        if tripped:
            raise _train.TrainingDivergedError(
                f"discriminator collapse at epoch {epoch + 1}: discriminator loss below "
                f"{avae_cfg.collapse_loss:g} for {avae_cfg.collapse_steps} consecutive steps"
            )

        metrics["beta"] = beta  # the KL weight every step of this epoch used, as study.train reports it
        metrics |= evaluate_avae(model, val, train_cfg.batch_size, seed=train_cfg.seed)
        metrics["epoch"] = epoch + 1
        metrics["epoch_seconds"] = time.perf_counter() - started
        saved = None
        if policy.due(epoch + 1):
            _write_checkpoint(checkpoint_dir, config, model, optimisers, generator, guard_run, epoch + 1, metrics, val)
            policy.written()
            saved = checkpoint_dir
        if report is not None:
            report(dict(metrics), saved)
    return metrics
