"""Run one configured experiment into its run directory, on either runtime.

The in-process loop lives here; the Flower runtime is in strategies/ and
clients/ and reports rounds through the same :func:`round_row`, so both write
the same files (see results.py).
"""
from __future__ import annotations

import hashlib
import logging
import math
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .results import RunRecorder, atomic_write

log = logging.getLogger(__name__)


def resolve_device(cfg) -> str:
    want = OmegaConf.select(cfg, "device", default="auto")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def build(cfg: DictConfig):
    """(task, sparsifier) from the settings: Hydra instantiates the ``_target_``s."""
    from .settings import resolve_path

    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    if "device" in task_cfg:
        task_cfg["device"] = resolve_device(cfg)
    for key in ("data_path", "cache_dir"):
        if task_cfg.get(key):
            task_cfg[key] = resolve_path(task_cfg[key])
    task = instantiate(task_cfg)
    sparsifier = instantiate(OmegaConf.to_container(cfg.sparsifier, resolve=True))
    return task, sparsifier


def identity(cfg: DictConfig, sparsifier) -> dict:
    from .settings import USES_MU

    return {
        "experiment": OmegaConf.select(cfg, "experiment"),
        "task": cfg.task.name, "runtime": cfg.runtime.name, "sparsifier": cfg.sparsifier.name,
        "sparsity": float(sparsifier.sparsity),
        "mu": float(cfg.sparsifier.mu) if cfg.sparsifier.name in USES_MU else None,
        "distortion": OmegaConf.select(cfg, "sparsifier.distortion")
        if cfg.sparsifier.name in USES_MU else None,
        "num_workers": int(cfg.num_workers), "rounds": int(cfg.rounds), "seed": int(cfg.seed),
        "lr": float(cfg.lr), "local_steps": int(cfg.local_steps),
    }


def round_row(t: int, outcome, eval_metrics: dict, downlink: int, missing: int,
              replies: int) -> dict:
    """One metrics.csv row; ``loss`` is the task's exact global training loss
    where it has one (toy, linreg), else the weighted minibatch loss."""
    loss = eval_metrics.get("loss", outcome.loss if outcome is not None else float("nan"))
    return {
        "round": t, "loss": loss, "gap": eval_metrics.get("gap"),
        "accuracy": eval_metrics.get("accuracy"), "test_loss": eval_metrics.get("test_loss"),
        "uplink_bytes": outcome.uplink_raw if outcome else 0,
        "uplink_coded_bytes": outcome.uplink_coded if outcome else 0,
        "downlink_bytes": downlink, "sent": outcome.sent if outcome else 0,
        "replies": replies, "missing": missing,
        "rejected": len(outcome.rejected) if outcome else 0,
    }


def evaluate_due(task, t: int, cfg) -> bool:
    return t == 0 or t % int(cfg.eval_every) == 0 or t == int(cfg.rounds)


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


def config_fingerprint(cfg: DictConfig) -> str:
    keep = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in ("hydra", "checkpoint", "progress")}
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(keep)).encode()).hexdigest()


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


def run_inprocess(cfg: DictConfig, task, sparsifier, recorder: RunRecorder) -> None:
    from .engine import InProcessRun

    run = InProcessRun(task, sparsifier, lr=cfg.lr, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, local_steps=cfg.local_steps,
                       local_lr=cfg.local_lr, seed=cfg.seed,
                       fault_cfg=OmegaConf.to_container(cfg.faults), device=resolve_device(cfg))
    ckpt_path = recorder.dir / "checkpoint.pt"
    every = int(cfg.checkpoint.every)
    fingerprint = config_fingerprint(cfg)
    start = 1
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise RuntimeError(f"{ckpt_path} belongs to a different configuration; "
                               "use another hydra.run.dir or delete it")
        run.load_state_dict(state["run"])
        recorder.rows, recorder.offset_s = state["rows"], state["elapsed"]
        start = state["round"] + 1
        log.info("resumed from %s at round %d", ckpt_path, start)
    else:
        recorder.add(round_row(0, None, task.evaluate(run.server.params, run.server.buffers), 0, 0, 0))
    bar = Progress(int(cfg.rounds), cfg.progress, f"{cfg.sparsifier.name}", initial=start - 1)
    obs_every = int(OmegaConf.select(cfg, "observe.every", default=0) or 0)
    observer = None
    if obs_every:
        from .observe import GradientObserver
        observer = GradientObserver(recorder.dir, sparsifier.sparsity)
    for t in range(start, int(cfg.rounds) + 1):
        watch = observer is not None and (t == 1 or t % obs_every == 0)
        if watch:
            observer.round = t
        r = run.round(t, observer if watch else None)
        ev = task.evaluate(run.server.params, run.server.buffers) if evaluate_due(task, t, cfg) else {}
        row = round_row(t, r["outcome"], ev, r["downlink_bytes"], r["missing"], r["replies"])
        if not r["outcome"].accepted:
            log.warning("round %d: no valid reply; model unchanged", t)
        recorder.add(row)
        bar.update(row)
        if every and t % every == 0 and t < int(cfg.rounds):
            recorder.flush()
            _atomic_torch_save({"fingerprint": fingerprint, "round": t, "run": run.state_dict(),
                                "rows": recorder.rows, "elapsed": recorder.elapsed()}, ckpt_path)
    bar.close()
    if observer is not None:
        observer.write()
    torch.save({"params": run.server.params, "buffers": run.server.buffers},
               recorder.dir / "model.pt")


def run_experiment(cfg: DictConfig, run_dir) -> dict:
    """Build, run and record one experiment; returns the summary."""
    task, sparsifier = build(cfg)
    recorder = RunRecorder(run_dir, identity(cfg, sparsifier))
    recorder.write_summary("running")
    try:
        if cfg.runtime.name == "inprocess":
            run_inprocess(cfg, task, sparsifier, recorder)
        else:
            from strategies.server_app import run_simulation
            run_simulation(cfg, task, recorder)
    except BaseException:
        recorder.flush()
        recorder.write_summary("failed")
        raise
    return recorder.close("finished")
