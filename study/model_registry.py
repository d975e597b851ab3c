"""Trained models as MLflow models: the selected trial of every sweep arm (and every finished seed replicate of
it) logged with ``mlflow.pytorch.log_model`` into its own run and registered as ``<experiment>-<arm>`` in the
MLflow model registry, the selected trial under the alias ``champion`` and replicates under ``seed-<seed>``
(registry aliases; the deprecated stages are not used).

Anyone with MLflow and torch loads one without this repository::

    model = mlflow.pytorch.load_model("models:/vae-blur-study-gaussian@champion")
    x_hat = model.reconstruct(x)          # x: float32 (B, C, H, W) in [0, 1]
    samples = model.sample(16)            # float32 (16, C, H, W)

How the classes load: the logged module is a pickled :class:`ServableModel` around the trained network, and its
classes live in the ``study`` package, so the model is logged with ``code_paths`` holding a copy of that package's
sources (``code/study`` in the model's artifacts). MLflow puts ``code/`` on ``sys.path`` when it loads the model,
so no checkout, ``state.pt`` or ``study.train.load_checkpoint`` is needed; the package's third-party imports
(torch, numpy, pydantic, PyYAML) are the model's ``requirements.txt``. The module is saved in MLflow's
``serialization_format="pickle"``, not its default ``pt2`` (a ``torch.export`` graph of ``forward`` only, which
would lose ``sample`` and the other methods); like any pickle, load only models from a store you trust.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

CHAMPION = "champion"
ARTIFACT_NAME = "model"
#: Run tag naming the registered version logged from that run (``<name>/<version>``): a re-run reuses it.
VERSION_TAG = "registered_model_version"


class ServableModel(nn.Module):
    """A trained VAE or AVAE with the image-level API a user needs, as one picklable ``nn.Module``.

    ``forward(x)`` is ``reconstruct(x)`` (what ``pyfunc`` serving and the model signature describe).

    Args:
        model: the trained network (``study.models.vae.VAE`` or ``study.models.avae.AVAE``), in eval mode.
        color: its images' colour space, ``rgb`` / ``ycbcr`` / ``grey`` (inputs and outputs are in it).
        family: the reconstruction likelihood's family name (e.g. ``gaussian``, ``structured``).
        image_shape: (C, H, W) of its images.
    """

    def __init__(self, model: nn.Module, color: str, family: str, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.model = model.eval()
        self.color = color
        self.family = family
        self.image_shape = tuple(int(v) for v in image_shape)

    @property
    def is_vae(self) -> bool:
        return hasattr(self.model, "likelihood")

    @property
    def has_residual(self) -> bool:
        """Whether the likelihood draws correlated residuals (the structured family, Dorta et al. 2018)."""
        return self.is_vae and callable(getattr(self.model.likelihood, "sample_residual", None))

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reconstructions of ``x``.

        Args:
            x: float32 (B, C, H, W) in [0, 1], in the model's colour space, C, H, W = ``image_shape``.
            generator: the AVAE's noise (its reconstruction is stochastic); unused by a VAE.

        Returns:
            float32 (B, C, H, W): a VAE's E[x | z = mu(x)] (the likelihood's mean at the posterior mean, nominally
            in [0, 1]); an AVAE's G([mu + sigma eps, xi]) in (0, 1) (Plumerault & Le Borgne's reconstruction).

        Raises:
            ValueError: ``x`` is not (B, C, H, W) of the model's image shape.
        """
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        x = x.to(self._device(), torch.float32)
        if self.is_vae:
            return self.model.likelihood.mean(self.model.decode(self.model.encode(x)[0]))
        return self.model.reconstruct_generator(x, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples of the generative model, float32 (n, C, H, W): a VAE's E[x | z] with z ~ N(0, I)
        (nominally in [0, 1]), an AVAE's G([z, xi]) in (0, 1). ``generator`` must be on the model's device."""
        if self.is_vae:
            return self.model.sample_prior(n, generator=generator)
        return self.model.sample(n, generator=generator)

    @torch.no_grad()
    def residual_samples(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(mu, eps, mu + eps) of p(x | z) for latents ``z`` (B, latent_dim): the mean, a correlated residual
        eps ~ N(0, Lambda(z)^{-1}) and their sum, each float32 (B, C, H, W) in image units (Dorta et al. 2018,
        Figs. 1 and 7). With YCbCr data the residual is the luma's; it is added to Y only.

        Raises:
            AttributeError: the likelihood has no correlated residual (:attr:`has_residual` is False).
        """
        if not self.has_residual:
            raise AttributeError(f"the {self.family} likelihood has no correlated residual samples")
        dist_params = self.model.decode(z.to(self._device(), torch.float32))
        mu = self.model.likelihood.mean(dist_params)
        eps = self.model.likelihood.sample_residual(dist_params, generator=generator)
        if eps.shape[1] < mu.shape[1]:  # YCbCr: residual of Y alone
            eps = torch.cat([eps, torch.zeros_like(mu[:, eps.shape[1]:])], dim=1)
        return mu, eps, mu + eps

    @torch.no_grad()
    def encode_mean(self, x: Tensor) -> Tensor:
        """mu(x) of q(z | x), float32 (B, latent_dim); ``x`` as in :meth:`reconstruct`."""
        return self.model.encode(x.to(self._device(), torch.float32))[0]

    @torch.no_grad()
    def to_rgb(self, x: Tensor) -> Tensor:
        """Images of the model's colour space as displayable RGB, float32 (B, 3, H, W) clipped to [0, 1]."""
        from study.data.color import to_display_rgb

        return to_display_rgb(x.float().clamp(0, 1), self.color)


def servable_from_checkpoint(directory: str | Path, device: torch.device | str = "cpu") -> ServableModel:
    """A :class:`ServableModel` from a trial checkpoint directory (``checkpoint/`` of an MLflow run)."""
    from study.train import load_checkpoint

    config, model, state = load_checkpoint(directory, device)
    shape = tuple(state.get("image_shape") or (model.image_channels, model.resolution, model.resolution))
    return ServableModel(model, state.get("color", "rgb"), config.family, shape)


def _code_copy(into: Path) -> Path:
    """The ``study`` package's sources (no caches) under ``into/study``, for ``code_paths``."""
    import study

    source = Path(study.__file__).resolve().parent
    target = into / "study"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _requirements() -> list[str]:
    import mlflow
    import numpy
    import pydantic
    import yaml

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={numpy.__version__}", f"pydantic=={pydantic.__version__}", f"pyyaml=={yaml.__version__}"]


@contextmanager
def fluent_store(uri: str):
    """Point MLflow's fluent API (``start_run``, ``log_model``, ``load_model("models:/...")``) at the store
    ``uri`` (tracking and registry) for the block, then put back what was there.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` are process-wide and exported to child processes
    (``MLFLOW_TRACKING_URI``, ``MLFLOW_REGISTRY_URI``, which this project also reads), so without the restore a
    process that touched one store would send its later runs and sub-processes there.
    """
    import mlflow

    # set_*_uri keep these variables equal to MLflow's own globals.
    previous = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous["MLFLOW_TRACKING_URI"])  # None unsets it
        mlflow.set_registry_uri(previous["MLFLOW_REGISTRY_URI"])
        if previous["MLFLOW_REGISTRY_URI"] is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)  # set_registry_uri(None) leaves the variable


