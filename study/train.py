"""One training run (a sweep trial): ``run_trial(config, report)``.

Adam on the beta-ELBO (``study.objectives``), horizontal-flip augmentation, a seed for everything, the device
chosen automatically. The prepared splits are loaded once onto the device (``study.data.loader``); per-epoch
sums stay on the device and are read once per epoch, so the step never waits on the host.

After every epoch the run writes a checkpoint directory (model and optimiser state, RNG states, the resolved
config, metrics and PNG grids of validation reconstructions and prior samples) and hands it, with the epoch's
metrics, to ``report``. A run resumed from such a directory continues bit-for-bit where it stopped.

Metrics per epoch (nats per image unless named otherwise; ``*_mse_255`` is the per-pixel MSE on the [0, 255]
scale that Dorta et al. 2018 and Larsen et al. 2016 report):
    train_elbo, train_kl, train_log_likelihood, train_loss, train_mse_255,
    val_elbo, val_kl, val_log_likelihood, val_mse_255, val_bits_per_dim, epoch, epoch_seconds.
The validation ELBO uses one z sample per image with a fixed seed (the same draws every epoch); the validation
MSE uses the reconstruction E[x | z = mu(x)].
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import Tensor
from torchvision.utils import make_grid, save_image

from study.atomic import atomic_directory
from study.config import TrialConfig
from study.data.loader import DeviceSplit
from study.likelihoods import build_likelihood
from study.models.vae import VAE
from study.objectives import bits_per_dim, elbo_terms

ReportFn = Callable[[dict[str, float], Path], None]
CHECKPOINT_FILE = "state.pt"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the trial is recorded as failed with this message."""


def select_device(preference: str = "auto") -> torch.device:
    """``cuda`` when requested or available (``auto``), else ``cpu``.

    Raises:
        RuntimeError: ``cuda`` requested but not available.
    """
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def build_model(config: TrialConfig, image_shape: tuple[int, int, int]) -> VAE:
    """The VAE a trial config describes, for images of shape (C, H, W)."""
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"the VAE expects square images, got {height} x {width}")
    return VAE(
        build_likelihood(config.likelihood),
        image_channels=channels,
        resolution=height,
        latent_dim=config.model.latent_dim,
        width=config.model.width,
    )


def _grid_pairs(inputs: Tensor, recons: Tensor, per_row: int = 8) -> Tensor:
    """Rows of inputs each followed by a row of their reconstructions: (3, H', W') in [0, 1]."""
    rows = []
    for start in range(0, inputs.shape[0], per_row):
        rows += [inputs[start : start + per_row], recons[start : start + per_row]]
    width = min(per_row, inputs.shape[0])
    padded = [torch.cat([r, r.new_ones(width - r.shape[0], *r.shape[1:])]) if r.shape[0] < width else r for r in rows]
    return make_grid(torch.cat(padded), nrow=width, padding=2, pad_value=1.0)


class _EpochSums:
    """Per-epoch sums kept on the device; read with one host transfer."""

    def __init__(self, device: torch.device) -> None:
        self.values = torch.zeros(5, dtype=torch.float64, device=device)  # elbo, kl, loglik, loss*n, sq err
        self.images = 0
        self.pixels = 0

    def add(self, elbo: Tensor, kl: Tensor, loglik: Tensor, loss: Tensor, sq_err: Tensor, x: Tensor) -> None:
        n = x.shape[0]
        batch = torch.stack([elbo.sum(), kl.sum(), loglik.sum(), loss * n, sq_err]).double()
        self.values += batch.detach()
        self.images += n
        self.pixels += x.numel()

    def read(self, prefix: str) -> dict[str, float]:
        elbo, kl, loglik, loss, sq = self.values.tolist()
        return {
            f"{prefix}_elbo": elbo / self.images,
            f"{prefix}_kl": kl / self.images,
            f"{prefix}_log_likelihood": loglik / self.images,
            f"{prefix}_loss": loss / self.images,
            f"{prefix}_mse_255": sq / self.pixels * 255.0**2,
        }


