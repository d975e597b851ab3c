"""``init_ray`` keeps the caller's SIGTERM handler also when Ray's start-up needed a retry.

``ray.init`` installs its own SIGTERM handler (``sys.exit``) before it connects (``ray._private.worker.init``),
so a failed attempt leaves it installed. The stage's handler (SIGTERM -> the orderly Ctrl+C stop,
``pipelines/sweep.py``) must be the one in place after a retried start, or a stopped stage exits without marking
its runs KILLED. Ray's start-up timeout cannot be provoked on demand, so ``_init_once`` is replaced by a function
that does what ``ray.init`` does to the handler: installs its own, then fails once and succeeds the next time.
"""

from __future__ import annotations

import signal

import study.sweep_ray as sweep_ray


def test_a_retried_start_keeps_the_callers_sigterm_handler(monkeypatch):
    attempts = []

    def rays_handler(signum, frame):  # what ray.init installs
        raise SystemExit(signum)

    def init_once(num_cpus, num_gpus):
        signal.signal(signal.SIGTERM, rays_handler)
        attempts.append(1)
        if len(attempts) == 1:
            raise Exception("The current node timed out during startup.")

    def callers_handler(signum, frame):
        pass

    monkeypatch.setattr(sweep_ray.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(sweep_ray.ray, "shutdown", lambda: None)
    monkeypatch.setattr(sweep_ray, "_init_once", init_once)
    previous = signal.signal(signal.SIGTERM, callers_handler)
    try:
        sweep_ray.init_ray(start_timeout_s=60)
        assert len(attempts) == 2
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_private_ray_switches_it_sets_still_exist_and_take_effect(monkeypatch):
    """``_init_once`` sets two of Ray's import-time switches (``ray._private.ray_constants``) in case Ray was
    imported before ``study.sweep_ray`` could set their environment variables. That module is private: this test
    pins the names, so a Ray upgrade that renames or drops them fails here instead of silently binding an embedded
    Ray to the network interface."""
    from ray._private import ray_constants

    for name in ("ENABLE_RAY_CLUSTER", "RAY_ENABLE_UV_RUN_RUNTIME_ENV"):
        assert isinstance(getattr(ray_constants, name), bool), name
    seen = {}

    def fake_init(**kwargs):  # what ray.init would read: the switches as they are when it runs
        seen.update(kwargs, cluster=ray_constants.ENABLE_RAY_CLUSTER, uv=ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV)

    monkeypatch.setattr(sweep_ray.ray, "init", fake_init)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setattr(ray_constants, "RAY_ENABLE_UV_RUN_RUNTIME_ENV", True)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    sweep_ray._init_once(None, None)
    assert seen["cluster"] is False and seen["uv"] is False  # embedded: loopback only, the driver's interpreter
    assert seen["address"] == "local" and seen["_node_ip_address"] == "127.0.0.1"
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    sweep_ray._init_once(None, None)
    assert seen["cluster"] is True and seen["address"] == "10.1.2.3:6379"  # a real cluster: its node's address
