"""regtopk-collect / regtopk-plot on small fake sweeps written in tmp_path."""
import json
import math
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

import regtopk_fl.analysis.collect as collect_mod  # noqa: E402
import regtopk_fl.analysis.plot as plot_mod  # noqa: E402
from regtopk_fl.analysis.collect import collect, load_curves  # noqa: E402

DIM = 100
ROUNDS = 10
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ fake runs -----

def write_job(job, *, overrides, sparsifier, sparsity=0.9, mu=None, distortion="reference",
              task="linreg", num_workers=20, seed=0, experiment=None, rounds=ROUNDS,
              rate=0.7, done=None, status="finished", summary=True, eval_every=None,
              extra=None):
    """One Hydra job directory as the launcher writes it. The gap (or loss, or accuracy)
    decays geometrically with ``rate``; ``done`` < rounds leaves metrics.csv short."""
    done = rounds if done is None else done
    (job / ".hydra").mkdir(parents=True)
    sp = {"name": sparsifier, "sparsity": sparsity, "mu": mu, "distortion": distortion}
    config = {"experiment": experiment, "task": {"name": task, **(extra or {})},
              "runtime": "inprocess", "sparsifier": sp, "num_workers": num_workers,
              "rounds": rounds, "seed": seed}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))

    r = np.arange(1, done + 1)
    k = DIM if sparsifier == "dense" else max(1, round(DIM * (1 - sparsity)))
    sent = np.full(done, k * num_workers)
    metrics = pd.DataFrame({
        "round": r,
        "loss": 10.0 * rate ** r,
        "gap": 5.0 * rate ** r if task == "linreg" else np.nan,
        "accuracy": np.nan,
        "uplink_bytes": sent * 8, "downlink_bytes": np.full(done, DIM * 4 * num_workers),
        "sent": sent, "wall_s": np.full(done, 0.01),
    })
    if eval_every:
        acc = 100 - 90 * rate ** r
        metrics["accuracy"] = np.where(r % eval_every == 0, acc, np.nan)
    metrics.to_csv(job / "metrics.csv", index=False)
    last = metrics.iloc[-1]
    final = {m: float(last[m]) for m in ("loss", "gap") if not math.isnan(last[m])}
    accs = metrics["accuracy"].dropna()
    if len(accs):
        final["accuracy"] = float(accs.iloc[-1])
    if summary:
        (job / "summary.json").write_text(json.dumps({
            "task": task, "runtime": "inprocess", "sparsifier": sparsifier,
            "sparsity": None if sparsifier == "dense" else sparsity, "mu": mu,
            "num_workers": num_workers, "rounds": rounds, "seed": seed, "final": final,
            "uplink_bytes": int(metrics["uplink_bytes"].sum()),
            "downlink_bytes": int(metrics["downlink_bytes"].sum()),
            "wall_time_s": 0.01 * done, "status": status}))
    return final


def multirun_yaml(sweep, task_overrides, experiment=None):
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "overrides": {"task": task_overrides},
        "runtime": {"choices": {"experiment": experiment, "sparsifier": "topk"}}}}))


@pytest.fixture
def fig2_sweep(tmp_path):
    """topk, regtopk x sparsity 0.5, 0.9 x seed 0, 1 on linear regression; job 5 (regtopk,
    0.5, seed 1) crashed (no summary.json, 3 of 10 rounds), job 7 (regtopk, 0.9, seed 1)
    is still running."""
    sweep = tmp_path / "fig2"
    multirun_yaml(sweep, ["sparsifier=topk,regtopk", "sparsifier.sparsity=0.5,0.9",
                          "seed=0,1"])
    finals, i = {}, 0
    for sp in ("topk", "regtopk"):
        for s in (0.5, 0.9):
            for seed in (0, 1):
                rate = {"topk": 0.8, "regtopk": 0.5}[sp] + 0.1 * s + 0.01 * seed
                kw = {}
                if i == 5:
                    kw = {"done": 3, "summary": False}
                elif i == 7:
                    kw = {"done": 5, "status": "running"}
                finals[i] = write_job(
                    sweep / str(i), sparsifier=sp, sparsity=s, seed=seed, rate=rate,
                    mu=4 if sp == "regtopk" else None, experiment="fig2_linreg",
                    overrides=[f"sparsifier={sp}", f"sparsifier.sparsity={s}", f"seed={seed}",
                               "experiment=fig2_linreg"], **kw)
                i += 1
    return sweep, finals


