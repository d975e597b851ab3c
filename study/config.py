"""Typed, validated view of ``params.yaml``.

Every stage reads its section through :func:`load_params`, so a typo, a negative ``beta`` or an unsupported
resolution fails at load time with the offending field named, before any data is touched. Unknown keys are
errors (``extra="forbid"``) because a silently ignored key is a silently wrong study.

The file has one section per DVC stage (``prepare``, ``sweep``, ``report``) plus the sections a trial is built
from (``model``, ``likelihood``, ``train``) and ``tracking``. A trial's configuration is :class:`TrialConfig`:
the trial sections with the sweep's sampled values applied (:func:`resolve_trial_config`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from study.schedules import ScheduleConfig

SUPPORTED_RESOLUTIONS = (32, 64)


class ConfigError(ValueError):
    """``params.yaml`` (or a sweep override) is invalid; the message names each offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- prepare
def _checksums_path(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("an empty path; give a sha256sum / md5sum list, or null")
    return value


def _checksums_file(root: Path, checksums: Path | None) -> Path | None:
    if checksums is not None:
        return checksums
    default = root / "SHA256SUMS"  # study.data.integrity.SUMS_FILE; config imports no data code
    return default if default.is_file() else None


class CelebADatasetConfig(_Strict):
    """CelebA's aligned-and-cropped release, prepared with Larsen et al. 2016's crop (``study.data.celeba``)."""

    kind: Literal["celeba"] = "celeba"
    # Folder holding ``img_align_celeba/`` and ``list_eval_partition.txt``.
    root: Path = Path("data/sample/celeba")
    # Defaults to ``<root>/list_eval_partition.txt``; the official file splits 162,770 / 19,867 / 19,962.
    partition_file: Path | None = None
    # A ``sha256sum`` / ``md5sum`` list of the images (names relative to the list's folder), verified before each
    # image is decoded (``study.data.integrity``). null: ``<root>/SHA256SUMS`` if present (the sample ships one).
    checksums: Path | None = None

    _checksums = field_validator("checksums", mode="before")(lambda v: _checksums_path(v))

    def checksums_file(self) -> Path | None:
        """The checksum list to verify: ``checksums``, else ``<root>/SHA256SUMS`` when it exists, else None."""
        return _checksums_file(self.root, self.checksums)


class LSUNDatasetConfig(_Strict):
    """An LSUN category (church_outdoor): train from ``<category>_train_lmdb`` with a held-out validation
    fraction, test from ``<category>_val_lmdb`` (LSUN's test labels are not public; Dorta et al. 2018)."""

    kind: Literal["lsun"] = "lsun"
    # Folder holding ``<category>_train_lmdb/`` and ``<category>_val_lmdb/`` (each data.mdb + lock.mdb).
    root: Path
    category: str = "church_outdoor"
    val_fraction: float = Field(default=0.05, gt=0.0, lt=1.0)
    seed: int = 0
    # A ``sha256sum`` / ``md5sum`` list of the LMDBs' ``data.mdb`` files (``<category>_train_lmdb/data.mdb``, ...,
    # relative to the list's folder), verified before they are opened. null: ``<root>/SHA256SUMS`` if present.
    checksums: Path | None = None

    _checksums = field_validator("checksums", mode="before")(lambda v: _checksums_path(v))

    def checksums_file(self) -> Path | None:
        """The checksum list to verify: ``checksums``, else ``<root>/SHA256SUMS`` when it exists, else None."""
        return _checksums_file(self.root, self.checksums)


class PatchesConfig(_Strict):
    """Seeded random square crops of each source image of a ``folder`` dataset (``study.data.folder``)."""

    size: int = Field(ge=1)  # side of each crop in source pixels, >= prepare.resolution; resized to it
    per_image: int = Field(default=1, ge=1)  # crops per source image
    seed: int = 0  # with each source's relative path, seeds that source's crop positions


class FolderSplitsConfig(_Strict):
    """Fractions of the source images (not of the crops) held out per split; train gets the rest."""

    val: float = Field(default=0.1, gt=0.0, lt=1.0)
    test: float = Field(default=0.1, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _train_left(self) -> "FolderSplitsConfig":
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test = {self.val + self.test:g} leaves no source images for train; keep it < 1")
        return self


class FolderDatasetConfig(_Strict):
    """Any folder of images (``*.jpg``, ``*.jpeg``, ``*.png``, recursive), split by source image, each image
    centre-cropped or cut into seeded patches, then resized (``study.data.folder``)."""

    kind: Literal["folder"] = "folder"
    root: Path
    splits: FolderSplitsConfig = FolderSplitsConfig()
    seed: int = 0  # seed of the split of the source images
    patches: PatchesConfig | None = None  # None: one centre square crop per image


DatasetConfig = Annotated[
    Union[CelebADatasetConfig, LSUNDatasetConfig, FolderDatasetConfig], Field(discriminator="kind")
]


class PrepareConfig(_Strict):
    """The ``prepare`` stages (one per entry of ``datasets``): raw images -> uint8 arrays per split + manifest."""

    resolution: int = 64
    # rgb: (N, H, W, 3). ycbcr (Dorta et al. 2018): Y at full resolution, Cb and Cr area-downsampled by
    # ``chroma_factor`` (16 x 16 for 64 x 64). grey: Y alone, the paper's setting for comparable NLLs.
    color: Literal["rgb", "ycbcr", "grey"] = "rgb"
    chroma_factor: int = Field(default=4, ge=1)
    # Dataset <name> is written to <output_root>/<name>.
    output_root: Path = Path("data/prepared")
    # Decoding processes; JPEG decoding + resizing is CPU bound and embarrassingly parallel.
    workers: int = Field(default=1, ge=1)
    # Skip undecodable images / LMDB records (counted and listed in the manifest) instead of stopping.
    skip_corrupt: bool = False

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v: int) -> int:
        if v not in SUPPORTED_RESOLUTIONS:
            raise ValueError(f"resolution {v} is not supported; choose one of {SUPPORTED_RESOLUTIONS}")
        return v

    @model_validator(mode="after")
    def _chroma_divides(self) -> "PrepareConfig":
        if self.color == "ycbcr" and self.resolution % self.chroma_factor:
            raise ValueError(f"chroma_factor {self.chroma_factor} must divide resolution {self.resolution}")
        return self


# ----------------------------------------------------------------------------------------------- trial
class AVAEConfig(_Strict):
    """Adversarial VAE (Plumerault et al. 2020; settings of the official code, ``AntoinePlumerault/AVAE``)."""

    # Weight of the latent reconstruction loss L_Z in the generator's objective (1 in the official code).
    latent_weight: float = Field(default=1.0, ge=0.0)
    generator_lr: float = Field(default=2e-4, gt=0.0)
    discriminator_lr: float = Field(default=2e-4, gt=0.0)
    adam_beta1: float = Field(default=0.5, ge=0.0, lt=1.0)
    # The official encoder's sigma is one learned global vector; True makes it a function of x.
    input_dependent_sigma: bool = False
    # Divergence guard: the trial fails when the discriminator loss stays below this for that many steps.
    collapse_loss: float = Field(default=1e-3, ge=0.0)
    collapse_steps: int = Field(default=200, ge=1)


class ModelConfig(_Strict):
    """The VAE. DCGAN-style convolutional encoder/decoder (Radford et al. 2016)."""

    # vae: encoder + decoder trained on the (beta-)ELBO; avae: adds a generator and a discriminator.
    kind: Literal["vae", "avae"] = "vae"
    latent_dim: int = Field(default=128, ge=1)  # Larsen et al. 2016 / Dorta et al. 2018 use 128 at 64x64
    # Channels of the first encoder block; doubled at every halving of the spatial size (DCGAN uses 64).
    width: int = Field(default=32, ge=4)
    avae: AVAEConfig = AVAEConfig()
    # The control of studies/reproduce (study.models.frozen_mean): a checkpoint directory of a trained Gaussian VAE
    # whose q(z | x) and mean are kept fixed while only the structured precision is learned, or "arm:<name>", the
    # selected trial of an earlier arm of the same sweep (resolved by the sweep driver). Structured family only.
    frozen_mean_checkpoint: str | None = None


class GaussianLikelihoodConfig(_Strict):
    """Factorised Gaussian p(x|z) = prod_i N(x_i; mu_i(z), sigma_i^2), images in [0, 1]."""

    # fixed: sigma = ``sigma`` for every pixel; learned_global: one learned sigma shared by all pixels and
    # images (the ``learned-gamma'' of Dai & Wipf / Asperti); per_pixel: the decoder predicts sigma_i(z).
    sigma_mode: Literal["fixed", "learned_global", "per_pixel"] = "learned_global"
    # Used as the value (fixed) or the initial value (learned_global), in [0, 1] image units.
    sigma: float = Field(default=0.1, gt=0.0)
    # Floor on predicted sigma: keeps the density bounded on 8-bit data (one grey level = 1/255 ~ 0.0039).
    min_sigma: float = Field(default=1e-3, gt=0.0)


class GammaPriorConfig(_Strict):
    """Gamma(concentration, rate) prior on the precision diagonal lambda_ii (Dorta et al. 2018, Eq. 13).

    Dorta et al. use it to prefer large diagonal precisions (a sharp mean that explains the data rather than a
    blurry mean plus a wide correlated residual); the paper does not print its alpha_G, beta_G. A Gamma density
    with concentration > 1 has its mode at (concentration - 1) / rate, in 1 / image-units^2; with
    concentration <= 1 it decreases in lambda, i.e. it penalises large precisions, the opposite of that aim, so
    it is rejected unless ``allow_decreasing`` is true. The defaults (2, 0.0025) put the mode at 400, a
    conditional standard deviation of 0.05 (12.75 grey levels), above the diagonal a structured model reaches
    on the embedded sample without a prior (median ~37 after 30 epochs at 32 x 32) and above the precision
    of Dorta's reported MSE (~700 on [0, 255], 1 / 0.104^2 ~ 92).
    """

    concentration: float = Field(default=2.0, gt=0.0)  # alpha_G (shape)
    rate: float = Field(default=0.0025, gt=0.0)  # beta_G (inverse scale), 1 / precision units
    # true: accept concentration <= 1 (a density decreasing in lambda, e.g. the exponential prior at 1)
    allow_decreasing: bool = False

    @model_validator(mode="after")
    def _mode_at_a_precision(self) -> "GammaPriorConfig":
        if self.concentration <= 1.0 and not self.allow_decreasing:
            raise ValueError(
                f"concentration = {self.concentration:g} <= 1 makes the Gamma prior decrease in lambda, which "
                "penalises large precisions (Dorta et al. 2018, Eq. 13 aims to favour them): use concentration > 1 "
                "(mode (concentration - 1) / rate), or set allow_decreasing: true to keep it"
            )
        return self

    @property
    def mode(self) -> float | None:
        """The prior's mode (concentration - 1) / rate, or None when the density has none inside (0, inf)."""
        return (self.concentration - 1.0) / self.rate if self.concentration > 1.0 else None


class StructuredLikelihoodConfig(_Strict):
    """Gaussian with a sparse Cholesky factor of the precision (Dorta et al. 2018, SUPN)."""

    neighbourhood_size: int = Field(default=3, ge=3)  # n_f, odd: L is non-zero inside n_f x n_f windows
    num_basis: int | None = Field(default=None, ge=1)  # n_b of the learned basis (Eq. 15); None = no basis
    dilations: list[int] | None = None  # e.g. [1, 2]: sum of 3 x 3 blocks at these rates (Fig. 5)
    # Dorta's training scheme for this model. Gamma prior on the precision diagonal, added to the bound
    # (Eq. 13); null: off.
    gamma_prior: GammaPriorConfig | None = None
    # Variance minimiser alpha * ||x - mu(z)||^2 added to -ELBO (Eq. 14); the paper's CelebA schedule is
    # {kind: step, initial: 5000, switch_epoch: 10, final: 10}. null: off.
    variance_minimiser_alpha: ScheduleConfig | None = None

    @field_validator("neighbourhood_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("neighbourhood_size must be odd")
        return v

    @model_validator(mode="after")
    def _dilations_need_3(self) -> "StructuredLikelihoodConfig":
        if self.dilations is not None and self.neighbourhood_size != 3:
            raise ValueError("dilations are sums of 3 x 3 blocks: set neighbourhood_size to 3")
        return self


class BlurLikelihoodConfig(_Strict):
    """Blur-error (Wiener-weighted) likelihood after Bredell et al. 2023 (a reconstruction, not a reproduction)."""

    kernel_size: int = Field(default=5, ge=1)
    wiener_c: float = Field(default=0.025, gt=0.0)
    eps: float = Field(default=1e-3, gt=0.0)
    # wiener_ls: closed-form least-squares kernel per batch; network: predicted from z, trained alternately.
    estimator: Literal["wiener_ls", "network"] = "wiener_ls"
    # Global noise scale s: precision lambda / s^2. fixed keeps s = noise_sigma; learned_global learns it.
    noise_mode: Literal["fixed", "learned_global"] = "learned_global"
    noise_sigma: float = Field(default=0.1, gt=0.0)

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("kernel_size must be odd")
        return v


class LaplaceLikelihoodConfig(_Strict):
    """Factorised Laplace p(x|z): the L1 loss as a normalised likelihood (still an ELBO)."""

    scale_mode: Literal["fixed", "learned_global", "per_pixel"] = "learned_global"
    scale: float = Field(default=0.1, gt=0.0)
    min_scale: float = Field(default=1e-3, gt=0.0)


class SSIMLossConfig(_Strict):
    """weight * (1 - SSIM) as the reconstruction term (not a likelihood: ``elbo_valid = false``)."""

    weight: float = Field(default=1000.0, gt=0.0)
    multiscale: bool = False


class FocalFrequencyLossConfig(_Strict):
    """Focal frequency loss (Jiang et al. 2021) as the reconstruction term (not a likelihood)."""

    weight: float = Field(default=1000.0, gt=0.0)
    alpha: float = Field(default=1.0, gt=0.0)


class PerceptualLossConfig(_Strict):
    """LPIPS (AlexNet, v0.1 heads) as the reconstruction term (not a likelihood); needs local weights."""

    weight: float = Field(default=1000.0, gt=0.0)
    # torchvision's alexnet-owt-7be5be79.pth; None looks in $TORCH_HOME/hub/checkpoints/.
    weights_path: Path | None = None


FAMILIES = ("gaussian", "structured", "blur", "laplace", "ssim", "ffl", "lpips")
Family = Literal["gaussian", "structured", "blur", "laplace", "ssim", "ffl", "lpips"]


class LikelihoodConfig(_Strict):
    """Which reconstruction likelihood p(x|z) a trial uses, and each family's own options.

    With YCbCr data the family models Y and a diagonal Gaussian (``gaussian`` options) models the downsampled
    Cb and Cr (Dorta et al. 2018, Eq. 8-12).
    """

    family: Family = "gaussian"
    gaussian: GaussianLikelihoodConfig = GaussianLikelihoodConfig()
    structured: StructuredLikelihoodConfig = StructuredLikelihoodConfig()
    blur: BlurLikelihoodConfig = BlurLikelihoodConfig()
    laplace: LaplaceLikelihoodConfig = LaplaceLikelihoodConfig()
    ssim: SSIMLossConfig = SSIMLossConfig()
    ffl: FocalFrequencyLossConfig = FocalFrequencyLossConfig()
    lpips: PerceptualLossConfig = PerceptualLossConfig()


class TrainConfig(_Strict):
    epochs: int = Field(default=6, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    # Weight of the KL term (Higgins et al. 2017); 1 is the true ELBO. ELBO is always *reported* at beta = 1.
    # A number, or a schedule over epochs, e.g. {kind: linear_warmup, start: 0, end: 1, warmup_epochs: 10}.
    beta: float | ScheduleConfig = 1.0
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    hflip: bool = True  # the only augmentation in Dorta et al. 2018
    # Intra-op threads per trial; several trials share a machine, so oversubscription costs more than it buys.
    num_threads: int = Field(default=1, ge=1)
    # Validation images shown in the reconstruction grid and number of prior samples in the sample grid.
    grid_size: int = Field(default=16, ge=1)
    # Speed options of the training step (study/speed.py); each is checked against the plain path in
    # tests/test_speed.py. Off by default: they pay on a GPU, not on a laptop CPU. bf16 autocasts the network
    # forward only; the likelihood, the loss and all reported metrics (validation included) stay float32.
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False  # NHWC weights and batches (faster convolutions on tensor cores)
    compile: bool = False  # torch.compile of the model forward (inductor; minutes of compilation on a CPU)
    # Seconds of training a killed trial may lose: a checkpoint (weights, optimiser, grids) is written when the
    # next epoch would end past this since the last one, and always at the last epoch and where the sweep's
    # scheduler needs one (PBT's perturbation interval, ASHA's rungs); 0 = every epoch. Metrics are reported
    # every epoch regardless.
    checkpoint_interval_s: float = Field(default=60.0, ge=0.0, allow_inf_nan=False)

    @field_validator("beta")
    @classmethod
    def _beta(cls, v):
        if isinstance(v, int | float) and v < 0:
            raise ValueError("beta must be >= 0")
        return v


class TrialConfig(_Strict):
    """Everything one training run needs; logged in full with every trial."""

    data_dir: Path = Path("data/prepared/celeba")
    model: ModelConfig = ModelConfig()
    likelihood: LikelihoodConfig = LikelihoodConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _frozen_mean_needs_structured(self) -> "TrialConfig":
        if self.model.frozen_mean_checkpoint is not None and (
                self.model.kind != "vae" or self.likelihood.family != "structured"):
            raise ValueError("model.frozen_mean_checkpoint (the frozen-mean control) needs model.kind vae and "
                             f"likelihood.family structured, got {self.model.kind} / {self.likelihood.family}")
        return self

    @property
    def family(self) -> str:
        """The arm's label in reports: ``avae`` for the adversarial model, else the likelihood family."""
        return "avae" if self.model.kind == "avae" else self.likelihood.family

    def digest(self) -> str:
        """sha256 (hex, 16 chars) of the canonical JSON of this config: a trial's reproducibility key."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- sweep
class SearchDimension(_Strict):
    """One searched hyperparameter, addressed by its dotted path in the trial config (``train.beta``)."""

    distribution: Literal["uniform", "loguniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    choices: list[Any] | None = None
    # Only sampled when every listed path (already sampled or from the base config) has one of the values:
    # a define-by-run, conditional space (e.g. structured-only dimensions).
    when: dict[str, list[Any]] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> "SearchDimension":
        if self.distribution == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs a non-empty 'choices' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.distribution} dimension needs 'low' and 'high'")
            if not self.low < self.high:
                raise ValueError(f"'low' ({self.low}) must be below 'high' ({self.high})")
            if self.distribution == "loguniform" and self.low <= 0:
                raise ValueError("a loguniform dimension needs 'low' > 0")
        return self


class SearcherConfig(_Strict):
    """How trial configs are proposed.

    optuna: Optuna on the driver (define-by-run space, ``when`` conditions, multi-objective ``objectives``).
    random: Tune's own random sampling of the same space (no ``when``); the only choice with ``pbt``, which
    Ray does not combine with a search algorithm.
    """

    kind: Literal["optuna", "random"] = "optuna"
    # nsga2: Optuna's NSGA-II, the usual multi-objective sampler (TPE handles several objectives as well).
    sampler: Literal["tpe", "random", "nsga2"] = "tpe"
    seed: int = 0
    # An Optuna RDB storage URL (SQLAlchemy form: sqlite:///optuna.db, postgresql://user@host/db), a relative
    # SQLite path being relative to the repository root; null: in memory. Holds one study per arm, named
    # <sweep.name>-<arm>, written by the driver alone (`optuna-dashboard <url>` shows a live sweep).
    storage: str | None = None

    @field_validator("storage")
    @classmethod
    def _storage_is_an_rdb_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError as err:
            raise ValueError(f"not an RDB URL (e.g. sqlite:///optuna.db): {value!r}") from err
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            raise ValueError("an in-memory SQLite storage is not visible to a dashboard; use null, or a file "
                             "(sqlite:///optuna.db)")
        return value

    @model_validator(mode="after")
    def _storage_needs_optuna(self) -> "SearcherConfig":
        if self.storage is not None and self.kind != "optuna":
            raise ValueError("storage is Optuna's: it needs kind optuna")
        return self


# Mutating these would change the network's shapes, the data or the run's length under a restored
# checkpoint; train.lr would be overwritten by the optimiser state the checkpoint restores.
NOT_MUTABLE = ("model.", "data_dir", "likelihood.family", "train.epochs", "train.lr")


class SchedulerConfig(_Strict):
    """Early stopping (asha), none (fifo) or population-based training (pbt) over ``train.epochs``."""

    kind: Literal["asha", "fifo", "pbt"] = "asha"
    grace_period: int = Field(default=1, ge=1)  # asha: epochs every trial gets before it can be stopped
    reduction_factor: float = Field(default=2.0, gt=1.0)  # asha
    # pbt: every this many epochs a trial in the bottom quantile copies the checkpoint of one in the top
    # quantile and continues with mutated values of ``mutations`` (dotted path -> distribution or choices).
    perturbation_interval: int = Field(default=2, ge=1)
    quantile_fraction: float = Field(default=0.25, gt=0.0, le=0.5)
    resample_probability: float = Field(default=0.25, ge=0.0, le=1.0)
    mutations: dict[str, SearchDimension] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _mutations(self) -> "SchedulerConfig":
        if self.kind == "pbt" and not self.mutations:
            raise ValueError("scheduler.kind pbt needs 'mutations' (dotted path -> distribution)")
        if self.kind != "pbt" and self.mutations:
            raise ValueError(f"'mutations' only apply to scheduler.kind pbt, not {self.kind}")
        for path, dim in self.mutations.items():
            if dim.when:
                raise ValueError(f"mutation {path!r}: 'when' is not supported for PBT mutations")
            if any(path == p or path.startswith(p) for p in NOT_MUTABLE):
                raise ValueError(f"mutation {path!r}: PBT cannot mutate model.*, data_dir, likelihood.family, "
                                 "train.epochs or train.lr under a restored checkpoint")
        return self


class ResourcesConfig(_Strict):
    cpu: float = Field(default=1.0, gt=0.0)
    # GPUs per trial. A fraction packs several trials on one GPU (Ray's fractional GPUs: 0.25 = four trials per
    # GPU, each seeing the same device); above 1 it must be whole. 0 hides every GPU from the trials (Ray sets
    # CUDA_VISIBLE_DEVICES to empty), so trials train on CPU even on a GPU machine.
    gpu: float = Field(default=0.0, ge=0.0)
    # Ray custom resources per trial, e.g. {node_a: 1} with `ray start --resources='{"node_a": 1}'`.
    custom: dict[str, float] = Field(default_factory=dict)

    @field_validator("gpu")
    @classmethod
    def _ray_gpu_amount(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"gpu above 1 must be a whole number of GPUs (Ray's rule), got {v}")
        return v

    @field_validator("custom")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if amount <= 0:
                raise ValueError(f"custom resource {name!r} must be > 0, got {amount}")
        return v


class ObjectiveConfig(_Strict):
    """One objective of a multi-objective search: a per-epoch metric and its direction."""

    metric: str
    mode: Literal["min", "max"]


class VariantConfig(_Strict):
    """One arm of a comparison sweep: trial-config overrides and, optionally, its own selection metric."""

    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted path -> value, e.g. {model.kind: avae}
    metric: str | None = None  # default: sweep.metric (an AVAE has no ELBO: select it by val_mse_255)
    mode: Literal["min", "max"] | None = None


class SweepConfig(_Strict):
    name: str = "celeba-gaussian"
    dataset: str = "celeba"  # which entry of ``datasets`` the trials train on
    num_trials: int = Field(default=6)
    max_concurrent: int = Field(default=2, ge=1)
    resources_per_trial: ResourcesConfig = ResourcesConfig()
    metric: str = "val_elbo"
    mode: Literal["min", "max"] = "max"
    searcher: SearcherConfig = SearcherConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    # Arms compared with equal budgets: one search of ``num_trials`` per arm under the same parent run.
    # ``families`` is shorthand for variants that only set likelihood.family; ``variants`` can set anything
    # (e.g. model.kind: avae) and pick their own metric. Neither: search the base config alone.
    families: list[Family] = Field(default_factory=list)
    variants: dict[str, VariantConfig] = Field(default_factory=dict)
    search_space: dict[str, SearchDimension] = Field(default_factory=dict)
    # Multi-objective search (Optuna), e.g. [{metric: val_mse_255, mode: min}, {metric: val_sharpness_ratio,
    # mode: max}]: the report draws the Pareto front. ASHA stops trials by the first objective; ``metric``
    # still picks the best trial per arm. Empty: single-objective search on ``metric``.
    objectives: list[ObjectiveConfig] = Field(default_factory=list)
    # Times a trial is restarted from its last checkpoint after it fails (a lost worker or node, an
    # exception; a deterministic error such as a non-finite loss simply fails again). -1: without limit.
    max_failures: int = Field(default=1, ge=-1)
    # A finished trial's worker process (torch and the study already imported) runs the next trial, saving the
    # seconds of a fresh process per trial. false: a fresh process each time, which also lets Ray place every
    # trial anew (with reuse, a node that is slow to start its first worker may run none of a short sweep).
    reuse_actors: bool = True
    # Ray Tune's results (checkpoints, experiment state), relative to the working directory; an unfinished
    # sweep found here with the same parameters is resumed. On a multi-node cluster: a path every node mounts.
    storage_path: Path = Path("ray_results")
    # How long the driver keeps trying to start (or join) Ray before it gives up with one clear line. Ray itself
    # waits a fixed 30 s per attempt for its raylet; on a loaded machine a second attempt usually succeeds.
    ray_start_timeout_s: float = Field(default=120.0, ge=0.0)
    output: Path = Path("results/sweep.json")

    @field_validator("num_trials")
    @classmethod
    def _trials(cls, v: int) -> int:
        if v < 1:
            raise ValueError("num_trials must be at least 1")
        return v

    @model_validator(mode="after")
    def _one_way_to_compare(self) -> "SweepConfig":
        if self.families and self.variants:
            raise ValueError("give either sweep.families or sweep.variants, not both")
        return self

    @model_validator(mode="after")
    def _search_combination(self) -> "SweepConfig":
        if self.objectives:
            names = [o.metric for o in self.objectives]
            if len(names) < 2 or len(set(names)) != len(names):
                raise ValueError("objectives: give two or more different metrics (one objective: use metric/mode)")
            if self.searcher.kind != "optuna":
                raise ValueError("objectives need searcher.kind optuna (multi-objective search)")
            if self.scheduler.kind == "pbt":
                raise ValueError("objectives cannot be combined with scheduler.kind pbt (PBT ranks by one metric)")
            if any(v.metric for v in self.variants.values()):
                raise ValueError("with objectives, variants cannot set their own metric")
        if self.scheduler.kind == "pbt" and self.searcher.kind != "random":
            raise ValueError("scheduler.kind pbt needs searcher.kind random: Ray runs PBT without a search "
                             "algorithm, sampling the initial population from search_space itself")
        if self.searcher.kind == "random" and (conditional := [p for p, d in self.search_space.items() if d.when]):
            raise ValueError(f"searcher.kind random cannot sample conditional ('when') dimensions: {conditional}")
        return self

    def check_paths(self, base: "TrialConfig") -> None:
        """Raise ConfigError unless every search and mutation path exists in the trial config ``base``."""
        tree = base.model_dump()
        for path in [*self.search_space, *self.scheduler.mutations]:
            try:
                _get_path(tree, path, what=f"sweep key {path!r}")
            except ValueError as err:
                raise ConfigError(str(err)) from None

    def arms(self, base_family: str) -> dict[str, VariantConfig]:
        """The sweep's arms: name -> variant (a single arm named after the base family when none are given)."""
        if self.variants:
            return dict(self.variants)
        families = self.families or [base_family]
        return {f: VariantConfig(overrides={"likelihood.family": f}) for f in families}


class TrackingConfig(_Strict):
    # ``MLFLOW_TRACKING_URI`` in the environment wins over this value.
    uri: str = "sqlite:///mlflow.db"
    artifact_root: Path = Path("mlartifacts")
    experiment: str = "vae-blur-study"
    # MLflow system metrics (system/cpu_utilization_percentage, memory, GPU utilisation and memory) of each
    # trial's node, sampled in its Ray worker every system_metrics_interval_s seconds (study.system_metrics).
    system_metrics: bool = False
    system_metrics_interval_s: float = Field(default=10.0, gt=0)
    # Seconds the tracking store may stay unreachable during a sweep (trials train on, their logs queued) before
    # the sweep stops with an error; the re-run then brings MLflow up to date from Ray's results.
    outage_budget_s: float = Field(default=600.0, gt=0)


class ReplicateConfig(_Strict):
    """The ``replicate`` stage: the best trial of every sweep arm trained again with fresh seeds (``study.replicate``).

    The seeds never include the best trial's own ``train.seed`` (the search seed): the search picked that trial
    partly for its seed's luck, so only fresh seeds estimate its configuration without the selection's bias.
    """

    # Fresh seeds per arm; 0: the stage writes an empty ``arms`` mapping without starting Ray or MLflow.
    num_seeds: int = Field(default=3, ge=0)
    # Explicit seeds (exactly num_seeds, distinct); null: search seed + 1000 + k for k = 0 .. num_seeds - 1.
    seeds: list[int] | None = None
    output: Path = Path("results/replicates.json")

    @model_validator(mode="after")
    def _explicit_seeds(self) -> "ReplicateConfig":
        if self.seeds is not None:
            if len(self.seeds) != self.num_seeds:
                raise ValueError(f"seeds lists {len(self.seeds)} seeds but num_seeds is {self.num_seeds}")
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"seeds must be distinct, got {self.seeds}")
        return self

    def seeds_for(self, search_seed: int) -> list[int]:
        """The replicate seeds of a trial searched with ``train.seed = search_seed``.

        Raises:
            ConfigError: an explicit ``seeds`` list contains ``search_seed``.
        """
        if self.seeds is None:
            return [search_seed + 1000 + k for k in range(self.num_seeds)]
        if search_seed in self.seeds:
            raise ConfigError(f"replicate.seeds {self.seeds} contains {search_seed}, the seed (train.seed) the best "
                              "trial was searched with; replicates need fresh seeds (drop it, or use seeds: null)")
        return list(self.seeds)

    def seeds_rule(self) -> str:
        """How the seeds were chosen, in words (written to the stage's output)."""
        if self.seeds is None:
            return "search seed + 1000 + k, k = 0 .. num_seeds - 1 (the best trial's train.seed excluded)"
        return f"explicit replicate.seeds {self.seeds} (the best trial's train.seed excluded)"


class EvaluateConfig(_Strict):
    """The ``evaluate`` stage: the best trial of each sweep arm re-evaluated on one split with every metric."""

    split: Literal["test", "val"] = "test"
    # K of the importance-weighted NLL bound (Burda et al. 2016); Dorta et al. use 500 (a GPU setting).
    num_importance_samples: int = Field(default=100, ge=1)
    batch_size: int = Field(default=64, ge=1)
    iwae_batch_size: int = Field(default=1024, ge=1)  # latent codes decoded per call in the IWAE bound
    num_recon_passes: int = Field(default=1, ge=1)  # 1: z = mu(x); > 1: stochastic z (Dorta's scripts used 25)
    seed: int = 0
    # Local backbone weights (nothing is downloaded): torchvision's alexnet-owt-7be5be79.pth for LPIPS and
    # inception_v3_google-0cc3c7bd.pth for FID; null also looks in $TORCH_HOME/hub/checkpoints/. Missing
    # weights make the metric "unavailable" with the reason, never a number from a random network.
    lpips_weights: Path | None = None
    inception_weights: Path | None = None
    num_fid_samples: int | None = Field(default=None, ge=2)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_examples: int = Field(default=8, ge=1)  # images per arm kept for the report's figures
    output_dir: Path = Path("reports/evaluation")


class ClaimsConfig(_Strict):
    """Which arms play which part in the published claims a study tests (``study.report_claims``)."""

    gaussian: str  # Dorta et al.'s VAE baseline: the factorised (per-pixel) Gaussian
    structured: list[str] = Field(default_factory=list)  # structured residual arms
    beta_vae: str | None = None  # a fixed beta > 1, evaluated at beta = 1
    blur: str | None = None  # the blur-error likelihood (Bredell et al. 2023)
    control: str | None = None  # the structured precision on the frozen Gaussian mean (study.models.frozen_mean)

    def arms(self) -> list[str]:
        return [a for a in (self.gaussian, *self.structured, self.beta_vae, self.blur, self.control) if a]


class ReportConfig(_Strict):
    output_dir: Path = Path("reports")
    claims: ClaimsConfig | None = None  # null: no claims table
    # The arm every other arm is compared with, image by image, in the seed-replicate report (paired NLL / MSE
    # differences). null: the first arm whose family is gaussian. A name must be one of the sweep's arms.
    baseline: str | None = None


class StudyParams(_Strict):
    """The whole ``params.yaml``."""

    # Datasets to prepare, one DVC stage each (``prepare@<name>``). List only those whose raw data you have.
    datasets: dict[str, DatasetConfig] = Field(default_factory=lambda: {"celeba": CelebADatasetConfig()})
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    likelihood: LikelihoodConfig = LikelihoodConfig()
    train: TrainConfig = TrainConfig()
    sweep: SweepConfig = SweepConfig()
    tracking: TrackingConfig = TrackingConfig()
    replicate: ReplicateConfig = ReplicateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _dataset_is_listed(self) -> "StudyParams":
        if self.sweep.dataset not in self.datasets:
            raise ValueError(f"sweep.dataset {self.sweep.dataset!r} is not one of datasets: {sorted(self.datasets)}")
        return self

    @model_validator(mode="after")
    def _baseline_is_an_arm(self) -> "StudyParams":
        arms = self.sweep.arms(self.likelihood.family)
        if self.report.baseline is not None and self.report.baseline not in arms:
            raise ValueError(f"report.baseline {self.report.baseline!r} is not one of the sweep's arms: {sorted(arms)}")
        if self.report.claims is not None and (unknown := [a for a in self.report.claims.arms() if a not in arms]):
            raise ValueError(f"report.claims names arms the sweep does not have: {unknown} (arms: {sorted(arms)})")
        return self

    @model_validator(mode="after")
    def _cuda_trials_get_a_gpu(self) -> "StudyParams":
        if self.train.device == "cuda" and self.sweep.resources_per_trial.gpu == 0:
            raise ValueError("train.device is 'cuda' but sweep.resources_per_trial.gpu is 0, so Ray hides every "
                             "GPU from the trials; give each trial a GPU share, e.g. gpu: 0.25 for four per GPU")
        return self

    @model_validator(mode="after")
    def _patches_cover_resolution(self) -> "StudyParams":
        for name, dataset in self.datasets.items():
            patches = getattr(dataset, "patches", None)
            if patches is not None and patches.size < self.prepare.resolution:
                raise ValueError(f"datasets.{name}.patches.size {patches.size} is smaller than prepare.resolution "
                                 f"{self.prepare.resolution}; crops are only ever shrunk to the resolution")
        return self

    def dataset_dir(self, name: str | None = None) -> Path:
        """Where dataset ``name`` (default: the sweep's) is prepared: ``<prepare.output_root>/<name>``."""
        return self.prepare.output_root / (name or self.sweep.dataset)

    @model_validator(mode="after")
    def _search_paths_exist(self) -> "StudyParams":
        base = self.base_trial_config()
        tree = base.model_dump()
        for path in self.sweep.search_space:
            _get_path(tree, path, what=f"sweep.search_space key {path!r}")
        for name, variant in self.sweep.variants.items():
            try:
                resolve_trial_config(base, variant.overrides)
            except ConfigError as err:
                raise ValueError(f"sweep.variants.{name}: {err}") from None
        return self

    def base_trial_config(self) -> TrialConfig:
        return TrialConfig(
            data_dir=self.dataset_dir(), model=self.model, likelihood=self.likelihood, train=self.train
        )


# ------------------------------------------------------------------------------------------- functions
def absolute_sqlite_url(uri: str, cwd: str | Path) -> str:
    """``uri`` with a relative SQLite path (``sqlite:///mlflow.db``) made absolute against ``cwd``; other URLs
    (an absolute ``sqlite:////...``, ``http://...``, ``postgresql://...``) unchanged. A relative SQLite path
    means relative to the working directory of whoever opens it; a Ray worker (which runs in its trial's
    directory) or a DVC experiment's temporary copy needs it made absolute first."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = uri[len(prefix):]
    if path.startswith("/") or path in ("", ":memory:"):
        return uri
    return prefix + str((Path(cwd) / path).resolve())


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see params.yaml in the repository for every key)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> StudyParams:
    """Validate an already-parsed params mapping.

    Raises:
        ConfigError: naming every invalid or unknown field, e.g. ``train.beta: ... must be >= 0``.
    """
    try:
        return StudyParams.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> StudyParams:
    """Read and validate ``params.yaml``.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: invalid YAML, an unknown key, or an out-of-range value (the message names the field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} not found (run from the repository root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, source=str(path))


def _get_path(tree: dict[str, Any], dotted: str, what: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"{what}: no such field in the trial config")
        node = node[part]
    return node


def get_path(config: TrialConfig, dotted: str) -> Any:
    """The value at a dotted path (``likelihood.family``) of a trial config."""
    return _get_path(config.model_dump(), dotted, what=dotted)


def resolve_trial_config(base: TrialConfig, overrides: dict[str, Any]) -> TrialConfig:
    """Apply a sweep's sampled values (dotted path -> value) to the base trial config and re-validate.

    Raises:
        ConfigError: an override names a missing field or gives an invalid value.
    """
    tree = base.model_dump()
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = tree
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"override {dotted!r}: no such field in the trial config")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {dotted!r}: no such field in the trial config")
        node[parts[-1]] = value
    try:
        return TrialConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, "trial overrides")) from None
