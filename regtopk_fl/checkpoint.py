"""Checkpoints: when a run writes one, what is in it, and how a re-run resumes.

One file, ``checkpoint.pt`` in the run directory, written atomically (temp
file, fsync, rename), so a SIGKILL leaves the previous checkpoint or the new
one. It holds the round it was taken after, the runtime's state (server model
and optimizer, pending feedback, every worker's error-feedback memory, and
the downlink's state: the last round each model entry changed, the recent
models' digests and the replicas' known rounds, from which a resumed server
patches stale replicas), the
metrics rows so far, the wall time spent, the RNG states and a fingerprint of
the configuration. Every source of randomness in a round is seeded by
(seed, worker, round), so a run resumed from round t repeats rounds t+1...
bit for bit.

``checkpoint.every``: an integer N (every N rounds; 0 = off) or ``auto``
(whenever ``checkpoint.seconds`` of work have passed since the last one).
The last round never writes one; a finished run deletes it.

Re-running the same command with the same run directory:
* the run finished with this configuration -> nothing to do;
* a checkpoint of this configuration is there -> resume from it;
* the directory holds a run of another configuration -> refuse (exit 2),
  touching nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .results import atomic_write
from .settings import ConfigError

log = logging.getLogger(__name__)

FILE = "checkpoint.pt"
# test hook: the process SIGKILLs itself after this round (tests/test_faults_resume.py)
CRASH_ENV = "REGTOPK_FL_CRASH_AFTER_ROUND"
# keys that do not change what a run computes
NOT_IDENTITY = ("hydra", "checkpoint", "progress", "print_flwr_run", "output_dir", "tracker")
_TASK_DEFAULTS = {("pretrained_weights", None), ("resize", None), ("normalize", "auto"),
                  ("loss", "ce"), ("init_from", None), ("eval_mode", "eval"),
                  ("subset_offset", 0),
                  ("data_cache", None)}  # #34: the linear regression's, off by default
_EVERYONE = {"clients_per_round": None, "fraction": None, "weighted": False,
             "stale_feedback": "keep"}


def config_fingerprint(cfg) -> str:
    keep = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in NOT_IDENTITY}
    # where the Ray cluster is, how many CPUs a local one schedules on, where
    # simulated clients keep their state and how much of a GPU each gets do
    # not change what a run computes, and the
    # default participation (everyone)
    # is what runs before these keys computed, so their checkpoints still resume
    if isinstance(keep.get("runtime"), dict):
        keep["runtime"] = {k: (0.0 if k == "client_gpus" else v)  # its old default, any share
                           for k, v in keep["runtime"].items()
                           if k not in ("ray_address", "num_cpus", "state_dir", "prompt_delivery")}
    # #30's switches at their defaults: what ran before them
    if isinstance(keep.get("server"), dict) and keep["server"].get("weighting") == "data_share":
        keep["server"] = {k: v for k, v in keep["server"].items() if k != "weighting"}
    if keep.get("participation") == _EVERYONE:
        del keep["participation"]
    # the Fig. 3 switches (#18) at their defaults compute what ran before them
    if keep.get("upload") == "model_change":
        del keep["upload"]
    if isinstance(keep.get("task"), dict):
        keep["task"] = {k: v for k, v in keep["task"].items()
                        if (k, v) not in _TASK_DEFAULTS}
        # download=auto (#31's default) reads data_path where it exists, as false
        # did (a run whose data_path is missing fetches torchvision's copy instead)
        if keep["task"].get("download") == "auto":
            keep["task"] = {**keep["task"], "download": False}
    # #21's switches at their defaults compute what ran before they existed
    if keep.get("deterministic") is False:
        del keep["deterministic"]
    # tf32=false: on the CPU what always ran; on CUDA true fp32 where torch's
    # default had been TF32 convolutions (a GPU run from before resumes in fp32)
    if keep.get("tf32") is False:
        del keep["tf32"]
    if isinstance(keep.get("task"), dict) and keep["task"].get("batched") == "auto":
        keep["task"] = {k: v for k, v in keep["task"].items() if k != "batched"}
    _as_before(keep)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(keep)).encode()).hexdigest()


def _as_before(keep: dict) -> None:
    """The settings in the form they had before issues #17 and #20, where that
    form could say them, so a checkpoint written then still resumes: the rule
    as ``server.aggregate`` and ``server.trim_fraction`` (not the ``aggregate``
    group); no ``faults.hostile.scale`` or ``sparsifier.budget_factor`` at
    their defaults (the attacks they scale, and Gaussian-k's cap, did not
    exist); the Flower runtime's entry point by its old module path."""
    runtime = keep.get("runtime")
    if isinstance(runtime, dict) and runtime.get("_target_") == "simulation.run_simulation":
        runtime["_target_"] = "strategies.server_app.run_simulation"
    agg, server = keep.get("aggregate"), keep.get("server")
    if (isinstance(agg, dict) and isinstance(server, dict)
            and agg.get("name") in ("mean", "trimmed_mean", "median")):
        del keep["aggregate"]
        old = {}
        for key, value in server.items():
            if key == "node_keys":  # the old order: ..., max_weight_share, aggregate, trim_fraction, node_keys
                old["aggregate"], old["trim_fraction"] = agg["name"], agg.get("trim_fraction", 0.1)
            old[key] = value
        keep["server"] = old
    faults = keep.get("faults")
    if isinstance(faults, dict) and "missing" in faults and faults["missing"] is None:
        del faults["missing"]  # #35's twin schedule, unset: what ran before it
    hostile = (keep.get("faults") or {}).get("hostile")
    if isinstance(hostile, dict) and hostile.get("scale") == 15.0:
        del hostile["scale"]
    sp = keep.get("sparsifier")
    if isinstance(sp, dict) and sp.get("budget_factor") == 128:
        del sp["budget_factor"]


