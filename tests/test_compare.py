"""Seeds as the repeat axis, intervals and paired comparisons (issue #18):
regtopk-collect's settings and summary, regtopk-plot's bands, summary table
and --compare on synthetic sweeps with a known difference and with none."""
import json
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from scipy import stats  # noqa: E402

import regtopk_fl.analysis.plot as plot_mod  # noqa: E402
from regtopk_fl.analysis import stats as st  # noqa: E402
from regtopk_fl.analysis.collect import collect  # noqa: E402

ROUNDS = 10


def write_job(job, overrides, final, *, sparsifier, seed, hit_round=None, metric="gap",
              config_extra=None, sparsity=0.6):
    """A finished job whose metric falls linearly from 10 to ``final``; with
    ``hit_round`` it drops below 1e-3 exactly at that round instead."""
    (job / ".hydra").mkdir(parents=True)
    cfg = {"task": {"name": "linreg"}, "runtime": "inprocess",
           "sparsifier": {"name": sparsifier, "sparsity": sparsity, "mu": 4.0},
           "num_workers": 4, "rounds": ROUNDS, "seed": seed, **(config_extra or {})}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    r = np.arange(0, ROUNDS + 1)
    values = np.linspace(10.0, final, ROUNDS + 1)
    if hit_round is not None:
        values = np.where(r >= hit_round, 1e-4, 1.0)
    pd.DataFrame({"round": r, metric: values, "uplink_bytes": 100 * (r > 0),
                  "downlink_bytes": 50 * (r > 0)}).to_csv(job / "metrics.csv", index=False)
    (job / "summary.json").write_text(json.dumps({
        "task": "linreg", "runtime": "inprocess", "sparsifier": sparsifier, "sparsity": sparsity,
        "mu": 4.0, "num_workers": 4, "rounds": ROUNDS, "seed": seed,
        "final": {metric: float(values[-1])}, "uplink_bytes": 100 * ROUNDS,
        "status": "finished"}))


def make_sweep(root, diff, n=10, noise=0.05, sparsities=(0.6,), rng_seed=1, a="regtopk",
               b="topk"):
    """Per seed a shared level (spread 0.5 across seeds, as different data and
    initial models give) + ``diff`` for A + small independent noise. A's jobs
    are written in reverse seed order, so pairing by position would be wrong."""
    rng = np.random.default_rng(rng_seed)
    job, truth = 0, {}
    for s in sparsities:
        level = 2.0 + 0.5 * rng.standard_normal(n)
        for sp, seeds in ((b, range(n)), (a, reversed(range(n)))):
            for seed in seeds:
                value = level[seed] + (diff if sp == a else 0.0) + noise * rng.standard_normal()
                truth[(sp, s, seed)] = value
                write_job(root / str(job), [f"sparsifier={sp}", f"sparsifier.sparsity={s}",
                                            f"seed={seed}"], value, sparsifier=sp, seed=seed,
                          sparsity=s)
                job += 1
    return truth


# -------------------------------------------------------------- statistics ---

