"""Faults during a run (drops, NaN uploads), partial participation, and
checkpoint/resume after SIGKILL."""
import csv
import json
import signal
import sys
from pathlib import Path

import pytest
import torch

from regtopk_fl.compress import RegTopK
from regtopk_fl.engine import InProcessRun
from regtopk_fl.fedround import Coordinator, FedServer, worker_round
from regtopk_fl.memory import ErrorFeedbackMemory
from regtopk_fl.runner import run_experiment
from regtopk_fl.tasks.linreg import LinRegTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from kill_resume import differences, launch, rows  # noqa: E402


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_drops_still_converge_and_are_counted(make_cfg, tmp_path):
    """With 20 % of replies lost each round, the weights are renormalised over
    the replies present, so even dense SGD only reaches a noise ball around
    w* (heterogeneous workers); RegTop-k must get there as well as dense."""
    finals = {}
    for sp in ("dense", "regtopk"):
        cfg = make_cfg(["task=linreg", "num_workers=20", "rounds=1000", f"sparsifier={sp}",
                        "sparsifier.sparsity=0.6", "sparsifier.mu=4", "faults.drop_prob=0.2"])
        run_experiment(cfg, tmp_path / sp)
        rows = _rows(tmp_path / sp)
        missing = [int(r["missing"]) for r in rows[1:]]
        assert 0.15 < sum(missing) / (20 * len(missing)) < 0.25  # about 20 % of replies lost
        gaps = [float(r["gap"]) for r in rows[-200:]]
        finals[sp] = sum(gaps) / len(gaps)
        assert finals[sp] < 0.2 * float(rows[0]["gap"])
    assert finals["regtopk"] < 2.0 * finals["dense"]


def test_nan_uploads_are_rejected_and_the_model_stays_finite(make_cfg, tmp_path):
    cfg = make_cfg(["task=linreg", "num_workers=5", "rounds=200", "sparsifier=topk",
                    "sparsifier.sparsity=0.5", "faults.nan_prob=0.3"])
    run_experiment(cfg, tmp_path)
    rows = _rows(tmp_path)
    assert sum(int(r["rejected"]) for r in rows) > 0
    assert all(float(r["gap"]) == float(r["gap"]) for r in rows)  # no NaN
    model = torch.load(tmp_path / "model.pt", weights_only=False)["params"]
    assert torch.isfinite(model).all()


def test_round_with_no_valid_reply_leaves_model_unchanged():
    task = LinRegTask(num_workers=3, dim=10, samples_per_worker=20)
    run = InProcessRun(task, RegTopK(0.5, mu=1), lr=0.01, fault_cfg={"nan_prob": 1.0})
    before = run.server.params.clone()
    r = run.round(1)
    assert r["outcome"].accepted == [] and len(r["outcome"].rejected) == 3
    assert torch.equal(run.server.params, before)


def test_rejected_upload_goes_back_into_the_residual():
    """Error feedback loses nothing when the server drops an upload."""
    task = LinRegTask(num_workers=2, dim=8, samples_per_worker=20)
    sp = RegTopK(0.25, mu=1)
    mem = ErrorFeedbackMemory(2, 8, torch.float64)
    coord = Coordinator(FedServer(task.init_params(), lr=0.01))
    replies = worker_round(task, mem, sp, coord.server.params, None, [None, None], [0, 1], 1)
    sent0 = replies[0].upload.dense()
    eps_before = mem.eps.clone()
    replies[0].upload.values = torch.full_like(replies[0].upload.values, float("nan"))
    out = coord.collect(replies)
    assert 0 in out.rejected and out.accepted == [1]
    from regtopk_fl.fedround import apply_feedback
    apply_feedback(mem, coord.feedback_for([0, 1]))
    assert torch.equal(mem.eps[0], eps_before[0] + sent0)  # residual + what never arrived
    assert int(mem.prev_counts[0]) == 0  # its mask is forgotten: Delta = Q next round
    assert int(mem.prev_counts[1]) == 2