def _write_checkpoint(
    directory: Path,
    config: TrialConfig,
    model: VAE,
    optimiser: torch.optim.Optimizer,
    generator: torch.Generator,
    epoch: int,
    metrics: dict[str, float],
    val: DeviceSplit,
) -> None:
    grid_n = min(config.train.grid_size, len(val))
    model.eval()
    with torch.no_grad():
        x = val.take(torch.arange(grid_n, device=val.device))  # (n, C, H, W)
        mu, _ = model.encode(x)
        recon = model.likelihood.mean(model.decode(mu)).clamp(0, 1)
        samples = model.sample_prior(
            config.train.grid_size, generator=torch.Generator(val.device).manual_seed(config.train.seed)
        ).clamp(0, 1)
    with atomic_directory(directory) as tmp:
        torch.save(
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
            tmp / CHECKPOINT_FILE,
        )
        (tmp / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        save_image(_grid_pairs(x, recon), tmp / "reconstructions.png")
        save_image(samples, tmp / "samples.png", nrow=8, padding=2, pad_value=1.0)


def load_checkpoint(directory: str | Path, device: torch.device | str = "cpu") -> tuple[TrialConfig, VAE, dict]:
    """Rebuild a trained model from a checkpoint directory written by :func:`run_trial`.

    Returns:
        (config, model in eval mode on ``device``, the raw state dict with ``epoch`` etc.).
    """
    directory = Path(directory)
    config = TrialConfig.model_validate(yaml.safe_load((directory / "config.yaml").read_text()))
    state = torch.load(directory / CHECKPOINT_FILE, map_location=device, weights_only=False)
    model_state = state["model"]
    # The image shape is recoverable from the first encoder convolution and the decoder's resolution.
    channels = next(v for k, v in model_state.items() if k.startswith("encoder.0.weight")).shape[1]
    model = build_model(config, (channels, _resolution_of(model_state), _resolution_of(model_state)))
    model.load_state_dict(model_state)
    return config, model.to(device).eval(), state


def _resolution_of(model_state: dict[str, Tensor]) -> int:
    convs = [k for k in model_state if k.startswith("encoder.") and k.endswith(".weight") and model_state[k].dim() == 4]
    return 4 * 2 ** len(convs)


def run_trial(
    config: TrialConfig,
    report: ReportFn | None = None,
    workdir: str | Path = "trial",
    resume_from: str | Path | None = None,
) -> dict[str, float]:
    """Train one VAE and return the last epoch's metrics.

    Args:
        config: the resolved trial config (data directory, model, likelihood, training settings).
        report: called after every epoch with (metrics, checkpoint directory); a sweep forwards these to Ray
            Tune. It may raise to stop the run.
        workdir: where the checkpoint directory ``<workdir>/checkpoint`` is (re)written every epoch.
        resume_from: a checkpoint directory to continue from (same config).

    Returns:
        The final epoch's metrics (see the module docstring).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite in an epoch.
        FileNotFoundError / DataIntegrityError: the prepared data is missing or was modified.
    """
    train_cfg = config.train
    torch.set_num_threads(train_cfg.num_threads)
    torch.manual_seed(train_cfg.seed)
    device = select_device(train_cfg.device)
    generator = torch.Generator(device).manual_seed(train_cfg.seed)

    train = DeviceSplit(config.data_dir, "train", device)
    val = DeviceSplit(config.data_dir, "val", device)
    model = build_model(config, train.image_shape).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=train_cfg.lr)
    num_dims = math.prod(train.image_shape)

    start_epoch = 0
    if resume_from is not None:
        state = torch.load(Path(resume_from) / CHECKPOINT_FILE, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epoch"])

    checkpoint_dir = Path(workdir) / "checkpoint"
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, train_cfg.epochs):
        started = time.perf_counter()
        model.train()
        sums = _EpochSums(device)
        for x in train.batches(train_cfg.batch_size, shuffle=True, hflip=train_cfg.hflip, generator=generator):
            out = model(x, generator=generator)
            terms = elbo_terms(model.likelihood.log_prob(x, out["params"]), out["mu"], out["logvar"])
            loss = terms.loss(train_cfg.beta)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                sq_err = (model.likelihood.mean(out["params"]) - x).square().sum()
            sums.add(terms.elbo, terms.kl, terms.log_likelihood, loss, sq_err, x)
        metrics = sums.read("train")
        if not math.isfinite(metrics["train_loss"]):
            raise NonFiniteLossError(f"non-finite training loss at epoch {epoch + 1}: {metrics['train_loss']}")

        metrics |= evaluate_split(model, val, train_cfg.batch_size, seed=train_cfg.seed, prefix="val")
        metrics["val_bits_per_dim"] = float(bits_per_dim(-metrics["val_elbo"], num_dims))
        metrics["epoch"] = epoch + 1
        metrics["epoch_seconds"] = time.perf_counter() - started
        _write_checkpoint(checkpoint_dir, config, model, optimiser, generator, epoch + 1, metrics, val)
        if report is not None:
            report(dict(metrics), checkpoint_dir)
    return metrics


@torch.no_grad()
def evaluate_split(model: VAE, split: DeviceSplit, batch_size: int, seed: int, prefix: str) -> dict[str, float]:
    """ELBO, KL, log-likelihood (one seeded z per image) and MSE of E[x | mu(x)] over a whole split.

    Returns:
        ``{prefix}_elbo``, ``_kl``, ``_log_likelihood``, ``_loss`` (at beta = 1), ``_mse_255``.
    """
    model.eval()
    generator = torch.Generator(split.device).manual_seed(seed + 1)
    sums = _EpochSums(split.device)
    for x in split.batches(batch_size):
        out = model(x, generator=generator)
        terms = elbo_terms(model.likelihood.log_prob(x, out["params"]), out["mu"], out["logvar"])
        recon = model.likelihood.mean(model.decode(out["mu"]))
        sums.add(terms.elbo, terms.kl, terms.log_likelihood, terms.loss(1.0), (recon - x).square().sum(), x)
    return sums.read(prefix)
