"""DGC's sampled threshold (compress/dgc.py) and trimmed top-k
(compress/trimmed_topk.py), Shi et al.'s comparison set (#32): selections
worked out by hand, the bounds each states (count within its budget, at
least k for trimmed top-k), the seeding of DGC's sample, their settings'
checks, and CUDA against the CPU where a GPU is present.

The properties every sparsifier shares (sent + residual == accumulated
bitwise, batched == one call per worker, the same bits on 1, 2 and 4
threads, a within the budget) run on these two through the registry in
tests/test_sparsifiers.py; their over-budget uploads are refused in
tests/test_attacks.py."""
import math

import pytest
import torch

from regtopk_fl.compress import SPARSIFIERS, SparsifierError, num_selected
from regtopk_fl.compress.dgc import DGC, sample_plan
from regtopk_fl.compress.trimmed_topk import TrimmedTopK, abs_mean, ratios
from regtopk_fl.fedround import sparsify
from regtopk_fl.memory import ErrorFeedbackMemory, SelectContext
from regtopk_fl.settings import ConfigError, validate

pytestmark = pytest.mark.usefixtures("one_thread")


def T(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def ctx(n=1, round=0, worker_ids=None):
    z = torch.zeros(0)
    return SelectContext(torch.zeros(0, dtype=torch.int64), z, z.clone(), z.clone(),
                         torch.full((n,), 1.0 / n),
                         tuple(range(n)) if worker_ids is None else tuple(worker_ids), round)


def idx(sel):
    return sel.flat_idx.tolist()


# -- DGC ---------------------------------------------------------------------------------
def test_dgc_sample_plan():
    # J = 1000, S = 0.01: k = 10, target max(ceil(10), ceil(2 / 0.01) = 200) = 200 samples,
    # stride the largest odd prime <= 1000 / 200 = 5 -> 5, m = 200, rank ceil(10 * 200 / 1000) = 2
    assert sample_plan(1000, 10, 0.01, 0.01) == (5, 200, 2)
    # J = 11,173,962, S = 0.001: k = 11,174, target 111,740 -> stride <= 99.99 -> 97,
    # m = 115,195, rank ceil(11174 * 115195 / 11173962) = ceil(115.2) = 116
    assert sample_plan(11_173_962, 11_174, 0.001, 0.01) == (97, 115_195, 116)
    # a short row (J <= 2 / S) is sampled whole: the threshold is the k-th largest
    assert sample_plan(8, 2, 0.25, 0.01) == (1, 8, 2)


def test_dgc_sample_is_at_least_its_target():
    # J = 30,000, S = 1e-3: the target is 2 / S = 2000 entries; the stride, the largest odd
    # prime <= 30000 / 2000 = 15, is 13: m = 2307 (a stride of 17, the smallest odd prime
    # >= 15, drew 1764, fewer than DGC's 2 / S)
    assert sample_plan(30_000, 30, 1e-3, 0.01)[:2] == (13, 2307)
    for dim in (3, 10, 199, 200, 201, 599, 600, 601, 1000, 4096, 30_000, 65_536, 100_003,
                1_000_000, 11_173_962):
        for s in (1e-4, 1e-3, 1e-2, 0.05, 0.25):
            for frac in (0.001, 0.01, 0.1):
                target = min(dim, max(math.ceil(frac * dim), math.ceil(2 / s)))
                k = num_selected(s, dim)
                stride, m, rank = sample_plan(dim, k, s, frac)
                assert m == dim // stride >= target and 1 <= rank <= m, (dim, s, frac, stride)
                assert stride == 1 or (stride % 2 == 1 and all(
                    stride % d for d in range(3, math.isqrt(stride) + 1, 2)))


def test_dgc_whole_row_hand():
    # J = 8, S = 0.25 -> k = 2, budget floor(1.3 * 2) = 2; the whole row is the sample:
    # |a| = [0, 5, 1, 3, 0.5, 4, 2, 0] -> t = 2nd largest = 4 -> |a| >= 4: idx 1, 5
    sp = DGC(0.25)
    assert sp.budget(8) == 2
    assert idx(sp.select(T([0, 5, -1, 3, 0.5, -4, 2, 0]), ctx())) == [1, 5]
    # ties: |a| = 3 four times -> t = 3, 4 candidates > budget 2 -> exact top-2 of them,
    # the lowest indices winning the tie
    sel = sp.select(T([3, -3, 3, -3, 0, 1, 0, 2]), ctx())
    assert idx(sel) == [0, 1] and sel.counts.tolist() == [2]


def _row_on_stride(big_at, big, background, dim=1000):
    a = torch.full((1, dim), background)
    for i, v in zip(big_at, big):
        a[0, i] = v
    return a


def test_dgc_lowers_a_threshold_that_lets_too_few_through(monkeypatch):
    # J = 1000, S = 0.01: k = 10, stride 5, m = 200, rank 2 (test above); offset 0
    # sample = positions 0, 5, 10, ...: 10 at 0 and 5, so t = 10, and only those two
    # pass: 2 < 0.8 k = 8. t *= 0.8: 8, 6.4, 5.12 (still 2), 4.096: now the six 5.0
    # entries (off the sample) pass too: 8 >= 8 -> stop, send those 8 (fewer than k)
    monkeypatch.setattr(DGC, "offset", lambda self, w, r, s: 0)
    fives = [1, 2, 3, 4, 6, 7]
    a = _row_on_stride([0, 5] + fives, [10.0, -10.0] + [5.0] * 6, 0.5)
    sel = DGC(0.01).select(a, ctx())
    assert idx(sel) == [0, 1, 2, 3, 4, 5, 6, 7] and sel.counts.tolist() == [8]
    # with nothing between 10 and the background 1.0: after 10 lowerings t = 10 * 0.8^10
    # = 1.07 > 1, so only the two pass (max_adapt exhausted, fewer than k sent) ...
    a = _row_on_stride([0, 5], [10.0, -10.0], 1.0)
    assert idx(DGC(0.01).select(a, ctx())) == [0, 5]
    # ... and one lowering more reaches every entry: 1000 > budget 13 -> the exact
    # top-10: the two 10s, then the lowest-indexed 1.0s
    assert idx(DGC(0.01, max_adapt=11).select(a, ctx())) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_dgc_cuts_far_too_many_to_the_exact_topk(monkeypatch):
    # offset 0: the sample holds 100 (at 0) and 50s (every 5th entry), so t = 50 and
    # 200 entries pass > floor(1.3 * 10) = 13: the exact top-10 = 100, then the first 50s
    monkeypatch.setattr(DGC, "offset", lambda self, w, r, s: 0)
    a = _row_on_stride(range(0, 1000, 5), [100.0] + [50.0] * 199, 0.25)
    assert idx(DGC(0.01).select(a, ctx())) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]
    # Shi et al.'s bound 4/3: floor(13.33) = 13, the same cut here
    assert DGC(0.01, upper_bound=4 / 3).budget(1000) == 13