def test_absent_worker_uses_the_global_gradient_of_its_last_round():
    task = LinRegTask(num_workers=2, dim=10, samples_per_worker=30)
    sp = RegTopK(0.3, mu=1)
    mem = ErrorFeedbackMemory(2, 10, torch.float64)
    coord = Coordinator(FedServer(task.init_params(), lr=0.01))
    reps = worker_round(task, mem, sp, coord.server.params, None, coord.feedback_for([0, 1]),
                        [0, 1], 1)
    g1 = coord.collect(reps).grad.clone()
    idx0 = reps[0].upload.indices.clone()
    # round 2: worker 0 is away; worker 1 alone moves the model
    reps = worker_round(task, mem, sp, coord.server.params, None, coord.feedback_for([1]), [1], 2,
                        rows=[1])
    g2 = coord.collect(reps).grad.clone()
    assert not torch.equal(g1[idx0], g2[idx0])
    # round 3: worker 0 is back; its feedback is round 1's, on round 1's mask
    fb = coord.feedback_for([0])[0]
    assert torch.equal(fb.values, g1[idx0])
    from regtopk_fl.fedround import apply_feedback
    apply_feedback(mem, [fb], rows=[0])
    local, counts, sent, fb_g = mem._gather_rows([0])
    assert torch.equal(local, idx0) and torch.equal(fb_g, g1[idx0])


@pytest.mark.flower
@pytest.mark.slow
def test_faults_agree_between_runtimes(make_cfg, tmp_path):
    """Same injected faults, same recovery, in Flower and in-process."""
    models = {}
    for runtime in ("inprocess", "flower"):
        cfg = make_cfg(["task=linreg", "num_workers=4", "rounds=20", "sparsifier=regtopk",
                        "sparsifier.sparsity=0.3", "faults.drop_prob=0.25",
                        "faults.nan_prob=0.2", f"runtime={runtime}"])
        run_experiment(cfg, tmp_path / runtime)
        models[runtime] = torch.load(tmp_path / runtime / "model.pt", weights_only=False)["params"]
        rows = _rows(tmp_path / runtime)
        models[runtime + "_faults"] = [(r["missing"], r["rejected"]) for r in rows]
    assert models["inprocess_faults"] == models["flower_faults"]
    assert any(m != "0" or j != "0" for m, j in models["inprocess_faults"][1:])
    diff = (models["flower"] - models["inprocess"]).abs().max() / models["inprocess"].abs().max()
    assert float(diff) <= 1e-6


