"""Exactness of the top-k selection (compress/exact_topk.py) against a sort.

The reference is a stable descending sort and its first k entries: the k
largest scores, ties at the k-th value going to the lowest indices. Long rows
(J >= SMALL_J) take the sampled-threshold path; the module constants are
shrunk here so that small hypothesis inputs exercise it too. Every test runs
twice: with the compiled candidate scan (numba) and with torch's.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from regtopk_fl.compress import exact_topk
from regtopk_fl.compress.exact_topk import rows_topk


def reference(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the exact top-k per row, lowest index on ties."""
    n, dim = score.shape
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    order = torch.sort(order, dim=1).values
    return (order + torch.arange(n).unsqueeze(1) * dim).reshape(-1)


def check(score, k, **kw):
    sel = rows_topk(score, k, **kw)
    ref_score = score.abs() if kw.get("absolute") else score.clone()
    if kw.get("fix") is not None:
        ref_score.view(-1)[kw["fix"][0]] = kw["fix"][1]
    assert sel.counts.tolist() == [k] * score.shape[0]
    assert torch.equal(sel.flat_idx, reference(ref_score, k))


@pytest.fixture(scope="module", autouse=True, params=["numba", "torch"])
def scan(request):
    """Every test here runs with both CPU candidate scans: the compiled one
    (compress/scan_kernels.py, numba) and torch's kernels (CUDA's path)."""
    if request.param == "numba":
        if os.environ.get("REGTOPK_FL_NUMBA") == "0" or importlib.util.find_spec("numba") is None:
            pytest.skip("numba is off (REGTOPK_FL_NUMBA=0) or not installed")
        assert exact_topk._compiled_scan() is not None, "numba is installed but will not import"
        yield request.param
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(exact_topk, "_compiled_scan", lambda: None)
        yield request.param


@pytest.fixture(params=["short", "long"])
def path(request, monkeypatch):
    """'long' shrinks SMALL_J and SAMPLE so tiny rows take the sampled path."""
    if request.param == "long":
        monkeypatch.setattr(exact_topk, "SMALL_J", 1)
        monkeypatch.setattr(exact_topk, "SAMPLE", 16)
    return request.param


# -- adversarial hand-made inputs ---------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 3, 5, 64, 65, 300, 1000])
def test_tiny_and_edge_k(path, dim):
    gen = torch.Generator().manual_seed(dim)
    score = torch.randn(3, dim, generator=gen)
    for k in sorted({1, 2, dim // 2, dim - 1, dim} - {0}):
        if 1 <= k <= dim:
            check(score, k)
            check(score, k, absolute=True)


def test_all_zeros_and_constant_rows(path):
    for dim in (7, 200, 5000):
        for k in (1, 3, dim // 3 or 1, dim):
            check(torch.zeros(2, dim), k)
            check(torch.full((2, dim), -1.5), k, absolute=True)


def test_fewer_than_k_nonzeros(path):
    dim = 4000
    score = torch.zeros(2, dim)
    score[0, [5, 999, 3998]] = torch.tensor([1.0, -2.0, 3.0])
    score[1, 17] = 0.5
    for k in (1, 3, 4, 10, 2000):
        check(score, k, absolute=True)
        check(score.abs(), k)


def test_many_ties_at_the_kth_value(path):
    gen = torch.Generator().manual_seed(3)
    dim = 6000
    score = torch.randint(0, 4, (3, dim), generator=gen).float()  # 4 values only
    for k in (1, 10, 1499, 1500, 1501, 3000, dim - 1):
        check(score, k)
    # ties exactly at the threshold region, with a few large entries
    score = torch.ones(2, dim)
    score[:, ::97] = 5.0
    for k in (1, 62, 63, 64, 500):
        check(score, k)


def test_ties_lowest_index_wins_by_hand(path):
    score = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0, 2.0]])
    assert rows_topk(score, 1).flat_idx.tolist() == [1]
    assert rows_topk(score, 2).flat_idx.tolist() == [1, 3]
    assert rows_topk(score, 3).flat_idx.tolist() == [1, 2, 3]
    assert rows_topk(score, 5).flat_idx.tolist() == [1, 2, 3, 4, 5]
    # |-3| ties with 3: the lower index first
    assert rows_topk(torch.tensor([[0.0, 3.0, -3.0, 1.0]]), 1,
                     absolute=True).flat_idx.tolist() == [1]


