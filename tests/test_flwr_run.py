"""`flwr run .` as a Flower user types it (README "Runs through `flwr run`").

* The pins and ``requires-python`` agree, so the dependency install that a
  SuperLink runs for every run (``uv sync`` of ``[project].dependencies``,
  Flower's default) can resolve; checked offline against the installed
  distributions' metadata.
* A simulation federation whose size is not ``num_workers`` is refused at
  once (strategies/federation.py), and ``task.num_workers`` must equal
  ``num_workers``.
* The real thing: the ``flwr`` CLI starts its managed local SuperLink (Flower's
  Simulation Runtime) in a temporary ``FLWR_HOME`` on free 127.0.0.1 ports,
  refuses the issue's 4-worker run on the default 2-node federation within
  seconds, then runs 3 rounds with 3 workers on a federation of 3
  (``--federation-config num-supernodes=3``; results in the default
  ``output_dir``, compared with the in-process twin). The SuperLink and
  everything it started are killed afterwards.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
import tomllib
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from regtopk_fl.paths import PROJECT_ROOT
from regtopk_fl.settings import ConfigError, validate
from strategies.federation import (FederationMismatch, check_simulation_size, is_simulation,
                                   mismatch_message, settled_node_count)

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
PYTHONS = [f"3.{minor}.0" for minor in range(8, 20)]


# -- requires-python against the pins --------------------------------------------------
def _pins():
    """(requirement, optional) for [project].dependencies and every extra."""
    project = PYPROJECT["project"]
    reqs = [(Requirement(r), False) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [(Requirement(r), True) for r in extra]
    # an extra that names the project's own extras (dev = regtopk-fl[tensorboard,...])
    # pins nothing itself: its extras are checked as extras
    return [(r, o) for r, o in reqs if r.name != project["name"]]


def test_requires_python_is_what_every_pin_supports():
    """uv resolves the project for every Python that ``requires-python``
    allows: each must be one that every pinned release supports (Flower's
    local SuperLink failed with 608 while this said >=3.10 and flwr 1.41
    needs >=3.11). Read from the installed releases' metadata; an optional
    extra that is not installed here (make installs only dev) is not checked."""
    ours = SpecifierSet(PYPROJECT["project"]["requires-python"])
    allowed = [v for v in PYTHONS if v in ours]
    assert allowed and f"{sys.version_info.major}.{sys.version_info.minor}.0" in allowed
    checked = 0
    for req, optional in _pins():
        (spec,) = req.specifier  # every dependency is pinned exactly
        assert spec.operator == "==", req
        try:
            meta = metadata.metadata(req.name)
        except metadata.PackageNotFoundError:
            assert optional, f"{req} is not installed"
            continue
        if meta["Version"] != spec.version:
            assert optional, f"{req.name} {meta['Version']} is installed, {spec} pinned"
            continue
        theirs = SpecifierSet(meta["Requires-Python"] or "")
        bad = [v for v in allowed if v not in theirs]
        assert not bad, (f"requires-python {ours} allows Python {bad}, but {req} needs "
                         f"{theirs}")
        checked += 1
    assert checked >= len(PYPROJECT["project"]["dependencies"])


def test_every_allowed_python_gets_ray_for_the_simulation_runtime():
    """flwr[simulation] brings ray only for some Pythons; runtime=flower and
    `flwr run` on a simulation federation need it."""
    ours = SpecifierSet(PYPROJECT["project"]["requires-python"])
    ray = [Requirement(r) for r in metadata.requires("flwr")
           if Requirement(r).name == "ray"]
    for v in (v for v in PYTHONS if v in ours):
        env = {"python_full_version": v, "python_version": v.rsplit(".", 1)[0],
               "extra": "simulation", "sys_platform": "linux"}
        assert any(r.marker is None or Marker(str(r.marker)).evaluate(env) for r in ray), v


# -- the refusal, without a SuperLink ----------------------------------------------------
class _Registering:
    """A grid whose nodes appear one by one, as Flower registers simulated nodes."""

    def __init__(self, total, every_s=0.05):
        self.total, self.every_s, self.t0 = total, every_s, time.monotonic()

    def get_node_ids(self):
        return list(range(min(self.total, int((time.monotonic() - self.t0) / self.every_s))))


def test_node_count_is_read_once_registration_settles():
    grid = _Registering(6, every_s=0.05)  # the last node appears after 0.3 s
    assert settled_node_count(grid, wait_s=10, settle_s=0.4, poll_s=0.01) == 6
    assert settled_node_count(_Registering(0), wait_s=0.2, settle_s=0.1, poll_s=0.01) == 0


def test_a_wrong_sized_simulation_federation_is_refused_in_one_line():
    with pytest.raises(FederationMismatch) as err:
        check_simulation_size(_Registering(2, every_s=0.01), 4, wait_s=5, settle_s=0.2)
    msg = str(err.value)
    assert msg == mismatch_message(2, 4) and "\n" not in msg
    for part in ("2 simulated SuperNodes", "num_workers=4",
                 "--run-config 'num_workers=2 task.num_workers=2'", "num-supernodes=4"):
        assert part in msg
    assert check_simulation_size(_Registering(3, every_s=0.01), 3, wait_s=5, settle_s=0.2) == 3


def test_only_the_simulation_grid_is_checked():
    """Under the Deployment Runtime (HttpGrid, GrpcGrid) nodes connect over
    minutes and extra nodes are refused by identity: no check there."""
    from flwr.superlink.grid import InMemoryGrid

    from strategies.hostile_grid import HostileGrid
    from strategies.polling_grid import PollingGrid

    sim = InMemoryGrid.__new__(InMemoryGrid)
    assert is_simulation(sim) and is_simulation(PollingGrid(sim))
    assert is_simulation(HostileGrid(PollingGrid(sim), {}, 0, 1, 1))  # wrappers of wrappers
    assert not is_simulation(_Registering(3)) and not is_simulation(PollingGrid(_Registering(3)))
    fake = types.SimpleNamespace(get_node_ids=lambda: [4, 5], close=lambda: "closed")
    grid = HostileGrid(fake, {}, 0, 1, 1)  # everything but send_and_receive delegated
    assert list(grid.get_node_ids()) == [4, 5] and grid.close() == "closed"


def test_deployment_goes_on_with_another_node_count():
    """Under the Deployment Runtime nothing is refused: after
    runtime.wait_for_nodes_s round 1 starts with the nodes there are, with a
    warning (an extra node, e.g. an impostor, is refused by identity)."""
    import logging

    import torch

    from regtopk_fl.fedround import Coordinator, FedServer
    from strategies.sparse_strategy import SparseAggregation

    class Grid:
        def __init__(self, nodes):
            self.nodes = nodes

        def get_node_ids(self):
            return list(self.nodes)

    logger, seen = logging.getLogger("strategies.sparse_strategy"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        for nodes, why in (([1, 2, 3, 4], "a node that holds no partition is refused"),
                           ([1, 2], "the absent ones count as missing")):
            s = SparseAggregation(Coordinator(FedServer(torch.zeros(4))), 3, wait_for_nodes_s=0)
            assert s._nodes(Grid(nodes)) == nodes
            assert seen[-1] == (f"round 1 starts with {len(nodes)} SuperNodes for "
                                f"num_workers=3 ({why})")
    finally:
        logger.removeHandler(handler)


def test_task_num_workers_must_follow_num_workers(make_cfg):
    """A run config that sets num_workers but not task.num_workers (Hydra
    interpolates it; `flwr run --run-config` does not) is refused."""
    validate(make_cfg(["num_workers=4"]))
    with pytest.raises(ConfigError, match=r"^task.num_workers=20: must equal num_workers=4"):
        validate(make_cfg(["num_workers=4", "task.num_workers=20"]))


# -- `flwr run` through the local SuperLink ----------------------------------------------
def _free_ports(n: int) -> list:
    """n distinct ports on 127.0.0.1 that nothing listens on (Flower's local
    SuperLink would otherwise take 39091 and 39093, and submit to whatever
    SuperLink already answers there)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _procs() -> dict:
    """pid -> (ppid, command line) of every process we may read."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out[int(d.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_tree(marker: str) -> None:
    """Kill the processes whose command line holds ``marker`` (the managed
    SuperLink names its log file under our FLWR_HOME) and all their
    descendants (its SuperExec, a simulation still running, Ray)."""
    procs = _procs()
    doomed = {pid for pid, (_, cmd) in procs.items() if marker in cmd}
    while True:
        kids = {pid for pid, (ppid, _) in procs.items() if ppid in doomed} - doomed
        if not kids:
            break
        doomed |= kids
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in doomed:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in doomed):
            time.sleep(0.2)


class LocalFlower:
    """The `flwr` CLI with its own FLWR_HOME and local-SuperLink ports."""

    def __init__(self, home: Path, cwd: Path):
        self.home, self.cwd = home, cwd
        bindir = str(Path(sys.executable).parent)  # flwr starts `flower-superlink` by name
        ports = _free_ports(2)  # (a port taken meanwhile: flwr says so, and __call__ fails)
        self.env = {**os.environ, "FLWR_HOME": str(home),
                    "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                    "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
                    "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1]),
                    # use the installed environment instead of uv-installing torch per run
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        self.flwr = str(Path(bindir) / "flwr")

    def __call__(self, *args, timeout=120) -> str:
        proc = subprocess.run([self.flwr, *args], cwd=self.cwd, env=self.env, timeout=timeout,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"flwr {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def run(self, run_config: str, *extra, timeout=300) -> tuple:
        """Submit a run and follow its log to the end (``--stream``; one CLI
        process instead of polling): (its ``flwr ls`` entry, its log)."""
        t0 = time.monotonic()
        log = self("run", str(PROJECT_ROOT), "--run-config", run_config, *extra, "--stream",
                   timeout=timeout)
        run_id = re.search(r"Successfully started run (\d+)", log).group(1)
        (run,) = json.loads(self("ls", "--run-id", run_id, "--format", "json"))["runs"]
        print(f"flwr run {run_config!r}: {run['status']} after {time.monotonic() - t0:.1f} s "
              f"(server side {run['elapsed']:.1f} s)")
        return run, log


@pytest.fixture
def local_flower(tmp_path):
    home, cwd = tmp_path / "flwr_home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    flower = LocalFlower(home, cwd)
    try:
        yield flower
    finally:  # the managed SuperLink is detached from us: find it by its FLWR_HOME
        _kill_tree(str(home))


def _twin(make_cfg, overrides, tmp_path):
    from regtopk_fl.runner import run_experiment

    run_experiment(make_cfg(["runtime=inprocess", "threads=1", *overrides]), tmp_path)
    return pd.read_csv(tmp_path / "metrics.csv")


def _check_rounds(metrics: pd.DataFrame, twin: pd.DataFrame, workers: int, rounds: int):
    assert list(metrics["round"]) == list(range(rounds + 1))
    after = metrics[metrics["round"] > 0]
    assert (after["replies"] == workers).all() and (after["sampled"] == workers).all()
    assert (after["missing"] == 0).all() and (after["rejected"] == 0).all()
    assert (after["uplink_bytes"] > 0).all()
    for col in ("uplink_bytes", "uplink_coded_bytes", "downlink_bytes", "downlink_coded_bytes",
                "replies", "sent"):
        assert list(metrics[col]) == list(twin[col]), col
    for col in ("loss", "gap"):  # Flower vs in-process: within 1e-6 (README)
        assert ((metrics[col] - twin[col]).abs() <= 1e-6 * twin[col].abs()).all(), col


@pytest.mark.slow
@pytest.mark.flower
def test_flwr_run_on_the_local_superlink(local_flower, make_cfg, tmp_path):
    t0 = time.monotonic()
    # the line on Flower's default federation (2 simulated SuperNodes)
    refused, log = local_flower.run("rounds=3 num_workers=4 task.num_workers=4")
    took = time.monotonic() - t0
    assert refused["status"] == "finished:failed", refused
    assert mismatch_message(2, 4) in refused["status-details"]
    assert f"regtopk-fl: {mismatch_message(2, 4)}" in log
    # at once, not after runtime.wait_for_nodes_s (600 s): the whole simulation process,
    # imports included, took 29 s at a load average of 18 on 2 cores
    assert refused["elapsed"] < 300, refused
    assert not (local_flower.cwd / "results").exists()  # refused before writing anything

    # a federation of 3 for this run; the results go to the default output_dir,
    # results/runs/flwr-run-<run id> under the directory the SuperLink started in
    run, _ = local_flower.run("rounds=3 num_workers=3 task.num_workers=3",
                              "--federation-config", "num-supernodes=3")
    assert run["status"] == "finished:completed", run
    out = local_flower.cwd / "results" / "runs" / f"flwr-run-{run['run-id']}"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["rounds"], summary["num_workers"]) == ("finished", 3, 3)
    _check_rounds(pd.read_csv(out / "metrics.csv"),
                  _twin(make_cfg, ["num_workers=3", "rounds=3"], tmp_path / "twin"), 3, 3)
    print(f"refused after {took:.1f} s, both runs in {time.monotonic() - t0:.1f} s")
