"""Shared fixtures: real sample data, and a prepared copy of it that any test can train on in seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "celeba"
# CelebA's official list_eval_partition.txt (202,599 lines), gzipped; data/reference/README.md gives its source.
FULL_PARTITION = REPO / "data" / "reference" / "celeba_list_eval_partition.txt.gz"


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The 32 real CelebA images embedded in the repository (img_align_celeba/ + partition file)."""
    return SAMPLE


@pytest.fixture()
def sample_copy(tmp_path: Path) -> Path:
    """A writable copy of the embedded sample, for tests that corrupt or remove files."""
    dst = tmp_path / "celeba"
    shutil.copytree(SAMPLE, dst)
    return dst


@pytest.fixture(scope="session")
def prepared_32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample prepared at 32 x 32 by the real stage code (train 24 / val 4 / test 4)."""
    from study.data.celeba import prepare_celeba
    from study.data.store import write_prepared

    out = tmp_path_factory.mktemp("prepared") / "celeba32"
    arrays, _ = prepare_celeba(SAMPLE, None, 32)
    write_prepared(out, arrays, {"dataset": "celeba", "source": str(SAMPLE)})
    return out


@pytest.fixture(scope="session")
def structured_checkpoint(tmp_path_factory: pytest.TempPathFactory, prepared_32: Path) -> Path:
    """The checkpoint directory (``state.pt``, ``config.yaml``) of a tiny structured-likelihood VAE trained for one
    epoch on the real sample at 32 x 32: the trained model the model-registry and generate tests log and load."""
    from study.config import TrialConfig
    from study.train import run_trial

    config = TrialConfig.model_validate({
        "data_dir": str(prepared_32), "model": {"latent_dim": 8, "width": 8},
        "likelihood": {"family": "structured"},
        "train": {"epochs": 1, "batch_size": 8, "grid_size": 4, "device": "cpu"},
    })
    work = tmp_path_factory.mktemp("structured_trial")
    run_trial(config, workdir=work)
    return work / "checkpoint"


def tiny_trial_config(data_dir: Path, **train):
    """A seconds-long CPU trial config (small model) on prepared data; a checkpoint every epoch unless ``train``
    sets ``checkpoint_interval_s`` (the tests of resumption and per-epoch checkpoint contents rely on one)."""
    from study.config import TrialConfig

    return TrialConfig.model_validate(
        {
            "data_dir": str(data_dir),
            "model": {"latent_dim": 16, "width": 8},
            "train": {"epochs": 2, "batch_size": 8, "grid_size": 4, "checkpoint_interval_s": 0, **train},
        }
    )


def _prepare_with_stage(out_root: Path, color: str, resolution: int = 32) -> Path:
    """Run the real ``prepare`` stage entry point on the embedded sample, in ``color``; returns the dataset dir."""
    import yaml

    from pipelines.prepare import main as prepare_main

    params = out_root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "datasets": {"celeba": {"kind": "celeba", "root": str(SAMPLE)}},
        "prepare": {"resolution": resolution, "color": color, "output_root": str(out_root / "prepared")},
        "sweep": {"dataset": "celeba"},
    }))
    assert prepare_main(["--params", str(params)]) == 0
    return out_root / "prepared" / "celeba"


@pytest.fixture(scope="session")
def prepared_ycbcr_32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample prepared at 32 x 32 in YCbCr (Y, 8 x 8 chroma, and the val / test RGB) by the prepare stage."""
    return _prepare_with_stage(tmp_path_factory.mktemp("prepared_ycbcr"), "ycbcr")


@pytest.fixture(scope="session")
def prepared_grey_32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample prepared at 32 x 32 as grey (the BT.601 luma) by the prepare stage."""
    return _prepare_with_stage(tmp_path_factory.mktemp("prepared_grey"), "grey")


@pytest.fixture(scope="session")
def dvc_study(tmp_path_factory):
    """(work, params, log) of one complete ``dvc repro`` of the root pipeline in a temporary copy of the repository:
    two datasets (the CelebA sample and an LSUN LMDB built from real photographs) at 32 x 32, 6 trials of up to 6 epochs under ASHA.
    Shared by tests/test_pipeline_e2e.py and tests/test_rejected_edits.py (the rejected edits restore what they
    change; the e2e module's last test re-runs after a sweep edit and leaves the copy up to date)."""
    import subprocess

    import yaml

    from tests.dvc_support import _copy_repo, _dvc

    work = tmp_path_factory.mktemp("e2e") / "study"
    _copy_repo(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    # A second dataset in LSUN's official LMDB format, built from real photographs.
    from tests.data.lsun_fixtures import build_lmdb, train_test_records

    train, test = train_test_records()
    build_lmdb(work / "data" / "lsun" / "church_outdoor_train_lmdb", train)
    build_lmdb(work / "data" / "lsun" / "church_outdoor_val_lmdb", test)
    params["datasets"]["lsun_church"] = {"kind": "lsun", "root": "data/lsun", "val_fraction": 0.1, "seed": 0}
    params["prepare"]["resolution"] = 32
    params["model"].update(latent_dim=16, width=8)
    params["train"].update(epochs=6, batch_size=8, grid_size=8)
    params["evaluate"].update(num_importance_samples=8, num_examples=4)
    # One trial at a time makes the order, and so ASHA's decisions, reproducible.
    params["sweep"].update(num_trials=6, max_concurrent=1)
    params["sweep"]["scheduler"].update(grace_period=1, reduction_factor=2)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    first = _dvc(work, "repro")
    return work, params, first
