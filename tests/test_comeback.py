"""No lockout (#17): an honest worker refused for R rounds in a row comes back.

A refused upload goes back into its worker's residual, so the worker's next
upload carries every round since its last accepted one. Judged against one
round's median alone, that upload outgrew the norm guard after a long enough
refusal, and every refusal grew it further: the worker was refused for the
rest of the run. Here worker 7 of 8 is refused for R rounds (the ``nan``
attack: it computes honestly, only what travels is NaN), then behaves; then
it sends one 1e30 upload, then behaves again. The server defers each refused
round's allowance (regtopk_fl/trust.py), so the worker must be accepted again
at once and stay accepted, the 1e30 upload must still be refused, and the run
must show that the deferral was needed: with R = 50 the comeback is more than
20x the round's median (45x here), and without the deferral the worker stays
locked out.
"""
import pytest
import torch

from regtopk_fl import fedround, trust
from regtopk_fl.runner import run_experiment

START = 21  # rounds 1-20 honest (lr 0.05: the model has moved on when the refusals start)
TAIL = 10  # honest rounds after the comeback, then one 1e30 upload, then 4 more
W = 7  # the refused worker, of N = 8
BASE = ["task=linreg", "num_workers=8", "sparsifier=regtopk", "sparsifier.sparsity=0.5",
        "lr=0.05", "threads=1", "checkpoint.every=0", f"faults.hostile.worker={W}"]


def _schedule(R):
    huge = START + R + TAIL
    return huge, huge + 4, f"{START}-{START + R - 1}:nan {huge}:huge_norm"


@pytest.fixture
def recorded(monkeypatch):
    """Every round's outcome and the run's guard (the ServerApp runs in this process)."""
    got = {"outcomes": [], "guards": []}
    collect, install = fedround.Coordinator.collect, trust.install

    def recording(self, replies, rejected=None):
        out = collect(self, replies, rejected)
        got["outcomes"].append(out)
        return out

    def installing(*args, **kwargs):
        guard = install(*args, **kwargs)
        got["guards"].append(guard)
        return guard

    monkeypatch.setattr(fedround.Coordinator, "collect", recording)
    monkeypatch.setattr(trust, "install", installing)
    return got


def _run(make_cfg, tmp_path, R, runtime, got):
    huge, rounds, spec = _schedule(R)
    got["outcomes"].clear()
    got["guards"].clear()
    summary = run_experiment(make_cfg([*BASE, f"rounds={rounds}", f"runtime={runtime}",
                                       f"faults.hostile.attacks={spec}"]), tmp_path / runtime)
    assert summary["status"] == "finished"
    return list(got["outcomes"]), got["guards"][0], summary


def _check_comeback(outcomes, guard, R):
    huge, rounds, _ = _schedule(R)
    assert len(outcomes) == rounds
    refused = [t for t, out in enumerate(outcomes, 1) if W in out.rejected]
    assert refused == [*range(START, START + R), huge], refused
    for t in range(START, START + R):
        assert "NaN or Inf" in outcomes[t - 1].rejected[W]
    assert "server.max_norm_ratio" in outcomes[huge - 1].rejected[W]  # 1e30: still refused
    for t in [*range(START + R, huge), *range(huge + 1, rounds + 1)]:
        assert W in outcomes[t - 1].accepted, t  # back at once, and for good
    return guard.comebacks[0]


@pytest.mark.parametrize("R", [1, 12, 50])
def test_refused_worker_comes_back_inprocess(make_cfg, tmp_path, recorded, R):
    outcomes, guard, _ = _run(make_cfg, tmp_path, R, "inprocess", recorded)
    worker, ratio, over_allowance = _check_comeback(outcomes, guard, R)
    assert worker == W and over_allowance < 2.0  # the guard refuses only above 20
    if R == 50:  # the plain guard (20x this round's median) would have refused it
        assert ratio > 20.0


def test_without_the_deferral_the_worker_is_locked_out(make_cfg, tmp_path, recorded,
                                                       monkeypatch):
    """The rule is what makes the difference: with it switched off, the same
    run refuses worker 7 in every round after its 50 refused ones."""
    monkeypatch.setattr(trust.Guard, "settle", lambda self, accepted, rejected: None)
    outcomes, _, _ = _run(make_cfg, tmp_path, 50, "inprocess", recorded)
    after = [W in out.rejected for out in outcomes[START + 50 - 1:]]
    assert all(after) and len(after) == TAIL + 5
    assert "server.max_norm_ratio" in outcomes[START + 50 - 1].rejected[W]


@pytest.mark.flower
@pytest.mark.slow
def test_refused_worker_comes_back_under_flower(make_cfg, tmp_path, recorded):
    """The same 50 refused rounds under the Flower runtime: the same refusals,
    the same comeback, and the model of the in-process run within 1e-6."""
    flower, guard, fs = _run(make_cfg, tmp_path, 50, "flower", recorded)
    _, ratio, _ = _check_comeback(flower, guard, 50)
    assert ratio > 20.0
    inproc, _, ins = _run(make_cfg, tmp_path, 50, "inprocess", recorded)
    assert [o.accepted for o in flower] == [o.accepted for o in inproc]
    a = torch.load(tmp_path / "flower" / "model.pt", weights_only=False)["params"]
    b = torch.load(tmp_path / "inprocess" / "model.pt", weights_only=False)["params"]
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6
    assert fs["final"]["gap"] == pytest.approx(ins["final"]["gap"], rel=1e-6)
