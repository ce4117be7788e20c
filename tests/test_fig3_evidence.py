"""Issue #30's switches: a warm start from a file (``task.init_from``), disjoint
training slices (``task.subset_offset``), the authors' test in train mode
(``task.eval_mode``) and their 1/N average (``server.weighting``)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from regtopk_fl.runner import build, run_experiment
from regtopk_fl.settings import ConfigError, validate
from regtopk_fl.tasks import data as D
from regtopk_fl.tasks.images import TinyImageTask
from regtopk_fl.tasks.models import tiny_cnn
from regtopk_fl.trust import Guard, TrustPolicy

TINY = ["task=tiny_image", "num_workers=3", "task.samples=120",
        "rounds=2", "threads=1", "progress=false", "sparsifier=topk", "lr=0.5"]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished 2-round tiny_image run (its model.pt is a trained model)."""
    from tests.conftest import compose_cfg

    out = tmp_path_factory.mktemp("source")
    summary = run_experiment(compose_cfg(TINY), out)
    assert summary["status"] == "finished"
    return out


def test_init_from_model_pt_is_bitwise_the_file(make_cfg, source_run):
    saved = torch.load(source_run / "model.pt", weights_only=True)
    task, _ = build(make_cfg([*TINY, f"task.init_from={source_run / 'model.pt'}"]))
    assert torch.equal(task.init_params(), saved["params"])
    assert torch.equal(task.init_buffers(), saved["buffers"])
    # and it is not the seeded init
    fresh, _ = build(make_cfg(TINY))
    assert not torch.equal(fresh.init_params(), saved["params"])


def test_init_from_state_dict_of_the_same_network(make_cfg, tmp_path):
    model = tiny_cnn(3, 10, 16, 8, seed=7)
    with torch.no_grad():
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(0.25)  # buffers unlike the seeded init's
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    task, _ = build(make_cfg([*TINY, f"task.init_from={tmp_path / 'sd.pt'}"]))
    want = torch.nn.utils.parameters_to_vector(model.parameters())
    assert torch.equal(task.init_params(), want)
    bufs = [b for n, b in model.named_buffers() if b.is_floating_point()]
    assert torch.equal(task.init_buffers(), torch.cat([b.reshape(-1) for b in bufs]))


def test_the_run_records_where_it_started(make_cfg, source_run, tmp_path):
    src = source_run / "model.pt"
    summary = run_experiment(make_cfg([*TINY, f"task.init_from={src}"]), tmp_path / "warm")
    rec = summary["init_from"]
    import hashlib

    assert rec["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert rec["source_config_sha256"] == json.loads(
        (source_run / "summary.json").read_text())["config_sha256"]
    assert json.loads((tmp_path / "warm" / "summary.json").read_text())["init_from"] == rec
    # a run without it has no such field
    assert "init_from" not in json.loads((source_run / "summary.json").read_text())


@pytest.mark.parametrize("bad, says", [
    (["+task.width=8"], "its params have shape"),      # another width: model.pt
    ("missing", "is not a file"),
    ("junk", "neither a model.pt of this suite nor a state_dict"),
])
def test_init_from_refused_with_one_line(make_cfg, source_run, tmp_path, bad, says):
    if bad == "missing":
        args = [*TINY, f"task.init_from={tmp_path / 'nope.pt'}"]
    elif bad == "junk":
        torch.save({"a": 1}, tmp_path / "junk.pt")
        args = [*TINY, f"task.init_from={tmp_path / 'junk.pt'}"]
    else:
        args = [*TINY, *bad, f"task.init_from={source_run / 'model.pt'}"]
    with pytest.raises(ConfigError) as exc:
        validate(make_cfg(args))
    msg = str(exc.value)
    assert msg.startswith("task.init_from=") and says in msg and "\n" not in msg


