"""Sweeps beyond one machine: Hydra's Ray launcher on a two-node Ray cluster
on this machine (127.0.0.1), and submitit's local launcher.

    python scripts/launcher_test.py [--out results/runs/launcher_test] [--skip-submitit]

1. The reference: a sweep of 8 jobs (linreg, Top-k / RegTop-k x seeds 0-3)
   with Hydra's basic launcher, one job after another in this process tree.
2. A Ray cluster of two nodes, a head and a worker with 1 CPU each, as
   ``ray start --head`` / ``ray start --address=...`` start them
   (ray.cluster_utils.Cluster, as scripts/cluster_test.py).
3. The same sweep with ``hydra/launcher=ray`` (hydra-ray-launcher) attached to
   the cluster (``hydra.launcher.ray.init.address``): every job is a Ray task
   needing 1 CPU, so Ray spreads them over both nodes.
4. The same sweep with ``hydra/launcher=submitit_local`` (what
   ``submitit_slurm`` runs on a SLURM cluster), unless --skip-submitit.

Checks: every job of every sweep finished and wrote its results into the sweep
directory (regtopk-collect), the Ray jobs ran on both nodes (``host.json``,
written by the job's own process: regtopk_fl/job_host.py), each job's
metrics.csv (without wall_s) equals the basic launcher's bit for bit, and no
cluster process is left. Exit status 0 when every check passed. Needs
hydra-ray-launcher importable (``pip install -e '.[ray-launcher]'``; see
docs/sweep-launchers.md for its cloudpickle pin).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from cluster_test import tear_down  # noqa: E402  (the same loopback cluster's teardown)
SWEEP = ["task=linreg", "num_workers=4", "rounds=200", "sparsifier=topk,regtopk",
         "sparsifier.sparsity=0.5", "seed=0,1,2,3", "threads=1", "checkpoint.every=0",
         "progress=false", "+hydra.callbacks.job_host._target_=regtopk_fl.job_host.RecordJobHost"]


def sweep(out: Path, launcher_args, env, timeout=600) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "regtopk_fl", "-m", *SWEEP, *launcher_args,
                           f"hydra.sweep.dir={out}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {out} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def metrics_rows(job: Path) -> list:
    """metrics.csv without its last column (wall_s)."""
    lines = (job / "metrics.csv").read_text().splitlines()
    assert lines[0].endswith(",wall_s"), lines[0]
    return [line.rsplit(",", 1)[0] for line in lines]


def by_setting(sweep_dir: Path) -> dict:
    from regtopk_fl.analysis.collect import collect

    df = collect(sweep_dir)
    return {(r.sparsifier, int(r.seed)): (r.status, Path(r.job_dir)) for r in df.itertuples()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results/runs/launcher_test")
    ap.add_argument("--skip-submitit", action="store_true")
    args = ap.parse_args(argv)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rtkhl-", dir="/tmp"))  # short: socket paths
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only (cluster_test.py)
    os.environ.pop("RAY_ADDRESS", None)
    faulthandler.dump_traceback_later(1500, exit=True)
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env = dict(os.environ, PYTHONPATH=path)  # the Ray workers inherit it from the raylets
    if args.out.exists():
        shutil.rmtree(args.out)
    checks, t0 = [], time.perf_counter()

    def check(name, ok, detail=""):
        checks.append(bool(ok))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)

    secs = sweep(args.out / "basic", ["hydra/launcher=basic"], env)
    ref = by_setting(args.out / "basic")
    print(f"basic launcher: {len(ref)} jobs in {secs:.0f} s", flush=True)

    def compare(name, sweep_dir):
        got = by_setting(sweep_dir)
        done = [k for k, (status, _) in got.items() if status == "finished"]
        check(f"{name}: all {len(ref)} jobs finished, results in the sweep directory",
              sorted(done) == sorted(ref), f"{len(done)} of {len(ref)} finished")
        same = [k for k in ref if k in got and metrics_rows(got[k][1]) == metrics_rows(ref[k][1])]
        check(f"{name}: every job's metrics.csv (w/o wall_s) == the basic launcher's",
              len(same) == len(ref), f"{len(same)} of {len(ref)} equal")
        return [json.loads((d / "host.json").read_text()) for _, d in got.values()
                if (d / "host.json").is_file()]

    import ray
    from ray.cluster_utils import Cluster

    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "env_vars": {"PYTHONPATH": path}})
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", env_vars={"PYTHONPATH": path})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        ray.shutdown()
        check("the cluster has two alive nodes", len(nodes) == 2, f"{sorted(nodes)}")
        secs = sweep(args.out / "ray", [
            "hydra/launcher=ray", f"hydra.launcher.ray.init.address={cluster.address}",
            "+hydra.launcher.ray.init.object_store_memory=null",  # attach: no store size
            "+hydra.launcher.ray.remote.num_cpus=1"], env)
        print(f"ray launcher: {secs:.0f} s", flush=True)
        hosts = compare("ray launcher", args.out / "ray")
        used = {h["ray_node_id"] for h in hosts}
        per_node = {n[:8]: sum(h["ray_node_id"] == n for h in hosts) for n in sorted(nodes)}
        check("ray launcher: jobs ran on both nodes", used == nodes, f"jobs per node {per_node}")
    finally:
        left = tear_down(cluster, ray_tmp)
        check("no cluster process left running", not left, f"left: {left}" if left else "")

    if not args.skip_submitit:
        secs = sweep(args.out / "submitit", ["hydra/launcher=submitit_local",
                                             "hydra.launcher.timeout_min=10"], env)
        print(f"submitit_local launcher: {secs:.0f} s", flush=True)
        hosts = compare("submitit_local", args.out / "submitit")
        ids = {h["submitit_job_id"] for h in hosts}
        check("submitit_local: each job ran as its own submitit job",
              len(ids) == len(ref) and None not in ids, f"{len(ids)} job ids")
    print(f"{sum(checks)}/{len(checks)} checks passed in {time.perf_counter() - t0:.0f} s")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
