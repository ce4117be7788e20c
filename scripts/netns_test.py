#!/usr/bin/env python
"""The Deployment Runtime across a network boundary (`make netns-test`, root).

The SuperLink and 3 SuperNodes run in network namespaces of their own, on a
private bridge (10.213.7.0/24, scripts/netns_lab.py: nothing in the root
namespace), with TLS issued for the SuperLink's namespace address only and
node authentication. Each SuperNode dials its own listener of a userspace
TCP fault proxy in the SuperLink's namespace, which forwards to the
SuperLink. Runs (linreg, N=3, RegTop-k S=0.3, 20 rounds each):

  (a) 50 ms +- 10 ms latency on every link, the whole run;
  (b) node 2's link cut mid-round (round 5) and refused for 20 s, then restored;
  (c) node 1's link cut while the server's train message to it is in flight
      (half of it delivered), refused for 5 s;
  (d) node 0 capped at 1 MB/s (with (a)'s latency on every link): also the
      network-model comparison (``network.*`` set to the same link);
  (e) the SuperLink (with its ServerApp) SIGKILLed after a checkpoint and
      restarted from its database; the run is resubmitted and resumes.

For each: the run finishes; every round with a missing worker names the
worker and why in the ServerApp's log (`flwr log`), and metrics.csv's
`missing` equals that count; no upload is rejected (every reply was computed
on a replica bitwise the server's model: the digest check); and the final
model and every metrics row equal an in-process twin in which the same
workers are missing in the same rounds (``faults.missing=FILE``, written
from the log: ``lost`` where the node's log says it restored an upload the
server never received). Processes, namespaces and the work directory are
removed at the end, pass or fail (also on SIGINT/SIGTERM), and checked.

    python scripts/netns_test.py [--faults abcde] [--rounds 20] [--workdir DIR] [--keep]
                                 [--cifar-rounds 0]

Without root or `ip` it prints one "skipped" line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import netns_lab  # noqa: E402
from federation_test import (BASE_OVERRIDES, CONN, N, REPO, FederationTest,  # noqa: E402
                             Failed, last_round, read_rows, summary_status, sweep)

LINK_PORT, PROXY_PORT = 9093, 9200
MISSING_RE = re.compile(r"round (\d+): missing (.*)$")
LOST_RE = re.compile(r"worker (\d+) round \d+: (?:feedback is about round -?\d+ but|no feedback "
                     r"although) the last upload was round (\d+), which the server never received")


def log(msg: str) -> None:
    print(f"[netns-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def kind_of(r: int, w: int, why: str, lost: set) -> str:
    """faults.missing's kind for a worker missing from round r: "offline" when
    no node of it was online (the server sent it nothing), "lost" when its
    node's log says it restored that round's upload (it computed, the reply
    never arrived), else "absent" (sent, never answered)."""
    if why.startswith("no online node"):
        return "offline"
    return "lost" if (r, w) in lost else "absent"


class NetnsTest(FederationTest):
    def __init__(self, args):
        args.fault_rounds = args.crash_rounds = args.impostor_rounds = args.rounds
        super().__init__(args)
        self.lab = netns_lab.NetLab(N)
        self.link_port = LINK_PORT
        self.address = f"{self.lab.link_ip}:{LINK_PORT}"
        self.sock = str(self.work / "proxy.sock")
        self.proxy_log = self.work / "proxy.jsonl"
        self.results: dict = {}

    # -- in the namespaces ---------------------------------------------------------
    def sh(self, argv, timeout=180, env_extra=None, cwd=None, check=True):
        """As FederationTest.sh, each command in a session of its own: the
        final sweep signals whole process groups, never this one's."""
        env = dict(self.env, **(env_extra or {}))
        r = subprocess.run([str(a) for a in argv], cwd=cwd or self.work, env=env, timeout=timeout,
                           capture_output=True, text=True, start_new_session=True)
        if check and r.returncode != 0:
            raise Failed(f"{' '.join(map(str, argv))} -> rc {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def flwr(self, *args, timeout=120, check=True):
        return self.sh(self.lab.argv(self.lab.link, ["flwr", *args]), timeout=timeout,
                       check=check, env_extra={"FLWR_HOME": str(self.cli_home)}, cwd=REPO)

    # in the SuperLink's namespace, and in a session of its own, so that the final
    # sweep never signals the test's own process group
    SUBMIT_NEW_SESSION = True

    def submit_shell(self, cmd: str) -> str:
        return f"ip netns exec {self.lab.link} {cmd} --format json"

    def wait_port_ns(self, ns: str, port: int, proc, timeout: float) -> None:
        probe = ("import socket,sys\ns=socket.socket();s.settimeout(1)\n"
                 f"sys.exit(s.connect_ex(('{self.lab.link_ip}',{port})))")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise Failed(f"process exited with {proc.returncode} before port {port} opened")
            if subprocess.run(self.lab.argv(ns, [sys.executable, "-c", probe]),
                              start_new_session=True).returncode == 0:
                return
            time.sleep(0.5)
        raise Failed(f"port {port} did not open in {timeout:.0f} s")

    def start_link(self) -> None:
        link = self.procs.start("superlink", self.lab.argv(self.lab.link, [
            SCRIPTS / "start_superlink.sh", "--host", self.lab.link_ip, "--port", LINK_PORT,
            "--certs", "certs", "--database", self.work / "superlink.db"]),
            env_extra={"FLWR_HOME": str(self.work / "link_home")})
        self.wait_port_ns(self.lab.link, LINK_PORT, link, 120)

    def start_node(self, i: int, key=None, cert=None, port=9094, name=None, extra=()):
        key = key or self.work / "keys" / f"node{i}"
        cert = cert or self.work / "certs" / "ca.crt"
        return self.procs.start(name or f"node{i}", self.lab.argv(self.lab.node_ns[i], [
            SCRIPTS / "start_supernode.sh", f"{self.lab.link_ip}:{PROXY_PORT + i}", i, N, key,
            cert, port, self.work / "state" / f"node{i}", "--", *extra]),
            env_extra={"SUPERNODE_HOME": str(self.work / f"node_home{i}")})

    def proxy(self, **cmd) -> dict:
        return netns_lab.proxy_control(self.sock, **cmd)

    def reset_links(self) -> None:
        self.proxy(link="*", op="set", latency_ms=0, jitter_ms=0, rate_Bps=None, stall=False)

    # -- set-up ----------------------------------------------------------------------
    def setup(self) -> None:
        t0 = time.perf_counter()
        self.lab.up()
        log(f"namespaces {self.lab.made}; SuperLink {self.address}, nodes {self.lab.node_ips}")
        self.sh([SCRIPTS / "make_certs.sh", "certs", self.lab.link_ip])  # that address only
        san = self.sh(["openssl", "x509", "-in", "certs/server.pem", "-noout", "-ext",
                       "subjectAltName"]).stdout
        self.check("the SuperLink's certificate names its namespace address only",
                   f"IP Address:{self.lab.link_ip}" in san and "127.0.0.1" not in san
                   and "localhost" not in san, " ".join(san.split()[-2:]))
        self.sh([SCRIPTS / "make_node_keys.sh", "keys", N])
        ca = self.work / "certs" / "ca.crt"
        self.cli_home.mkdir(exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONN}"\n\n'
            f'[superlink.{CONN}]\naddress = "{self.address}"\nroot-certificates = "{ca}"\n')
        self.start_link()
        proxy = self.procs.start("proxy", self.lab.argv(self.lab.link, [
            sys.executable, SCRIPTS / "netns_lab.py", "proxy", "--upstream", self.address,
            "--control", self.sock, "--log", self.proxy_log,
            *[f"--listen={self.lab.link_ip}:{PROXY_PORT + i}=n{i}" for i in range(N)]]))
        self.wait_port_ns(self.lab.link, PROXY_PORT, proxy, 60)
        self.sh(self.lab.argv(self.lab.link, [SCRIPTS / "register_nodes.sh", CONN] +
                              [self.work / "keys" / f"node{i}.pub" for i in range(N)]),
                env_extra={"FLWR_HOME": str(self.cli_home)})
        for i in range(N):
            self.start_node(i)
        self.wait_online(N, 240)
        # the lab is closed: no namespace of it has a default route, and
        # the root namespace holds none of its links
        routes = {ns: netns_lab._ip("-n", ns, "route").stdout for ns, _ in self.lab.hosts()}
        self.check("the lab's traffic cannot leave it (no default route in its namespaces, "
                   "none of its links in the root namespace)",
                   not any("default" in r for r in routes.values())
                   and not netns_lab.root_links(self.lab),
                   f"routes: {sorted({ln.split()[0] for r in routes.values() for ln in r.splitlines()})}")
        self.timings["setup_s"] = time.perf_counter() - t0
        self.check("SuperLink (TLS for its namespace address + node auth) and 3 SuperNodes in "
                   "their own namespaces, online through the proxy", True,
                   f"{self.timings['setup_s']:.0f} s")

    def wait_online(self, want: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.online_nodes()) < want:
            if time.monotonic() > deadline:
                raise Failed(f"only {self.online_nodes()} online after {timeout:.0f} s")
            for i in range(N):
                p = self.procs.procs.get(f"node{i}")
                if p is not None and p.poll() is not None:
                    raise Failed(f"SuperNode {i} exited (see {self.work}/node{i}.log)")
            time.sleep(2)

    # -- one fault run ---------------------------------------------------------------
    def node_log_offsets(self) -> dict:
        return {i: (self.work / f"node{i}.log").stat().st_size
                if (self.work / f"node{i}.log").exists() else 0 for i in range(N)}

    def lost_uploads(self, offsets: dict) -> set:
        """(round, worker) of uploads a node restored because the server never got them."""
        out = set()
        for i in range(N):
            path = self.work / f"node{i}.log"
            if path.exists():
                with open(path, errors="replace") as fh:
                    fh.seek(offsets[i])
                    for m in LOST_RE.finditer(fh.read()):
                        out.add((int(m.group(2)), int(m.group(1))))
        return out

    def missing_from_log(self, run_id: str) -> dict:
        """{round: {worker: why}} from the ServerApp's "round R: missing ..." lines."""
        text = self.flwr("log", run_id, CONN, "--show", timeout=180, check=False).stdout
        out: dict = {}
        for line in text.splitlines():
            m = MISSING_RE.search(line)
            if m:
                for item in m.group(2).split("; worker "):
                    w, _, why = item.removeprefix("worker ").partition(": ")
                    if w.strip().isdigit():
                        out.setdefault(int(m.group(1)), {})[int(w)] = why.strip()
        return out

    def fault_run(self, label: str, overrides: list, on_round=None, before=None,
                  expect=None) -> dict:
        out = self.work / f"run_{label}"
        offsets = self.node_log_offsets()
        mark = self.proxy_log.stat().st_size if self.proxy_log.exists() else 0
        t0 = time.perf_counter()
        if before:
            before()
        run_id = self.submit(overrides, out)
        st = self.wait_run(run_id, out, timeout=90 * self.args.rounds + 600,
                           on_round=(lambda done: on_round(done, out, run_id)) if on_round else None)
        info = self.after_run(label, run_id, out, overrides, offsets, t0, st, expect)
        info["proxy_log_from"] = mark
        return info

    def after_run(self, label, run_id, out, overrides, offsets, t0, st, expect,
                  resumed=False) -> dict:
        wall = time.perf_counter() - t0
        self.timings[f"run_{label}_s"] = wall
        info: dict = {"run_id": run_id, "wall_s": round(wall, 1)}
        self.results[label] = info
        self.reset_links()
        if not self.check(f"({label}) the run finished", st["status"] == "finished:completed",
                          f"{st['status']} {st.get('status-details', '')} in {wall:.0f} s"):
            return info
        rows = read_rows(out)
        why = self.missing_from_log(run_id)
        lost = self.lost_uploads(offsets)
        counted = {int(r["round"]): int(r["missing"]) for r in rows[1:]}
        named = {r: len(ws) for r, ws in why.items()}
        info["missing"] = {r: why[r] for r in sorted(why)}
        info["lost"] = sorted(lost)
        self.check(f"({label}) every round's `missing` names its workers and why in the log",
                   all(counted.get(r, 0) == named.get(r, 0) for r in set(counted) | set(named)),
                   "; ".join(f"round {r}: {ws}" for r, ws in sorted(why.items())) or "none missing")
        if expect is not None:
            ok, detail = expect(why, lost)
            self.check(f"({label}) {detail[0]}", ok, detail[1])
        sched = self.work / f"missing_{label}.txt"
        sched.write_text("".join(f"{r} {w} {kind_of(r, w, ws[w], lost)}\n"
                                 for r, ws in sorted(why.items()) for w in sorted(ws)))
        twin = [o for o in overrides if not o.startswith("runtime.")] + [f"faults.missing={sched}"]
        self.compare_with_twin(out, twin, rows, label=f" ({label})", resumed=resumed)
        self.check(f"({label}) every node online again at the end",
                   len(self.online_nodes()) == N)
        per_round = [b - a for a, b in zip([float(r["wall_s"]) for r in rows[1:]],
                                           [float(r["wall_s"]) for r in rows[2:]])]
        info["round_s_median"] = round(statistics.median(per_round), 2) if per_round else None
        return info

    # -- the faults --------------------------------------------------------------------
    def base(self, timeout: int, every: int = 0) -> list:
        return BASE_OVERRIDES + [f"rounds={self.args.rounds}", f"runtime.round_timeout_s={timeout}",
                                 f"checkpoint.every={every}"]

    def fault_a(self):
        self.fault_run("a", self.base(self.args.timeout), before=lambda: self.proxy(
            link="*", op="set", latency_ms=50, jitter_ms=10),
            expect=lambda why, lost: (not why, ("no worker missing under 50 +- 10 ms",
                                                f"missing {why}")))

    def fault_b(self):
        ev = {}

        def on_round(done, out, run_id):
            if done >= 4 and "cut" not in ev:
                time.sleep(1.0)  # round 5 under way
                ev["cut"], ev["round"] = time.time(), last_round(out) + 1
                log(f"(b) cutting node 2's link in round {ev['round']}, refused for 20 s")
                self.proxy(link="n2", op="cut", refuse_s=20)
            elif "cut" in ev and "restarted" not in ev and time.time() - ev["cut"] > 25 \
                    and len(self.online_nodes()) < N:
                # Flower 1.41's SuperNode gives up when a TLS handshake through
                # the refusing link ends in EOF (its heartbeat dies, the process
                # lives on): what a supervisor (systemd's Restart=) does, this
                # test does, once the SuperLink lists the node offline
                ev["restarted"] = time.time() - ev["cut"]
                log(f"(b) node 2 offline {ev['restarted']:.0f} s after the cut: restarting "
                    "its SuperNode (same key, same state dir)")
                self.procs.stop("node2")
                self.start_node(2)

        def expect(why, lost):
            r = ev.get("round", -1)
            if "restarted" in ev:
                self.results.setdefault("b", {})["node2_restarted_after_s"] = round(
                    ev["restarted"], 1)
            back = [rr for rr in range(r + 1, self.args.rounds + 1) if 2 not in why.get(rr, {})]
            rows = read_rows(self.work / "run_b")
            took = float(rows[r]["wall_s"]) - float(rows[r - 1]["wall_s"]) if r < len(rows) else 0
            ev["round_s"] = took
            absorbed = 2 not in why.get(r, {}) and took >= 20  # waited out within the timeout
            return ((2 in why.get(r, {}) or absorbed) and bool(back),
                    (f"node 2 missing in round {r} (cut there), or that round waited the cut "
                     "out; then back", f"round {r} took {took:.1f} s; "
                     f"node 2 missing in rounds {sorted(rr for rr in why if 2 in why[rr])}; "
                     f"others: {sorted((rr, w) for rr, ws in why.items() for w in ws if w != 2)}"))

        self.fault_run("b", self.base(self.args.cut_timeout), on_round=on_round, expect=expect)

    def fault_c(self, threshold: int):
        ev = {}

        def on_round(done, out, run_id):
            if done >= 4 and "armed" not in ev:
                ev["armed"] = last_round(out) + 1
                log(f"(c) node 1's link will be cut inside its next message of >= {threshold} B")
                self.proxy(link="n1", op="arm_cut", down_bytes=threshold, refuse_s=5)

        def expect(why, lost):
            st = self.proxy(link="n1")["n1"]
            rounds = sorted(r for r, ws in why.items() if 1 in ws)
            return (st["cuts"] >= 1 and bool(rounds),
                    ("node 1 missing in the round whose train message was cut in flight",
                     f"cuts {st['cuts']} (inside a {st.get('cut_chunk_bytes')} B chunk), node 1 missing in rounds {rounds}, lost {sorted(lost)}"))

        self.fault_run("c", self.base(self.args.cut_timeout), on_round=on_round, expect=expect)

    def fault_d(self):
        net = ["network.uplink_mbps=8", "network.downlink_mbps=8", "network.latency_ms=50"]

        def before():
            self.proxy(link="*", op="set", latency_ms=50, jitter_ms=10)
            self.proxy(link="n0", op="set", rate_Bps=1_000_000)

        info = self.fault_run("d", self.base(self.args.timeout) + net, before=before,
                              expect=lambda why, lost: (not why, (
                                  "no worker missing at 1 MB/s", f"missing {why}")))
        self.results["d"]["network"] = self.network_model("d", "n0", info)

    def fault_d_cifar(self):
        """(d)'s link with a model of a few MB: ResNet-18 at width 16 on
        CIFAR-10 (701,466 parameters: 2.8 MB in fp32), broadcast=model, so each round sends
        every node the whole model; the network-model comparison's second task."""
        data = (REPO / self.args.cifar_data).resolve()
        task = ["task=cifar10", "task.width=16", "task.stem=cifar", f"task.data_path={data}",
                "task.download=false",  # the archive only: never a lookup outside the lab
                f"task.cache_dir={self.work / 'cache'}", "task.test_subset=500",
                f"eval_every={self.args.cifar_rounds}", "sparsifier.sparsity=0.01",
                "broadcast=model", "device=cpu"]
        base = [o for o in BASE_OVERRIDES if not o.startswith(("task=", "sparsifier.sparsity"))]
        overrides = base + task + [f"rounds={self.args.cifar_rounds}",
                                   "runtime.round_timeout_s=180", "checkpoint.every=0",
                                   "network.uplink_mbps=8", "network.downlink_mbps=8",
                                   "network.latency_ms=50"]

        def before():
            self.proxy(link="*", op="set", latency_ms=50, jitter_ms=10)
            self.proxy(link="n0", op="set", rate_Bps=1_000_000)

        rounds, self.args.rounds = self.args.rounds, self.args.cifar_rounds
        try:
            info = self.fault_run("d_cifar", overrides, before=before)
        finally:
            self.args.rounds = rounds
        self.results["d_cifar"]["network"] = self.network_model("d_cifar", "n0", info)

    def fault_e(self):
        overrides = self.base(self.args.timeout, every=3)
        out = self.work / "run_e"
        offsets = self.node_log_offsets()
        t0 = time.perf_counter()
        first = self.submit(overrides, out)
        deadline = time.monotonic() + 90 * self.args.rounds + 300
        while not (out / "checkpoint.pt").exists() or last_round(out) < 5:
            if summary_status(out) in ("finished", "failed") or time.monotonic() > deadline:
                raise Failed(f"(e) run ended before the kill: {self.run_status(first)}")
            time.sleep(0.5)
        killed_after = last_round(out)
        log(f"(e) SIGKILL to the SuperLink's process tree after round {killed_after}")
        self.procs.stop("superlink", sig=signal.SIGKILL, grace=5)
        for pid in [p for p in netns_lab._ip("netns", "pids", self.lab.link).stdout.split()
                    if p.isdigit()]:  # its ServerApp too (whatever the SuperExec left)
            if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        self.check("(e) SuperLink killed mid-run", summary_status(out) == "running"
                   and killed_after < self.args.rounds, f"after round {killed_after}")
        time.sleep(5)
        self.start_link()
        # Flower 1.41: a SuperNode whose TLS handshake ends in EOF (the proxy
        # accepted it while the SuperLink was down, as any TCP front would)
        # gives up reconnecting and its heartbeat thread dies, while the
        # process lives on. A supervisor restarts it; so does this test, once
        # the restarted SuperLink (whose database still says "online") has
        # marked it offline: Flower refuses to activate a node listed online.
        for i in range(N):
            self.procs.stop(f"node{i}")
        deadline = time.monotonic() + 300
        while self.online_nodes():
            if time.monotonic() > deadline:
                raise Failed("(e) the stopped SuperNodes still online after 300 s")
            time.sleep(5)
        for i in range(N):
            self.start_node(i)
        self.wait_online(N, 300)
        self.flwr("stop", first, CONN, check=False)
        second = self.submit(overrides, out)
        st = self.wait_run(second, out, timeout=90 * self.args.rounds + 600)
        info = self.after_run("e", second, out, overrides, offsets, t0, st, None, resumed=True)
        info["killed_after_round"] = killed_after

    # -- the network model against the shaped link ----------------------------------
    def network_model(self, label: str, link: str, info: dict) -> dict:
        """Per round on ``link``: the train message's and the reply's time
        through the proxy (read -> last byte delivered, latency and rate cap
        included) and bytes on the wire (TLS, HTTP/2, gRPC framing included)
        against ``comm_s`` (network.*: coded bytes at the same rate, plus
        2 x latency) and the round's wall time."""
        rows = read_rows(self.work / f"run_{label}")
        chunks = []
        with open(self.proxy_log) as fh:
            fh.seek(info.get("proxy_log_from", 0))
            for line in fh:
                r = json.loads(line)
                if r["link"] == link:
                    chunks.append(r)
        summary_t0 = float(json.loads((self.work / f"run_{label}" / "summary.json")
                                      .read_text()).get("started_unix", 0) or 0)
        per = []
        ends = [float(r["wall_s"]) for r in rows]
        t_base = self._run_start_unix(label, rows)
        for k in range(1, len(rows)):
            lo, hi = t_base + ends[k - 1], t_base + ends[k]
            win = [c for c in chunks if lo <= c["t_in"] < hi]
            down = self._burst(win, "down")
            up = self._burst(win, "up")
            per.append({"round": k, "comm_s": float(rows[k]["comm_s"] or 0),
                        "wire_s": down["s"] + up["s"], "down_wire_B": down["bytes"],
                        "up_wire_B": up["bytes"],
                        "down_coded_B": int(rows[k]["downlink_coded_bytes"]),
                        "up_coded_B": int(rows[k]["uplink_coded_bytes"]),
                        "round_s": ends[k] - ends[k - 1]})
        ok = [p for p in per if p["comm_s"] > 0 and p["wire_s"] > 0]
        out = {"rounds": len(ok), "per_round": per, "summary_t0": summary_t0}
        if ok:
            out["wire_over_model_median"] = round(statistics.median(
                p["wire_s"] / p["comm_s"] for p in ok), 3)
            out["round_over_model_median"] = round(statistics.median(
                p["round_s"] / p["comm_s"] for p in ok), 1)
            out["wire_bytes_over_coded_median"] = round(statistics.median(
                (p["down_wire_B"] + p["up_wire_B"]) / max(1, p["down_coded_B"] / N + p["up_coded_B"] / N)
                for p in ok), 2)
        log(f"({label}) network model: {json.dumps({k: v for k, v in out.items() if k != 'per_round'})}")
        return out

    def _run_start_unix(self, label: str, rows: list) -> float:
        """Unix time of metrics.csv's wall_s = 0 (the file's mtime minus the last wall_s)."""
        path = self.work / f"run_{label}" / "metrics.csv"
        return path.stat().st_mtime - float(rows[-1]["wall_s"])

    @staticmethod
    def _burst(win: list, direction: str) -> dict:
        """The largest message of the window in one direction: chunks read
        within 20 ms of the previous one, or before it was delivered (queued
        behind it: the same transfer); its time from the first read to the
        last delivery."""
        groups, cur = [], []
        for c in sorted((c for c in win if c["dir"] == direction), key=lambda c: c["t_in"]):
            if cur and c["t_in"] - cur[-1]["t_in"] > 0.02 and c["t_in"] > cur[-1]["t"]:
                groups.append(cur)
                cur = []
            cur.append(c)
        if cur:
            groups.append(cur)
        if not groups:
            return {"s": 0.0, "bytes": 0}
        g = max(groups, key=lambda g: sum(c["bytes"] for c in g))
        return {"s": max(c["t"] for c in g) - min(c["t_in"] for c in g),
                "bytes": sum(c["bytes"] for c in g)}

    # -- all -------------------------------------------------------------------------
    def run(self) -> int:
        t0 = time.perf_counter()
        log(f"work dir {self.work}")
        try:
            self.setup()
            faults = list(self.args.faults) + (["d_cifar"] if self.args.cifar_rounds else [])
            for f in faults:
                log(f"== fault ({f})")
                try:
                    if f == "c":
                        self.fault_c(self.args.cut_bytes)
                    else:
                        getattr(self, f"fault_{f}")()
                except Exception as exc:  # noqa: BLE001 - that fault failed; go on with the next
                    self.check(f"({f}) ran to the end", False, f"{type(exc).__name__}: {exc}")
                    self.reset_links()
        except Exception as exc:  # noqa: BLE001 - report, then clean up
            self.check("netns test ran to the end", False, f"{type(exc).__name__}: {exc}")
        finally:
            self.cleanup()
        self.timings["total_s"] = round(time.perf_counter() - t0, 1)
        for k, v in list(self.timings.items()):
            if isinstance(v, float):
                self.timings[k] = round(v, 1)
        ok = all(c["ok"] for c in self.checks)
        report = {"ok": ok, "checks": self.checks, "timings": self.timings,
                  "results": self.results, "work_dir": str(self.work)}
        text = json.dumps(report, indent=1, default=str) + "\n"
        if self.args.report:
            Path(self.args.report).write_text(text)
        keep = self.args.keep or self.args.workdir or not ok
        if keep:
            (self.work / "report.json").write_text(text)
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        log(f"timings: {json.dumps(self.timings)}")
        log(f"{'ALL PASSED' if ok else 'FAILED'}: {sum(c['ok'] for c in self.checks)}/"
            f"{len(self.checks)} checks" + (f"; work dir kept: {self.work}" if keep else
                                             "; work dir removed"))
        return 0 if ok else 1

    def cleanup(self) -> None:
        self.procs.stop_all()
        left = sweep(str(self.work))
        down = self.lab.down()
        self.check("all processes stopped, every namespace (and its links) removed",
                   not left and not down["left"] and not netns_lab.lab_namespaces(self.lab.tag),
                   f"swept {left}, killed in namespaces {down['killed']}, left {down['left']}"
                   if left or down["killed"] or down["left"] else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", default="abcde", help="which of a-e, in order")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=120,
                    help="runtime.round_timeout_s of runs (a), (d), (e): long enough that a loaded "
                         "machine's rounds (a ClientApp process per message) are not cut short")
    ap.add_argument("--cut-timeout", type=int, default=60,
                    help="runtime.round_timeout_s of runs (b) and (c), where a node is meant to "
                         "miss the round it was cut in")
    ap.add_argument("--cut-bytes", type=int, default=800,
                    help="(c): a server-to-node chunk this large, after round 4, is a train "
                         "message (linreg: ~580 coded bytes + ~240 B of gRPC/HTTP2/TLS framing)")
    ap.add_argument("--cifar-rounds", type=int, default=0,
                    help="> 0: also (d)'s link with ResNet-18 (width 16) on CIFAR-10, "
                         "broadcast=model, this many rounds (the network-model comparison)")
    ap.add_argument("--cifar-data", default="../shared/data/cifar10-jpeg.tar.gz",
                    help="the CIFAR-10 archive (relative: to the project root)")
    ap.add_argument("--workdir", default=None, help="default: a fresh temp dir (removed if all pass)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir even if all pass")
    ap.add_argument("--report", default=None, help="also write the report (JSON) here")
    args = ap.parse_args(argv)
    why = netns_lab.skip_reason()
    if why:
        print(f"netns-test: skipped: {why}")
        return 0
    netns_lab.clean_stale()  # labs of runs that were SIGKILLed
    test = NetnsTest(args)

    def on_signal(signum, frame):  # Ctrl-C / kill: still clean up
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return test.run()
    except KeyboardInterrupt:
        test.cleanup()
        if not (args.keep or args.workdir):
            shutil.rmtree(test.work, ignore_errors=True)
        log("interrupted: cleaned up")
        return 130


if __name__ == "__main__":
    sys.exit(main())
