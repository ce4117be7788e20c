"""scripts/gpu_checks.sh and scripts/gpu_bench.py without a GPU: the time
budget (every step skipped with "not run: budget" when none is left), the
results file written step by step, and the numbers it derives (s/round,
model agreement). The whole script on the CPU with tiny settings is
``make gpu-smoke`` (a few minutes: three Ray starts)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_bench  # noqa: E402


def test_no_budget_skips_every_step(tmp_path):
    data = tmp_path / "data.tar.gz"
    data.write_bytes(b"")  # only checked for existence before the steps
    env = dict(os.environ, OUT=str(tmp_path / "out"), BUDGET_S="0", DEVICE="cpu",
               BUNDLE=str(tmp_path / "no-bundle.tar.xz"), DATA=str(data), PY=sys.executable,
               RUNS=str(tmp_path / "runs"))
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_checks.sh")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "gpu_summary.json").read_text())
    assert set(res) == {"env", "inprocess", "flower", "flower_mps", "many"}
    for step in res.values():
        assert step["skipped"].startswith("not run: budget (")
    md = (tmp_path / "out" / "gpu_summary.md").read_text()
    assert md.count("not run: budget") == 4  # the four measuring steps, each named
    log = (tmp_path / "out" / "run.log").read_text()
    assert "== flower: not run: budget" in log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gpu_summary.json", "gpu_summary.md", "run.log"]  # $OUT takes at most 8 files


@pytest.mark.parametrize("env, says", [
    ({}, None),  # the defaults fit the device's 600 s a call
    ({"BUDGET_S": "400", "CAP_S": "130"}, "BUDGET_S=400 CAP_S=130: the parts may take 660 s"),
    ({"CAP_S": "0", "CUDA_TESTS": "0", "BUDGET_S": "500"}, None),  # 580 s
    ({"CAP_S": "0", "CUDA_TESTS": "0", "BUDGET_S": "520"}, "may take 600 s, over LIMIT_S=590"),
    ({"BUDGET_S": "5m"}, "BUDGET_S=5m: must be a whole number of seconds"),
    ({"CUDA_TESTS": "yes"}, "CUDA_TESTS=yes: must be a whole number"),
])
def test_gpu_session_refuses_settings_over_one_device_call(tmp_path, env, says):
    """gpu_session.sh adds up its parts' caps before it starts: over LIMIT_S
    (or not a number) it exits 2 with one line and writes nothing."""
    out = tmp_path / "out"
    run = dict(os.environ, OUT=str(out), PY="false", **env)
    if says is None:  # a setting that fits: only check the sum (LIMIT_S=itself)
        worst = (int(env.get("BUDGET_S", 300)) + 15 + 50 * (env.get("CUDA_TESTS", "1") != "0")
                 + 65 + int(env.get("CAP_S", 100)))
        assert worst <= 590
        run["LIMIT_S"] = str(worst - 1)  # one second less is refused: the sum is the one above
        says = f"may take {worst} s, over LIMIT_S={worst - 1}"
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh")], env=run,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stdout[-1000:]
    assert says in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_record_merges_and_renders(tmp_path):
    gpu_bench.record(tmp_path, "inprocess", {"width": 64, "workers": 8, "floor_images": 160,
                                            "floor": {"batch_ms": 20.0}})
    gpu_bench.record(tmp_path, "inprocess", {"runs": {"topk-loop": {"s_per_round": 0.1,
                                                                    "x_floor": 5.0}}})
    gpu_bench.record(tmp_path, "flower", {"stopped": "stopped after its 200 s cap"})
    res = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert res["inprocess"]["floor"]["batch_ms"] == 20.0  # kept across calls
    md = (tmp_path / "gpu_summary.md").read_text()
    assert "| topk-loop | 0.1 | 5x |" in md and "**flower**: stopped after" in md


def test_per_round_leaves_out_start_up_and_the_final_evaluation(tmp_path):
    with open(tmp_path / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["round", "wall_s"])
        for r, t in enumerate([0.0, 5.0, 5.1, 5.3, 5.4, 9.0]):  # start-up, 3 rounds, eval
            w.writerow([r, t])
    assert gpu_bench.per_round(tmp_path) == pytest.approx(0.1)


def test_agreement(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    p = torch.arange(1.0, 5.0)
    torch.save({"params": p, "buffers": None}, a / "model.pt")
    torch.save({"params": p.clone(), "buffers": None}, b / "model.pt")
    assert gpu_bench.agreement(a, b) == {"maxrel": 0.0, "bitwise": True}
    torch.save({"params": p + torch.tensor([0, 0, 0, 4e-6]), "buffers": None}, a / "model.pt")
    ag = gpu_bench.agreement(a, b)
    assert not ag["bitwise"] and ag["maxrel"] == pytest.approx(1e-6, rel=0.1)  # fp32 steps


def test_the_short_flower_check_runs_end_to_end_on_the_cpu(tmp_path):
    """scripts/gpu_flower_check.sh with tiny settings (the CPU standing in):
    the in-process twin and Flower, each with the server's steps and the
    clients' phases, MPS said to be absent, the final models compared."""
    import re

    data = tmp_path / "data.tar.gz"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_data.py"), "synthetic", str(data),
                    "--train", "100", "--test", "10"], check=True, capture_output=True)
    env = dict(os.environ, OUT=str(tmp_path / "out"), DEVICE="cpu", ROUNDS="3", WIDTH="4",
               WORKERS="3", DATA=str(data), BUNDLE=str(tmp_path / "none"), PY=sys.executable,
               RUNS=str(tmp_path / "runs"))
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_flower_check.sh")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    log = (tmp_path / "out" / "flower_check.log").read_text()
    assert "runtime=inprocess, Fig. 3 (topk)" in log and "runtime=flower, Fig. 3 (topk)" in log
    assert "== flower_mps: not run (no CUDA MPS here)" in log
    assert re.search(r"= +[0-9.]+  SparseAggregation.aggregate_train", log)
    assert re.search(r"a client's train message \(medians, ms\): build [0-9.]+, model", log)
    agree = re.search(r"flower vs inprocess, final models: \{'maxrel': ([0-9.e+-]+)", log)
    assert agree and float(agree.group(1)) < 1e-3  # the same run, other thread counts


