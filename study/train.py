"""One training run (a sweep trial): ``run_trial(config, report)``.

Adam on the beta-ELBO (``study.objectives``), horizontal-flip augmentation, a seed for everything, the device
chosen automatically. The prepared splits are loaded once onto the device (``study.data.loader``); per-epoch
sums stay on the device and are read once per epoch, so the step never waits on the host.

After every epoch the run hands the epoch's metrics to ``report``, with a checkpoint directory (model and
optimiser state, RNG states, the resolved config, metrics and PNG grids of validation reconstructions and prior
samples) when one is due, else None: by time (``train.checkpoint_interval_s``; 0 = every epoch), at the epochs a
scheduler names (``checkpoint_epochs``) and always at the last epoch (:class:`CheckpointPolicy`). A checkpoint
costs a full state write and the grids' rendering, far more than a short epoch's compute, so writing one every
epoch dominated a sweep of short epochs. A run resumed from such a directory continues bit-for-bit where it
stopped.

The objective is -ELBO with beta on the KL (a number or a schedule over epochs), plus, when configured, the
variance minimiser alpha(epoch) * ||x - mu(z)||^2 (Dorta et al. 2018, Eq. 14) and minus the Gamma prior on the
precision diagonal (Eq. 13). Families with an alternating auxiliary step (the blur likelihood's kernel network)
get their own Adam optimiser, stepped after every VAE step on ``likelihood.auxiliary_loss``.

Speed options (``train.precision``, ``channels_last``, ``compile``; ``study.speed``) change how
:func:`training_step` runs the network, not what it computes: bf16 autocasts the network forward only, and
evaluation, the likelihood and the loss stay float32, so the reported metrics are float32 numbers whatever
the options. Each option is checked against the plain path in ``tests/test_speed.py``.

Metrics per epoch (nats per image unless named otherwise; ``*_mse_255`` is the per-pixel MSE on the [0, 255]
scale that Dorta et al. 2018 and Larsen et al. 2016 report, computed in RGB for YCbCr data: ``val_mse_255``
against the validation split's RGB before the conversion to YCbCr, as Dorta et al. measure it, so the chroma
downsampling error counts; ``train_mse_255`` against RGB rebuilt from the stored training YCbCr, as no RGB copy
of the training split is kept):
    train_elbo, train_kl, train_log_likelihood, train_loss, train_mse_255, beta, variance_minimiser_alpha (the
    structured likelihood only, Dorta et al. 2018, Eq. 14), val_elbo, val_kl, val_log_likelihood, val_mse_255,
    val_bits_per_dim, val_sharpness_ratio (variance of the Laplacian of reconstructions over that of the inputs;
    < 1 is blurrier), val_variance_loss (Asperti 2020: mean pixel variance across the split of inputs minus that
    of reconstructions, [0, 1] units), epoch, epoch_seconds.
For families that are not likelihoods (``elbo_valid`` false) the "log-likelihood" is minus their loss and the
"ELBO" is not one; the tracking layer tags such runs and reports never rank them by it.
The validation ELBO uses one z sample per image with a fixed seed (the same draws every epoch); the validation
MSE uses the reconstruction E[x | z = mu(x)].
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch import Tensor

from study.atomic import atomic_directory
from study.config import GammaPriorConfig, TrialConfig
from study.data.color import to_display_rgb, ycbcr_to_rgb
from study.data.loader import DeviceSplit
from study.likelihoods import build_likelihood
from study.metrics.pixel import laplacian_variance
from study.models.vae import VAE
from study.objectives import ElboTerms, bits_per_dim, elbo_terms, training_loss
from study.schedules import ConstantSchedule, Schedule, build_schedule
from study.speed import SpeedOptions, float32_context, prepare_model, to_memory_format, vae_forward

#: ``report(metrics, checkpoint directory or None)``: None on epochs without a checkpoint.
ReportFn = Callable[[dict[str, float], Path | None], None]
CHECKPOINT_FILE = "state.pt"


class TrainingDivergedError(RuntimeError):
    """Training left the regime it can recover from (the message names the reason, e.g. a discriminator
    collapse); the trial is recorded as failed with this message and is not retried (a retry from the same
    checkpoint and seed diverges again)."""


class NonFiniteLossError(TrainingDivergedError, FloatingPointError):
    """The training loss became NaN or infinite; the trial is recorded as failed with this message."""


def make_grid(images: Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> Tensor:
    """Images (B, C, H, W) (or one (C, H, W)) tiled ``nrow`` per row with ``padding`` pixels of ``pad_value``
    around each: (3, H', W') for C in {1, 3} (grey repeated to RGB), the layout of ``torchvision.utils.make_grid``
    without its normalisation options (tests/test_checkpoint_interval.py compares the two).

    Written here rather than imported because importing torchvision (which pulls in ``torch._dynamo``) was the
    largest part of a sweep worker's start-up.
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[0] == 1:
        return images[0]
    count, channels, h, w = images.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    grid = images.new_full((channels, (h + padding) * rows + padding, (w + padding) * columns + padding), pad_value)
    for k in range(count):
        y, x = divmod(k, columns)
        top, left = y * (h + padding) + padding, x * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = images[k]
    return grid


