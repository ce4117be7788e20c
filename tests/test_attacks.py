"""faults.hostile's upload and Byzantine attacks (regtopk_fl/hostile.py), the
upload budget they test (trust.py, compress/gaussiank.py's cap) and the same
attacks in both runtimes (the Flower side: clients/hostile.py and
strategies/hostile_grid.py)."""
import pytest
import torch

from regtopk_fl import fedround, hostile
from regtopk_fl.compress import GaussianK, RegTopKGaussianK
from regtopk_fl.compress.gaussiank import AbsScore, cap_rows, refine_select
from regtopk_fl.fedround import Reply
from regtopk_fl.payload import Upload
from regtopk_fl.runner import run_experiment


def _reply(worker, values, indices, dim=10):
    v = torch.tensor(values, dtype=torch.float64)
    return Reply(worker, Upload(v, None if indices is None else torch.tensor(indices), dim), 7)


# -- upload attacks -----------------------------------------------------------------------
def test_upload_attacks_change_only_what_travels():
    honest = _reply(2, [3.0, -4.0], [1, 5])
    before = honest.upload.values.clone()
    nan = hostile.tamper_upload("nan", honest)
    assert torch.isnan(nan.upload.values[0]) and nan.upload.values[1] == -4.0
    assert torch.isinf(hostile.tamper_upload("inf", honest).upload.values[0])
    assert hostile.tamper_upload("huge_norm", honest).upload.values.tolist() == [3.0 * 1e30,
                                                                             -4.0 * 1e30]
    assert hostile.tamper_upload("inflate_examples", honest).num_examples == 10**12
    dense = hostile.tamper_upload("dense_all", honest).upload
    assert dense.indices is None and dense.values.tolist() == [0, 3, 0, 0, 0, -4, 0, 0, 0, 0]
    coded = hostile.tamper_upload("coded_all", honest).upload
    assert coded.indices.tolist() == list(range(10)) and torch.equal(coded.values, dense.values)
    over = hostile.tamper_upload("over_budget", honest, budget=4).upload
    assert over.indices.tolist() == [0, 1, 2, 3, 5] and over.values.tolist() == [0, 3, 0, 0, -4]
    assert torch.equal(honest.upload.values, before)  # the honest reply is untouched
    with pytest.raises(ValueError, match="sparse method"):
        hostile.tamper_upload("over_budget", _reply(0, [1.0] * 10, None), budget=None)


# -- Byzantine attacks ----------------------------------------------------------------------
def test_byzantine_attacks_at_the_rounds_median():
    own = _reply(1, [3.0, 4.0], [0, 1])  # norm 5
    others = [_reply(0, [6.0, 8.0], [2, 3]), _reply(2, [0.0, 2.0], [4, 5]),
              _reply(3, [1.0, 0.0], [6, 7])]  # norms 10, 2, 1: lower median of 5,10,2,1 is 2
    flip = hostile.byzantine("sign_flip", own, others, 15.0, 0, 3, 4).upload
    assert flip.indices.tolist() == [0, 1]
    assert flip.values.tolist() == pytest.approx([-3.0 * 6, -4.0 * 6])  # norm 15 x 2
    copy = hostile.byzantine("scaled_copy", own, others, 15.0, 0, 3, 4).upload
    assert copy.indices.tolist() == [4, 5] and copy.values.tolist() == [0.0, 30.0]  # worker 2
    rnd = hostile.byzantine("random_direction", own, others, 15.0, 0, 3, 4).upload
    assert rnd.indices.tolist() == [0, 1] and float(rnd.values.norm()) == pytest.approx(2.0)
    again = hostile.byzantine("random_direction", own, others, 15.0, 0, 3, 4).upload
    other_round = hostile.byzantine("random_direction", own, others, 15.0, 0, 4, 4).upload
    assert torch.equal(rnd.values, again.values)  # seeded by (seed, worker, round)
    assert not torch.equal(rnd.values, other_round.values)
    assert hostile.byzantine("sign_flip", own, [], 15.0, 0, 3, 4) is own  # alone: honest


def test_the_in_process_round_tampers_only_the_hostile_worker():
    cfg = {"hostile": {"worker": 1, "attacks": "3:sign_flip 4:nan", "scale": 2.0}}
    replies = [_reply(0, [1.0], [0]), _reply(1, [3.0, 4.0], [0, 1]), _reply(2, [2.0], [2])]
    same = hostile.tamper_round(cfg, 0, 2, replies)
    assert all(a is b for a, b in zip(same, replies))
    out = hostile.tamper_round(cfg, 0, 3, replies)
    assert out[0] is replies[0] and out[2] is replies[2]
    assert out[1].upload.values.tolist() == pytest.approx([-3.0 * 0.8, -4.0 * 0.8])  # 2 x 2


# -- Gaussian-k's budget -------------------------------------------------------------------
def test_gaussiank_caps_its_count_at_the_budget_and_only_then():
    gen = torch.Generator().manual_seed(0)
    flat = torch.rand(2, 4000, generator=gen, dtype=torch.float64)  # uniform: the bad case
    uncapped = refine_select(flat, 0.001, AbsScore(flat))  # k = 4
    assert int(uncapped.counts.max()) > 128 * 4  # the refinement misses k by far
    for sp in (GaussianK(0.001), RegTopKGaussianK(0.001)):
        sel = sp.select(flat, _ctx(2))
        assert sel.counts.tolist() == [sp.budget(4000)] * 2 == [512, 512]
        for row, (start, stop) in enumerate(sel.row_slices()):  # the highest scores
            want = torch.topk(flat[row], 512).indices.sort().values + row * 4000
            assert torch.equal(sel.flat_idx[start:stop], want)
    normal = torch.randn(2, 4000, generator=gen, dtype=torch.float64)  # honest: unchanged
    honest = refine_select(normal, 0.01, AbsScore(normal))
    assert int(honest.counts.max()) <= GaussianK(0.01).budget(4000)
    got = GaussianK(0.01).select(normal, _ctx(2))
    assert torch.equal(got.flat_idx, honest.flat_idx) and torch.equal(got.counts, honest.counts)
    sel = refine_select(flat, 0.001, AbsScore(flat))
    assert cap_rows(sel, AbsScore(flat), 10**6) is sel