@pytest.fixture
def heat_sweep(tmp_path):
    """regtopk, regtopk_gaussiank x sparsity 0.5, 0.9 x mu 1, 4: 8 distinct final gaps;
    the experiment is named in multirun.yaml only."""
    sweep = tmp_path / "heat"
    multirun_yaml(sweep, ["sparsifier=regtopk,regtopk_gaussiank",
                          "sparsifier.sparsity=0.5,0.9", "sparsifier.mu=1,4"], "mu_grid")
    gaps, i = {}, 0
    for sp in ("regtopk", "regtopk_gaussiank"):
        for s in (0.5, 0.9):
            for mu in (1, 4):
                rate = 0.3 + 0.2 * s + 0.05 * mu + (0.1 if sp != "regtopk" else 0)
                final = write_job(sweep / str(i), sparsifier=sp, sparsity=s, mu=mu, rate=rate,
                                  overrides=[f"sparsifier={sp}", f"sparsifier.sparsity={s}",
                                             f"sparsifier.mu={mu}"])
                gaps[(sp, s, mu)] = final["gap"]
                i += 1
    return sweep, gaps


@pytest.fixture
def workers_sweep(tmp_path):
    """topk, regtopk x num_workers 10, 40 x task.sigma2 1, 5 (linear regression)."""
    sweep = tmp_path / "workers"
    i = 0
    for sp in ("topk", "regtopk"):
        for n in (10, 40):
            for sigma2 in (1, 5):
                write_job(sweep / str(i), sparsifier=sp, num_workers=n, mu=2,
                          rate=0.5 + 0.005 * n + 0.02 * sigma2 + (0.1 if sp == "topk" else 0),
                          extra={"sigma2": sigma2},
                          overrides=[f"sparsifier={sp}", f"num_workers={n}",
                                     f"task.sigma2={sigma2}"])
                i += 1
    return sweep


@pytest.fixture
def acc_sweep(tmp_path):
    """topk, regtopk x task.partition iid / dirichlet on a classifier: accuracy every 2
    rounds, no gap."""
    sweep = tmp_path / "acc"
    i = 0
    for sp in ("topk", "regtopk"):
        for part in ("iid", "dirichlet"):
            write_job(sweep / str(i), sparsifier=sp, task="cifar10", mu=1, eval_every=2,
                      rate=0.6 + (0.1 if part != "iid" else 0) + (0.1 if sp == "topk" else 0),
                      overrides=[f"sparsifier={sp}", f"task.partition={part}",
                                 "experiment=cifar10_resnet"],
                      experiment="cifar10_resnet", extra={"partition": part})
            i += 1
    return sweep


@pytest.fixture
def toy_sweep(tmp_path):
    """Fig. 1: dense, topk, regtopk with both distortions on the toy task."""
    sweep = tmp_path / "toy"
    runs = [("dense", None), ("topk", None), ("regtopk", "paper"), ("regtopk", "reference")]
    for i, (sp, dist) in enumerate(runs):
        over = [f"sparsifier={sp}", "experiment=fig1_toy"]
        if dist:
            over.append(f"sparsifier.distortion={dist}")
        write_job(sweep / str(i), sparsifier=sp, task="toy", sparsity=0.5,
                  mu=1 if sp == "regtopk" else None, distortion=dist or "reference",
                  rate=0.9 - 0.1 * i, overrides=over, experiment="fig1_toy", num_workers=2)
    return sweep


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path
    assert matplotlib.image.imread(path).ndim == 3  # decodes


# -------------------------------------------------------------- collect -----

