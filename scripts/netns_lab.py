#!/usr/bin/env python
"""Network namespaces and a userspace TCP fault proxy for `make netns-test`.

* :class:`NetLab` - one namespace per host (the SuperLink's, one per
  SuperNode), each with ``lo`` and an ``eth0`` on a private test subnet
  (``10.213.7.0/24``), joined by veth pairs to a bridge that lives in a
  namespace of its own: nothing is added to the root namespace, so no packet
  can leave the lab. Names carry a tag with the owner's pid
  (``rtkn<pid>-link``, ``rtkn<pid>-n0``, ...); :meth:`NetLab.down` kills every
  process left in those namespaces and deletes them (the veths go with them),
  and ``python scripts/netns_lab.py clean`` removes the labs of owners that
  died without cleaning up (only names with this prefix and a dead pid).
* :class:`FaultProxy` - an asyncio TCP forwarder, one listener per link (a
  SuperNode dials its own listener, which forwards to the SuperLink), with
  per-link settings changed at run time over a UNIX control socket:
  ``latency_ms`` +- ``jitter_ms`` (per chunk, order kept), ``rate_Bps``
  (a token bucket per direction), ``stall`` (hold bytes, keep connections),
  ``cut`` (abort every connection of the link) with ``refuse_s`` (accept and
  abort new ones for that long), and ``cut_on_down_bytes`` (cut the link in
  the middle of the first server-to-node chunk of at least that many bytes:
  a message in flight). Every forwarded chunk is logged (time, link,
  direction, bytes) to a JSON-lines file for the network-model comparison.

    python scripts/netns_lab.py proxy --listen HOST:PORT=LINK ... --upstream HOST:PORT \
        --control SOCK --log FILE
    python scripts/netns_lab.py selftest [--hold]   # lab + proxy round trip (as root)
    python scripts/netns_lab.py clean               # labs whose owner process is gone
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "rtkn"
SUBNET = "10.213.7"  # /24, only inside the lab's namespaces


def skip_reason() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add); not root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns list` fails: {r.stderr.strip()}"
    return None


def _ip(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(map(str, args))}: {r.stderr.strip()}")
    return r


def lab_namespaces(tag: str | None = None) -> list:
    """Namespaces of labs (of ``tag``'s lab only, when given)."""
    names = [ln.split()[0] for ln in _ip("netns", "list").stdout.splitlines() if ln.strip()]
    want = f"{PREFIX}{tag}-" if tag else PREFIX
    return [n for n in names if n.startswith(want)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_procs(ns: str, grace: float = 5.0) -> list:
    """Stop every process that runs in namespace ``ns`` (one this lab made)."""
    pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _ip("netns", "pids", ns, check=False).stdout.split():
                return pids
            time.sleep(0.1)
    return pids


class NetLab:
    """Namespaces ``link`` (the SuperLink, address .1) and ``n0..n{k-1}``
    (SuperNodes, .10+i) on ``10.213.7.0/24``, bridged in namespace ``br``."""

    def __init__(self, nodes: int, tag: str | None = None):
        self.tag = tag or str(os.getpid())
        self.nodes = int(nodes)
        p = f"{PREFIX}{self.tag}-"
        self.br, self.link = p + "br", p + "link"
        self.node_ns = [f"{p}n{i}" for i in range(self.nodes)]
        self.link_ip = f"{SUBNET}.1"
        self.node_ips = [f"{SUBNET}.{10 + i}" for i in range(self.nodes)]
        self.made: list = []

    def hosts(self) -> list:
        return [(self.link, self.link_ip)] + list(zip(self.node_ns, self.node_ips))

    def up(self) -> "NetLab":
        _ip("netns", "add", self.br)
        self.made.append(self.br)
        _ip("-n", self.br, "link", "set", "lo", "up")
        _ip("-n", self.br, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.br, "link", "set", "br0", "up")
        for j, (ns, addr) in enumerate(self.hosts()):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{j}",
                "netns", self.br)
            _ip("-n", self.br, "link", "set", f"p{j}", "master", "br0")
            _ip("-n", self.br, "link", "set", f"p{j}", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def argv(self, ns: str, argv) -> list:
        """``argv`` run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *map(str, argv)]

    def down(self) -> dict:
        """Kill what runs in the lab's namespaces, delete them. Returns what
        was killed and what is left (nothing, when all went well)."""
        killed = {}
        for ns in lab_namespaces(self.tag):
            pids = _kill_ns_procs(ns)
            if pids:
                killed[ns] = pids
            _ip("netns", "delete", ns, check=False)
        return {"killed": killed, "left": self.leftovers()}

    def leftovers(self) -> list:
        """Namespaces of this lab still present, or processes still in them."""
        left = lab_namespaces(self.tag)
        return left + [f"pid {p}" for ns in left
                       for p in _ip("netns", "pids", ns, check=False).stdout.split()]


def root_links(lab: "NetLab") -> list:
    """Links of the root namespace that belong to the lab (there should be none:
    the veths are made inside the lab's namespaces)."""
    out = _ip("-o", "link", "show").stdout
    names = [ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines() if ":" in ln]
    return [n for n in names if n.startswith(PREFIX) or n in ("br0",)
            or (n.startswith("p") and n[1:].isdigit())]


def clean_stale() -> list:
    """Delete the labs whose owner (the pid in the tag) is no longer alive."""
    gone = []
    for ns in lab_namespaces():
        tag = ns[len(PREFIX):].split("-")[0]
        if tag.isdigit() and not _pid_alive(int(tag)):
            _kill_ns_procs(ns)
            _ip("netns", "delete", ns, check=False)
            gone.append(ns)
    return gone


# -- the fault proxy -------------------------------------------------------------
class Link:
    """The settings and connections of one proxied link."""

    def __init__(self, name: str):
        self.name = name
        self.latency_ms = 0.0
        self.jitter_ms = 0.0
        self.rate_Bps = None  # None: unlimited
        self.stall = False
        self.refuse_until = 0.0
        self.cut_on_down_bytes = None
        self.cut_refuse_s = 0.0
        self.conns: set = set()
        self.stats = {"accepted": 0, "refused": 0, "cuts": 0, "up": 0, "down": 0}

    def settings(self) -> dict:
        return {"latency_ms": self.latency_ms, "jitter_ms": self.jitter_ms,
                "rate_Bps": self.rate_Bps, "stall": self.stall,
                "refusing_s": max(0.0, self.refuse_until - time.monotonic()),
                "cut_on_down_bytes": self.cut_on_down_bytes, **self.stats}


class FaultProxy:
    CHUNK = 16384

    def __init__(self, listens: list, upstream: tuple, log_path: str | None = None,
                 seed: int = 0):
        self.listens = listens  # [(host, port, link name)]
        self.upstream = upstream
        self.links = {name: Link(name) for _, _, name in listens}
        self.rng = random.Random(seed)
        self.log = open(log_path, "a", buffering=1) if log_path else None
        self.t0 = time.time()
        self.servers: list = []

    def record(self, link: str, direction: str, n: int, t_in: float | None = None) -> None:
        """A chunk delivered now; ``t_in``: when the proxy read it (wall clock)."""
        self.links[link].stats[direction] = self.links[link].stats.get(direction, 0) + n
        if self.log is not None:
            now = time.time()
            self.log.write(f'{{"t": {now:.6f}, "t_in": {t_in or now:.6f}, "link": "{link}", '
                           f'"dir": "{direction}", "bytes": {n}}}\n')

    async def start(self) -> None:
        for host, port, name in self.listens:
            srv = await asyncio.start_server(
                lambda r, w, name=name: self._accept(name, r, w), host, port)
            self.servers.append(srv)

    def cut(self, name: str, refuse_s: float = 0.0) -> int:
        link = self.links[name]
        link.refuse_until = max(link.refuse_until, time.monotonic() + refuse_s)
        link.stats["cuts"] += 1
        n = 0
        for writers in list(link.conns):
            for w in writers:
                w.transport.abort()
            n += 1
        link.conns.clear()
        return n

    async def _accept(self, name: str, reader, writer) -> None:
        link = self.links[name]
        if time.monotonic() < link.refuse_until:
            link.stats["refused"] += 1
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        link.stats["accepted"] += 1
        pair = (writer, up_w)
        link.conns.add(pair)
        tasks = [asyncio.create_task(self._pump(link, reader, up_w, "up", pair)),
                 asyncio.create_task(self._pump(link, up_r, writer, "down", pair))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for w in pair:
                w.transport.abort()
            link.conns.discard(pair)

    async def _pump(self, link: Link, reader, writer, direction: str, pair) -> None:
        """Read chunks, deliver each after the link's latency (never before
        the previous one), at most at its rate, not while stalled."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)  # bounded: TCP backpressure

        async def deliver():
            free = 0.0  # when the shaped "wire" is free again
            while True:
                due, t_in, data = await queue.get()
                if data is None:
                    return
                while link.stall:
                    await asyncio.sleep(0.05)
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                if link.rate_Bps:
                    free = max(free, time.monotonic()) + len(data) / link.rate_Bps
                    await asyncio.sleep(max(0.0, free - time.monotonic()))
                if pair not in link.conns:
                    return
                writer.write(data)
                await writer.drain()
                self.record(link.name, direction, len(data), t_in)

        sender = asyncio.create_task(deliver())
        last_due = 0.0
        try:
            while True:
                data = await reader.read(self.CHUNK)
                if not data:
                    break
                if (direction == "down" and link.cut_on_down_bytes is not None
                        and len(data) >= link.cut_on_down_bytes):
                    # a message in flight: half of it goes out, then the link is cut
                    link.cut_on_down_bytes = None
                    link.stats["cut_chunk_bytes"] = len(data)
                    writer.write(data[:len(data) // 2])
                    self.record(link.name, "down_partial", len(data) // 2)
                    self.cut(link.name, link.cut_refuse_s)
                    return
                delay = link.latency_ms + (self.rng.uniform(-link.jitter_ms, link.jitter_ms)
                                           if link.jitter_ms else 0.0)
                due = max(last_due, time.monotonic() + max(0.0, delay) / 1000.0)
                last_due = due
                await queue.put((due, time.time(), data))
            await queue.put((0.0, 0.0, None))
            await sender
            if pair in link.conns and writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            sender.cancel()

    def control(self, cmd: dict) -> dict:
        name = str(cmd.get("link", ""))
        names = list(self.links) if name == "*" else [name]
        if any(n not in self.links for n in names):
            return {"error": f"no link {name!r} (links: {sorted(self.links)})"}
        op = cmd.get("op", "get")
        for n in names:
            link = self.links[n]
            if op == "set":
                for key in ("latency_ms", "jitter_ms", "rate_Bps", "stall"):
                    if key in cmd:
                        setattr(link, key, cmd[key])
            elif op == "cut":
                self.cut(n, float(cmd.get("refuse_s", 0.0)))
            elif op == "arm_cut":
                link.cut_on_down_bytes = int(cmd["down_bytes"])
                link.cut_refuse_s = float(cmd.get("refuse_s", 0.0))
            elif op != "get":
                return {"error": f"unknown op {op!r}"}
        return {n: self.links[n].settings() for n in names}

    async def serve_control(self, path: str) -> None:
        async def handle(reader, writer):
            try:
                while line := await reader.readline():
                    try:
                        out = self.control(json.loads(line))
                    except Exception as exc:  # noqa: BLE001 - answer, keep serving
                        out = {"error": f"{type(exc).__name__}: {exc}"}
                    writer.write((json.dumps(out) + "\n").encode())
                    await writer.drain()
            finally:
                writer.close()

        self.servers.append(await asyncio.start_unix_server(handle, path))


def proxy_control(sock: str, timeout: float = 10.0, **cmd) -> dict:
    """One command to a running proxy; its answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock)
        s.sendall((json.dumps(cmd) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            part = s.recv(65536)
            if not part:
                break
            buf += part
    out = json.loads(buf)
    if "error" in out:
        raise RuntimeError(f"proxy: {out['error']}")
    return out


def _hostport(text: str) -> tuple:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _proxy_main(args) -> None:
    listens = []
    for item in args.listen:
        hp, _, name = item.partition("=")
        listens.append((*_hostport(hp), name or hp))
    proxy = FaultProxy(listens, _hostport(args.upstream), args.log, args.seed)
    await proxy.start()
    await proxy.serve_control(args.control)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"proxy ready: {[(h, p, n) for h, p, n in listens]} -> {args.upstream}", flush=True)
    await stop.wait()
    for srv in proxy.servers:
        srv.close()
    for name in proxy.links:
        proxy.cut(name)
    Path(args.control).unlink(missing_ok=True)


# -- a self test: lab up, a TCP echo in the link namespace, the proxy ------------
def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


ECHO = ("import socket,threading\n"
        "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        "s.bind(('{host}',{port}));s.listen()\n"
        "def h(c):\n"
        "    while (d:=c.recv(65536)): c.sendall(d)\n"
        "    c.close()\n"
        "while True: threading.Thread(target=h,args=(s.accept()[0],),daemon=True).start()\n")

CLIENT = ("import socket,sys,time\n"
          "n=int(sys.argv[3]);c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=20)\n"
          "t=time.monotonic();c.sendall(b'x'*n);got=0\n"
          "while got<n:\n"
          "    d=c.recv(65536)\n"
          "    if not d: break\n"
          "    got+=len(d)\n"
          "print(got, round(time.monotonic()-t,4))\n")


def selftest(workdir: Path, hold: bool = False) -> dict:
    """Lab with one node; an echo server in the link namespace behind the
    proxy; a node sends bytes through it: plain, with latency, with a rate
    cap, cut + refused, and again after. Raises on a failed check."""
    lab = NetLab(1)
    procs = []
    out: dict = {"tag": lab.tag}
    try:
        lab.up()
        port, pport = 7001, 7101
        sock = str(workdir / "proxy.sock")
        procs.append(subprocess.Popen(lab.argv(lab.link, [sys.executable, "-c", ECHO.format(
            host=lab.link_ip, port=port)]), start_new_session=True))
        procs.append(subprocess.Popen(lab.argv(lab.link, [
            sys.executable, __file__, "proxy", "--listen", f"{lab.link_ip}:{pport}=n0",
            "--upstream", f"{lab.link_ip}:{port}", "--control", sock,
            "--log", str(workdir / "proxy.jsonl")]), start_new_session=True,
            stdout=subprocess.DEVNULL))
        wait_for(lambda: os.path.exists(sock), 20, "proxy control socket")

        def send(n: int, timeout=30) -> tuple:
            r = subprocess.run(lab.argv(lab.node_ns[0], [
                sys.executable, "-c", CLIENT, lab.link_ip, pport, n]),
                capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                return None, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
            got, secs = r.stdout.split()
            return int(got), float(secs)

        wait_for(lambda: send(10)[0] == 10, 20, "echo through the proxy")
        out["plain"] = send(200_000)
        proxy_control(sock, link="n0", op="set", latency_ms=100, jitter_ms=0)
        out["latency_100ms"] = send(100)
        proxy_control(sock, link="n0", op="set", latency_ms=0, rate_Bps=400_000)
        out["rate_400kBps_200kB"] = send(200_000)
        proxy_control(sock, link="n0", op="set", rate_Bps=None)
        proxy_control(sock, link="n0", op="cut", refuse_s=3)
        out["refused"] = send(10)
        time.sleep(3.2)
        out["after"] = send(10)
        out["stats"] = proxy_control(sock, link="n0")["n0"]
        if hold:
            print(json.dumps({"held": lab.tag}), flush=True)
            time.sleep(3600)
        return out
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        out["down"] = lab.down()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("proxy", help="run the fault proxy (in the SuperLink's namespace)")
    pp.add_argument("--listen", action="append", required=True, help="HOST:PORT=LINK")
    pp.add_argument("--upstream", required=True, help="HOST:PORT")
    pp.add_argument("--control", required=True, help="UNIX socket path")
    pp.add_argument("--log", default=None, help="JSON-lines log of forwarded chunks")
    pp.add_argument("--seed", type=int, default=0, help="the jitter's seed")
    st = sub.add_parser("selftest", help="lab + proxy round trip (root)")
    st.add_argument("--hold", action="store_true", help="wait after the checks (to test SIGINT)")
    sub.add_parser("clean", help="delete labs whose owner process is gone")
    args = ap.parse_args(argv)
    if args.cmd == "proxy":
        asyncio.run(_proxy_main(args))
        return 0
    why = skip_reason()
    if why:
        print(f"netns_lab: skipped: {why}")
        return 0
    if args.cmd == "clean":
        print(json.dumps({"removed": clean_stale()}))
        return 0
    import tempfile

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too, explicitly: a process started with SIGINT ignored (a background
    # job, or a parent that ignores it) inherits that, and would never clean up
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with tempfile.TemporaryDirectory(prefix="regtopk-netns-") as tmp:
        print(json.dumps(selftest(Path(tmp), args.hold)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
