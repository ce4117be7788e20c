"""The sparse downlink (regtopk_fl/broadcast.py, protocol/wire.py): replicas
stay bitwise equal to the server's model, stale or wrong ones are resynced or
rejected, and what is counted is what travels."""
import numpy as np
import pytest
import torch

from regtopk_fl.broadcast import GlobalStep, Replica, model_digest
from regtopk_fl.fedround import Coordinator, FedServer, Reply
from regtopk_fl.payload import Upload, coded_index_bytes


def _random_upload(gen, dim, k, dtype=torch.float32):
    idx = torch.sort(torch.randperm(dim, generator=gen)[:k]).values
    return Upload(torch.randn(k, generator=gen, dtype=dtype), idx, dim)


def _wire(step):
    """The step through Flower's records and back, as a worker receives it."""
    from protocol import wire

    return wire.read_step(wire.step_records(step))


@pytest.mark.parametrize("dense", [False, True])
def test_replicas_track_the_server_bitwise_for_100_rounds(dense):
    """Momentum, weight decay, BatchNorm-like buffers, workers absent at
    random, rounds without any valid reply (no step): after every round each
    up-to-date replica equals the server's model bit for bit, having received
    only the coded sparse gradient (a resync brings the others back)."""
    gen = torch.Generator().manual_seed(0)
    dim, n, k = 300, 5, 12
    server = FedServer(torch.randn(dim, generator=gen), torch.randn(7, generator=gen),
                       lr=0.05, momentum=0.9, weight_decay=1e-3)
    coord = Coordinator(server, "gradient", verify=True)
    coord.start(range(n))
    replicas = {w: Replica(server.params, server.buffers, 0.05, 0.9, 1e-3) for w in range(n)}
    resyncs = 0
    for t in range(1, 101):
        plan = coord.plan(list(range(n)))
        step = _wire(coord.downlink.step)
        absent = set(torch.randperm(n, generator=gen)[:int(t % 3)].tolist())
        if t % 17 == 0:
            absent = set(range(n))  # nobody replies: the model must not move
        replies = []
        for w in range(n):
            if plan.kinds[w] == "full":
                resyncs += 1
                replicas[w] = Replica(server.params, server.buffers, 0.05, 0.9, 1e-3,
                                      coord.round, server.opt.state_dict())
            else:
                assert replicas[w].apply(step) is None, (t, w)
            assert torch.equal(replicas[w].params, server.params), (t, w)
            assert torch.equal(replicas[w].buffers, server.buffers)
            if w in absent:
                continue
            up = (Upload(torch.randn(dim, generator=gen), None, dim) if dense
                  else _random_upload(gen, dim, k))
            replies.append(Reply(w, up, 10 + w, 0.0, torch.randn(7, generator=gen),
                                 replica_round=replicas[w].round, digest=replicas[w].digest()))
        before = server.params.clone()
        out = coord.collect(replies)
        assert not out.rejected
        if not replies:
            assert torch.equal(server.params, before)
    assert resyncs > 0  # absent workers came back through a resync
    assert coord.round == 100


def test_step_on_reads_feedback_off_the_broadcast():
    """A worker's feedback (g on the entries it sent) read off the broadcast
    equals what the server computed for it, cancelled entries (g = 0) included."""
    dim = 50
    server = FedServer(torch.zeros(dim), lr=0.1)
    coord = Coordinator(server, "gradient")
    coord.start(range(2))
    a = Upload(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3, 10, 40]), dim)
    b = Upload(torch.tensor([-1.0, 5.0]), torch.tensor([3, 11]), dim)  # cancels entry 3
    coord.collect([Reply(0, a, 1), Reply(1, b, 1)])
    step = _wire(coord.downlink.step)
    assert step.indices.tolist() == [3, 10, 11, 40]
    for w, up in ((0, a), (1, b)):
        assert torch.equal(step.on(up.indices), coord.pending[w].values)
    assert step.on(torch.tensor([3]))[0] == 0.0
    with pytest.raises(ValueError):
        step.on(torch.tensor([4]))  # not in the support


