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
