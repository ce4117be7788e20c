"""runtime=flower on a real two-node Ray cluster on this machine (127.0.0.1).

    python scripts/cluster_test.py [--out results/runs/cluster_test] [--rounds 12]

1. The same run on a local Ray (``runtime.ray_address=null``) and in-process.
2. A Ray cluster of two nodes - a head and a worker, 1 CPU each, separate
   raylets and object stores, as ``ray start --head`` and ``ray start
   --address=...`` would start them (ray.cluster_utils.Cluster, which keeps
   the process handles, so the cluster's processes and nothing else are
   killed at the end).
3. The run again with ``runtime.ray_address=<head's GCS address>``; with
   ``client_cpus=1`` Flower's pool has one actor per node.

Checks: each reply's Ray node id (added by the ClientApp under Ray) shows
clients ran on both nodes; metrics.csv (without wall_s) and model.pt equal the
local-Ray run's bit for bit; the model is within 1e-6 of the in-process run.
Ray's files go to a private temp dir (RAY_TMPDIR), so this cluster's address
file never redirects another process's ``ray.init()`` on the same machine.
Exit status 0 when every check passed.
"""
from __future__ import annotations

import argparse
import ast
import faulthandler
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def run(run_dir: Path, overrides, env) -> str:
    """``python -m regtopk_fl <overrides>`` in its own process group; returns its log."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "regtopk_fl", *overrides,
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {run_dir} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return "".join(p.read_text() for p in run_dir.glob("*.log"))


def ray_nodes_in(log: str) -> dict:
    m = re.findall(r"replies per Ray node: (\{.*\})", log)
    return ast.literal_eval(m[-1]) if m else {}


def processes_of(tag: str) -> list:
    """PIDs of the processes whose command line mentions ``tag`` (this
    cluster's private temp dir: its GCS, raylets and Ray workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != str(os.getpid()):
            try:
                if tag in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def tear_down(cluster, ray_tmp: Path, wait_s: float = 30.0) -> list:
    """Shut ``cluster`` down (if it started), wait up to ``wait_s`` for its
    processes to exit (Ray workers exit once their raylet is gone), SIGKILL
    the ones left (this cluster's own, found by its private temp dir) and
    remove the dir. Returns the PIDs that were still running."""
    if cluster is not None:
        cluster.shutdown()
    deadline = time.monotonic() + wait_s
    while processes_of(str(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = processes_of(str(ray_tmp))
    for pid in left:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return left


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results/runs/cluster_test")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args(argv)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rtkray-", dir="/tmp"))  # short: socket paths
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    # loopback only: Ray turns "127.0.0.1" into the machine's network address
    # (services.resolve_ip_for_localhost) unless its cluster mode is off, and
    # the GCS listens on 127.0.0.1 only; nodes still run as separate raylets
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    faulthandler.dump_traceback_later(1500, exit=True)  # never hang; Ray's reaper then
    # stops the cluster's processes with this one
    os.environ.pop("RAY_ADDRESS", None)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = ["task=linreg", "num_workers=6", f"rounds={args.rounds}", "sparsifier=regtopk",
            "sparsifier.sparsity=0.3", "sparsifier.mu=2", "participation.clients_per_round=4",
            "faults.drop_prob=0.1", "threads=1", "checkpoint.every=0", "device=cpu"]
    flower = base + ["runtime=flower", "runtime.client_cpus=1"]
    if args.out.exists():
        shutil.rmtree(args.out)
    checks, t0 = [], time.perf_counter()

    def check(name, ok, detail=""):
        checks.append(ok)
        print(f"[{'PASS' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)

    from kill_resume import differences

    run(args.out / "inprocess", base + ["runtime=inprocess"], env)
    local_log = run(args.out / "local_ray", flower, env)
    print(f"local Ray run: replies per Ray node {ray_nodes_in(local_log)} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    import ray
    from ray.cluster_utils import Cluster

    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        nodes = {n["NodeID"]: n["Resources"].get("CPU") for n in ray.nodes() if n["Alive"]}
        ray.shutdown()
        check("the cluster has two alive nodes with 1 CPU each", sorted(nodes.values()) == [1.0, 1.0],
              f"{nodes}")
        print(f"cluster at {cluster.address}: head {cluster.head_node.node_id}, worker "
              f"{worker.node_id}", flush=True)
        t1 = time.perf_counter()
        cl_log = run(args.out / "cluster", flower + [f"runtime.ray_address={cluster.address}"], env)
        used = ray_nodes_in(cl_log)
        print(f"cluster run: {time.perf_counter() - t1:.0f} s", flush=True)
        check("clients ran on both nodes", set(used) == set(nodes), f"replies per node {used}")
    finally:
        left = tear_down(cluster, ray_tmp)
        check("no cluster process left running", not left, f"left: {left}" if left else "")
    diff = differences(args.out / "cluster", args.out / "local_ray")
    check("cluster run == local-Ray run (metrics.csv w/o wall_s, model.pt)", diff == [],
          "; ".join(diff))
    import torch

    a = torch.load(args.out / "cluster" / "model.pt", weights_only=False)["params"]
    b = torch.load(args.out / "inprocess" / "model.pt", weights_only=False)["params"]
    rel = float((a - b).abs().max() / b.abs().max())
    check("cluster run == in-process run to 1e-6", rel <= 1e-6, f"max rel. difference {rel:.2e}")
    print(f"{sum(checks)}/{len(checks)} checks passed in {time.perf_counter() - t0:.0f} s")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
