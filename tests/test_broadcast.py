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
