"""scripts/time_to_accuracy.py: Shi et al.'s time-to-target on the network model."""
from __future__ import annotations

import pandas as pd
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def tta():
    return load_script("time_to_accuracy")


def curves():
    rows = []
    # dense reaches 30 % at round 20, gaussiank at 30, topk at 40 (seed 0) / never (seed 1)
    for seed in (0, 1):
        for method, hit in (("dense", 20), ("gaussiank", 30), ("topk", 40 if seed == 0 else None)):
            for r in range(0, 60, 10):
                acc = 35.0 if hit is not None and r >= hit else 10.0
                rows.append(dict(sparsifier=method, seed=seed, round=r, accuracy=acc,
                                 comm_s=0.5 if method == "dense" else 0.01))
    return pd.DataFrame(rows)


def test_reach_is_the_first_round_at_target_with_the_comm_up_to_it(tta):
    hit = tta.reach(curves(), 30.0)
    assert hit[("dense", 0)] == (20, pytest.approx(1.5))  # rounds 0, 10, 20
    assert hit[("gaussiank", 1)] == (30, pytest.approx(0.04))
    assert hit[("topk", 1)] is None


def test_table_times_and_pairs_by_seed(tta):
    lines = tta.table(curves(), 30.0, t_c=100.0, t_s={"dense": 0.0, "gaussiank": 10.0,
                                                      "topk": 5.0})
    row = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
           for line in lines[2:]}
    # dense: 20 rounds x 0.1 s + 1.5 s comm = 3.5 s; gaussiank: 30 x 0.11 + 0.04 = 3.34 s
    assert row["dense"][6] == "3.5"
    assert row["gaussiank"][6] == "3.3"
    assert row["dense"][7].startswith(f"{3.5 / 3.34:.2f} (n = 2)")
    assert row["topk"][1] == "1 of 2"  # seed 1 never reached the target
    assert row["topk"][7].startswith(f"{(40 * 0.105 + 0.05) / 3.34:.2f} (n = 1)")
