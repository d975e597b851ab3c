"""DVC experiments on the root pipeline in a temporary git copy of the repository (real stages, tiny params): a
queued ``dvc exp run -S`` run by the queue's worker in a temporary copy (``--run-all``: the worker ``dvc queue
start`` starts, waited for), listed by ``dvc exp show --json`` with its parameter and the report's metrics, its
MLflow runs kept in the repository's own store rather than in the deleted copy.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dvc_support import _copy_repo

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def _dvc(work: Path, *args: str, stdout_only: bool = False) -> str:
    """``python -m dvc <args>`` in ``work`` with this venv first on PATH and no inherited MLflow / Ray address.
    One experiment is the whole pipeline (prepare, sweep, replicate, evaluate, report), hence the long limit."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "DVC_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=2400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def _experiment(shown: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The ``dvc exp show --json`` record of the experiment called ``name``."""
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") == name:
                    return rev
    raise AssertionError(f"no experiment {name!r} in {json.dumps(shown)[:3000]}")


def _metrics(record: dict[str, Any], path: str = "reports/metrics.json") -> dict[str, Any]:
    return record["data"]["metrics"][path]["data"]


@pytest.fixture(scope="module")
def exp_repo(tmp_path_factory):
    work = tmp_path_factory.mktemp("dvcexp") / "study"
    _copy_repo(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prepare"]["resolution"] = 32
    params["model"].update(latent_dim=16, width=8)
    params["train"].update(epochs=2, batch_size=8, grid_size=4)
    # train.beta is not searched here, so the value `-S` sets is the one the trial trains with.
    params["sweep"].update(num_trials=1, max_concurrent=1, scheduler={"kind": "fifo"}, ray_start_timeout_s=600,
                           search_space={"train.lr": {"distribution": "loguniform", "low": 0.0005, "high": 0.002}})
    params["tracking"]["system_metrics"] = False
    params["evaluate"].update(num_importance_samples=2, num_examples=2)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "baseline"], cwd=work, check=True)
    return work


@pytest.mark.slow
def test_queued_experiment_runs_in_a_temp_copy_and_logs_to_the_repos_mlflow(exp_repo):
    """``dvc exp run --queue -S ...`` then ``--run-all``: the set parameter is what the trial trained with, ``dvc
    exp show`` gives the report's metrics (the experiment's commit holds ``reports/metrics.json``, which git
    tracks), and the MLflow runs are in the repository's store although the stages ran in DVC's temporary copy.
    (One experiment covers both ways of running one: a queued one is the stricter, it runs outside the
    workspace.)"""
    from mlflow.tracking import MlflowClient

    work = exp_repo
    _dvc(work, "exp", "run", "--queue", "-S", "train.beta=0.5", "-n", "beta-half")
    _dvc(work, "exp", "run", "--run-all")  # the queue's Celery worker (`dvc queue start`'s), waited for
    record = _experiment(json.loads(_dvc(work, "exp", "show", "--json", stdout_only=True)), "beta-half")
    assert record["data"]["params"]["params.yaml"]["data"]["train"]["beta"] == 0.5
    shown = _metrics(record)
    committed = subprocess.run(["git", "show", f"{record['rev']}:reports/metrics.json"], cwd=work, check=True,
                               capture_output=True, text=True).stdout
    assert json.loads(committed) == shown
    best = shown["best"]
    # Its MLflow runs are in the repository's store (the temp copy and any store in it are gone).
    run = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}").get_run(best["run_id"])
    assert run.data.params["train.beta"] == "0.5"
    assert run.data.metrics["val_elbo"] == pytest.approx(best["val_elbo"])
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(work / "mlartifacts")


def test_stages_use_the_repositorys_stores_from_a_temporary_copy(tmp_path, monkeypatch):
    """What a stage sees in DVC's temporary copy (cwd: the copy, DVC_ROOT: the repository)."""
    from pipelines.common import stage_arguments

    repo, copy = tmp_path / "repo", tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["sweep"]["searcher"]["storage"] = "sqlite:///optuna.db"
    (copy / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    _, params = stage_arguments(["--params", "params.yaml"], None)
    assert params.tracking.uri == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    assert params.tracking.artifact_root == repo.resolve() / "mlartifacts"
    assert params.sweep.searcher.storage == f"sqlite:///{repo.resolve() / 'optuna.db'}"
    assert params.sweep.output == Path(raw["sweep"]["output"])  # the stage's outputs stay in the copy
    # `dvc repro` / `dvc exp run` in the workspace: DVC_ROOT is the working directory, nothing changes.
    monkeypatch.setenv("DVC_ROOT", str(copy))
    _, params = stage_arguments(["--params", "params.yaml"], None)
    assert params.tracking.uri == "sqlite:///mlflow.db" and params.sweep.searcher.storage == "sqlite:///optuna.db"
