"""The compiled candidate scan (compress/scan_kernels.py) against torch's.

Both return (ascending local indices, scores there) of the entries whose
score is >= t; the top-k built on them is tested in test_selection.py with
either scan. Here the two are held bitwise equal on their own, on the rows
that stress a block scan: lengths around the block size, the tail after the
last full block, +-inf, ties at t, t = +-inf, float64, and other thread
counts.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regtopk_fl.compress import exact_topk

scan_kernels = pytest.importorskip("regtopk_fl.compress.scan_kernels")
BLOCK = scan_kernels.BLOCK


def bits(x):
    """The tensor's bits as integers: torch.equal holds -0.0 == 0.0."""
    return x.view({torch.float32: torch.int32, torch.float64: torch.int64}[x.dtype])


def both(row, t, absolute):
    got = scan_kernels.candidates(row, t, absolute)
    want = exact_topk._candidates_torch(row, t, absolute, 64)
    assert got[0].dtype == want[0].dtype == torch.int64
    assert got[1].dtype == want[1].dtype == row.dtype
    assert torch.equal(got[0], want[0]), (row.numel(), t, absolute)
    assert torch.equal(bits(got[1]), bits(want[1])), (row.numel(), t, absolute)
    return got


@pytest.mark.parametrize("dim", [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5,
                                 64 * BLOCK, 64 * BLOCK + 7, 200_003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lengths_tails_and_infinities(dim, dtype):
    gen = torch.Generator().manual_seed(dim)
    row = torch.randn(dim, generator=gen, dtype=dtype)
    row[::7] = -0.0  # signed zeros: a score of |-0.0| is +0.0, of -0.0 itself -0.0
    row[dim // 2] = math.inf
    row[-1] = -math.inf  # in the tail when dim is not a multiple of BLOCK
    for absolute in (True, False):
        for t in (-math.inf, -1.0, -0.0, 0.0, 0.5, 2.5, math.inf):
            pos, val = both(row, t, absolute)
            ref = row.abs() if absolute else row
            assert torch.equal(pos, torch.nonzero(ref >= t).squeeze(1))


def test_ties_at_the_threshold_and_both_signs():
    row = torch.tensor([1.0, -2.0, 2.0, 0.0, -2.0] * 1000 + [2.0, -2.0, 3.0])
    for absolute in (True, False):
        pos, val = both(row, 2.0, absolute)
        assert pos.numel() == (3003 if absolute else 1002)
        assert bool((val >= 2.0).all())


def test_threshold_compared_in_the_rows_dtype():
    """t from a float32 sample is exact in float32; a t between two float32
    values is rounded as torch rounds it, so both scans agree there too."""
    row = torch.full((5 * BLOCK + 3,), 1.0) + torch.arange(5 * BLOCK + 3) * 2.0 ** -23
    for t in (1.0 + 2.0 ** -24, 1.0 + 3 * 2.0 ** -25, float(row[77])):
        both(row, t, False)


def test_thread_counts_give_the_same_result():
    gen = torch.Generator().manual_seed(1)
    row = torch.randn(300_001, generator=gen) * torch.rand(300_001, generator=gen) ** 4
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(both(row, 0.3, True))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1]) for o in outs)


@pytest.mark.parametrize("first_in", ["main", "thread"])
def test_torchs_thread_count_is_left_as_it_was(first_in):
    """numba's OpenMP layer shares torch's OpenMP runtime, and its first
    launch in a process sets the thread count to numba's (every core): a run
    with threads=1 then ran torch's kernels on 2 threads, and a Flower run of
    scripts/rerun_compare.py came out different in its last bits. A fresh
    process, since only the first launch does it; numba told of 4 threads so
    that a change shows on a machine of any size; the first launch from the
    main thread or from another one."""
    code = """
import threading, torch
from regtopk_fl.compress import exact_topk
exact_topk.SMALL_J = 1
rows = torch.randn(2, 100_000)
seen = []
def select(threads):
    torch.set_num_threads(threads)
    exact_topk.rows_topk(rows, 50, absolute=True)
    seen.append(torch.get_num_threads())
if FIRST == "thread":
    th = threading.Thread(target=select, args=(1,)); th.start(); th.join()
for threads in (1, 2, 1, 3, 1):
    select(threads)
print(*seen)
""".replace("FIRST", repr(first_in))
    env = {**os.environ, "REGTOPK_FL_NUMBA": "1", "NUMBA_NUM_THREADS": "4"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    want = ["1", "2", "1", "3", "1"]
    assert out.stdout.split() == (["1"] + want if first_in == "thread" else want)


def test_a_failing_kernel_leaves_torchs_scan(monkeypatch):
    """numba can import and still fail on a first call (a threading layer it
    cannot load, e.g. NUMBA_THREADING_LAYER=tbb without TBB): the selection
    warns once and goes on with torch's scan, which gives the same result."""
    monkeypatch.setattr(exact_topk, "SMALL_J", 1)
    monkeypatch.setattr(exact_topk, "_scan_failure", [])
    calls = []

    def broken(*args):
        calls.append(args)
        raise ValueError("No threading layer could be loaded.")

    monkeypatch.setattr(scan_kernels, "candidates", broken)
    gen = torch.Generator().manual_seed(6)
    score = torch.randn(2, 40_000, generator=gen)
    want = torch.sort(torch.sort(score.abs(), dim=1, descending=True, stable=True)
                      .indices[:, :30], dim=1).values + torch.tensor([[0], [40_000]])
    with pytest.warns(RuntimeWarning, match="compiled top-k scan failed"):
        got = exact_topk.rows_topk(score, 30, absolute=True).flat_idx
    assert torch.equal(got, want.reshape(-1)) and len(calls) == 1
    exact_topk.rows_topk(score, 30, absolute=True)  # no second try, no second warning
    assert len(calls) == 1 and len(exact_topk._scan_failure) == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dim=st.integers(1, 5000), seed=st.integers(0, 2**31 - 1), absolute=st.booleans(),
       q=st.floats(0.0, 1.0), kind=st.sampled_from(["normal", "ties", "layers"]))
