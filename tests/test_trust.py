"""The server's trust checks without a framework: weights from its own
counts (or capped reported ones), the norm guard, robust aggregation, the
node <-> partition binding, and the hostile-worker schedule."""
import pytest
import torch

from regtopk_fl import hostile
from regtopk_fl.aggregate import Median, TrimmedMean
from regtopk_fl.compress import RegTopK
from regtopk_fl.fedround import Coordinator, FedServer, Reply, apply_feedback, worker_round
from regtopk_fl.memory import ErrorFeedbackMemory
from regtopk_fl.payload import Upload
from regtopk_fl.tasks.linreg import LinRegTask
from regtopk_fl.trust import (Guard, TrustPolicy, capped_shares, l2_norms, lower_median,
                              upload_norm)
from strategies.identity import NodeBinding, load_node_keys, screen_claims


def _reply(worker, values, indices=None, n_ex=10, dim=6):
    v = torch.tensor(values, dtype=torch.float64)
    i = None if indices is None else torch.tensor(indices)
    return Reply(worker, Upload(v, i, dim), n_ex)


def _server(policy=None, sizes=(10, 10, 10, 10), dim=6, rule=None, budget=None):
    s = FedServer(torch.zeros(dim, dtype=torch.float64), lr=1.0)
    s.trust = Guard(policy or TrustPolicy(), sizes, budget)
    if rule is not None:
        s.aggregate = rule
    return s


# -- norm guard -----------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[60] * 20, [3, 60, 0, 7], [1], [], [0, 0]])
def test_norms_of_the_round_in_one_reduction(sizes):
    """The guard's norms, one stacked reduction for equally long uploads: the
    same numbers as upload_norm's one by one (bitwise on this suite's CPUs;
    asserted to 1e-15, as a batched against a per-upload path)."""
    gen = torch.Generator().manual_seed(len(sizes))
    replies = [_reply(i, (torch.randn(m, generator=gen, dtype=torch.float64)
                          * 10.0 ** torch.randint(-8, 8, (m,), generator=gen)).tolist(),
                      list(range(m)), dim=max(m, 1)) for i, m in enumerate(sizes)]
    got = l2_norms([r.upload.values for r in replies])
    want = [upload_norm(r) for r in replies]
    assert len(got) == len(want) and all(isinstance(x, float) for x in got)
    assert all(abs(a - b) <= 1e-15 * b for a, b in zip(got, want))
    bufs = [torch.randn(2, 3, generator=gen) for _ in range(4)]  # buffers of any shape
    assert all(abs(a - float(torch.linalg.vector_norm(b.double()))) <= 1e-12
               for a, b in zip(l2_norms(bufs), bufs))


def test_huge_upload_is_rejected_and_the_rest_aggregated():
    s = _server()
    out = s.step([_reply(0, [1.0, 2.0], [0, 1]), _reply(1, [1.0, 1.0], [0, 2]),
                  _reply(2, [2.0, 1.0], [1, 3]), _reply(3, [1e30, 1.0], [2, 4])])
    assert list(out.rejected) == [3] and "server.max_norm_ratio" in out.rejected[3]
    assert out.accepted == [0, 1, 2]
    assert torch.isfinite(s.params).all() and float(s.params.abs().max()) < 10


def test_two_workers_lower_median_catches_the_larger():
    """The plain median of two norms is their mean, which neither exceeds 2x:
    the guard uses the lower median, so a 1e30 upload of one of two is caught."""
    assert lower_median([1.0, 1e30]) == 1.0
    s = _server(sizes=(10, 10))
    out = s.step([_reply(0, [1.0, 1.0], [0, 1]), _reply(1, [1e30, 1.0], [0, 1])])
    assert list(out.rejected) == [1]
    ok = _server(sizes=(10, 10)).step([_reply(0, [1.0, 1.0], [0, 1]),
                                       _reply(1, [15.0, 1.0], [0, 1])])  # within 20x
    assert ok.rejected == {}


