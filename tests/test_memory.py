"""Error-feedback memory: accumulate / context / commit / feedback by hand,
input validation, partial participation and persistence."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regtopk_fl.compress import SPARSIFIERS, SparsifierError, TopK
from regtopk_fl.fedround import sparsify
from regtopk_fl.memory import ErrorFeedbackMemory

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
NAN = float("nan")
KEYS = ("eps", "prev_local", "prev_counts", "prev_sent", "fb_g", "fb_w")


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def T(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def same(x, y):
    """Bitwise equality that treats NaN == NaN (fb_g is NaN until feedback)."""
    return x.shape == y.shape and x.dtype == y.dtype and bool(
        ((x == y) | (torch.isnan(x) & torch.isnan(y))).all()) if x.is_floating_point() \
        else torch.equal(x, y)


def row_state(mem, r):
    """Everything the memory holds about row r."""
    ends = torch.cumsum(mem.prev_counts, 0).tolist()
    s, e = ([0] + ends[:-1])[r], ends[r]
    return (mem.eps[r].clone(), mem.prev_local[s:e].clone(), mem.prev_counts[r].clone(),
            mem.prev_sent[s:e].clone(), mem.fb_g[s:e].clone(), mem.fb_w[r].clone())


def assert_row_state(a, b):
    for x, y in zip(a, b):
        assert same(x, y)


# Two workers, J = 4, top-2 (S = 0.5):
#   g = [[1, -5, 2, 0.5], [3, 0.25, -4, 1]]
#   row 0: |g| = [1, 5, 2, .5] -> idx 1, 2, values [-5, 2];  residual [1, 0, 0, .5]
#   row 1: |g| = [3, .25, 4, 1] -> idx 0, 2, values [3, -4]; residual [0, .25, 0, 1]
G0 = T([1.0, -5.0, 2.0, 0.5], [3.0, 0.25, -4.0, 1.0])


def first_round():
    mem = ErrorFeedbackMemory(2, 4)
    ups = sparsify(mem, G0, TopK(0.5), [0.5, 0.5])
    return mem, ups


def test_commit_hand():
    mem, ups = first_round()
    assert [u.indices.tolist() for u in ups] == [[1, 2], [0, 2]]
    assert [u.values.tolist() for u in ups] == [[-5.0, 2.0], [3.0, -4.0]]
    assert mem.eps.tolist() == [[1.0, 0.0, 0.0, 0.5], [0.0, 0.25, 0.0, 1.0]]
    assert mem.prev_local.tolist() == [1, 2, 0, 2]
    assert mem.prev_counts.tolist() == [2, 2]
    assert mem.prev_sent.tolist() == [-5.0, 2.0, 3.0, -4.0]
    assert bool(torch.isnan(mem.fb_g).all()) and mem.fb_g.numel() == 4  # no feedback yet


def test_feedback_and_context_hand():
    mem, _ = first_round()
    # global gradient [10, 20, 30, 40]: row 0 sent idx 1, 2 -> [20, 30]; row 1 idx 0, 2
    # -> [10, 30]; weights of that round 0.25 and 0.75
    mem.feedback_from_global(torch.tensor([10.0, 20.0, 30.0, 40.0]), [0.25, 0.75])
    assert mem.fb_g.tolist() == [20.0, 30.0, 10.0, 30.0]
    assert mem.fb_w.tolist() == [0.25, 0.75]
    ctx = mem.context([0.5, 0.5], round=3)
    assert ctx.prev_flat.tolist() == [1, 2, 4 + 0, 4 + 2]  # row-local + row * J
    assert ctx.prev_sent.tolist() == [-5.0, 2.0, 3.0, -4.0]
    assert ctx.fb_g.tolist() == [20.0, 30.0, 10.0, 30.0]
    assert ctx.fb_w.tolist() == [0.25, 0.25, 0.75, 0.75]
    assert ctx.weights.tolist() == [0.5, 0.5]
    assert ctx.worker_ids == (0, 1) and ctx.round == 3
    # the same through set_feedback (values aligned with prev_local)
    mem.set_feedback(torch.tensor([1.0, 2.0, 3.0, 4.0]), [0.5, 0.5])
    assert mem.fb_g.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_second_round_accumulates_residual():
    mem, _ = first_round()
    # round 2: g = [[0, 0, 0, 1], [0, 0, 0, 0]] -> a = [[1, 0, 0, 1.5], [0, .25, 0, 1]]
    # top-2: row 0 idx 0, 3 [1, 1.5]; row 1 idx 1, 3 [.25, 1]; residuals all 0
    ups = sparsify(mem, T([0, 0, 0, 1.0], [0, 0, 0, 0]), TopK(0.5), [0.5, 0.5], round=1)
    assert [u.indices.tolist() for u in ups] == [[0, 3], [1, 3]]
    assert [u.values.tolist() for u in ups] == [[1.0, 1.5], [0.25, 1.0]]
    assert mem.eps.tolist() == [[0.0] * 4, [0.0] * 4]


@pytest.mark.parametrize("grad, match", [
    (torch.zeros(4), r"grad.shape=\(4,\)"),
    (torch.zeros(2, 5), r"grad.shape=\(2, 5\)"),
    (torch.zeros(3, 4), r"grad.shape=\(3, 4\)"),
    (torch.zeros(2, 4, dtype=torch.float64), r"grad.dtype=torch.float64"),
    (T([0, NAN, 0, 0], [0, 0, 0, 0]), "NaN or Inf"),
    (T([0, 0, 0, 0], [0, float("inf"), 0, 0]), "NaN or Inf"),
    (T([float("-inf"), 0, 0, 0], [0, 0, 0, 0]), "NaN or Inf"),
])
def test_accumulate_rejects_bad_gradients_without_touching_the_residual(grad, match):
    mem, _ = first_round()
    before = mem.state_dict()
    with pytest.raises(SparsifierError, match=match):
        mem.accumulate(grad)
    with pytest.raises(SparsifierError):
        sparsify(mem, grad, TopK(0.5), [0.5, 0.5])
    after = mem.state_dict()
    for k in KEYS:
        assert same(before[k], after[k]), k


def test_accumulate_rows_shape_is_checked():
    mem, _ = first_round()
    with pytest.raises(SparsifierError, match=r"expected \(1, 4\)"):
        mem.accumulate(torch.zeros(2, 4), rows=[1])


def test_feedback_length_mismatch_raises():
    mem, _ = first_round()
    with pytest.raises(SparsifierError, match="feedback length=3"):
        mem.set_feedback(torch.zeros(3), [0.5, 0.5])
    with pytest.raises(SparsifierError, match="feedback length=4"):
        mem.set_feedback(torch.zeros(4), [0.5], rows=[0])


def test_partial_participation_hand():
    mem, _ = first_round()
    mem.feedback_from_global(torch.tensor([10.0, 20.0, 30.0, 40.0]), [0.25, 0.75])
    row0 = row_state(mem, 0)
    # only row 1 takes part: its context holds its own mask and feedback
    ctx = mem.context([1.0], rows=[1])
    assert ctx.prev_flat.tolist() == [0, 2]  # local 0, 2 of batch row 0
    assert ctx.fb_g.tolist() == [10.0, 30.0] and ctx.fb_w.tolist() == [0.75, 0.75]
    assert ctx.prev_sent.tolist() == [3.0, -4.0] and ctx.worker_ids == (1,)
    # a = [0, .25, 0, 1] + [0, 0, 0, 2] = [0, .25, 0, 3] -> idx 1, 3 [.25, 3]
    a = mem.accumulate(T([0.0, 0.0, 0.0, 2.0]), rows=[1])
    assert a.tolist() == [[0.0, 0.25, 0.0, 3.0]]
    assert mem.eps[1].tolist() == [0.0, 0.25, 0.0, 1.0]  # untouched until commit
    ups = sparsify(mem, T([0.0, 0.0, 0.0, 2.0]), TopK(0.5), [1.0], rows=[1], round=1)
    assert ups[0].indices.tolist() == [1, 3] and ups[0].values.tolist() == [0.25, 3.0]
    assert mem.eps[1].tolist() == [0.0] * 4
    assert mem.prev_local.tolist() == [1, 2, 1, 3]
    assert mem.prev_sent.tolist() == [-5.0, 2.0, 0.25, 3.0]
    assert mem.fb_g[:2].tolist() == [20.0, 30.0] and bool(torch.isnan(mem.fb_g[2:]).all())
    assert_row_state(row_state(mem, 0), row0)
    # feedback for row 1 only
    mem.set_feedback(torch.tensor([7.0, 8.0]), [1.0], rows=[1])
    assert mem.fb_g.tolist() == [20.0, 30.0, 7.0, 8.0]
    assert mem.fb_w.tolist() == [0.25, 1.0]
    assert_row_state(row_state(mem, 0), row0)


@st.composite
def schedules(draw):
    n = draw(st.integers(2, 4))
    dim = draw(st.integers(2, 25))
    rounds = draw(st.integers(2, 5))
    subsets = [sorted(draw(st.sets(st.integers(0, n - 1), min_size=1))) for _ in range(rounds)]
    return n, dim, subsets, draw(st.integers(0, 2**16)), draw(st.sampled_from(
        ["topk", "regtopk", "gaussiank", "regtopk_gaussiank", "randomk", "dense"]))


@SETTINGS
@given(schedules())
def test_partial_participation_matches_independent_workers(case):
    """A batch memory driven with ``rows`` behaves exactly like one memory per
    worker that only runs when it takes part; absent rows are untouched."""
    n, dim, subsets, seed, name = case
    gen = torch.Generator().manual_seed(seed)
    sp = SPARSIFIERS[name](0.3)
    batch = ErrorFeedbackMemory(n, dim)
    singles = [ErrorFeedbackMemory(1, dim) for _ in range(n)]
    for t, rows in enumerate(subsets):
        grad = torch.randn(len(rows), dim, generator=gen)
        w = (torch.rand(len(rows), generator=gen) + 0.1).tolist()
        rows_arg = None if len(rows) == n else rows
        absent = {r: row_state(batch, r) for r in range(n) if r not in rows}
        ups = sparsify(batch, grad, sp, w, rows=rows_arg, round=t)
        for j, r in enumerate(rows):
            ref = sparsify(singles[r], grad[j:j + 1], sp, [w[j]], worker_ids=[r], round=t)[0]
            assert torch.equal(ups[j].values, ref.values)
            assert (ups[j].indices is None) == (ref.indices is None)
            if ref.indices is not None:
                assert torch.equal(ups[j].indices, ref.indices)
        gg = torch.randn(dim, generator=gen)
        gg[torch.rand(dim, generator=gen) < 0.3] = 0.0
        batch.feedback_from_global(gg, w, rows=rows_arg)
        for j, r in enumerate(rows):
            singles[r].feedback_from_global(gg, [w[j]])
        for r, st_ in absent.items():
            assert_row_state(row_state(batch, r), st_)
        for r in range(n):
            assert_row_state(row_state(batch, r), row_state(singles[r], 0))


def test_skipped_round_uses_feedback_of_last_round_taken_part():
    # row 1 sends in round 0, skips rounds 1-2; its context in round 3 still
    # carries round 0's feedback (never one of the rounds it missed)
    mem, _ = first_round()
    mem.feedback_from_global(torch.tensor([10.0, 20.0, 30.0, 40.0]), [0.25, 0.75])
    for t in (1, 2):
        sparsify(mem, T([1.0, 2.0, 3.0, 4.0]), TopK(0.5), [1.0], rows=[0], round=t)
        mem.feedback_from_global(torch.full((4,), float(t)), [1.0], rows=[0])
    ctx = mem.context([0.5, 0.5], round=3)
    assert ctx.fb_g.tolist()[2:] == [10.0, 30.0]
    assert ctx.fb_w.tolist()[2:] == [0.75, 0.75]
    assert ctx.fb_g.tolist()[:2] == [2.0, 2.0]


def run(mem, name, grads, gens, start=0):
    sp = SPARSIFIERS[name](0.25)
    out = []
    for t, (g, gg) in enumerate(zip(grads, gens), start=start):
        ups = sparsify(mem, g, sp, [0.5, 0.5], round=t)
        out.append([(u.indices, u.values) for u in ups])
        mem.feedback_from_global(gg, [0.5, 0.5])
    return out


@pytest.mark.parametrize("name", ["topk", "regtopk", "regtopk_gaussiank", "randomk"])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_state_dict_round_trip(name, as_numpy):
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(2, 30, generator=gen) for _ in range(6)]
    gens = [torch.randn(30, generator=gen) for _ in range(6)]
    mem = ErrorFeedbackMemory(2, 30)
    run(mem, name, grads[:3], gens[:3])
    sd = mem.state_dict()
    assert set(sd) == set(KEYS)
    if as_numpy:  # as Flower's context.state / a checkpoint would hold it
        sd = {k: v.numpy() for k, v in sd.items()}
    saved = {k: (v.clone() if isinstance(v, torch.Tensor) else v.copy()) for k, v in sd.items()}
    resumed = ErrorFeedbackMemory(2, 30)
    resumed.load_state_dict(sd)
    for k in KEYS:
        assert same(getattr(resumed, k), getattr(mem, k)), k
        assert getattr(resumed, k).dtype == getattr(mem, k).dtype
    a = run(mem, name, grads[3:], gens[3:], start=3)
    b = run(resumed, name, grads[3:], gens[3:], start=3)
    for ra, rb in zip(a, b):
        for (ia, va), (ib, vb) in zip(ra, rb):
            assert torch.equal(ia, ib) and torch.equal(va, vb)
    for k in KEYS:
        assert same(getattr(resumed, k), getattr(mem, k)), k
    # the saved dict is a copy: neither memory's later rounds changed it
    for k in KEYS:
        assert np.array_equal(np.asarray(saved[k]), np.asarray(sd[k]), equal_nan=k == "fb_g")


def test_state_dict_is_a_copy():
    mem, _ = first_round()
    sd = mem.state_dict()
    sparsify(mem, T([1.0, 1, 1, 1], [1, 1, 1, 1]), TopK(0.5), [0.5, 0.5], round=1)
    assert sd["eps"].tolist() == [[1.0, 0.0, 0.0, 0.5], [0.0, 0.25, 0.0, 1.0]]
    assert sd["prev_local"].tolist() == [1, 2, 0, 2]


def test_state_dict_round_trip_after_partial_participation():
    mem, _ = first_round()
    sparsify(mem, T([1.0, 2.0, 3.0, 4.0]), SPARSIFIERS["gaussiank"](0.5), [1.0], rows=[1])
    resumed = ErrorFeedbackMemory(2, 4)
    resumed.load_state_dict(mem.state_dict())
    for r in (0, 1):
        assert_row_state(row_state(resumed, r), row_state(mem, r))


def test_dense_commit_builds_no_index_tensor():
    """A dense upload is a copy of a plus a zeroed residual; the J-sized
    indices and the NaN feedback are only built when something reads them."""
    from regtopk_fl.compress import Dense
    from regtopk_fl.memory import restore_rows

    mem = ErrorFeedbackMemory(2, 3)
    g = T([0.5, -3.0, 2.0], [1.0, 0.0, -1.0])
    ups = sparsify(mem, g, Dense(), [0.5, 0.5])
    assert [u.indices for u in ups] == [None, None]
    assert torch.equal(torch.cat([u.values for u in ups]), g.reshape(-1))
    assert torch.equal(mem.eps, torch.zeros(2, 3))
    assert mem._prev_local is None and mem._fb_g is None  # nothing J-sized built
    # read on demand: every entry of every row, feedback unknown
    assert mem.prev_local.tolist() == [0, 1, 2, 0, 1, 2]
    assert mem.prev_counts.tolist() == [3, 3] and bool(torch.isnan(mem.fb_g).all())
    # a rejected dense upload goes back into the residual
    restore_rows(mem, [1])
    assert torch.equal(mem.eps, T([0, 0, 0], [1.0, 0.0, -1.0]))
    # the state round-trips
    other = ErrorFeedbackMemory(2, 3)
    other.load_state_dict(mem.state_dict())
    assert all(same(getattr(other, key), getattr(mem, key)) for key in KEYS)


def test_a_lazy_state_after_a_dense_upload_round_trips_and_restores_alike():
    """state_dict(lazy=True) leaves a dense upload's mask (J int64 entries) and
    its unknown feedback out; loading it back gives the same memory, and a
    rejected upload goes back into the residual as from the full state."""
    from regtopk_fl.compress import Dense
    from regtopk_fl.compress.base import SparsifierError
    from regtopk_fl.fedround import sparsify
    from regtopk_fl.memory import ErrorFeedbackMemory, restore_rows

    mem = ErrorFeedbackMemory(1, 50)
    sparsify(mem, torch.randn(1, 50, generator=torch.Generator().manual_seed(1)), Dense(), [1.0])
    lazy, full = mem.state_dict(lazy=True), mem.state_dict()
    assert set(full) - set(lazy) == {"prev_local", "fb_g"}
    a, b = ErrorFeedbackMemory(1, 50), ErrorFeedbackMemory(1, 50)
    a.load_state_dict(lazy)
    b.load_state_dict(full)
    assert a._prev_local is None and torch.equal(a.prev_local, b.prev_local)
    assert bool(torch.isnan(a.fb_g).all()) and bool(torch.isnan(b.fb_g).all())  # unknown
    restore_rows(a, [0])
    restore_rows(b, [0])
    assert torch.equal(a.eps, b.eps) and bool(a.eps.any())
    # a sparse upload's values without their mask are refused, with the reason
    bad = dict(lazy, prev_sent=lazy["prev_sent"][:5])
    with pytest.raises(SparsifierError, match="without prev_local holds 5 sent values"):
        ErrorFeedbackMemory(1, 50).load_state_dict(bad)


@pytest.mark.parametrize("method", ["dense", "topk", "regtopk"])
def test_a_zero_residual_left_unstored_changes_no_bit(method):
    """A new memory, and one after a dense commit, keep a zero residual
    unallocated (issue #34: a dense round's one pass over J instead of five).
    Against the same memory made with an explicit zero residual: every
    upload, residual and state is bitwise the same over rounds of dense or
    sparse selections, signed zeros included (0 + -0.0 is +0.0 both ways),
    with a rejected upload restored midway; a dense upload made from a zero
    residual is the new ``a`` itself, not a copy, and leaves the residual
    zero and unallocated."""
    from regtopk_fl.compress import Dense
    from regtopk_fl.memory import restore_rows

    sp = Dense() if method == "dense" else SPARSIFIERS[method](sparsity=0.3)
    gen = torch.Generator().manual_seed(5)
    rows, dim = 3, 40
    lazy = ErrorFeedbackMemory(rows, dim)
    eager = ErrorFeedbackMemory(rows, dim, eps=torch.zeros(rows, dim))
    assert lazy._eps is None and eager._eps is not None
    for t in range(1, 6):
        g = torch.randn(rows, dim, generator=gen)
        g[:, :3] = torch.tensor([-0.0, 0.0, -1e-42])
        out = [sparsify(m, g.clone(), sp, [0.2, 0.3, 0.5], round=t) for m in (lazy, eager)]
        for u, v in zip(*out):
            assert torch.equal(u.values, v.values) and torch.equal(
                torch.signbit(u.values), torch.signbit(v.values))
            assert (u.indices is None) == (v.indices is None)
            assert u.indices is None or torch.equal(u.indices, v.indices)
        if method == "dense" and t <= 3:  # sent as made, the residual zero and unallocated
            assert lazy._eps is None
            assert out[0][0].values.untyped_storage().data_ptr() == \
                out[0][1].values.untyped_storage().data_ptr()
        eps = torch.zeros(rows, dim) if lazy._eps is None else lazy._eps  # read, not built
        assert same(eps, eager.eps) and torch.equal(torch.signbit(eps), torch.signbit(eager.eps))
        for key in KEYS[1:]:
            assert same(getattr(lazy, key), getattr(eager, key)), (t, key)
        if t == 3:  # the server refused row 1's upload: back into the residual
            restore_rows(lazy, [1])
            restore_rows(eager, [1])
    # accumulate alone still leaves a = eps + g as the residual
    m = ErrorFeedbackMemory(1, 4)
    a = m.accumulate(T([1.0, -0.0, 2.0, 3.0]))
    assert a is m.eps and torch.equal(m.eps, T([1.0, 0.0, 2.0, 3.0]))
    assert not bool(torch.signbit(m.eps).any())


def test_sampled_dense_rounds_reuse_one_batch_and_leave_no_residual():
    """Under client sampling, a dense round's clients hold no residual, so
    their batch memory starts unallocated and its [R, J] ``a`` comes from
    ClientStates' pool: round after round the same buffer once nothing holds
    the last round's uploads, and the stored states are markers (no eps)
    plus a copy of what each client sent."""
    from regtopk_fl.client_states import ClientStates
    from regtopk_fl.compress import Dense

    dim = 1 << 15  # x 3 rows: at least reuse.POOL_MIN entries
    cs, gen, ptrs = ClientStates(dim), torch.Generator().manual_seed(2), []
    for t in range(1, 5):
        workers = [(t + i) % 5 for i in range(3)]
        mem = cs.gather(workers, [None] * 3, context=False)
        assert mem._eps is None
        g = torch.randn(3, dim, generator=gen)
        ups = sparsify(mem, g, Dense(), [1 / 3] * 3)
        ptrs.append(ups[0].values.untyped_storage().data_ptr())
        assert torch.equal(torch.cat([u.values for u in ups]), g.reshape(-1))
        cs.scatter(workers, mem, t)
        for n, u in zip(workers, ups):
            st = cs.states[n]
            assert st["eps"] is None and torch.equal(st["prev_sent"][0] if st["prev_sent"].dim() > 1
                                                     else st["prev_sent"], u.values)
            assert st["prev_sent"].untyped_storage().data_ptr() != ptrs[-1]  # a copy
        del mem, ups, u  # nothing holds this round's batch now
    assert len(set(ptrs)) == 1