def _ctx(n):
    from regtopk_fl.memory import ErrorFeedbackMemory
    return ErrorFeedbackMemory(n, 4000, torch.float64).context([1.0 / n] * n)


# -- both runtimes ---------------------------------------------------------------------------
BASE = ["task=linreg", "task.dim=40", "num_workers=4", "sparsifier=topk", "sparsifier.sparsity=0.25",
        "threads=1", "checkpoint.every=0", "faults.hostile.worker=3"]


@pytest.fixture
def outcomes(monkeypatch):
    got = []
    collect = fedround.Coordinator.collect

    def recording(self, replies, rejected=None):
        out = collect(self, replies, rejected)
        got.append(out)
        return out

    monkeypatch.setattr(fedround.Coordinator, "collect", recording)
    return got


def test_over_budget_uploads_are_refused_in_process(make_cfg, tmp_path, outcomes):
    """k = 10 of J = 40: k + 1 entries, all 40 dense, all 40 coded are refused
    with their reason, and only the honest workers' entries count as sent."""
    import csv

    s = run_experiment(make_cfg([*BASE, "rounds=5", "runtime=inprocess",
                                 "faults.hostile.attacks=2:over_budget 3:dense_all 4:coded_all"]),
                       tmp_path / "run")
    assert s["status"] == "finished"
    want = {2: "a sparse upload of 11 entries", 3: "a dense upload of 40 entries",
            4: "a sparse upload of 40 entries"}
    for t, out in enumerate(outcomes, 1):
        if t in want:
            assert list(out.rejected) == [3] and out.rejected[3].startswith(want[t])
            assert out.rejected[3].endswith("over the budget of 10 (k of topk at sparsity "
                                            "0.25, J=40)")
        else:
            assert out.rejected == {} and out.accepted == [0, 1, 2, 3]
    with open(tmp_path / "run" / "metrics.csv") as fh:
        sent = [int(r["sent"]) for r in csv.DictReader(fh)]
    assert sent == [0, 40, 30, 30, 30, 40]


def _budgeted():
    from regtopk_fl.compress import SPARSIFIERS

    return [n for n, c in SPARSIFIERS.items() if c.has_budget and not c.needs_all_workers]


@pytest.mark.parametrize("name", _budgeted())
def test_every_sparsifier_with_a_budget_refuses_uploads_over_it(make_cfg, tmp_path, outcomes,
                                                                 name):
    """For every method of conf/sparsifier/ with an upload budget (the
    registry: a new one is covered as it is added), the server refuses one
    entry more than its budget, all J dense and all J coded, naming the
    budget and where it comes from. J = 300 and k = 2 keep each budget
    (Gaussian-k's and trimmed top-k's caps are 128 k) below J."""
    from regtopk_fl.compress import SPARSIFIERS

    dim, s = 300, 0.005  # k = round(1.5) = 2
    cfg = make_cfg(["task=linreg", f"task.dim={dim}", "num_workers=4", f"sparsifier={name}",
                    f"sparsifier.sparsity={s}", "threads=1", "checkpoint.every=0",
                    "rounds=4", "runtime=inprocess", "faults.hostile.worker=3",
                    "faults.hostile.attacks=2:over_budget 3:dense_all 4:coded_all"])
    sp = SPARSIFIERS[name](s)
    budget, note = sp.budget(dim), sp.budget_note(dim)
    assert budget < dim
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["status"] == "finished"
    want = {2: f"a sparse upload of {budget + 1} entries", 3: f"a dense upload of {dim} entries",
            4: f"a sparse upload of {dim} entries"}
    for t, out in enumerate(outcomes, 1):
        if t in want:
            assert list(out.rejected) == [3], (name, t)
            assert out.rejected[3] == f"{want[t]} is over the budget of {budget} ({note})"
        else:
            assert out.rejected == {} and out.accepted == [0, 1, 2, 3], (name, t)


@pytest.mark.flower
@pytest.mark.slow
def test_byzantine_attacks_are_the_same_in_both_runtimes(make_cfg, tmp_path, outcomes):
    """sign_flip, scaled_copy and random_direction pass every check and are
    averaged in: under Flower the Grid wrapper makes them, in-process the
    engine; the models agree within 1e-6, and differ from the honest run."""
    spec = "faults.hostile.attacks=2:sign_flip 3:scaled_copy 4:random_direction"
    runs = {}
    for runtime in ("flower", "inprocess"):
        outcomes.clear()
        s = run_experiment(make_cfg([*BASE, "rounds=5", f"runtime={runtime}", spec]),
                           tmp_path / runtime)
        assert s["status"] == "finished"
        assert all(o.rejected == {} and o.accepted == [0, 1, 2, 3] for o in outcomes)
        runs[runtime] = torch.load(tmp_path / runtime / "model.pt", weights_only=False)["params"]
    honest = run_experiment(make_cfg([*BASE, "rounds=5", "runtime=inprocess"]), tmp_path / "h")
    h = torch.load(tmp_path / "h" / "model.pt", weights_only=False)["params"]
    a, b = runs["flower"], runs["inprocess"]
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6
    assert honest["status"] == "finished" and float((a - h).abs().max() / h.abs().max()) > 1e-3
