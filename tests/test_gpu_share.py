"""runtime.client_gpus (regtopk_fl/gpu_share.py): the arithmetic of the
``auto`` rule on made-up measurements, and the one-line refusals of shares
that would let no client run (or run on the CPU under a CUDA run)."""
import os
import subprocess
import sys

import pytest

from regtopk_fl import gpu_share
from regtopk_fl.gpu_share import Measurement, choose, clients_at_once, fraction_for
from regtopk_fl.settings import ConfigError

GIB = 1 << 30


def _m(peak_gib, context_gib, free_gib, total_gib=80.0):
    return Measurement(int(peak_gib * GIB), int(context_gib * GIB), int(free_gib * GIB),
                       int(total_gib * GIB))


def _never():
    raise AssertionError("measured although nothing needed measuring")


def test_clients_at_once():
    assert clients_at_once(8, None, 16, 1) == 8  # Fig. 3: all 8 at once on 16 CPUs
    assert clients_at_once(64, 16, 16, 1) == 16  # N = 64, m = 16 sampled
    assert clients_at_once(64, None, 16, 2) == 8  # two CPUs per client
    assert clients_at_once(100, 10, 2, 1) == 2  # this 2-core machine


@pytest.mark.parametrize("per_gpu,at_once,gpus,frac", [
    (63, 8, 1, 0.125), (63, 16, 1, 0.0625), (3, 8, 1, 0.3333), (7, 7, 1, 0.1428),
    (63, 16, 2, 0.125), (63, 1, 1, 1.0), (1, 8, 1, 1.0), (63, 9, 1, 0.1111)])
def test_fraction_lets_that_many_run_per_gpu(per_gpu, at_once, gpus, frac):
    f = fraction_for(per_gpu, at_once, gpus)
    assert f == pytest.approx(frac, abs=1e-12)
    a = min(per_gpu, -(-at_once // gpus))
    assert int(1 / f + 1e-9) >= a  # Ray fits a clients with this share on one GPU
    assert a * f <= 1.0 + 1e-12


def test_auto_on_cuda_from_one_measurement():
    # ResNet-18-like client: 0.6 GiB peak + 0.5 GiB context; 78 GiB free
    s = choose("auto", "cuda", 1, 16, 1, 8, lambda: _m(0.6, 0.5, 78))
    assert s.per_gpu == int(0.9 * 78 / 1.1) == 63 and s.fraction == 0.125
    assert "8 at once" in s.why and "0.125" in s.why
    rec = s.record()
    assert rec["client_gpus"] == 0.125 and rec["client_gpu_bytes"] == int(0.6 * GIB) + int(0.5 * GIB)
    # little free memory: fewer per GPU than would run at once
    s = choose("auto", "cuda", 1, 16, 1, 8, lambda: _m(4.0, 1.0, 16))
    assert s.per_gpu == 2 and s.fraction == 0.5
    # two GPUs share the clients
    assert choose("auto", "cuda", 2, 16, 1, 16, lambda: _m(0.6, 0.5, 78)).fraction == 0.125


def test_auto_refuses_a_client_that_does_not_fit():
    with pytest.raises(ConfigError) as err:
        choose("auto", "cuda", 1, 16, 1, 8, lambda: _m(30.0, 1.0, 20))
    msg = str(err.value)
    assert msg.startswith("runtime.client_gpus='auto': one client needs 31.00 GiB")
    assert "\n" not in msg


def test_cpu_runs_ask_for_no_gpu():
    for setting in ("auto", 0.5, 0.0):
        s = choose(setting, "cpu", 0, 16, 1, 8, _never)
        assert s.fraction == 0.0 and "device=cpu" in s.why


def test_explicit_shares():
    assert choose(0.25, "cuda", 1, 16, 1, 8, _never).fraction == 0.25
    with pytest.raises(ConfigError, match=r"^runtime.client_gpus=0.0: the run's device is cuda"):
        choose(0.0, "cuda", 1, 16, 1, 8, _never)  # the clients would train on the CPU
    with pytest.raises(ConfigError, match=r"^runtime.client_gpus=0.5: no GPU is visible"):
        choose(0.5, "cuda", 0, 16, 1, 8, _never)


def test_client_cpus_above_the_machine_is_refused():
    with pytest.raises(ConfigError, match=r"^runtime.client_cpus=32.0: this machine has 16 CPUs"):
        choose("auto", "cpu", 0, 16, 32.0, 8, _never)


def test_client_share_reads_the_config(make_cfg):
    cfg = make_cfg(["runtime=flower", "num_workers=64", "participation.clients_per_round=16"])
    assert cfg.runtime.client_gpus == "auto"  # the default
    s = gpu_share.client_share(cfg, "cpu", measure=_never)
    assert s.fraction == 0.0
    got = {}

    def fake():
        got["called"] = True
        return _m(0.2, 0.5, 78)

    s = gpu_share.choose("auto", "cuda", 1, 16, 1, clients_at_once(64, 16, 16, 1), fake)
    assert got and s.fraction == 0.0625  # N = 64, m = 16 on 16 CPUs: 16 per GPU


def test_a_failed_measurement_splits_the_gpu_evenly(caplog):
    def boom():
        raise RuntimeError("CUDA error: out of memory")

    s = choose("auto", "cuda", 1, 16, 1, 8, boom)
    assert s.fraction == 0.125 and "measuring one client failed" in s.why
    assert "out of memory" in caplog.text


def test_measure_client_runs_one_local_update(make_cfg, monkeypatch):
    """The measurement's plumbing on the CPU (torch.cuda's counters made up):
    one local update of worker 0 on a scratch memory, the run's sparsifier
    untouched."""
    import copy

    import torch

    from regtopk_fl.runner import build

    cfg = make_cfg(["task=tiny_image", "num_workers=2", "sparsifier=regtopk"])
    task, sp = build(cfg)
    before = copy.deepcopy(sp.__dict__)
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 3 * GIB // 10)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: GIB // 10)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (70 * GIB, 80 * GIB))
    m = gpu_share.measure_client(task, sp, cfg, device="cpu")
    assert calls[:2] == ["sync", "reset"]
    assert m.peak_bytes == 3 * GIB // 10 and m.free_bytes == 70 * GIB
    assert m.context_bytes == 10 * GIB - GIB // 10  # in use outside the allocator
    assert sp.__dict__.keys() == before.keys()


@pytest.mark.slow
def test_launcher_refuses_unschedulable_clients(tmp_path):
    """More CPUs per client than the machine has: one line, exit status 2,
    before Ray starts, and the run directory it had created is gone."""
    run_dir = tmp_path / "run"
    cpus = (os.cpu_count() or 1) + 1
    out = subprocess.run(
        [sys.executable, "-m", "regtopk_fl", "runtime=flower", "task=linreg", "num_workers=2",
         "rounds=1", f"runtime.client_cpus={cpus}", "checkpoint.every=0", "progress=false",
         f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"regtopk-fl: error: runtime.client_cpus={cpus}: this machine has "
        f"{os.cpu_count()} CPUs, so no client could be scheduled")
    assert not run_dir.exists()
