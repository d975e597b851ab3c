"""Trained models as MLflow models (study.model_registry): a tiny structured-likelihood VAE trained on the real
sample, registered from its MLflow run, then loaded through ``mlflow.pytorch.load_model("models:/...@champion")``
in a fresh Python process outside the repository (``study`` not importable there) and used on a real image.

Reference: the repository's own reconstruction of the same image from the same checkpoint
(``study.evaluate_examples.example_images`` on ``study.train.load_checkpoint``'s model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.sweep_support import REPO

EXPERIMENT = "tiny"


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, prepared_32, structured_checkpoint):
    """Two finished MLflow runs holding a trained checkpoint (``checkpoint/``), as a sweep trial and a seed
    replicate leave them; the store's URI, client and the real test images."""
    from mlflow.tracking import MlflowClient

    from study.data.loader import DeviceSplit

    work = tmp_path_factory.mktemp("registry")
    checkpoint = structured_checkpoint
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=str(work / "mlartifacts"))
    run_ids = []
    for _ in range(2):
        run = client.create_run(experiment_id)
        for name in ("state.pt", "config.yaml"):
            client.log_artifact(run.info.run_id, str(checkpoint / name), "checkpoint")
        client.set_terminated(run.info.run_id, "FINISHED")
        run_ids.append(run.info.run_id)
    images = DeviceSplit(prepared_32, "test", "cpu").take(torch.arange(4))
    return work, uri, client, run_ids, checkpoint, images


@pytest.fixture(scope="module")
def registered(trained_runs):
    from study.model_registry import register_models

    work, uri, client, run_ids, _, images = trained_runs
    records = register_models(client, uri, EXPERIMENT, {"structured": {"run_id": run_ids[0], "trial_id": "t0"}},
                              images[:1], replicates={"structured": [
                                  {"seed": 1, "run_id": run_ids[1], "status": "FINISHED"},
                                  {"seed": 2, "run_id": None, "status": "FAILED"}]})
    return records


def test_champion_and_replicate_aliases(trained_runs, registered):
    _, _, client, run_ids, _, _ = trained_runs
    record = registered["structured"]
    assert record["uri"] == "models:/tiny-structured@champion"
    champion = client.get_model_version_by_alias("tiny-structured", "champion")
    assert champion.run_id == run_ids[0] and champion.tags["role"] == "selected"
    replicate = client.get_model_version_by_alias("tiny-structured", "seed-1")
    assert replicate.run_id == run_ids[1] and replicate.version != champion.version
    assert [r["alias"] for r in record["replicates"]] == ["seed-1"]  # the FAILED replicate is not registered
    # The logged model carries a signature for (B, 3, 32, 32) float32 images.
    import mlflow

    from study.model_registry import fluent_store

    with fluent_store(trained_runs[1]):
        info = mlflow.models.get_model_info("models:/tiny-structured@champion")
    assert json.loads(info.signature.to_dict()["inputs"])[0]["tensor-spec"]["shape"] == [-1, 3, 32, 32]


def test_registering_again_reuses_the_version(trained_runs, registered):
    from study.model_registry import register_models

    _, uri, client, run_ids, _, images = trained_runs
    again = register_models(client, uri, EXPERIMENT, {"structured": {"run_id": run_ids[0], "trial_id": "t0"}},
                            images[:1])
    assert again["structured"]["version"] == registered["structured"]["version"]
    assert len(client.search_model_versions("name = 'tiny-structured'")) == 2


def test_a_process_wide_registry_of_another_store_is_not_used(tmp_path, trained_runs, registered):
    """An earlier registration in the same process (another study's store) leaves MLflow's process-wide registry
    URI pointing there; a client made without ``registry_uri`` then reads that registry. Registering into this
    store must still find and alias this store's version (seen as "Registered Model ... not found" in CI)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from study.model_registry import register_run

    _, uri, client, run_ids, _, images = trained_runs
    other = f"sqlite:///{tmp_path / 'other.db'}"
    before = mlflow.get_registry_uri()
    mlflow.set_registry_uri(other)
    tracking_before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        stale = MlflowClient(tracking_uri=uri)  # its registry is the other store's
        assert stale._registry_uri == other
        record = register_run(stale, uri, "tiny-structured", run_ids[0], "champion", images[:1])
        # Nothing process-wide (which child processes inherit) now names this store.
        assert os.environ.get("MLFLOW_REGISTRY_URI") == other
        assert os.environ.get("MLFLOW_TRACKING_URI") == tracking_before
    finally:
        mlflow.set_registry_uri(before)
    assert record["version"] == registered["structured"]["version"]
    assert client.get_model_version_by_alias("tiny-structured", "champion").run_id == run_ids[0]


def test_fresh_process_loads_through_mlflow_alone(tmp_path, trained_runs, registered):
    from study.evaluate_examples import example_images
    from study.train import load_checkpoint

    _, uri, _, _, checkpoint, images = trained_runs
    x = images[:2].numpy().astype(np.float32)  # two real CelebA test images, (2, 3, 32, 32) in [0, 1]
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent("""
        import importlib.util, json, os, sys
        # The venv installs this project in editable mode (a .pth entry): drop it, as on a machine without it.
        sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath(sys.argv[1])]
        import numpy as np, torch, mlflow
        assert importlib.util.find_spec("study") is None, "the repository is importable here"
        model = mlflow.pytorch.load_model("models:/tiny-structured@champion")
        x = torch.from_numpy(np.load("x.npy"))
        np.save("recon.npy", model.reconstruct(x).numpy())
        np.save("samples.npy", model.sample(5, generator=torch.Generator().manual_seed(0)).numpy())
        print(json.dumps({"module": sys.modules[type(model).__module__].__file__, "shape": model.image_shape}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["MLFLOW_TRACKING_URI"] = uri
    proc = subprocess.run([sys.executable, "-c", script, str(REPO)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not Path(loaded["module"]).resolve().is_relative_to(REPO)  # the model's own copy of the code
    assert loaded["shape"] == [3, 32, 32]

    recon = np.load(tmp_path / "recon.npy")
    assert recon.shape == x.shape and recon.dtype == np.float32
    assert recon.min() >= 0.0 and recon.max() <= 1.0  # the structured mean is a sigmoid
    _, model, _ = load_checkpoint(checkpoint, "cpu")
    reference = example_images(model, torch.from_numpy(x), num=2)["reconstruction"]  # (2, H, W, 3)
    np.testing.assert_allclose(recon.transpose(0, 2, 3, 1), reference, atol=1e-5, rtol=0)
    samples = np.load(tmp_path / "samples.npy")
    assert samples.shape == (5, 3, 32, 32) and np.isfinite(samples).all()
    with torch.no_grad():
        z = torch.randn(5, model.latent_dim, generator=torch.Generator().manual_seed(0))
        np.testing.assert_allclose(samples, model.likelihood.mean(model.decode(z)).numpy(), atol=1e-5, rtol=0)
