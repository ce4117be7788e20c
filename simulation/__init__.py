"""The launcher's ``runtime=flower``: the ServerApp (strategies/) and the
ClientApp (clients/) in Flower's Simulation Runtime on Ray. This is the one
place that builds both apps, so neither app folder imports the other.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from clients.client_app import make_client_app  # noqa: E402
from regtopk_fl.ray_cluster import ray_init_address, ray_local_cpus  # noqa: E402
from regtopk_fl.device import resolve_device  # noqa: E402
from regtopk_fl.gpu_share import client_share  # noqa: E402
from strategies.server_app import run_server  # noqa: E402

from .delivery import node_directory, prompt_delivery  # noqa: E402


# how often the ServerApp looks for the clients' replies (Flower's default 0.1 s
# is a tenth of a second per round; a GPU round computes in a few tens of ms)
PULL_INTERVAL_S = 0.01


def run_simulation(cfg, task, sparsifier, recorder, ckpt) -> None:
    """The launcher's runtime=flower: Flower's Simulation Runtime, Ray backend."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    settings = OmegaConf.to_container(cfg, resolve=True)
    settings.pop("hydra", None)
    device = resolve_device(cfg.device)
    server_app = ServerApp()

    # each client's share of a GPU (runtime.client_gpus, regtopk_fl/gpu_share.py):
    # refused here, before Ray starts, when no client could run as asked; on a
    # cluster the GPUs are the worker nodes', not necessarily the driver's (#12)
    on_cluster = bool(ray_init_address(cfg))
    share = client_share(cfg, device, task, sparsifier, on_cluster)
    if recorder is not None:
        recorder.extras.append(share.record)  # into summary.json
    gpus = share.fraction
    # no silent CPU (#21): a client with a GPU share computes on cuda, one
    # without on the CPU; a client that says otherwise stops the run
    expect = "cuda" if gpus > 0 else "cpu"
    # node id -> partition id, as Flower's Simulation Runtime registers its
    # nodes: whom the server identifies first under sampling (#34)
    directory: dict = {}

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if hasattr(grid, "pull_interval"):  # the in-memory grid looks for replies every 0.1 s
            grid.pull_interval = min(float(grid.pull_interval), PULL_INTERVAL_S)
        run_server(grid, cfg, task, recorder, ckpt, device, expect_client_device=expect,
                   node_hint=directory)

    level = str(cfg.runtime.log_level).upper()
    logging.getLogger("flwr").setLevel(level)
    backend = {"client_resources": {"num_cpus": float(cfg.runtime.client_cpus), "num_gpus": gpus},
               "init_args": {"logging_level": level, "log_to_driver": level == "DEBUG",
                             "include_dashboard": False}}
    backend["init_args"].update(ray_init_address(cfg))  # #12: attach to a running cluster
    backend["init_args"].update(ray_local_cpus(cfg))  # a local Ray: the CPUs it may use
    tmp = None
    if settings["runtime"].get("state_dir", "auto") == "auto":
        settings["runtime"]["state_dir"] = None  # on a cluster: in context.state
        if not OmegaConf.select(cfg, "runtime.ray_address", default=None):
            # the clients' memories and replicas in files on this machine, not in
            # the Contexts that Ray ships to and from the actors with every message
            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
                else None
            tmp = settings["runtime"]["state_dir"] = tempfile.mkdtemp(
                prefix="regtopk-fl-state-", dir=shm)
            settings["runtime"]["state_inplace"] = True  # scratch: clients/state_files.py
            if task is not None:  # what the driver built, for the actors (Task.share)
                settings["task"].update(task.share(Path(tmp) / "task"))
    prompt = bool(OmegaConf.select(cfg, "runtime.prompt_delivery", default=True))
    try:
        with prompt_delivery() if prompt else contextlib.nullcontext(), \
                node_directory(directory):
            flwr_run_simulation(server_app=server_app, client_app=make_client_app(settings),
                                num_supernodes=int(cfg.num_workers), backend_config=backend)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
