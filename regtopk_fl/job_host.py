"""Where a sweep job ran: a Hydra callback for sweeps on other launchers.

``+hydra.callbacks.job_host._target_=regtopk_fl.job_host.RecordJobHost`` makes
every job that completed write ``host.json`` into its run directory, from the
process that ran it: the host name, the process id, the Ray node id when the
job ran as a Ray task (``hydra/launcher=ray``) and the SLURM / submitit job id
when it ran under ``hydra/launcher=submitit_*``. Nothing is written for a job
that failed or was refused, so a refused directory stays as it was
(launcher.py). ``scripts/launcher_test.py`` uses it to check that a sweep's
jobs landed on every node.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback

from .ray_cluster import ray_node_id


def where() -> dict:
    """This process's host, pid, Ray node and batch-system job ids (None where not any)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "ray_node_id": ray_node_id(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "submitit_job_id": os.environ.get("SUBMITIT_LOCAL_JOB_ID") or os.environ.get("SLURM_JOB_ID")}


class RecordJobHost(Callback):
    """Writes ``host.json`` (:func:`where`) into each completed job's run directory."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if job_return is None or job_return.status != JobStatus.COMPLETED:
            return
        out = Path(HydraConfig.get().runtime.output_dir)
        if out.is_dir():
            (out / "host.json").write_text(json.dumps(where(), indent=1) + "\n")
