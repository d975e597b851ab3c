"""The prepare stage as a program: datasets from params.yaml, --skip-corrupt, and interruption safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.prepare import main as prepare_main
from study.config import ConfigError, parse_params
from study.data.store import load_split, read_manifest
from tests.data.lsun_fixtures import build_lmdb, train_test_records, truncated

REPO = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, datasets: dict, **prepare) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "datasets": datasets,
        "prepare": {"resolution": 32, "output_root": str(tmp_path / "prepared"), **prepare},
        "sweep": {"dataset": next(iter(datasets))},
    }))
    return path


def test_sweep_dataset_must_be_listed():
    with pytest.raises(ConfigError, match="sweep.dataset 'lsun' is not one of datasets"):
        parse_params({"sweep": {"dataset": "lsun"}})
    with pytest.raises(ConfigError, match="datasets.church.lsun.root"):
        parse_params({"datasets": {"church": {"kind": "lsun"}}, "sweep": {"dataset": "church"}})


def test_both_datasets_prepared_from_params(tmp_path, sample_root):
    train, test = train_test_records()
    lsun_root = tmp_path / "lsun"
    build_lmdb(lsun_root / "church_outdoor_train_lmdb", train)
    build_lmdb(lsun_root / "church_outdoor_val_lmdb", test)
    params = _params(tmp_path, {
        "celeba": {"kind": "celeba", "root": str(sample_root)},
        "church": {"kind": "lsun", "root": str(lsun_root), "val_fraction": 0.1, "seed": 3},
    }, color="ycbcr")
    assert prepare_main(["--params", str(params)]) == 0
    celeba = read_manifest(tmp_path / "prepared" / "celeba")
    church = read_manifest(tmp_path / "prepared" / "church")
    assert {k: v["count"] for k, v in celeba["splits"].items() if "_" not in k} == {"train": 24, "val": 4, "test": 4}
    n_val = round(0.1 * len(train))
    assert {k: v["count"] for k, v in church["splits"].items() if "_" not in k} == {
        "train": len(train) - n_val, "val": n_val, "test": len(test)}
    assert church["color"] == "ycbcr" and church["splits"]["test_chroma"]["shape"] == [len(test), 8, 8, 2]
    assert load_split(tmp_path / "prepared" / "church", "test").shape == (len(test), 32, 32, 1)


def test_skip_corrupt_counts_in_the_manifest(tmp_path, sample_copy):
    bad = sample_copy / "img_align_celeba" / "000003.jpg"
    bad.write_bytes(truncated(bad.read_bytes()))
    params = _params(tmp_path, {"celeba": {"kind": "celeba", "root": str(sample_copy)}})
    assert prepare_main(["--params", str(params)]) == 1  # off by default: the stage stops
    assert not (tmp_path / "prepared" / "celeba").exists()
    assert prepare_main(["--params", str(params), "--skip-corrupt"]) == 0
    manifest = read_manifest(tmp_path / "prepared" / "celeba")
    assert manifest["skipped_count"] == 1 and manifest["skipped"]["train"] == ["000003.jpg"]
    assert manifest["splits"]["train"]["count"] == 23


_SLOW_WRITER = """
import sys, time
import numpy as np
real = np.save
def slow(path, arr, allow_pickle=False):
    real(path, arr, allow_pickle=allow_pickle)
    print("WROTE", path, flush=True)
    time.sleep(60)
np.save = slow
from pipelines.prepare import main
sys.exit(main(["--params", sys.argv[1]]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_prepare_killed_mid_write_leaves_previous_output(tmp_path, sample_root, sig):
    params = _params(tmp_path, {"celeba": {"kind": "celeba", "root": str(sample_root)}})
    assert prepare_main(["--params", str(params)]) == 0
    target = tmp_path / "prepared" / "celeba"
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    # Second run at another colour, killed right after it wrote its first array.
    params.write_text(params.read_text().replace("resolution: 32", "resolution: 32\n  color: grey"))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(params)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("WROTE"), line
        assert Path(line.split()[1]).parent != target  # it writes into a temporary sibling
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the previous output, whole
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "celeba"]
    if sig == signal.SIGTERM:
        assert leftovers == []  # SIGTERM becomes SystemExit: the temporary directory is removed
    # Killed outright, a hidden temporary may remain; the next run removes it and replaces the output.
    assert prepare_main(["--params", str(params)]) == 0
    assert [p.name for p in target.parent.iterdir()] == ["celeba"]
    assert read_manifest(target)["color"] == "grey"
    np.testing.assert_array_equal(load_split(target, "train").shape, (24, 32, 32, 1))


@pytest.mark.parametrize("stage", ["prepare", "sweep", "evaluate", "report"])
def test_every_stage_rejects_bad_params_before_touching_data(tmp_path, capsys, stage):
    import importlib

    main = importlib.import_module(f"pipelines.{stage}").main
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"train": {"beta": -1.0}, "prepare": {"output_root": str(tmp_path / "out")}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(bad)])
    assert exit_info.value.code == 2
    assert "train.beta" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