def log_servable(run_id: str, servable: ServableModel, example: Tensor, tracking_uri: str):
    """Log ``servable`` with ``mlflow.pytorch.log_model`` into run ``run_id`` (artifact ``model``), with the
    input example ``example`` (float32 (1, C, H, W) in [0, 1]), the signature inferred from it and the ``study``
    sources as ``code_paths``. Returns MLflow's ``ModelInfo`` (``model_uri``, ``model_id``)."""
    import mlflow
    from mlflow.models import infer_signature

    servable = servable.cpu().eval()
    x = example[:1].detach().float().cpu()
    signature = infer_signature(x.numpy(), servable(x).numpy())
    with tempfile.TemporaryDirectory() as tmp, fluent_store(tracking_uri), mlflow.start_run(run_id=run_id):
        return mlflow.pytorch.log_model(
            servable, name=ARTIFACT_NAME, signature=signature, input_example=x.numpy(),
            code_paths=[str(_code_copy(Path(tmp)))], pip_requirements=_requirements(),
            # MLflow 3's default "pt2" is a torch.export graph of forward() alone: no sample() / reconstruct().
            serialization_format="pickle",
        )


def register_run(client, tracking_uri: str, name: str, run_id: str, alias: str, example: Tensor,
                 tags: dict[str, str] | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Log run ``run_id``'s checkpoint as an MLflow model (once per run) and point ``name@alias`` at its version.

    A run already registered (its tag ``registered_model_version`` names a version of ``name`` that still
    exists) is not logged again: only the alias moves to it.

    Returns:
        ``name``, ``version``, ``alias``, ``uri`` (``models:/<name>@<alias>``), ``run_id``.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    # A client made without registry_uri takes the process-wide one (MLFLOW_REGISTRY_URI), which may name
    # another store: this store's registry is named explicitly, and nothing process-wide is set here.
    registry = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = None
    recorded = client.get_run(run_id).data.tags.get(VERSION_TAG, "")
    if recorded.startswith(f"{name}/"):
        try:
            version = registry.get_model_version(name, recorded.rsplit("/", 1)[1]).version
        except MlflowException:
            version = None
    if version is None:
        with tempfile.TemporaryDirectory() as tmp:
            servable = servable_from_checkpoint(client.download_artifacts(run_id, "checkpoint", tmp), device)
        info = log_servable(run_id, servable, example, tracking_uri)
        try:
            registry.create_registered_model(name)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        with fluent_store(tracking_uri):  # the registry resolves the models:/m-... source through it
            version = registry.create_model_version(name, source=info.model_uri, run_id=run_id,
                                                    model_id=info.model_id,
                                                    tags={"run_id": run_id, **(tags or {})}).version
        client.set_tag(run_id, VERSION_TAG, f"{name}/{version}")
    registry.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": str(version), "alias": alias, "uri": f"models:/{name}@{alias}", "run_id": run_id}


def register_models(client, tracking_uri: str, experiment: str, best_per_arm: dict[str, dict[str, Any]],
                    example: Tensor, replicates: dict[str, list[dict[str, Any]]] | None = None,
                    device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
    """Register every arm's selected trial as ``<experiment>-<arm>@champion`` and every FINISHED replicate of it
    as ``<experiment>-<arm>@seed-<seed>``.

    Args:
        client: an ``MlflowClient`` of the study's tracking store (the registry lives in the same store).
        tracking_uri: that store's URI.
        experiment: ``tracking.experiment``.
        best_per_arm: arm -> its selected trial (``best_per_variant`` of the sweep summary: ``run_id``,
            ``trial_id``).
        example: a real input image batch, float32 (N, C, H, W) in [0, 1] (the first is the input example).
        replicates: arm -> its replicate records (``arms.<arm>.replicates`` of ``results/replicates.json``:
            ``run_id``, ``seed``, ``status``); None: no replicates.

    Returns:
        arm -> the champion's record (see :func:`register_run`) with ``replicates``: the replicates' records.
    """
    registered = {}
    for arm, trial in best_per_arm.items():
        name = f"{experiment}-{arm}"
        record = register_run(client, tracking_uri, name, trial["run_id"], CHAMPION, example,
                              {"arm": arm, "trial_id": str(trial.get("trial_id")), "role": "selected"}, device)
        record["replicates"] = [
            register_run(client, tracking_uri, name, rep["run_id"], f"seed-{int(rep['seed'])}", example,
                         {"arm": arm, "seed": str(rep["seed"]), "role": "replicate"}, device)
            for rep in (replicates or {}).get(arm, []) if rep.get("status") == "FINISHED" and rep.get("run_id")
        ]
        registered[arm] = record
    return registered
