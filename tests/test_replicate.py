"""The replicate stage (real Ray, Optuna and MLflow on loopback): a two-arm sweep (Gaussian, Laplace; 2 trials of 2
epochs each on the 32 x 32 sample), then every arm's best trial trained again with 2 fresh seeds.

Checked against MLflow itself: each replicate is a child run of the sweep's parent with the replicate tags and the
best trial's configuration (every logged param equal but ``train.seed``); the seeds are distinct and never the
search seed; ``replicates.json`` agrees with the runs (ids, statuses, each metric's last logged value); a re-run
trains nothing again (also an interrupted arm, restored from Ray's state); a stage stopped by SIGTERM mid-training
resumes into the same runs; a replicate that fails deterministically is FAILED with its reason while the other
seed finishes; ``num_seeds: 0`` writes an empty ``arms`` without starting Ray or touching the tracking store; an
explicit seed list holding the search seed fails before anything starts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from study.config import ConfigError, parse_params
from tests.sweep_support import REPO, child_runs, stage_env, tiny_params

import study.replicate  # noqa: E402,F401  (a broken import fails, never skips)

pytestmark = pytest.mark.slow

ARMS = ("gaussian", "laplace")
EPOCHS, NUM_SEEDS, SEARCH_SEED = 2, 2, 7


def _raw(work, prepared, **replicate):
    raw = tiny_params(work, prepared, epochs=EPOCHS, num_trials=2, max_concurrent=2,
                      variants={arm: {"overrides": {"likelihood.family": arm}} for arm in ARMS},
                      train={"seed": SEARCH_SEED})
    raw["replicate"] = {"num_seeds": NUM_SEEDS, "output": str(work / "results" / "replicates.json")} | replicate
    return raw


@pytest.fixture(scope="module")
def swept(tmp_path_factory, prepared_32):
    """The tiny sweep: (raw params, summary, MLflow client, working directory); one embedded Ray for the module."""
    import os

    import ray
    from mlflow.tracking import MlflowClient

    from study.sweep import run_sweep
    from study.sweep_ray import init_ray

    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "STUDY_TEST_NAN_TRIAL", "STUDY_TEST_PID_DIR"):
        os.environ.pop(var, None)
    work = tmp_path_factory.mktemp("replicate")
    raw = _raw(work, prepared_32)
    init_ray(start_timeout_s=600)  # a loaded machine may miss Ray's fixed 30 s raylet start; retried
    summary = run_sweep(parse_params(raw), workdir=work)
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    yield raw, summary, client, work
    ray.shutdown()


@pytest.fixture(scope="module")
def replicated(swept):
    from study.replicate import run_replicates

    raw, summary, client, work = swept
    return run_replicates(parse_params(raw), workdir=work)


def _replicate_runs(client, summary):
    return {r.info.run_id: r for r in child_runs(client, summary["experiment_id"], summary["parent_run_id"])
            if r.data.tags.get("replicate") == "true"}


def test_replicates_are_tagged_child_runs_of_the_best_trials(swept, replicated):
    _, summary, client, _ = swept
    assert set(replicated["arms"]) == set(ARMS)
    runs = _replicate_runs(client, summary)
    assert len(runs) == len(ARMS) * NUM_SEEDS
    for arm in ARMS:
        best = summary["best_per_variant"][arm]
        entry = replicated["arms"][arm]
        assert (entry["trial_id"], entry["trial_run_id"]) == (best["trial_id"], best["run_id"])
        best_params = client.get_run(best["run_id"]).data.params
        for record in entry["replicates"]:
            run = runs[record["run_id"]]
            tags = run.data.tags
            assert tags["mlflow.parentRunId"] == summary["parent_run_id"]
            assert (tags["replicate_of"], tags["seed"], tags["sweep_variant"]) == (best["run_id"], str(record["seed"]),
                                                                                   arm)
            assert tags["ray_trial_id"] == record["trial_id"]
            # The best trial's configuration exactly, but for its seed.
            differing = {k for k in best_params.keys() | run.data.params.keys()
                         if best_params.get(k) != run.data.params.get(k)}
            assert differing == {"train.seed"}
            assert int(run.data.params["train.seed"]) == record["seed"]
    # The sweep's parent run keeps the sweep's status.
    assert client.get_run(summary["parent_run_id"]).info.status == "FINISHED"


def test_seeds_are_fresh_and_distinct(swept, replicated):
    _, summary, client, _ = swept
    for arm in ARMS:
        entry = replicated["arms"][arm]
        best_seed = int(client.get_run(summary["best_per_variant"][arm]["run_id"]).data.params["train.seed"])
        assert entry["search_seed"] == best_seed == SEARCH_SEED
        seeds = [r["seed"] for r in entry["replicates"]]
        assert len(seeds) == NUM_SEEDS == len(set(seeds)) and SEARCH_SEED not in seeds
    assert replicated["num_seeds"] == NUM_SEEDS and "1000" in replicated["seeds_rule"]


def test_output_agrees_with_mlflow(swept, replicated):
    raw, summary, client, work = swept
    assert json.loads((work / "results" / "replicates.json").read_text()) == json.loads(json.dumps(replicated))
    assert (replicated["sweep"], replicated["parent_run_id"]) == (summary["sweep"], summary["parent_run_id"])
    for arm in ARMS:
        entry = replicated["arms"][arm]
        assert entry["epochs"] == EPOCHS and entry["family"] == arm and entry["elbo_valid"] is True
        assert entry["config"] == {k: v for k, v in summary["best_per_variant"][arm]["config"].items()
                                   if not k.endswith("@index")}
        for record in entry["replicates"]:
            run = client.get_run(record["run_id"])
            assert record["status"] == run.info.status == "FINISHED" and record["error"] is None
            assert record["epochs"] == int(run.data.tags["epochs_run"]) == EPOCHS
            assert {k for k in record["metrics"]} >= {"val_elbo", "train_loss"}
            for name, value in record["metrics"].items():
                history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: (m.step, m.timestamp))
                assert history[-1].step == EPOCHS
                assert math.isclose(history[-1].value, value, rel_tol=1e-6, abs_tol=1e-9), name


def test_rerun_trains_nothing_again(swept, replicated):
    """A re-run after the stage finished rewrites the output from its state; a re-run after an interruption
    between arms keeps the finished arm and restores the other from Ray's state: no new run either way."""
    from study.replicate import STATE_SUFFIX, run_replicates

    raw, summary, client, work = swept
    before = set(_replicate_runs(client, summary))
    out = work / "results" / "replicates.json"
    out.unlink()
    again = run_replicates(parse_params(raw), workdir=work)
    assert json.loads(json.dumps(again)) == json.loads(out.read_text()) == json.loads(json.dumps(replicated))

    state_path = work / "ray_results" / f"tiny{STATE_SUFFIX}"
    state = json.loads(state_path.read_text())
    del state["arms"]["laplace"]
    state["status"] = "running"
    state_path.write_text(json.dumps(state))
    resumed = run_replicates(parse_params(raw), workdir=work)
    key = lambda r: {a: [(x["seed"], x["run_id"], x["status"]) for x in e["replicates"]]  # noqa: E731
                     for a, e in r["arms"].items()}
    assert key(resumed) == key(replicated)
    after = child_runs(client, summary["experiment_id"], summary["parent_run_id"])
    assert {r.info.run_id for r in after if r.data.tags.get("replicate") == "true"} == before
    assert len(after) == len(summary["trials"]) + len(before)