def test_dgc_counts_on_gaussian_rows_lie_in_its_bounds():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 100_000, generator=gen) * 3.0
    for s in (0.001, 0.01):
        k, sp = num_selected(s, 100_000), DGC(s)
        for rnd in range(3):
            counts = sp.select(a, ctx(4, round=rnd)).counts.tolist()
            assert all(0.8 * k <= c <= sp.budget(100_000) for c in counts), (s, counts)


def test_dgc_sample_is_seeded_by_seed_worker_and_round():
    sp = DGC(0.01, seed=5)
    offsets = {(w, r): sp.offset(w, r, 101) for w in range(3) for r in range(20)}
    assert all(0 <= o < 101 for o in offsets.values())
    assert offsets == {(w, r): DGC(0.01, seed=5).offset(w, r, 101) for w, r in offsets}
    assert len(set(offsets.values())) > 20  # moves from round to round and worker to worker
    assert [DGC(0.01, seed=6).offset(0, r, 101) for r in range(20)] != [
        offsets[0, r] for r in range(20)]
    # the selection depends on the offset: a row whose large entries sit on one residue
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(1, 100_000, generator=gen)
    picks = {tuple(idx(sp.select(a, ctx(worker_ids=[2], round=r)))) for r in range(6)}
    again = {tuple(idx(sp.select(a, ctx(worker_ids=[2], round=r)))) for r in range(6)}
    assert picks == again and len(picks) > 1


def test_dgc_sample_offset_takes_any_seed():
    # the seed words reduced to 64 bits: a large seed draws an offset (it overflowed the
    # generator's seed from about 2e7 on), and a small one draws the offsets it always has
    for seed in (20_000_000, 2**40, 2**63 - 1, 2**64 + 5, 10**30):
        offsets = [DGC(0.01, seed=seed).offset(w, r, 101) for w in range(3) for r in (1, 7)]
        assert all(0 <= o < 101 for o in offsets), (seed, offsets)
    assert [DGC(0.01, seed=s).offset(w, 1, 101) for s in (0, 1, 7) for w in range(3)] == [
        23, 85, 78, 57, 94, 82, 80, 43, 2]


