"""The paper's published behaviour, from the experiment presets themselves."""
import csv

import pytest

from regtopk_fl.runner import run_experiment


def _series(run_dir, key):
    with open(run_dir / "metrics.csv") as fh:
        return [float(r[key]) for r in csv.DictReader(fh)]


def test_fig1_toy(make_cfg, tmp_path):
    loss = {}
    for sp in ("dense", "topk", "regtopk"):
        run_experiment(make_cfg(["experiment=fig1_toy", f"sparsifier={sp}"]), tmp_path / sp)
        loss[sp] = _series(tmp_path / sp, "loss")
    assert len(loss["topk"]) == 101  # round 0 + 100 iterations
    # Top-1: both workers send coordinate 0, which cancels; the loss never moves
    assert all(v == loss["topk"][0] for v in loss["topk"][:51])
    # RegTop-1 moves from its first regularized round and tracks dense
    assert loss["regtopk"][2] < loss["regtopk"][0]
    assert abs(loss["regtopk"][25] - loss["dense"][25]) <= 0.10 * loss["dense"][25]


@pytest.mark.slow
def test_fig2_linreg_s06(make_cfg, tmp_path):
    final = {}
    for sp in ("topk", "regtopk"):
        cfg = make_cfg(["experiment=fig2_linreg", f"sparsifier={sp}", "sparsifier.sparsity=0.6"])
        final[sp] = run_experiment(cfg, tmp_path / sp)["final"]["gap"]
    assert final["regtopk"] < 1e-6 < 1e-3 < final["topk"]
