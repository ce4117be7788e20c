"""No silent CPU (#21): each client says in its identify answer which device
it computes on, and a run whose clients compute elsewhere than the run's
device stops before round 1 with one line naming ``runtime.client_gpus``
(exit status 2), in both directions.

This machine has no GPU, and settings.validate refuses ``device=cuda``
without one, so the direction "cuda expected, cpu found" is tested at the
strategy's level (a run that expects cuda, its clients' real identify
handler with ``torch.cuda.is_available`` patched to False); the other
direction ("cpu expected, a client sees cuda") runs the whole launcher with
Ray, patching the clients' processes only (no CUDA kernel is faked: the run
stops before any client computes).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from protocol import wire
from regtopk_fl.device import compute_device
from regtopk_fl.settings import ConfigError, to_run_config


def test_wire_carries_the_device():
    c = wire.identity_content(3, device="cuda")
    assert wire.read_identity(c) == 3 and wire.read_device(c) == "cuda"
    assert wire.read_device(wire.identity_content(3)) is None  # an older client


@pytest.mark.parametrize("setting,cuda,expect", [
    ("auto", False, "cpu"), ("auto", True, "cuda"), ("cuda", False, "cpu"),
    ("cuda", True, "cuda"), ("cpu", True, "cpu")])
def test_compute_device(monkeypatch, setting, cuda, expect):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert compute_device(setting) == expect


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Message() needs the process's task identity (Flower sets it in its processes)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 5)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


class _Nodes:
    """Nodes 100.. answering the strategy's identify with the ClientApp's handler."""

    def __init__(self, cfg, n):
        self.contexts = {100 + i: Context(run_id=5, node_id=100 + i,
                                          node_config={"partition-id": i, "num-partitions": n},
                                          state=RecordDict(), run_config=to_run_config(cfg))
                         for i in range(n)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from clients.client_app import handle_identify

        return [handle_identify(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def _strategy(make_cfg, expect, n=3):
    from regtopk_fl.fedround import Coordinator, FedServer
    from regtopk_fl.runner import build
    from strategies.sparse_strategy import SparseAggregation

    cfg = make_cfg(["task=linreg", f"num_workers={n}", "runtime=flower", "device=auto"])
    task, _ = build(cfg)
    coord = Coordinator(FedServer(task.init_params(), None, lr=0.01), "gradient", verify=True)
    coord.start(range(n))
    s = SparseAggregation(coord, n, wait_for_nodes_s=0, expect_device=expect,
                          device_setting="runtime.client_gpus=0.0")
    return s, _Nodes(cfg, n)


@pytest.mark.parametrize("expect,client_cuda,found", [("cuda", False, "cpu"),
                                                      ("cpu", True, "cuda")])
def test_mismatch_stops_before_round_1(make_cfg, monkeypatch, expect, client_cuda, found):
    from strategies.devices import DeviceMismatch

    s, nodes = _strategy(make_cfg, expect)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: client_cuda)  # the clients' view
    with pytest.raises(DeviceMismatch) as err:
        s.configure_train(1, ArrayRecord(), ConfigRecord(), nodes)
    msg = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in msg
    assert msg.startswith("runtime.client_gpus=0.0: node 10")
    assert f"computes on {found}, but this run's device is {expect}" in msg
    assert s.node_worker == {}  # nobody bound, nothing sent


def test_matching_devices_bind_and_train(make_cfg, monkeypatch):
    s, nodes = _strategy(make_cfg, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msgs = s.configure_train(1, ArrayRecord(), ConfigRecord(), nodes)
    assert len(msgs) == 3 and s.node_worker == {100: 0, 101: 1, 102: 2}


def test_a_late_node_on_another_device_is_left_out(make_cfg, monkeypatch, caplog):
    """After round 1 a new node on the wrong device does not stop the run: it
    is never bound, so never sent the model (and asked again next round)."""
    s, nodes = _strategy(make_cfg, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s.configure_train(1, ArrayRecord(), ConfigRecord(), nodes)
    nodes.contexts[200] = Context(run_id=5, node_id=200, node_config={
        "partition-id": 0, "num-partitions": 3}, state=RecordDict(),
        run_config=nodes.contexts[100].run_config)
    s.identity.node_partition.pop(100)  # partition 0's node went away
    nodes.contexts.pop(100)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    msgs = s.configure_train(2, ArrayRecord(), ConfigRecord(), nodes)
    assert 200 not in s.node_worker and {m.metadata.dst_node_id for m in msgs} == {101, 102}
    assert "node 200 not identified: runtime.client_gpus=0.0" in caplog.text


def test_a_node_that_does_not_say_is_let_through(caplog):
    from strategies.devices import screen_devices

    kept = screen_devices([(7, 0)], {7: None}, "cuda", "runtime.client_gpus='auto'", True)
    assert kept == [(7, 0)] and "does not say" in caplog.text
    assert screen_devices([(7, 0)], {7: "cpu"}, None, "x", True) == [(7, 0)]  # not checked


SITE = """
import os, sys
# Ray's worker processes only: the client sees a CUDA device it does not have
if os.environ.get("REGTOPK_TEST_CLIENT_CUDA") == "1" and \\
        os.path.basename(sys.argv[0] if sys.argv else "") == "default_worker.py":
    import torch
    torch.cuda.is_available = lambda: True
"""


@pytest.mark.flower
@pytest.mark.slow
def test_run_refused_when_a_client_sees_cuda_and_the_run_is_on_the_cpu(tmp_path):
    """The whole launcher: device=auto resolves to the CPU here, Ray's worker
    processes are told they see CUDA; the first identify answer stops the
    run: one line naming runtime.client_gpus, exit status 2, no run
    directory left behind."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITE))
    run_dir = tmp_path / "run"
    env = dict(os.environ, REGTOPK_TEST_CLIENT_CUDA="1",
               PYTHONPATH=os.pathsep.join([str(site), os.getcwd(),
                                           os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "regtopk_fl", "runtime=flower", "task=linreg", "num_workers=2",
         "rounds=2", "device=auto", "checkpoint.every=0", "progress=false",
         f"hydra.run.dir={run_dir}"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("regtopk-fl: error: runtime.client_gpus='auto': node "), last
    assert "computes on cuda, but this run's device is cpu" in last
    assert not run_dir.exists()
