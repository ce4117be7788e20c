"""Smoke test of scripts/bench_sparsifiers.py (--quick: small J, few repeats)."""
from __future__ import annotations

import csv

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_sparsifiers")


def table_rows(text):
    """The main table's body rows as lists of cells."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| cpu |"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_quick_run_prints_every_sparsifier(bench, capsys, tmp_path):
    out = tmp_path / "bench.md"
    rows = bench.main(["--quick", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    text = capsys.readouterr().out
    head = [c.strip() for c in next(line for line in text.splitlines()
                                    if line.startswith("| device | J |")).strip("|").split("|")]
    col = {name: i for i, name in enumerate(head)}
    printed = [r for r in table_rows(text) if len(r) == len(head)]
    methods = {r[col["method"]] for r in printed}
    expected = set(bench.METHODS) | {bench.FLOOR, bench.SORT}
    assert expected <= methods
    for r in printed:
        assert float(r[col["select x topk"]]) > 0, r
        assert float(r[col["select ms"]]) > 0, r
        if r[col["method"]] in bench.METHODS:
            assert float(r[col["step x topk"]]) > 0, r
            assert float(r[col["mean sent"]]) >= 0, r
    topk = [r for r in printed if r[col["method"]] == "topk"]
    assert len(topk) == len(bench.SPARSITIES)  # one per sparsity
    assert all(float(r[col["select x topk"]]) == 1.0 and float(r[col["step x topk"]]) == 1.0
               for r in topk)
    # the returned rows, the Markdown file and the CSV agree on the methods
    assert {r["method"] for r in rows} == methods
    assert out.read_text() in text
    with open(out.with_suffix(".csv")) as fh:
        recs = list(csv.DictReader(fh))
    assert {r["method"] for r in recs} == methods
    assert all(float(r["select_x_topk"]) > 0 for r in recs)
    assert "torch" in text and "cpu" in text


def test_bad_repeats_is_rejected(bench):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--repeats", "0"])


def test_repeat_reports_median_and_spread_per_cell(bench, capsys, tmp_path):
    out = tmp_path / "bench.md"
    bench.main(["--quick", "--repeats", "1", "--repeat", "3", "--device", "cpu",
                "--methods", "regtopk", "--sparsities", "0.01", "0.1", "--out", str(out)])
    text = capsys.readouterr().out
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Passes per cell (3 runs"))
    head = [c.strip() for c in lines[at + 2].strip("|").split("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[at + 4:at + 6]]
    assert [r[head.index("S")] for r in body] == ["0.01", "0.1"]
    with open(out.with_suffix(".csv")) as fh:
        recs = list(csv.DictReader(fh))
    assert {r["method"] for r in recs} == {bench.FLOOR, "topk", "regtopk"}  # no sort
    for r in body:
        for name in ("Top-k step passes", "RegTop-k ÷ Top-k step"):
            med, spread = r[head.index(name)].split(" (")
            lo, hi = (float(x) for x in spread.rstrip(")").split("-"))
            key = {"Top-k step passes": ("topk", "step_passes"),
                   "RegTop-k ÷ Top-k step": ("regtopk", "step_x_topk")}[name]
            runs = sorted(float(c[key[1]]) for c in recs
                          if c["method"] == key[0] and c["S"] == r[head.index("S")])
            assert len(runs) == 3  # one value per run, each in the CSV
            assert (lo, float(med), hi) == pytest.approx((runs[0], runs[1], runs[2]), abs=0.006)
    assert "Targets and verdicts (largest J, medians over the runs)" in text


def test_bad_repeat_is_rejected(bench):
    with pytest.raises(SystemExit, match="--repeat=0"):  # ours, not argparse's unknown flag
        bench.main(["--quick", "--repeat", "0"])


def test_shi_comparison_counts_and_ratios(bench, capsys):
    """--shi times Shi et al.'s five selections and reports each one's count
    over k from the worker steps: exact for top-k and random-k, about k for
    DGC (within its bounds), at least k for trimmed top-k."""
    rows = bench.main(["--quick", "--shi", "--repeats", "2", "--device", "cpu",
                       "--sparsities", "0.01"])
    text = capsys.readouterr().out
    assert "Shi et al.'s comparison" in text
    by = {r["method"]: r for r in rows}
    assert set(bench.SHI) <= set(by) and "sort (authors')" not in by
    for m in ("topk", "randomk"):
        assert by[m]["sent_x_k_min"] == by[m]["sent_x_k_max"] == 1.0
    assert 0.8 * 0.8 <= by["dgc"]["sent_x_k_min"] and by["dgc"]["sent_x_k_max"] <= 1.3
    assert by["trimmed_topk"]["sent_x_k_min"] >= 1.0
    assert by["topk"]["select_x_topk"] == 1.0
    shi = [line for line in text.splitlines() if line.startswith("| cpu |") and "| dgc |" in line]
    assert len(shi) == 2  # the full table's row and the comparison's row