def test_zero_seeds_starts_neither_ray_nor_mlflow(swept, tmp_path):
    """Through the stage's entry point in a fresh process, with a tracking store that does not exist yet."""
    raw, summary, _, work = swept
    params = dict(raw, replicate={"num_seeds": 0, "output": str(tmp_path / "replicates.json")},
                  tracking={"uri": f"sqlite:///{tmp_path / 'never.db'}", "artifact_root": str(tmp_path / "art")})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    script = ("import sys, ray; from pipelines.replicate import main; rc = main(['--params', sys.argv[1]]); "
              "print('ray initialised:', ray.is_initialized()); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, env=stage_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ray initialised: False" in proc.stdout
    written = json.loads((tmp_path / "replicates.json").read_text())
    assert written["arms"] == {} and written["num_seeds"] == 0
    assert written["parent_run_id"] == summary["parent_run_id"]
    assert not (tmp_path / "never.db").exists() and not (tmp_path / "art").exists()


def test_explicit_seeds_holding_the_search_seed_fail_before_anything(swept, tmp_path):
    raw, summary, client, work = swept
    before = {r.info.run_id for r in child_runs(client, summary["experiment_id"], summary["parent_run_id"])}
    params = dict(raw, replicate={"num_seeds": 2, "seeds": [SEARCH_SEED, 3], "output": str(tmp_path / "r.json")})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "pipelines.replicate", "--params", str(path)], cwd=REPO,
                          env=stage_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"contains {SEARCH_SEED}" in errors[0] and "replicate.seeds" in errors[0]
    assert not (tmp_path / "r.json").exists()
    assert {r.info.run_id for r in child_runs(client, summary["experiment_id"], summary["parent_run_id"])} == before


