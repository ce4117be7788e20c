"""Run one configured experiment into its run directory, on either runtime.

The in-process loop lives here; the Flower runtime is in strategies/ and
clients/ and reports rounds through the same :func:`round_row`, so both write
the same files (see results.py).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from . import network
from .checkpoint import Checkpointer, config_fingerprint, crash_point, run_dir_status
from . import trackers, trust
from .device import resolve_device
from .results import RunRecorder

log = logging.getLogger(__name__)


def build(cfg: DictConfig, background: bool = False):
    """(task, sparsifier) from the settings: Hydra instantiates the ``_target_``s.
    ``background``: a task that can (its constructor takes ``background``)
    makes its data on a thread of its own while the run starts (issue #34)."""
    import inspect

    from hydra.utils import get_class

    from .paths import resolve_path

    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    if "device" in task_cfg:
        task_cfg["device"] = resolve_device(cfg.device)
    for key in ("data_path", "cache_dir"):
        if task_cfg.get(key):
            task_cfg[key] = str(resolve_path(task_cfg[key]))
    if background and "background" in inspect.signature(get_class(task_cfg["_target_"])).parameters:
        task_cfg["background"] = True
    task = instantiate(task_cfg)
    task.upload = OmegaConf.select(cfg, "upload", default="model_change")  # after local steps
    sparsifier = instantiate(OmegaConf.to_container(cfg.sparsifier, resolve=True))
    return task, sparsifier


def identity(cfg: DictConfig, sparsifier) -> dict:
    mu = sparsifier.uses_mu  # mu and distortion are part of the method (compress/base.py)
    return {
        "experiment": OmegaConf.select(cfg, "experiment"),
        "task": cfg.task.name, "runtime": cfg.runtime.name, "sparsifier": cfg.sparsifier.name,
        "sparsity": float(sparsifier.sparsity),
        "mu": float(cfg.sparsifier.mu) if mu else None,
        "distortion": OmegaConf.select(cfg, "sparsifier.distortion") if mu else None,
        "num_workers": int(cfg.num_workers), "rounds": int(cfg.rounds), "seed": int(cfg.seed),
        "lr": float(cfg.lr), "local_steps": int(cfg.local_steps),
        **_init_record(OmegaConf.select(cfg, "task.init_from")),
    }


def _init_record(path) -> dict:
    """``init_from`` for summary.json (only where set): the file, its sha256,
    and the ``config_sha256`` of the run that wrote it (from the summary.json
    beside it; None for a file of another origin)."""
    if not path:
        return {}
    import hashlib

    from .paths import resolve_path

    f = resolve_path(path)
    source = None
    try:
        source = json.loads((f.parent / "summary.json").read_text()).get("config_sha256")
    except (OSError, ValueError, AttributeError):
        pass
    return {"init_from": {"path": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                          "source_config_sha256": source}}


def round_row(t: int, outcome, eval_metrics: dict, plan, missing: int, replies: int,
              net=None, sampled: int | None = None) -> dict:
    """One metrics.csv row; ``loss`` is the task's exact global training loss
    where it has one (toy, linreg), else the weighted minibatch loss.
    ``plan`` is the round's downlink (broadcast.Plan; None for round 0)."""
    from .network import comm_seconds

    loss = eval_metrics.get("loss", outcome.loss if outcome is not None else float("nan"))
    ups = list(outcome.uplink_each.values()) if outcome is not None else []
    return {
        "round": t, "loss": loss, "gap": eval_metrics.get("gap"),
        "accuracy": eval_metrics.get("accuracy"), "test_loss": eval_metrics.get("test_loss"),
        "uplink_bytes": outcome.uplink_raw if outcome else 0,
        "uplink_coded_bytes": outcome.uplink_coded if outcome else 0,
        "downlink_bytes": sum(plan.raw.values()) if plan else 0,
        "downlink_coded_bytes": sum(plan.coded.values()) if plan else 0,
        "resyncs": plan.resyncs if plan else 0,
        "patches": plan.patches if plan else 0,
        "sent": outcome.sent if outcome else 0,
        "sampled": sampled, "replies": replies, "missing": missing,
        "rejected": len(outcome.rejected) if outcome else 0,
        "comm_s": comm_seconds(net, ups, plan.coded.values() if plan else []) if t else (
            0.0 if net is not None else None),
    }


def evaluate_due(t: int, eval_every: int, rounds: int) -> bool:
    """Round ``t`` is evaluated (``eval_every``, the first and the last round);
    plain ints, read from the config once per run, not once per round."""
    return t == 0 or t % eval_every == 0 or t == rounds


class Progress:
    def __init__(self, total: int, enabled: bool, desc: str, initial: int = 0):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="round",
                            dynamic_ncols=True, leave=False)

    def update(self, row: dict) -> None:
        if self.bar is None:
            return
        post = {k: f"{row[k]:.4g}" for k in ("loss", "gap", "accuracy")
                if isinstance(row.get(k), float) and not math.isnan(row[k])}
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_inprocess(cfg: DictConfig, task, sparsifier, recorder: RunRecorder,
                  ckpt: Checkpointer) -> None:
    from .engine import InProcessRun
    from .participation import from_cfg as participation_from_cfg

    run = InProcessRun(task, sparsifier, lr=cfg.lr, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, local_steps=cfg.local_steps,
                       local_lr=cfg.local_lr, seed=cfg.seed,
                       fault_cfg=OmegaConf.to_container(cfg.faults), device=resolve_device(cfg.device),
                       broadcast=OmegaConf.select(cfg, "broadcast", default="gradient"),
                       participation=participation_from_cfg(cfg, task.num_examples()))
    trust.install(run.server, cfg, task, recorder, sparsifier)  # what the server believes (#11)
    net = network.settings(cfg)
    obs_every = int(OmegaConf.select(cfg, "observe.every", default=0) or 0)
    observer = None
    if obs_every:
        from .observe import GradientObserver
        observer = GradientObserver(recorder.dir, sparsifier.sparsity)
    start, state = ckpt.load(recorder)
    if state is not None:
        run.load_state_dict(state["run"])
        if observer is not None:
            observer.load_state_dict(state["observer"])
    else:
        recorder.add(round_row(0, None, task.evaluate(run.server.params, run.server.buffers),
                               None, 0, 0, net))
    rounds, eval_every = int(cfg.rounds), int(cfg.eval_every)
    bar = Progress(rounds, cfg.progress, f"{cfg.sparsifier.name}", initial=start - 1)
    for t in range(start, rounds + 1):
        watch = observer is not None and (t == 1 or t % obs_every == 0)
        if watch:
            observer.round = t
        r = run.round(t, observer if watch else None)
        ev = (task.evaluate(run.server.params, run.server.buffers)
              if evaluate_due(t, eval_every, rounds) else {})
        row = round_row(t, r["outcome"], ev, r["plan"], r["missing"], r["replies"], net,
                        r.get("sampled"))
        if not r["outcome"].accepted:
            log.warning("round %d: no valid reply; model unchanged", t)
        recorder.add(row)
        bar.update(row)
        if ckpt.due(t):
            ckpt.save(t, {"run": run.state_dict(),
                          "observer": None if observer is None else observer.state_dict()},
                      recorder)
        crash_point(t)
    bar.close()
    if observer is not None:
        observer.write()
    recorder.save_model(run.server.params, run.server.buffers)


