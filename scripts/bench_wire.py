"""Encode/decode time of the coded indices against the bytes they save.

    python scripts/bench_wire.py [--dim 11173962] [--workers 8] [--out results/bench_wire.md]

For each density S: one worker's upload (k = S*J random indices) and the
broadcast support (the union of N such uploads), coded as sorted-delta
varints or a bitmap (regtopk_fl/payload.py), against raw int32 indices. The
time is the median of repeats; "break-even" is the link rate below which the
coding pays for itself (bytes saved * 8 / (encode + decode time)).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from regtopk_fl.payload import decode_indices, encode_indices, index_itemsize  # noqa: E402
from _report import cpu_name, emit  # noqa: E402  (scripts/_report.py)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench(dim: int, workers: int, densities, repeats: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    rows = []
    for s in densities:
        k = max(1, round(s * dim))
        ups = [np.sort(rng.choice(dim, k, replace=False)) for _ in range(workers)]
        for what, idx in (("upload", ups[0]), (f"broadcast (N={workers})",
                                                np.unique(np.concatenate(ups)))):
            blob = encode_indices(idx, dim)
            assert np.array_equal(decode_indices(blob, dim), idx)
            enc = _median_ms(lambda: encode_indices(idx, dim), repeats)
            dec = _median_ms(lambda: decode_indices(blob, dim), repeats)
            raw = idx.size * index_itemsize(dim)
            saved = raw - len(blob)
            rows.append({"S": s, "what": what, "entries": idx.size, "raw_B": raw,
                         "coded_B": len(blob), "code": "bitmap" if blob[0] == 1 else "varint",
                         "ratio": len(blob) / raw, "encode_ms": enc, "decode_ms": dec,
                         "breakeven_mbps": saved * 8 / ((enc + dec) / 1e3) / 1e6
                         if saved > 0 else 0.0})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=11_173_962)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.0001, 0.001, 0.01, 0.1])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="write a Markdown table here")
    args = ap.parse_args(argv)
    rows = bench(args.dim, args.workers, args.densities, args.repeats)
    cpu = cpu_name()
    lines = ["# Coded indices on the wire (`python scripts/bench_wire.py`)", "",
             f"J = {args.dim:,}, N = {args.workers}; {os.cpu_count()} CPU cores ({cpu}), "
             f"numpy {np.__version__}, torch {torch.__version__}; "
             f"{time.strftime('%Y-%m-%d %H:%M')}. Median of {args.repeats} repeats.", "",
             "| S | message | indices | raw int32 (B) | coded (B) | code | coded/raw "
             "| encode (ms) | decode (ms) | pays off below (Mbit/s) |",
             "| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['S']:g} | {r['what']} | {r['entries']:,} | {r['raw_B']:,} | "
                     f"{r['coded_B']:,} | {r['code']} | {r['ratio']:.2f} | {r['encode_ms']:.2f} | "
                     f"{r['decode_ms']:.2f} | {r['breakeven_mbps']:,.0f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
