"""The namespaces and the fault proxy of `make netns-test` (scripts/netns_lab.py):
a lab is made and removed without leftovers, also after SIGINT, and the proxy
adds latency, caps the rate and cuts / refuses (root only, skipped otherwise;
~20 s); without namespaces the target prints one skip line."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import netns_lab  # noqa: E402

WHY = netns_lab.skip_reason()
root = pytest.mark.skipif(WHY is not None, reason=f"netns: {WHY}")


def _procs_naming(text: str) -> list:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


@root
def test_lab_and_proxy(tmp_path):
    out = netns_lab.selftest(tmp_path)
    assert out["plain"][0] == 200_000
    # 100 ms each way on the echo's request and answer
    assert 0.19 <= out["latency_100ms"][1] < 1.0, out
    # 200 kB each way at 400 kB/s, pipelined: at least 0.5 s
    assert out["rate_400kBps_200kB"][0] == 200_000 and out["rate_400kBps_200kB"][1] >= 0.45, out
    assert out["refused"][0] in (0, None), out  # accepted, then aborted: nothing echoed
    assert out["after"][0] == 10, out  # the link is back after refuse_s
    assert out["stats"]["refused"] >= 1 and out["stats"]["cuts"] == 1
    assert out["down"]["left"] == [] and not netns_lab.lab_namespaces(out["tag"])
    log = [json.loads(ln) for ln in (tmp_path / "proxy.jsonl").read_text().splitlines()]
    assert sum(r["bytes"] for r in log if r["dir"] == "up") == out["stats"]["up"]


@root
def test_sigint_removes_everything(tmp_path):
    """SIGINT while the lab, an echo server and the proxy run: every
    namespace of the lab and every process in it are gone afterwards."""
    # started with SIGINT ignored, as a background job or a parent that ignores it
    # would start it: the lab must still clean up on SIGINT
    p = subprocess.Popen([sys.executable, str(REPO / "scripts" / "netns_lab.py"), "selftest",
                          "--hold"], stdout=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    tag = None
    try:
        deadline = time.monotonic() + 60
        for line in p.stdout:
            if '"held"' in line:
                tag = json.loads(line)["held"]
                break
            assert time.monotonic() < deadline
        assert tag is not None
        made = netns_lab.lab_namespaces(tag)
        assert len(made) == 3  # bridge, link, one node
        inside = [pid for ns in made for pid in
                  subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                 text=True).stdout.split()]
        assert inside  # the echo server and the proxy
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if tag is not None and netns_lab.lab_namespaces(tag):
            netns_lab.NetLab(1, tag).down()
    assert not netns_lab.lab_namespaces(tag)
    assert all(not Path(f"/proc/{pid}").exists() for pid in inside)
    assert not [pid for pid in _procs_naming(f"{netns_lab.PREFIX}{tag}-")]


@root
def test_clean_removes_only_dead_owners_labs():
    dead = str(int(Path("/proc/sys/kernel/pid_max").read_text()) + 1)  # never a pid
    lab = netns_lab.NetLab(1, tag=dead)
    try:
        lab.up()
        live = netns_lab.NetLab(1).up()  # this process's: kept
        try:
            gone = netns_lab.clean_stale()
            assert sorted(gone) == sorted(lab.made)
            assert sorted(netns_lab.lab_namespaces(live.tag)) == sorted(live.made)
        finally:
            live.down()
    finally:
        lab.down()
    assert not netns_lab.lab_namespaces(dead)


def test_without_namespaces_one_skip_line(monkeypatch, capsys):
    """Not root (or no `ip`): `make netns-test` says why in one line and passes."""
    import netns_test

    monkeypatch.setattr(netns_lab, "skip_reason", lambda: "network namespaces need root")
    assert netns_test.main([]) == 0
    out = capsys.readouterr().out
    assert out == "netns-test: skipped: network namespaces need root\n"
