"""Faults during a run (drops, NaN uploads), partial participation, and
checkpoint/resume after SIGKILL."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from regtopk_fl.compress import RegTopK
from regtopk_fl.engine import InProcessRun
from regtopk_fl.fedround import Coordinator, FedServer, worker_round
from regtopk_fl.memory import ErrorFeedbackMemory
from regtopk_fl.runner import run_experiment
from regtopk_fl.tasks.linreg import LinRegTask


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


def _launch(run_dir, rounds):
    args = [sys.executable, "-m", "regtopk_fl", "task=tiny_image", "num_workers=4",
            f"rounds={rounds}", "sparsifier=regtopk", "sparsifier.sparsity=0.05",
            "sparsifier.mu=2", "eval_every=10", "checkpoint.every=5", "lr=0.1", "threads=1",
            f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _strip_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


@pytest.mark.slow
def test_sigkill_twice_then_resume_is_identical(tmp_path):
    rounds = 60
    ref = _launch(tmp_path / "ref", rounds)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    run_dir = tmp_path / "killed"
    for kills in range(2):
        proc = _launch(run_dir, rounds)
        ckpt = run_dir / "checkpoint.pt"
        start_mtime = ckpt.stat().st_mtime if ckpt.exists() else 0
        deadline = time.time() + 300
        while time.time() < deadline:  # wait for a fresh checkpoint, then kill hard
            if ckpt.exists() and ckpt.stat().st_mtime > start_mtime:
                break
            time.sleep(0.05)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not (run_dir / "model.pt").exists()
    proc = _launch(run_dir, rounds)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert _strip_wall(_rows(run_dir)) == _strip_wall(_rows(tmp_path / "ref"))
    a = torch.load(run_dir / "model.pt", weights_only=False)
    b = torch.load(tmp_path / "ref" / "model.pt", weights_only=False)
    assert torch.equal(a["params"], b["params"]) and torch.equal(a["buffers"], b["buffers"])