def run_experiment(cfg: DictConfig, run_dir, execute=None) -> dict:
    """Build, run and record one experiment; returns the summary.

    ``execute(cfg, task, sparsifier, recorder, ckpt)`` runs the rounds; by
    default the one of ``cfg.runtime``. A run directory that already holds
    this configuration's finished run is left as it is; one with its
    checkpoint resumes (see checkpoint.py)."""
    from . import determinism

    determinism.apply_cfg(cfg)  # before any CUDA work (cuBLAS reads its env once)
    with torch_threads(OmegaConf.select(cfg, "threads", default=None)):
        return _run_experiment(cfg, Path(run_dir), execute)


@contextmanager
def torch_threads(threads):
    """``threads``: torch's intra-op CPU threads for the run (None: torch's
    default), put back as they were when the run ends. Applied here, so every
    entry point gets it: the launcher, ``flwr run``'s ServerApp, and the
    benchmarks and tests that call :func:`run_experiment`."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if threads and torch.get_num_threads() != old:
            torch.set_num_threads(old)


def _run_experiment(cfg: DictConfig, run_dir: Path, execute) -> dict:
    fingerprint = config_fingerprint(cfg)
    if run_dir_status(run_dir, fingerprint) == "finished":
        log.warning("%s already holds this finished run; nothing to do", run_dir)
        return json.loads((run_dir / "summary.json").read_text())
    task, sparsifier = build(cfg, background=True)  # the runtime starts while data is drawn
    recorder = RunRecorder(run_dir, {**identity(cfg, sparsifier), "config_sha256": fingerprint},
                           sinks=trackers.build(cfg), settings=trackers.flat_settings(cfg))
    ckpt = Checkpointer(cfg, run_dir, fingerprint)
    if execute is None:  # the runtime's entry point, named by conf/runtime/*.yaml
        execute = get_method(cfg.runtime._target_)
    recorder.write_summary("running")
    try:
        execute(cfg, task, sparsifier, recorder, ckpt)
    except BaseException:
        try:
            recorder.close("failed")
        except Exception:  # a sink that fails now must not hide why the run failed
            log.exception("closing the run's sinks failed")
        raise
    summary = recorder.close("finished")
    ckpt.finish()
    return summary