def test_huge_buffers_are_rejected():
    s = FedServer(torch.zeros(6, dtype=torch.float64), torch.ones(3, dtype=torch.float64), lr=1.0)
    s.trust = Guard(TrustPolicy(), (10, 10, 10))
    rs = [_reply(n, [1.0], [n]) for n in range(3)]
    for n, r in enumerate(rs):
        r.buffers = torch.tensor([1.0, 2.0, 3.0 + n], dtype=torch.float64)
    rs[2].buffers = rs[2].buffers * 1e30
    out = s.step(rs)
    assert list(out.rejected) == [2] and "buffers norm" in out.rejected[2]
    assert float(s.buffers.abs().max()) < 10


def test_ratio_off_absolute_cap_and_zero_median():
    off = _server(TrustPolicy(max_norm_ratio=None))
    assert off.step([_reply(0, [1.0], [0]), _reply(1, [1e30], [1])]).rejected == {}
    cap = _server(TrustPolicy(max_norm_ratio=None, max_upload_norm=5.0))
    out = cap.step([_reply(0, [3.0, 4.0], [0, 1]), _reply(1, [3.0, 4.1], [0, 1])])
    assert list(out.rejected) == [1] and "server.max_upload_norm=5" in out.rejected[1]
    zero = _server()  # half the uploads are all-zero: no ratio is applied
    assert zero.step([_reply(0, [0.0], [0]), _reply(1, [5.0], [1])]).rejected == {}


def test_guard_changes_nothing_when_nothing_is_rejected():
    """Bitwise the unguarded server's arithmetic (the recorded presets rely on it)."""
    replies = [_reply(n, [0.1 * (n + 1), -0.3, 0.7], [n, n + 1, 5], n_ex=10 + n) for n in range(4)]
    plain = FedServer(torch.zeros(6, dtype=torch.float64), lr=1.0)
    guarded = _server(sizes=(10, 11, 12, 13))
    a, b = plain.step(replies), guarded.step(replies)
    assert torch.equal(a.grad, b.grad) and a.weights == b.weights
    assert 0 < guarded.trust.max_ratio < 2


# -- weights ----------------------------------------------------------------------
def test_claimed_num_examples_must_match_the_servers_partition():
    s = _server(sizes=(10, 30))
    out = s.step([_reply(0, [1.0], [0], n_ex=10), _reply(1, [1.0], [1], n_ex=10**12)])
    assert list(out.rejected) == [1] and "claims num_examples=1000000000000" in out.rejected[1]
    out = _server(sizes=(10, 30)).step([_reply(0, [1.0], [0], 10), _reply(1, [1.0], [1], 30)])
    assert out.weights == {0: 0.25, 1: 0.75}


def test_trusted_counts_are_capped():
    assert capped_shares([1, 1, 1, 10**12], 0.5) == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0.5])
    assert capped_shares([1, 2, 3], 0.9) == [1 / 6, 2 / 6, 3 / 6]  # no cap binds: unchanged
    assert capped_shares([5, 5], 0.4) == [0.5, 0.5]  # cap * n < 1: equal shares
    s = _server(TrustPolicy(trust_num_examples=True, max_weight_share=0.5), sizes=(10, 10, 10))
    out = s.step([_reply(0, [1.0], [0], 10), _reply(1, [1.0], [1], 10),
                  _reply(2, [1.0], [2], 10**12)])
    assert out.rejected == {} and out.weights[2] == 0.5 and out.weights[0] == pytest.approx(0.25)


# -- robust aggregation -------------------------------------------------------------
def test_coordinate_median_on_the_union_support():
    s = _server(sizes=(1, 1, 1), rule=Median())
    out = s.step([_reply(0, [1.0, 2.0], [0, 1], 1), _reply(1, [3.0, 30.0], [0, 1], 1),
                  _reply(2, [5.0], [0], 1)])
    # x_n = R w_n g_n = g_n (equal weights); worker 2 did not send entry 1 -> 0 there
    assert out.grad[:3].tolist() == [3.0, 2.0, 0.0]
    assert out.feedback[1].tolist() == [3.0, 2.0]  # feedback = the applied g on its entries
    trimmed = _server(sizes=(1, 1, 1), rule=TrimmedMean(trim_fraction=0.34))
    assert trimmed.step([_reply(0, [1.0], [0], 1), _reply(1, [3.0], [0], 1),
                         _reply(2, [50.0], [0], 1)]).grad[0] == 3.0  # 17x: not the guard