@pytest.mark.parametrize(("replicate", "field"), [
    ({"num_seeds": -1}, "replicate.num_seeds"),
    ({"num_seeds": 2, "seeds": [1, 2, 3]}, "replicate"),
    ({"num_seeds": 2, "seeds": [4, 4]}, "replicate"),
    ({"num_sedes": 2}, "replicate.num_sedes"),
])
def test_bad_replicate_params_name_the_field(replicate, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_params({"replicate": replicate})


def test_a_stopped_stage_resumes_into_the_same_runs(swept, tmp_path):
    """SIGTERM to the stage while a replicate trains (what ``kill -TERM`` or a stopped ``dvc repro`` sends): exit
    130, its runs KILLED with ``interrupted_at``; the re-run (another seed list: another replicate set) resumes
    those runs from their checkpoints and finishes them without logging an epoch twice."""
    import os
    import signal

    from study.replicate import run_replicates
    from tests.sweep_support import end_session, read_json, start, wait_for

    raw, summary, client, work = swept
    seeds = [3001, 3002]
    params = dict(raw, replicate={"num_seeds": 2, "seeds": seeds, "output": str(tmp_path / "r.json")},
                  sweep=raw["sweep"] | {"ray_start_timeout_s": 600})  # the stage starts a Ray of its own
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    pids, log = tmp_path / "pids", tmp_path / "stage.log"
    pids.mkdir()
    # Each trial pauses after every epoch, so the stop lands between epoch 1 and 2.
    proc = start([sys.executable, "-m", "pipelines.replicate", "--params", str(path)], REPO,
                 stage_env(STUDY_TEST_EPOCH_SLEEP="30", STUDY_TEST_PID_DIR=str(pids)), log)
    try:
        wait_for(lambda: any((read_json(f) or {}).get("epoch", 0) >= 1 for f in pids.glob("*.json")), 900,
                 "a replicate's first epoch", proc=proc, log=log)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    finally:
        end_session(proc.pid)
    assert not (tmp_path / "r.json").exists()
    new = [r for r in child_runs(client, summary["experiment_id"], summary["parent_run_id"])
           if r.data.params.get("train.seed") in {str(s) for s in seeds}]
    assert new and {r.info.status for r in new} == {"KILLED"} and all("interrupted_at" in r.data.tags for r in new)
    assert client.get_run(summary["parent_run_id"]).info.status == "FINISHED"

    result = run_replicates(parse_params(params), workdir=work)
    records = {r["run_id"]: r for arm in ARMS for r in result["arms"][arm]["replicates"]}
    assert {r.info.run_id for r in new} <= set(records)  # resumed into the stopped runs, none replaced
    after = [r for r in child_runs(client, summary["experiment_id"], summary["parent_run_id"])
             if r.data.params.get("train.seed") in {str(s) for s in seeds}]
    assert {r.info.run_id for r in after} == set(records) and len(records) == len(ARMS) * len(seeds)
    for run_id, record in records.items():
        assert record["status"] == client.get_run(run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "val_elbo")] == list(range(1, EPOCHS + 1))


def test_a_deterministic_failure_is_failed_and_the_other_seed_finishes(swept, replicated, monkeypatch, tmp_path):
    """Runs last: another seed list is another replicate set (its state replaces the one the tests above read)."""
    from study.replicate import run_replicates

    raw, summary, client, work = swept
    seeds = [2001, 2002]
    monkeypatch.setenv("STUDY_TEST_NAN_TRIAL", '"train.seed": 2002')  # matches that seed's sampled-config JSON
    params = parse_params(dict(raw, replicate={"num_seeds": 2, "seeds": seeds, "output": str(tmp_path / "r.json")}))
    result = run_replicates(params, workdir=work)
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(result))
    for arm in ARMS:
        finished, failed = result["arms"][arm]["replicates"]
        assert (finished["seed"], failed["seed"]) == (2001, 2002)
        assert finished["status"] == "FINISHED" and finished["epochs"] == EPOCHS
        assert failed["status"] == "FAILED" and "non-finite training loss" in failed["error"]
        assert failed["epochs"] == 1  # the hook fails epoch 2, after epoch 1 was reported
        run = client.get_run(failed["run_id"])
        assert run.info.status == "FAILED" and "NonFiniteLossError" in run.data.tags["failure_reason"]
        assert run.data.tags["replicate"] == "true" and run.data.tags["seed"] == "2002"
        assert client.get_run(finished["run_id"]).info.status == "FINISHED"
        # The deterministic error was not retrained on its retry (sweep.max_failures = 1): one epoch logged.
        assert [m.step for m in client.get_metric_history(failed["run_id"], "val_elbo")] == [1]