def test_dgc_selects_entries_above_its_threshold():
    # whatever the count, a row sends the count largest |a| (a threshold, or the top-k)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(3, 50_000, generator=gen) * torch.exp(torch.randn(3, 50_000, generator=gen))
    sel = DGC(0.01).select(a, ctx(3))
    for r, (s, e) in enumerate(sel.row_slices()):
        chosen = sel.flat_idx[s:e] - r * 50_000
        top = torch.topk(a[r].abs(), e - s).indices.sort().values
        assert torch.equal(chosen, top)


@pytest.mark.parametrize("key, bad, message", [
    ("sample_fraction", 0, "must be in (0, 1]"), ("sample_fraction", 1.5, "must be in (0, 1]"),
    ("upper_bound", 0.9, "must be a finite number >= 1"), ("lower_bound", 1, "must be in (0, 1)"),
    ("lower_bound", 0, "must be in (0, 1)"), ("max_adapt", -1, "must be an integer >= 0"),
    ("max_adapt", 2.5, "must be an integer >= 0"),
])
def test_dgc_settings_are_checked(make_cfg, key, bad, message):
    with pytest.raises(SparsifierError, match=rf"^{key}={bad!r}: "):
        DGC(0.01, **{key: bad})
    cfg = make_cfg(["sparsifier=dgc", "task=linreg", f"sparsifier.{key}={bad}"])
    with pytest.raises(ConfigError, match=rf"^sparsifier.{key}={bad!r}: {re_escape(message)}$"):
        validate(cfg)


def re_escape(text):
    import re

    return re.escape(text)


# -- trimmed top-k -------------------------------------------------------------------------
A10 = T([0, 10, 1, 2, -9, 3, 0, 0, 5, 0])  # |a|: mean 30 / 10 = 3, max 10


@pytest.mark.parametrize("s, want", [
    (0.2, [1, 4]),  # k = 2: t(0.8) = 3 + 0.8 * 7 = 8.6 -> 10, 9
    (0.3, [1, 4, 8]),  # k = 3: t(0.6) = 7.2, t(0.4) = 5.8 -> 2; t(0.2) = 4.4 -> 10, 9, 5
    (0.4, [1, 4, 5, 8]),  # k = 4: t(0) = 3 -> 3 entries strictly above: exact top-4
    (0.5, [1, 3, 4, 5, 8]),  # k = 5: the same, exact top-5 (10, 9, 5, 3, 2)
])
def test_trimmed_topk_hand(s, want):
    sel = TrimmedTopK(s).select(A10, None)
    assert idx(sel) == want and sel.counts.tolist() == [len(want)]


def test_trimmed_topk_sends_every_entry_above_the_threshold_and_caps_at_its_budget():
    # J = 10, S = 0.1 -> k = 1: mean 37.3 / 10 = 3.73, t(0.8) = 3.73 + 0.8 * 6.27 = 8.746:
    # all four large entries pass -> 4 entries sent for k = 1
    a = T([10, -9.5, 9, 8.8, 0, 0, 0, 0, 0, 0])
    sp = TrimmedTopK(0.1)
    assert idx(sp.select(a, None)) == [0, 1, 2, 3] and sp.budget(10) == 10
    # budget_factor 1.5 at J = 20, S = 0.1 (k = 2): budget 3; mean 49 / 20 = 2.45,
    # t(0.8) = 8.49: five pass, cut to the three largest
    a = T([10, 9.9, 9.8, 9.7, 9.6] + [0] * 15)
    sp = TrimmedTopK(0.1, budget_factor=1.5)
    assert sp.budget(20) == 3 and idx(sp.select(a, None)) == [0, 1, 2]
    assert "budget_factor=1.5 x k" in sp.budget_note(20)


def test_trimmed_topk_flat_row_ends_on_the_exact_topk():
    # |a| all equal: nothing lies strictly above the mean at any ratio (the released
    # code's loop would not end): the exact top-k, lowest indices on the tie
    sel = TrimmedTopK(0.3).select(torch.ones(2, 10), None)
    assert idx(sel) == [0, 1, 2, 10, 11, 12]
    assert idx(TrimmedTopK(0.3).select(torch.zeros(1, 10), None)) == [0, 1, 2]


def test_trimmed_topk_ratios_and_mean():
    assert ratios(0.8, 0.2) == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    assert ratios(1.0, 0.3) == pytest.approx([1.0, 0.7, 0.4, 0.1])
    assert ratios(0.0, 0.2) == [0.0]
    gen = torch.Generator().manual_seed(3)
    for dim in (1, 8191, 8192, 20_001):
        row = torch.randn(dim, generator=gen)
        assert abs_mean(row) == pytest.approx(float(row.double().abs().mean()), rel=1e-12)


