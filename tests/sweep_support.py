"""Helpers for the sweep failure and cluster tests: tiny study params, MLflow queries, process cleanup.

Every process these tests start gets its own session (``start_new_session=True``); cleanup ends exactly the
processes of those sessions, found by session id, never by name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_params(work: Path, prepared: Path, **sweep: Any) -> dict[str, Any]:
    """A seconds-per-trial study on ``prepared`` (a prepared 32 x 32 sample) with its stores under ``work``.

    ``sweep`` entries replace those of the default sweep (3 trials, 2 at a time, FIFO, 3 epochs). Trials
    checkpoint every epoch (``train.checkpoint_interval_s: 0``) unless ``train`` says otherwise: the resume
    tests kill a trial after an epoch and expect it to continue from that epoch.
    """
    epochs = sweep.pop("epochs", 3)
    train = sweep.pop("train", {})
    likelihood = sweep.pop("likelihood", None)
    params: dict[str, Any] = {
        "datasets": {prepared.name: {"kind": "celeba"}},
        "prepare": {"resolution": 32, "output_root": str(prepared.parent)},
        "model": {"latent_dim": 16, "width": 8},
        "train": {"epochs": epochs, "batch_size": 8, "grid_size": 4, "checkpoint_interval_s": 0, **train},
        "sweep": {
            "name": "tiny",
            "dataset": prepared.name,
            "num_trials": 3,
            "max_concurrent": 2,
            "max_failures": 1,
            "scheduler": {"kind": "fifo"},
            "search_space": {"train.beta": {"distribution": "loguniform", "low": 0.5, "high": 2.0}},
            "storage_path": str(work / "ray_results"),
            "output": str(work / "results" / "sweep.json"),
        }
        | sweep,
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "artifact_root": str(work / "mlartifacts")},
        "report": {"output_dir": str(work / "reports")},
    }
    if likelihood is not None:
        params["likelihood"] = likelihood
    return params


def write_params(work: Path, params: dict[str, Any]) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def child_runs(client, experiment_id: str, parent_run_id: str) -> list:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000
    )


def steps(client, run_id: str, metric: str = "val_elbo") -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_env(**extra: str) -> dict[str, str]:
    """The environment of a pipeline subprocess: this venv first on PATH, no inherited tracking or Ray address."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    return env | extra


def start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own, stdout and stderr to ``log``."""
    out = open(log, "ab")  # noqa: SIM115 - closed with the process by the OS
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def session_processes(sid: int) -> list[int]:
    """Pids of the live processes in session ``sid`` (a session this test started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def end_session(sid: int, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process of session ``sid``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_processes(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while session_processes(sid) and time.time() < deadline:
            time.sleep(0.2)
        if not session_processes(sid):
            return


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5, proc: subprocess.Popen | None = None,
             log: Path | None = None):
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-4000:] if log and log.is_file() else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{tail}")
        time.sleep(poll_s)
    tail = log.read_text()[-4000:] if log and log.is_file() else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tail}")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def ray_cli_on_loopback(argv: list[str]) -> None:
    """Ray's own command line (``ray start ...``) for a cluster that lives on 127.0.0.1 alone.

    Ray swaps a loopback node address for the machine's LAN address (and its daemons then listen on every
    interface, and connect to the LAN address) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` puts it in
    single-machine mode, where ``ray start --address`` refuses to add a second node. So: single-machine mode
    for everything this command starts (its daemons, their workers, the jobs), and in this process only the
    refusal lifted and 127.0.0.1 kept as the address. The CLI itself runs unmodified.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported; inherited by the daemons
    from ray._private import ray_constants, services

    ray_constants.ENABLE_RAY_CLUSTER = True  # allows `ray start --address=...` here
    services.get_node_ip_address = lambda address=None: "127.0.0.1"
    services.resolve_ip_for_localhost = lambda host: "127.0.0.1" if host in LOOPBACK_HOSTS else host
    from ray.scripts.scripts import main

    sys.argv = ["ray", *argv]
    main()


if __name__ == "__main__" and sys.argv[1:2] == ["ray"]:  # python -m tests.sweep_support ray start ...
    ray_cli_on_loopback(sys.argv[2:])


def listening_addresses(sessions: list[int]) -> set[str]:
    """Local addresses (``host:port``) on which processes of ``sessions`` listen (TCP) or are bound (UDP)."""
    import re
    import shutil

    if shutil.which("ss") is None:
        return set()
    pids = {pid for sid in sessions for pid in session_processes(sid)}
    out = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        if any(int(p) in pids for p in re.findall(r"pid=(\d+)", line)):
            found.add(line.split()[4])
    return found


def http_answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status: Ray's dashboard wants its token)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
