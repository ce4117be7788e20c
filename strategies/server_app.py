"""The Flower ServerApp.

``run_server`` is the whole server side of a run: initial model, central
evaluation every ``eval_every`` rounds, one metrics row per round, the same
files as an in-process run. Under the launcher it runs inside Flower's
Simulation Runtime (simulation/, which builds this app and the ClientApp);
under ``flwr run`` the module-level ``app`` reads the same settings from the
run config.
"""
from __future__ import annotations

import logging
import os

os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import torch  # noqa: E402
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from protocol import wire  # noqa: E402
from regtopk_fl import network, trust  # noqa: E402
from regtopk_fl.fedround import Coordinator, FedServer  # noqa: E402
from regtopk_fl.participation import from_cfg as participation_from_cfg  # noqa: E402
from regtopk_fl.results import ClientTiming  # noqa: E402
from regtopk_fl.runner import Progress, evaluate_due, round_row  # noqa: E402

from . import hostile_grid  # noqa: E402
from .identity import binding_from_cfg, warn_without_keys  # noqa: E402
from .sparse_strategy import SparseAggregation  # noqa: E402

log = logging.getLogger(__name__)


def run_server(grid: Grid, cfg, task, recorder, ckpt, device: str = "cpu",
               expect_client_device: str | None = None, node_hint=None) -> FedServer:
    """All rounds of a run (or the rest of them, after a checkpoint).
    ``expect_client_device``: the device every client must compute on (None:
    not checked); another one stops the run before round 1 (#21).
    ``node_hint``: node id -> the partition it probably holds (the launcher's
    simulation fills it from Flower's own table): whom to identify first
    under client sampling, never believed (strategies/sparse_strategy.py)."""
    faults = OmegaConf.to_container(cfg.faults) if "faults" in cfg else {}
    if hostile_grid.needed(faults):  # faults.hostile's omniscient attacker (#17)
        grid = hostile_grid.HostileGrid(grid, faults, int(cfg.seed), task.dim,
                                        int(cfg.num_workers))
    buffers = task.init_buffers()
    server = FedServer(task.init_params().cpu(), None if buffers is None else buffers.cpu(),
                       lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    trust.install(server, cfg, task, recorder)  # what the server believes (#11)
    # replicas are checked against the digest of the server's model
    coord = Coordinator(server, OmegaConf.select(cfg, "broadcast", default="gradient"),
                        verify=True)
    coord.start(range(int(cfg.num_workers)))
    net = network.settings(cfg)
    rounds, eval_every = int(cfg.rounds), int(cfg.eval_every)
    start, state = ckpt.load(recorder)
    if state is None:
        recorder.add(round_row(0, None, _evaluate(task, server, device), None, 0, 0, net))
    bar = Progress(rounds, bool(OmegaConf.select(cfg, "progress", default=False)),
                   f"{cfg.sparsifier.name} (flower)", initial=start - 1)

    timing = ClientTiming(wire.TIMING_PHASES)  # client_timing.csv
    recorder.attach(timing)

    def on_round(t: int, info: dict) -> None:
        timing.record(t, info.get("client_timing", ()))
        ev = _evaluate(task, server, device) if evaluate_due(t, eval_every, rounds) else {}
        row = round_row(t, info["outcome"], ev, info["plan"], info["missing"],
                        info["replies"], net, info.get("sampled"))
        row["rejected"] += info.get("rejected_extra", 0)
        recorder.add(row)
        bar.update(row)

    timeout = float(OmegaConf.select(cfg, "runtime.round_timeout_s", default=3600.0))
    identity = binding_from_cfg(cfg)  # node <-> partition (#11)
    # claims of a partition another node holds, since this start (#17)
    recorder.extras.append(lambda: {"identity_conflicts": identity.conflicts})
    strategy = SparseAggregation(coord, int(cfg.num_workers), on_round,
                                 wait_for_nodes_s=float(OmegaConf.select(
                                     cfg, "runtime.wait_for_nodes_s", default=600.0)),
                                 message_ttl_s=min(timeout, float(DEFAULT_TTL)),
                                 first_round=start, checkpointer=ckpt, recorder=recorder,
                                 identity=identity,
                                 participation=participation_from_cfg(cfg, task.num_examples()),
                                 expect_device=expect_client_device,  # no silent CPU (#21)
                                 device_setting=_gpu_setting(cfg), node_hint=node_hint,
                                 last_round=rounds)
    recorder.extras.append(lambda: {"client_threads": strategy.threads_in_use()})
    if state is not None:
        strategy.load_state_dict(state)
    if start <= rounds:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(),  # messages come from the plan
                       num_rounds=rounds - start + 1, timeout=timeout,
                       train_config=ConfigRecord())
    bar.close()
    if strategy.ray_nodes:  # #12: where the ClientApps ran (scripts/cluster_test.py reads it)
        log.info("replies per Ray node: %s", strategy.ray_nodes)
    recorder.save_model(server.params, server.buffers)
    return server


def _gpu_setting(cfg) -> str:
    """``runtime.client_gpus=<value>``: the setting a device refusal names."""
    return f"runtime.client_gpus={OmegaConf.select(cfg, 'runtime.client_gpus', default=None)!r}"


def _evaluate(task, server, device):
    with torch.no_grad():
        bufs = None if server.buffers is None else server.buffers.to(device)
        return task.evaluate(server.params.to(device), bufs)


# -- `flwr run` entry point -----------------------------------------------------
app = ServerApp()


def _log_to_run_stream() -> None:
    """The strategy's INFO lines (failed / missing replies per round) into the
    ServerApp's output, which `flwr log <run-id>` shows."""
    import sys

    for name in ("strategies", "regtopk_fl"):
        logger = logging.getLogger(name)
        if not any(getattr(h, "_regtopk", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            handler._regtopk = True
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(logging.INFO)


@app.main()
def flwr_main(grid: Grid, context: Context) -> None:
    from regtopk_fl.device import resolve_device
    from regtopk_fl.runner import run_experiment
    from regtopk_fl.settings import ConfigError, from_run_config, validate

    from .federation import FederationMismatch, check_simulation_size, is_simulation

    _log_to_run_stream()
    try:  # a refused run: one line in `flwr log`, status finished:failed in `flwr ls`
        cfg = from_run_config(dict(context.run_config))
        validate(cfg)
        if is_simulation(grid):  # a simulated federation's size is known at once
            check_simulation_size(grid, int(cfg.num_workers))
    except (ConfigError, FederationMismatch) as exc:
        log.error("regtopk-fl: %s", exc)
        raise
    warn_without_keys(cfg)  # trust on first use, said once at start (#17)
    # a relative output_dir is relative to the SuperLink's working directory;
    # re-running with the same output_dir resumes from its checkpoint
    out = OmegaConf.select(cfg, "output_dir") or f"results/runs/flwr-run-{context.run_id}"
    poll_s = OmegaConf.select(cfg, "runtime.poll_interval_s", default=None)
    if poll_s and not is_simulation(grid):  # HttpGrid waits 3 s between pulls; poll faster
        from .polling_grid import PollingGrid
        grid = PollingGrid(grid, float(poll_s))
    device = resolve_device(cfg.device)
    # an explicit device is every SuperNode's too; auto lets each node decide
    expect = cfg.device if cfg.device in ("cpu", "cuda") else None
    run_experiment(cfg, out, lambda cfg, task, sparsifier, recorder, ckpt:
                   run_server(grid, cfg, task, recorder, ckpt, device, expect))