def test_heavy_tails_and_infinities(path):
    gen = torch.Generator().manual_seed(5)
    dim = 20_000
    cauchy = torch.empty(2, dim).cauchy_(generator=gen)  # heavy tails, NaN-free
    cauchy[0, 7] = math.inf
    cauchy[1, 9] = -math.inf
    for k in (1, 2, 20, 2000):
        check(cauchy, k)
        check(cauchy, k, absolute=True)


def test_periodic_input_defeats_the_sample_but_not_the_result(monkeypatch):
    """Large entries exactly on the strided sample positions: the threshold
    estimate is far too high, so the retry (and then the t = -inf fallback)
    must run, and the result is still the exact top-k."""
    monkeypatch.setattr(exact_topk, "SMALL_J", 1)
    monkeypatch.setattr(exact_topk, "SAMPLE", 4096)
    dim = 1 << 16
    stride = exact_topk.sample_stride(dim)
    assert stride == 17  # the smallest odd prime >= 65536 // 4096
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(1, dim, generator=gen)
    score[0, ::stride] += 10.0  # every sampled entry, and only those, is large
    thresholds = []
    real = exact_topk._candidates

    def spy(row, t, absolute, block):
        thresholds.append(t)
        return real(row, t, absolute, block)

    monkeypatch.setattr(exact_topk, "_candidates", spy)
    big = score[0, ::stride].numel()  # 3856 large entries
    for k in (1, 100, big, big + 1, 30_000):
        thresholds.clear()
        check(score, k)
        # the sample saw only large entries: its rank-r threshold leaves r
        # candidates, too few once k > r (r = 6 for k = 1)
        assert len(thresholds) == 1 if k == 1 else len(thresholds) >= 2
        if k >= big:  # no rank of the sample reaches below the large entries
            assert thresholds[-1] == -math.inf


def test_overrides_lower_or_raise(path):
    gen = torch.Generator().manual_seed(11)
    n, dim = 3, 3000
    a = torch.randn(n, dim, generator=gen)
    k = 30
    top = rows_topk(a, k, absolute=True).flat_idx
    # lowering the current top entries (RegTop-k's case): others move in
    check(a, k, absolute=True, fix=(top, a.view(-1)[top].abs() * 0.01))
    check(a, k, absolute=True, fix=(top, torch.zeros(top.numel())))
    # raising entries that were far from the top: they must be selected
    low = torch.tensor([5, dim + 17, 2 * dim + 2999])
    check(a, k, absolute=True, fix=(low, torch.full((3,), 100.0)))
    # negative overrides (not |.|-like): the materialized path, same rule
    check(a, k, absolute=True, fix=(low, torch.full((3,), -100.0)))
    check(a, k, fix=(top, torch.full((top.numel(),), -1.0)))
    # the overrides were written into a and put back bitwise
    before = a.clone()
    rows_topk(a, k, absolute=True, fix=(top, torch.zeros(top.numel())))
    assert torch.equal(a, before)
    # unsorted override indices
    perm = torch.randperm(top.numel(), generator=gen)
    check(a, k, absolute=True, fix=(top[perm], a.view(-1)[top[perm]].abs() * 0.5))


def test_result_does_not_depend_on_the_sample(monkeypatch):
    monkeypatch.setattr(exact_topk, "SMALL_J", 1)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 50_000, generator=gen)
    a[:, 1000:1100] = 7.0  # a tie block around the k-th value
    ref = reference(a.abs(), 150)
    for sample, margin in ((16, 0.0), (256, 1.0), (4096, 4.0), (1 << 20, 8.0)):
        monkeypatch.setattr(exact_topk, "SAMPLE", sample)
        monkeypatch.setattr(exact_topk, "MARGIN_SD", margin)
        assert torch.equal(rows_topk(a, 150, absolute=True).flat_idx, ref)


