#!/usr/bin/env python
"""Loopback proof of the Flower Deployment Runtime (`make federation-test`).

Everything on 127.0.0.1, in a fresh work directory, every process in its own
process group, and every process stopped at the end, pass or fail:

1. a CA + SuperLink certificate (scripts/make_certs.sh) and 5 SuperNode key
   pairs (scripts/make_node_keys.sh);
2. a SuperLink with TLS and SuperNode authentication (scripts/start_superlink.sh);
3. keys 0-2 registered (scripts/register_nodes.sh), 3 SuperNodes started
   (scripts/start_supernode.sh), each with a state dir;
4. refused: a SuperNode with an unregistered key, one without a key, a
   plain-text one, one that trusts another CA, and the CLI over plain text;
5. the run: linreg, N=3, RegTop-k S=0.3, 20 rounds, submitted with the
   `flwr run` command from regtopk_fl.deploy.flwr_run_command, polled with
   `flwr ls --format json` until finished; its model.pt / metrics.csv must
   match the same config under runtime=inprocess (global model within 1e-6
   relative, same per-round byte counts and gaps);
6. the fault: a second run; SuperNode 2 is killed (SIGKILL, whole process
   group) after round 3: the run goes on with the other two (`missing`
   recorded in metrics.csv); node 2 is restarted with the same key and state
   dir once the SuperLink marks it offline, rejoins, and the run completes;
7. the server crash: a third run (checkpoint.every=3); its ServerApp is
   SIGKILLed after the first checkpoint, the run is stopped, the same `flwr
   run` with the same output_dir resumes it, and it must still match its
   runtime=inprocess twin;
8. the impostor: a fourth SuperNode with a *registered* key (so the
   SuperLink admits it) started as partition 1, which node 1 already is; the
   run pins partitions 0-2 to the honest nodes' keys (server.node_keys), so
   the impostor is refused when it is identified ("pinned to no partition",
   in the ServerApp's log) and never sent the model, while the run goes on
   and still matches its twin.

Throughout, broadcast=gradient (the default): the nodes keep model replicas
and every reply carries the digest of the replica it was computed on; the
checks require no rejection (every replica bitwise the server's model) and
the same downlink bytes, resyncs and patches as the in-process twin, apart
from the one round after a server resume that catches every node up.

    python scripts/federation_test.py [--rounds 20] [--skip-negative] [--skip-fault] [--skip-crash]
                                      [--skip-impostor] [--workdir DIR] [--keep]

Exit status 0 iff every check passed; a summary with timings is printed and
written to WORKDIR/report.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(REPO))

CONN = "regtopk-local"
N = 3
BASE_OVERRIDES = ["task=linreg", f"num_workers={N}", "sparsifier=regtopk",
                  "sparsifier.sparsity=0.3", "runtime=flower"]


def log(msg: str) -> None:
    print(f"[federation-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- processes -------------------------------------------------------------------
def _children() -> dict:
    out: dict = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        out.setdefault(ppid, []).append(int(d.name))
    return out


def descendants(pid: int) -> list:
    kids, todo, out = _children(), [pid], []
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _signal_tree(pids, sig) -> None:
    for pid in pids:
        for fn in (lambda p: os.killpg(os.getpgid(p), sig), lambda p: os.kill(p, sig)):
            try:
                fn(pid)
            except (ProcessLookupError, PermissionError, OSError):
                pass


class Procs:
    """Processes started here: each in its own session/process group."""

    def __init__(self, env: dict, logdir: Path):
        self.env, self.logdir, self.procs = env, logdir, {}

    def start(self, name: str, argv: list, env_extra: dict | None = None) -> subprocess.Popen:
        env = dict(self.env, **(env_extra or {}))
        fh = open(self.logdir / f"{name}.log", "ab")
        p = subprocess.Popen([str(a) for a in argv], cwd=self.logdir, env=env, stdout=fh,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        fh.close()
        self.procs[name] = p
        return p

    def stop(self, name: str, sig=signal.SIGTERM, grace: float = 15.0) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        tree = [p.pid] + descendants(p.pid)  # incl. children in other process groups
        _signal_tree(tree, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(x) for x in tree):
            p.poll()
            time.sleep(0.2)
        left = [x for x in tree if _alive(x)]
        if left:
            _signal_tree(left, signal.SIGKILL)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)


def _ancestors() -> set:
    """This process and its ancestors (whose command line may name the work
    directory too: ``--workdir DIR`` under ``timeout``, say)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def sweep(marker: str) -> list:
    """Kill any process left whose command line or environment names our
    work directory (e.g. a flwr-serverapp whose parent died first), never
    this process or one of its ancestors."""
    killed, mine = [], _ancestors()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        try:
            blob = (d / "cmdline").read_bytes() + (d / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob and _alive(int(d.name)):
            _signal_tree([int(d.name)], signal.SIGKILL)
            killed.append(int(d.name))
    return killed


def process_pids(name: str, marker: str) -> list:
    """Live processes whose command line names ``name`` and whose command line
    or environment names our work directory."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd, env = (d / "cmdline").read_bytes(), (d / "environ").read_bytes()
        except OSError:
            continue
        if name.encode() in cmd and marker.encode() in cmd + env and _alive(int(d.name)):
            out.append(int(d.name))
    return out


def free_ports(n: int) -> list:
    """n consecutive free ports in 39000-39899 on 127.0.0.1."""
    for _ in range(200):
        base = random.randrange(39000, 39900 - n)
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + n))
    raise RuntimeError("no free port range in 39000-39899")


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"port {port} did not open in {timeout:.0f} s")


# -- the test --------------------------------------------------------------------
class Failed(Exception):
    pass


class FederationTest:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="regtopk-fedtest-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.checks: list = []
        self.timings: dict = {}
        ports = free_ports(10)
        self.link_port, self.node_ports = ports[0], ports[1:]
        self.address = f"127.0.0.1:{self.link_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                   FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                   FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2", PYTHONUNBUFFERED="1",
                   REGTOPK_FEDTEST=str(self.work))  # marker for the final sweep
        self.env = env
        self.cli_home = self.work / "cli_home"
        self.procs = Procs(env, self.work)

    # -- helpers -------------------------------------------------------------------
    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        log(f"{'PASS' if ok else 'FAIL'}: {name}{' - ' + detail if detail else ''}")
        return ok

    def sh(self, argv, timeout=180, env_extra=None, cwd=None, check=True) -> subprocess.CompletedProcess:
        env = dict(self.env, **(env_extra or {}))
        r = subprocess.run([str(a) for a in argv], cwd=cwd or self.work, env=env, timeout=timeout,
                           capture_output=True, text=True)
        if check and r.returncode != 0:
            raise Failed(f"{' '.join(map(str, argv))} -> rc {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def flwr(self, *args, timeout=120, check=True) -> subprocess.CompletedProcess:
        return self.sh(["flwr", *args], timeout=timeout, check=check,
                       env_extra={"FLWR_HOME": str(self.cli_home)}, cwd=REPO)

    def flwr_json(self, *args, timeout=120) -> dict:
        r = self.flwr(*args, "--format", "json", timeout=timeout)
        return json.loads(r.stdout[r.stdout.index("{"):])

    def online_nodes(self) -> list:
        nodes = self.flwr_json("supernode", "list", CONN)["nodes"]
        return [n["node-id"] for n in nodes if n["status"] == "online"]

    def node_status(self) -> dict:
        return {n["node-id"]: n["status"] for n in self.flwr_json("supernode", "list", CONN)["nodes"]}

    def start_node(self, i: int, key, cert, port: int, name: str | None = None, extra=()) -> subprocess.Popen:
        state = self.work / "state" / f"node{i}"
        return self.procs.start(name or f"node{i}", [
            SCRIPTS / "start_supernode.sh", self.address, i, N, key, cert, port, state, "--", *extra],
            env_extra={"SUPERNODE_HOME": str(self.work / f"node_home{i}")})

    # -- steps -----------------------------------------------------------------------
    def setup(self) -> None:
        t0 = time.perf_counter()
        self.sh([SCRIPTS / "make_certs.sh", "certs", "127.0.0.1", "localhost"])
        self.sh([SCRIPTS / "make_certs.sh", "other_ca", "127.0.0.1", "localhost"])
        self.sh([SCRIPTS / "make_node_keys.sh", "keys", 6])  # 5: the impostor's
        ca = self.work / "certs" / "ca.crt"
        self.cli_home.mkdir(exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONN}"\n\n'
            f'[superlink.{CONN}]\naddress = "{self.address}"\nroot-certificates = "{ca}"\n\n'
            f'[superlink.regtopk-plain]\naddress = "{self.address}"\ninsecure = true\n')
        link = self.procs.start("superlink", [SCRIPTS / "start_superlink.sh", "--host", "127.0.0.1",
                                              "--port", self.link_port, "--certs", "certs"],
                                env_extra={"FLWR_HOME": str(self.work / "link_home")})
        wait_port(self.link_port, link, 120)
        self.sh([SCRIPTS / "register_nodes.sh", CONN] +
                [self.work / "keys" / f"node{i}.pub" for i in range(N)],
                env_extra={"FLWR_HOME": str(self.cli_home)})
        self.node_ids = {}
        for i in range(N):
            self.start_node(i, self.work / "keys" / f"node{i}", ca, self.node_ports[i])
        deadline = time.monotonic() + 180
        while len(self.online_nodes()) < N:
            if time.monotonic() > deadline:
                raise Failed(f"only {self.online_nodes()} online after 180 s")
            for i in range(N):
                if self.procs.procs[f"node{i}"].poll() is not None:
                    raise Failed(f"SuperNode {i} exited (see {self.work}/node{i}.log)")
            time.sleep(2)
        self.timings["setup_s"] = time.perf_counter() - t0
        self.check("SuperLink (TLS + node auth) with 3 authenticated SuperNodes online", True,
                   f"{self.timings['setup_s']:.0f} s")

    def negative(self) -> None:
        t0 = time.perf_counter()
        ca, keys = self.work / "certs" / "ca.crt", self.work / "keys"
        cases = {  # name: (key, cert, extra, expected text in its log)
            "unregistered": (keys / "node3", ca, [], "Failed to activate SuperNode"),
            "nokey": ("none", ca, [], "must be registered"),
            "plaintext": ("none", "insecure", ["--max-retries", "2"],
                          "Server disconnected without sending a response"),
            "wrong_ca": (keys / "node4", self.work / "other_ca" / "ca.crt",
                         ["--max-retries", "2"], "CERTIFICATE_VERIFY_FAILED"),
        }
        procs = {}
        for j, (name, (key, cert, extra, _)) in enumerate(cases.items()):
            procs[name] = self.start_node(N, key, cert, self.node_ports[N + 1 + j],
                                          name=f"refused_{name}", extra=extra)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            time.sleep(1)
        labels = {"unregistered": "a SuperNode with an unregistered key is refused",
                  "nokey": "a SuperNode without an authentication key is refused",
                  "plaintext": "a plain-text (insecure) SuperNode is refused by the TLS SuperLink",
                  "wrong_ca": "a SuperNode that does not trust the SuperLink's CA cannot connect"}
        for name, (_, _, _, text) in cases.items():
            p = procs[name]
            out = (self.work / f"refused_{name}.log").read_text(errors="replace")
            rc = p.poll()
            self.check(labels[name], rc not in (None, 0) and text in out,
                       f"exit {rc}; '{text}' {'in' if text in out else 'NOT in'} its log")
            self.procs.stop(f"refused_{name}")
        r = self.flwr("ls", "regtopk-plain", timeout=120, check=False)
        why = [ln.strip(" │╭╮╰╯─") for ln in (r.stdout + r.stderr).splitlines()
               if "navailable" in ln or "rror" in ln]
        self.check("the flwr CLI over plain text is refused by the TLS SuperLink",
                   r.returncode != 0, f"rc {r.returncode}: {why[0] if why else ''}")
        online = self.online_nodes()
        self.check("none of the refused SuperNodes joined", len(online) == N, f"{len(online)} online")
        self.timings["negative_s"] = time.perf_counter() - t0

    SUBMIT_NEW_SESSION = False  # run `flwr run` in a session of its own

    def submit_shell(self, cmd: str) -> str:
        """The shell line that submits ``cmd`` (a subclass may wrap it)."""
        return cmd + " --format json"

    def submit(self, overrides: list, out: Path) -> str:
        from regtopk_fl.deploy import compose_config, flwr_run_command

        cmd = flwr_run_command(compose_config(overrides), CONN, output_dir=out)
        log(f"submit: {cmd}")
        t0 = time.perf_counter()
        r = subprocess.run(self.submit_shell(cmd), shell=True, cwd=REPO, capture_output=True,
                           text=True, timeout=300,
                           env=dict(self.env, FLWR_HOME=str(self.cli_home)),
                           start_new_session=self.SUBMIT_NEW_SESSION)
        if r.returncode != 0:
            raise Failed(f"flwr run failed: {r.stdout}\n{r.stderr}")
        info = json.loads(r.stdout[r.stdout.index("{"):])
        if not info.get("success"):
            raise Failed(f"flwr run: {info}")
        self.timings.setdefault("submit_s", []).append(round(time.perf_counter() - t0, 1))
        return str(info["run-id"])

    def run_status(self, run_id: str) -> dict:
        runs = self.flwr_json("ls", CONN, "--run-id", run_id)["runs"]
        return next(r for r in runs if str(r["run-id"]) == run_id)

    def wait_run(self, run_id: str, out: Path, timeout: float, on_round=None) -> dict:
        """Until `flwr ls` says the run finished. Progress comes from the run's
        metrics.csv / summary.json (cheap); `flwr ls` (a CLI start costs a few
        CPU-seconds here) is asked every 30 s and whenever the summary says done."""
        deadline, last, asked = time.monotonic() + timeout, -1, 0.0
        while True:
            done = last_round(out)
            if done != last:
                last = done
                log(f"run {run_id}: round {done}")
                if on_round is not None:
                    on_round(done)
            if time.monotonic() - asked > 30 or summary_status(out) in ("finished", "failed"):
                st, asked = self.run_status(run_id), time.monotonic()
                if st["status"].startswith("finished"):
                    return st
            if time.monotonic() > deadline:
                raise Failed(f"run {run_id} not finished after {timeout:.0f} s")
            time.sleep(1)

    def main_run(self) -> None:
        rounds = self.args.rounds
        overrides = BASE_OVERRIDES + [f"rounds={rounds}"]
        out = self.work / "run_main"
        t0 = time.perf_counter()
        run_id = self.submit(overrides, out)
        st = self.wait_run(run_id, out, timeout=60 * rounds + 600)
        self.timings["main_run_s"] = time.perf_counter() - t0
        if not self.check("the run finished (flwr ls)", st["status"] == "finished:completed",
                          f"{st['status']} {st.get('status-details', '')}"):
            return
        summary = json.loads((out / "summary.json").read_text())
        self.check("summary.json: finished, all rounds", summary["status"] == "finished"
                   and summary["rounds_done"] == rounds, f"{summary['status']}, {summary['rounds_done']} rounds")
        rows = read_rows(out)
        walls = [float(r["wall_s"]) for r in rows]
        per_round = [b - a for a, b in zip(walls[1:], walls[2:])]
        self.timings["round_s"] = {"first": round(walls[1] - walls[0], 2),
                                   "median": round(statistics.median(per_round), 2),
                                   "min": round(min(per_round), 2), "max": round(max(per_round), 2)}
        self.compare_with_twin(out, overrides, rows)

    def compare_with_twin(self, out: Path, overrides: list, rows: list, label: str = "",
                          resumed: bool = False, ignore=()) -> None:
        """The deployed run against the same config under runtime=inprocess.
        ``resumed``: the one round after the restart catches every node up
        (a patch, or the full model where that is smaller), so its downlink
        columns are checked for that instead;
        ``ignore``: columns not compared."""
        import torch

        from regtopk_fl.deploy import compose_config
        from regtopk_fl.runner import run_experiment

        rounds = int(next(o for o in overrides if o.startswith("rounds=")).split("=")[1])
        cfg = compose_config([o for o in overrides if not o.startswith("runtime=")] +
                             ["runtime=inprocess", "progress=false"])
        twin = self.work / f"twin_inprocess{label.replace(' ', '_')}"
        run_experiment(cfg, twin)
        a = torch.load(out / "model.pt", weights_only=False)["params"]
        b = torch.load(twin / "model.pt", weights_only=False)["params"]
        rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
        self.check(f"deployed{label} global model == runtime=inprocess twin (rel <= 1e-6)",
                   rel <= 1e-6, f"max relative difference {rel:.3g}")
        trows = read_rows(twin)
        bad, resync_rounds = [], []
        for x, y in zip(rows, trows):
            keys = ["sent", "uplink_bytes", "uplink_coded_bytes", "replies", "missing",
                    "rejected"]
            caught_up = int(x["resyncs"]) + int(x["patches"])
            if resumed and caught_up == N and int(y["resyncs"]) + int(y["patches"]) == 0:
                resync_rounds.append(int(x["round"]))
            else:
                keys += ["downlink_bytes", "downlink_coded_bytes", "resyncs", "patches"]
            for k in keys:
                if k not in ignore and x[k] != y[k]:
                    bad.append((x["round"], k, x[k], y[k]))
            if abs(float(x["gap"]) - float(y["gap"])) > 1e-6 * max(1.0, abs(float(y["gap"]))):
                bad.append((x["round"], "gap", x["gap"], y["gap"]))
        self.check(f"metrics.csv{label} rows == twin's (up/downlink bytes, resyncs, patches, "
                   "sent, replies, gap)",
                   len(rows) == len(trows) == rounds + 1 and not bad, f"{bad[:3]}" if bad else
                   f"{len(rows)} rows; final gap {rows[-1]['gap']}")
        if resumed:
            self.check("the resumed run caught every node up once (patch or full model), "
                       "then sent g", len(resync_rounds) == 1,
                       f"catch-up rounds {resync_rounds}: " + ", ".join(
                           f"{r['patches']} patches + {r['resyncs']} resyncs"
                           for r in rows if int(r["round"]) in resync_rounds))
        # every reply names the digest of the replica it computed on; the
        # server rejects any that is not its own model's
        self.check(f"deployed{label}: every replica bitwise the server's model (no digest "
                   "rejection)", all(int(r["rejected"]) == 0 for r in rows),
                   f"downlink {sum(int(r['downlink_coded_bytes']) for r in rows)} B coded over "
                   f"{rounds} rounds")

    def fault_run(self) -> None:
        rounds, kill_after = self.args.fault_rounds, 3
        overrides = BASE_OVERRIDES + [f"rounds={rounds}", "runtime.round_timeout_s=60"]
        out = self.work / "run_fault"
        t0 = time.perf_counter()
        run_id = self.submit(overrides, out)
        ca = self.work / "certs" / "ca.crt"
        ev: dict = {}

        def on_round(done):
            if done >= kill_after and "kill" not in ev:
                log(f"killing SuperNode 2 (SIGKILL to its process group) after round {done}")
                self.procs.stop("node2", sig=signal.SIGKILL, grace=5)
                ev["kill"], ev["kill_round"] = time.perf_counter(), done

        # phase 1: kill node 2 after round 3, wait until the SuperLink marks it offline
        deadline = time.monotonic() + 900
        while "kill" not in ev:
            if summary_status(out) in ("finished", "failed") or time.monotonic() > deadline:
                raise Failed(f"fault run ended before the kill: {self.run_status(run_id)}")
            on_round(last_round(out))
            time.sleep(1)
        while len(self.online_nodes()) >= N:
            if time.perf_counter() - ev["kill"] > 240:
                raise Failed("the killed SuperNode still online after 240 s")
            time.sleep(5)
        ev["offline_s"] = time.perf_counter() - ev["kill"]
        log(f"SuperLink marked node 2 offline {ev['offline_s']:.0f} s after the kill; restarting it")
        self.start_node(2, self.work / "keys" / "node2", ca, self.node_ports[2], name="node2")
        ev["restart_round"] = last_round(out)
        st = self.wait_run(run_id, out, timeout=60 * rounds + 900)
        self.timings["fault_run_s"] = time.perf_counter() - t0
        self.timings["node_offline_after_kill_s"] = round(ev["offline_s"], 1)
        if not self.check("fault run finished although a SuperNode was killed",
                          st["status"] == "finished:completed",
                          f"{st['status']} {st.get('status-details', '')}"):
            return
        rows = read_rows(out)
        after = [r for r in rows if int(r["round"]) > ev["kill_round"]]
        missing_rounds = [int(r["round"]) for r in after if int(r["missing"]) > 0]
        self.check("the run went on with the remaining nodes; metrics.csv records `missing`",
                   len(rows) == rounds + 1 and bool(missing_rounds)
                   and all(int(r["replies"]) >= 1 for r in after),
                   f"rounds with missing replies: {missing_rounds}; replies per round after "
                   f"the kill: {[int(r['replies']) for r in after]}")
        rejoined = [int(r["round"]) for r in rows if int(r["round"]) > ev["restart_round"]
                    and int(r["replies"]) == N]
        self.check("the restarted SuperNode (same key, same state dir) rejoined", bool(rejoined),
                   f"3 replies again in rounds {rejoined}")
        self.check("no upload rejected, loss finite", all(int(r["rejected"]) == 0 for r in rows)
                   and all(r["gap"] not in ("", "nan") for r in rows),
                   f"final gap {rows[-1]['gap']} (start {rows[0]['gap']})")
        node_log = (self.work / "node2.log").read_text(errors="replace")
        self.check("the restarted node's ClientApp raised nothing", "Traceback" not in node_log
                   and "ClientApp raised an exception" not in node_log)
        state = self.work / "state" / "node2" / f"run-{run_id}-partition-2.pt"
        self.check("node 2 kept its memory in its state dir", state.exists(), str(state.name))
        replica = state.with_name(f"run-{run_id}-partition-2-replica.pt")
        self.check("node 2 kept its model replica in its state dir", replica.exists(),
                   str(replica.name))
        back = [int(r["round"]) for r in rows if int(r["round"]) > ev["kill_round"]
                and int(r["resyncs"]) + int(r["patches"]) > 0]
        self.check("the node that missed rounds was caught up (a counted patch or resync)",
                   bool(back), f"patches or resyncs in rounds {back}")

    def server_crash_run(self) -> None:
        """The ServerApp is SIGKILLed after its first checkpoint; the same run,
        submitted again with the same output_dir, resumes from it (the clients
        get their memories back) and must still match the in-process twin."""
        rounds = self.args.crash_rounds
        overrides = BASE_OVERRIDES + [f"rounds={rounds}", "checkpoint.every=3"]
        out = self.work / "run_crash"
        t0 = time.perf_counter()
        first = self.submit(overrides, out)
        deadline = time.monotonic() + 60 * rounds + 600
        while not (out / "checkpoint.pt").exists():
            if summary_status(out) in ("finished", "failed") or time.monotonic() > deadline:
                raise Failed(f"crash run ended before its first checkpoint: {self.run_status(first)}")
            time.sleep(0.5)
        victims = process_pids("flwr-serverapp", str(self.work))
        for pid in victims:  # that process only: its group holds the SuperLink's SuperExec
            os.kill(pid, signal.SIGKILL)
        killed_after = last_round(out)
        self.check("ServerApp SIGKILLed after its first checkpoint, mid-run",
                   bool(victims) and summary_status(out) == "running" and killed_after < rounds,
                   f"pids {victims}, metrics.csv up to round {killed_after}")
        self.flwr("stop", first, CONN, check=False)
        second = self.submit(overrides, out)
        st = self.wait_run(second, out, timeout=60 * rounds + 600)
        self.timings["crash_run_s"] = time.perf_counter() - t0
        if not self.check("the resubmitted run resumed and finished",
                          st["status"] == "finished:completed",
                          f"{st['status']} {st.get('status-details', '')}"):
            return
        self.compare_with_twin(out, overrides, read_rows(out), label=" after resume",
                               resumed=True)

    def impostor_run(self) -> None:
        """A registered SuperNode claims partition 1, which node 1 already is.
        The run pins partitions to the honest nodes' keys; the impostor's
        replies are refused every round and the result is the twin's."""
        rounds = self.args.impostor_rounds
        keys, ca = self.work / "keys", self.work / "certs" / "ca.crt"
        pins = self.work / "node_keys.txt"
        pins.write_text("".join(f"{i} {keys / f'node{i}.pub'}\n" for i in range(N)))
        self.sh([SCRIPTS / "register_nodes.sh", CONN, keys / "node5.pub"],
                env_extra={"FLWR_HOME": str(self.cli_home)})
        self.procs.start("impostor", [
            SCRIPTS / "start_supernode.sh", self.address, 1, N, keys / "node5", ca,
            self.node_ports[N], self.work / "state" / "impostor", "--"],
            env_extra={"SUPERNODE_HOME": str(self.work / "node_home_impostor")})
        deadline = time.monotonic() + 180
        while len(self.online_nodes()) < N + 1:
            if time.monotonic() > deadline or self.procs.procs["impostor"].poll() is not None:
                raise Failed(f"the impostor did not come online (see {self.work}/impostor.log)")
            time.sleep(2)
        overrides = BASE_OVERRIDES + [f"rounds={rounds}", f"server.node_keys={pins}"]
        out = self.work / "run_impostor"
        t0 = time.perf_counter()
        run_id = self.submit(overrides, out)
        st = self.wait_run(run_id, out, timeout=60 * rounds + 600)
        self.timings["impostor_run_s"] = time.perf_counter() - t0
        if not self.check("run with a registered impostor node finished",
                          st["status"] == "finished:completed",
                          f"{st['status']} {st.get('status-details', '')}"):
            return
        rows = read_rows(out)
        per_round = [(int(r["replies"]), int(r["rejected"])) for r in rows[1:]]
        # the impostor is refused when it is identified, so it is never sent
        # the model: N replies, none rejected, every round
        self.check("the impostor was refused in every round and never sent the model; the "
                   "honest nodes used", per_round == [(N, 0)] * rounds
                   and all(r["missing"] == "0" for r in rows),
                   f"(replies, rejected) per round: {per_round}")
        text = self.flwr("log", run_id, CONN, "--show", timeout=120, check=False).stdout
        self.check("the ServerApp's log names the reason", "pinned to no partition" in text,
                   next((ln.strip() for ln in text.splitlines() if "pinned to no" in ln), "")[:160])
        self.compare_with_twin(out, overrides, rows, label=" with an impostor")
        self.procs.stop("impostor")

    # -- all -------------------------------------------------------------------------
    def run(self) -> int:
        t0 = time.perf_counter()
        log(f"work dir {self.work}; SuperLink 127.0.0.1:{self.link_port}")
        try:
            self.setup()
            if not self.args.skip_negative:
                self.negative()
            self.main_run()
            if not self.args.skip_fault:
                self.fault_run()
            if not self.args.skip_crash:
                self.server_crash_run()
            if not self.args.skip_impostor:  # last: a stopped node stays "online" for ~1 min
                self.impostor_run()
        except Exception as exc:  # noqa: BLE001 - report, then clean up
            self.check("federation test ran to the end", False, f"{type(exc).__name__}: {exc}")
        finally:
            self.procs.stop_all()
            left = sweep(str(self.work))
            self.check("all processes stopped", not left, f"swept {left}" if left else "")
        self.timings["total_s"] = round(time.perf_counter() - t0, 1)
        for k, v in list(self.timings.items()):
            if isinstance(v, float):
                self.timings[k] = round(v, 1)
        ok = all(c["ok"] for c in self.checks)
        report = {"ok": ok, "checks": self.checks, "timings": self.timings, "work_dir": str(self.work)}
        (self.work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        log(f"timings: {json.dumps(self.timings)}")
        log(f"{'ALL PASSED' if ok else 'FAILED'}: {sum(c['ok'] for c in self.checks)}/"
            f"{len(self.checks)} checks; report {self.work / 'report.json'}")
        if ok and not self.args.keep and not self.args.workdir:
            shutil.rmtree(self.work, ignore_errors=True)
        return 0 if ok else 1


def read_rows(run_dir: Path) -> list:
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def summary_status(run_dir: Path):
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def last_round(run_dir: Path) -> int:
    try:
        rows = read_rows(run_dir)
    except (OSError, csv.Error):
        return -1
    return int(rows[-1]["round"]) if rows else -1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--fault-rounds", type=int, default=12)
    ap.add_argument("--skip-negative", action="store_true")
    ap.add_argument("--skip-fault", action="store_true")
    ap.add_argument("--crash-rounds", type=int, default=9)
    ap.add_argument("--skip-crash", action="store_true")
    ap.add_argument("--impostor-rounds", type=int, default=4)
    ap.add_argument("--skip-impostor", action="store_true")
    ap.add_argument("--workdir", default=None, help="default: a fresh temp dir (removed if all pass)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir even if all pass")
    args = ap.parse_args(argv)
    test = FederationTest(args)

    def on_signal(signum, frame):  # Ctrl-C / kill: still stop everything
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return test.run()
    except KeyboardInterrupt:
        test.procs.stop_all()
        sweep(str(test.work))
        raise


if __name__ == "__main__":
    sys.exit(main())
