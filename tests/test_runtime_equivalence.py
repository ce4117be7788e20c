"""runtime=flower (Flower Simulation Runtime, Ray) and runtime=inprocess run
the same task/sparsifier/memory/server code; same seed and config must give
the same trajectory (max relative difference of the global model <= 1e-6).

Within a tolerance, not bitwise: the in-process engine computes all workers'
gradients in one batched call, a Flower client computes its own alone, and
MKL/oneDNN choose their kernels by CPU and by shape, so the two agree in the
last bits on some processors and not on others. Byte and fault counts are
integers and are compared exactly. Bitwise comparisons are kept where both
sides run the same kernels (tests/test_hostile_matrix.py: Flower with
Flower; tests/test_faults_resume.py: a run with its resumed self)."""
import csv

import pytest
import torch

from regtopk_fl.runner import run_experiment


def _final_model(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=False)


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _both(make_cfg, tmp_path, overrides):
    out = {}
    for runtime in ("inprocess", "flower"):
        cfg = make_cfg(list(overrides) + [f"runtime={runtime}"])
        run_dir = tmp_path / runtime
        summary = run_experiment(cfg, run_dir)
        assert summary["status"] == "finished"
        out[runtime] = run_dir
    return out["inprocess"], out["flower"]


def _check_client_timing(run_dir, rounds: int, workers: int) -> None:
    """client_timing.csv: a row per train reply, phases >= 0 that add up to
    ``handle_s``; summary.json's medians name every phase."""
    import json
    import statistics

    from protocol import wire

    with open(run_dir / "client_timing.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(r["round"]), int(r["worker"])) for r in rows] == [
        (t, n) for t in range(1, rounds + 1) for n in range(workers)]
    for r in rows:
        phases = [float(r[f"{p}_s"]) for p in wire.TIMING_PHASES]
        assert min(phases) >= 0 and float(r["compute_s"]) > 0
        assert float(r["handle_s"]) == pytest.approx(sum(phases))
    medians = json.loads((run_dir / "summary.json").read_text())["client_timing_s"]
    assert set(medians) == {*wire.TIMING_PHASES, "handle"}
    for phase, value in medians.items():  # the medians of the file's columns
        assert value == pytest.approx(statistics.median(float(r[f"{phase}_s"]) for r in rows))


COUNTS = ("uplink_bytes", "uplink_coded_bytes", "downlink_bytes", "downlink_coded_bytes",
          "resyncs", "patches", "sent", "replies", "missing", "rejected")


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.parametrize("broadcast", ["gradient", "model"])
def test_linreg_flower_equals_inprocess(make_cfg, tmp_path, broadcast):
    ip, fl = _both(make_cfg, tmp_path, ["task=linreg", "num_workers=4", "rounds=30",
                                        "sparsifier=regtopk", "sparsifier.sparsity=0.3",
                                        "sparsifier.mu=2", "task.size_ratio=3",
                                        f"broadcast={broadcast}"])
    m_ip, m_fl = _final_model(ip), _final_model(fl)
    assert _rel(m_fl["params"], m_ip["params"]) <= 1e-6
    r_ip, r_fl = _rows(ip), _rows(fl)
    assert len(r_ip) == len(r_fl) == 31
    for a, b in zip(r_ip, r_fl):
        for key in COUNTS:
            assert a[key] == b[key], (key, a["round"])
        assert abs(float(a["gap"]) - float(b["gap"])) <= 1e-6 * max(1.0, float(a["gap"]))
    # the model actually moved and RegTop-k's feedback path ran
    assert float(r_ip[-1]["gap"]) < float(r_ip[0]["gap"])
    assert all(int(r["rejected"]) == 0 and int(r["resyncs"]) == 0 and int(r["patches"]) == 0
               for r in r_fl)
    _check_client_timing(fl, 30, 4)
    assert not (ip / "client_timing.csv").exists()  # no ClientApps in-process
    models = 4 * 100 * 8  # four float64 models of J = 100
    if broadcast == "model":  # the model every round, feedback values from round 2 on
        assert int(r_ip[2]["downlink_bytes"]) > int(r_ip[1]["downlink_bytes"]) == models
    else:  # round 1 only a header + digest; from round 2 the sparse g, less than a model
        assert int(r_ip[1]["downlink_bytes"]) == 4 * (16 + 16)
        assert int(r_ip[1]["downlink_coded_bytes"]) == 4 * (16 + 16 + 1)  # + the coding tag
        assert 4 * (16 + 16) < int(r_ip[2]["downlink_coded_bytes"]) < models


