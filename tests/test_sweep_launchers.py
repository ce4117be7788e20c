"""Sweeps through other Hydra launchers (issue #18): submitit's local launcher
(what submitit_slurm runs on a SLURM cluster) runs each job as its own
submitit job, and every job's results land in the sweep directory.
hydra/launcher=ray on a two-node Ray cluster is `make launcher-test`
(scripts/launcher_test.py, ~3 min)."""
import json
import subprocess
import sys

import pytest

from regtopk_fl.analysis.collect import collect
from regtopk_fl.paths import PROJECT_ROOT

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


@pytest.mark.slow
def test_submitit_local_sweep_lands_in_the_sweep_dir(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "regtopk_fl", "-m", "task=linreg", "num_workers=3", "rounds=5",
         "task.dim=10", "seed=0,1", "threads=1", "checkpoint.every=0", "progress=false",
         "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
         "+hydra.callbacks.job_host._target_=regtopk_fl.job_host.RecordJobHost",
         f"hydra.sweep.dir={sweep}"], cwd=PROJECT_ROOT, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = collect(sweep)
    assert sorted(df["seed"]) == [0, 1] and (df["status"] == "finished").all()
    assert (df["rounds_completed"] == 5).all()
    hosts = [json.loads((sweep / str(i) / "host.json").read_text()) for i in (0, 1)]
    ids = {h["submitit_job_id"] for h in hosts}
    assert len(ids) == 2 and None not in ids  # two submitit jobs, not this process
    assert (sweep / ".submitit").is_dir()