def save_image(images: Tensor, path: str | Path, nrow: int = 8, padding: int = 2, pad_value: float = 0.0,
               row_labels: Sequence[str] = (), tile_height: int | None = None) -> None:
    """Write images in [0, 1] (see :func:`make_grid`) as an 8-bit RGB PNG, rounded to the nearest level as
    ``torchvision.utils.save_image`` does.

    ``row_labels``: names written in a white margin left of the grid, one per grid row of tiles ``tile_height``
    pixels high (the labels repeat when there are more rows, e.g. ``("input", "recon")``), so the image says which
    row is which wherever it is viewed (the MLflow UI shows a PNG alone). The grid's own pixels are unchanged.
    """
    grid = make_grid(images.detach(), nrow=nrow, padding=padding, pad_value=pad_value)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    picture = Image.fromarray(np.ascontiguousarray(pixels))
    if row_labels:
        picture = _label_rows(picture, list(row_labels), tile_height or grid.shape[1] - 2 * padding, padding)
    picture.save(path)


def _label_rows(picture: Image.Image, labels: list[str], tile_height: int, padding: int) -> Image.Image:
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    draw = ImageDraw.Draw(picture)
    margin = max(int(draw.textlength(label, font=font)) for label in labels) + 8
    out = Image.new("RGB", (picture.width + margin, picture.height), "white")
    out.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(out)
    rows = max(1, (picture.height - padding) // (tile_height + padding))
    for row in range(rows):
        centre = padding + row * (tile_height + padding) + tile_height // 2
        draw.text((4, centre), labels[row % len(labels)], fill="black", font=font, anchor="lm")
    return out


class CheckpointPolicy:
    """When a run writes its checkpoint: at the last epoch, at ``epochs`` (1-based; a scheduler's needs), every
    epoch when ``interval_s`` is 0, and otherwise when the next epoch, taking as long as the last one did (from
    the previous call of :meth:`due` to this one, i.e. with its reporting), would end more than ``interval_s``
    seconds after the last checkpoint (or the run's start). A run killed at any moment then loses at most
    ``interval_s`` seconds of work while its epochs keep a steady length (at most one epoch where an epoch takes
    longer than ``interval_s``).

    ``clock``: seconds, monotonic (``time.monotonic`` unless a test gives another).
    """

    def __init__(self, interval_s: float, last_epoch: int, epochs: Collection[int] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self.last_epoch, self.epochs, self.clock = float(interval_s), last_epoch, set(epochs), clock
        self.since = self.previous = clock()

    def due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (1-based, just finished) writes a checkpoint; call once per epoch."""
        now = self.clock()
        cycle, self.previous = now - self.previous, now
        return (epoch >= self.last_epoch or epoch in self.epochs or self.interval_s <= 0
                or now - self.since + cycle > self.interval_s)

    def written(self) -> None:
        """The checkpoint was written: the next interval counts from now."""
        self.since = self.clock()


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


def build_model(
    config: TrialConfig, image_shape: tuple[int, int, int], color: str = "rgb", chroma_factor: int = 4
) -> VAE:
    """The VAE a trial config describes, for images of shape (C, H, W) in colour space ``color``.

    Raises:
        ValueError: non-square images; a Gamma prior on a family without a precision diagonal.
    """
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"the VAE expects square images, got {height} x {width}")
    likelihood = build_likelihood(
        config.likelihood, color=color, chroma_factor=chroma_factor, latent_dim=config.model.latent_dim
    )
    if config.model.frozen_mean_checkpoint is not None:
        if color == "ycbcr":  # the YCbCr wrapper interleaves luma and chroma parameters differently
            raise ValueError("model.frozen_mean_checkpoint is implemented for rgb and grey data, not ycbcr")
        from study.models.frozen_mean import FrozenMeanVAE

        model_class = FrozenMeanVAE
    else:
        model_class = VAE
    return model_class(
        likelihood,
        image_channels=channels,
        resolution=height,
        latent_dim=config.model.latent_dim,
        width=config.model.width,
    )


def _metric_space(x: Tensor, color: str) -> Tensor:
    """Images in the space pixel metrics are computed in: RGB for YCbCr data (comparable with RGB runs), else
    as stored (grey stays one channel)."""
    return ycbcr_to_rgb(x) if color == "ycbcr" else x


def _schedule(value) -> Schedule:
    return ConstantSchedule(float(value)) if isinstance(value, int | float) else build_schedule(value)


#: Row labels of ``reconstructions.png`` (:func:`_grid_pairs`' layout).
RECONSTRUCTION_ROWS = ("input", "recon")


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
    auxiliary: torch.optim.Optimizer | None,
    generator: torch.Generator,
    epoch: int,
    metrics: dict[str, float],
    val: DeviceSplit,
) -> None:
    grid_n = min(config.train.grid_size, len(val))
    model.eval()
    display = {}
    with torch.no_grad():
        x = val.take(torch.arange(grid_n, device=val.device))  # (n, C, H, W)
        mu, _ = model.encode(x)
        dist_params = model.decode(mu)
        recon = model.likelihood.mean(dist_params).clamp(0, 1)
        samples = model.sample_prior(
            config.train.grid_size, generator=torch.Generator(val.device).manual_seed(config.train.seed)
        ).clamp(0, 1)
        if hasattr(getattr(model.likelihood, "luma", model.likelihood), "sample_residual"):
            # Dorta et al. Fig. 1 / 7: the mean, one correlated residual draw eps (shown around grey 0.5) and
            # mu + eps; for YCbCr / grey data on the luma, which is what the structured likelihood models.
            eps = model.likelihood.sample_residual(
                dist_params, generator=torch.Generator(val.device).manual_seed(config.train.seed)
            )  # (n, 1 or C, H, W)
            mu_part = recon if val.color == "rgb" else recon[:, :1]
            rows = [mu_part, 0.5 + eps, mu_part + eps]
            rows = [r.clamp(0, 1).expand(-1, 3, -1, -1) for r in rows]
            display["sample_decomposition.png"] = make_grid(torch.cat(rows), nrow=grid_n, padding=2, pad_value=1.0)
    with atomic_directory(directory) as tmp:
        torch.save(
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "auxiliary_optimiser": auxiliary.state_dict() if auxiliary is not None else None,
                "image_shape": list(val.image_shape),
                "color": val.color,
                "chroma_factor": val.chroma_factor,
            },
            tmp / CHECKPOINT_FILE,
        )
        (tmp / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        h = x.shape[-2]
        save_image(_grid_pairs(to_display_rgb(x, val.color), to_display_rgb(recon, val.color)), tmp / "reconstructions.png",
                   row_labels=RECONSTRUCTION_ROWS, tile_height=h)
        save_image(to_display_rgb(samples, val.color), tmp / "samples.png", nrow=8, padding=2, pad_value=1.0,
                   row_labels=("sample",), tile_height=h)
        for name, grid in display.items():
            save_image(grid, tmp / name, row_labels=("mu", "eps+0.5", "mu+eps"), tile_height=h)


def load_checkpoint(directory: str | Path, device: torch.device | str = "cpu") -> tuple[TrialConfig, VAE, dict]:
    """Rebuild a trained model (a VAE, or an AVAE for ``model.kind: avae``) from a checkpoint directory written
    by :func:`run_trial`, or its slim copy in MLflow (``checkpoint/``: ``config.yaml`` + ``state.pt``).

    Returns:
        (config, model in eval mode on ``device``, the raw state dict with ``epoch`` etc.).
    """
    directory = Path(directory)
    config = TrialConfig.model_validate(yaml.safe_load((directory / "config.yaml").read_text()))
    if config.model.kind == "avae":
        from study.train_avae import load_avae_checkpoint

        return load_avae_checkpoint(directory, device)
    state = torch.load(directory / CHECKPOINT_FILE, map_location=device, weights_only=False)
    model = build_model(config, tuple(state["image_shape"]), state.get("color", "rgb"), state.get("chroma_factor", 1))
    model.load_state_dict(state["model"])
    return config, model.to(device).eval(), state


@dataclass
class StepResult:
    """What one training step leaves for the epoch sums, all on the device (reading them is the caller's
    choice; the step itself never synchronises with the host)."""

    terms: ElboTerms  # per-image log p(x | z) and KL, float32 (B,), nats
    loss: Tensor  # the optimised scalar (beta-ELBO loss plus Dorta et al.'s terms), float32
    mean: Tensor  # E[x | z], float32 (B, C, H, W), nominally in [0, 1]


def training_step(
    model: VAE,
    optimiser: torch.optim.Optimizer,
    x: Tensor,
    generator: torch.Generator | None,
    *,
    beta: float,
    alpha: float = 0.0,
    gamma: GammaPriorConfig | None = None,
    auxiliary: torch.optim.Optimizer | None = None,
    speed: SpeedOptions = SpeedOptions(),
) -> StepResult:
    """One optimiser step of the VAE on a batch: forward, loss, backward, Adam; then the auxiliary step.

    Args:
        model: the VAE, already passed through ``study.speed.prepare_model(model, speed)``.
        optimiser: steps the VAE's parameters (not the likelihood's auxiliary ones).
        x: images, float32 (B, C, H, W) in [0, 1], on the model's device (any memory format).
        generator: seeds the reparameterisation noise.
        beta: KL weight; alpha: variance-minimiser weight (0: off); gamma: a ``GammaPriorConfig`` or None.
        auxiliary: the optimiser of ``likelihood.auxiliary_parameters()`` (the blur kernel network), or None.
        speed: precision, memory format and compilation (``study.speed``). Under ``bf16`` only the network
            forward is autocast; the likelihood and the loss run in float32 with autocast off (see
            ``study.speed`` for why).

    Returns:
        The step's ELBO terms, loss and reconstruction mean (see :class:`StepResult`).
    """
    likelihood = model.likelihood
    x = to_memory_format(x, speed.channels_last)  # the likelihood sees the layout the decoder emits
    out = vae_forward(model, x, generator, speed)  # float32 outputs whatever the precision
    dist_params = out["dist_params"]
    with float32_context(x.device):
        terms = elbo_terms(likelihood.log_prob_given_z(x, dist_params, out["z"]), out["mu"], out["logvar"])
        mean = likelihood.mean(dist_params)
        loss = training_loss(
            terms, beta, x, mean, variance_minimiser_alpha=alpha,
            precision_diagonal=likelihood.precision_diagonal(dist_params) if gamma is not None else None,
            gamma_concentration=gamma.concentration if gamma else None,
            gamma_rate=gamma.rate if gamma else None,
        )
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    if auxiliary is not None:  # the alternating step (e.g. the blur kernel network), on detached inputs
        with float32_context(x.device):
            aux_loss = likelihood.auxiliary_loss(x, dist_params.detach(), out["z"].detach())
        auxiliary.zero_grad(set_to_none=True)
        aux_loss.backward()
        auxiliary.step()
    return StepResult(terms=terms, loss=loss, mean=mean)


def _frozen_mean_model(checkpoint: str, device: torch.device) -> VAE:
    """The trained Gaussian VAE a frozen-mean control starts from (``model.frozen_mean_checkpoint``).

    Raises:
        ValueError: an unresolved ``arm:<name>`` reference (only a sweep resolves those), or the checkpoint is
            not a Gaussian VAE.
        FileNotFoundError: the directory holds no checkpoint.
    """
    if checkpoint.startswith("arm:"):
        raise ValueError(f"model.frozen_mean_checkpoint {checkpoint!r} names a sweep arm: run it inside a sweep "
                         "(which resolves it to that arm's selected trial) or give a checkpoint directory")
    base_config, base, _ = load_checkpoint(checkpoint, device)
    if base_config.model.kind != "vae" or base_config.likelihood.family != "gaussian":
        raise ValueError(f"{checkpoint} is a {base_config.family} model; the frozen mean must be a Gaussian VAE's")
    return base


def run_trial(
    config: TrialConfig,
    report: ReportFn | None = None,
    workdir: str | Path = "trial",
    resume_from: str | Path | None = None,
    checkpoint_epochs: Collection[int] = (),
) -> dict[str, float]:
    """Train one VAE and return the last epoch's metrics.

    Args:
        config: the resolved trial config (data directory, model, likelihood, training settings).
        report: called after every epoch with (metrics, checkpoint directory or None when this epoch wrote
            none: see :class:`CheckpointPolicy`); a sweep forwards these to Ray Tune. It may raise to stop the run.
        workdir: where the checkpoint directory ``<workdir>/checkpoint`` is (re)written.
        resume_from: a checkpoint directory to continue from (same config).
        checkpoint_epochs: epochs (1-based) that always write a checkpoint besides the last one and those
            ``train.checkpoint_interval_s`` makes due (a sweep's PBT perturbation points, ASHA rungs).

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

    if config.model.kind == "avae":  # a different training scheme with its own loop (Plumerault et al. 2020)
        if not SpeedOptions.from_train_config(train_cfg).is_plain:
            # Its four-loss loop does not apply them; refusing beats a logged config that says bf16 for an
            # fp32 run.
            raise ValueError("train.precision / channels_last / compile are not implemented for model.kind avae")
        from study.train_avae import run_avae_trial

        return run_avae_trial(config, report, workdir=workdir, resume_from=resume_from,
                              checkpoint_epochs=checkpoint_epochs)

    train = DeviceSplit(config.data_dir, "train", device)
    val = DeviceSplit(config.data_dir, "val", device)
    model = build_model(config, train.image_shape, train.color, train.chroma_factor).to(device)
    if config.model.frozen_mean_checkpoint is not None and resume_from is None:
        model.load_mean_model(_frozen_mean_model(config.model.frozen_mean_checkpoint, device))
    speed = SpeedOptions.from_train_config(train_cfg)
    prepare_model(model, speed)  # in place: NHWC weights / lazy torch.compile; state-dict keys unchanged
    likelihood = model.likelihood
    auxiliary_params = {id(p) for p in likelihood.auxiliary_parameters()}
    optimiser = torch.optim.Adam([p for p in model.parameters() if id(p) not in auxiliary_params and p.requires_grad],
                                 lr=train_cfg.lr)
    auxiliary = (
        torch.optim.Adam(likelihood.auxiliary_parameters(), lr=train_cfg.lr) if auxiliary_params else None
    )
    num_dims = likelihood.num_dims(train.image_shape)
    beta_schedule = _schedule(train_cfg.beta)
    structured = config.likelihood.structured if config.likelihood.family == "structured" else None
    alpha_schedule = _schedule(structured.variance_minimiser_alpha) if structured and structured.variance_minimiser_alpha else None
    gamma = structured.gamma_prior if structured else None

    start_epoch = 0
    if resume_from is not None:
        state = torch.load(Path(resume_from) / CHECKPOINT_FILE, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if auxiliary is not None:
            auxiliary.load_state_dict(state["auxiliary_optimiser"])
        start_epoch = int(state["epoch"])

    checkpoint_dir = Path(workdir) / "checkpoint"
    policy = CheckpointPolicy(train_cfg.checkpoint_interval_s, train_cfg.epochs, checkpoint_epochs)
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, train_cfg.epochs):
        started = time.perf_counter()
        model.train()
        sums = _EpochSums(device)
        beta = beta_schedule(epoch)
        alpha = alpha_schedule(epoch) if alpha_schedule is not None else 0.0
        for x in train.batches(train_cfg.batch_size, shuffle=True, hflip=train_cfg.hflip, generator=generator):
            step = training_step(
                model, optimiser, x, generator, beta=beta, alpha=alpha, gamma=gamma, auxiliary=auxiliary,
                speed=speed,
            )
            with torch.no_grad():
                sq_err = (_metric_space(step.mean, train.color) - _metric_space(x, train.color)).square().sum()
            sums.add(step.terms.elbo, step.terms.kl, step.terms.log_likelihood, step.loss, sq_err, x)
        metrics = sums.read("train")
        metrics["beta"] = float(beta)
        if structured is not None:  # the variance minimiser exists only for the structured likelihood
            metrics["variance_minimiser_alpha"] = float(alpha)
        if not math.isfinite(metrics["train_loss"]):
            raise NonFiniteLossError(f"non-finite training loss at epoch {epoch + 1}: {metrics['train_loss']}")

        metrics |= evaluate_split(model, val, train_cfg.batch_size, seed=train_cfg.seed, prefix="val")
        metrics["val_bits_per_dim"] = float(bits_per_dim(-metrics["val_elbo"], num_dims))
        metrics["epoch"] = epoch + 1
        metrics["epoch_seconds"] = time.perf_counter() - started
        saved = None
        if policy.due(epoch + 1):
            _write_checkpoint(checkpoint_dir, config, model, optimiser, auxiliary, generator, epoch + 1, metrics, val)
            policy.written()
            saved = checkpoint_dir
        if report is not None:
            report(dict(metrics), saved)
    return metrics


@torch.no_grad()
def evaluate_split(model: VAE, split: DeviceSplit, batch_size: int, seed: int, prefix: str) -> dict[str, float]:
    """ELBO, KL, log-likelihood (one seeded z per image), and MSE, sharpness ratio and variance loss of the
    reconstructions E[x | mu(x)], over a whole split (streamed: per-pixel sums, never all images at once).

    Returns:
        ``{prefix}_elbo``, ``_kl``, ``_log_likelihood``, ``_loss`` (at beta = 1), ``_mse_255``,
        ``_sharpness_ratio``, ``_variance_loss``.
    """
    model.eval()
    generator = torch.Generator(split.device).manual_seed(seed + 1)
    sums = _EpochSums(split.device)
    shape = (3 if split.color == "ycbcr" else split.image_shape[0], *split.image_shape[1:])
    # Per-pixel first and second moments of inputs and reconstructions, and summed Laplacian variances.
    moments = torch.zeros(4, *shape, dtype=torch.float64, device=split.device)
    sharp = torch.zeros(2, dtype=torch.float64, device=split.device)
    for start in range(0, len(split), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split)), device=split.device)
        x = split.take(index)  # (B, C, H, W) model space
        out = model(x, generator=generator)
        terms = elbo_terms(model.likelihood.log_prob_given_z(x, out["dist_params"], out["z"]), out["mu"], out["logvar"])
        recon = model.likelihood.mean(model.decode(out["mu"]))
        # YCbCr: against the RGB before the conversion (Dorta et al. 2018), so the chroma downsampling error counts.
        x_m, recon_m = split.take_pixel_reference(index), _metric_space(recon, split.color)
        sq_err = (recon_m - x_m).square().sum()
        sums.add(terms.elbo, terms.kl, terms.log_likelihood, terms.loss(1.0), sq_err, x)
        xd, rd = x_m.double(), recon_m.clamp(0, 1).double()
        moments += torch.stack([xd.sum(0), xd.square().sum(0), rd.sum(0), rd.square().sum(0)])
        sharp += torch.stack([laplacian_variance(recon_m.clamp(0, 1)).double().sum(), laplacian_variance(x_m).double().sum()])
    metrics = sums.read(prefix)
    n = sums.images
    mean_x, sq_x, mean_r, sq_r = (moments / n).unbind(0)
    variance_x = (sq_x - mean_x.square()).mean()
    variance_r = (sq_r - mean_r.square()).mean()
    metrics[f"{prefix}_variance_loss"] = float(variance_x - variance_r)
    metrics[f"{prefix}_sharpness_ratio"] = float(sharp[0] / sharp[1]) if float(sharp[1]) > 0 else float("nan")
    return metrics
