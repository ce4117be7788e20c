"""scripts/bench_floor.py: its plain-PyTorch floors compute the suite's round
(the same sampled clients, batches and step), so that its ratios measure
the suite's overhead and nothing else; and its report's pairwise ratios.
Timing itself is the script's job, never a test's."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg, load_script


@pytest.fixture(scope="module")
def floor():
    return load_script("bench_floor")


TINY = ["task=tiny_image", "task.samples=400", "num_workers=10",
        "participation.clients_per_round=4", "lr=0.05", "rounds=4", "eval_every=4",
        "checkpoint.every=0", "runtime=inprocess", "threads=1", "seed=3"]


def _suite_params(tmp_path, overrides):
    from regtopk_fl.runner import run_experiment

    run_experiment(compose_cfg(TINY + overrides), tmp_path)
    return torch.load(tmp_path / "model.pt")["params"]


def _floor_params(floor, overrides, topk):
    from regtopk_fl import participation
    from regtopk_fl.runner import build

    cfg = compose_cfg(TINY + overrides)
    task, sparsifier = build(cfg)
    k = sparsifier.budget(task.dim) if topk else None
    f = floor.Floor(task, participation.from_cfg(cfg), float(cfg.lr), k)
    start = f.flat.clone()
    for t in range(1, 5):
        f.round(t)
    return f, start


@pytest.mark.parametrize("method,overrides", [
    ("dense", ["sparsifier=dense"]),
    ("topk", ["sparsifier=topk", "sparsifier.sparsity=0.05"]),
])
def test_floor_computes_the_suites_round(floor, tmp_path, method, overrides):
    suite = _suite_params(tmp_path, overrides)
    f, start = _floor_params(floor, overrides, topk=method == "topk")
    assert not torch.equal(f.flat, start)  # it trained
    # the model's parameters are views of the floor's flat vector
    assert f.params[0].data_ptr() == f.flat.data_ptr()
    # the same trajectory: only the order of float additions differs
    torch.testing.assert_close(f.flat, suite, rtol=1e-5, atol=1e-6)
    if method == "topk":  # every sampled client kept a residual of J - k entries
        k = max(1, round(0.05 * f.flat.numel()))
        assert f.memory and all(int((a != 0).sum()) <= f.flat.numel() - k
                                for a in f.memory.values())


def test_floor_differs_from_a_wrong_step(floor, tmp_path):
    """The comparison above can fail: twice the learning rate is not the suite's run."""
    suite = _suite_params(tmp_path, ["sparsifier=dense"])
    f, _ = _floor_params(floor, ["sparsifier=dense", "lr=0.1"], topk=False)
    assert not torch.allclose(f.flat, suite, rtol=1e-5, atol=1e-6)


def test_report_ratios_are_pairwise_to_the_right_floor(floor):
    import argparse

    rows = [{"case": c, "rep": rep, "s_per_round": s, "total_s": 10.0, "load": 1.0}
            for rep, vals in enumerate([(1.0, 2.0, 1.2, 2.2), (2.0, 4.0, 2.2, 4.2)])
            for c, s in zip(("floor dense", "floor topk", "inprocess dense", "inprocess topk"),
                            vals)]
    args = argparse.Namespace(threads=2, rounds=30, set=[])
    text = "\n".join(floor.report(rows, args, " --repeat 2"))
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in text.splitlines() if line.startswith("| ") and "case" not in line}
    assert cells["inprocess dense"][3] == "1.15x"  # median of 1.2 and 1.1
    assert cells["inprocess topk"][3] == "1.08x"  # 2.2/2.0 = 1.1, 4.2/4.0 = 1.05
    assert cells["inprocess dense"][4] == "1.10x-1.20x"


def test_median_step_skips_the_first_two_rounds(floor):
    wall = [10.0, 11.0, 12.0, 12.5, 13.0, 13.5]  # steps 1, 1, 0.5, 0.5, 0.5
    assert floor.median_step(wall) == 0.5