def run_dir_status(run_dir, fingerprint: str) -> str:
    """"new", "finished" or "resume" (a checkpoint or an unfinished run of this
    configuration); raises ConfigError when the directory holds another run."""
    run_dir = Path(run_dir)
    summary, ckpt = run_dir / "summary.json", run_dir / FILE
    theirs = None
    if summary.exists():
        try:
            s = json.loads(summary.read_text())
        except (OSError, ValueError):
            s = {}
        theirs = s.get("config_sha256")
        if theirs == fingerprint and s.get("status") == "finished":
            return "finished"
    elif ckpt.exists():
        theirs = torch.load(ckpt, weights_only=False, map_location="cpu")["fingerprint"]
    elif not (run_dir / "metrics.csv").exists():
        return "new"
    if theirs != fingerprint:
        raise ConfigError(f"hydra.run.dir={run_dir}: holds a run of another configuration; "
                          "choose a new directory (nothing was changed)")
    return "resume"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Decides when to checkpoint, writes and reads ``checkpoint.pt``."""

    def __init__(self, cfg, run_dir, fingerprint: str | None = None):
        self.path = Path(run_dir) / FILE
        self.rounds = int(cfg.rounds)
        every = OmegaConf.select(cfg, "checkpoint.every", default=0)
        self.every = every if every == "auto" else int(every or 0)
        self.seconds = float(OmegaConf.select(cfg, "checkpoint.seconds", default=300.0))
        self.fingerprint = fingerprint or config_fingerprint(cfg)
        self.clock = time.monotonic
        self._last = self.clock()

    def due(self, t: int) -> bool:
        if t >= self.rounds:
            return False
        if self.every == "auto":
            return self.clock() - self._last >= self.seconds
        return self.every > 0 and t % self.every == 0

    def save(self, t: int, state: dict, recorder) -> None:
        recorder.flush()
        blob = {"fingerprint": self.fingerprint, "round": int(t), "state": state,
                "rows": recorder.rows, "elapsed": recorder.elapsed(), "rng": rng_state()}
        atomic_write(self.path, lambda fh: torch.save(blob, fh), "wb")
        recorder.write_summary("running")  # rounds_done so far
        self._last = self.clock()
        log.info("checkpoint after round %d -> %s", t, self.path)

    def load(self, recorder):
        """(first round to run, runtime state or None). Restores the metrics
        rows, the wall-time offset and the RNG states into place."""
        if not self.path.exists():
            return 1, None
        blob = torch.load(self.path, weights_only=False, map_location="cpu")
        if blob["fingerprint"] != self.fingerprint:
            raise ConfigError(f"hydra.run.dir={self.path.parent}: its {FILE} belongs to "
                              "another configuration; choose a new directory")
        recorder.restore(blob["rows"], blob["elapsed"])  # the sinks get them again
        set_rng_state(blob["rng"])
        log.info("resuming %s after round %d", self.path.parent, blob["round"])
        return blob["round"] + 1, blob["state"]

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def crash_point(t: int) -> None:
    """SIGKILL this process after round ``t`` when the test hook asks for it."""
    if os.environ.get(CRASH_ENV) == str(t):
        os.kill(os.getpid(), signal.SIGKILL)