def test_trimmed_topk_counts_at_least_k_at_most_the_budget():
    gen = torch.Generator().manual_seed(4)
    dim = 60_000
    normal = torch.randn(3, dim, generator=gen)
    heavy = normal * torch.exp(2 * torch.randn(3, dim, generator=gen))
    for a in (normal, heavy):
        for s in (0.0001, 0.001, 0.01):
            sp = TrimmedTopK(s)
            k, budget = num_selected(s, dim), sp.budget(dim)
            sel = sp.select(a, None)
            assert all(k <= c <= budget for c in sel.counts.tolist()), (s, sel.counts)
            for r, (st, e) in enumerate(sel.row_slices()):  # the count largest |a|
                chosen = sel.flat_idx[st:e] - r * dim
                assert torch.equal(chosen, torch.topk(a[r].abs(), e - st).indices.sort().values)


@pytest.mark.parametrize("key, bad, message", [
    ("ratio", 1.2, "must be in [0, 1]"), ("ratio_step", 0, "must be in (0, 1]"),
    ("budget_factor", 0.5, "must be a finite number >= 1"),
])
def test_trimmed_topk_settings_are_checked(make_cfg, key, bad, message):
    with pytest.raises(SparsifierError, match=rf"^{key}={bad!r}: "):
        TrimmedTopK(0.01, **{key: bad})
    cfg = make_cfg(["sparsifier=trimmed_topk", "task=linreg", f"sparsifier.{key}={bad}"])
    with pytest.raises(ConfigError, match=rf"^sparsifier.{key}={bad!r}: {re_escape(message)}$"):
        validate(cfg)


# -- both, with error feedback ------------------------------------------------------------
@pytest.mark.parametrize("name", ["dgc", "trimmed_topk"])
def test_error_feedback_rounds(name):
    """Over rounds of a skewed gradient: sent + residual is the accumulated
    gradient bit for bit, the residual is 0 where sent, counts within bounds."""
    gen = torch.Generator().manual_seed(5)
    n, dim, s = 2, 30_000, 0.001
    sp = SPARSIFIERS[name](s)
    mem = ErrorFeedbackMemory(n, dim)
    k, budget = num_selected(s, dim), sp.budget(dim)
    for t in range(6):
        g = torch.randn(n, dim, generator=gen) * torch.linspace(0.1, 3.0, dim)
        expected = mem.eps.clone() + g
        ups = sparsify(mem, g, sp, [0.5, 0.5], round=t)
        assert torch.equal(torch.stack([u.dense() for u in ups]) + mem.eps, expected)
        for r, u in enumerate(ups):
            assert bool((mem.eps[r, u.indices] == 0).all())
            assert u.sent <= budget and (name != "trimmed_topk" or u.sent >= k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["dgc", "trimmed_topk"])
def test_cuda_selection_within_bounds_and_as_on_the_cpu(name):
    """The same code on CUDA: DGC's selection is the CPU's (exact sample and
    candidate scan); trimmed top-k's mean may differ in its last bits on the
    GPU, so its counts are checked against its bounds and its choice against
    the largest |a|."""
    gen = torch.Generator().manual_seed(6)
    dim = 200_000
    a = torch.randn(3, dim, generator=gen) * torch.exp(torch.randn(3, dim, generator=gen))
    sp = SPARSIFIERS[name](0.001)
    c = ctx(3, round=4)
    cpu = sp.select(a, c)
    gpu = sp.select(a.cuda(), c)
    assert gpu.flat_idx.device.type == "cuda"
    if name == "dgc":
        assert torch.equal(gpu.flat_idx.cpu(), cpu.flat_idx)
        assert torch.equal(gpu.counts.cpu(), cpu.counts)
    k, budget = num_selected(0.001, dim), sp.budget(dim)
    for r, (s, e) in enumerate(gpu.row_slices()):
        assert (k if name == "trimmed_topk" else 0) <= e - s <= budget
        chosen = gpu.flat_idx[s:e].cpu() - r * dim
        assert torch.equal(chosen, torch.topk(a[r].abs(), e - s).indices.sort().values)
    mem = ErrorFeedbackMemory(3, dim, device="cuda")
    g = a.cuda()
    ups = sparsify(mem, g, sp, [1 / 3] * 3, round=1)
    assert torch.equal(torch.stack([u.dense() for u in ups]) + mem.eps, g)
    assert math.isfinite(float(mem.eps.abs().sum()))
