"""scripts/bench_runtimes.py's report: medians and spreads over repeated,
interleaved runs, the Flower / in-process ratio and the suite / floor ratio
taken pairwise (timing itself is the script's job, never a test's)."""
from __future__ import annotations

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_runtimes")


def _row(case, runtime, rep, s):
    return {"case": case, "runtime": runtime, "rep": rep, "rounds": 10, "s_per_round": s,
            "total_s": 10 * s, "driver_cpu_s": s,
            "client_threads": [1] if runtime == "flower" else None,
            "client_timing_s": {"compute": s / 4, "handle": s} if runtime == "flower"
            else None}


def _cells(text, first):
    line = next(x for x in text.splitlines() if x.startswith(f"| {first}"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_report_gives_medians_spreads_and_pairwise_ratios(bench):
    ip, fl = [1.0, 2.0, 1.5], [1.1, 2.4, 3.0]  # pairwise ratios 1.1, 1.2, 2.0
    rows = [r for k in range(3) for r in (_row("resnet", "inprocess", k, ip[k]),
                                          _row("resnet", "flower", k, fl[k]))]
    pairs = [(0.9, 0.3, 1e-12, 1e-12, 0.6), (1.2, 0.3, 1e-12, 1e-12, 0.6),
             (0.6, 0.4, 1e-12, 1e-12, 0.8)]
    text = "\n".join(bench.report(rows, pairs, 3, " --repeat 3"))
    assert "--repeat 3" in text
    cells = _cells(text, "resnet (10 rounds) | inprocess")
    assert cells[2:4] == ["1.5000", "1.0000-2.0000"]
    assert _cells(text, "resnet (10 rounds) | flower")[2:4] == ["2.4000", "1.1000-3.0000"]
    assert _cells(text, "resnet (10 rounds) | flower")[-2:] == ["[1]", "600.0 / 1800.0"]
    assert _cells(text, "resnet (10 rounds) | inprocess")[-1] == "-"
    # the median of the pairwise ratios, not the ratio of the medians (1.6)
    assert _cells(text, "resnet |")[1:4] == ["1.20x", "1.10x-2.00x", "3"]
    assert _cells(text, "in-process / floor")[1:3] == ["3.00x", "1.50x-4.00x"]
    assert _cells(text, "in-process / torch twin")[1:3] == ["1.50x", "0.75x-2.00x"]
    assert _cells(text, "torch twin / floor")[1:3] == ["2.00x", "2.00x-2.00x"]
    assert "not met (median 3.00x)" in text


def test_floor_target_met_is_said(bench):
    rows = [_row("linreg", "inprocess", 0, 0.001), _row("linreg", "flower", 0, 0.2)]
    text = "\n".join(bench.report(rows, [(0.3, 0.25, 1e-12, 1e-12, 0.5)], 1, ""))
    assert "Target <= 1.5x: met (median 1.20x)" in text


def test_repeat_must_be_positive(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--repeat", "0"])
    assert "--repeat=0: must be >= 1" in capsys.readouterr().err


def test_set_overrides_reach_every_case(bench, monkeypatch):
    """--set adds a Hydra override to every case (device=cpu on a GPU
    machine); task.* keys only to the CIFAR case, whose task has them."""
    seen = {}
    monkeypatch.setattr(bench, "bench", lambda cases, tmp, **kw: seen.update(cases=cases, **kw)
                        or [])
    monkeypatch.setattr(bench, "floor_pairs",
                        lambda tmp, repeat, extra, **kw: seen.update(floor=extra) or [])
    monkeypatch.setattr(bench, "report", lambda *a: [])
    monkeypatch.setattr(bench, "emit", lambda lines, out: "")
    assert bench.main(["--set", "device=cpu", "--set", "task.data_path=/x.tar.gz",
                       "--set", "runtime.num_cpus=2"]) == 0
    linreg, cifar = (ov for _, ov in seen["cases"])
    assert "device=cpu" in linreg and "device=cpu" in cifar and seen["floor"] == ["device=cpu"]
    assert "task.data_path=/x.tar.gz" in cifar and not any(o.startswith("task.data_path")
                                                            for o in linreg)
    # runtime.* keys reach the Flower runs only: bench() drops them from in-process ones
    assert "runtime.num_cpus=2" in linreg and seen["flower_only_keys"] == ("runtime.",)


def test_set_runtime_keys_skip_the_inprocess_runs(bench, monkeypatch, tmp_path):
    """The in-process runtime has no runtime.* keys, so bench() leaves them
    out of its runs (Hydra would refuse them), and gives them to Flower's."""
    seen = []
    monkeypatch.setattr(bench, "_cfg", lambda ov: seen.append(ov) or ov)
    monkeypatch.setattr("regtopk_fl.runner.run_experiment",
                        lambda cfg, run_dir: {"rounds": 3, "client_threads": None})
    monkeypatch.setattr(bench, "per_round", lambda run_dir: 1.0)
    bench.bench([("c", ["x=1", "runtime.num_cpus=2"])], tmp_path,
                flower_only_keys=("runtime.",), first_rep=4)
    assert seen == [["runtime=inprocess", "x=1"], ["runtime=flower", "x=1", "runtime.num_cpus=2"]]


def test_nothing_to_run_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--cases", "cifar10"])
    assert "nothing left to run" in capsys.readouterr().err


def test_a_run_cut_short_keeps_its_repetitions(bench, monkeypatch, tmp_path):
    """--out is rewritten after every repetition, so a run killed by a time
    limit still leaves the pairs it finished; a half pair is not a ratio."""
    out = tmp_path / "bench.md"
    speeds = iter([1.0, 1.1, 2.0, 2.6, 3.0])  # rep 2's Flower run never comes

    def fake_bench(cases, tmp, first_rep=0, **kw):
        rows = []
        for rt in ("inprocess", "flower"):
            s = next(speeds, None)
            if s is None:
                if out.exists():
                    seen.append(out.read_text())
                raise KeyboardInterrupt  # the run is cut here
            rows.append(_row("resnet", rt, first_rep, s))
        return rows

    seen = []
    monkeypatch.setattr(bench, "bench", fake_bench)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--cases", "cifar10", "--repeat", "4", "--out", str(out)])
    text = seen[-1]
    assert "`python scripts/bench_runtimes.py --cases cifar10 --repeat 4 --out " in text
    assert "`) (cut short here: 2 of 4 repetitions so far)" in text  # outside the command
    assert _cells(text, "resnet |")[1:4] == ["1.20x", "1.10x-1.30x", "2"]
    assert "numpy floor" not in text  # --cases left the floor out
    rows = [_row("resnet", "inprocess", 0, 1.0), _row("resnet", "flower", 0, 1.2),
            _row("resnet", "inprocess", 1, 3.0)]
    assert _cells("\n".join(bench.report(rows, [], 2, "")), "resnet |")[1:4] == \
        ["1.20x", "1.20x-1.20x", "1"]