def test_t_interval_is_scipys():
    x = [1.0, 2.0, 4.0, 7.0]
    mean, half, n = st.t_interval(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert n == 4 and mean == pytest.approx(3.5)
    assert mean - half == pytest.approx(lo) and mean + half == pytest.approx(hi)
    assert np.isnan(st.t_interval([3.0])[1]) and st.t_interval([np.nan, 2.0])[2] == 1


def test_paired_direction_follows_the_metric():
    lower = st.paired([1, 2, 3], [2, 3, 5], "gap")
    assert lower["wins"] == 3 and lower["losses"] == 0 and lower["diff_mean"] == pytest.approx(-4 / 3)
    higher = st.paired([1, 2, 3], [2, 3, 5], "accuracy")
    assert higher["wins"] == 0 and higher["losses"] == 3
    ties = st.paired([1, 2], [1, 2], "loss")
    assert ties["ties"] == 2 and np.isnan(ties["p_wilcoxon"]) and ties["ci_low"] == 0
    with pytest.raises(ValueError):
        st.lower_is_better("speed")


# -------------------------------------------------------- --compare A:B -------

def test_compare_finds_a_known_paired_difference(tmp_path):
    sweep = tmp_path / "known"
    truth = make_sweep(sweep, diff=0.2)
    res = plot_mod.plot(sweep, save=False, compare=["regtopk:topk"])
    row = res.compare.iloc[0]
    assert len(res.compare) == 1 and row["n"] == 10 and row["unpaired"] == 0
    d = [truth[("regtopk", 0.6, s)] - truth[("topk", 0.6, s)] for s in range(10)]
    assert row["diff_mean"] == pytest.approx(np.mean(d))
    assert row["ci_low"] < 0.2 < row["ci_high"]  # the interval covers the true difference
    assert row["ci_high"] - row["ci_low"] < 0.2  # narrow: pairing removes the 0.5 spread
    assert row["p_wilcoxon"] < 0.01 and row["p_ttest"] < 0.01
    assert row["wins"] == 0 and row["losses"] == 10  # a higher gap is worse
    flipped = plot_mod.plot(sweep, save=False, compare=["topk:regtopk"]).compare.iloc[0]
    assert flipped["wins"] == 10 and flipped["diff_mean"] == pytest.approx(-np.mean(d))


def test_compare_does_not_reject_without_a_difference(tmp_path):
    sweep = tmp_path / "none"
    make_sweep(sweep, diff=0.0)
    row = plot_mod.plot(sweep, save=False, compare=["regtopk:topk"]).compare.iloc[0]
    assert row["n"] == 10
    assert row["ci_low"] < 0 < row["ci_high"]
    assert row["p_wilcoxon"] > 0.05 and row["p_ttest"] > 0.05
    assert 2 <= row["wins"] <= 8


def test_compare_rows_per_setting_and_cli_files(tmp_path, capsys):
    sweep = tmp_path / "two"
    make_sweep(sweep, diff=-0.3, n=5, sparsities=(0.4, 0.6))
    (sweep / "3").rename(tmp_path / "gone")  # topk, S = 0.4, seed 3 never finished
    out = tmp_path / "out"
    assert plot_mod.main([str(sweep), "--compare", "regtopk:topk", "--out", f"{out}/"]) == 0
    table = pd.read_csv(out / "compare.csv")
    assert table["sparsifier.sparsity"].tolist() == [0.4, 0.6]
    assert table["n"].tolist() == [4, 5] and table["unpaired"].tolist() == [1, 0]
    assert (table["wins"] == table["n"]).all() and (table["ci_high"] < 0).all()
    md = (out / "compare.md").read_text()
    assert md.count("\n| sparsifier | regtopk | topk |") == 2 and "wilcoxon" in md
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["n"].tolist()) == [4, 5, 5, 5]
    assert "±" in (out / "summary.md").read_text()


