"""Issue #33, part 2: a robust rule made for sparse uploads (``upload_clip``,
regtopk_fl/aggregate/upload_clip.py) and the adaptive attacks that know the
rule (``ipm``, ``alie``; regtopk_fl/hostile.py): the rule's properties as its
docstring derives them, the attacks' uploads, bad settings in one line, and
the rule under attack in both runtimes."""
import math

import pytest
import torch

from regtopk_fl import fedround, hostile
from regtopk_fl.aggregate import AggregateError, Mean, Median, from_cfg, lower_median
from regtopk_fl.aggregate.upload_clip import UploadClip, scales
from regtopk_fl.fedround import FedServer, Reply
from regtopk_fl.payload import Upload
from regtopk_fl.runner import run_experiment
from regtopk_fl.settings import ConfigError, group_options, validate


def _replies(n=6, dim=60, k=6, seed=0, dense_one=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for w in range(n):
        if dense_one and w == 0:
            up = Upload(torch.randn(dim, generator=gen, dtype=torch.float64) * 0.3, None, dim)
        else:
            idx = torch.randperm(dim, generator=gen)[:k].sort().values
            up = Upload(torch.randn(k, generator=gen, dtype=torch.float64), idx, dim)
        out.append(Reply(w, up, 10 + w))
    return out


def _g(rule, replies, dim=60):
    s = FedServer(torch.zeros(dim, dtype=torch.float64), lr=1.0)
    s.aggregate = rule
    return s.step(replies).grad


def _norms(replies):
    return [float(r.upload.values.norm()) for r in replies]


def _scaled(reply, factor):
    up = reply.upload
    return Reply(reply.worker, Upload(up.values * factor, up.indices, up.dim), reply.num_examples)


# -- the rule -------------------------------------------------------------------------------
@pytest.mark.parametrize("dense_one", [False, True])
def test_upload_clip_is_the_mean_bitwise_when_no_upload_is_above_the_radius(dense_one):
    """Sparse uploads on nearly disjoint supports (where the median is 0 almost
    everywhere): upload_clip is bit for bit the paper's mean."""
    replies = _replies(dense_one=dense_one)
    norms = _norms(replies)
    assert max(norms) <= 4.0 * lower_median(norms)  # the premise: nothing to clip
    mean = _g(Mean(), replies)
    assert torch.equal(_g(UploadClip(), replies), mean)
    if not dense_one:  # the dense-made rule loses what few workers sent
        assert float(_g(Median(), replies).abs().sum()) < 0.2 * float(mean.abs().sum())


def test_an_outlier_is_clipped_then_ignored_and_its_reach_is_bounded():
    replies = _replies()
    total = float(sum(r.num_examples for r in replies))
    w5 = replies[5].num_examples / total
    honest = torch.zeros(60, dtype=torch.float64)
    for r in replies[:5]:
        honest.index_add_(0, r.upload.indices, r.upload.values * (r.num_examples / total))
    rule = UploadClip(clip_ratio=2.0, reject_ratio=5.0)  # no rate limit: one round's reach
    reach = []
    for factor in (1.0, 3.0, 10.0, 30.0, 100.0, 1e6):
        bad = [*replies[:5], _scaled(replies[5], factor)]
        norms = _norms(bad)
        m = lower_median(norms)
        g = _g(rule, bad)
        assert torch.isfinite(g).all()
        dev = float((g - honest).norm())
        assert dev <= w5 * 2.0 * m * (1 + 1e-12)  # the guarantee: at most w_n a m
        reach.append(dev / (w5 * m))
        if norms[5] >= 5.0 * m:  # beyond b m: exactly the others' sum, not renormalised
            assert torch.allclose(g, honest, rtol=0, atol=1e-15)
    assert reach[-1] < 1e-12 and max(reach) > 1.0  # ignored far out, felt nearby
    # the mean follows the outlier without bound
    assert float((_g(Mean(), [*replies[:5], _scaled(replies[5], 1e6)]) - honest).norm()) > 1e4


def test_the_influence_falls_linearly_from_the_clip_radius_to_zero():
    norms = [0.5, 1.0, 1.0, 1.0]  # with r >= 1 the lower median m is 1
    for r, want in ((2.0, 2.0), (3.0, 3.0), (5.0, 1.5), (7.0, 0.0), (9.0, 0.0)):
        s = scales(norms + [r], 3.0, 7.0)  # a = 3, b = 7
        assert s[:4] == [1.0] * 4
        assert s[4] * r == pytest.approx(want, abs=1e-12), r
    # continuous at both ends, never above a m
    grid = [3.0 + 4.0 * i / 200 for i in range(201)]
    infl = [scales(norms + [r], 3.0, 7.0)[4] * r for r in grid]
    assert all(a >= b for a, b in zip(infl, infl[1:])) and infl[0] == pytest.approx(3.0)
    assert infl[-1] == 0.0


def test_the_median_norm_moves_at_most_f_ranks():
    """The docstring's point 2: one attacker of five with a tiny or a huge
    norm keeps m between two honest norms."""
    honest = [1.0, 2.0, 3.0, 4.0]
    for attacker in (0.0, 1e-9, 1e9):
        m = lower_median(honest + [attacker])
        assert min(honest) <= m <= max(honest)


@pytest.mark.parametrize("kw,named", [
    ({"clip_ratio": 0}, "aggregate.clip_ratio=0"),
    ({"clip_ratio": "abc"}, "aggregate.clip_ratio='abc'"),
    ({"reject_ratio": math.inf}, "aggregate.reject_ratio=inf"),
    ({"clip_ratio": 4.0, "reject_ratio": 4.0}, "aggregate.reject_ratio=4.0"),
    ({"clip_ratio": 2.0, "sustained_ratio": 3.0}, "aggregate.sustained_ratio=3.0"),
    ({"sustained_ratio": -1}, "aggregate.sustained_ratio=-1"),
    ({"burst": -1}, "aggregate.burst=-1"),
    ({"burst": "x"}, "aggregate.burst='x'"),
])
def test_bad_parameters_are_named(kw, named):
    with pytest.raises(AggregateError) as err:
        UploadClip(**kw)
    assert str(err.value).startswith(named + ":") and "\n" not in str(err.value)


def test_the_rule_is_a_config_choice_and_bad_values_fail_validation(make_cfg):
    assert "upload_clip" in group_options("aggregate")
    rule = from_cfg(make_cfg(["aggregate=upload_clip", "aggregate.clip_ratio=3"]))
    assert isinstance(rule, UploadClip) and (rule.clip_ratio, rule.reject_ratio) == (3.0, 8.0)
    assert (rule.sustained, rule.burst) == (3.0, 10.0)  # the yaml's rate limit
    assert not UploadClip.paper
    cfg = make_cfg(["aggregate=upload_clip", "aggregate.reject_ratio=2"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith("aggregate.reject_ratio=2:") and "\n" not in str(err.value)


def _round(rule, ratios, dim=30):
    """One round of sparse uploads whose norms are ``ratios`` (worker n's
    upload: entry n at value ratios[n]); g and each worker's delivered ratio."""
    replies = [Reply(n, Upload(torch.tensor([float(r)], dtype=torch.float64), torch.tensor([n]),
                               dim), 10) for n, r in enumerate(ratios)]
    g = _g(rule, replies, dim)
    return g, [float(g[n]) * len(ratios) for n in range(len(ratios))]


def test_the_rate_limit_holds_an_attacker_at_the_radius_to_the_sustained_ratio():
    """Four workers at the median norm 1, worker 4 at 4 medians every round:
    it delivers 4 while its balance lasts (burst 2 / (4 - 3) = 2 rounds),
    then 3 a round; without the limit 4 a round for ever."""
    limited = UploadClip(clip_ratio=4.0, reject_ratio=8.0, sustained_ratio=3.0, burst=2.0)
    static = UploadClip(clip_ratio=4.0, reject_ratio=8.0)
    got, plain = [], []
    for _ in range(6):
        got.append(_round(limited, [1, 1, 1, 1, 4])[1][4])
        plain.append(_round(static, [1, 1, 1, 1, 4])[1][4])
    assert got == pytest.approx([4, 4, 3, 3, 3, 3]) and plain == pytest.approx([4] * 6)
    assert limited.balance[4] == 0.0 and limited.balance[0] == 2.0
    # its state goes through the checkpoint: a fresh rule with it goes on at 3
    again = UploadClip(clip_ratio=4.0, reject_ratio=8.0, sustained_ratio=3.0, burst=2.0)
    again.load_state_dict(limited.state_dict())
    assert _round(again, [1, 1, 1, 1, 4])[1][4] == pytest.approx(3.0)
    assert UploadClip().state_dict() == {}  # no limit (the class's default), no state


def test_the_rate_limit_lets_an_honest_spike_through_bitwise():
    """A worker above the sustained ratio for a few rounds, then below it
    (an early transient): every round is the paper's mean, bit for bit."""
    rule = UploadClip(clip_ratio=4.0, reject_ratio=8.0, sustained_ratio=3.0, burst=10.0)
    for spike in (3.5, 3.9, 3.9, 3.2, 2.0, 1.0, 3.9, 3.9):
        ratios = [1, 1, 1, 1, spike]
        replies = [Reply(n, Upload(torch.tensor([float(r)], dtype=torch.float64),
                                   torch.tensor([n]), 30), 10) for n, r in enumerate(ratios)]
        assert torch.equal(_g(rule, replies, 30), _g(Mean(), replies, 30))
    assert 0 < rule.balance[4] < 10.0


# -- the adaptive attacks ----------------------------------------------------------------------
def _rep(worker, values, indices, dim=8):
    return Reply(worker, Upload(torch.tensor(values, dtype=torch.float64),
                                torch.tensor(indices), dim), 7)


OWN = _rep(3, [3.0, 4.0], [6, 7])  # norm 5, two entries
OTHERS = [_rep(0, [2.0, 4.0], [0, 1]), _rep(1, [4.0, -1.0], [0, 2]),
          _rep(2, [6.0, 0.5], [1, 2])]  # norms 4.47, 4.12, 6.02; lower median with 5: 4.47


def test_ipm_pushes_against_the_others_mean_at_c_medians():
    mu = torch.zeros(8, dtype=torch.float64)
    for r in OTHERS:
        mu[r.upload.indices] += r.upload.values / 3
    up = hostile.byzantine("ipm", OWN, OTHERS, 2.0, 0, 1, 4).upload
    assert up.indices.tolist() == [0, 1]  # |mu| = 2, 3.33, -0.17: its two largest
    m = lower_median(_norms([OWN, *OTHERS]))
    assert float(up.values.norm()) == pytest.approx(2.0 * m)
    want = -mu[[0, 1]]
    assert torch.allclose(up.values / up.values.norm(), want / want.norm())
    assert float(up.values @ mu[[0, 1]]) < 0  # a negative inner product with the mean


def test_alie_stays_in_the_senders_spread_and_pushes_against_the_mean():
    up = hostile.byzantine("alie", OWN, OTHERS, 1.0, 0, 1, 4).upload
    assert up.indices.tolist() == [0, 1]
    # entry 0: senders 2 and 4 (mean 3, std 1), mu > 0 -> 3 - 1 = 2;
    # entry 1: senders 4 and 6 (mean 5, std 1) -> 4
    assert up.values.tolist() == pytest.approx([2.0, 4.0])
    # its count is its honest count, whatever c
    assert hostile.byzantine("alie", OWN, OTHERS, 3.0, 0, 1, 4).upload.values.tolist() == \
        pytest.approx([0.0, 2.0])
    assert hostile.byzantine("ipm", OWN, [], 2.0, 0, 1, 4) is OWN  # alone: honest


def test_the_adaptive_attacks_keep_the_budget_and_a_dense_upload_stays_dense():
    dense = Reply(3, Upload(torch.ones(8, dtype=torch.float64), None, 8), 7)
    for attack in hostile.ADAPTIVE:
        up = hostile.byzantine(attack, dense, OTHERS, 1.0, 0, 1, 4).upload
        assert up.indices is None and up.values.numel() == 8
        up = hostile.byzantine(attack, OWN, OTHERS, 1.0, 0, 1, 4).upload
        assert up.values.numel() == 2 and up.values.dtype == OWN.upload.values.dtype


# -- in a run, both runtimes -------------------------------------------------------------------
BASE = ["task=linreg", "task.dim=40", "num_workers=4", "sparsifier=topk", "sparsifier.sparsity=0.25",
        "threads=1", "checkpoint.every=0", "faults.hostile.worker=3", "rounds=6"]
CLIP = ["aggregate=upload_clip", "aggregate.clip_ratio=1.5", "aggregate.reject_ratio=3",
        "aggregate.sustained_ratio=1.2", "aggregate.burst=0.5"]
SPEC = "faults.hostile.attacks=2:ipm 3:alie 4:sign_flip 5-6:ipm"


def test_upload_clip_bounds_the_attacks_in_a_run(make_cfg, tmp_path):
    """In-process: a 15x sign flip from round 2 on is ignored by the rule
    (beyond b = 3 medians) and throws the mean off; the adaptive attacks
    are made and change the model."""
    models = {}
    flip = "faults.hostile.attacks=2-6:sign_flip"
    for name, extra in (("honest", [*CLIP, "faults.hostile.worker=-1"]),
                        ("adaptive", [*CLIP, SPEC, "faults.hostile.scale=1.5"]),
                        ("clip", [*CLIP, flip]), ("mean", [flip, "aggregate=mean"])):
        s = run_experiment(make_cfg([*BASE, "runtime=inprocess", *extra]), tmp_path / name)
        assert s["status"] == "finished"
        models[name] = torch.load(tmp_path / name / "model.pt", weights_only=False)["params"]
    h = models["honest"]
    assert not torch.equal(models["adaptive"], h) and not torch.equal(models["clip"], h)
    # the rule loses the attacker's share (0.52 from the honest model here), the
    # mean is thrown 8x as far (4.2)
    assert 5 * float((models["clip"] - h).norm()) < float((models["mean"] - h).norm())


@pytest.mark.flower
@pytest.mark.slow
def test_upload_clip_under_the_adaptive_attacks_is_the_same_in_both_runtimes(make_cfg, tmp_path,
                                                                            monkeypatch):
    """ipm, alie and sign_flip (c = 1.5: clipped or in the band) under
    upload_clip: the Grid wrapper makes them under Flower, the engine
    in-process; the server's rule gives the same model within 1e-6."""
    runs = {}
    got = []
    collect = fedround.Coordinator.collect

    def recording(self, replies, rejected=None):
        out = collect(self, replies, rejected)
        got.append(out)
        return out

    monkeypatch.setattr(fedround.Coordinator, "collect", recording)
    for runtime in ("flower", "inprocess"):
        got.clear()
        s = run_experiment(make_cfg([*BASE, *CLIP, f"runtime={runtime}", SPEC,
                                     "faults.hostile.scale=1.5"]), tmp_path / runtime)
        assert s["status"] == "finished", (runtime, s["status"])
        assert len(got) == 6, (runtime, len(got))
        assert all(o.rejected == {} and o.accepted == [0, 1, 2, 3] for o in got), \
            (runtime, [(o.accepted, o.rejected) for o in got])
        runs[runtime] = torch.load(tmp_path / runtime / "model.pt", weights_only=False)["params"]
    a, b = runs["flower"], runs["inprocess"]
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6


# -- the table's script ------------------------------------------------------------------------
def _row(rule, attack, seed, final):
    return {"task": "linreg", "rule": rule, "attack": attack, "seed": seed, "metric": "gap",
            "final": final, "rejected": 0, "status": "finished", "rounds": 300, "seconds": 1.0}


def test_the_table_keeps_the_first_pages_shape_and_adds_what_the_rows_have(tmp_path):
    """The first table's kept rows rebuild its page unchanged (its four
    rules and five attacks, empty cells included); upload_clip, ipm and
    alie appear where rows have them; several CSVs need --out (exit 2)."""
    import csv

    from conftest import load_script

    mod = load_script("byzantine_table")
    first = mod.markdown([_row("centered_clip", "honest", 0, 1.0)], "linreg")
    assert "| attack | mean | trimmed_mean | median | centered_clip |\n" in first
    assert "| random_direction |  |  |  |  |\n" in first and "ipm" not in first
    both = mod.markdown([_row("centered_clip", "honest", 0, 1.0),
                         _row("upload_clip", "ipm", 0, 2.0)], "linreg")
    assert "| centered_clip | upload_clip |" in both and "| ipm |  |  |  |  | 2 |" in both
    assert "alie" not in both
    paths = []
    for name, row in (("a", _row("mean", "honest", 0, 1.0)), ("b", _row("upload_clip", "alie", 0, 3.0))):
        paths.append(tmp_path / f"{name}.csv")
        with open(paths[-1], "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(row))
            w.writeheader()
            w.writerow(row)
    assert mod.main(["--task", "linreg", "--from-csv", *map(str, paths)]) == 2
    assert mod.main(["--task", "linreg", "--from-csv", *map(str, paths),
                     "--out", str(tmp_path / "ab")]) == 0
    text = (tmp_path / "ab.md").read_text()
    assert "| alie |" in text and text.splitlines()[2].endswith("| centered_clip | upload_clip |")


def test_the_adaptive_attacks_know_the_rule(make_cfg):
    from conftest import load_script

    mod = load_script("byzantine_table")
    for rule, want in (("mean", 15.0), ("median", 1.0), ("trimmed_mean", 1.0),
                       ("centered_clip", 2.0), ("upload_clip", 4.0)):
        cfg = make_cfg([f"aggregate={rule}"])
        assert mod.attack_scale(rule, "ipm", cfg, []) == want, rule
        assert mod.attack_scale(rule, "alie", cfg, []) == 1.0
        assert mod.attack_scale(rule, "sign_flip", cfg, []) == 15.0
    cfg = make_cfg(["aggregate=upload_clip", "aggregate.clip_ratio=5", "faults.hostile.scale=7"])
    assert mod.attack_scale("upload_clip", "ipm", cfg, []) == 5.0  # the rule's radius
    assert mod.attack_scale("upload_clip", "ipm", cfg, ["faults.hostile.scale=7"]) == 7.0