def test_collect_rows_columns_and_status(fig2_sweep):
    sweep, finals = fig2_sweep
    df = collect(sweep)
    assert len(df) == 8
    assert df["job"].tolist() == [str(i) for i in range(8)]
    for col in ("job_dir", "status", "reason", "sparsifier", "sparsifier.sparsity", "seed",
                "final_loss", "final_gap", "best_gap", "rounds_completed", "uplink_bytes",
                "wall_time_s", "task", "mu", "experiment"):
        assert col in df, col
    assert df.attrs["override_keys"] == ["sparsifier", "sparsifier.sparsity", "seed",
                                         "experiment"]
    assert pd.api.types.is_float_dtype(df["sparsifier.sparsity"])
    assert pd.api.types.is_integer_dtype(df["seed"])
    st = df.set_index("job")
    assert st.loc["5", "status"] == "failed" and st.loc["5", "reason"] == "no summary.json"
    assert st.loc["7", "status"] == "unfinished" and "running" in st.loc["7", "reason"]
    assert (st.drop(["5", "7"])["status"] == "finished").all()
    # the crashed job keeps what the config and overrides say, and its progress
    assert st.loc["5", "sparsifier"] == "regtopk" and st.loc["5", "sparsity"] == 0.5
    assert st.loc["5", "seed"] == 1 and st.loc["5", "mu"] == 4
    assert st.loc["5", "rounds_completed"] == 3 and st.loc["5", "rounds"] == ROUNDS
    assert math.isnan(st.loc["5", "final_gap"]) and math.isnan(st.loc["7", "final_gap"])
    assert st.loc["7", "rounds_completed"] == 5
    for col in ("final_loss", "best_gap", "uplink_bytes", "downlink_bytes", "wall_time_s"):
        assert st.loc[["5", "7"], col].isna().all(), col
    for i in (0, 1, 2, 3, 4, 6):
        assert st.loc[str(i), "final_gap"] == pytest.approx(finals[i]["gap"])
        assert st.loc[str(i), "best_gap"] == pytest.approx(finals[i]["gap"])  # decreasing
    # averaging per (method, sparsity) never sees the failed / unfinished jobs
    mean = df.groupby(["sparsifier", "sparsity"])["final_gap"].mean()
    assert mean[("regtopk", 0.5)] == pytest.approx(finals[4]["gap"])
    assert mean[("regtopk", 0.9)] == pytest.approx(finals[6]["gap"])
    assert mean[("topk", 0.9)] == pytest.approx((finals[2]["gap"] + finals[3]["gap"]) / 2)


def test_collect_short_metrics_is_unfinished(tmp_path):
    write_job(tmp_path / "s" / "0", sparsifier="topk", overrides=["sparsifier=topk"], done=4)
    summary = json.loads((tmp_path / "s" / "0" / "summary.json").read_text())
    assert summary["status"] == "finished"  # says finished, but only 4 of 10 rounds
    row = collect(tmp_path / "s").iloc[0]
    assert row["status"] == "unfinished" and row["reason"] == "metrics.csv has 4 of 10 rounds"


def test_parse_overrides_types():
    got = collect_mod.parse_overrides(
        ["sparsifier=regtopk", "sparsifier.mu=4", "sparsifier.sparsity=0.6", "+task.sigma2=5",
         "task.lr=1e-3", "x.flag=true", "name='a=b'", "~gone", "hydra.job.chdir=false"])
    assert got == {"sparsifier": "regtopk", "sparsifier.mu": 4, "sparsifier.sparsity": 0.6,
                   "task.sigma2": 5, "task.lr": 1e-3, "x.flag": True, "name": "a=b"}
    assert isinstance(got["sparsifier.mu"], int)


def test_load_curves_long_form(fig2_sweep):
    sweep, _ = fig2_sweep
    curves = load_curves(sweep)
    assert len(curves) == 6 * ROUNDS + 3 + 5
    assert list(curves.columns[:3]) == ["sweep", "job", "status"]
    for col in ("sparsifier", "sparsifier.sparsity", "seed", "round", "loss", "gap",
                "uplink_bytes", "uplink_mb_cum"):
        assert col in curves, col
    one = curves[curves["job"] == "2"]
    assert one["uplink_bytes_cum"].tolist() == one["uplink_bytes"].cumsum().tolist()
    # no coded columns in these runs: the traffic falls back to the raw counts
    total = (one["uplink_bytes"] + one["downlink_bytes"]).cumsum() / 1e6
    assert one["traffic_mb_cum"].tolist() == pytest.approx(total.tolist())
    assert "comm_s_cum" not in curves  # no network model
    assert one["sparsifier"].unique().tolist() == ["topk"]


def test_collect_cli_writes_csv_and_parquet(fig2_sweep, tmp_path, capsys):
    sweep, _ = fig2_sweep
    out = tmp_path / "out" / "jobs.csv"
    assert collect_mod.main([str(sweep), "--out", str(out)]) == 0
    back = pd.read_csv(out)
    assert len(back) == 8 and back["status"].value_counts()["failed"] == 1
    pytest.importorskip("pyarrow")
    assert len(pd.read_parquet(out.with_suffix(".parquet"))) == 8
    assert "8 jobs (6 finished, 1 failed, 1 unfinished)" in capsys.readouterr().out


