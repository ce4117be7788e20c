"""The per-round costs that #21's GPU work cut on the CPU, each beside what
it replaced, interleaved in one process (J = 11,173,962, ResNet-18's model;
Fig. 3's broadcast: 8 uploads of 11,174 random indices):

* a round's g: a fresh zero tensor against zeroing one kept (FedServer's pool);
* the plain SGD step: dense over J against on g's support (ServerSGD.step_sparse);
* decoding the broadcast's coded indices: the varint decoder of commit
  5703242 against today's (regtopk_fl/payload.py).

    python scripts/bench_server_parts.py [--repeat 20] [--threads 2]

Prints the median milliseconds of each (with min-max) and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from regtopk_fl import payload  # noqa: E402
from regtopk_fl.optim import ServerSGD  # noqa: E402

J = 11_173_962


def old_decoder():
    """_varint_decode as it was at commit 5703242 (from git; None in a
    checkout without that history)."""
    res = subprocess.run(["git", "-C", str(ROOT), "show", "5703242:regtopk_fl/payload.py"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return None
    src = res.stdout
    mod = types.ModuleType("payload_5703242")
    sys.modules[mod.__name__] = mod  # its dataclasses look their module up
    try:
        exec(compile(src, "payload_5703242.py", "exec"), mod.__dict__)
    finally:
        del sys.modules[mod.__name__]
    return mod._varint_decode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(J, generator=gen)
    idx = torch.cat([torch.randperm(J, generator=gen)[:11_174] for _ in range(8)])
    support = torch.unique(idx)
    g = torch.zeros(J)
    g[support] = torch.randn(support.numel(), generator=gen)
    values = g[support]
    blob = np.frombuffer(payload.encode_indices(support, J), dtype=np.uint8)[1:]
    kept, opt = torch.zeros(J), ServerSGD(params, 0.01)
    old = old_decoder()
    pairs = {
        "a round's g: fresh zeros | zeroing a kept one": (
            lambda: torch.zeros_like(params), lambda: kept.zero_()),
        "plain SGD step: dense | on the support": (
            lambda: opt.step(g), lambda: opt.step_sparse(support, values)),
    }
    if old is None:
        print("broadcast's indices: not measured (no git history with commit 5703242)")
    else:
        assert np.array_equal(old(blob), payload._varint_decode(blob))
        pairs["broadcast's indices: decoder of 5703242 | today's"] = (
            lambda: old(blob), lambda: payload._varint_decode(blob))
    print(f"J = {J:,}, support {support.numel():,}, {a.threads} torch threads, "
          f"{a.repeat} interleaved repeats, ms median (min-max):")
    for name, fns in pairs.items():
        ms = [[], []]
        for _ in range(a.repeat):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                ms[i].append(1e3 * (time.perf_counter() - t0))
        before, after = (statistics.median(m) for m in ms)
        print(f"{name}: {before:.2f} ({min(ms[0]):.2f}-{max(ms[0]):.2f}) | "
              f"{after:.2f} ({min(ms[1]):.2f}-{max(ms[1]):.2f}) = {before / after:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
