"""How many torch threads each process computes with (issue #19): the run's
``threads`` in the process that runs run_experiment, whatever the entry point,
and in a Flower client its Ray CPU share, also where OMP_NUM_THREADS is
exported (Ray then leaves it alone, and two actors of two threads each
oversubscribed a 2-core machine)."""
from __future__ import annotations

import pytest
import torch

from regtopk_fl.ray_cluster import ray_cpu_share
from regtopk_fl.runner import run_experiment


def test_run_experiment_applies_threads_and_puts_them_back(make_cfg, tmp_path):
    seen = []

    def execute(cfg, task, sparsifier, recorder, ckpt):
        seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    run_experiment(make_cfg(["task=linreg", "num_workers=2", "rounds=1", f"threads={other}"]),
                   tmp_path / "a", execute)
    assert seen == [other] and torch.get_num_threads() == before
    run_experiment(make_cfg(["task=linreg", "num_workers=2", "rounds=1"]), tmp_path / "b",
                   execute)  # threads=null: torch's own setting
    assert seen == [other, before] and torch.get_num_threads() == before


def test_no_cpu_share_outside_a_ray_worker():
    assert ray_cpu_share() is None  # the test process is no Ray actor


@pytest.mark.flower
@pytest.mark.slow
def test_flower_clients_use_their_cpu_share_despite_omp_num_threads(make_cfg, tmp_path,
                                                                    monkeypatch):
    # exported before Ray starts: Ray's workers inherit it and Ray keeps it
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    summary = run_experiment(make_cfg(["task=linreg", "num_workers=2", "rounds=2",
                                       "runtime=flower", "runtime.client_cpus=1"]), tmp_path)
    assert summary["status"] == "finished"
    assert summary["client_threads"] == [1]
