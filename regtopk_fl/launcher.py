"""The ``regtopk-fl`` command (also ``python -m regtopk_fl``): Hydra's CLI over
conf/, validation before any work, then one run (or a sweep with -m).

A run directory that holds another configuration is refused untouched, byte
for byte. Hydra would record the refused configuration in ``.hydra/`` before
the task starts, so conf/config.yaml turns that off (``hydra.output_subdir:
null``, and the log file is only created by a first log line) and
:func:`claim_run_dir` writes the same three files itself once the directory
is known to be this run's. A sweep's ``multirun.yaml`` (written by the
sweeper before any job) is put back by :class:`KeepSweepRecord` when a job is
refused.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .settings import CONF_DIR, ConfigError, config_groups, group_options, validate

GROUPS = config_groups()  # conf/'s folders: task, sparsifier, aggregate, ..., experiment
# keys that moved (one line saying where, instead of Hydra's "not in struct")
MOVED = {"server.aggregate": "moved to the config group aggregate: use aggregate=NAME",
         "server.trim_fraction": "moved to the config group aggregate: use "
                                 "aggregate=trimmed_mean aggregate.trim_fraction=F"}


def _fail(msg: str) -> None:
    print(f"regtopk-fl: error: {msg}", file=sys.stderr)
    sys.exit(2)


SWEEP_RECORD_ENV = "REGTOPK_FL_SWEEP_RECORD"  # "<multirun.yaml>\n<copy of it>"


class KeepSweepRecord(Callback):
    """Before a sweep starts, keep a copy of the sweep directory's existing
    ``multirun.yaml`` (the sweeper overwrites it before any job runs), so a
    refused job can put it back (:func:`_restore_sweep_record`). The copy's
    path travels in the environment, which joblib's worker processes inherit."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        record = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        if record.is_file():
            fd, copy = tempfile.mkstemp(prefix="regtopk-multirun-", suffix=".yaml")
            with os.fdopen(fd, "wb") as fh:
                fh.write(record.read_bytes())
            shutil.copystat(record, copy)
            os.environ[SWEEP_RECORD_ENV] = f"{record}\n{copy}"

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        _drop_sweep_record()


def _drop_sweep_record() -> None:
    entry = os.environ.pop(SWEEP_RECORD_ENV, None)
    if entry:
        Path(entry.split("\n")[1]).unlink(missing_ok=True)


def _restore_sweep_record() -> None:
    """Put the sweep's old multirun.yaml back (a job was refused); the first
    refused job does it, the sweeper never writes the file again."""
    entry = os.environ.get(SWEEP_RECORD_ENV)
    if entry:
        record, copy = entry.split("\n")
        if Path(copy).is_file():
            shutil.copy2(copy, record)
            Path(copy).unlink(missing_ok=True)