def test_rows_topk_is_deterministic_and_leaves_score_alone(path):
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 10_000, generator=gen)
    before = a.clone()
    one = rows_topk(a, 77, absolute=True).flat_idx
    assert torch.equal(a, before)
    assert torch.equal(one, rows_topk(a, 77, absolute=True).flat_idx)


def test_float64_and_noncontiguous(path):
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(5000, 4, dtype=torch.float64, generator=gen).t()  # not contiguous
    check(a, 12, absolute=True)


def test_sparsifiers_use_the_exact_rule():
    """Top-k, RegTop-k (first round: plain |a|) and global top-k pick the
    lowest indices among tied |a|."""
    from regtopk_fl.compress import GlobalTopK, RegTopK, TopK
    from regtopk_fl.memory import ErrorFeedbackMemory

    a = torch.tensor([[1.0, -2.0, 2.0, 0.5, -2.0, 2.0]])
    ctx = ErrorFeedbackMemory(1, 6).context([1.0])
    assert TopK(0.5).select(a, ctx).flat_idx.tolist() == [1, 2, 4]
    assert RegTopK(0.5).select(a, ctx).flat_idx.tolist() == [1, 2, 4]
    a2 = torch.cat([a, a])
    ctx2 = ErrorFeedbackMemory(2, 6).context([0.5, 0.5])
    assert GlobalTopK(1 / 3).select(a2, ctx2).flat_idx.tolist() == [1, 2, 7, 8]


# -- property tests ------------------------------------------------------------------
values = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 1e30, -1e-30]),  # many ties
    st.floats(-1e6, 1e6, allow_nan=False, width=32),
    st.floats(allow_nan=False, allow_infinity=True, width=32),  # heavy tails, +-inf
)


@st.composite
def batches(draw):
    n = draw(st.integers(1, 3))
    dim = draw(st.integers(1, 200))
    flat = draw(st.lists(values, min_size=n * dim, max_size=n * dim))
    k = draw(st.integers(1, dim))
    return torch.tensor(flat, dtype=torch.float32).reshape(n, dim), k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), absolute=st.booleans(), sample=st.sampled_from([1, 2, 7, 64]),
       small=st.booleans())
def test_property_equals_stable_sort(batch, absolute, sample, small):
    score, k = batch
    old = exact_topk.SMALL_J, exact_topk.SAMPLE
    exact_topk.SMALL_J, exact_topk.SAMPLE = (1 << 15, sample) if small else (1, sample)
    try:
        check(score, k, absolute=absolute)
    finally:
        exact_topk.SMALL_J, exact_topk.SAMPLE = old


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), data=st.data())
def test_property_with_overrides(batch, data):
    score, k = batch
    n, dim = score.shape
    m = data.draw(st.integers(0, n * dim))
    idx = torch.tensor(sorted(data.draw(st.sets(st.integers(0, n * dim - 1), min_size=m,
                                                max_size=m))), dtype=torch.int64)
    scale = torch.tensor(data.draw(st.lists(st.floats(0, 2, width=32), min_size=m, max_size=m)),
                         dtype=torch.float32)
    base = score.reshape(-1)[idx].abs()
    val = torch.where(torch.isfinite(base), base * scale, base)
    old = exact_topk.SMALL_J, exact_topk.SAMPLE
    exact_topk.SMALL_J, exact_topk.SAMPLE = 1, 8
    try:
        check(score, k, absolute=True, fix=(idx, val))
    finally:
        exact_topk.SMALL_J, exact_topk.SAMPLE = old


@contextlib.contextmanager
def long_path(sample):
    """Every row takes the sampled-threshold path, with ~``sample`` entries
    sampled (for use inside hypothesis tests, where fixtures do not reset)."""
    old = exact_topk.SMALL_J, exact_topk.SAMPLE
    exact_topk.SMALL_J, exact_topk.SAMPLE = 1, sample
    try:
        yield
    finally:
        exact_topk.SMALL_J, exact_topk.SAMPLE = old