def test_random_rows(dim, seed, absolute, q, kind):
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":
        row = torch.randint(-3, 4, (dim,), generator=gen).float()
    else:
        row = torch.randn(dim, generator=gen)
        if kind == "layers":  # clustered large entries, as in a network's gradient
            scale = torch.pow(10.0, -3.0 * torch.rand(dim // 97 + 1, generator=gen))
            row *= scale.repeat_interleave(97)[:dim]
    ref = row.abs() if absolute else row
    t = float(torch.quantile(ref.double(), q))  # on, between or beyond the entries
    both(row, float(torch.tensor(t, dtype=row.dtype)), absolute)


def test_switches_back_to_torch(monkeypatch):
    """REGTOPK_FL_NUMBA=0 (or numba missing) takes torch's scan (read once a
    process: ``_compiled_scan`` is cached, so its uncached body is called
    here); so does a dtype numba is not given (half precision)."""
    monkeypatch.setenv("REGTOPK_FL_NUMBA", "0")
    assert exact_topk._compiled_scan.__wrapped__() is None
    monkeypatch.delenv("REGTOPK_FL_NUMBA")
    assert exact_topk._compiled_scan.__wrapped__() is scan_kernels
    calls = []
    monkeypatch.setattr(scan_kernels, "candidates", lambda *a: calls.append(a) or None)
    row = torch.randn(1000).half()
    pos, val = exact_topk._candidates(row, 0.5, True, 64)
    assert not calls and torch.equal(pos, torch.nonzero(row.abs() >= 0.5).squeeze(1))
    exact_topk._candidates(row.float(), 0.5, True, 64)
    assert len(calls) == 1


def test_threads_at_once_under_numbas_fallback_layer(tmp_path):
    """Where no OpenMP runtime is installed numba runs on its workqueue layer,
    which aborts the process if two threads launch kernels at once; the
    scan's lock keeps threads selecting together exact and alive."""
    code = """
import torch, numba
from concurrent.futures import ThreadPoolExecutor
from regtopk_fl.compress import exact_topk
exact_topk.SMALL_J = 1
rows = [torch.randn(1, 200_000 + 997 * i) for i in range(6)]
want = [torch.sort(torch.sort(r.abs(), descending=True, stable=True).indices[0, :500]).values
        for r in rows]
with ThreadPoolExecutor(3) as pool:
    got = list(pool.map(lambda i: exact_topk.rows_topk(rows[i], 500, absolute=True).flat_idx,
                        list(range(6)) * 4))
assert all(torch.equal(g, want[j % 6]) for j, g in enumerate(got))
print(numba.threading_layer())
"""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "REGTOPK_FL_NUMBA": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["workqueue"]


@pytest.mark.parametrize("ascending", [True, False])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.int64), (torch.float64, torch.int32)])
def test_mask_hits_against_torch(ascending, dtypes):
    """RegTop-k's lowered entries that are candidates, found by the compiled
    scan: the same entries, positions and |a| as torch's nonzero and
    searchsorted, in any order of the lowered indices."""
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(50_000, generator=gen, dtype=dtypes[0])
    idx = torch.randperm(row.numel(), generator=gen)[:3000].to(dtypes[1])
    if ascending:
        idx = idx.sort().values
    for t in (-math.inf, 0.0, 1.5, 3.0, math.inf):
        local, _ = exact_topk._candidates_torch(row, t, True, 64)
        sub, where, mag = scan_kernels.mask_hits(row, t, True, idx, local)
        want_mag = row[idx].abs()
        want_sub = torch.nonzero(want_mag >= t).squeeze(1)
        assert torch.equal(sub, want_sub)
        assert torch.equal(where, torch.searchsorted(local, idx[want_sub]))
        assert torch.equal(bits(mag), bits(want_mag[want_sub]))
        assert torch.equal(local[where], idx[sub].long())


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("bad", [-1, 2 * 40_000])
def test_lowered_index_out_of_range_raises_with_either_scan(monkeypatch, compiled, bad):
    """torch's path raises in index_select; the compiled one reads without
    bounds, so rows_topk checks first: the same IndexError either way."""
    monkeypatch.setattr(exact_topk, "SMALL_J", 1)
    if not compiled:
        monkeypatch.setattr(exact_topk, "_compiled_scan", lambda: None)
    score = torch.randn(2, 40_000, generator=torch.Generator().manual_seed(8))
    idx = torch.tensor([3, 17, bad]).sort().values
    low = exact_topk.Lowered(idx, lambda pos: score.view(-1)[idx if pos is None else idx[pos]]
                             .abs() * 0.5)
    with pytest.raises(IndexError):
        exact_topk.rows_topk(score, 30, absolute=True, lowered=low)