def claim_run_dir(cfg: DictConfig, run_dir: Path) -> str:
    """Refuse a directory that holds another configuration (ConfigError,
    nothing written), else record this run's config in ``.hydra/`` as Hydra
    does (config.yaml, hydra.yaml, overrides.yaml) and return the status
    ("new", "resume"; "finished" writes nothing)."""
    from omegaconf import OmegaConf

    from .checkpoint import config_fingerprint, run_dir_status

    status = run_dir_status(run_dir, config_fingerprint(cfg))
    if status != "finished":
        hydra_cfg = HydraConfig.instance().cfg
        out = run_dir / ".hydra"
        out.mkdir(parents=True, exist_ok=True)
        for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                           ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
            (out / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")
    return status


def check_group_choices(argv) -> None:
    """Unknown config choices fail in one line, before Hydra starts."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key.startswith("override "):
            key = key.split(" ", 1)[1]
        if key in MOVED:
            _fail(f"{key}={value!r}: {MOVED[key]}")
        if key not in GROUPS:
            continue
        options = group_options(key)
        for choice in value.split(","):
            if choice not in options and not (key == "experiment" and choice == "null"):
                _fail(f"{key}={choice!r}: unknown choice; available: {', '.join(options)}")


def check_group_keys(argv, group: str = "tracker") -> None:
    """``GROUP.KEY=VALUE`` for a KEY the chosen option of GROUP does not have
    fails in one line, before Hydra starts (Hydra's own message is several
    lines, exit 1). The choice is the command line's ``GROUP=`` (each of a
    sweep's) or conf/config.yaml's default; ``+GROUP.KEY`` adds a key and is
    left to validate()."""
    from omegaconf import OmegaConf

    chosen, given = None, []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        if key.startswith("override "):
            key = key.split(" ", 1)[1]
        if key == group:
            chosen = value.split(",")
        elif key.startswith(group + "."):
            given.append((key, value))
    if chosen is None:
        defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["defaults"]
        chosen = [d[group] for d in defaults if isinstance(d, dict) and group in d]
    for key, value in given:
        for choice in chosen:
            path = CONF_DIR / group / f"{choice}.yaml"
            keys = sorted(OmegaConf.load(path).keys()) if path.is_file() else []
            if keys and key.split(".")[1] not in keys:
                _fail(f"{key}={value!r}: {group}={choice} has no such key; its keys: "
                      f"{', '.join(k for k in keys if k != '_target_')}")


def _discard_run_dir(run_dir: Path, force: bool = False) -> None:
    """A run that never started leaves nothing behind that looks like a run
    (``force``: a directory this run created, whatever it holds)."""
    if run_dir.exists() and (force or not (run_dir / "metrics.csv").exists()):
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent
        try:  # an emptied sweep directory goes too
            if parent.name and not any(p for p in parent.iterdir() if p.name != "multirun.yaml"):
                shutil.rmtree(parent, ignore_errors=True)
        except FileNotFoundError:
            pass


def _written_by(run_dir: Path, cfg: DictConfig) -> bool:
    """Whether the run directory's summary.json is this configuration's."""
    import json

    from .checkpoint import config_fingerprint

    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("config_sha256") == config_fingerprint(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
    except ConfigError as exc:
        _discard_run_dir(run_dir)
        _fail(str(exc))
    if cfg.get("print_flwr_run"):  # print the Deployment Runtime's `flwr run`, run nothing
        from .deploy import DEFAULT_CONNECTION, flwr_run_command

        conn = cfg.print_flwr_run if isinstance(cfg.print_flwr_run, str) else DEFAULT_CONNECTION
        _discard_run_dir(run_dir)  # the ServerApp creates it (on the SuperLink's machine)
        try:
            print(flwr_run_command(cfg, conn, output_dir=run_dir))
        except (ConfigError, ValueError) as exc:
            _fail(str(exc))
        return
    from . import determinism

    determinism.apply_cfg(cfg)  # before anything touches CUDA
    from .runner import run_experiment

    try:
        status = claim_run_dir(cfg, run_dir)
    except ConfigError as exc:  # the run directory holds another run: leave it as it is
        _restore_sweep_record()
        _fail(str(exc))
    try:
        summary = run_experiment(cfg, run_dir)
    except ConfigError as exc:
        # a setting refused once the run knows more (a client's device, the GPU
        # share: #21): a directory this run created goes, as for any bad setting
        if status == "new" and _written_by(run_dir, cfg):
            _discard_run_dir(run_dir, force=True)
        _restore_sweep_record()
        _fail(str(exc))
    final = ", ".join(f"{k}={v:.4g}" for k, v in summary["final"].items())
    print(f"{summary['task']}/{summary['sparsifier']} S={summary['sparsity']:g}: {final} "
          f"({summary['wall_time_s']:.1f} s) -> {run_dir}")


def main() -> None:
    check_group_choices(sys.argv[1:])
    check_group_keys(sys.argv[1:], "tracker")
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    try:
        _main()
    except ValueError as exc:  # Hydra's own usage errors (e.g. -m with --cfg)
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


if __name__ == "__main__":
    main()