def spy_thresholds(monkeypatch):
    """Record every threshold the selection tries (one per candidate pass)."""
    seen, real = [], exact_topk._candidates

    def spy(row, t, absolute, block):
        seen.append(t)
        return real(row, t, absolute, block)

    monkeypatch.setattr(exact_topk, "_candidates", spy)
    return seen


def make_row(kind: str, n: int, dim: int, gen) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(n, dim, generator=gen)
    if kind == "cauchy":  # heavy tails
        return torch.empty(n, dim).cauchy_(generator=gen)
    if kind == "ties":  # few distinct values: ties at the k-th value
        return torch.randint(-3, 4, (n, dim), generator=gen).float()
    # "layers": blocks of different scales, as a network's gradient
    scale = torch.pow(10.0, -3.0 * torch.rand(n, 8, generator=gen))
    return torch.randn(n, dim, generator=gen) * scale.repeat_interleave(-(-dim // 8), 1)[:, :dim]


# -- small k: the regime where the sample holds few top-k entries ---------------------
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 2), dim=st.integers(64, 6000),
       k=st.integers(1, 8), sample=st.sampled_from([4, 16, 64, 512]),
       kind=st.sampled_from(["normal", "cauchy", "ties", "layers"]), absolute=st.booleans())
def test_property_small_k_long_rows(seed, n, dim, k, sample, kind, absolute):
    """k of 1-8 in rows of up to 6000 (e = k m / J well below 1 for most
    draws): the rank is then set by the margin's "+ 4", and the result must
    still be the stable sort's."""
    score = make_row(kind, n, dim, torch.Generator().manual_seed(seed))
    with long_path(sample):
        check(score, min(k, dim), absolute=absolute)


def test_small_k_fast_path_has_no_retry_on_smooth_rows(monkeypatch):
    """At small k on a row without structure the first threshold is low
    enough (a retry has probability < 1e-5 there): one candidate pass, and
    the candidates stay near the docstring's J r / m."""
    monkeypatch.setattr(exact_topk, "SMALL_J", 1)
    seen = spy_thresholds(monkeypatch)
    gen = torch.Generator().manual_seed(21)
    dim = 1 << 21  # stride 32 -> 37, m = 56,680
    a = torch.randn(1, dim, generator=gen)
    for k in (1, 3, 20, 200, 2000):
        seen.clear()
        check(a, k, absolute=True)
        assert len(seen) == 1, k
        cands = int((a.abs() >= seen[0]).sum())
        m = a[0, ::exact_topk.sample_stride(dim)].numel()
        e = k * m / dim
        bound = dim * (e + 4 * math.sqrt(e) + 4) / m  # J r / m, the expected count
        # the count above the sample's r-th largest is ~ Gamma(r) * J / m: a
        # wide spread at tiny e (r = 5 for k = 1), below 4x its mean w.p. 1 - 2e-5
        assert k <= cands <= 4 * bound, (k, cands, bound)


@pytest.mark.parametrize("s, k, r", [(0.0001, 1_117, 21), (0.001, 11_174, 101),
                                     (0.01, 111_740, 752)])
def test_sample_ranks_are_the_docstrings_table(s, k, r):
    """The module docstring's table at J = 11,173,962 (ResNet-18): stride
    173, m = 64,590, and the rank r at each S; the band's top hi is r's
    mirror (e - 4 sd - 4), none at S = 0.0001."""
    dim = 11_173_962
    assert exact_topk.sample_stride(dim) == 173
    m = len(range(0, dim, 173))
    assert m == 64_590
    rank, hi = exact_topk.sample_ranks(k, m, dim)
    e = k * m / dim
    assert rank == r and hi == math.floor(e - 4 * math.sqrt(e) - 4)
    assert (hi >= 1) == (s > 0.0001) and hi < e < rank
    assert exact_topk.sample_ranks(dim, m, dim)[0] == m  # never beyond the sample