@pytest.mark.skipif(not __import__("shutil").which("taskset"), reason="no taskset here")
@pytest.mark.parametrize("env, calls", [
    ({"CASES": "cifar10", "REPEAT": "3", "SPARSIFIERS": "0"}, 1),
    ({"QUICK": "1"}, 2),
])
def test_device_cpu_bench_passes_its_settings(tmp_path, env, calls):
    """scripts/device_cpu_bench.sh hands CASES / REPEAT to bench_runtimes.py
    with device=cpu and the data archive, under taskset and with CUDA hidden,
    then (unless SPARSIFIERS=0) the sparsifier benchmark; a failing part
    makes it exit 1 and is named."""
    fake = tmp_path / "py"
    rec = tmp_path / "calls.txt"
    fake.write_text(f'#!/bin/sh\necho "CVD=[$CUDA_VISIBLE_DEVICES] $*" >> {rec}\n'
                    f'[ -z "$FAIL" ] || case "$*" in *bench_*) exit 3;; esac\n')
    fake.chmod(0o755)
    run = dict(os.environ, OUT=str(tmp_path / "out"), PY=str(fake), BUNDLE="none",
               DATA="/data/x.tar.gz", CORES="0", **env)  # CPU 0: on any machine
    out = subprocess.run(["bash", str(ROOT / "scripts" / "device_cpu_bench.sh")], env=run,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:]
    lines = [x for x in rec.read_text().splitlines() if "scripts/bench_" in x]
    assert len(lines) == calls
    rt = lines[0]
    assert rt.startswith("CVD=[] scripts/bench_runtimes.py")
    assert f"--repeat {env.get('REPEAT', '3')} " in rt
    assert f"--cases {env.get('CASES', 'linreg cifar10 floor')} --set device=cpu " in rt
    assert "--set task.data_path=/data/x.tar.gz" in rt and f"--out {tmp_path}/out/" in rt
    if calls == 2:
        assert "--sizes 100000 " in lines[1] and "--methods topk regtopk" in lines[1]
    run["FAIL"] = "1"
    out = subprocess.run(["bash", str(ROOT / "scripts" / "device_cpu_bench.sh")], env=run,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stdout.rstrip().endswith("failed: runtimes" + (" sparsifiers" if calls == 2
                                                              else ""))