# ----------------------------------------------------------------- plots ----

def n_lines(ax):
    return len([line for line in ax.lines if not line.get_label().startswith("_")])


def test_curves_per_sparsity_panel_log_scale_and_partial(fig2_sweep, capsys):
    sweep, _ = fig2_sweep
    assert plot_mod.main([str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert "2 of 8 jobs not plotted" in err
    assert f"{sweep / '5'}: failed (no summary.json)" in err
    assert f"{sweep / '7'}: unfinished (status running)" in err
    plots = sweep / "plots"
    for name in ("curves", "uplink"):
        assert_png(plots / f"{name}.png")
        assert str(plots / f"{name}.png") in out
    assert not (plots / "heatmap.png").exists()
    md = (plots / "table.md").read_text()
    assert md.startswith("# fig2_linreg: ") and md.count("\n| ") == 2 + 8  # header, alignment, 8 jobs
    table = pd.read_csv(plots / "table.csv")
    assert table["status"].tolist().count("failed") == 1
    assert {"method", "sparsifier.sparsity", "seed", "final_gap", "uplink_mb",
            "wall_time_s", "status"} <= set(table.columns)

    res = plot_mod.plot(sweep, save=False)
    assert res.metric == "gap" and set(res.figures) == {"curves", "uplink", "traffic"}
    fig = res.figures["curves"]
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["sparsity 0.5", "sparsity 0.9"]
    assert [n_lines(ax) for ax in fig.axes] == [2, 2]
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    assert "fig2_linreg" in fig.get_suptitle()
    assert fig.axes[0].get_xlabel() == "round"
    # the mean of the two seeds of topk, sparsity 0.5 (jobs 0 and 1)
    line = next(l for l in fig.axes[0].lines if l.get_label() == "topk")
    expected = (5 * 0.85 ** np.arange(1, 11) + 5 * 0.86 ** np.arange(1, 11)) / 2
    np.testing.assert_allclose(line.get_ydata(), expected)
    # regtopk at 0.9 has one finished seed only: the crashed job is not averaged in
    line = next(l for l in fig.axes[1].lines if l.get_label().startswith("regtopk"))
    np.testing.assert_allclose(line.get_ydata(), 5 * 0.59 ** np.arange(1, 11))
    assert res.figures["uplink"].axes[0].get_xlabel() == "cumulative uplink (MB)"


def test_heatmap_cells_are_log10_final_gap(heat_sweep, tmp_path):
    sweep, gaps = heat_sweep
    res = plot_mod.plot(sweep, out=tmp_path / "h", prefix="fig", kinds=("curves", "heatmap"))
    assert set(res.figures) == {"curves", "heatmap"}
    assert_png(tmp_path / "h" / "fig_heatmap.png")
    assert (tmp_path / "h" / "fig_table.md").exists()
    fig = res.figures["heatmap"]
    images = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in images] == ["regtopk", "regtopk_gaussiank"]
    assert fig.get_suptitle().startswith("mu_grid: final")
    for ax in images:
        cells = np.asarray(ax.images[0].get_array())
        expected = [[math.log10(gaps[(ax.get_title(), s, mu)]) for s in (0.5, 0.9)]
                    for mu in (1, 4)]  # rows mu, columns sparsity
        np.testing.assert_allclose(cells, expected)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "0.9"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "4"]
    # curves: one panel per sparsity, one line per (sparsifier, mu)
    assert [n_lines(ax) for ax in res.figures["curves"].axes] == [4, 4]


def test_final_metric_against_workers_and_sigma2(workers_sweep):
    res = plot_mod.plot(workers_sweep, kinds=("vs",))
    assert set(res.figures) == {"vs_num_workers", "vs_task_sigma2"}
    assert_png(workers_sweep / "plots" / "vs_num_workers.png")
    fig = res.figures["vs_num_workers"]
    (ax,) = fig.axes
    assert ax.get_xlabel() == "number of workers N"
    # lines: method x the other swept key (task.sigma2), averaged over nothing else
    assert [l.get_label() for l in ax.lines] == [
        "topk, task.sigma2=1", "topk, task.sigma2=5",
        "regtopk (μ=2), task.sigma2=1", "regtopk (μ=2), task.sigma2=5"]
    assert all(list(l.get_xdata()) == [10, 40] for l in ax.lines)
    line = next(l for l in ax.lines if l.get_label() == "topk, task.sigma2=1")
    np.testing.assert_allclose(line.get_ydata(), [5 * 0.67 ** 10, 5 * 0.82 ** 10])
    assert n_lines(res.figures["vs_task_sigma2"].axes[0]) == 4