def test_regtopk_feedback_uses_the_applied_median():
    task = LinRegTask(num_workers=3, dim=10, samples_per_worker=20)
    mem = ErrorFeedbackMemory(3, 10, torch.float64)
    coord = Coordinator(FedServer(task.init_params(), lr=0.01))
    coord.server.trust = Guard(TrustPolicy(), task.num_examples())
    coord.server.aggregate = Median()
    reps = worker_round(task, mem, RegTopK(0.3, mu=1), coord.server.params, None,
                        [None] * 3, [0, 1, 2], 1)
    out = coord.collect(reps)
    apply_feedback(mem, coord.feedback_for([0, 1, 2]))
    for n, r in enumerate(reps):
        assert torch.equal(coord.pending[n].values, out.grad[r.upload.indices])


# -- identity ------------------------------------------------------------------------
def test_binding_first_contact_then_every_claim_checked():
    b = NodeBinding(4)
    assert b.resolve([(10, 0), (11, 1), (13, 3)]) == {10: None, 11: None, 13: None}
    got = b.resolve([(10, 0), (11, 1), (13, 0), (12, 99), (14, 1)])
    assert got[10] is None and got[11] is None
    assert "node 13 is bound to partition 3" in got[13]  # impersonation by a bound node
    assert "outside 0..3" in got[12]
    assert "which node 11 holds" in got[14]  # a new node claiming a held partition
    assert b.partition_of(12) is None and b.partition_of(14) is None
    twin = NodeBinding(4)  # two strangers claiming one partition in one round: neither
    got = twin.resolve([(1, 2), (2, 2), (3, 1)])
    assert got[3] is None and "as do nodes [2]" in got[1] and "as do nodes [1]" in got[2]
    assert twin.partition_of(1) is None and twin.partition_of(2) is None


def test_rejected_claim_counts_against_the_nodes_own_partition():
    b = NodeBinding(3)
    b.resolve([(7, 0), (8, 1)])
    r0, r1 = _reply(0, [1.0], [0]), _reply(0, [9.0], [0])  # node 8 claims worker 0
    good, rejected, unbound = screen_claims(b, [(7, 0, r0), (8, 0, r1), (9, 1, r1)], 5)
    assert good == [r0] and list(rejected) == [1] and unbound == 1


def test_binding_survives_a_checkpoint_and_resets_when_every_node_is_new():
    b = NodeBinding(2)
    b.resolve([(5, 0), (6, 1)])
    c = NodeBinding(2)
    c.load_state_dict(b.state_dict())
    c.forget_unless_connected([6, 42])  # one known node is back: keep
    assert c.node_partition == {5: 0, 6: 1}
    c.forget_unless_connected([41, 42])  # all new (a new simulation): start over
    assert c.node_partition == {}


def _ssh_pub():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    ssh = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return ssh.decode(), pem


def test_partitions_pinned_to_node_keys(tmp_path):
    """NodeInfo.public_key is PEM (what `flwr supernode register` stores);
    the operator's file lists the OpenSSH text or a .pub path per partition."""
    from types import SimpleNamespace

    (k0, pem0), (k1, pem1), (_, pem_other) = _ssh_pub(), _ssh_pub(), _ssh_pub()
    (tmp_path / "node1.pub").write_text(k1 + " worker1\n")
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# partition key\n0 {k0} worker0\n1 node1.pub\n")
    pins = load_node_keys(keys, 2)
    assert pins == {pem0: 0, pem1: 1}
    b = NodeBinding(2, pins)
    b.pin([SimpleNamespace(node_id=100, public_key=pem1),
           SimpleNamespace(node_id=101, public_key=pem_other)])
    got = b.resolve([(100, 1), (101, 0), (102, 0)])
    assert got[100] is None
    assert "pinned to no partition" in got[101] and "pinned to no partition" in got[102]
    assert "claims partition 0, but node 100" in b.resolve([(100, 0)])[100]
    keys.write_text(f"0 {k0}\n5 {k1}\n")
    with pytest.raises(ValueError, match="partition 5 outside 0..1"):
        load_node_keys(keys, 2)


