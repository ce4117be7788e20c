"""Experiment trackers: sinks that get a run's rows beside metrics.csv.

The ``tracker`` config group (conf/tracker/*.yaml) names one sink class with
``_target_``; :func:`build` instantiates it and the RunRecorder
(regtopk_fl/results.py, which describes the sink methods) feeds it, in the
process that runs the server, under either runtime. ``csv`` adds nothing:
metrics.csv and summary.json are always written. One small file per sink:

* ``tensorboard_sink.py``: event files in ``<run dir>/tb/`` (scalars + HParams);
* ``mlflow_sink.py``: an MLflow run per job, an experiment per sweep.

A sink class says what it needs installed (``requires``: module names) and
the pyproject extra that installs it (``extra``); settings.validate() checks
both, the sink's keys and their values (``check``) before any work.
"""
from __future__ import annotations

import math
import numbers

from omegaconf import OmegaConf

from ..results import COLUMNS


def build(cfg) -> list:
    """The sinks the settings ask for: ``cfg.tracker`` instantiated (none
    where the settings have no ``tracker``, e.g. an older ``flwr run`` config)."""
    from hydra.utils import instantiate

    node = OmegaConf.select(cfg, "tracker")
    if node is None:
        return []
    return [instantiate(OmegaConf.to_container(node, resolve=True))]


def flat_settings(cfg) -> dict:
    """The job's settings as flat "a.b" -> scalar pairs: what a tracker
    records as hyperparameters / params. Lists are joined by ","; left out
    are ``_target_`` paths and the top-level keys that do not change what a
    run computes (checkpoint.NOT_IDENTITY: checkpointing, progress, the
    tracker itself, ...)."""
    from ..checkpoint import NOT_IDENTITY

    tree = OmegaConf.to_container(cfg, resolve=True)
    flat: dict = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k != "_target_":
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (list, tuple)):
            flat[prefix] = ",".join(str(x) for x in node)
        else:
            flat[prefix] = node

    for key, value in tree.items():
        if key not in NOT_IDENTITY:
            walk(key, value)
    return flat


def metrics(row: dict) -> dict:
    """One row's numeric columns but ``round`` (the step): the cells that
    metrics.csv does not leave empty (None and NaN are empty there)."""
    out = {}
    for col in COLUMNS[1:]:
        v = row.get(col)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
            continue
        out[col] = float(v)
    return out


def wall_clock(recorder, row: dict) -> float:
    """The epoch time at which the row's round ended (also for rows restored
    from a checkpoint, whose ``wall_s`` counts the run's earlier part)."""
    import time

    return time.time() - recorder.elapsed() + float(row.get("wall_s") or recorder.elapsed())


def job_place(run_dir) -> tuple:
    """(store directory, sweep name or None, short job name, long job name)
    of a run directory: in a Hydra sweep the sweep directory, its name, the
    job's folder in it and "<job number> <its overrides>"; otherwise the run
    directory and its name (twice)."""
    from pathlib import Path

    run_dir = Path(run_dir).resolve()
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            sweep = Path(str(hc.sweep.dir)).resolve()
            if hc.mode == RunMode.MULTIRUN and sweep in run_dir.parents:
                return (sweep, sweep.name, str(run_dir.relative_to(sweep)),
                        f"{hc.job.num} {hc.job.override_dirname}".strip())
    except (ImportError, ValueError):
        pass
    return run_dir, None, run_dir.name, run_dir.name
