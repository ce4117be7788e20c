"""runtime=flower on an existing Ray cluster (``runtime.ray_address``).

Flower's Ray backend (flwr 1.41, ``RayBackend.init_ray``) calls
``ray.init(runtime_env={"env_vars": {"PYTHONPATH": ...}}, **init_args)`` with
the simulation's ``backend_config["init_args"]``, unless Ray is initialised
already. So attaching to a cluster is one more init argument, ``address``:
``auto`` (the cluster this machine belongs to, or RAY_ADDRESS),
``host:port`` (its GCS) or ``ray://host:port`` (Ray Client). Flower then sizes
its actor pool from all alive nodes' resources and Ray places the ClientApp
actors across them. The driver (this process) runs the ServerApp and writes
the results; every node imports the project and reads the task's data from
the same paths (docs/ray-cluster.md).
"""
from __future__ import annotations

import logging
import os

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def ray_init_address(cfg) -> dict:
    """The extra ``ray.init`` arguments of ``runtime.ray_address`` ({} = start a local Ray)."""
    address = OmegaConf.select(cfg, "runtime.ray_address", default=None)
    return {} if address in (None, "") else {"address": str(address)}


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), which can be
    fewer than the machine's: ``taskset``, ``numactl``, a cpuset container."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity masks (macOS)
        return os.cpu_count() or 1


def _ray_cpu_count() -> int | None:
    """Ray's own count of this node's CPUs (the machine's, or a cgroup quota
    below it), None where Ray cannot say."""
    try:
        from ray._private.utils import get_num_cpus

        return int(get_num_cpus(override_docker_cpu_warning=True))
    except Exception:  # noqa: BLE001 - no Ray, or a Ray without this helper
        return None


def ray_local_cpus(cfg) -> dict:
    """The ``num_cpus`` of a local Ray (``runtime.num_cpus``), {} = Ray's own
    count. Ray counts the machine's CPUs and a cgroup quota, not the
    affinity mask: a process held to 2 of 16 cores (``taskset``,
    ``numactl``, a cgroup-v2 cpuset) would get 16 one-CPU client actors on
    2 cores. ``auto`` gives Ray the usable CPUs where they are fewer than
    the machine's (and never more than Ray's own count, so a quota still
    holds); an integer is taken as it is. Never when attaching to a cluster
    (``runtime.ray_address``, or ``RAY_ADDRESS`` exported, which ``ray.init``
    follows): its nodes declare their own, and Ray refuses ``num_cpus``."""
    v = OmegaConf.select(cfg, "runtime.num_cpus", default="auto")
    if ray_init_address(cfg) or os.environ.get("RAY_ADDRESS"):
        if v not in (None, "auto") and not ray_init_address(cfg):  # (settings refuse the other)
            log.warning("runtime.num_cpus=%s is not used: RAY_ADDRESS=%s attaches to a "
                        "cluster, whose nodes declare their own CPUs", v,
                        os.environ["RAY_ADDRESS"])
        return {}
    if v is None:
        return {}
    if v == "auto":
        usable = usable_cpus()
        if usable >= (os.cpu_count() or usable):
            return {}
        ray_count = _ray_cpu_count()
        return {"num_cpus": min(usable, ray_count) if ray_count else usable}
    return {"num_cpus": int(v)}


def ray_cpu_share() -> int | None:
    """The CPUs Ray assigned to this process, floored (at least 1), when it
    is a Ray worker with a CPU share (the simulation's ClientApp actors:
    ``runtime.client_cpus``); None elsewhere (the driver, SuperNodes)."""
    import sys

    ray = sys.modules.get("ray")  # never import Ray where it is not running already
    if ray is None or not ray.is_initialized():
        return None
    try:
        ctx = ray.get_runtime_context()
        if ctx.worker.mode != ray.WORKER_MODE:
            return None
        cpus = ctx.get_assigned_resources().get("CPU")
    except Exception:  # not inside a task/actor, or an old Ray
        return None
    return max(1, int(cpus)) if cpus else None


def ray_node_id() -> str | None:
    """The Ray node this process runs on, when it is a Ray worker (the
    simulation's ClientApp actors); None elsewhere (SuperNodes, in-process)."""
    import sys

    ray = sys.modules.get("ray")  # never import Ray where it is not running already
    if ray is None or not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # not inside a task/actor, or an old Ray
        return None