# -- adversarial rows: the sample over- or underestimates the threshold --------------
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), dim=st.integers(300, 8000), k=st.integers(1, 400),
       sample=st.sampled_from([8, 32, 128]), on_sample=st.booleans(), absolute=st.booleans(),
       ties=st.booleans())
def test_property_adversarial_sample(seed, dim, k, sample, on_sample, absolute, ties):
    """Large entries placed exactly on the sample's positions (its threshold
    is far too high: retries, down to t = -inf) or exactly off them (it sees
    only small entries: the threshold is far too low and nearly every block
    is a candidate). Either way the result is the stable sort's, which a
    fast path that trusted the sample would not give."""
    gen = torch.Generator().manual_seed(seed)
    k = min(k, dim - 1)  # (k = J returns every entry without a pass)
    with long_path(sample):
        stride = exact_topk.sample_stride(dim)
        assume(stride > 1)
        pos = torch.arange(dim)
        big = pos % stride == 0 if on_sample else pos % stride == stride // 2
        score = torch.rand(1, dim, generator=gen)
        if ties:
            score = torch.round(score * 4) / 4
        score[0, big] += 10.0 if ties else 10.0 + torch.rand(int(big.sum()), generator=gen)
        if absolute:  # large entries of both signs
            score[0, big & (torch.rand(dim, generator=gen) < 0.5)] *= -1.0
        seen = []
        real = exact_topk._candidates

        def spy(row, t, absolute, block):
            seen.append(t)
            return real(row, t, absolute, block)

        exact_topk._candidates = spy
        try:
            check(score, k, absolute=absolute)
        finally:
            exact_topk._candidates = real
    if on_sample and k > int(big.sum()):
        assert seen[-1] == -math.inf  # no rank of the sample reaches below them
    if not on_sample:
        assert seen[0] < 10.0  # the sample saw none of the large entries


# -- lowered scores (RegTop-k): computed only where they can be selected -------------
def lowered_case(gen, n, dim, m, where, factor):
    a = torch.randn(n, dim, generator=gen) * torch.exp(torch.randn(n, dim, generator=gen))
    if where == "top":  # the largest |a|: candidates whose score drops (retries)
        idx = torch.topk(a.abs().reshape(-1), m).indices.sort().values
    else:
        idx = torch.randperm(n * dim, generator=gen)[:m].sort().values
    mag = a.reshape(-1)[idx].abs()
    if factor == "zero":
        val = torch.zeros(m)
    elif factor == "same":  # equal to |a|: ties with the unlowered entries
        val = mag.clone()
    elif factor == "tiny":
        val = mag * 1e-6
    else:
        val = mag * torch.rand(m, generator=gen)
    return a, idx, val


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3), dim=st.integers(50, 3000),
       k=st.integers(1, 300), frac=st.sampled_from([0.001, 0.05, 0.3, 1.0]),
       where=st.sampled_from(["top", "random"]),
       factor=st.sampled_from(["zero", "same", "tiny", "random"]),
       sample=st.sampled_from([8, 64, 1 << 16]))  # 1 << 16: every entry sampled, t tight
def test_property_lowered_equals_materialized(seed, n, dim, k, frac, where, factor, sample):
    gen = torch.Generator().manual_seed(seed)
    k = min(k, dim - 1)  # (k = J returns every entry without a pass)
    m = max(1, int(frac * n * dim))
    a, idx, val = lowered_case(gen, n, dim, m, where, factor)
    before = a.clone()
    asked = []

    def score(pos):
        asked.append(None if pos is None else pos.clone())
        return val if pos is None else val[pos]

    with long_path(sample):
        sel = rows_topk(a, k, absolute=True, lowered=exact_topk.Lowered(idx, score))
    ref = a.abs()
    ref.view(-1)[idx] = val
    assert torch.equal(sel.flat_idx, reference(ref, k))
    assert sel.counts.tolist() == [k] * n
    assert torch.equal(a, before)
    assert all(p is not None for p in asked)  # the lazy path ran, not the eager one
    if where == "top":  # the largest |a| is a candidate in every final pass: scored
        assert asked
    for p in asked:  # positions into idx, each asked once per candidate pass
        assert p.numel() == p.unique().numel() and 0 <= int(p.min()) and int(p.max()) < m


