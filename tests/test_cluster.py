"""The sweep on a real two-node Ray cluster, submitted as a Ray job, logging to a real MLflow server.

Everything listens on 127.0.0.1 only: a Ray head and a second node started with Ray's own ``ray start`` (each
with one CPU and its own custom resource, token authentication on), an ``mlflow server`` with a SQLite backend
and an artifact store in a temporary folder. The job ships a copy of the code and the prepared tiny data as its
working directory and runs ``python -m pipelines.sweep`` with the project's interpreter. Every process is
stopped by its session id at the end, whatever happens.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.sweep_support import (
    REPO,
    child_runs,
    end_session,
    free_port,
    http_answers,
    listening_addresses,
    stage_env,
    start,
    steps,
    tiny_params,
    wait_for,
)

pytest.importorskip("study.sweep")
pytestmark = pytest.mark.slow

LAUNCH = [sys.executable, "-m", "tests.sweep_support", "ray"]  # Ray's CLI, kept on 127.0.0.1 (see there)


def _ray(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    import subprocess

    proc = subprocess.run([*LAUNCH, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"ray {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _node_ports() -> list[str]:
    """Explicit free loopback ports for every per-node server (the defaults are fixed numbers other Ray
    instances on this machine may hold)."""
    ports = []
    for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
        ports += [flag, str(free_port())]
    return ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    temp = Path(f"/tmp/rayc_{secrets.token_hex(4)}")  # short: Ray's socket paths must fit in 107 bytes
    env = stage_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # set by study.sweep_ray in this process; it forbids nodes
    gcs, dashboard, mlflow_port = free_port(), free_port(), free_port()
    sessions = []
    try:
        mlflow = start(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
             str(root / "artifacts"), "--workers", "1"],
            root, env, root / "mlflow.log",
        )
        sessions.append(mlflow.pid)
        head = start(
            [*LAUNCH, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={free_port()}", "--num-cpus=1", '--resources={"node_a": 1, "study_trial": 1}',
             f"--temp-dir={temp}_a", "--disable-usage-stats", *_node_ports()],
            REPO, env, root / "head.log",
        )
        sessions.append(head.pid)
        wait_for(lambda: http_answers(f"http://127.0.0.1:{dashboard}/api/version") or None, 120, "the Ray head",
                 proc=head, log=root / "head.log")
        worker = start(
            [*LAUNCH, "start", "--block", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
             "--num-cpus=1", '--resources={"node_b": 1, "study_trial": 1}', f"--temp-dir={temp}_b",
             "--disable-usage-stats", *_node_ports()],
            REPO, env, root / "worker.log",
        )
        sessions.append(worker.pid)
        wait_for(lambda: "node_b" in _ray(env, "status", f"--address=127.0.0.1:{gcs}"), 120, "the second node",
                 poll_s=2, proc=worker, log=root / "worker.log")
        wait_for(lambda: http_answers(f"http://127.0.0.1:{mlflow_port}/health"), 120, "the MLflow server",
                 proc=mlflow, log=root / "mlflow.log")
        yield {"root": root, "env": env, "gcs": gcs, "dashboard": dashboard,
               "mlflow_uri": f"http://127.0.0.1:{mlflow_port}", "sessions": sessions}
    finally:
        for sid in reversed(sessions):
            end_session(sid)
        for suffix in ("_a", "_b"):
            shutil.rmtree(f"{temp}{suffix}", ignore_errors=True)


def _job_dir(root: Path, prepared: Path) -> Path:
    """The job's working directory: the code and the prepared tiny data, nothing else."""
    job = root / "job"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("study", "pipelines"):
        shutil.copytree(REPO / package, job / package, ignore=ignore)
    shutil.copytree(prepared, job / "data" / "prepared" / prepared.name)
    return job


def test_sweep_job_runs_trials_on_both_nodes_and_logs_to_the_server(cluster, prepared_32):
    from mlflow.tracking import MlflowClient

    root, env = cluster["root"], cluster["env"]
    job = _job_dir(root, prepared_32)
    params = tiny_params(root, prepared_32, epochs=2, num_trials=4, max_concurrent=2,
                         resources_per_trial={"cpu": 1, "custom": {"study_trial": 1}})
    params["prepare"]["output_root"] = "data/prepared"  # relative: the copy inside the job's working dir
    # With actor reuse, two-epoch trials can all chain on the head's worker while the second node is still
    # starting its first one (seen in CI): fresh processes make Ray place each trial, which is what is tested.
    params["sweep"]["reuse_actors"] = False
    (job / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": cluster["mlflow_uri"], "RAY_USAGE_STATS_ENABLED": "0"}}
    out = _ray(env, "job", "submit", f"--address=http://127.0.0.1:{cluster['dashboard']}", f"--working-dir={job}",
               f"--runtime-env-json={json.dumps(runtime_env)}", "--",
               sys.executable, "-m", "pipelines.sweep", "--params", "params.yaml", timeout=600)
    assert "succeeded" in out, out[-4000:]
    bound = listening_addresses(cluster["sessions"])  # the head, the node, the server and their children
    assert bound and all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for a in bound), bound

    nodes = json.loads(_ray(env, "list", "nodes", f"--address=http://127.0.0.1:{cluster['dashboard']}",
                            "--format=json", "--detail"))
    by_resource = {name: n["node_id"] for n in nodes for name in ("node_a", "node_b") if name in n["resources_total"]}
    assert set(by_resource) == {"node_a", "node_b"} and all(n["node_ip"] == "127.0.0.1" for n in nodes)

    summary = json.loads((root / "results" / "sweep.json").read_text())
    assert summary["num_trials"] == 4 and summary["num_failed"] == 0
    assert summary["tracking_uri"] == cluster["mlflow_uri"]
    assert set(summary["ray_node_addresses"]) == {"127.0.0.1"} and len(summary["ray_node_addresses"]) == 2

    client = MlflowClient(tracking_uri=cluster["mlflow_uri"])
    runs = child_runs(client, summary["experiment_id"], summary["parent_run_id"])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["ray_node_id"] for r in runs} == set(by_resource.values())  # both nodes ran trials
    assert all(r.data.tags["ray_node_ip"] == "127.0.0.1" for r in runs)
    for run in runs:
        assert steps(client, run.info.run_id) == [1, 2]
        assert "working_dir" in run.data.params["data_dir"] or "runtime_resources" in run.data.params["data_dir"]
        assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} >= {"checkpoint/state.pt"}
    stored = [p for p in (root / "artifacts").rglob("state.pt")]
    assert len(stored) == 4  # the artifacts went through the server into its destination folder
