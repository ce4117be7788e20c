"""scripts/byzantine_table.py: the refusal counts are summed over seeds (the
first tables kept only the last seed's count per cell: issue #31)."""
import csv

from conftest import load_script

FIELDS = ["task", "rule", "attack", "seed", "metric", "final", "rejected", "status", "rounds",
          "seconds"]


def _rows():
    rows = []
    for seed, refused in ((0, 2), (1, 0), (2, 5)):
        for attack in ("honest", "scaled_copy"):
            for rule in ("mean", "median"):
                n = refused if attack == "scaled_copy" else 0
                rows.append({"task": "linreg", "rule": rule, "attack": attack, "seed": seed,
                             "metric": "gap", "final": 1.0 + seed, "rejected": n + (rule == "median"),
                             "status": "finished", "rounds": 300, "seconds": 1.0})
    return rows


def test_refusals_are_summed_over_seeds():
    mod = load_script("byzantine_table")
    text = mod.markdown(_rows(), "linreg")
    line = next(ln for ln in text.splitlines() if ln.startswith("uploads the guard refused"))
    # per cell: seeds 0, 1, 2 -> mean 2 + 0 + 5 = 7; median 3 + 1 + 6 = 10 (+1 per seed),
    # and honest/median 1 per seed = 3. The last seed alone would give 5, 6 and 1.
    assert "scaled_copy/mean: 7" in line
    assert "scaled_copy/median: 10" in line
    assert "honest/median: 3" in line


def test_from_csv_rebuilds_the_markdown(tmp_path):
    mod = load_script("byzantine_table")
    rows = _rows()
    out = tmp_path / "linreg.csv"
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    assert mod.main(["--task", "linreg", "--from-csv", str(out)]) == 0
    assert out.with_suffix(".md").read_text() == mod.markdown(rows, "linreg")
    assert "scaled_copy/mean: 7" in out.with_suffix(".md").read_text()
