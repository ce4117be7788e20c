"""scripts/profile_round.py: a clock around each step of the in-process
round, in microseconds per round; the steps nest as the round does."""
from __future__ import annotations

import re

from conftest import ARCHIVE, load_script, needs_archive


def test_every_step_is_timed_and_the_steps_nest(capsys, one_thread):
    prof = load_script("profile_round")
    assert prof.main(["--rounds", "20"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"wall_time_s [0-9.]+ for 20 rounds", out)
    us = {name: v for v, name in ((float(m.group(1)), m.group(2))
                                  for m in re.finditer(r"^\s+([0-9.]+)\s+(\S+)$", out, re.M))}
    assert set(us) == {path for _, path in prof.STEPS}
    assert all(v > 0 for v in us.values()), us  # every step ran in every round
    # a step's clock holds the clocks of the steps it calls, one after the other
    assert us["InProcessRun.round"] >= (us["Coordinator.plan"] + us["worker_round"]
                                        + us["Coordinator.collect"])
    assert us["sparsify"] >= (us["ErrorFeedbackMemory.accumulate"] + us["RegTopK.select"]
                              + us["ErrorFeedbackMemory.commit"])
    assert us["FedServer.step"] >= us["FedServer._validate"] + us["FedServer._aggregate"]
    # and the clocks are gone afterwards
    from regtopk_fl import engine, fedround
    from regtopk_fl.fedround import FedServer

    assert engine.worker_round is fedround.worker_round
    assert not hasattr(fedround.worker_round, "__wrapped__")
    assert not hasattr(vars(FedServer)["_feedback"].__func__, "__wrapped__")


@needs_archive
def test_the_in_process_twin_times_the_workers_steps_too(capsys, tmp_path, one_thread):
    """--flower DATA --runtime inprocess: the in-process round of the CIFAR-10
    workload under client sampling, each worker and server step with its
    median and calls per round; the round holds the steps it calls."""
    prof = load_script("profile_round")
    assert prof.main(["--flower", str(ARCHIVE), "--runtime", "inprocess", "--width", "4",
                      "--workers", "4", "--rounds", "4", "--method", "dense",
                      "--cache", str(tmp_path), "--override", "task.subset_per_class=4",
                      "task.test_subset=10", "participation.clients_per_round=2",
                      "threads=1", "task.batch_size=4"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(3): (float(m.group(1)), float(m.group(2)))
            for m in re.finditer(r"^\s+([0-9.]+) ms x\s+([0-9.]+) =\s+[0-9.]+\s+(\S+)$", out,
                                 re.M)}
    assert set(rows) == {path for _, path in prof.INPROCESS_STEPS}
    assert rows["InProcessRun.round"][1] == 1.0 and rows["_ImageTask.batch"][1] == 2.0
    assert rows["InProcessRun.round"][0] >= rows["worker_round"][0] >= \
        rows["_ImageTask.gradients"][0]