@pytest.mark.flower
@pytest.mark.slow
def test_dgc_flower_equals_inprocess(make_cfg, tmp_path):
    """DGC (#32) reads the round's context: its sample's offset is drawn from
    (seed, worker id, round). A Flower client must build the same context as
    the in-process engine (its partition as the worker id, the server's round),
    or its rows are sampled elsewhere, pass another threshold and send other
    counts. J = 100, S = 0.1: k = 10, a sample of 20 at stride 5."""
    ip, fl = _both(make_cfg, tmp_path, ["task=linreg", "num_workers=3", "rounds=3",
                                        "sparsifier=dgc", "sparsifier.sparsity=0.1",
                                        "task.size_ratio=3"])
    assert _rel(_final_model(fl)["params"], _final_model(ip)["params"]) <= 1e-6
    r_ip, r_fl = _rows(ip), _rows(fl)
    assert len(r_ip) == len(r_fl) == 4
    for a, b in zip(r_ip, r_fl):
        for key in COUNTS:
            assert a[key] == b[key], (key, a["round"])
    # the sampled threshold ran (not exactly k a row), so the counts follow the offsets
    assert [int(r["sent"]) for r in r_ip[1:]] != [3 * 10] * 3
    assert float(r_ip[-1]["gap"]) < float(r_ip[0]["gap"])  # it trained


@pytest.mark.flower
@pytest.mark.slow
def test_flower_replicas_stay_bitwise_equal_for_100_rounds(make_cfg, tmp_path):
    """broadcast=gradient under Flower's Simulation Runtime for 100 rounds with
    momentum, weight decay and 20 % injected drops. Every reply names the
    digest (xxh3-128) of the replica it computed on and the server rejects any
    that is not its own model's: with no rejection in 100 rounds, every
    replica that took part was bitwise the server's model after every round.
    Drops force resyncs (counted, as in-process: with momentum and weight
    decay every entry changes every round, so a worker that missed a round
    gets the full model, never a patch); the trajectory equals the
    in-process run and the broadcast=model run."""
    common = ["task=linreg", "num_workers=4", "rounds=100", "sparsifier=regtopk",
              "sparsifier.sparsity=0.3", "sparsifier.mu=2", "momentum=0.9",
              "weight_decay=0.001", "faults.drop_prob=0.2", "eval_every=10"]
    ip, fl = _both(make_cfg, tmp_path, common)
    r_ip, r_fl = _rows(ip), _rows(fl)
    for a, b in zip(r_ip, r_fl):
        for key in COUNTS:
            assert a[key] == b[key], (key, a["round"])
    assert all(int(r["rejected"]) == 0 for r in r_fl)
    assert sum(int(r["replies"]) for r in r_fl) == 400 - sum(int(r["missing"]) for r in r_fl)
    assert sum(int(r["resyncs"]) for r in r_fl) > 10  # drops came back through resyncs
    assert sum(int(r["patches"]) for r in r_fl) == 0
    m_ip, m_fl = _final_model(ip), _final_model(fl)
    assert _rel(m_fl["params"], m_ip["params"]) <= 1e-6
    model = run_experiment(make_cfg(common + ["broadcast=model"]), tmp_path / "model")
    assert model["status"] == "finished"
    assert torch.equal(_final_model(tmp_path / "model")["params"], m_ip["params"])


@pytest.mark.flower
@pytest.mark.slow
def test_tiny_image_flower_equals_inprocess(make_cfg, tmp_path):
    """A CNN with BatchNorm buffers: sparse gradients plus averaged buffers."""
    ip, fl = _both(make_cfg, tmp_path, ["task=tiny_image", "num_workers=3", "rounds=5",
                                        "sparsifier=regtopk", "sparsifier.sparsity=0.05",
                                        "sparsifier.mu=2", "lr=0.1", "eval_every=5",
                                        "task.samples=300", "task.partition=dirichlet",
                                        "task.alpha=1.0", "device=cpu"])
    m_ip, m_fl = _final_model(ip), _final_model(fl)
    assert _rel(m_fl["params"], m_ip["params"]) <= 1e-6
    assert _rel(m_fl["buffers"], m_ip["buffers"]) <= 1e-6
    last_ip, last_fl = _rows(ip)[-1], _rows(fl)[-1]
    first = torch.load(ip / "model.pt", weights_only=False)["params"]
    from regtopk_fl.runner import build
    task, _ = build(make_cfg(["task=tiny_image", "num_workers=3", "task.samples=300"]))
    assert not torch.equal(first, task.init_params())  # training moved the model
    # models equal within 1e-6 can still put a test image on the other side of
    # a decision boundary: the accuracies agree to within one test image
    assert last_ip["accuracy"]
    assert abs(float(last_fl["accuracy"]) - float(last_ip["accuracy"])) <= (
        1.0 / len(task.y_test) + 1e-12)
    assert abs(float(last_fl["loss"]) - float(last_ip["loss"])) <= 1e-6 * float(last_ip["loss"])


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.parametrize("method", [["sparsifier=regtopk", "sparsifier.sparsity=0.3",
                                     "sparsifier.mu=2"], ["sparsifier=dense"]],
                         ids=["regtopk", "dense"])
