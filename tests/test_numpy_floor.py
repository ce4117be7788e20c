"""scripts/numpy_floor.py, the plain-numpy floor that bench_runtimes.py holds
the in-process round against, must run the same algorithm: the same
trajectory as the suite's in-process run, to within the last bits (numpy's
and torch's mat-vec and norm kernels sum in different orders). Its torch
twin (``backend="torch"``, the same loop on torch tensors) likewise."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import load_script
from regtopk_fl.runner import build, run_experiment


@pytest.fixture(scope="module")
def floor():
    return load_script("numpy_floor")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("sp, s", [("regtopk", 0.6), ("topk", 0.5)])
def test_floor_follows_the_suites_trajectory(floor, make_cfg, tmp_path, one_thread, sp, s,
                                             backend):
    rounds = 400
    cfg = make_cfg(["task=linreg", "num_workers=20", f"sparsifier={sp}",
                    f"sparsifier.sparsity={s}", "sparsifier.mu=4" if sp == "regtopk" else
                    "sparsifier.mu=null", "eval_every=1", f"rounds={rounds}",
                    "checkpoint.every=0"])
    run_experiment(cfg, tmp_path)
    with open(tmp_path / "metrics.csv") as fh:
        suite = np.array([float(r["gap"]) for r in csv.DictReader(fh)])
    task, _ = build(cfg)
    ours, _ = floor.from_task(task, s, 4.0 if sp == "regtopk" else None, 0.01, rounds, backend)
    assert ours.shape == suite.shape == (rounds + 1,)
    assert suite[-1] < 0.5 * suite[0]  # the runs moved
    rel = np.abs(ours - suite) / suite
    assert rel.max() <= 1e-6, (int(rel.argmax()), rel.max())


def test_floor_refuses_an_unknown_backend(floor):
    with pytest.raises(ValueError, match="backend='jax'"):
        floor.from_task(None, 0.6, 4.0, 0.01, 1, "jax")


@pytest.mark.parametrize("k", [1, 3, 5, 7, 8])
def test_torch_twins_selection_is_numpys_ties_included(floor, k):
    """The twin's top-k (``topk`` when no row ties at its k-th value, else a
    stable sort) selects what numpy's stable argsort does, lowest index on ties."""
    import torch

    gen = torch.Generator().manual_seed(k)
    tied = torch.randint(0, 3, (40, 8), generator=gen).double()  # ties at the k-th value
    distinct = torch.randn(40, 8, generator=gen, dtype=torch.float64)  # the topk path
    for score in (tied, distinct, torch.cat([distinct, tied])):
        ours = floor.torch_top_rows(score, k)
        assert np.array_equal(ours.numpy(), floor.numpy_ops().top_rows(score.numpy(), k))