def test_compare_bad_input_exits_2(tmp_path, capsys):
    sweep = tmp_path / "s"
    make_sweep(sweep, diff=0.1, n=3)
    for args, named in ((["--compare", "regtopk"], "'regtopk': must be A:B"),
                        (["--compare", "foo:topk"], "sparsifier=foo"),
                        (["--band", "wide"], "--band")):
        with pytest.raises(SystemExit) as exc:
            plot_mod.main([str(sweep), *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1, err


def test_compare_by_another_key_across_sweeps(tmp_path):
    """The stale-feedback ablation lives in its own sweep: its jobs override
    participation.stale_feedback, the main sweep's read it from their config."""
    keep, forget = tmp_path / "keep", tmp_path / "forget"
    for i, seed in enumerate(range(6)):
        for root, policy, over, final in ((keep, "keep", [], 1.0 + seed),
                                          (forget, "forget", ["participation.stale_feedback=forget"],
                                           0.9 + seed)):
            write_job(root / str(i), ["sparsifier=regtopk", f"seed={seed}", *over], final,
                      sparsifier="regtopk", seed=seed,
                      config_extra={"participation": {"stale_feedback": policy}})
    res = plot_mod.plot([keep, forget], save=False, compare=["forget:keep"],
                        by="participation.stale_feedback")
    row = res.compare.iloc[0]
    assert row["n"] == 6 and row["diff_mean"] == pytest.approx(-0.1) and row["wins"] == 6
    # the curves keep the two policies apart (the keep jobs' value is read from their config)
    labels = sorted(l.get_label() for l in res.figures["curves"].axes[0].lines)
    assert labels == ["regtopk (μ=4), participation.stale_feedback=forget",
                      "regtopk (μ=4), participation.stale_feedback=keep"]
    # and so do the tables (they once pooled them: n = 12, issue #31)
    summ = res.summary.set_index("participation.stale_feedback")
    assert sorted(summ.index) == ["forget", "keep"] and summ["n"].tolist() == [6, 6]
    assert summ.loc["forget", "final_gap"] == pytest.approx(0.9 + 2.5)
    assert summ.loc["keep", "final_gap"] == pytest.approx(1.0 + 2.5)
    assert sorted(res.table["participation.stale_feedback"].unique()) == ["forget", "keep"]


def test_compare_paired_time_to_target(tmp_path):
    sweep = tmp_path / "t"
    for seed in range(4):
        write_job(sweep / f"a{seed}", ["sparsifier=regtopk", f"seed={seed}"], 0,
                  sparsifier="regtopk", seed=seed, hit_round=5)
        write_job(sweep / f"b{seed}", ["sparsifier=topk", f"seed={seed}"], 1.0,  # seed 3: never
                  sparsifier="topk", seed=seed, hit_round=8 if seed < 3 else None)
    row = plot_mod.plot(sweep, save=False, compare=["regtopk:topk"], target=1e-3).compare.iloc[0]
    assert row["reached_a"] == 4 and row["reached_b"] == 3
    assert row["rounds_n"] == 3 and row["rounds_diff_mean"] == -3 and row["rounds_wins"] == 3
    assert row["mb_diff_mean"] == pytest.approx(-3 * 150 / 1e6)


def test_compare_last_rounds_mean(tmp_path):
    sweep = tmp_path / "last"
    make_sweep(sweep, diff=0.2, n=3)
    final = plot_mod.plot(sweep, save=False, compare=["regtopk:topk"]).compare.iloc[0]
    tail = plot_mod.plot(sweep, save=False, compare=["regtopk:topk"], last=11).compare.iloc[0]
    # linear from 10 down to the final value: the mean of all 11 rounds moves half as far
    assert tail["diff_mean"] == pytest.approx(final["diff_mean"] / 2)
    assert tail["metric"] == "mean_gap_last11"


# ------------------------------------------------------ repeats and bands ----

def test_seed_is_the_repeat_axis_not_a_line(tmp_path):
    sweep = tmp_path / "s"
    make_sweep(sweep, diff=0.2, n=4, sparsities=(0.4, 0.6))
    df = collect(sweep)
    assert df.attrs["repeat_key"] == "seed"
    assert df.groupby("setting")["seed"].nunique().tolist() == [4, 4, 4, 4]
    assert "seed" not in " ".join(df["setting"])
    res = plot_mod.plot(sweep, save=False)
    lines = [l.get_label() for ax in res.figures["curves"].axes for l in ax.lines]
    assert sorted(lines) == sorted(["topk", "regtopk (μ=4)"] * 2)
    assert len(res.summary) == 4 and (res.summary["n"] == 4).all()


@pytest.mark.parametrize("band,text", [("ci", "95 % t-interval"), ("minmax", "min–max")])
def test_curve_band_and_caption(tmp_path, band, text):
    sweep = tmp_path / "s"
    truth = make_sweep(sweep, diff=0.2, n=5)
    res = plot_mod.plot(sweep, save=False, band=band)
    ax = res.figures["curves"].axes[0]
    assert text in ax.get_legend().get_title().get_text()
    assert "n = 5" in ax.get_legend().get_title().get_text()
    # the band at the last round
    finals = np.array([truth[("topk", 0.6, s)] for s in range(5)])
    if band == "ci":
        lo, hi = stats.t.interval(0.95, 4, loc=finals.mean(), scale=stats.sem(finals))
    else:
        lo, hi = finals.min(), finals.max()
    poly = ax.collections[0].get_paths()[0].vertices
    at_end = poly[np.isclose(poly[:, 0], ROUNDS)][:, 1]
    assert sorted(at_end)[0] == pytest.approx(lo) and sorted(at_end)[-1] == pytest.approx(hi)
    none = plot_mod.plot(sweep, save=False, band="none").figures["curves"].axes[0]
    assert len(none.collections) == 0


def test_collect_summary_cli(tmp_path):
    sweep = tmp_path / "s"
    make_sweep(sweep, diff=0.2, n=3)
    out = tmp_path / "jobs.csv"
    proc = subprocess.run([sys.executable, "-m", "regtopk_fl.analysis.collect", str(sweep),
                           "--out", str(out), "--summary"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = pd.read_csv(tmp_path / "jobs_summary.csv")
    assert len(summary) == 2 and (summary["n"] == 3).all()
    jobs = pd.read_csv(out)
    one = jobs[jobs["sparsifier"] == "topk"]["final_gap"]
    row = summary.set_index("sparsifier").loc["topk"]
    assert row["final_gap"] == pytest.approx(one.mean())
    assert row["final_gap_hw"] == pytest.approx(stats.t.ppf(0.975, 2) * stats.sem(one))