# -- hostile schedule ------------------------------------------------------------------
def test_hostile_spec():
    assert hostile.parse("3:nan 4-5:absent,7:impersonate") == {
        3: "nan", 4: "absent", 5: "absent", 7: "impersonate"}
    for bad, msg in (("3:fly", "unknown attack"), ("x", "ROUND:ATTACK"), ("2:nan 2:inf", "two"),
                     ("5-3:nan", "1 <= A <= B")):
        with pytest.raises(ValueError, match=msg):
            hostile.parse(bad)
    cfg = {"hostile": {"worker": 2, "attacks": "3:nan 4:absent"}}
    assert hostile.attack(cfg, 2, 3) == "nan" and hostile.attack(cfg, 1, 3) is None
    assert hostile.absent(cfg, 2, 4) and not hostile.absent(cfg, 2, 3)
    from regtopk_fl import faults
    assert faults.drops(cfg, 0, 2, 4) and not faults.drops(cfg, 0, 2, 5)


def test_squatter_first_takes_the_partition_and_is_counted(caplog):
    """Trust on first use (no server.node_keys): a squatter that claims
    partition 0 before its rightful node holds it; the rightful node is then
    refused, and every such claim is logged and counted."""
    import logging

    caplog.set_level(logging.WARNING, logger="strategies.identity")
    b = NodeBinding(3)
    assert b.resolve([(99, 0)]) == {99: None}  # the squatter comes first: bound
    got = b.resolve([(10, 0), (11, 1)])  # the rightful node of 0, and node 11
    assert "claims partition 0, which node 99 holds" in got[10] and got[11] is None
    assert b.partition_of(99) == 0 and b.partition_of(10) is None and b.conflicts == 1
    assert "node 10 claims partition 0, which node 99 holds (bound at first contact: " \
           "trust on first use)" in caplog.text.replace("contact (", "contact: ")
    # its train replies are refused too (counted as from a node bound to nothing)
    good, rejected, unbound = screen_claims(b, [(10, 0, _reply(0, [1.0], [0])),
                                                (99, 0, _reply(0, [2.0], [0]))], 4)
    assert [r.upload.values.tolist() for r in good] == [[2.0]] and unbound == 1
    assert b.conflicts == 2
    b.resolve([(11, 0)])  # a bound node claiming another's partition: counted as well
    assert b.conflicts == 3
    assert NodeBinding(2).conflicts == 0