def _checkpoint(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


TINY = ["task=tiny_image", "num_workers=4", "rounds=60", "sparsifier=regtopk",
        "sparsifier.sparsity=0.05", "sparsifier.mu=2", "eval_every=10", "checkpoint.every=5",
        "lr=0.1", "threads=1"]


@pytest.mark.slow
def test_sigkill_twice_then_resume_is_identical(tmp_path):
    """tiny_image, in-process: killed after rounds 13 and 37 (checkpoints at
    10 and 35), resumed, bitwise equal to an uninterrupted run."""
    assert launch(tmp_path / "ref", TINY)[0] == 0
    run_dir = tmp_path / "killed"
    for crash, ckpt_round in ((13, 10), (37, 35)):
        rc, err = launch(run_dir, TINY, crash_after=crash)
        assert rc == -signal.SIGKILL, err
        assert not (run_dir / "model.pt").exists()
        assert _checkpoint(run_dir)["round"] == ckpt_round
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "running" and summary["rounds_done"] >= ckpt_round
        rows = _rows(run_dir)  # never truncated: rows 0..ckpt_round at least, in order
        assert [int(r["round"]) for r in rows] == list(range(len(rows)))
        assert len(rows) > ckpt_round
    rc, err = launch(run_dir, TINY)
    assert rc == 0, err
    assert differences(run_dir, tmp_path / "ref") == []
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert not (run_dir / "checkpoint.pt").exists()


@pytest.mark.flower
@pytest.mark.slow
def test_flower_run_killed_and_resumed_is_identical(tmp_path):
    """runtime=flower: the checkpoint holds every client's memory (also of a
    client that missed the checkpoint round), the resumed run hands them back,
    and the result is bitwise the uninterrupted Flower run's. The resumed
    simulation's nodes hold no replica, and say so when identified: each is
    patched from model_0 (which it builds from the seed), not sent the model.
    J = 1000 with k = 10 per worker: five rounds change far fewer than J."""
    from regtopk_fl import faults

    args = ["task=linreg", "task.dim=1000", "task.samples_per_worker=100", "num_workers=4",
            "rounds=20", "runtime=flower", "threads=1", "sparsifier=regtopk",
            "sparsifier.sparsity=0.01", "faults.drop_prob=0.25", "faults.nan_prob=0.1",
            "checkpoint.every=5"]
    assert launch(tmp_path / "ref", args)[0] == 0
    run_dir = tmp_path / "killed"
    rc, err = launch(run_dir, args, crash_after=8)
    assert rc == -signal.SIGKILL, err
    ckpt = _checkpoint(run_dir)
    assert ckpt["round"] == 5 and sorted(ckpt["state"]["memories"]) == [0, 1, 2, 3]
    eps = [m["state"]["eps"] for m in ckpt["state"]["memories"].values()]
    assert all(e.shape == (1, 1000) for e in eps) and all(e.abs().sum() > 0 for e in eps)
    assert ckpt["state"]["coord"]["downlink"]["changed"].max() == 5  # the entries' last rounds
    rc, err = launch(run_dir, args)
    assert rc == 0, err
    assert "could not restore" not in err
    # a node is caught up the first time it is sent something after the
    # resume (a node that drops keeps no replica of this run until it gets
    # one); from then on the downlink, and everything else, the model
    # included, is bitwise the uninterrupted run's
    caught, catch_up = set(), []
    for t in range(6, 21):
        if len(caught) < 4:
            catch_up.append(t)
        caught |= {n for n in range(4) if not faults.drops({"drop_prob": 0.25}, 0, n, t)}
    assert differences(run_dir, tmp_path / "ref", resync_rounds=catch_up) == []
    resumed, ref = ({r["round"]: r for r in rows(d)} for d in (run_dir, tmp_path / "ref"))
    assert int(resumed["6"]["patches"]) == 4 and int(resumed["6"]["resyncs"]) == 0
    full = 4 * (1000 * 8 + 16 + 16)  # what the resumed round sent before: four models
    assert int(resumed["6"]["downlink_coded_bytes"]) < full / 3
    assert int(resumed["6"]["downlink_coded_bytes"]) > int(ref["6"]["downlink_coded_bytes"])
    assert all(int(r["rejected"]) == int(ref[r["round"]]["rejected"])  # no stale replica
               for r in resumed.values())


def test_sampled_run_killed_and_resumed_is_identical(tmp_path):
    """Client sampling (#12), in-process: the per-client states of the clients
    sampled so far (ClientStates) and their last rounds are in the checkpoint,
    and the sampler needs no state (seeded by (seed, round)), so the resumed
    run samples the same clients and ends bitwise equal. So do the downlink's
    patches (#16): the entries' last rounds and the replicas' rounds are in
    the checkpoint too (metrics.csv's patch and resync counts and bytes)."""
    args = ["task=linreg", "task.dim=1000", "task.samples_per_worker=50", "num_workers=20",
            "rounds=30", "sparsifier=regtopk",
            "sparsifier.sparsity=0.01", "participation.clients_per_round=4",
            "participation.weighted=true", "task.size_ratio=4", "faults.drop_prob=0.2",
            "checkpoint.every=10", "threads=1"]
    assert launch(tmp_path / "ref", args)[0] == 0
    rc, out = launch(tmp_path / "killed", args, crash_after=14)
    assert rc == -signal.SIGKILL, out
    ckpt = _checkpoint(tmp_path / "killed")
    assert ckpt["round"] == 10
    clients = ckpt["state"]["run"]["memory"]["clients"]
    assert 4 <= len(clients) < 20  # only clients that took part hold state
    assert launch(tmp_path / "killed", args)[0] == 0
    assert differences(tmp_path / "killed", tmp_path / "ref") == []
    assert {r["sampled"] for r in _rows(tmp_path / "ref")[1:]} == {"4"}
    patches = [int(r["patches"]) for r in _rows(tmp_path / "ref")]
    assert sum(patches[11:]) > 10  # returning clients after the resume point were patched


def test_observations_survive_a_resume(tmp_path):
    """observe.every rows taken before the crash are in the checkpoint, so the
    resumed run's observations.csv equals the uninterrupted run's (timings aside)."""
    args = ["task=linreg", "num_workers=4", "rounds=30", "sparsifier=regtopk",
            "sparsifier.sparsity=0.3", "observe.every=5", "checkpoint.every=10", "threads=1"]
    assert launch(tmp_path / "ref", args)[0] == 0
    rc, out = launch(tmp_path / "killed", args, crash_after=17)
    assert rc == -signal.SIGKILL, out
    assert launch(tmp_path / "killed", args)[0] == 0

    def observations(run_dir):
        with open(run_dir / "observations.csv") as fh:
            return [{k: v for k, v in r.items() if not k.endswith("_select_s")}
                    for r in csv.DictReader(fh)]

    ref = observations(tmp_path / "ref")
    assert [int(r["round"]) for r in ref] == [1, 5, 10, 15, 20, 25, 30]
    assert observations(tmp_path / "killed") == ref
    assert differences(tmp_path / "killed", tmp_path / "ref") == []


def test_rerun_of_a_finished_run_does_nothing_and_another_config_is_refused(tmp_path):
    args = ["task=linreg", "num_workers=3", "rounds=5", "threads=1"]
    run_dir = tmp_path / "run"
    assert launch(run_dir, args)[0] == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()
              and p.suffix != ".log"}
    rc, err = launch(run_dir, args)
    assert rc == 0 and "already holds this finished run" in err
    rc, err = launch(run_dir, [*args[:-2], "rounds=6", "threads=1"])
    assert rc == 2
    assert err.strip().splitlines()[-1] == (f"regtopk-fl: error: hydra.run.dir={run_dir}: holds a "
                                            "run of another configuration; choose a new directory "
                                            "(nothing was changed)")
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()
             and p.suffix != ".log"}
    assert after == before
    other = tmp_path / "other"  # and the comparison the resume tests rely on can fail
    assert launch(other, [*args[:-2], "rounds=5", "seed=1", "threads=1"])[0] == 0
    assert differences(run_dir, other) == ["metrics.csv differs from row 0",
                                           "model.pt params differ"]


def test_auto_checkpoints_follow_the_clock(make_cfg):
    from regtopk_fl import checkpoint

    ck = checkpoint.Checkpointer(make_cfg(["rounds=50", "checkpoint.seconds=300"]), "/nonexistent")
    now = [1000.0]
    ck.clock, ck._last = (lambda: now[0]), now[0]
    assert ck.every == "auto"
    now[0] += 299
    assert not ck.due(3)
    now[0] += 2
    assert ck.due(4) and not ck.due(50)  # never after the last round
    fixed = checkpoint.Checkpointer(make_cfg(["rounds=50", "checkpoint.every=7"]), "/x")
    assert [t for t in range(1, 51) if fixed.due(t)] == [7, 14, 21, 28, 35, 42, 49]
    off = checkpoint.Checkpointer(make_cfg(["rounds=50", "checkpoint.every=0"]), "/x")
    assert not any(off.due(t) for t in range(1, 51))
