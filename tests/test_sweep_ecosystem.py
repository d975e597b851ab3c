"""A finished two-arm sweep as MLflow's and Optuna's own tools see it (real Ray, Optuna and MLflow on loopback):
MLflow system metrics on every trial run, one Optuna RDB study per arm holding every trial with the values Tune
told it, and the MLflow tracking server's REST API answering what its UI reads (parent / child runs, a child's
metric history, its artifacts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from study.config import ConfigError, parse_params
from tests.sweep_support import child_runs, end_session, free_port, stage_env, tiny_params

import study.sweep  # noqa: E402,F401  (a broken import fails, never skips)

NUM_TRIALS, EPOCHS, INTERVAL_S = 2, 3, 0.5
ARMS = ("gaussian", "laplace")


@pytest.fixture(scope="module")
def eco_sweep(tmp_path_factory, prepared_32):
    """(params, summary, MLflow client, work dir, Optuna storage URL) of one finished sweep."""
    import ray
    from mlflow.tracking import MlflowClient

    from study.sweep import run_sweep
    from study.sweep_ray import init_ray

    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "STUDY_TEST_NAN_TRIAL", "STUDY_TEST_PID_DIR",
                "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"):
        os.environ.pop(var, None)
    # Each epoch lasts at least two sampling intervals, so every trial publishes system metrics.
    os.environ["STUDY_TEST_EPOCH_SLEEP"] = str(2 * INTERVAL_S)
    work = tmp_path_factory.mktemp("eco")
    storage = f"sqlite:///{work / 'optuna.db'}"
    raw = tiny_params(work, prepared_32, epochs=EPOCHS, num_trials=NUM_TRIALS,
                      searcher={"kind": "optuna", "seed": 0, "storage": storage},
                      variants={arm: {"overrides": {"likelihood.family": arm}} for arm in ARMS})
    raw["tracking"] |= {"system_metrics": True, "system_metrics_interval_s": INTERVAL_S}
    params = parse_params(raw)
    init_ray(start_timeout_s=600)  # a loaded machine can take minutes
    try:
        summary = run_sweep(params, workdir=work)
    finally:
        os.environ.pop("STUDY_TEST_EPOCH_SLEEP", None)
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    yield params, summary, client, work, storage
    ray.shutdown()


# ----------------------------------------------------------------------------------------- settings
def _params(tmp_path, prepared_32, **searcher):
    return tiny_params(tmp_path, prepared_32, searcher={"kind": "optuna"} | searcher)


def test_storage_and_system_metric_settings_are_validated(tmp_path, prepared_32):
    assert parse_params(_params(tmp_path, prepared_32, storage="sqlite:///optuna.db")).sweep.searcher.storage
    assert parse_params(_params(tmp_path, prepared_32)).sweep.searcher.storage is None
    for bad in ("optuna.db", "sqlite://", "sqlite:///:memory:"):
        with pytest.raises(ConfigError, match="storage"):
            parse_params(_params(tmp_path, prepared_32, storage=bad))
    with pytest.raises(ConfigError, match="kind optuna"):
        parse_params(_params(tmp_path, prepared_32, kind="random", storage="sqlite:///optuna.db"))
    raw = _params(tmp_path, prepared_32)
    raw["tracking"] |= {"system_metrics": True, "system_metrics_interval_s": 0}
    with pytest.raises(ConfigError, match="system_metrics_interval_s"):
        parse_params(raw)
    raw["tracking"] |= {"system_metrics_intervals": 1.0, "system_metrics_interval_s": 1.0}
    with pytest.raises(ConfigError, match="system_metrics_intervals"):
        parse_params(raw)


def test_relative_sqlite_urls_are_made_absolute(tmp_path):
    from study.config import absolute_sqlite_url

    assert absolute_sqlite_url("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert absolute_sqlite_url("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert absolute_sqlite_url("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"


# ----------------------------------------------------------------------------------------- system metrics
@pytest.mark.slow
def test_every_trial_run_has_system_metrics(eco_sweep):
    import psutil

    _, summary, client, _, _ = eco_sweep
    runs = child_runs(client, summary["experiment_id"], summary["parent_run_id"])
    assert len(runs) == NUM_TRIALS * len(ARMS)
    total_mb = psutil.virtual_memory().total / 1e6
    for run in runs:
        assert run.info.status == "FINISHED"
        cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
        memory = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
        assert cpu and memory, sorted(run.data.metrics)
        assert sorted(m.step for m in cpu) == list(range(len(cpu)))  # one sample per interval, stepped 0, 1, ...
        assert all(0.0 <= m.value <= 100.0 for m in cpu)
        assert all(0.0 < m.value <= total_mb for m in memory)
        # Sampled while the trial trained: between the run's start and its end.
        assert all(run.info.start_time <= m.timestamp <= run.info.end_time for m in cpu)
        # GPU keys only where NVML sees a GPU (nvidia-ml-py installed and a driver present).
        if not any(k.startswith("system/gpu_") for k in run.data.metrics):
            try:
                import pynvml

                pynvml.nvmlInit()
                gpus = pynvml.nvmlDeviceGetCount()
            except Exception:
                gpus = 0
            assert gpus == 0


# ----------------------------------------------------------------------------------------- Optuna storage
@pytest.mark.slow
def test_optuna_storage_holds_every_trial_of_each_arm(eco_sweep):
    import optuna

    params, summary, _, _, storage = eco_sweep
    names = set(optuna.get_all_study_names(storage))
    assert names == {f"{params.sweep.name}-{arm}" for arm in ARMS}
    for arm in ARMS:
        study = optuna.load_study(study_name=f"{params.sweep.name}-{arm}", storage=storage)
        assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # sweep.mode max
        trials = [t for t in summary["trials"] if t["variant"] == arm]
        stored = study.get_trials(deepcopy=False)
        assert len(stored) == len(trials) == NUM_TRIALS
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in stored)
        by_beta = {t.params["train.beta"]: t for t in stored}
        for trial in trials:
            ot = by_beta[trial["config"]["train.beta"]]  # the value Optuna sampled is the one the trial ran
            assert ot.value == trial["metrics"]["val_elbo"]
            # Tune reported every epoch to Optuna as an intermediate value.
            assert sorted(ot.intermediate_values) == list(range(1, trial["epochs"] + 1))


# ----------------------------------------------------------------------------------------- MLflow UI API
@pytest.fixture(scope="module")
def mlflow_server(eco_sweep):
    """`mlflow server` on 127.0.0.1 over the sweep's store; yields its base URL."""
    _, _, _, work, _ = eco_sweep
    port = free_port()
    log = work / "mlflow_server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination",
           str(work / "mlartifacts")]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=stage_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a loaded machine starts it slowly
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield base
    finally:
        end_session(proc.pid)


