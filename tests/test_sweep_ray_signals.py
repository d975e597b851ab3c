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
