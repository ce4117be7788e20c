"""The hostile-client matrix: one Flower simulation in which worker 3 of 4
makes a different attack in every round from round 3 on (faults.hostile;
every attack the server must refuse, hostile.REFUSED),
against a Flower twin in which worker 3 is simply absent in those rounds
(faults.hostile ``absent``, a drop).

Why the twin runs on Flower too: the comparison is bitwise, and bitwise
equality holds only where both sides run the same kernels in the same order.
Each Flower client computes one worker's gradient; the in-process engine
computes all workers in one batched mat-vec, and MKL picks its code path by
CPU and by shape. The two gradients differ in the last bit for some shapes on
any CPU (here, on the AMD EPYC, for one worker of four at J = 103; on an
Intel Xeon at J = 100). Most such differences are rounded away when the
server adds lr * g to the model, so whether one reaches the model is luck:
on the Intel machine one did, in round 11. J is 103 here so that the case
occurs on this suite's own CI machine too; the twin makes the test
independent of it.

What "equal to a run in which that worker was absent" means here. A rejected
upload goes back into its worker's residual; an absent worker never computed
its round. So the hostile worker's *own* residual differs between the two
runs after its first attack, and any later accepted upload of it would
differ too (legitimately: error feedback keeps what was not applied). The
matrix therefore runs the attacks to the end of the run: from round 3 on,
nothing of worker 3 may reach the model. Then the server's model, and with
it every honest worker's feedback and next upload, must be *bitwise* those
of the twin, round by round. Any leak of a rejected payload (a value, an
index, a weight, a claimed identity) into the aggregate would show as a
difference. That a rejected upload is restored into the residual is checked
by tests/test_faults_resume.py::test_rejected_upload_goes_back_into_the_residual.

Every case must also be rejected with its own reason (recorded per round from
the Coordinator, and present in the log), and the run must finish.
"""
import csv
import logging

import pytest
import torch

from regtopk_fl import fedround
from regtopk_fl.hostile import REFUSED
from regtopk_fl.runner import run_experiment

FIRST = 3  # rounds 1-2 honest (first contact binds every node), then one attack a round
HOSTILE = 3
N = 4
J = 103  # batched and per-worker gradients differ in the last bit even on AMD (docstring)
# attack -> a piece of the reason the server must give
EXPECTED = {
    "index_out_of_range": "index out of range",
    "index_negative": "indices must travel coded (uint8 bytes), got int64",
    "index_duplicate": "duplicate indices",
    "index_unsorted": "indices must travel coded (uint8 bytes), got int64",
    "index_float": "indices must travel coded (uint8 bytes), got float64",
    "length_mismatch": "indices but",
    "values_2d": "values must be a 1-D tensor",
    "wrong_dtype": "values dtype torch.float32 != model dtype torch.float64",
    "wrong_dim": f"dense length {J + 1} != J={J}",
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
    "huge_norm": "server.max_norm_ratio",
    "missing_upload": "undecodable reply: 'upload'",
    "missing_values": "undecodable reply: 'values'",
    "missing_num_examples": "undecodable reply: 'num-examples'",
    "impersonate": "claims partition 0, but node",
    "unknown_partition": "claims partition 99, outside 0..3",
    "inflate_examples": "claims num_examples=1000000000000",
    # the budget (#17): k = round(0.5 * 103) = 52 for RegTop-k here
    "over_budget": "a sparse upload of 53 entries is over the budget of 52",
    "dense_all": f"a dense upload of {J} entries is over the budget of 52",
    "coded_all": f"a sparse upload of {J} entries is over the budget of 52",
}
PLAN = {FIRST + i: a for i, a in enumerate(REFUSED)}
ROUNDS = max(PLAN)
BASE = ["task=linreg", f"task.dim={J}", f"num_workers={N}", f"rounds={ROUNDS}", "sparsifier=regtopk",
        "sparsifier.sparsity=0.5", "sparsifier.mu=2", "task.size_ratio=3", "threads=1",
        "checkpoint.every=0", f"faults.hostile.worker={HOSTILE}"]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_plan_covers_every_message_attack():
    assert set(EXPECTED) == set(REFUSED) and len(PLAN) == len(EXPECTED) >= 21


@pytest.mark.flower
@pytest.mark.slow
def test_every_attack_is_rejected_and_nothing_leaks(make_cfg, tmp_path, monkeypatch, caplog):
    outcomes = []
    collect = fedround.Coordinator.collect

    def recording(self, replies, rejected=None):  # the ServerApp runs in this process
        out = collect(self, replies, rejected)
        outcomes.append(out)
        return out

    monkeypatch.setattr(fedround.Coordinator, "collect", recording)
    caplog.set_level(logging.WARNING)
    spec = " ".join(f"{t}:{a}" for t, a in PLAN.items())
    hostile = run_experiment(make_cfg([*BASE, "runtime=flower", f"faults.hostile.attacks={spec}"]),
                             tmp_path / "hostile")
    assert hostile["status"] == "finished" and hostile["rounds_done"] == ROUNDS
    flower = list(outcomes)  # the Flower run's rounds (the twins below record theirs too)
    twin = run_experiment(make_cfg([*BASE, "runtime=flower",
                                    f"faults.hostile.attacks={FIRST}-{ROUNDS}:absent"]),
                          tmp_path / "twin")
    assert twin["status"] == "finished"
    # the impersonating claim was logged and counted (trust on first use, #17)
    assert hostile["identity_conflicts"] == 1 and twin["identity_conflicts"] == 0

    # every case rejected, with its reason, and only worker 3's reply
    assert len(flower) == ROUNDS
    for t, out in enumerate(flower, 1):
        if t < FIRST:
            assert out.rejected == {} and out.accepted == [0, 1, 2, 3], t
            continue
        attack = PLAN[t]
        assert list(out.rejected) == [HOSTILE], (t, attack, out.rejected)
        assert EXPECTED[attack] in out.rejected[HOSTILE], (attack, out.rejected[HOSTILE])
        assert out.accepted == [0, 1, 2], (t, attack)
        assert EXPECTED[attack] in caplog.text, attack
    rows, twin_rows = _rows(tmp_path / "hostile"), _rows(tmp_path / "twin")
    assert [int(r["rejected"]) for r in rows] == [0] * FIRST + [1] * (ROUNDS - FIRST + 1)
    assert all(r["missing"] == "0" for r in rows)
    assert [int(r["missing"]) for r in twin_rows] == [0] * FIRST + [1] * (ROUNDS - FIRST + 1)

    # nothing leaked: the trajectory and the final model are the twin's, bit for bit
    assert [r["gap"] for r in rows] == [r["gap"] for r in twin_rows]
    a = torch.load(tmp_path / "hostile" / "model.pt", weights_only=False)["params"]
    b = torch.load(tmp_path / "twin" / "model.pt", weights_only=False)["params"]
    assert torch.equal(a, b)
    # and the comparison can fail: the honest rounds moved the model, the
    # hostile rounds moved it differently from a run where worker 3 took part
    # (in-process: that run's kernels differ, so the difference asserted is
    # far above the last bits)
    assert float(rows[-1]["gap"]) < float(rows[0]["gap"])
    full = run_experiment(make_cfg([*BASE, "runtime=inprocess"]), tmp_path / "full")
    c = torch.load(tmp_path / "full" / "model.pt", weights_only=False)["params"]
    assert full["status"] == "finished" and _rel(a, c) > 1e-3