def test_plan_kinds_and_bytes():
    """Round 1 is free (everyone builds model_0 from the seed); a worker that
    missed a round, or that nobody has heard of after round 0, gets the full
    model; the bytes are the coded support + values + header + digest."""
    dim = 1000
    server = FedServer(torch.zeros(dim), lr=0.1, momentum=0.5)
    coord = Coordinator(server, "gradient", verify=True)
    coord.start(range(3))
    p1 = coord.plan([0, 1, 2, None])
    assert p1.kind_list == ["delta"] * 4 and p1.resyncs == 0
    digest = coord.downlink.step.digest
    ups = [Upload(torch.ones(5), torch.arange(5) * (w + 1), dim) for w in range(2)]
    coord.collect([Reply(w, ups[w], 1, replica_round=0, digest=digest) for w in range(2)])
    p2 = coord.plan([0, 1, 2, None])
    # worker 2 did not reply, but model_0 + round 1's g is all it needs
    assert p2.kind_list == ["delta", "delta", "delta", "full"] and p2.resyncs == 1
    coord.collect([Reply(w, ups[w], 1, replica_round=1, digest=coord.downlink.step.digest)
                   for w in range(2)])
    assert coord.plan([0, 1, 2]).kind_list == ["delta", "delta", "full"]
    support = torch.tensor([0, 1, 2, 3, 4, 6, 8])
    delta = 16 + 16 + coded_index_bytes(support, dim) + 7 * 4 + 9  # + feedback status
    assert p2.coded[0] == delta
    assert p2.raw[0] == 16 + 16 + 7 * 4 + 7 * 4 + 9
    full = dim * 4 * 2 + 16 + 16  # params + momentum buffer
    assert p2.coded["node3"] == full
    model = Coordinator(server, "model")
    assert model.plan([0]).kind_list == ["model"] and model.plan([0]).raw[0] == dim * 4


def test_stale_or_wrong_replica_is_rejected_and_restored():
    """A reply computed on an old model, or on one whose digest differs, is
    never aggregated: it is rejected (the worker restores it into its
    residual) and the worker gets the full model next round."""
    dim = 40
    server = FedServer(torch.zeros(dim), lr=0.1)
    coord = Coordinator(server, "gradient", verify=True)
    coord.start(range(3))
    d0 = coord.downlink.step.digest
    up = lambda: Upload(torch.ones(2), torch.tensor([1, 2]), dim)  # noqa: E731
    coord.collect([Reply(w, up(), 1, replica_round=0, digest=d0) for w in range(3)])
    d1 = coord.downlink.step.digest
    out = coord.collect([Reply(0, up(), 1, replica_round=1, digest=d1),
                         Reply(1, up(), 1, replica_round=0, digest=d0),  # stale
                         Reply(2, up(), 1, replica_round=1, digest=b"x" * 16)])  # wrong
    assert out.accepted == [0] and sorted(out.rejected) == [1, 2]
    assert "stale" in out.rejected[1] and "digest" in out.rejected[2]
    assert coord.pending[1].rejected and coord.pending[2].rejected
    assert coord.plan([0, 1, 2]).kind_list == ["delta", "full", "full"]
    no_meta = coord.collect([Reply(0, up(), 1)])  # a Flower reply without replica-meta
    assert 0 in no_meta.rejected


def test_replica_refuses_what_it_cannot_apply():
    p = torch.arange(6, dtype=torch.float32)
    r = Replica(p, None, lr=1.0)
    step2 = GlobalStep(2, torch.ones(1), torch.tensor([0]), 6)
    assert "round 2" in r.apply(step2) and torch.equal(r.params, p)
    step1 = GlobalStep(1, torch.ones(1), torch.tensor([0]), 6, digest=b"0" * 16)
    assert "digest mismatch" in r.apply(step1)
    good = Replica(p, None, lr=1.0)
    ref = p.clone()
    ref[0] -= 1.0
    assert good.apply(GlobalStep(1, torch.ones(1), torch.tensor([0]), 6,
                                 digest=model_digest(ref))) is None
    assert torch.equal(good.params, ref)


def test_wire_indices_travel_coded():
    """The upload's and the broadcast's indices travel as exactly the counted
    coded bytes (uint8), and anything else in their place is refused."""
    from flwr.app import Array, ArrayRecord

    from protocol import wire

    dim = 10_000
    idx = torch.tensor([5, 6, 7, 900, 9999])
    rec = ArrayRecord({"indices": wire.coded(idx, dim)})
    arr = rec["indices"].numpy()
    assert arr.dtype == np.uint8 and arr.size == coded_index_bytes(idx, dim)
    assert torch.equal(wire.uncoded(rec, "indices", dim), idx)
    bad = ArrayRecord({"indices": Array(idx.numpy().astype(np.int32))})
    with pytest.raises(ValueError, match="coded"):
        wire.uncoded(bad, "indices", dim)


