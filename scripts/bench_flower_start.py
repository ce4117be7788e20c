"""Time to the end of round 1 of ``runtime=flower`` against the number of
nodes N at a fixed number m of sampled clients (issue #34), and peak memory.

    python scripts/bench_flower_start.py [--n 10 1000 10000] [--m 10] [--repeat 1] \
        [--root DIR] [--out results/scale/flower_start.md]

Each case is a fresh ``regtopk-fl`` process (linear regression, RegTop-k
S = 0.6, 1 round, no checkpoint): ``runtime=flower task=linreg
num_workers=N participation.clients_per_round=m rounds=1``. Measured from
the moment this script starts the process to the moment the run records
round 1's row (the child notes the time when ``RunRecorder.add`` gets it),
so it holds the interpreter's start, the imports, building the task, Ray
and the N simulated nodes, and round 1 itself. The N values run one after
another, repetitions outermost, so a ratio is taken between neighbours.

Memory: the peak resident set of the driver process up to the end of
round 1 (its ``ru_maxrss``; it holds the ServerApp, Flower's node table and
the task)
and the peak of the summed resident sets of its whole process tree (Ray's
processes and the ClientApp actors included; sampled every 0.2 s from
/proc, pages shared between processes counted in each).

``--set KEY=VALUE``: an override for every case. On a loaded machine Ray's
own start can fail (its raylet must register within a hard-coded 30 s);
``--set runtime.ray_address=HOST:PORT`` attaches every case to a Ray started
once (``ray start --head``), which takes Ray's start out of both N alike.

``--parts``: without Ray, in one process per N, what a start does that
grows with N: building the linear regression's data, Flower's registration
of N nodes and their contexts, one pass of Flower's own message thread over
the N nodes (the launcher's asks only the nodes that were sent something),
and the strategy's round 1 under sampling (identify queries and time), with
Flower's node table and in batches of m.

``--root DIR``: run the suite in another checkout (e.g. a git worktree of an
older commit, for a before/after in one session); the venv is this one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from _report import cpu_name, emit  # noqa: E402  (scripts/_report.py)

CHILD = """
import json, os, resource, sys, time
out = sys.argv[1]
from regtopk_fl import results
add = results.RunRecorder.add
def noting_add(self, row):
    got = add(self, row)
    if int(row.get("round", -1)) == 1 and not os.path.exists(out):
        with open(out, "w") as fh:
            json.dump({"round1_at": time.time(), "driver_peak_kb":
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, fh)
    return got
results.RunRecorder.add = noting_add
sys.argv = ["regtopk-fl"] + sys.argv[2:]
from regtopk_fl.launcher import main
main()
"""


EXTRA: list = []  # --set KEY=VALUE overrides, added to every case


def overrides(n: int, m: int, run_dir: Path) -> list:
    return EXTRA + ["runtime=flower", "task=linreg", f"num_workers={n}",
            f"participation.clients_per_round={m}", "rounds=1", "sparsifier=regtopk",
            "sparsifier.sparsity=0.6", "sparsifier.mu=4", "checkpoint.every=0",
            "progress=false", f"hydra.run.dir={run_dir}"]


def _tree_rss_kb(root_pid: int) -> int:
    """Summed VmRSS (kB) of root_pid and all its descendants."""
    parent, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as fh:
                pages = int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parent[int(entry)] = int(fields[1])
        rss[int(entry)] = pages * (os.sysconf("SC_PAGE_SIZE") // 1024)
    tree, todo = set(), [root_pid]
    children: dict = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        if pid in tree:
            continue
        tree.add(pid)
        todo.extend(children.get(pid, ()))
    return sum(rss.get(p, 0) for p in tree)


def _crashed(run_dir: Path) -> bool:
    try:
        return "Simulation Runtime crashed" in (run_dir / "launcher.log").read_text()
    except OSError:
        return False


def _tree(root_pid: int) -> list:
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(p for p, pp in parent.items() if pp == pid)
    return out


def one(n: int, m: int, root: Path, tmp: Path, tag: str, timeout_s: float = 1800.0,
        tries: int = 3) -> dict:
    """One case; retried (up to ``tries``) when the process fails, as Ray's
    start does on an overloaded machine (its raylet must register within a
    hard-coded 30 s); the failures are counted in the row."""
    for attempt in range(tries):
        try:
            row = _one(n, m, root, tmp, f"{tag}-{attempt}", timeout_s)
            row["failed_tries"] = attempt
            return row
        except RuntimeError as exc:
            print(f"N={n}: try {attempt + 1} failed: {exc}", flush=True)
    raise SystemExit(f"N={n}: {tries} tries failed")


def _one(n: int, m: int, root: Path, tmp: Path, tag: str, timeout_s: float) -> dict:
    run_dir = tmp / f"{tag}-N{n}"
    mark = tmp / f"{tag}-N{n}.json"
    cmd = [sys.executable, "-c", CHILD, str(mark)] + overrides(n, m, run_dir)
    env = dict(os.environ, PYTHONPATH=str(root))
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak_tree = 0
    while proc.poll() is None:
        try:
            peak_tree = max(peak_tree, _tree_rss_kb(proc.pid))
        except OSError:
            pass
        if time.time() - t0 > timeout_s or _crashed(run_dir) or (
                mark.exists() and time.time() - mark.stat().st_mtime > 180):
            break  # hung: a crashed Simulation Runtime does not end the process
        time.sleep(0.2)
    if proc.poll() is None:
        for pid in reversed(_tree(proc.pid)):  # this script's child and its Ray processes
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        proc.wait()
        if not mark.exists():
            raise RuntimeError(f"no round 1 within {timeout_s:.0f} s or the process hung")
    total = time.time() - t0
    if not mark.exists():
        out = proc.stdout.read()
        raise RuntimeError(f"exit {proc.returncode}: {out[-1500:]}")
    noted = json.loads(mark.read_text())
    round1 = noted["round1_at"] - t0
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except OSError:
        summary = {"status": "killed after round 1 (teardown hung)"}
    return {"N": n, "m": m, "tag": tag, "round1_s": round1, "process_s": total,
            "driver_peak_mb": noted["driver_peak_kb"] / 1024.0,
            "peak_tree_mb": peak_tree / 1024.0, "status": summary.get("status"),
            "identify_lines": sum("new node" in line for line in
                                  (run_dir / "launcher.log").read_text().splitlines()),
            "per_node_lines": sum("patched from model_0, which" in line for line in
                                  (run_dir / "launcher.log").read_text().splitlines())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 1000, 10000])
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--root", default=str(ROOT), help="the checkout to run (default: this one)")
    ap.add_argument("--tag", default=None, help="label of the checkout in the table")
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override added to every case (e.g. runtime.ray_address=HOST:PORT "
                         "to attach to a running Ray instead of starting one per case)")
    ap.add_argument("--parts", action="store_true",
                    help="without Ray: time and memory of what a start does per node")
    args = ap.parse_args(argv)
    EXTRA[:] = list(args.set)
    if args.parts:
        return parts(args.n, args.m, args.out)
    root = Path(args.root).resolve()
    tag = args.tag or ("this checkout" if root == ROOT else root.name)
    rows = []
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="flower-start-") as tmp:
        for rep in range(args.repeat):
            for n in args.n:
                row = one(n, args.m, root, Path(tmp), f"{rep}")
                row["load"] = os.getloadavg()[0]
                load.append(row["load"])
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:  # a report after every case: a cut run keeps what it measured
                    emit(report(rows, args, argv, load, tag), args.out)
    emit(report(rows, args, argv, load, tag), args.out)
    return 0


def report(rows, args, argv, load, tag) -> list:
    lines = [f"# Flower: time to the end of round 1 against N (`python scripts/"
             f"bench_flower_start.py {' '.join(sys.argv[1:] if argv is None else argv)}`)", "",
             f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}); {time.strftime('%Y-%m-%d %H:%M')}"
             f"; 1-min load average {min(load):.1f}-{max(load):.1f} during the runs; "
             f"checkout: {tag}.", "",
             f"Linear regression (J = 100, 500 points per client), RegTop-k S = 0.6, m = {args.m}, "
             "1 round, `runtime.client_cpus=1`.", "",
             "| N | time to end of round 1 (s, median) | runs | ÷ first N | driver peak RSS (MB) "
             "| process tree peak RSS (MB) | identify INFO lines | per-node INFO lines "
             "| load at the end | failed starts |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = None
    for n in args.n:
        mine = [r for r in rows if r["N"] == n]
        if not mine:
            continue
        t = statistics.median(r["round1_s"] for r in mine)
        base = t if base is None else base
        runs = ", ".join(f"{r['round1_s']:.1f}" for r in mine)
        lines.append(f"| {n} | {t:.1f} | {runs} | {t / base:.2f} | "
                     f"{statistics.median(r['driver_peak_mb'] for r in mine):.0f} | "
                     f"{statistics.median(r['peak_tree_mb'] for r in mine):.0f} | "
                     f"{mine[0]['identify_lines']} | {mine[0]['per_node_lines']} | "
                     f"{', '.join(format(r['load'], '.1f') for r in mine)} | "
                     f"{sum(r['failed_tries'] for r in mine)} |")
    return lines




# -- --parts: what of the start grows with N, without Ray ---------------------------
PARTS_CHILD = r"""
import json, resource, sys, time
n, m = int(sys.argv[1]), int(sys.argv[2])
import torch
torch.set_num_threads(1)
out = {"N": n}
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
base = rss()
# 1. the task's data (both runtimes build it; the Flower clients once more)
from regtopk_fl.tasks.linreg import LinRegTask
t = time.perf_counter(); task = LinRegTask(num_workers=n); out["task_s"] = time.perf_counter() - t
out["task_mb"] = rss() - base
# 2. Flower's Simulation Runtime registers N nodes and N node contexts
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager
from flwr.supercore.run import Run
before = rss()
factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
t = time.perf_counter()
mapping = vce_api._register_nodes(n, factory)
stores = vce_api._register_node_info_stores(mapping, Run.create_empty(1))
out["register_s"] = time.perf_counter() - t
out["register_mb"] = rss() - before
# 3. one idle pass of Flower's message thread (asks every node) against the
#    launcher's (asks the nodes a message was stored for: none here)
state = factory.state()
t = time.perf_counter()
for node in mapping:
    state.get_message_ins(node_id=node, limit=1)
out["flower_pass_s"] = time.perf_counter() - t
# 4. the strategy's round 1 with sampling: identify queries and the time to make round 1's messages
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 1
from protocol import wire
from regtopk_fl.compress import RegTopK
from regtopk_fl.fedround import Coordinator, FedServer
from regtopk_fl.participation import Participation
from strategies.sparse_strategy import SparseAggregation
class Grid:
    asked = 0
    def get_node_ids(self): return list(mapping)
    def send_and_receive(self, msgs, timeout=None):
        msgs = list(msgs); Grid.asked += len(msgs)
        return [Message(wire.identity_content(mapping[x.metadata.dst_node_id], device="cpu"),
                        reply_to=x) for x in msgs]
coord = Coordinator(FedServer(task.init_params(), None, lr=0.01), "gradient", verify=True)
coord.start(range(n))
for label, hint in (("identify_hinted", mapping), ("identify_batches", None)):
    Grid.asked = 0
    s = SparseAggregation(coord, n, wait_for_nodes_s=0, participation=Participation(n, m),
                          expect_device="cpu", node_hint=hint)
    t = time.perf_counter()
    msgs = s.configure_train(1, ArrayRecord(), ConfigRecord(), Grid())
    out[label + "_s"], out[label + "_queries"] = time.perf_counter() - t, Grid.asked
    assert len(list(msgs)) == m
out["peak_mb"] = rss()
print(json.dumps(out))
"""


def parts(ns, m: int, out) -> int:
    rows = []
    for n in ns:
        proc = subprocess.run([sys.executable, "-c", PARTS_CHILD, str(n), str(m)], cwd=ROOT,
                              capture_output=True, text=True, env=dict(os.environ,
                                                                       PYTHONPATH=str(ROOT)))
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows[-1]["load"] = os.getloadavg()[0]
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"# What of a Flower start grows with N, without Ray (`python scripts/"
             f"bench_flower_start.py --parts --n {' '.join(map(str, ns))} --m {m}`)", "",
             f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}); {time.strftime('%Y-%m-%d %H:%M')}"
             f"; 1-min load average {', '.join(format(r['load'], '.1f') for r in rows)} after "
             "each N.", "",
             "| N | linreg task's data (s / MB) | Flower registers N nodes and contexts (s / MB) "
             "| one pass of Flower's message thread over N nodes (s) | round 1's identify: "
             "queries (s), table | same, batches of m | peak RSS (MB) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['task_s']:.2f} / {r['task_mb']:.0f} | "
                     f"{r['register_s']:.2f} / {r['register_mb']:.0f} | {r['flower_pass_s']:.3f} | "
                     f"{r['identify_hinted_queries']} ({r['identify_hinted_s']:.3f}) | "
                     f"{r['identify_batches_queries']} ({r['identify_batches_s']:.2f}) | "
                     f"{r['peak_mb']:.0f} |")
    emit(lines, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