def test_compute_mode_times_both_sides_on_separate_tasks(floor):
    """--compute alternates the suite's gradients and the floor's round (each
    on its own task object): one timing per pair and side."""
    cfg = compose_cfg(TINY + ["sparsifier=dense"])
    res = floor.compute_ab(cfg, rounds=2, pairs=3)
    assert set(res) == {"suite", "floor"}
    assert len(res["suite"]) == len(res["floor"]) == 3
    assert all(v > 0 for v in res["suite"] + res["floor"])


def test_odd_repetitions_run_the_cases_in_reverse(floor, monkeypatch, tmp_path):
    """ABBA: a machine that slows down over a repetition favours no case."""
    import argparse

    seen = []
    monkeypatch.setattr(floor, "_cfg", lambda ov: ov)
    monkeypatch.setattr(floor, "run_floor", lambda cfg, rounds, topk: (
        seen.append("floor topk" if topk else "floor dense"), [0.0, 1, 2, 3, 4])[1])
    monkeypatch.setattr(floor, "run_suite", lambda cfg, d: (
        seen.append(next(o for o in cfg if o.startswith("runtime="))), [0.0, 1, 2, 3, 4])[1])
    args = argparse.Namespace(rounds=4, data="d", cache="c", threads=1, set=[], repeat=3,
                              methods=["dense"], runtimes=["inprocess", "flower"])
    rows = floor.bench(args, tmp_path)
    one = ["floor dense", "runtime=inprocess", "runtime=flower"]
    assert seen == one + one[::-1] + one
    assert [r["rep"] for r in rows] == [0] * 3 + [1] * 3 + [2] * 3


def test_paired_rounds_alternate_and_leave_the_suites_run_as_it_was(floor, tmp_path,
                                                                     monkeypatch):
    """--paired: the floor's round t runs after the suite's round t, inside
    the suite's run; each list has one entry per round, the floor's time is
    taken off the suite's, and the suite's trained model is bitwise the one
    of a run without the floor beside it."""
    from regtopk_fl import engine

    overrides = ["sparsifier=topk", "sparsifier.sparsity=0.05"]
    order = []
    inner, floor_round = engine.InProcessRun.round, floor.Floor.round

    def suite_round(self, t, observer=None):
        order.append(("suite", t))
        return inner(self, t, observer)

    def floor_rounds(self, t):
        order.append(("floor", t))
        return floor_round(self, t)

    monkeypatch.setattr(engine.InProcessRun, "round", suite_round)
    monkeypatch.setattr(floor.Floor, "round", floor_rounds)
    kept = {}
    real_run_suite = floor.run_suite

    def run_suite(cfg, run_dir, **kw):
        wall = real_run_suite(cfg, run_dir, **kw)
        kept["params"] = torch.load(run_dir / "model.pt")["params"]
        kept["rounds"] = real_run_suite(cfg, run_dir)  # the finished run: read back alone
        return wall

    monkeypatch.setattr(floor, "run_suite", run_suite)
    res = floor.paired(compose_cfg(TINY + overrides), 4, topk=True)
    assert order == [(who, t) for t in range(1, 5) for who in ("suite", "floor")]
    assert engine.InProcessRun.round is suite_round  # put back as it was found
    assert len(res["suite"]) == len(res["floor"]) == 4
    # run_suite's times are after rounds 1..4, as run_floor's (row 0, the
    # initial evaluation, only with start=True), so both medians start at round 3
    assert len(kept["rounds"]) == 4 and kept["rounds"] == sorted(kept["rounds"])
    assert all(x > 0 for x in res["suite"] + res["floor"])
    monkeypatch.undo()
    assert torch.equal(kept["params"], _suite_params(tmp_path / "alone", overrides))


def test_paired_report_takes_each_rounds_ratio(floor):
    res = {"dense": {"suite": [9.0, 9.0, 1.1, 2.4, 3.0, 4.4, 5.0],
                     "floor": [1.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0]}}
    text = "\n".join(floor.paired_report(res, 7, 2, 2, " --paired"))
    row = [c.strip() for c in text.splitlines()[-1].strip("|").split("|")]
    # rounds 3..7: ratios 1.1, 1.2, 1.0, 1.1, 1.0 -> median 1.1, min-max 1.0-1.2
    assert row[0] == "inprocess dense" and row[1] == "3.000" and row[2] == "3.000"
    assert row[3] == "1.100x" and row[5] == "1.000x-1.200x"