def test_refused_init_file_leaves_no_run_directory(source_run, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    proc = subprocess.run(
        [sys.executable, "-m", "regtopk_fl", *TINY, "+task.width=8",
         f"task.init_from={source_run / 'model.pt'}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "task.init_from=" in lines[0] and "[" in lines[0], proc.stderr
    assert not run_dir.exists()


def test_subset_offset_takes_disjoint_slices():
    y = np.repeat(np.arange(10), 7)[np.random.default_rng(0).permutation(70)]
    x = np.arange(70, dtype=np.uint8).reshape(70, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    arrs = D.CifarArrays(x, y, x[:10], y[:10], "synthetic")
    first = D._take(arrs, 3, None)
    second = D._take(arrs, 3, None, offset=3)
    rest = D._take(arrs, None, None, offset=3)
    a, b, r = (set(t.x_train[:, 0, 0, 0].tolist()) for t in (first, second, rest))
    assert len(a) == len(b) == 30 and not a & b and b <= r and len(r) == 40 and not a & r
    assert np.bincount(second.y_train, minlength=10).tolist() == [3] * 10
    # in data order within each class: the offset slice continues where the first ended
    for c in range(10):
        ids = np.flatnonzero(y == c)
        assert first.x_train[first.y_train == c][:, 0, 0, 0].tolist() == ids[:3].tolist()
        assert second.x_train[second.y_train == c][:, 0, 0, 0].tolist() == ids[3:6].tolist()


def test_subset_offset_validation(make_cfg, tmp_path):
    # an archive path that exists, so that the check reached is the subset's,
    # also on a clone without ../shared/data (CI)
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    archive.write_bytes(b"")
    base = ["experiment=fig3_cifar10_cpu", f"task.data_path={archive}", "task.download=false"]
    with pytest.raises(ConfigError, match=r"task.subset_per_class=3000: with task.subset_offset"):
        validate(make_cfg([*base, "task.subset_offset=2500", "task.subset_per_class=3000"]))
    with pytest.raises(ConfigError, match=r"task.subset_offset=-1"):
        validate(make_cfg([*base, "task.subset_offset=-1"]))
    validate(make_cfg([*base, "task.subset_offset=2500", "task.subset_per_class=2500"]))


def test_eval_mode_train_reads_no_running_statistics():
    task = TinyImageTask(num_workers=2, samples=100, num_test=50, eval_mode="train",
                         eval_batch_size=20)
    p, b = task.init_params(), task.init_buffers()
    other = b * 3.0 + 1.0
    assert task.evaluate(p, b) == task.evaluate(p, other)
    # in eval mode the statistics are what normalises: the same change moves the result
    ev = TinyImageTask(num_workers=2, samples=100, num_test=50)
    assert ev.evaluate(p, b) != ev.evaluate(p, other)
    # and evaluating in train mode leaves the server's buffers as they were
    keep = other.clone()
    task.evaluate(p, other)
    assert torch.equal(other, keep)


def test_eval_mode_is_validated(make_cfg):
    with pytest.raises(ConfigError, match=r"task.eval_mode='batch': must be one of eval, train"):
        validate(make_cfg([*TINY, "task.eval_mode=batch"]))


class _R:
    def __init__(self, worker, n):
        self.worker, self.num_examples = worker, n


def test_uniform_weighting_ignores_data_sizes():
    replies = [_R(0, 10), _R(2, 50), _R(3, 40)]
    sizes = [10, 999, 50, 40]
    share = Guard(TrustPolicy(), sizes, None, "").weights(replies)
    assert share == [0.1, 0.5, 0.4]
    uni = Guard(TrustPolicy(weighting="uniform"), sizes, None, "").weights(replies)
    assert uni == [1 / 3] * 3


def test_uniform_weighting_in_a_run(make_cfg, tmp_path):
    """Unequal shares: the uniform run's global step differs from the data-share
    run's, and its round-1 g is the plain mean of the uploads."""
    from regtopk_fl.engine import InProcessRun
    from regtopk_fl import trust

    args = [*TINY, "task.partition=unequal", "sparsifier=dense", "rounds=1"]
    outs = {}
    for w in ("data_share", "uniform"):
        cfg = make_cfg([*args, f"server.weighting={w}"])
        validate(cfg)
        task, sp = build(cfg)
        run = InProcessRun(task, sp, lr=cfg.lr)
        trust.install(run.server, cfg, task, None, sp)
        outs[w] = run.round(1)["outcome"]
    sizes = task.num_examples()
    assert len(set(sizes)) > 1
    assert list(outs["uniform"].weights.values()) == [1 / 3] * 3
    assert [round(v, 12) for v in outs["data_share"].weights.values()] == \
        [round(s / sum(sizes), 12) for s in sizes]
    assert not torch.equal(outs["uniform"].grad, outs["data_share"].grad)


def test_weighting_is_validated(make_cfg):
    with pytest.raises(ConfigError, match=r"server.weighting='equal': must be one of"):
        validate(make_cfg([*TINY, "server.weighting=equal"]))


def test_defaults_keep_the_fingerprint(make_cfg):
    from regtopk_fl.checkpoint import config_fingerprint

    base = config_fingerprint(make_cfg(["experiment=fig3_cifar10_cpu"]))
    same = ["task.eval_mode=eval", "task.init_from=null", "task.subset_offset=0",
            "server.weighting=data_share"]
    assert config_fingerprint(make_cfg(["experiment=fig3_cifar10_cpu", *same])) == base
    for new in ("task.eval_mode=train", "server.weighting=uniform", "task.subset_offset=10"):
        assert config_fingerprint(make_cfg(["experiment=fig3_cifar10_cpu", new])) != base