# -- catch-up patches (#16) --------------------------------------------------------
def _client_cfg(lr, momentum=0.0, weight_decay=0.0):
    from omegaconf import OmegaConf

    return OmegaConf.create({"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                             "runtime": {"state_dir": None}})


class _Seeded:
    """What a worker builds model_0 from (the task's seeded initial model)."""

    def __init__(self, params, buffers):
        self.params, self.buffers = params.clone(), None if buffers is None else buffers.clone()

    def init_params(self):
        return self.params.clone()

    def init_buffers(self):
        return None if self.buffers is None else self.buffers.clone()


def _deliver(coord, plan, workers, contexts, cfg, task, skip=()):
    """Each planned message through the wire and the ClientApp's own
    receive_model (clients/client_app.py), as a Flower worker gets it; returns
    the replicas, each checked bitwise against the server's model."""
    from flwr.app import Context, RecordDict

    from clients.client_app import receive_model
    from clients.node_state import save_replica
    from protocol import wire

    server, dl = coord.server, coord.downlink
    out, patch_records = {}, {}
    for n, kind, base in zip(workers, plan.kind_list, plan.base_list):
        if n in skip:  # dropped before it read the message: its replica is untouched
            continue
        if kind == "delta":
            records = wire.step_records(dl.step)
        elif kind == "patch":
            if base not in patch_records:
                patch_records[base] = wire.patch_records(dl.patch(base, server))
            records = patch_records[base]
            rec = records["patch"]
            fb = coord.pending.get(n)
            travels = sum(rec[k].numpy().nbytes for k in rec.keys())
            assert plan.coded[n] == travels + 16 + 16 + 8 + (fb.nbytes() if fb else 0)
        else:
            records = wire.replica_records(server, coord.round, dl.step.digest)
        ctx = contexts.setdefault(n, Context(run_id=1, node_id=n, node_config={"partition-id": n},
                                             state=RecordDict(), run_config={}))
        content = wire.train_content(coord.round + 1, kind, records, coord.pending.get(n))
        params, buffers, replica, _ = receive_model(content, ctx, cfg, task)
        assert torch.equal(params, server.params), (coord.round, n, kind, base)
        assert buffers is None or torch.equal(buffers, server.buffers)
        assert replica.digest() == dl.step.digest
        save_replica(ctx, replica, cfg)
        out[n] = replica
    return out


def test_patches_keep_sampled_replicas_bitwise_equal():
    """Plain SGD with BatchNorm-like buffers, m = 4 of N = 12 per round, some
    sampled workers dropping before they read their message, some replies
    lost after the worker applied it (its replica then gets ahead of what the
    server knows), rounds without a valid reply, one round of dense uploads.
    Every message goes through the wire and the ClientApp's receive_model;
    every replica equals the server's model bit for bit after it (digest
    checked too). Returning workers get patches; a worker whose replica
    predates the dense round gets the full model (the patch would hold every
    entry); the planned bytes are what travels."""
    gen = torch.Generator().manual_seed(1)
    dim, n, m, k = 600, 12, 4, 12
    server = FedServer(torch.randn(dim, generator=gen), torch.randn(5, generator=gen), lr=0.05)
    task = _Seeded(server.params, server.buffers)
    coord = Coordinator(server, "gradient", verify=True)
    coord.start(range(n))
    contexts, cfg = {}, _client_cfg(0.05)
    kinds = {"delta": 0, "patch": 0, "full": 0}
    for t in range(1, 61):
        sampled = sorted(torch.randperm(n, generator=gen)[:m].tolist())
        if t > 40:  # worker 0 comes back after 40 rounds away
            sampled = sorted(set(sampled) | {0}) if t == 41 else [w for w in sampled if w]
        elif 0 in sampled:
            sampled.remove(0)
        plan = coord.plan(sampled)
        dropped = {w for w in sampled if torch.rand(1, generator=gen).item() < 0.2}
        _deliver(coord, plan, sampled, contexts, cfg, task, skip=dropped)
        for kind in plan.kind_list:
            kinds[kind] += 1
        lost = {w for w in sampled if torch.rand(1, generator=gen).item() < 0.1}
        replies = [Reply(w, _random_upload(gen, dim, k) if t != 30 else  # a dense round
                         Upload(torch.randn(dim, generator=gen), None, dim), 10 + w, 0.0,
                         torch.randn(5, generator=gen), replica_round=coord.round,
                         digest=coord.downlink.step.digest)
                   for w in sampled if w not in dropped | lost and t % 13]
        out = coord.collect(replies)
        assert not out.rejected
        if t == 41:
            assert plan.kinds[0] == "full" and plan.resyncs >= 1  # the patch would be larger
    assert kinds["patch"] > 30 and kinds["delta"] > 0
    assert coord.plan([0]).kind_list == ["patch"]  # confirmed again: patched from there on


def test_plan_sends_the_smaller_of_patch_and_model():
    """Bytes of a patch, the patch/full choice, and where only the full
    model is exact: momentum or weight decay, a replica older than the
    digest table, a worker that failed to apply what it got."""
    from regtopk_fl.broadcast import DIGEST, HEADER, PATCH_BASE

    dim = 1000
    server = FedServer(torch.zeros(dim), torch.zeros(3), lr=0.1)
    coord = Coordinator(server, "gradient", verify=True)
    coord.downlink.window = 3
    coord.start(range(4))
    digest = lambda: coord.downlink.step.digest  # noqa: E731
    for t in range(1, 7):  # worker 0 replies in every round, 1 only in round 1, 2 in 1-4
        who = [0, 1, 2] if t == 1 else ([0, 2] if t <= 4 else [0])
        ups = {w: Upload(torch.ones(4), torch.arange(4) + 10 * t + 100 * w, dim) for w in who}
        coord.collect([Reply(w, ups[w], 1, 0.0, torch.ones(3), replica_round=t - 1,
                             digest=digest()) for w in who])
    plan = coord.plan([0, 1, 2, 3])
    # 0 is current (delta); 2 (replica at 3) is patched with the entries of rounds 4-6;
    # 1 (replica at 0, outside the window of 3 rounds but model_0 is always known) and
    # 3 (never replied: model_0) are patched from round 0
    assert plan.kind_list == ["delta", "patch", "patch", "patch"]
    assert plan.base_list == [None, 0, 3, 0]
    changed = coord.downlink.patch_indices(3)
    assert changed.tolist() == sorted([10 * t + 100 * w + i for t in (4, 5, 6) for w in (0, 2)
                                       if not (w == 2 and t > 4) for i in range(4)])
    fb = coord.pending[2].nbytes()
    assert plan.coded[2] == (HEADER + DIGEST + PATCH_BASE + changed.numel() * 4
                             + coded_index_bytes(changed, dim) + 3 * 4 + fb)
    assert plan.raw[2] == HEADER + DIGEST + PATCH_BASE + changed.numel() * 8 + 3 * 4 + fb
    assert plan.patches == 3 and plan.resyncs == 0
    # a replica older than the digest table's bound (and not model_0) gets the model
    coord.downlink.current[2] = 2
    assert coord.plan([2]).kind_list == ["full"]
    # a worker that could not apply what it was sent gets the model, until it replies
    coord.downlink.lost(0)
    assert coord.plan([0]).kind_list == ["full"]
    coord.downlink.confirm(0, 5)
    assert coord.plan([0]).kind_list == ["delta"]
    # a patch that would not be smaller than the model is not sent
    big = Upload(torch.ones(dim), torch.arange(dim), dim)
    coord.collect([Reply(0, big, 1, 0.0, torch.ones(3), replica_round=6, digest=digest())])
    assert coord.plan([0, 3]).kind_list == ["delta", "full"]
    # momentum or weight decay change every entry every round: the model, never a patch
    for kw in ({"momentum": 0.9}, {"weight_decay": 1e-4}):
        other = Coordinator(FedServer(torch.zeros(dim), lr=0.1, **kw), "gradient")
        other.start(range(2))
        other.collect([Reply(0, Upload(torch.ones(2), torch.tensor([1, 2]), dim), 1,
                             replica_round=0)])
        other.collect([Reply(0, Upload(torch.ones(2), torch.tensor([1, 2]), dim), 1,
                             replica_round=1)])
        assert other.plan([0, 1]).kind_list == ["delta", "full"]
        assert other.downlink.changed is None


def test_replica_claims_are_checked_against_the_digest_table():
    """What a node says its replica holds (identify answer) decides where its
    patch starts only if the server's digest of that round agrees: a stale or
    wrong digest gets the full model; no replica, or one ahead of a resumed
    server, is patched from model_0 (built from the seed). A claim that
    matches the table but not the node's model cannot produce a wrong model:
    the patched replica fails its own digest check."""
    dim = 300
    gen = torch.Generator().manual_seed(3)
    server = FedServer(torch.randn(dim, generator=gen), lr=0.1)
    coord = Coordinator(server, "gradient", verify=True)
    coord.start(range(3))
    digests, replicas = [coord.downlink.step.digest], []
    for t in range(1, 6):
        replicas.append(Replica(server.params, None, 0.1, round=t - 1))
        coord.collect([Reply(0, _random_upload(gen, dim, 5), 1, replica_round=t - 1,
                             digest=digests[-1])])
        digests.append(coord.downlink.step.digest)
    dl = coord.downlink
    assert "matches" in dl.claim(1, 3, digests[3]) and coord.plan([1]).base_list == [3]
    assert "does not match" in dl.claim(1, 3, digests[2])  # a stale digest claim
    assert coord.plan([1]).kind_list == ["full"]
    assert "does not match" in dl.claim(1, 2, b"x" * 16)  # a wrong one
    assert "outside" in dl.claim(1, -1, digests[0])  # a round the server never had
    dl.window = 1
    assert "outside" in dl.claim(1, 2, digests[2]) and coord.plan([1]).kind_list == ["full"]
    dl.window = 1024
    assert "ahead" in dl.claim(1, 9, b"y" * 16) and coord.plan([1]).base_list == [0]
    assert "no replica" in dl.claim(2, None, None) and coord.plan([2]).base_list == [0]
    assert "matches" in dl.claim(2, 4, digests[4]) and coord.plan([2]).kind_list == ["delta"]
    # a node whose claim matches the table but whose replica is not that model
    liar = replicas[3].params.clone()
    liar[7] += 1.0
    bad = Replica(liar, None, 0.1, round=3)
    assert "matches" in dl.claim(1, 3, digests[3])
    why = bad.patch(dl.patch(3, server))
    assert why is not None and "digest mismatch" in why
    good = replicas[3]
    assert good.patch(dl.patch(3, server)) is None and torch.equal(good.params, server.params)


@pytest.mark.slow
def test_inprocess_sampling_replicas_stay_bitwise_equal():
    """The in-process engine under sampling (m = 10 of N = 100) with 20 %
    drops, RegTop-k: what its plan says each sampled worker is sent goes
    through the wire to a replica per worker (the ClientApp's receive_model),
    and every replica equals the server's model bit for bit after it (digest
    checked). Nearly every sampled worker is returning or new, and most are
    patched, not resynced."""
    from regtopk_fl import faults
    from regtopk_fl.compress import RegTopK
    from regtopk_fl.engine import InProcessRun
    from regtopk_fl.participation import Participation
    from regtopk_fl.tasks.linreg import LinRegTask

    task = LinRegTask(num_workers=100, dim=1000, samples_per_worker=20)
    cfg, contexts, held = _client_cfg(0.01), {}, {}
    counts = {"delta": 0, "patch": 0, "full": 0}
    run = InProcessRun(task, RegTopK(0.005, mu=2), lr=0.01, seed=3,
                       participation=Participation(100, 10, seed=3), fault_cfg={"drop_prob": 0.2})
    run.coord.downlink.verify = True  # digests, as the Flower server keeps them
    run.coord.start(range(100))
    plan = run.coord.plan

    def plan_and_deliver(workers):
        out, t = plan(workers), run.coord.round + 1
        dropped = {n for n in workers if faults.drops(run.fault_cfg, run.seed, n, t)}
        held.update(_deliver(run.coord, out, workers, contexts, cfg, task, skip=dropped))
        for kind in out.kind_list:
            counts[kind] += 1
        return out

    collect = run.coord.collect

    def collect_named(replies, rejected=None):  # each reply names its worker's replica
        for r in replies:
            r.replica_round, r.digest = held[r.worker].round, held[r.worker].digest()
        return collect(replies, rejected)

    run.coord.plan, run.coord.collect = plan_and_deliver, collect_named
    rows = [run.round(t) for t in range(1, 41)]
    assert sum(r["missing"] for r in rows) > 40  # about 20 % of 400
    assert counts["patch"] > 250 and counts["full"] < counts["patch"] / 10
    assert sum(r["plan"].patches for r in rows) == counts["patch"]
    assert not any(r["outcome"].rejected for r in rows)  # every reply's replica checked


def test_full_participation_sends_only_the_global_gradient(one_thread):
    """Every worker in every round, no drops: each replica is always at the
    previous round, so every message is g of that round, and its bytes are
    the ones counted before patches existed (header + digest + coded
    support + values + buffers, + the feedback status)."""
    from regtopk_fl.broadcast import DIGEST, FEEDBACK_META, HEADER
    from regtopk_fl.compress import RegTopK
    from regtopk_fl.engine import InProcessRun
    from regtopk_fl.tasks.linreg import LinRegTask

    task = LinRegTask(num_workers=6, dim=500, samples_per_worker=40)
    run = InProcessRun(task, RegTopK(0.02, mu=2), lr=0.01)
    support = torch.zeros(0, dtype=torch.int64)
    for t in range(1, 31):
        r = run.round(t)
        plan = r["plan"]
        assert plan.kind_list == ["delta"] * 6 and plan.patches == plan.resyncs == 0
        g = len(support) * 8 + coded_index_bytes(support, 500) + HEADER + DIGEST
        fb = FEEDBACK_META if t > 1 else 0
        assert list(plan.coded.values()) == [g + fb] * 6, t
        support = torch.unique(r["outcome"].support)


@pytest.mark.slow
def test_full_participation_bytes_are_the_recorded_ones(make_cfg, tmp_path):
    """sweep_participation's m = 100 dense job: its downlink bytes are those
    recorded in results/sweep_participation/collected.csv (made before
    patches existed). A dense g does not depend on the last bits of any
    computation, so this holds on every CPU."""
    import csv

    from regtopk_fl.paths import PROJECT_ROOT
    from regtopk_fl.runner import run_experiment

    with open(PROJECT_ROOT / "results" / "sweep_participation" / "collected.csv") as fh:
        rec = next(r for r in csv.DictReader(fh) if r["sparsifier"] == "dense"
                   and r["participation.clients_per_round"] == "100"
                   and "forget" not in r["sweep"])
    s = run_experiment(make_cfg(["experiment=sweep_participation", "sparsifier=dense",
                                 "participation.clients_per_round=100"]), tmp_path / "run")
    assert s["downlink_bytes"] == int(rec["downlink_bytes"]) > 0
    assert s["downlink_coded_bytes"] == int(rec["downlink_coded_bytes"])
    assert s["resyncs"] == s["patches"] == 0


def test_wire_patch_and_identify_claim_round_trip():
    """A patch travels with coded indices and reads back equal; an identify
    answer carries the replica's round and digest (none without a replica)
    and a malformed claim is refused, never believed."""
    from flwr.app import ConfigRecord

    from protocol import wire
    from regtopk_fl.broadcast import Patch

    p = Patch(7, 3, torch.tensor([1.5, -2.0]), torch.tensor([4, 900]), 1000,
              torch.ones(3), b"d" * 16)
    recs = wire.patch_records(p)
    assert recs["patch"]["indices"].numpy().dtype == np.uint8
    q = wire.read_patch(recs)
    assert (q.round, q.base, q.dim, q.digest) == (7, 3, 1000, b"d" * 16)
    assert torch.equal(q.indices, p.indices) and torch.equal(q.values, p.values)
    assert torch.equal(q.buffers, p.buffers)
    r = Replica(torch.arange(5.0), None, lr=0.1, round=4)
    assert wire.read_replica_claim(wire.identity_content(2, replica=r)) == (4, r.digest())
    assert wire.read_replica_claim(wire.identity_content(2)) is None
    assert wire.read_identity(wire.identity_content(2, replica=r)) == 2
    bad = wire.identity_content(2)
    bad["replica-meta"] = ConfigRecord({"round": 4, "digest": "not bytes"})
    with pytest.raises(TypeError):
        wire.read_replica_claim(bad)


@pytest.mark.parametrize("dim, n, k", [(100, 20, 60), (100, 3, 2), (20000, 8, 50), (50, 2, 0)])
def test_global_step_counts_its_bytes_from_the_support(dim, n, k):
    """A step made from the round's g and the uploads' concatenated indices
    counts its bytes as the gathered step would (distinct indices, their
    coding) and gathers the union and g on it (torch.unique's, ascending)
    only when read. Where the distinct indices fill at least the bitmap's
    bytes (J = 100, N*k = 1200), the count alone decides: nothing gathered."""
    from regtopk_fl.broadcast import DIGEST, HEADER

    gen = torch.Generator().manual_seed(dim + n + k)
    support = torch.cat([_random_upload(gen, dim, k).indices for _ in range(n)])
    g = torch.zeros(dim, dtype=torch.float64)
    g[support] = torch.randn(support.numel(), generator=gen, dtype=torch.float64)
    step = GlobalStep.from_gradient(4, g, support, True, None, b"d" * 16)
    union = torch.unique(support)
    raw = HEADER + DIGEST + union.numel() * (8 + 4)
    coded = HEADER + DIGEST + union.numel() * 8 + coded_index_bytes(union, dim)
    assert (step.nbytes(False), step.nbytes(True)) == (raw, coded)
    bitmap_decides = union.numel() >= (dim + 7) // 8
    assert (step._indices is None) == bitmap_decides  # not gathered to be counted
    assert torch.equal(step.indices, union) and torch.equal(step.values, g[union])
    assert torch.equal(step.touched, union)
    # what travels is what was counted
    assert step.nbytes(True) == _wire(step).nbytes(True)


def test_client_timing_is_read_only_when_plausible():
    from flwr.app import RecordDict

    from protocol import wire

    sec = {p: 0.001 * (i + 1) for i, p in enumerate(wire.TIMING_PHASES)}
    content = RecordDict({"client-timing": wire.timing_record(sec)})
    assert wire.read_timing(content) == pytest.approx(sec)
    assert wire.read_timing(RecordDict({})) is None  # an older client: none
    for bad in ({**sec, "compute": float("nan")}, {**sec, "save": -1.0},
                {**sec, "model": 1e308}, {**sec, "build": float("inf")},
                {p: v for p, v in sec.items() if p != "model"}):
        assert wire.read_timing(RecordDict({"client-timing": wire.timing_record(bad)})) is None
    extra = wire.timing_record(sec)
    extra["gossip"] = 1.0  # a phase the protocol does not know
    assert wire.read_timing(RecordDict({"client-timing": extra})) is None


@pytest.mark.parametrize("hold", [False, True])
def test_the_server_reuses_a_g_buffer_only_once_nothing_holds_it(hold, monkeypatch):
    """A large g on the CPU comes from FedServer's pool of two (no fresh
    45 MB allocation a round), and a buffer is reused only when neither a
    step nor an outcome nor a view holds it: every round's g and step read
    back as they were, and the run is bitwise the one without the pool."""
    from regtopk_fl import reuse

    def run(pool_min):
        monkeypatch.setattr(reuse, "POOL_MIN", pool_min)
        gen = torch.Generator().manual_seed(3)
        dim, n, k = 1 << 12, 4, 40
        coord = Coordinator(FedServer(torch.randn(dim, generator=gen), lr=0.1), "gradient")
        coord.start(range(n))
        kept, ptrs = [], []
        for _ in range(6):
            replies = [Reply(w, _random_upload(gen, dim, k), 10 + w) for w in range(n)]
            out = coord.collect(replies)
            ptrs.append(out.grad.data_ptr())
            if hold:  # the outcome, its g and a view of it, and the step, as they were
                kept.append((out, out.grad.clone(), out.grad[: dim // 2],
                             coord.downlink.step, coord.downlink.step.values.clone()))
        for out, g, view, step, values in kept:
            assert torch.equal(out.grad, g) and torch.equal(view, g[: dim // 2])
            assert torch.equal(step.values, values)
        return coord.server.params.clone(), ptrs

    pooled, ptrs = run(1 << 10)
    fresh, _ = run(1 << 30)
    assert torch.equal(pooled, fresh)
    if hold:
        assert len(set(ptrs)) == len(ptrs)  # every buffer was held: none reused
    else:
        assert len(set(ptrs)) == 2 and ptrs[0] == ptrs[2]  # the pool's two, in turn


def test_the_sparse_sgd_step_is_the_dense_one_bitwise():
    """ServerSGD.step_sparse on g's support equals step(g) bit for bit, on
    random models, supports (tails of the gathered buffer included) and
    learning rates, in float32 and float64. Both run ATen's own add kernel
    (no BLAS, nothing chosen by CPU vendor), only on other lengths: this holds
    where its vector body and its tail round alike, checked here under every
    ATEN_CPU_CAPABILITY of x86 (default, avx2, avx512: `make test-kernels`
    runs this file under the first two)."""
    from regtopk_fl.optim import ServerSGD

    gen = torch.Generator().manual_seed(7)
    for trial in range(60):
        dtype = torch.float64 if trial % 4 == 0 else torch.float32
        dim = int(torch.randint(1000, 20000, (1,), generator=gen))
        k = int(torch.randint(0, 900, (1,), generator=gen))
        p = torch.randn(dim, generator=gen, dtype=dtype) * 10.0 ** (trial % 5 - 2)
        p[:3] = torch.tensor([0.0, -0.0, 1e-40], dtype=dtype)  # signed zeros, a subnormal
        idx = torch.randperm(dim, generator=gen)[:k].sort().values
        g = torch.zeros(dim, dtype=dtype)
        g[idx] = torch.randn(k, generator=gen, dtype=dtype) * 1e-2
        lr = float(torch.rand(1, generator=gen)) * 0.1
        dense, sparse = ServerSGD(p.clone(), lr), ServerSGD(p.clone(), lr)
        dense.step(g)
        sparse.step_sparse(idx, g[idx])
        assert torch.equal(dense.params, sparse.params), (trial, dim, k)
        assert torch.equal(torch.signbit(dense.params), torch.signbit(sparse.params))


def test_plain_sgd_steps_sparsely_on_the_cpu_and_replicas_follow_bitwise(monkeypatch):
    """Plain SGD on a large CPU model: the server steps on g's support alone,
    the broadcast step holds no J-sized g, every replica applies it sparsely
    and stays bitwise the server's, and the server ends bitwise where the
    dense step takes it."""
    from regtopk_fl import optim

    def run(sparse_min):
        monkeypatch.setattr(optim, "SPARSE_MIN", sparse_min)
        gen = torch.Generator().manual_seed(11)
        dim, n, k = 5000, 4, 30
        server = FedServer(torch.randn(dim, generator=gen), lr=0.05)
        coord = Coordinator(server, "gradient", verify=True)
        coord.start(range(n))
        replicas = [Replica(server.params, None, 0.05) for _ in range(n)]
        for t in range(1, 31):
            step = _wire(coord.downlink.step)
            for rep in replicas:
                assert rep.apply(step) is None, t
                assert torch.equal(rep.params, server.params)
            replies = [Reply(w, _random_upload(gen, dim, k), 10 + w, replica_round=t - 1,
                             digest=replicas[w].digest()) for w in range(n)]
            out = coord.collect(replies)
            assert (out.gathered is not None) == (sparse_min <= dim)
            assert coord.downlink.step._pending is None or sparse_min > dim
        return server.params.clone()

    assert torch.equal(run(1000), run(1 << 30))


def test_patch_bytes_from_the_counts_are_those_of_the_indices():
    """patch_bytes counts entries from one histogram and finds the indices
    only below the bitmap's size (#34): every base gives the bytes the
    indices themselves give, on both sides of that size."""
    from types import SimpleNamespace

    from regtopk_fl.broadcast import Downlink, nbytes, patch_nbytes
    from regtopk_fl.payload import coded_index_bytes, index_itemsize

    dim, rounds = 4000, 12  # bitmap 500 bytes; ~308 entries changed in the last round
    gen = torch.Generator().manual_seed(0)
    dl = Downlink("gradient")
    dl.changed = torch.randint(0, rounds + 1, (dim,), generator=gen, dtype=torch.int32)
    dl.step = SimpleNamespace(round=rounds)
    server = SimpleNamespace(dim=dim, params=torch.zeros(dim), buffers=torch.zeros(7))
    args = (server.params.element_size(), nbytes(server.buffers))
    counts = []
    for base in range(rounds + 2):
        idx = torch.nonzero(dl.changed > base).flatten()
        n = idx.numel()
        counts.append(n)
        want = (patch_nbytes(n, n * index_itemsize(dim), *args),
                patch_nbytes(n, coded_index_bytes(idx, dim), *args))
        assert dl.patch_count(base) == n
        assert dl.patch_bytes(base, server) == want, base
    assert min(counts) == 0 and any(0 < n < 500 for n in counts) and max(counts) > 500
