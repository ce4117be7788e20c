"""Sparsifiers: hand-computed selections, the issue's invariants and the
paper's two-worker toy (Fig. 1).

Expected values are worked out by hand in the comments (never by calling the
code under test); properties are checked with small Hypothesis searches.

Tests run with one torch thread (an autouse fixture): on a shared, busy machine
every OpenMP parallel region (e.g. ``repeat_interleave``) can wait a scheduler
time slice, which made the small-tensor tests 20x slower. The tests that need
the parallel kernels set their thread counts themselves, and
``test_cpu_result_independent_of_thread_count`` checks that 1, 2 and 4 threads
give bit-identical results.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regtopk_fl.compress import (SPARSIFIERS, Dense, GaussianK, GlobalTopK, RandomK, RegTopK,
                                 RegTopKGaussianK, SparsifierError, TopK, num_selected)
from regtopk_fl.compress.base import check_k
from regtopk_fl.compress.gaussiank import row_mean, threshold_select
from regtopk_fl.compress.regtopk import regularized_abs
from regtopk_fl.fedround import sparsify
from regtopk_fl.memory import ErrorFeedbackMemory, SelectContext

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
# from conf/sparsifier/*.yaml (the registry): every method, as it is added
ROW_WISE = tuple(n for n, c in SPARSIFIERS.items() if not c.needs_all_workers)
EXACT_K = tuple(n for n, c in SPARSIFIERS.items() if c.exact_count)


# -- helpers --------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def T(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def empty_ctx(n, weights=None, round=0, worker_ids=None):
    """The context of a first round: no previous mask."""
    z = torch.zeros(0)
    w = torch.full((n,), 1.0 / n) if weights is None else torch.as_tensor(weights)
    return SelectContext(torch.zeros(0, dtype=torch.int64), z, z.clone(), z.clone(), w,
                         tuple(range(n)) if worker_ids is None else tuple(worker_ids), round)


def prev_ctx(prev_flat, prev_sent, fb_g, fb_w, n=1, weights=None, round=1):
    return SelectContext(torch.tensor(prev_flat, dtype=torch.int64), T(*prev_sent),
                         T(*fb_g), T(*fb_w),
                         torch.full((n,), 1.0 / n) if weights is None else torch.as_tensor(weights),
                         tuple(range(n)), round)


def idx_list(sel):
    return sel.flat_idx.tolist()


def make(name, sparsity, **kw):
    return SPARSIFIERS[name](sparsity, **kw)


def check_structure(sel, n, dim):
    """Flat indices grouped by row, ascending and unique within a row, in range."""
    assert sel.flat_idx.dtype == torch.int64 and sel.counts.dtype == torch.int64
    assert sel.counts.shape == (n,)
    assert int(sel.counts.sum()) == sel.flat_idx.numel()
    for r, (s, e) in enumerate(sel.row_slices()):
        local = sel.flat_idx[s:e] - r * dim
        assert bool((local >= 0).all()) and bool((local < dim).all())
        assert bool((local[1:] > local[:-1]).all())


# -- k and parameter validation --------------------------------------------------
@pytest.mark.parametrize("s, dim, k", [
    (0.125, 20, 3),    # 2.5 -> half up -> 3
    (0.375, 4, 2),     # 1.5 -> 2
    (0.25, 2, 1),      # 0.5 -> 1
    (0.125, 4, 1),     # 0.5 -> 1
    (0.0625, 8, 1),    # 0.5 -> 1
    (0.01, 10, 1),     # 0.1 -> 0 -> max(1, .) = 1
    (0.25, 10, 3),     # 2.5 -> 3
    (1.0, 7, 7),
    (0.001, 11_173_962, 11_174),  # 11173.962 -> 11174
    (0.01, 100_000, 1000),
])
def test_num_selected_rounds_half_up(s, dim, k):
    assert num_selected(s, dim) == k


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0000001, 1.5, float("nan"), float("inf"),
                                 "abc", None])
@pytest.mark.parametrize("name", sorted(set(SPARSIFIERS) - {"dense"}))
def test_invalid_sparsity_raises_naming_it(name, bad):
    with pytest.raises(SparsifierError, match="sparsity"):
        SPARSIFIERS[name](bad)


def test_sparsifier_error_is_value_error():
    assert issubclass(SparsifierError, ValueError)


@pytest.mark.parametrize("cls", [RegTopK, RegTopKGaussianK])
@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "x"])
def test_invalid_mu_raises(cls, bad):
    with pytest.raises(SparsifierError, match=r"mu="):
        cls(0.1, mu=bad)


@pytest.mark.parametrize("bad", [0, -5.0, float("nan")])
def test_invalid_q_raises(bad):
    with pytest.raises(SparsifierError, match=r"q="):
        RegTopK(0.1, q=bad)


def test_invalid_distortion_raises():
    with pytest.raises(SparsifierError, match="distortion='posterior'"):
        RegTopK(0.1, distortion="posterior")


def test_k_larger_than_dim_raises():
    with pytest.raises(SparsifierError, match=r"k=5"):
        check_k(5, 3)
    with pytest.raises(SparsifierError, match=r"k=0"):
        check_k(0, 3)
    assert check_k(3, 3) == 3
    with pytest.raises(SparsifierError, match=r"dim=0"):
        num_selected(0.5, 0)


def _sparsifier_classes():
    """Every concrete Sparsifier class defined in a module of regtopk_fl.compress."""
    import importlib
    import inspect
    import pkgutil

    import regtopk_fl.compress as pkg
    from regtopk_fl.compress import Sparsifier

    found = {}
    for mod in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        if mod.name.endswith("scan_kernels"):  # numba kernels, no classes
            continue
        for _, cls in inspect.getmembers(importlib.import_module(mod.name), inspect.isclass):
            if (issubclass(cls, Sparsifier) and not inspect.isabstract(cls)
                    and cls.__module__ == mod.name and cls.name):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def test_every_yaml_names_a_class_and_every_class_has_a_yaml():
    """conf/sparsifier/*.yaml <-> the Sparsifier classes of regtopk_fl.compress,
    one to one: a yaml's stem is its ``name`` and its class's ``name``; a
    class without a yaml (or a yaml without a class) fails here."""
    from omegaconf import OmegaConf

    from regtopk_fl.compress import Sparsifier
    from regtopk_fl.paths import CONF_DIR
    from regtopk_fl.settings import group_options

    classes = _sparsifier_classes()
    by_yaml = {}
    for path in sorted((CONF_DIR / "sparsifier").glob("*.yaml")):
        node = OmegaConf.load(path)
        assert node.get("name") == path.stem, path
        cls = SPARSIFIERS[path.stem]
        assert issubclass(cls, Sparsifier) and cls.name == path.stem, path
        by_yaml[path.stem] = cls
    assert tuple(SPARSIFIERS) and set(SPARSIFIERS) == set(by_yaml) == set(
        group_options("sparsifier"))
    assert set(by_yaml.values()) == set(classes.values()), (
        "classes without a yaml: "
        f"{sorted(k for k, c in classes.items() if c not in by_yaml.values())}")
    assert len(classes) >= 7


def test_contract_of_every_sparsifier():
    """The class attributes the engine, trust checks and analysis read
    (compress/base.py), consistent with what an instance does."""
    from regtopk_fl.compress import method_order

    dim = 1000
    for name, cls in SPARSIFIERS.items():
        sp = cls(0.01)
        assert sp.sparsity == (0.01 if cls.has_budget else 1.0)  # dense: all of J
        budget = sp.budget(dim)
        assert (budget is None) == (not cls.has_budget), name
        if cls.exact_count:
            assert budget == num_selected(0.01, dim), name
        if budget is not None:
            assert num_selected(sp.sparsity, dim) <= budget <= dim, name
            assert str(dim) in sp.budget_note(dim), name
        assert isinstance(cls.display_name(), str) and cls.display_name()
        assert set(cls.runtimes) <= {"inprocess", "flower"} and cls.runtimes
    order = method_order()
    assert order == tuple(SPARSIFIERS)
    assert [SPARSIFIERS[n].plot_order for n in order] == sorted(
        SPARSIFIERS[n].plot_order for n in order)
    # the order the recorded plots were made in (issue #32: kept, new methods placed between)
    old = ("dense", "topk", "randomk", "global_topk", "gaussiank", "regtopk",
           "regtopk_gaussiank")
    assert [n for n in order if n in old] == list(old)


# -- hand-computed selections ------------------------------------------------------
def test_dense_hand():
    a = T([0.5, -3.0, 2.0], [1.0, 0.0, -1.0])
    sel = Dense().select(a, empty_ctx(2))
    assert idx_list(sel) == [0, 1, 2, 3, 4, 5]
    assert sel.counts.tolist() == [3, 3]
    assert Dense.sends_indices is False


def test_topk_hand_single_and_batched():
    # S = 0.4, J = 5 -> k = round(2.0) = 2
    # row 0: |a| = [0.5, 3, 2, 0.25, 1]   -> largest 3 (idx 1), 2 (idx 2)
    # row 1: |a| = [4, 0.1, 0.2, 5, 0.3]  -> largest 5 (idx 3), 4 (idx 0) -> flat 5+0, 5+3
    a = T([0.5, -3.0, 2.0, -0.25, 1.0], [4.0, 0.1, -0.2, -5.0, 0.3])
    sel = TopK(0.4).select(a, empty_ctx(2))
    assert idx_list(sel) == [1, 2, 5, 8]
    assert sel.counts.tolist() == [2, 2]
    assert idx_list(TopK(0.4).select(a[:1], empty_ctx(1))) == [1, 2]
    # S = 1 sends everything
    assert idx_list(TopK(1.0).select(a[:1], empty_ctx(1))) == [0, 1, 2, 3, 4]


def test_topk_error_feedback_hand():
    # round 1: a = g1 = [0.5, -3, 2, -0.25, 1], k = 2 -> send idx 1, 2 = [-3, 2]
    #          residual eps = [0.5, 0, 0, -0.25, 1]
    # round 2: g2 = [1, 0, 0, 0, 1.5] -> a = [1.5, 0, 0, -0.25, 2.5] -> idx 0, 4 = [1.5, 2.5]
    #          residual eps = [0, 0, 0, -0.25, 0]
    mem = ErrorFeedbackMemory(1, 5)
    up = sparsify(mem, T([0.5, -3.0, 2.0, -0.25, 1.0]), TopK(0.4), [1.0])[0]
    assert up.indices.tolist() == [1, 2] and up.values.tolist() == [-3.0, 2.0]
    assert mem.eps.tolist() == [[0.5, 0.0, 0.0, -0.25, 1.0]]
    up = sparsify(mem, T([1.0, 0.0, 0.0, 0.0, 1.5]), TopK(0.4), [1.0], round=1)[0]
    assert up.indices.tolist() == [0, 4] and up.values.tolist() == [1.5, 2.5]
    assert mem.eps.tolist() == [[0.0, 0.0, 0.0, -0.25, 0.0]]


# RegTop-k scenario (J = 4, S = 0.5 -> k = 2, worker weight w = 0.5):
# round 1 sent idx 0, 1 with values s = [4, -3]; the server's global gradient
# on them is g = [2, 0] (idx 1 cancelled out).  contrib = w*s = [2, -1.5].
# round 2: a = [2.5, 3.5, 2.25, 1.5]  (plain top-2 would be idx 1, 0)
REG_A = T([2.5, 3.5, 2.25, 1.5])
TANH1 = math.tanh(1.0)  # 0.7615941559557649


def reg_ctx():
    return prev_ctx([0, 1], [4.0, -3.0], [2.0, 0.0], [0.5, 0.5])


def test_regtopk_reference_hand():
    # reference: Delta = (g - w s) / (w s) = [(2-2)/2, (0+1.5)/(-1.5)] = [0, -1]
    # score = |a| * tanh(|1 + Delta| / mu), mu = 1:
    #   idx 0: 2.5 * tanh(1) = 1.90399;  idx 1: 3.5 * tanh(0) = 0 (cancelled)
    #   idx 2, 3 (not sent, Delta = Q): 2.25, 1.5
    # -> top-2 = idx 2 (2.25), idx 0 (1.904)
    sp = RegTopK(0.5, mu=1.0)
    score = sp.score(REG_A, reg_ctx())
    expected = torch.tensor([[2.5 * TANH1, 0.0, 2.25, 1.5]])
    torch.testing.assert_close(score, expected, rtol=1e-6, atol=0)
    assert score[0, 1].item() == 0.0
    assert idx_list(sp.select(REG_A, reg_ctx())) == [0, 2]
    assert idx_list(TopK(0.5).select(REG_A, reg_ctx())) == [0, 1]


def test_regtopk_paper_hand_differs_from_reference():
    # paper: denominator w * a (this round) = 0.5 * [2.5, 3.5] = [1.25, 1.75]
    #   Delta = [(2 - 2)/1.25, (0 + 1.5)/1.75] = [0, 6/7]
    #   idx 0: 2.5 * tanh(1) = 1.904;  idx 1: 3.5 * tanh(13/7) = 3.5 * 0.952419 = 3.33347
    # -> top-2 = idx 1 (3.333), idx 2 (2.25); reference gave idx 0, 2
    sp = RegTopK(0.5, mu=1.0, distortion="paper")
    score = sp.score(REG_A, reg_ctx())
    expected = torch.tensor([[2.5 * TANH1, 3.5 * math.tanh(13.0 / 7.0), 2.25, 1.5]])
    torch.testing.assert_close(score, expected, rtol=1e-6, atol=0)
    assert idx_list(sp.select(REG_A, reg_ctx())) == [1, 2]
    assert idx_list(RegTopK(0.5, mu=1.0).select(REG_A, reg_ctx())) == [0, 2]


def test_regtopk_reference_and_paper_agree_when_a_equals_sent():
    # the two denominators coincide when this round's a equals what was sent:
    # a = [4, -3, 0.5, 0.25] on the previous mask {0, 1} -> same Delta -> same score
    a = T([4.0, -3.0, 0.5, 0.25])
    ref = RegTopK(0.5).score(a, reg_ctx())
    pap = RegTopK(0.5, distortion="paper").score(a, reg_ctx())
    assert torch.equal(ref, pap)


def test_regtopk_first_round_is_topk():
    a = T([0.5, -3.0, 2.0, -0.25, 1.0])
    assert idx_list(RegTopK(0.4).select(a, empty_ctx(1))) == [1, 2]
    # feedback not arrived yet (fb_g NaN) reads as unknown: Delta = Q -> plain |a|
    ctx = prev_ctx([1, 2], [-3.0, 2.0], [float("nan")] * 2, [1.0, 1.0])
    assert torch.equal(RegTopK(0.4).score(a, ctx), a.abs())


@pytest.mark.parametrize("mu", [1e-3, 1.0, 10.0, 1e6])
def test_cancelled_entry_damped_to_zero(mu):
    # Delta = -1 (g = 0 on an entry the worker sent): score 0 whatever |a| and mu,
    # even though it is by far the largest entry
    a = T([100.0, 1.0, 2.0])
    ctx = prev_ctx([0], [5.0], [0.0], [0.25])
    sp = RegTopK(1.0 / 3.0, mu=mu)  # k = 1
    score = sp.score(a, ctx)
    assert score[0, 0].item() == 0.0
    assert idx_list(sp.select(a, ctx)) == [2]


@pytest.mark.parametrize("distortion", ["reference", "paper"])
def test_regtopk_guards_bad_feedback(distortion):
    # every previous entry has a degenerate feedback: the score is |a| (Delta = Q)
    #   0: fb_g NaN (unknown)          1: fb_w = 0 (zero denominator)
    #   2: sent 0 (reference den 0)    3: fb_g = +inf
    #   4: overflow (3e38 / 1e-30 -> inf)
    # paper also: entry 5 with a = 0 this round (den 0) and entry 6 with fb_w NaN
    a = T([1.0, -2.0, 3.0, -4.0, 5.0, 0.0, 7.0, 8.0])
    big = 3e38
    ctx = SelectContext(
        torch.tensor([0, 1, 2, 3, 4, 5, 6]),
        T(1.0, 1.0, 0.0, 1.0, 1e-30, 1.0, 1.0),
        T(float("nan"), 1.0, 1.0, float("inf"), big, 1.0, 1.0),
        T(0.5, 0.0, 0.5, 0.5, 1e-8, 0.5, float("nan")),
        torch.ones(1), (0,), 1)
    sp = RegTopK(0.25, distortion=distortion)
    score = sp.score(a, ctx)
    assert bool(torch.isfinite(score).all())
    # reference: contrib w*s = [0.5, 0, 0, 0.5, 1e-38, 0.5, nan] -> entries 0-4 and 6
    #   guarded (Q); entry 5: Delta = (1 - 0.5)/0.5 = 1 -> 0 * tanh(2) = 0 = |a|
    # paper: den w*a = [0.5, 0, 1.5, -2, 5e-8, 0, nan] -> 0,1,3,4,5,6 guarded, but
    #   entry 2 is sound: Delta = (1 - 0)/1.5 = 2/3 -> 3 * tanh(5/3) = 2.79036
    expected = a.abs()
    if distortion == "paper":
        expected[0, 2] = 3.0 * math.tanh(5.0 / 3.0)
    torch.testing.assert_close(score, expected, rtol=1e-6, atol=0)
    assert idx_list(sp.select(a, ctx)) == [6, 7]  # k = 2: |a| = 7, 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distortion", ["reference", "paper"])
def test_regularized_score_is_the_guarded_formula_bitwise(distortion, dtype):
    """prev_scores (in-place, nan_to_num) gives, bit for bit, the formula as
    the module docstring writes it: Delta = (g - w s) / den, Q wherever Delta
    is not finite or den is 0, score |a| tanh(|1 + Delta| / mu)."""
    from regtopk_fl.compress.regtopk import prev_scores

    gen = torch.Generator().manual_seed(7)
    m, q, mu = 4000, 1e8, 0.37
    def draw():
        x = torch.randn(m, generator=gen, dtype=torch.float64).to(dtype)
        special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30,
                                3e38], dtype=torch.float64).to(dtype)
        pick = torch.randint(0, 10 * len(special), (m,), generator=gen)
        hit = pick < len(special)
        x[hit] = special[pick[hit]]
        return x
    a = draw().nan_to_num(0.0, 0.0, 0.0).view(2, m // 2)  # a is finite
    sent, fb_g, fb_w = draw().nan_to_num(1.0, 1.0, 1.0), draw(), draw().abs()
    idx = torch.randperm(m, generator=gen)[: m // 2]
    ctx = SelectContext(idx, sent[: m // 2], fb_g[: m // 2], fb_w[: m // 2], torch.ones(2),
                        (0, 1), 1)
    a_prev = a.view(-1)[idx]
    contrib = ctx.fb_w * ctx.prev_sent
    den = contrib if distortion == "reference" else ctx.fb_w * a_prev
    delta = (ctx.fb_g - contrib) / den
    delta = torch.where(torch.isfinite(delta) & (den != 0), delta, q)
    expected = a_prev.abs() * torch.tanh((1.0 + delta).abs() / mu)
    got_idx, got = prev_scores(a, ctx, mu, distortion, q)
    assert torch.equal(got_idx, idx) and got.dtype == dtype
    assert torch.equal(got, expected)
    assert bool((got != a_prev.abs()).any()) and bool((got == a_prev.abs()).any())


def test_q_beyond_the_dtypes_range_acts_as_an_infinite_q():
    """Q = 1e300 on float32 entries: a guarded Delta becomes inf, its tanh 1,
    so the score is |a| there, as for any huge Q (no overflow error)."""
    a = T([1.0, -2.0, 3.0, -4.0])
    ctx = prev_ctx([0, 1, 2], [1.0, 0.0, 2.0], [float("nan"), 1.0, 1.0], [0.5, 0.5, 0.5])
    score = RegTopK(0.5, mu=1.0, q=1e300).score(a, ctx)
    # entries 0 (unknown feedback) and 1 (sent 0) are guarded; entry 2 is sound
    expected = a.abs()
    expected[0, 2] = 3.0 * math.tanh(abs(1.0 + (1.0 - 1.0) / 1.0))
    assert bool(torch.isfinite(score).all())
    torch.testing.assert_close(score, expected, rtol=1e-6, atol=0)


def test_regtopk_mu_to_zero_hand():
    # mu = 1e-9: tanh(|1 + Delta| / mu) = 1 unless Delta = -1 exactly
    #   idx 0: Delta = 0 -> 1;  idx 1: Delta = -1 -> 0
    sp = RegTopK(0.5, mu=1e-9)
    assert torch.equal(sp.score(REG_A, reg_ctx()), T([2.5, 0.0, 2.25, 1.5]))


def test_huge_mu_scales_every_entry_alike():
    # mu = 1e12: tanh(|1 + Q| / mu) = tanh(1e-4) on unsent entries; the order of
    # |a| among unsent entries is unchanged, no NaN/Inf
    a = T([0.5, -3.0, 2.0, -0.25, 1.0])
    sp = RegTopK(0.4, mu=1e12)
    score = sp.score(a, empty_ctx(1))
    assert bool(torch.isfinite(score).all()) and bool((score > 0).all())
    assert idx_list(sp.select(a, empty_ctx(1))) == [1, 2]


Z875 = 1.1503493803760079  # Phi^-1(1 - 0.25/2)
Z90 = 1.2815515655446004  # Phi^-1(1 - 0.2/2)


def test_gaussiank_hand_no_refinement():
    # J = 8, S = 0.25 -> k = 2, accepted count in [4/3, 8/3] = {2}
    # a = [0,0,0,0,0,0,4,-4]: mean 0, std = sqrt(32/7) = 2.13809
    # t = 0 + 2.13809 * 1.15035 = 2.45955 -> |a| > t: idx 6, 7 (2 entries, in range)
    a = T([0, 0, 0, 0, 0, 0, 4, -4])
    sel = GaussianK(0.25).select(a, empty_ctx(1))
    assert idx_list(sel) == [6, 7] and sel.counts.tolist() == [2]


def test_gaussiank_hand_too_few_then_halved():
    # J = 20, S = 0.25 -> k = 5, accepted count in [3.33, 6.67]
    # a = [10,-10,4,-4, 0 x 16]: mean 0, std = sqrt(232/19) = 3.49436
    # t = 3.49436 * 1.15035 = 4.01973 -> count 2 (too few) -> t*0.5 = 2.00987
    # -> count 4 (in range) -> idx 0..3
    a = T([10, -10, 4, -4] + [0] * 16)
    sel = GaussianK(0.25).select(a, empty_ctx(1))
    assert idx_list(sel) == [0, 1, 2, 3] and sel.counts.tolist() == [4]


def test_gaussiank_hand_too_many_then_raised():
    # J = 20, S = 0.25 -> k = 5, range [3.33, 6.67]
    # a = [6,-6,6,-6,-5,4,4,-2,-1, 0 x 11]: mean 0, sum a^2 = 206, std = sqrt(206/19)
    #   = 3.29274; t = 3.29274 * 1.15035 = 3.78780 -> count 7 (6,6,6,6,5,4,4): too many
    # -> t*1.5 = 5.68169 -> count 4 (the four 6s): in range -> idx 0..3
    a = T([6, -6, 6, -6, -5, 4, 4, -2, -1] + [0] * 11)
    sel = GaussianK(0.25).select(a, empty_ctx(1))
    assert idx_list(sel) == [0, 1, 2, 3] and sel.counts.tolist() == [4]


def test_gaussiank_hand_stops_after_three_refinements():
    # J = 8, S = 0.25 -> k = 2, range {2}
    # a = [8,1,-1,1,-1,1,-1,0]: mean 1, deviations 7,0,-2,0,-2,0,-2,-1, sum sq 62,
    # std = sqrt(62/7) = 2.97610; t = 1 + 2.97610*1.15035 = 4.42355 -> count 1 (few)
    # t/2 = 2.21177 -> 1 (few); t/4 = 1.10589 -> 1 (few); t/8 = 0.55294 -> 7
    # three refinements done: 7 entries are sent although 7 > 4k/3
    a = T([8, 1, -1, 1, -1, 1, -1, 0])
    sel = GaussianK(0.25).select(a, empty_ctx(1))
    assert idx_list(sel) == [0, 1, 2, 3, 4, 5, 6] and sel.counts.tolist() == [7]


def test_gaussiank_rows_are_independent_hand():
    # row 0 as in the no-refinement case, row 1 = the same values shuffled
    a = T([0, 0, 0, 0, 0, 0, 4, -4], [4, 0, 0, -4, 0, 0, 0, 0])
    sel = GaussianK(0.25).select(a, empty_ctx(2))
    assert idx_list(sel) == [6, 7, 8 + 0, 8 + 3] and sel.counts.tolist() == [2, 2]


def test_regtopk_gaussiank_hand():
    # J = 8, S = 0.25 -> k = 2, range {2}; last round sent idx 0 (s = 6, w = 0.5)
    # and it cancelled: g = 0 -> Delta = -1 -> score 0 on idx 0.
    # a = [8,0,0,0,0,0,5,-5]: mean 1, deviations 7,-1,-1,-1,-1,-1,4,-6, sum sq 106,
    # std = sqrt(106/7) = 3.89138; t = 1 + 3.89138*1.15035 = 5.47645
    # Gaussian-k on |a|: count 1 (few) -> t/2 = 2.73822: 3 (many) -> *1.5 = 4.10734: 3
    #   (many) -> *1.5 = 6.16101: 1 -> stops after 3 refinements: idx 0 only
    # RegTop-k score = [0,0,0,0,0,0,5,5]: t = 5.47645 -> 0 (few) -> t/2 = 2.73822
    #   -> 2 (idx 6, 7): in range
    a = T([8, 0, 0, 0, 0, 0, 5, -5])
    ctx = prev_ctx([0], [6.0], [0.0], [0.5])
    assert idx_list(GaussianK(0.25).select(a, ctx)) == [0]
    sel = RegTopKGaussianK(0.25, mu=1.0).select(a, ctx)
    assert idx_list(sel) == [6, 7] and sel.counts.tolist() == [2]


def test_regtopk_gaussiank_hand_with_refinements():
    # a = [6,-6,6,-6,-5,4,4,-2,-1, 0 x 11] (J = 20, S = 0.25, k = 5, range [3.33, 6.67]):
    # t0 = 3.78780 as in test_gaussiank_hand_too_many_then_raised. Last round sent
    # idx 0 with s = 2, w = 0.5, g = 1: Delta = (1 - 1)/1 = 0 -> score 6 tanh(1) = 4.56956.
    # scores > t0: 4.57, 6, 6, 6, 5, 4, 4 -> 7 (many) -> t1 = 5.68169: 6, 6, 6 -> 3 (few)
    # -> t2 = 2.84085: the 7 again (many) -> t3 = 4.26127: 4.57, 6, 6, 6, 5 -> idx 0..4
    a = T([6, -6, 6, -6, -5, 4, 4, -2, -1] + [0] * 11)
    ctx = prev_ctx([0], [2.0], [1.0], [0.5])
    sel = RegTopKGaussianK(0.25, mu=1.0).select(a, ctx)
    assert idx_list(sel) == [0, 1, 2, 3, 4] and sel.counts.tolist() == [5]
    assert idx_list(GaussianK(0.25).select(a, ctx)) == [0, 1, 2, 3]


def test_global_topk_hand():
    # a0 = [4,-1,2,0], a1 = [-4,3,2,1], weights 1/2: sum w a = [0, 1, 2, 0.5]
    # S = 0.5 -> k = 2 -> idx 1, 2 for both workers (flat 1,2 and 4+1, 4+2)
    a = T([4, -1, 2, 0], [-4, 3, 2, 1])
    sel = GlobalTopK(0.5).select(a, empty_ctx(2, weights=[0.5, 0.5]))
    assert idx_list(sel) == [1, 2, 5, 6] and sel.counts.tolist() == [2, 2]
    # weights [0.75, 0.25]: [3-1, -0.75+0.75, 1.5+0.5, 0.25] = [2, 0, 2, 0.25] -> idx 0, 2
    sel = GlobalTopK(0.5).select(a, empty_ctx(2, weights=[0.75, 0.25]))
    assert idx_list(sel) == [0, 2, 4, 6]
    # row-wise top-k would differ: row 0 -> 0, 2; row 1 -> 0, 1
    assert idx_list(TopK(0.5).select(a, empty_ctx(2))) == [0, 2, 4, 5]


def test_randomk_hand():
    # whatever k entries are drawn, the upload is a on them and the residual is
    # a with those entries zeroed; S = 0.5, J = 4 -> k = 2
    g = T([1.0, -2.0, 3.0, -4.0])
    mem = ErrorFeedbackMemory(1, 4)
    up = sparsify(mem, g, RandomK(0.5, seed=3), [1.0])[0]
    assert up.sent == 2 and len(set(up.indices.tolist())) == 2
    full = [1.0, -2.0, 3.0, -4.0]
    assert up.values.tolist() == [full[i] for i in up.indices.tolist()]
    assert mem.eps[0].tolist() == [0.0 if i in up.indices.tolist() else v
                                   for i, v in enumerate(full)]
    # S = 1: everything, J = 1: the single entry
    assert idx_list(RandomK(1.0).select(g, empty_ctx(1))) == [0, 1, 2, 3]
    assert idx_list(RandomK(0.5).select(T([7.0]), empty_ctx(1))) == [0]


def test_randomk_seeding():
    a = torch.zeros(1, 1000)
    sp = RandomK(0.01, seed=5)
    pick = lambda wid, rnd, s=sp: idx_list(s.select(a, empty_ctx(1, worker_ids=[wid],
                                                                    round=rnd)))
    assert pick(2, 7) == pick(2, 7)  # same (seed, worker, round): same entries
    assert pick(2, 7) != pick(2, 8)  # another round
    assert pick(2, 7) != pick(3, 7)  # another worker
    assert pick(2, 7) != idx_list(RandomK(0.01, seed=6).select(
        a, empty_ctx(1, worker_ids=[2], round=7)))
    # independent of a's values (random, not magnitude-based)
    b = torch.arange(1000.0).unsqueeze(0)
    assert idx_list(sp.select(b, empty_ctx(1, worker_ids=[2], round=7))) == pick(2, 7)


def test_randomk_is_uniform():
    # J = 10, k = 2 over 2000 rounds: each entry expected 400 times;
    # binomial sd = sqrt(2000 * 0.2 * 0.8) = 17.9 -> +-5 sd = [310, 490]
    a = torch.zeros(1, 10)
    sp = RandomK(0.2, seed=0)
    hits = torch.zeros(10)
    for rnd in range(2000):
        hits[sp.select(a, empty_ctx(1, round=rnd)).flat_idx] += 1
    assert bool((hits > 310).all()) and bool((hits < 490).all()), hits


# -- properties ---------------------------------------------------------------------
@st.composite
def batches(draw, max_rows=3, max_dim=40):
    n = draw(st.integers(1, max_rows))
    dim = draw(st.integers(1, max_dim))
    seed = draw(st.integers(0, 2**16))
    s = draw(st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0]))
    return n, dim, seed, s


def random_round_data(n, dim, rounds, seed, ties=False):
    """Gradients (heavy-tailed, some exact zeros) and synthetic global gradients."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(rounds):
        g = torch.randn(n, dim, generator=gen) * torch.exp(2 * torch.randn(n, dim, generator=gen))
        g[torch.rand(n, dim, generator=gen) < 0.1] = 0.0
        if ties:
            g = torch.round(g)
        grads.append(g)
    globals_ = []
    for _ in range(rounds):
        gg = torch.randn(dim, generator=gen)
        gg[torch.rand(dim, generator=gen) < 0.2] = 0.0  # cancellations
        globals_.append(gg)
    weights = (torch.rand(n, generator=gen) + 0.1)
    return grads, globals_, (weights / weights.sum()).tolist()


def simulate(name, n, dim, s, grads, globals_, weights, worker_ids=None, **kw):
    """Rounds of sparsify + feedback; returns [(indices, values) per row] per
    round and the final memory."""
    sp = make(name, s, **kw)
    mem = ErrorFeedbackMemory(n, dim)
    out = []
    for t, (g, gg) in enumerate(zip(grads, globals_)):
        ups = sparsify(mem, g, sp, weights, worker_ids=worker_ids, round=t)
        out.append([(u.indices, u.values) for u in ups])
        mem.feedback_from_global(gg, weights)
    return out, mem


@SETTINGS
@given(batches())
def test_sent_plus_residual_is_accumulated_bitwise(case):
    n, dim, seed, s = case
    grads, _, weights = random_round_data(n, dim, 3, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name in SPARSIFIERS:
        sp = make(name, s)
        mem = ErrorFeedbackMemory(n, dim)
        for t, g in enumerate(grads):
            expected_a = mem.eps.clone() + g  # the same single float add as accumulate
            ups = sparsify(mem, g, sp, weights, round=t)
            recon = torch.stack([u.dense() for u in ups]) + mem.eps
            assert torch.equal(recon, expected_a), name
            for r, u in enumerate(ups):  # the residual is exactly 0 where sent
                if u.indices is not None:
                    assert bool((mem.eps[r, u.indices] == 0).all())
            mem.feedback_from_global(torch.randn(dim, generator=gen), weights)


@SETTINGS
@given(batches())
def test_selection_structure_and_exact_k(case):
    n, dim, seed, s = case
    grads, globals_, weights = random_round_data(n, dim, 2, seed, ties=True)
    k = num_selected(s, dim)
    for name in SPARSIFIERS:
        sp = make(name, s)
        mem = ErrorFeedbackMemory(n, dim)
        for t, (g, gg) in enumerate(zip(grads, globals_)):
            a = mem.accumulate(g)
            ctx = mem.context(weights, round=t)
            a_before = a.clone()
            sel = sp.select(a, ctx)
            assert torch.equal(a, a_before), f"{name} changed a"
            check_structure(sel, n, dim)
            if name in EXACT_K:
                assert sel.counts.tolist() == [k] * n, name
            elif name == "dense":
                assert sel.counts.tolist() == [dim] * n
            else:  # within the method's stated upload budget
                budget = sp.budget(dim)
                assert all(0 <= c <= budget <= dim for c in sel.counts.tolist()), name
            mem.commit(a, sel)
            mem.feedback_from_global(gg, weights)


@SETTINGS
@given(batches(max_rows=3, max_dim=3000), st.sampled_from(["reference", "paper"]),
       st.sampled_from([1.0, 0.05, 1e12]), st.booleans(), st.booleans())
def test_gaussiank_fast_path_equals_materialized_score(case, distortion, mu, sort_prev,
                                                        prev_top):
    # Gaussian-k never builds |a| (|a| > t is a > t or a < -t) and RegTop-k +
    # Gaussian-k overrides only last round's entries; thresholds above the last
    # full pass are counted on that pass's entries. The selection must be the
    # one of comparing the materialized score against each threshold.
    n, dim, seed, s = case
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=gen) * torch.exp(2 * torch.randn(n, dim, generator=gen))
    a[:, : dim // 4] *= 30.0  # a "layer" of larger scale: the normal fit refines
    m = int(torch.randint(0, n * dim // 5 + 1, (1,), generator=gen))
    prev = torch.randperm(n * dim, generator=gen)[:m]
    if prev_top:  # last round sent the largest entries, as it would have: they are
        # candidates above the first threshold, with a damped score
        prev = torch.topk(a.abs().reshape(-1), m).indices
    if sort_prev:
        prev = prev.sort().values
    fb_g = torch.randn(m, generator=gen)
    fb_g[torch.rand(m, generator=gen) < 0.2] = 0.0  # cancellations
    fb_g[torch.rand(m, generator=gen) < 0.1] = float("nan")  # feedback unknown
    ctx = SelectContext(prev, torch.randn(m, generator=gen), fb_g,
                        torch.rand(m, generator=gen), torch.full((n,), 1.0 / n),
                        tuple(range(n)), 1)
    ref = threshold_select(a, a.abs(), s)
    got = GaussianK(s).select(a, ctx)
    assert torch.equal(got.flat_idx, ref.flat_idx) and torch.equal(got.counts, ref.counts)
    sp = RegTopKGaussianK(s, mu=mu, distortion=distortion)
    ref = threshold_select(a, regularized_abs(a, ctx, mu, distortion, sp.q), s)
    got = sp.select(a, ctx)
    assert torch.equal(got.flat_idx, ref.flat_idx) and torch.equal(got.counts, ref.counts)


def test_row_mean_is_accurate_and_deterministic():
    # float32 chunk sums added in float64: within a few float32 ulps of the exact
    # mean, the same for a batch and for each row alone
    gen = torch.Generator().manual_seed(3)
    for dim in (1, 5, 8191, 8192, 8193, 300_000, 600_001):
        a = torch.randn(2, dim, generator=gen) * 3.0 + 0.25
        exact = a.double().numpy().mean(axis=1, keepdims=True)
        got = row_mean(a)
        assert got.dtype == torch.float32 and got.shape == (2, 1)
        torch.testing.assert_close(got.double(), torch.from_numpy(exact), rtol=3e-7, atol=0)
        assert torch.equal(got[1:], row_mean(a[1:].clone()))


def test_gaussiank_count_in_documented_range_on_gaussian_data():
    # on Gaussian data the normal fit is right: count in [2k/3, 4k/3]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 100_000, generator=gen) * 3.0
    for s in (0.002, 0.01, 0.1):
        k = num_selected(s, 100_000)
        for cls in (GaussianK, RegTopKGaussianK):
            sel = cls(s).select(a, empty_ctx(4))
            counts = sel.counts.tolist()
            assert all(2 * k / 3 <= c <= 4 * k / 3 for c in counts), (s, counts)


def test_gaussiank_selects_largest_entries():
    # whatever the count, Gaussian-k sends the count largest |a| (a threshold)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 5000, generator=gen) * torch.exp(torch.randn(3, 5000, generator=gen))
    sel = GaussianK(0.01).select(a, empty_ctx(3))
    for r, (s, e) in enumerate(sel.row_slices()):
        c = e - s
        chosen = sel.flat_idx[s:e] - r * 5000
        top = torch.topk(a[r].abs(), c).indices.sort().values
        assert torch.equal(chosen, top)


@SETTINGS
@given(batches(max_rows=4, max_dim=30),
       st.sampled_from(ROW_WISE + ("regtopk_paper",)))
def test_batched_equals_single_calls(case, name):
    n, dim, seed, s = case
    kw = {}
    if name == "regtopk_paper":
        name, kw = "regtopk", {"distortion": "paper"}
    grads, globals_, weights = random_round_data(n, dim, 4, seed)
    batched, mem_b = simulate(name, n, dim, s, grads, globals_, weights, **kw)
    for r in range(n):
        single, mem_s = simulate(name, 1, dim, s, [g[r:r + 1] for g in grads], globals_,
                                 [weights[r]], worker_ids=[r], **kw)
        for t in range(len(grads)):
            ib, vb = batched[t][r]
            is_, vs = single[t][0]
            assert (ib is None) == (is_ is None)
            if ib is not None:
                assert torch.equal(ib, is_), (name, t, r)
            assert torch.equal(vb, vs), (name, t, r)
        assert torch.equal(mem_b.eps[r], mem_s.eps[0])


def test_batched_equals_single_calls_large_rows():
    # rows long enough for the parallel CPU kernels (J > 32768)
    n, dim = 3, 70_000
    torch.set_num_threads(2)  # restored by the fixture
    grads, globals_, weights = random_round_data(n, dim, 3, seed=11)
    for name in ROW_WISE:
        batched, mem_b = simulate(name, n, dim, 0.01, grads, globals_, weights)
        for r in range(n):
            single, mem_s = simulate(name, 1, dim, 0.01, [g[r:r + 1] for g in grads],
                                     globals_, [weights[r]], worker_ids=[r])
            for t in range(3):
                assert batched[t][r][1].shape == single[t][0][1].shape, (name, r, t)
                if batched[t][r][0] is not None:
                    assert torch.equal(batched[t][r][0], single[t][0][0]), (name, r, t)
                assert torch.equal(batched[t][r][1], single[t][0][1]), (name, r, t)
            assert torch.equal(mem_b.eps[r], mem_s.eps[0]), name


def test_cpu_result_independent_of_thread_count():
    n, dim = 2, 150_000
    grads, globals_, weights = random_round_data(n, dim, 3, seed=5)
    old = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            for name in SPARSIFIERS:
                out, mem = simulate(name, n, dim, 0.01, grads, globals_, weights)
                results[threads, name] = (out, mem.state_dict())
    finally:
        torch.set_num_threads(old)
    for name in SPARSIFIERS:
        out1, st1 = results[1, name]
        for threads in (2, 4):
            out2, st2 = results[threads, name]
            for t in range(3):
                for (i1, v1), (i2, v2) in zip(out1[t], out2[t]):
                    assert (i1 is None and i2 is None) or torch.equal(i1, i2), (name, threads)
                    assert torch.equal(v1, v2), (name, threads)
            for key in st1:
                assert torch.equal(st1[key], st2[key]), (name, threads, key)


@SETTINGS
@given(batches(max_rows=2, max_dim=40))
def test_mu_to_zero_equals_topk(case):
    # reference Delta with feedback bounded away from cancellation: |g| >= 0.5 and
    # |w s| <= 400 (|a| <= 4 rounds * 100) -> |1 + Delta| = |g / (w s)| >= 1.25e-3;
    # with mu = 1e-12 every tanh is exactly 1.0: the score is |a| bit for bit and
    # RegTop-k makes top-k's choices round after round.
    n, dim, seed, s = case
    gen = torch.Generator().manual_seed(seed)
    weights = [1.0 / n] * n
    reg, top = RegTopK(s, mu=1e-12), TopK(s)
    m_reg, m_top = ErrorFeedbackMemory(n, dim), ErrorFeedbackMemory(n, dim)
    for t in range(4):
        g = torch.randn(n, dim, generator=gen).clamp(-100, 100)
        up_r = sparsify(m_reg, g, reg, weights, round=t)
        up_t = sparsify(m_top, g, top, weights, round=t)
        for u, v in zip(up_r, up_t):
            assert torch.equal(u.indices, v.indices) and torch.equal(u.values, v.values)
        assert torch.equal(m_reg.eps, m_top.eps)
        sign = torch.where(torch.rand(dim, generator=gen) < 0.5, -1.0, 1.0)
        gg = sign * (0.5 + torch.rand(dim, generator=gen))
        m_reg.feedback_from_global(gg, weights)
        m_top.feedback_from_global(gg, weights)
        a = m_reg.eps + torch.randn(n, dim, generator=gen)
        assert torch.equal(reg.score(a, m_reg.context(weights)), a.abs())


def test_mu_to_zero_paper_keeps_only_cancellations():
    # paper Delta: 1 + Delta = (w a + g - w s) / (w a). Here w = 1, s = [2, 3, 5],
    # g = [4, 3, 1], a = [1, -2, 4] on the previous mask:
    #   idx 0: (1 + 4 - 2)/1 = 3;  idx 1: (-2 + 3 - 3)/(-2) = 1;  idx 2: (4 + 1 - 5)/4 = 0
    # mu -> 0: tanh -> [1, 1, 0]: only the exact zero of 1 + Delta is damped
    a = T([1.0, -2.0, 4.0, 0.5])
    ctx = prev_ctx([0, 1, 2], [2.0, 3.0, 5.0], [4.0, 3.0, 1.0], [1.0, 1.0, 1.0])
    sp = RegTopK(0.5, mu=1e-12, distortion="paper")
    assert torch.equal(sp.score(a, ctx), T([1.0, 2.0, 0.0, 0.5]))
    assert idx_list(sp.select(a, ctx)) == [0, 1]


@pytest.mark.parametrize("name", ["regtopk", "regtopk_gaussiank"])
@pytest.mark.parametrize("distortion", ["reference", "paper"])
def test_no_nan_or_inf_with_degenerate_feedback(name, distortion):
    # zero global gradient (everything cancelled), NaN feedback, zero weights,
    # zero gradients: the uploads and memory stay finite
    gen = torch.Generator().manual_seed(2)
    n, dim = 2, 64
    sp = make(name, 0.1, distortion=distortion)
    mem = ErrorFeedbackMemory(n, dim)
    feedbacks = [torch.zeros(dim), torch.full((dim,), float("nan")),
                 torch.full((dim,), float("inf")), torch.randn(dim, generator=gen)]
    weights_list = [[0.5, 0.5], [0.0, 0.0], [0.5, 0.5], [1e-30, 1.0]]
    for t in range(8):
        g = torch.randn(n, dim, generator=gen) if t % 3 else torch.zeros(n, dim)
        ups = sparsify(mem, g, sp, [0.5, 0.5], round=t)
        for u in ups:
            assert bool(torch.isfinite(u.values).all())
        mem.feedback_from_global(feedbacks[t % 4], weights_list[t % 4])
        ctx = mem.context([0.5, 0.5], round=t + 1)
        score = sp.score(mem.eps + 0.0, ctx)
        assert bool(torch.isfinite(score).all()) and bool((score >= 0).all())
    assert bool(torch.isfinite(mem.eps).all())


# -- the paper's toy (Fig. 1) -----------------------------------------------------
def toy(sparsifier, iters=50):
    """Two workers, J = 2, x = [100, 1] and [-100, 1], y = 1, logistic loss
    log(1 + exp(-<w, x>)), gradient -x * sigmoid(-<w, x>), eta = 0.9,
    w0 = [0, 1], weights 1/2, server step w -= eta * sum_n w_n g_hat_n."""
    x = torch.tensor([[100.0, 1.0], [-100.0, 1.0]])
    w = torch.tensor([0.0, 1.0])
    weights = [0.5, 0.5]
    mem = ErrorFeedbackMemory(2, 2)
    ws, losses = [w.clone()], []
    for t in range(iters):
        z = x @ w
        losses.append(float(torch.nn.functional.softplus(-z).mean()))
        grad = -x * torch.sigmoid(-z).unsqueeze(1)
        ups = sparsify(mem, grad, sparsifier, weights, round=t)
        g = sum(wn * u.dense() for wn, u in zip(weights, ups))
        mem.feedback_from_global(g, weights)
        w = w - 0.9 * g
        ws.append(w.clone())
    return ws, losses


def test_toy_top1_never_moves():
    # round 1: grad_1 = -[100, 1] s, grad_2 = -[-100, 1] s with s = sigmoid(-1) = 0.26894
    # top-1 of both is entry 0 (|26.89| > |0.269|) and 0.5*(-26.89) + 0.5*26.89 = 0:
    # w stays [0, 1]; the residual on entry 1 grows by 0.269 a round, reaching
    # 13.4 < 26.89 after 50 rounds, so entry 0 is chosen (and cancels) every time.
    ws, losses = toy(TopK(0.5))
    for w in ws:
        assert w.tolist() == [0.0, 1.0]
    assert len(set(losses)) == 1
    assert losses[0] == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)


def test_toy_regtop1_moves_from_round_two():
    # round 1 is plain top-1 (entry 0, cancels: g = 0, w unchanged).
    # round 2: entry 0 has Delta = (0 - w s)/(w s) = -1 -> score 0, so each worker
    # sends entry 1: a = -2 * 0.26894 = -0.53788 for both; g = [0, -0.53788] and
    # w = [0, 1 + 0.9 * 0.53788] = [0, 1.48409].
    ws, losses = toy(RegTopK(0.5, mu=1.0, distortion="reference"))
    assert ws[1].tolist() == [0.0, 1.0]
    s = 1.0 / (1.0 + math.exp(1.0))
    assert ws[2][0].item() == 0.0
    assert ws[2][1].item() == pytest.approx(1.0 + 0.9 * 2 * s, rel=1e-6)
    assert losses[2] < losses[1] == losses[0]
    assert losses[-1] < 0.5 * losses[0]


def test_toy_dense_and_global_topk_move():
    for sp in (Dense(), GlobalTopK(0.5)):
        ws, losses = toy(sp)
        assert ws[1][1].item() > 1.0
        assert losses[-1] < losses[0]
