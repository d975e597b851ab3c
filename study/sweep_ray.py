"""Ray in this process: the environment switches Ray must see, an embedded Ray on loopback or the cluster at
``RAY_ADDRESS``, and the addresses of the live nodes.

Ray runs embedded in the process by default, bound to 127.0.0.1; with ``RAY_ADDRESS`` set it joins that cluster
instead (``ray job submit ... -- python -m pipelines.sweep`` sets it for the job). Ray reads some switches only
once, when it is first imported, so every sweep module imports this one before ``ray``.
"""

from __future__ import annotations

import os
import signal
import threading
import time

# Ray must not phone home or bind to the network interface: set before ray is imported anywhere (init_ray
# re-applies the cluster and uv switches where ray was imported first).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Workers run the driver's interpreter (the project's venv) rather than re-resolving it through `uv run`.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# A checkpoint every epoch of a seconds-long trial is expected here, not a bottleneck worth a warning.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

import ray  # noqa: E402

LOOPBACK = "127.0.0.1"
#: ``STUDY_VERBOSE=1`` (or ``python -m pipelines.sweep --verbose``): Ray's and Tune's own console output as well
#: as the sweep's lines (see study/sweep_console.py).
VERBOSE_ENV = "STUDY_VERBOSE"


def verbose() -> bool:
    """Whether ``STUDY_VERBOSE`` asks for Ray's and Tune's own console output (``1`` / ``true`` / ``yes``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


class RayStartError(RuntimeError):
    """Ray did not come up within ``sweep.ray_start_timeout_s`` (the message names the cause and the setting)."""


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None, start_timeout_s: float | None = None) -> None:
    """Start an embedded Ray on loopback, or join ``RAY_ADDRESS`` when it is set. Idempotent.

    The embedded Ray is always a new instance (``address="local"``), never a cluster some earlier ``ray start``
    left running on this machine, which a bare ``ray.init()`` would join. ``num_cpus`` / ``num_gpus`` override
    what Ray detects (None: detect); they apply to the embedded Ray only.

    ``start_timeout_s``: how long to keep trying. Ray 2.60 gives its raylet a fixed 30 s to register with the GCS
    (``ray._private.node``, not configurable), which a loaded machine can miss; a failed attempt is shut down and
    retried until ``start_timeout_s`` has passed (None: one attempt).

    Raises:
        RayStartError: Ray could not be started or joined in time; one line naming Ray's reason and the setting.
    """
    if ray.is_initialized():
        return
    deadline = time.monotonic() + (start_timeout_s or 0.0)
    attempt = 0
    # Ray installs a SIGTERM handler of its own (sys.exit); keep the caller's, so a stage that turns SIGTERM into
    # an orderly stop (pipelines/sweep.py) still does. Read once, before the first attempt: a failed attempt
    # leaves Ray's handler installed, which a later attempt must not take for the caller's.
    caller_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    while True:
        attempt += 1
        try:
            _init_once(num_cpus, num_gpus)
            if callable(caller_sigterm):
                signal.signal(signal.SIGTERM, caller_sigterm)
            return
        except Exception as err:  # Ray raises a bare Exception for its start-up timeout
            ray.shutdown()
            if callable(caller_sigterm):
                signal.signal(signal.SIGTERM, caller_sigterm)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if time.monotonic() >= deadline:
                where = os.environ.get("RAY_ADDRESS") or "an embedded Ray on 127.0.0.1"
                raise RayStartError(
                    f"could not start {where} after {attempt} attempt(s) in {start_timeout_s or 0:g} s: {reason} "
                    "(raise sweep.ray_start_timeout_s in params.yaml on a loaded machine)"
                ) from None
            print(f"Ray did not start ({reason}); retrying", flush=True)


def _init_once(num_cpus: int | None, num_gpus: int | None) -> None:
    address = os.environ.get("RAY_ADDRESS")
    from ray._private import ray_constants

    # Ray reads these switches from the environment once, when it is first imported, which may have happened
    # before this module set them (a test session). Embedded or on a loopback cluster this process must
    # advertise 127.0.0.1, not the LAN address Ray substitutes for it; on a real cluster, its node's address.
    ray_constants.ENABLE_RAY_CLUSTER = bool(address) and not _is_loopback(address)
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"].lower() in ("1", "true")
    if address:
        ray.init(address=address, log_to_driver=verbose())
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            configure_logging=True,
            logging_level="WARNING",
            # The trials' ray.train INFO lines ("Checkpoint successfully created at: ...", one per epoch) are
            # worker output; quiet, they stay in Ray's session logs.
            log_to_driver=verbose(),
        )


def node_addresses() -> list[str]:
    """IP addresses of the live Ray nodes (for checks that an embedded Ray stayed on loopback)."""
    return [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
