"""Sampling-aware RegTop-k (issue #33, compress/regtopk_sampled.py):
Delta = (N-1)/(m-1) x RegTop-k's cohort Delta.

- the factor, and the Horvitz-Thompson claim of the derivation checked by
  simulation (unequal weights, the server's renormalised cohort weights);
- the score against the formula written out by hand;
- error feedback exact and exactly k entries per row under a rescaled Delta;
- m = N: bitwise RegTop-k in a whole run (model and every metric), and m < N
  a different run;
- bad settings named in one line;
- both runtimes (flower marked slow, as the other Flower comparisons)."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from regtopk_fl.compress import SPARSIFIERS, RegTopK, SparsifierError, num_selected
from regtopk_fl.compress.regtopk_sampled import RegTopKSampled, population_scale
from regtopk_fl.fedround import sparsify
from regtopk_fl.memory import ErrorFeedbackMemory, SelectContext
from regtopk_fl.runner import run_experiment
from regtopk_fl.settings import ConfigError, validate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_factor_is_population_over_cohort_others():
    assert population_scale(100, 10) == 99 / 9
    assert population_scale(100, 50) == 99 / 49
    assert population_scale(100, 100) is None and population_scale(100, 200) is None
    assert population_scale(100, 1) == math.inf
    sp = RegTopKSampled(0.1, mu=4.0, clients=40, fraction=0.25)  # m = 10
    assert sp.per_round == 10 and sp.scale == 39 / 9
    assert RegTopKSampled(0.1, clients=40).scale is None  # neither set: everyone
    assert RegTopKSampled(0.1).scale is None  # built without the run's settings
    assert SPARSIFIERS["regtopk_sampled"] is RegTopKSampled


def test_horvitz_thompson_estimate_of_the_others_is_unbiased():
    """The derivation's claim: with the server's cohort aggregate (weights
    renormalised over the cohort) the cohort Delta averages to
    (m-1)/(N-1) x the population's, and c x Delta to the population's."""
    gen = torch.Generator().manual_seed(3)
    n, m, trials = 30, 6, 40000
    omega = torch.rand(n, generator=gen, dtype=torch.float64) + 0.2
    omega /= omega.sum()
    s = torch.randn(n, generator=gen, dtype=torch.float64) + 0.3  # each worker's sent value
    me = 0
    full_delta = float((omega * s).sum() - omega[me] * s[me]) / float(omega[me] * s[me])
    others = torch.arange(1, n)
    cohort_deltas = []
    for _ in range(trials):
        pick = others[torch.randperm(n - 1, generator=gen)[:m - 1]]
        cohort = torch.cat([torch.tensor([me]), pick])
        w = omega[cohort] / omega[cohort].sum()  # what the server weights with
        g = float((w * s[cohort]).sum())
        cohort_deltas.append((g - float(w[0] * s[me])) / float(w[0] * s[me]))
    mean_p = sum(cohort_deltas) / trials
    sd = (sum((d - mean_p) ** 2 for d in cohort_deltas) / (trials - 1)) ** 0.5
    c = population_scale(n, m)
    # the cohort Delta is biased by the sampling fraction; c x it is not
    assert abs(mean_p - full_delta * (m - 1) / (n - 1)) < 4 * sd / trials ** 0.5
    assert abs(c * mean_p - full_delta) < 4 * c * sd / trials ** 0.5
    assert abs(mean_p - full_delta) > 20 * sd / trials ** 0.5


@pytest.mark.parametrize("distortion", ["reference", "paper"])
def test_score_is_regtopk_with_delta_times_c(distortion):
    """spread = 0: the Horvitz-Thompson factor alone."""
    # one worker, J = 4, last mask {0, 1, 2}; w = 1/10 (cohort of 10), c = 99/9 = 11
    a = torch.tensor([[4.0, -3.0, 2.0, 1.0]])
    sent, g, w = [2.0, -1.0, 0.5], [0.1, -0.5, 0.05], 0.1
    ctx = SelectContext(torch.tensor([0, 1, 2]), torch.tensor(sent), torch.tensor(g),
                        torch.full((3,), w), torch.ones(1), (0,), 1)
    mu = 4.0
    sp = RegTopKSampled(0.5, mu=mu, distortion=distortion, clients=100, per_round=10, spread=0)
    assert sp.noise is None
    expected = []
    for j in range(3):
        den = w * (sent[j] if distortion == "reference" else float(a[0, j]))
        delta = 11.0 * (g[j] - w * sent[j]) / den
        expected.append(abs(float(a[0, j])) * math.tanh(abs(1 + delta) / mu))
    expected.append(1.0)  # not sent last round: |a|
    torch.testing.assert_close(sp.score(a, ctx)[0], torch.tensor(expected), rtol=1e-6, atol=0)
    # entry 0: reference Delta = (0.1 - 0.2)/0.2 = -0.5, x 11 = -5.5 -> |1 + Delta| = 4.5,
    # tanh(4.5/4) = 0.81 (RegTop-k: tanh(0.5/4) = 0.12): the rescaling changes the choice
    want = sorted(range(4), key=lambda j: -expected[j])[:2]
    assert sp.select(a, ctx).flat_idx.tolist() == sorted(want)
    plain = RegTopK(0.5, mu=mu, distortion=distortion).score(a, ctx)[0]
    assert not torch.allclose(plain, sp.score(a, ctx)[0])


@pytest.mark.parametrize("spread", [0.1, 1.0])
def test_noise_floor_is_the_posterior_rms(spread):
    """|1 + Delta| -> sqrt((1 + c Delta)^2 + sigma^2), sigma = spread x
    sqrt((N-1)(N-m)/(m-1)): N = 100, m = 10 -> spread x sqrt(99 * 90 / 9)."""
    sigma = spread * math.sqrt(990.0)
    a = torch.tensor([[4.0, -3.0, 2.0, 1.0]])
    sent, g, w, mu = [2.0, -1.0, 0.5], [0.1, -0.5, 0.05], 0.1, 4.0
    ctx = SelectContext(torch.tensor([0, 1, 2]), torch.tensor(sent), torch.tensor(g),
                        torch.full((3,), w), torch.ones(1), (0,), 1)
    sp = RegTopKSampled(0.5, mu=mu, clients=100, per_round=10, spread=spread)
    assert sp.noise == pytest.approx(sigma, rel=1e-12)
    expected = [abs(float(a[0, j])) * math.tanh(
        math.hypot(1 + 11.0 * (g[j] - w * sent[j]) / (w * sent[j]), sigma) / mu)
        for j in range(3)] + [1.0]
    torch.testing.assert_close(sp.score(a, ctx)[0], torch.tensor(expected), rtol=1e-6, atol=0)
    # the floor only raises a score towards |a| (Top-k's): never above, never below HT's
    ht = RegTopKSampled(0.5, mu=mu, clients=100, per_round=10, spread=0).score(a, ctx)
    assert bool((sp.score(a, ctx) >= ht).all()) and bool((sp.score(a, ctx) <= a.abs()).all())
    # and it vanishes with full participation
    assert RegTopKSampled(0.5, clients=100, per_round=100, spread=spread).noise is None


def test_alone_in_the_cohort_is_topk():
    a = torch.tensor([[4.0, -3.0, 2.0, 1.0]])
    ctx = SelectContext(torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.0]),
                        torch.ones(1), torch.ones(1), (0,), 1)
    sp = RegTopKSampled(0.25, mu=4.0, clients=100, per_round=1)
    assert torch.equal(sp.score(a, ctx), a.abs())
    assert sp.select(a, ctx).flat_idx.tolist() == [0]  # RegTop-k would damp entry 0 to 0
    assert RegTopK(0.25, mu=4.0).select(a, ctx).flat_idx.tolist() == [1]


@pytest.mark.parametrize("per_round", [1, 3, 10])
@pytest.mark.parametrize("seed", range(4))
def test_error_feedback_exact_and_k_per_row(per_round, seed):
    gen = torch.Generator().manual_seed(seed)
    n, dim, s = 5, 37, 0.2
    k = num_selected(s, dim)
    sp = RegTopKSampled(s, mu=0.5, clients=20, per_round=per_round)
    w = (torch.rand(n, generator=gen) + 0.1)
    w = (w / w.sum()).tolist()
    mem = ErrorFeedbackMemory(n, dim)
    for t in range(6):
        g = torch.randn(n, dim, generator=gen)
        expected_a = mem.eps.clone() + g
        ups = sparsify(mem, g, sp, w, round=t)
        assert [int(u.indices.numel()) for u in ups] == [k] * n
        assert torch.equal(torch.stack([u.dense() for u in ups]) + mem.eps, expected_a)
        gg = torch.randn(dim, generator=gen)
        gg[torch.rand(dim, generator=gen) < 0.3] = 0.0  # cancelled entries
        mem.feedback_from_global(gg, w)


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _run(make_cfg, tmp_path, name, extra):
    cfg = make_cfg(["task=linreg", "num_workers=12", "rounds=30", "task.size_ratio=3",
                    "sparsifier.sparsity=0.3", "sparsifier.mu=2", "threads=1",
                    f"sparsifier={name}", *extra])
    d = tmp_path / "_".join([name, *extra]).replace("=", "-")
    assert run_experiment(cfg, d)["status"] == "finished"
    return torch.load(d / "model.pt", weights_only=False)["params"], _rows(d)


def test_full_participation_is_regtopk_bitwise(make_cfg, tmp_path):
    """m = N (explicit and by default): the same model and the same metrics,
    bit for bit; with m < N the rule is a different one."""
    p_ref, r_ref = _run(make_cfg, tmp_path, "regtopk", [])
    for extra in ([], ["participation.clients_per_round=12"]):
        p, r = _run(make_cfg, tmp_path, "regtopk_sampled", extra)
        assert torch.equal(p, p_ref)
        keys = [k for k in r_ref[0] if "time" not in k and not k.endswith("_s")]
        assert [[row[k] for k in keys] for row in r] == [[row[k] for k in keys] for row in r_ref]
    p_ref4, _ = _run(make_cfg, tmp_path, "regtopk", ["participation.clients_per_round=4"])
    p4, r4 = _run(make_cfg, tmp_path, "regtopk_sampled", ["participation.clients_per_round=4"])
    assert not torch.equal(p4, p_ref4)
    assert float(r4[-1]["gap"]) < float(r4[0]["gap"])


@pytest.mark.parametrize("overrides,named", [
    (["sparsifier.clients=0"], "sparsifier.clients=0"),
    (["sparsifier.per_round=0"], "sparsifier.per_round=0"),
    (["sparsifier.fraction=1.5"], "sparsifier.fraction=1.5"),
    (["sparsifier.spread=-1"], "sparsifier.spread=-1"),
    (["participation.clients_per_round=3", "participation.weighted=true"],
     "participation.weighted=True"),
])
def test_bad_setting_is_named(make_cfg, overrides, named):
    cfg = make_cfg(["sparsifier=regtopk_sampled", "num_workers=8", *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(named + ":"), msg


def test_bad_constructor_argument_is_named():
    with pytest.raises(SparsifierError, match="clients=0"):
        RegTopKSampled(0.1, clients=0)
    with pytest.raises(SparsifierError, match="spread=nan"):
        RegTopKSampled(0.1, clients=4, spread=float("nan"))


@pytest.mark.flower
@pytest.mark.slow
def test_sampled_flower_equals_inprocess(make_cfg, tmp_path):
    """3 of 8 clients per round with drops: Flower clients build the rule from
    the same settings (c = 7/2) and reach the in-process model within 1e-6
    (tests/test_runtime_equivalence.py's tolerance), with equal counts."""
    out = {}
    for runtime in ("inprocess", "flower"):
        cfg = make_cfg(["task=linreg", "num_workers=8", "rounds=15", "sparsifier=regtopk_sampled",
                        "sparsifier.sparsity=0.3", "sparsifier.mu=2", "task.size_ratio=3",
                        "threads=1", "participation.clients_per_round=3", "faults.drop_prob=0.2",
                        f"runtime={runtime}"])
        d = tmp_path / runtime
        assert run_experiment(cfg, d)["status"] == "finished"
        out[runtime] = (torch.load(d / "model.pt", weights_only=False)["params"], _rows(d))
    (p_ip, r_ip), (p_fl, r_fl) = out["inprocess"], out["flower"]
    assert float((p_fl - p_ip).abs().max() / p_ip.abs().max()) <= 1e-6
    for a, b in zip(r_ip[1:], r_fl[1:]):
        for key in ("uplink_bytes", "downlink_bytes", "sent", "sampled", "replies", "missing"):
            assert a[key] == b[key], (key, a["round"])
    # and it is not RegTop-k's trajectory
    cfg = make_cfg(["task=linreg", "num_workers=8", "rounds=15", "sparsifier=regtopk",
                    "sparsifier.sparsity=0.3", "sparsifier.mu=2", "task.size_ratio=3",
                    "threads=1", "participation.clients_per_round=3", "faults.drop_prob=0.2"])
    assert run_experiment(cfg, tmp_path / "plain")["status"] == "finished"
    plain = torch.load(tmp_path / "plain" / "model.pt", weights_only=False)["params"]
    assert not torch.equal(plain, p_ip)


def test_sampled_compare_pairs_forget_runs_with_topk(tmp_path, capsys):
    """scripts/sampled_compare.py on the kept screen runs: a forget run pairs
    with Top-k's run of the same seed and m (regtopk-plot --by cannot)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    runs = root / "results/sweep_participation/sampled/runs"
    if not (runs / "ht_forget_screen").exists():
        pytest.skip("the kept runs are not in this checkout")
    spec = importlib.util.spec_from_file_location("sampled_compare",
                                                  root / "scripts/sampled_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "t.md"
    assert mod.main([str(runs / "ht_forget_screen"), str(runs / "topk_seeds0-2"), "--a", "f",
                     "--b", "topk", "--last", "500", "--out", str(out)]) == 0
    import pandas as pd
    t = pd.read_csv(tmp_path / "t.csv")
    assert sorted(t["participation.clients_per_round"]) == [10, 20, 50]
    assert (t["n"] == 3).all() and (t["unpaired"] == 0).all()
    assert mod.main(["x", "y", "--a", "same", "--b", "same"]) == 2