def test_sampled_clients_flower_equals_inprocess(make_cfg, tmp_path, method):
    """Client sampling (#12): 3 of 8 clients per round, seeded by (seed, round),
    with drops and NaN uploads among the sampled ones. The strategy picks the
    nodes of the sampled partitions, so both runtimes make the same choice,
    the same byte and fault counts and the same model. Dense: the clients'
    state files and the in-process store keep a dense upload's mask implicit
    (#34), and a rejected upload still goes back into the residual."""
    ip, fl = _both(make_cfg, tmp_path, ["task=linreg", "num_workers=8", "rounds=15",
                                        *method, "task.size_ratio=3", "threads=1",
                                        "participation.clients_per_round=3",
                                        "faults.drop_prob=0.2", "faults.nan_prob=0.1"])
    assert _rel(_final_model(fl)["params"], _final_model(ip)["params"]) <= 1e-6
    r_ip, r_fl = _rows(ip), _rows(fl)
    for a, b in zip(r_ip[1:], r_fl[1:]):
        for key in ("uplink_bytes", "downlink_bytes", "sent", "sampled", "replies", "missing",
                    "rejected"):
            assert a[key] == b[key], (key, a["round"])
    assert {r["sampled"] for r in r_ip[1:]} == {"3"}
    # only sampled clients can be missing, and some were (drops)
    missing = [int(r["missing"]) for r in r_ip[1:]]
    assert max(missing) <= 3 and sum(missing) > 0
    # and some clients came back after skipping rounds (feedback older than t - 1)
    from regtopk_fl.participation import sample_clients
    last, stale = {}, 0
    for t in range(1, 16):
        for n in sample_clients(8, 3, 0, t):
            stale += n in last and t - last[n] > 1
            last[n] = t
    assert stale > 0
    assert float(r_ip[-1]["gap"]) < float(r_ip[0]["gap"])


@pytest.mark.flower
@pytest.mark.slow
def test_sampled_patches_flower_equals_inprocess(make_cfg, tmp_path):
    """Catch-up patches (#16) under sampling, m = 10 of N = 100 with 20 %
    drops, J = 1000, k = 5: the Flower nodes apply the patches (from the
    round their replica holds, or from model_0 they build from the seed) and
    every reply names the digest of the replica it computed on, which the
    server checks: no rejection means every replica was bitwise the server's
    model. The in-process run plans the same messages: patches, resyncs and
    bytes are equal round by round, and the model agrees within 1e-6."""
    ip, fl = _both(make_cfg, tmp_path, ["task=linreg", "task.dim=1000",
                                        "task.samples_per_worker=20", "num_workers=100",
                                        "rounds=25", "sparsifier=regtopk",
                                        "sparsifier.sparsity=0.005", "sparsifier.mu=2",
                                        "threads=1", "participation.clients_per_round=10",
                                        "faults.drop_prob=0.2", "eval_every=5"])
    r_ip, r_fl = _rows(ip), _rows(fl)
    for a, b in zip(r_ip, r_fl):
        for key in COUNTS + ("sampled",):
            assert a[key] == b[key], (key, a["round"])
    assert all(int(r["rejected"]) == 0 for r in r_fl)
    patches = sum(int(r["patches"]) for r in r_fl)
    resyncs = sum(int(r["resyncs"]) for r in r_fl)
    assert patches > 150 and resyncs < patches / 10
    model = 1000 * 8 + 16 + 16  # what a resync sends
    sent = sum(int(r["downlink_coded_bytes"]) for r in r_fl[2:])
    assert sent < 0.3 * model * 10 * 23  # against a model per sampled client
    assert sum(int(r["missing"]) for r in r_fl) > 20
    assert _rel(_final_model(fl)["params"], _final_model(ip)["params"]) <= 1e-6