def test_deployment_warns_once_without_node_keys(make_cfg, tmp_path, monkeypatch, caplog):
    import logging

    from flwr.app import Context, RecordDict

    from regtopk_fl import runner
    from regtopk_fl.settings import to_run_config
    from strategies import identity, server_app

    caplog.set_level(logging.WARNING, logger="strategies.identity")
    assert identity.warn_without_keys(make_cfg([])) is True
    lines = [r for r in caplog.records if "server.node_keys is not set" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage()
    assert "trust on first use" in lines[0].getMessage()
    keys = tmp_path / "keys.txt"
    keys.write_text(f"0 {_ssh_pub()[0]}\n")
    assert identity.warn_without_keys(make_cfg([f"server.node_keys={keys}"])) is False

    calls = []  # flwr_main (the Deployment Runtime's entry point) says it at start
    monkeypatch.setattr(server_app, "warn_without_keys", lambda cfg: calls.append(cfg))
    monkeypatch.setattr(runner, "run_experiment", lambda *a, **k: None)
    run_config = {**to_run_config(make_cfg(["runtime=flower"])), "output_dir": str(tmp_path)}
    server_app.flwr_main(None, Context(run_id=5, node_id=0, node_config={}, state=RecordDict(),
                                       run_config=run_config))
    assert len(calls) == 1


# -- upload budget ----------------------------------------------------------------------
def test_uploads_over_budget_are_refused_and_dense_runs_are_exempt():
    s = _server(budget=2)
    out = s.step([_reply(0, [1.0, 2.0], [0, 1]), _reply(1, [1.0, 1.0, 1.0], [0, 2, 3]),
                  _reply(2, [1.0] * 6), _reply(3, [2.0], [4])])
    assert out.accepted == [0, 3] and out.sent == 3
    assert out.rejected[1] == "a sparse upload of 3 entries is over the budget of 2"
    assert out.rejected[2] == "a dense upload of 6 entries is over the budget of 2"
    dense = _server(budget=None).step([_reply(n, [1.0] * 6) for n in range(4)])
    assert dense.rejected == {} and dense.sent == 24


def test_the_budget_comes_from_the_runs_own_sparsifier(make_cfg):
    from regtopk_fl.runner import build
    from regtopk_fl.trust import budget_of

    for over, want in ((["sparsifier=topk", "sparsifier.sparsity=0.5"], 50),
                       (["sparsifier=regtopk", "sparsifier.sparsity=0.125"], 13),
                       (["sparsifier=randomk", "sparsifier.sparsity=0.3"], 30),
                       (["sparsifier=global_topk", "sparsifier.sparsity=0.01"], 1),
                       (["sparsifier=gaussiank", "sparsifier.sparsity=0.05"], 100),
                       (["sparsifier=gaussiank", "sparsifier.sparsity=0.1",
                         "sparsifier.budget_factor=2.5"], 25),
                       (["sparsifier=dense"], None)):
        task, sp = build(make_cfg(["task=linreg", *over]))  # J = 100
        budget, note = budget_of(sp, task.dim)
        assert budget == want, over
        assert (note == "") == (want is None)


# -- deferred allowance (no lockout) ------------------------------------------------------------
def test_refused_rounds_defer_their_allowance():
    """Worker 3 refused twice (NaN) at reference norm 1: 2 x 20 deferred; a
    comeback of norm 50 (50x the median) is accepted and spends 30 of it; a
    second one of 31 is refused (its bound is 20 + 10), a 1e30 one always."""
    s = _server(sizes=(10, 10, 10, 10))
    coord = Coordinator(s)
    honest = [_reply(n, [1.0], [n]) for n in range(3)]
    for _ in range(2):
        out = coord.collect([*honest, _reply(3, [float("nan")], [3])])
        assert list(out.rejected) == [3]
    assert s.trust.deferred == {3: 40.0}
    out = coord.collect([*honest, _reply(3, [50.0], [3])])
    assert out.accepted == [0, 1, 2, 3] and s.trust.deferred == {3: 10.0}
    assert s.trust.comebacks == [(3, 50.0, 50.0 / (1.0 + 40.0 / 20))]  # norm over its window
    out = coord.collect([*honest, _reply(3, [31.0], [3])])
    assert "+ deferred 10 from refused rounds" in out.rejected[3]
    assert s.trust.deferred == {3: 30.0}  # that refusal deferred one more round
    out = coord.collect([*honest, _reply(3, [1e30], [3])])
    assert list(out.rejected) == [3] and s.trust.deferred == {3: 50.0}
    out = coord.collect([*honest, _reply(3, [1.0], [3])])  # honest: spends nothing
    assert out.accepted == [0, 1, 2, 3] and s.trust.deferred == {3: 50.0}
    again = Coordinator(_server(sizes=(10, 10, 10, 10)))  # and it is in the checkpoint
    again.load_state_dict(coord.state_dict())
    assert again.server.trust.deferred == {3: 50.0}