def test_accuracy_linear_and_categorical_heterogeneity(acc_sweep):
    res = plot_mod.plot(acc_sweep, fmt="pdf", kinds=("curves", "vs"))
    assert res.metric == "accuracy"
    curves = res.figures["curves"]
    assert curves.axes[0].get_yscale() == "linear"
    assert curves.axes[0].get_ylabel() == "test accuracy (%)"
    assert "cifar10_resnet" in curves.get_suptitle()
    # accuracy only where evaluated (every 2nd round): 5 points per line
    assert all(len(l.get_xdata()) == 5 for l in curves.axes[0].lines)
    (ax,) = res.figures["vs_task_partition"].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["dirichlet", "iid"]
    assert n_lines(ax) == 2
    pdf = acc_sweep / "plots" / "vs_task_partition.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    table = pd.read_csv(acc_sweep / "plots" / "table.csv")
    assert "final_gap" not in table and table["final_accuracy"].notna().all()


def test_fig1_toy_loss_curves_with_distortion(toy_sweep, tmp_path):
    res = plot_mod.plot(toy_sweep, out=str(tmp_path), prefix="fig1_toy")
    assert res.metric == "loss"
    (ax,) = res.figures["curves"].axes
    assert [l.get_label() for l in ax.lines] == [
        "dense", "topk", "regtopk (μ=1, paper)", "regtopk (μ=1, reference)"]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "training loss"
    assert "fig1_toy" in res.figures["curves"].get_suptitle()
    assert_png(tmp_path / "fig1_toy_curves.png")
    md = (tmp_path / "fig1_toy_table.md").read_text()
    assert "regtopk (μ=1, paper)" in md and "| dense |" in md


# ------------------------------------------------------------ bad input -----