def test_lowered_scores_only_the_entries_that_can_be_selected(monkeypatch):
    monkeypatch.setattr(exact_topk, "SMALL_J", 1)
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(2, 40_000, generator=gen)
    small = torch.nonzero(a.abs().reshape(-1) < 0.5).squeeze(1)  # far below the top 50
    asked = []

    def score(pos):
        asked.append(pos)
        return a.reshape(-1)[small[pos]].abs() * 0.5

    sel = rows_topk(a, 50, absolute=True, lowered=exact_topk.Lowered(small, score))
    assert asked == []  # no lowered entry reached the threshold: none was scored
    assert torch.equal(sel.flat_idx, reference(a.abs(), 50))
    # the largest entries lowered to 0: only candidates are scored, not all 2 x 40k
    top = torch.topk(a.abs().reshape(-1), 30).indices.sort().values
    lowered = exact_topk.Lowered(top, lambda pos: torch.zeros(pos.numel()))
    ref = a.abs()
    ref.view(-1)[top] = 0.0
    assert torch.equal(rows_topk(a, 50, absolute=True, lowered=lowered).flat_idx,
                       reference(ref, 50))


def test_lowered_below_the_threshold_forces_a_deeper_pass(monkeypatch):
    """The first pass's candidates are exactly the largest |a|, all lowered
    to 0: none is left above t, so the selection must look deeper (the top
    k are entries that were not candidates at first)."""
    monkeypatch.setattr(exact_topk, "SMALL_J", 1)  # SAMPLE > J: every entry sampled
    seen = spy_thresholds(monkeypatch)
    gen = torch.Generator().manual_seed(14)
    a = torch.randn(1, 40_000, generator=gen)
    top = torch.topk(a.abs().reshape(-1), 2000).indices.sort().values
    lowered = exact_topk.Lowered(top, lambda pos: torch.zeros(pos.numel()))
    ref = a.abs()
    ref.view(-1)[top] = 0.0
    for k in (1, 10, 300):
        seen.clear()
        got = rows_topk(a, k, absolute=True, lowered=lowered)
        assert torch.equal(got.flat_idx, reference(ref, k)), k
        assert len(seen) >= 2, k  # the first threshold left fewer than k


def _select_overridden(score, idx, vals, k):
    """rows_topk of |score| with ``vals`` lazily at ``idx``: whether it equals
    the stable sort of the overridden score, and which positions it asked for."""
    asked = []

    def at(pos):
        asked.append(pos)
        return vals if pos is None else vals[pos]

    got = rows_topk(score, k, absolute=True, lowered=exact_topk.Lowered(idx, at))
    ref = score.abs()
    ref.view(-1)[idx] = vals
    return torch.equal(got.flat_idx, reference(ref, k)), asked


def test_lowered_falls_back_when_not_a_lowering_or_unsorted(monkeypatch):
    """An override above |a| at a candidate, or indices out of order in a
    batch of rows: every override is computed and the result is still exact.
    One row needs no order (its candidates are found by their own search)."""
    monkeypatch.setattr(exact_topk, "SMALL_J", 1)
    gen = torch.Generator().manual_seed(10)
    a = torch.randn(1, 20_000, generator=gen)
    top = torch.topk(a.abs().reshape(-1), 10).indices.sort().values
    exact, asked = _select_overridden(a, top, a.reshape(-1)[top].abs() * 3.0, 5)
    assert exact
    assert asked[-1] is None  # the eager path computed all of them
    # one row, indices in descending order: the lazy path, exact
    perm = top.flip(0)
    exact, asked = _select_overridden(
        a, perm, a.reshape(-1)[perm].abs() * torch.rand(10, generator=gen), 5)
    assert exact
    assert asked and all(p is not None for p in asked)
    # two rows, out of order: the eager path (the per-row slices need order)
    b = torch.randn(2, 20_000, generator=gen)
    idx = torch.tensor([20_005, 7, 30_000, 3])
    exact, asked = _select_overridden(b, idx, b.reshape(-1)[idx].abs() * 0.5, 5)
    assert exact
    assert asked == [None]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3), dim=st.integers(100, 4000),
       s=st.sampled_from([0.001, 0.01, 0.1]), distortion=st.sampled_from(["reference", "paper"]),
       prev_top=st.booleans(), sort_prev=st.booleans())
