"""Exactness of the top-k selection (compress/exact_topk.py) against a sort.

The reference is a stable descending sort and its first k entries: the k
largest scores, ties at the k-th value going to the lowest indices. Long rows
(J >= SMALL_J) take the sampled-threshold path; the module constants are
shrunk here so that small hypothesis inputs exercise it too.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
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
    dim = 1 << 16  # stride 16
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(1, dim, generator=gen)
    score[0, ::16] += 10.0
    thresholds = []
    real = exact_topk._candidates

    def spy(row, t, absolute, block):
        thresholds.append(t)
        return real(row, t, absolute, block)

    monkeypatch.setattr(exact_topk, "_candidates", spy)
    for k in (1, 100, 4096, 5000, 30_000):
        thresholds.clear()
        check(score, k)
        if k >= 4096:
            assert len(thresholds) >= 2  # the first threshold was too high
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