def test_out_is_a_directory_with_or_without_slash(toy_sweep, tmp_path, capsys):
    """--out DIR writes into DIR whether or not it ends with / (it once wrote
    DIR_table.csv beside DIR without the slash); --prefix names the files."""
    plain, slash = tmp_path / "plain", tmp_path / "slash"
    assert plot_mod.main([str(toy_sweep), "--out", str(plain)]) == 0
    assert plot_mod.main([str(toy_sweep), "--out", f"{slash}/"]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in plain.iterdir())
    assert {"curves.png", "table.md", "table.csv", "summary.md", "summary.csv"} <= set(names)
    assert names == sorted(p.name for p in slash.iterdir())
    assert not list(tmp_path.glob("plain_*")) and not list(tmp_path.glob("slash_*"))
    assert_png(plain / "curves.png")

    pre = tmp_path / "pre" / "deep"  # created, parents too
    assert plot_mod.main([str(toy_sweep), "--out", str(pre), "--prefix", "toy"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(p.name for p in pre.iterdir()) == [f"toy_{n}" for n in names]
    assert str(pre / "toy_table.csv") in printed

    file = tmp_path / "a_file"
    file.write_text("")
    assert "is a file" in run_main([toy_sweep, "--out", file], capsys)
    assert "--prefix" in run_main([toy_sweep, "--out", plain, "--prefix", "a/b"], capsys)


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        plot_mod.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and err.startswith("regtopk-plot: error: ")
    assert "Traceback" not in err
    return err


def test_bad_input_exits_2_with_one_line(tmp_path, fig2_sweep, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in run_main([empty], capsys) and "no jobs" in run_main([empty], capsys)
    assert "no such directory" in run_main([tmp_path / "nope"], capsys)

    lone = tmp_path / "lone"
    write_job(lone / "0", sparsifier="topk", overrides=["sparsifier=topk"], summary=False)
    err = run_main([lone], capsys)
    assert f"{lone / '0'}: failed (no summary.json)" in err

    sweep, _ = fig2_sweep
    assert "metric 'accuracy'" in run_main([sweep, "--metric", "accuracy"], capsys)
    assert "'task.beta'" in run_main([sweep, "--x", "task.beta"], capsys)
    assert "--metric" in run_main([sweep, "--metric", "speed"], capsys)


def test_bad_input_subprocess(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "regtopk_fl.analysis.plot", str(empty)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"regtopk-plot: error: {empty}: no jobs (no summary.json, " \
                          "metrics.csv or .hydra/ below it)\n"
    assert proc.stdout == ""


def test_traffic_and_time_from_coded_bytes(tmp_path):
    """Real runs (broadcast=gradient vs model, with a network model): the
    table shows uplink, downlink and total coded MB per method, the curves
    the cumulative coded traffic and simulated time, and the figures exist."""
    from conftest import compose_cfg
    from regtopk_fl.runner import run_experiment

    sweep = tmp_path / "sweep"
    for i, mode in enumerate(("gradient", "model")):
        run_experiment(compose_cfg(["rounds=5", "num_workers=4", f"broadcast={mode}",
                                    "network.uplink_mbps=1", "network.downlink_mbps=10",
                                    "network.latency_ms=20", "sparsifier.sparsity=0.1"]),
                       sweep / str(i))
        (sweep / str(i) / ".hydra").mkdir()
        (sweep / str(i) / ".hydra" / "overrides.yaml").write_text(f"- broadcast={mode}\n")
    res = plot_mod.plot(sweep, save=False)
    assert {"curves", "uplink", "traffic", "time"} <= set(res.figures)
    t = res.table.set_index("broadcast")
    for mode in ("gradient", "model"):
        s = json.loads((sweep / str(("gradient", "model").index(mode)) / "summary.json").read_text())
        assert t.loc[mode, "downlink_mb"] == pytest.approx(s["downlink_coded_bytes"] / 1e6)
        assert t.loc[mode, "uplink_mb"] == pytest.approx(s["uplink_coded_bytes"] / 1e6)
        assert t.loc[mode, "total_mb"] == pytest.approx(t.loc[mode, "uplink_mb"] + t.loc[mode, "downlink_mb"])
    # same uploads, a sparse broadcast instead of the model every round
    assert t.loc["gradient", "uplink_mb"] == t.loc["model", "uplink_mb"]
    assert t.loc["gradient", "downlink_mb"] < t.loc["model", "downlink_mb"]
    curves = load_curves(sweep)
    one = curves[curves["broadcast"] == "model"].sort_values("round")
    assert one["comm_s_cum"].iloc[-1] == pytest.approx(one["comm_s"].sum())
    assert one["comm_s"].iloc[1] > 2 * 0.020  # latency both ways plus the bytes
    hit = plot_mod.plot(sweep, save=False, target=1e9).table.set_index("broadcast")
    assert (hit["round_to_target"] == 0).all() and (hit["comm_s_to_target"] == 0).all()
    gap3 = float(one[one["round"] == 3]["gap"].iloc[0])
    some = plot_mod.plot(sweep, save=False, target=gap3).table.set_index("broadcast")
    assert some.loc["model", "round_to_target"] == 3
    assert some.loc["model", "comm_s_to_target"] == pytest.approx(
        one[one["round"] <= 3]["comm_s"].sum())
    never = plot_mod.plot(sweep, save=False, target=0.0).table
    assert never["round_to_target"].isna().all()


def test_table_shows_resyncs_and_patches(tmp_path):
    """Sampled runs (#16): the final table carries both downlink counts, the
    summary totals, which are the sums of metrics.csv's columns."""
    from conftest import compose_cfg
    from regtopk_fl.runner import run_experiment

    sweep = tmp_path / "sweep"
    for i, m in enumerate((2, 8)):
        run_experiment(compose_cfg(["rounds=12", "num_workers=8", "task.dim=1000",
                                    "task.samples_per_worker=40", "sparsifier.sparsity=0.01",
                                    f"participation.clients_per_round={m}"]), sweep / str(i))
        (sweep / str(i) / ".hydra").mkdir()
        (sweep / str(i) / ".hydra" / "overrides.yaml").write_text(
            f"- participation.clients_per_round={m}\n")
    t = plot_mod.plot(sweep, save=False).table.set_index("participation.clients_per_round")
    assert list(t.columns).index("patches") == list(t.columns).index("resyncs") + 1
    for i, m in enumerate((2, 8)):
        rows = pd.read_csv(sweep / str(i) / "metrics.csv")
        assert t.loc[m, "patches"] == rows["patches"].sum()
        assert t.loc[m, "resyncs"] == rows["resyncs"].sum()
    assert t.loc[2, "patches"] > 5 and t.loc[8, "patches"] == t.loc[8, "resyncs"] == 0