def test_property_regtopk_lowered_path_equals_its_score(seed, n, dim, s, distortion, prev_top,
                                                        sort_prev):
    """RegTop-k on long rows (the lazy path) selects the stable-sort top-k of
    its materialized score (``regularized_abs``), cancellations and unknown
    feedback included; unsorted previous indices take the eager path."""
    from regtopk_fl.compress import RegTopK
    from regtopk_fl.compress.base import num_selected
    from regtopk_fl.compress.regtopk import regularized_abs
    from regtopk_fl.memory import SelectContext

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=gen) * torch.exp(torch.randn(n, dim, generator=gen))
    m = int(torch.randint(1, n * dim // 4 + 2, (1,), generator=gen))
    prev = (torch.topk(a.abs().reshape(-1), m).indices if prev_top
            else torch.randperm(n * dim, generator=gen)[:m])
    if sort_prev:
        prev = prev.sort().values
    fb_g = torch.randn(m, generator=gen)
    fb_g[torch.rand(m, generator=gen) < 0.2] = 0.0  # cancellations: score 0 (reference)
    fb_g[torch.rand(m, generator=gen) < 0.1] = float("nan")  # feedback unknown
    ctx = SelectContext(prev, torch.randn(m, generator=gen), fb_g,
                        torch.rand(m, generator=gen) + 0.01, torch.full((n,), 1.0 / n),
                        tuple(range(n)), 1)
    sp = RegTopK(s, mu=0.7, distortion=distortion)
    k = num_selected(s, dim)
    with long_path(16):
        got = sp.select(a, ctx)
    ref = reference(regularized_abs(a, ctx, sp.mu, distortion, sp.q), k)
    assert torch.equal(got.flat_idx, ref)


# -- the reused scratch buffer ---------------------------------------------------------
def test_results_do_not_alias_the_scratch_buffer(monkeypatch):
    monkeypatch.setattr(exact_topk, "SMALL_J", 1)
    gen = torch.Generator().manual_seed(12)
    a, b = torch.randn(1, 50_000, generator=gen), torch.randn(1, 80_000, generator=gen)
    first = rows_topk(a, 700, absolute=True).flat_idx
    kept = first.clone()
    rows_topk(b, 3000, absolute=True)  # regrows and refills the buffer
    rows_topk(b, 10, absolute=False)
    assert torch.equal(first, kept)
    assert torch.equal(first, reference(a.abs(), 700))


def test_threads_selecting_at_once_are_exact(monkeypatch):
    """Each thread has its own scratch buffer."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(exact_topk, "SMALL_J", 1)
    gen = torch.Generator().manual_seed(13)
    rows = [torch.randn(1, 60_000 + 997 * i, generator=gen) for i in range(6)]
    ks = [5, 300, 2000, 40, 7000, 1]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda i: rows_topk(rows[i], ks[i], absolute=True).flat_idx,
                            list(range(6)) * 3))
    for j, g in enumerate(got):
        i = j % 6
        assert torch.equal(g, reference(rows[i].abs(), ks[i])), i


def test_sample_stride_is_an_odd_prime_at_least_the_spacing(monkeypatch):
    for sample in (16, 1 << 16):
        monkeypatch.setattr(exact_topk, "SAMPLE", sample)
        for dim in (1, sample - 1, sample, 2 * sample, 3 * sample + 5, 170 * sample + 9,
                    11_173_962):
            s = exact_topk.sample_stride(dim)
            spacing = dim // sample
            if spacing < 2:
                assert s == 1
                continue
            assert s >= spacing and s % 2 == 1
            assert all(s % d for d in range(3, math.isqrt(s) + 1))
            assert not any(all(c % d for d in range(3, math.isqrt(c) + 1))
                           for c in range(spacing | 1, s, 2))  # the smallest such


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("long", [False, True])
def test_cuda_equals_cpu_reference(long, monkeypatch):
    """The same code on CUDA: exact and tie-broken as on CPU."""
    if long:
        monkeypatch.setattr(exact_topk, "SMALL_J", 1)
        monkeypatch.setattr(exact_topk, "SAMPLE", 64)
    gen = torch.Generator().manual_seed(8)
    cases = [torch.randn(3, 5000, generator=gen),
             torch.randint(0, 3, (2, 4000), generator=gen).float(),
             torch.zeros(2, 3000)]
    for score in cases:
        for k in (1, 17, 1000, score.shape[1]):
            for absolute in (False, True):
                ref = reference(score.abs() if absolute else score, k)
                got = rows_topk(score.cuda(), k, absolute=absolute).flat_idx.cpu()
                assert torch.equal(got, ref)
    a = torch.randn(2, 3000, generator=gen)
    top = rows_topk(a, 30, absolute=True).flat_idx
    fix = (top, a.view(-1)[top].abs() * 0.1)
    ref = a.abs()
    ref.view(-1)[top] = fix[1]
    got = rows_topk(a.cuda(), 30, absolute=True, fix=(fix[0].cuda(), fix[1].cuda()))
    assert torch.equal(got.flat_idx.cpu(), reference(ref, 30))
    # RegTop-k's lowering on CUDA: every override computed at once (no lazy subsets)
    asked = []

    def score(pos):
        asked.append(pos)
        return fix[1].cuda() if pos is None else fix[1].cuda().index_select(0, pos)

    got = rows_topk(a.cuda(), 30, absolute=True,
                    lowered=exact_topk.Lowered(fix[0].cuda(), score))
    assert torch.equal(got.flat_idx.cpu(), reference(ref, 30))
    assert asked == [None]


# -- the band below the sample's hi-th value (step 3) --------------------------------
@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3000), data=st.data(),
       kind=st.sampled_from(["normal", "ties"]))
def test_kth_below_any_hi_is_the_kth_largest(seed, n, data, kind):
    """Whatever ``hi`` is (above every entry, below every entry, on a tie, so
    that k or more lie above it: the fallback), the k-th largest comes out."""
    vals = make_row(kind, 1, n, torch.Generator().manual_seed(seed))[0]
    k = data.draw(st.integers(1, n))
    pick = data.draw(st.sampled_from(["entry", "above_all", "below_all", "none"]))
    hi = {"entry": float(vals[data.draw(st.integers(0, n - 1))]), "above_all": math.inf,
          "below_all": -math.inf, "none": None}[pick]
    want = torch.sort(vals, descending=True).values[k - 1]
    assert float(exact_topk._kth_below(vals, k, hi)) == float(want)


@pytest.mark.parametrize("kind", ["normal", "ties", "layers"])
@pytest.mark.parametrize("absolute", [True, False])
def test_band_taken_at_large_expected_counts_and_exact(kind, absolute, monkeypatch):
    """Rows where the sample expects hundreds of top-k entries (as S = 0.01 at
    J = 11M): the selection takes the band (spied), and equals the stable
    sort's; with ties at the k-th value ("ties") too."""
    taken, real = [], exact_topk._kth_below

    def spy(vals, k, hi):
        taken.append(hi is not None and int((vals >= hi).sum()) < k)
        return real(vals, k, hi)

    monkeypatch.setattr(exact_topk, "_kth_below", spy)
    score = make_row(kind, 2, 1 << 16, torch.Generator().manual_seed(7))
    with long_path(1 << 14):
        for k in (200, 655, 3000):
            taken.clear()
            check(score, k, absolute=absolute)
            if kind != "ties":  # few distinct values: the candidates may be exactly k
                assert taken and all(taken)
