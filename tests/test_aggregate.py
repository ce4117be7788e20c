"""Aggregation rules (regtopk_fl/aggregate/, conf/aggregate/): the paper's
mean in its exact arithmetic, the robust rules' properties, and a new rule
added as one code file and one yaml, chosen with ``aggregate=<name>``."""
import shutil
import textwrap

import pytest
import torch

from regtopk_fl import settings
from regtopk_fl.aggregate import Batch, CenteredClip, Mean, Median, TrimmedMean, from_cfg
from regtopk_fl.fedround import FedServer, Reply
from regtopk_fl.payload import Upload
from regtopk_fl.runner import run_experiment
from regtopk_fl.settings import CONF_DIR, group_options, validate


def _replies(n=5, dim=50, k=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for w in range(n):
        idx = torch.randperm(dim, generator=gen)[:k].sort().values
        out.append(Reply(w, Upload(torch.randn(k, generator=gen, dtype=torch.float64), idx, dim),
                         10 + w))
    return out


def _g(rule, replies, dim=50):
    s = FedServer(torch.zeros(dim, dtype=torch.float64), lr=1.0)
    s.aggregate = rule
    return s.step(replies).grad


def test_mean_adds_the_uploads_one_by_one_in_worker_order():
    """The paper's g, bitwise the sum of w_n g_hat_n added worker by worker
    (the scatter-add over all uploads performs the same additions)."""
    replies = _replies()
    total = float(sum(r.num_examples for r in replies))
    want = torch.zeros(50, dtype=torch.float64)
    for r in replies:
        want.index_add_(0, r.upload.indices, r.upload.values * (r.num_examples / total))
    assert torch.equal(_g(Mean(), replies), want)
    assert torch.equal(_g(Mean(), list(reversed(replies))), want)  # the server sorts them


def test_every_rule_writes_g_only_on_the_union_support():
    replies = _replies()
    support = torch.unique(torch.cat([r.upload.indices for r in replies]))
    off = torch.ones(50, dtype=torch.bool)
    off[support] = False
    for rule in (Mean(), Median(), TrimmedMean(0.2), CenteredClip()):
        g = _g(rule, replies)
        assert torch.isfinite(g).all() and not g[off].any(), rule.name
    assert _g(Mean(), replies)[support].all() and _g(CenteredClip(), replies)[support].any()
    # sparse uploads: an entry that at most half the workers sent has median 0
    senders = torch.zeros(50)
    for r in replies:
        senders[r.upload.indices] += 1
    assert not _g(Median(), replies)[senders <= 2].any()


def test_centered_clip_is_the_mean_without_clipping_and_bounds_an_outlier():
    replies = _replies()
    mean = _g(Mean(), replies)
    assert torch.allclose(_g(CenteredClip(clip_ratio=1e9, iters=1), replies), mean,
                          rtol=0, atol=1e-15)
    bad = list(replies)
    bad[4] = Reply(4, Upload(replies[4].upload.values * 1e6, replies[4].upload.indices, 50), 14)
    honest_mean = _g(Mean(), replies[:4])
    gap_mean = float((_g(Mean(), bad) - honest_mean).norm())
    gap_cc = float((_g(CenteredClip(clip_ratio=1.0), bad) - honest_mean).norm())
    norms = sorted(float(r.upload.values.norm()) for r in bad)
    tau = norms[(len(norms) - 1) // 2]  # lower median
    assert gap_mean > 1e4 and gap_cc < 3 * tau  # a few radii, not 1e6


def test_robust_rules_follow_the_honest_majority():
    replies = _replies(n=5, k=50)  # dense-like: every worker on every entry
    bad = list(replies)
    bad[4] = Reply(4, Upload(replies[4].upload.values * -1e4, replies[4].upload.indices, 50), 14)
    for rule in (Median(), TrimmedMean(0.2), CenteredClip()):
        assert float(_g(rule, bad).abs().max()) < 10, rule.name
    assert float(_g(Mean(), bad).abs().max()) > 100


def test_choices_and_parameters_come_from_the_config_group(make_cfg):
    assert set(group_options("aggregate")) >= {"mean", "trimmed_mean", "median", "centered_clip"}
    rule = from_cfg(make_cfg(["aggregate=trimmed_mean", "aggregate.trim_fraction=0.25"]))
    assert isinstance(rule, TrimmedMean) and rule.trim_fraction == 0.25
    assert isinstance(from_cfg(make_cfg([])), Mean) and Mean.paper
    assert not any(c.paper for c in (Median, TrimmedMean, CenteredClip))


RULE = textwrap.dedent('''
    """A rule added for the test: g is the upload of the lowest-numbered worker."""
    from regtopk_fl.aggregate import Rule


    class FirstWorker(Rule):
        name = "first_worker"

        def __init__(self, factor: float = 1.0, **_):
            self.factor = float(factor)

        def combine(self, g, batch):
            up = batch.replies[0].upload
            g[up.indices] = up.values * self.factor
''')


def test_a_new_rule_is_one_code_file_and_one_yaml(tmp_path, monkeypatch):
    """Written here into a copy of conf/ and onto sys.path: no other file
    changes, and ``aggregate=first_worker`` validates and runs."""
    from hydra import compose, initialize_config_dir

    (tmp_path / "my_rules.py").write_text(RULE)  # the one code file
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "aggregate" / "first_worker.yaml").write_text(  # the one yaml
        "_target_: my_rules.FirstWorker\nname: first_worker\nfactor: 2.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(settings, "CONF_DIR", conf)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "aggregate=first_worker", "task=linreg", "task.dim=20", "num_workers=3", "rounds=1",
            "sparsifier=topk", "sparsifier.sparsity=0.2", "lr=0.5", "threads=1",
            "checkpoint.every=0", "progress=false"])
    assert "first_worker" in group_options("aggregate")
    validate(cfg)
    seen = []
    from regtopk_fl import fedround
    collect = fedround.Coordinator.collect

    def recording(self, replies, rejected=None):
        seen.append([r.upload for r in sorted(replies, key=lambda r: r.worker)])
        return collect(self, replies, rejected)

    monkeypatch.setattr(fedround.Coordinator, "collect", recording)
    run_experiment(cfg, tmp_path / "run")
    from regtopk_fl.runner import build
    task, _ = build(cfg)
    first = seen[0][0]
    want = task.init_params().clone()
    want[first.indices] -= 0.5 * 2.0 * first.values  # lr x the rule's g
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["params"]
    assert torch.equal(got, want)
    monkeypatch.setattr(settings, "CONF_DIR", CONF_DIR)
    with pytest.raises(settings.ConfigError, match="aggregate.name='first_worker'"):
        validate(cfg)  # the real conf/ does not know it


def test_batch_reports_dense_uploads():
    dense = Reply(0, Upload(torch.zeros(4, dtype=torch.float64), None, 4), 1)
    sparse = Reply(1, Upload(torch.zeros(1, dtype=torch.float64), torch.tensor([2]), 4), 1)
    assert Batch([dense, sparse], [0.5, 0.5], ()).dense
    assert not Batch([sparse], [1.0], ()).dense