def _get(base: str, endpoint: str, **query) -> dict:
    url = f"{base}/ajax-api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"  # the UI's own API prefix
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.loads(answer.read())


def _post(base: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.mark.slow
def test_mlflow_server_serves_what_its_ui_reads(eco_sweep, mlflow_server):
    params, summary, _, work, _ = eco_sweep
    base = mlflow_server
    with urllib.request.urlopen(base + "/", timeout=30) as answer:  # the UI's page itself
        assert answer.status == 200 and b"<html" in answer.read().lower()
    experiment = _get(base, "experiments/get-by-name", experiment_name=params.tracking.experiment)["experiment"]
    assert experiment["experiment_id"] == summary["experiment_id"]
    runs = _post(base, "runs/search", {"experiment_ids": [summary["experiment_id"]], "max_results": 100})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    # The experiment page nests runs under the one whose id their mlflow.parentRunId tag names.
    parents = [i for i, t in tags.items() if "mlflow.parentRunId" not in t]
    assert parents == [summary["parent_run_id"]] and tags[summary["parent_run_id"]]["kind"] == "sweep"
    children = {i for i, t in tags.items() if t.get("mlflow.parentRunId") == summary["parent_run_id"]}
    assert children == {t["run_id"] for t in summary["trials"]}

    trial = summary["best_trial"]
    history = _get(base, "metrics/get-history", run_id=trial["run_id"], metric_key="val_elbo")["metrics"]
    assert [m["step"] for m in history] == list(range(1, trial["epochs"] + 1))
    assert history[-1]["value"] == pytest.approx(trial["metrics"]["val_elbo"])
    system = _get(base, "metrics/get-history", run_id=trial["run_id"],
                  metric_key="system/cpu_utilization_percentage")["metrics"]
    assert system  # the run page's "System metrics" charts

    listed = {}
    for folder in ("", "images", "checkpoint"):
        answer = _get(base, "artifacts/list", run_id=trial["run_id"], **({"path": folder} if folder else {}))
        listed |= {f["path"]: f for f in answer.get("files", [])}
    assert {"images", "checkpoint", "config"} <= set(listed)
    assert {"images/reconstructions.png", "images/samples.png", "checkpoint/state.pt",
            "checkpoint/config.yaml"} <= set(listed)
    # The image the run page shows is the logged file, byte for byte.
    run = _get(base, "runs/get", run_id=trial["run_id"])["run"]
    local = Path(urllib.parse.urlparse(run["info"]["artifact_uri"]).path) / "images" / "samples.png"
    with urllib.request.urlopen(f"{base}/get-artifact?" + urllib.parse.urlencode(
            {"path": "images/samples.png", "run_uuid": trial["run_id"]}), timeout=30) as answer:
        served = answer.read()
    assert served[:8] == b"\x89PNG\r\n\x1a\n" and served == local.read_bytes()
    assert int(listed["images/samples.png"]["file_size"]) == len(served)


# ----------------------------------------------------------------------------------------- the MLflow UI
def test_the_experiment_is_declared_a_model_training_one(eco_sweep):
    """MLflow 3's UI opens an experiment by its ``mlflow.experimentKind`` tag (else it guesses the GenAI page)."""
    _, summary, client, _, _ = eco_sweep
    assert client.get_experiment(summary["experiment_id"]).tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_sweep_run_carries_the_sweep_result(eco_sweep, tmp_path):
    """Metrics, best-trial tags and the run description of the parent run, against the child runs' own values."""
    params, summary, client, _, _ = eco_sweep
    parent = client.get_run(summary["parent_run_id"])
    children = child_runs(client, summary["experiment_id"], summary["parent_run_id"])
    metrics, tags = parent.data.metrics, parent.data.tags
    assert metrics["trials_total"] == len(children) == NUM_TRIALS * len(ARMS)
    assert metrics["trials_finished"] == sum(r.info.status == "FINISHED" for r in children)
    assert metrics["trials_failed"] == sum(r.info.status == "FAILED" for r in children)
    assert metrics["trials_stopped_early"] == sum(r.data.tags.get("early_stopped") == "true" for r in children)
    metric = params.sweep.metric  # val_elbo, mode max; FIFO: every trial ran the full schedule
    best_by_arm = {}
    for arm in ARMS:
        runs = [r for r in children if r.data.tags["sweep_variant"] == arm and r.info.status == "FINISHED"]
        best_by_arm[arm] = max(runs, key=lambda r: r.data.metrics[metric])
        assert metrics[f"best_{metric}/{arm}"] == pytest.approx(best_by_arm[arm].data.metrics[metric], rel=1e-9)
        assert tags[f"best.{arm}.run_id"] == best_by_arm[arm].info.run_id
    overall = max(best_by_arm.values(), key=lambda r: r.data.metrics[metric])
    assert metrics[f"best_{metric}"] == pytest.approx(overall.data.metrics[metric], rel=1e-9)
    assert tags["best_run_id"] == overall.info.run_id and tags["best_arm"] == overall.data.tags["sweep_variant"]
    sampled = yaml.safe_load(Path(client.download_artifacts(overall.info.run_id, "config/sampled.yaml",
                                                            str(tmp_path))).read_text())
    assert sampled, "the searcher sampled nothing"
    for key, value in sampled.items():
        assert float(tags[f"best.sampled.{key}"]) == pytest.approx(value, rel=5e-4)  # 4 significant digits
    note = tags["mlflow.note.content"]
    for arm, run in best_by_arm.items():
        assert f"| {arm} | {run.data.tags['ray_trial_id']} | [{run.info.run_id[:8]}](#/experiments/" in note


def test_trial_runs_record_their_source_and_data(eco_sweep):
    """MLflow's own source tags (entry point, the checkout's commit) and the prepared splits as dataset inputs."""
    from study.data.store import read_manifest
    from study.tracking_lineage import dataset_inputs

    params, summary, client, _, _ = eco_sweep
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    manifest = read_manifest(params.dataset_dir())
    for run in child_runs(client, summary["experiment_id"], summary["parent_run_id"]):
        tags = run.data.tags
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
        if head.returncode == 0:  # a git checkout (CI's clone is one)
            assert tags["mlflow.source.git.commit"] == head.stdout.strip()
        inputs = dataset_inputs(client.get_run(run.info.run_id))
        assert set(inputs) == {"training", "validation"}
        for context, split in (("training", "train"), ("validation", "val")):
            assert inputs[context]["digest"] == manifest["splits"][split]["sha256"][:16]
            assert inputs[context]["name"].endswith(f"-{split}")
        # A Gaussian or Laplace trial has no variance minimiser: no such metric chart on its page.
        assert "variance_minimiser_alpha" not in run.data.metrics and "beta" in run.data.metrics
