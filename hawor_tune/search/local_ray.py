"""Ray for a search: join a cluster, or start an embedded local Ray that listens on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """While Ray starts, make loopback this machine's node IP, so every Ray process listens on it alone.

    Ray binds its GCS, raylet (node and object manager), worker, dashboard-agent and runtime-env-agent
    ports to all interfaces unless the node IP is a loopback address, and ``ray.init`` turns an explicit
    ``_node_ip_address="127.0.0.1"`` into the machine's outward IP. Only Ray's single-machine switch
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once at import into ``ray_constants``) keeps loopback;
    it is set for the start only, in this process and in the environment the Ray processes inherit.
    """
    from ray._private import ray_constants

    env_var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(env_var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[env_var], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(env_var, None)
        else:
            os.environ[env_var] = saved_env


def start_ray(address: str | None, dashboard_port: int, num_cpus: int | None = None) -> str | None:
    """Join a cluster (``address``) or start an embedded local Ray that listens on 127.0.0.1 only: GCS,
    raylet, workers, agents and the dashboard (whose token the user pastes, see ``ray get-auth-token``).

    The local Ray runs its workers, so the trials, at the user's own priority (nice 0, as a plain training
    run), not at Ray's default nice 15, where every CPU cycle that the driver, Ray's daemons or anything else
    on the machine wants is taken from the trials first. It starts no idle workers ahead of time (Ray's
    default starts one per CPU when the driver connects): a Tune trial never runs in one, because Tune gives
    its trial actors a runtime environment of their own (an environment variable) and Ray only hands an
    actor an idle worker started with the same one, so they would only take CPU from the start-up. A
    cluster keeps its own settings.

    Returns:
        The dashboard URL, when there is one.
    """
    if ray.is_initialized():
        return None
    if address:
        ctx = ray.init(address=address, logging_level=logging.WARNING)
    else:
        with _loopback_node():
            # "local": a Ray of its own, even when another one runs on this machine (without it, ray.init
            # joins the latest cluster started here: another user's search, or a test's cluster).
            ctx = ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK,
                           include_dashboard=True, dashboard_host=LOOPBACK, dashboard_port=dashboard_port,
                           logging_level=logging.WARNING,
                           _system_config={"worker_niceness": 0, "prestart_worker_first_driver": False})
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url
