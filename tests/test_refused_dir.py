"""A run directory that holds another configuration is refused and left
byte for byte as it was, .hydra/ and multirun.yaml included: under the
launcher (single run and sweep) and under `flwr run` (the ServerApp path)."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regtopk_fl.settings import ConfigError, to_run_config

ARGS = ["task=linreg", "num_workers=3", "rounds=3", "threads=1", "progress=false"]


def tree_hash(root: Path) -> dict:
    """{relative path: sha256} of every file under root, plus the folder list."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _cli(tmp_path, *args):
    (tmp_path / "tmp").mkdir(exist_ok=True)  # the launcher's temp files, where we can see them
    env = dict(os.environ, HYDRA_FULL_ERROR="0", TMPDIR=str(tmp_path / "tmp"))
    return subprocess.run([sys.executable, "-m", "regtopk_fl", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_refused_run_dir_is_untouched(tmp_path):
    run_dir = tmp_path / "run"
    assert _cli(tmp_path, *ARGS, f"hydra.run.dir={run_dir}").returncode == 0
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "rounds=3" in overrides and (run_dir / ".hydra" / "config.yaml").exists()
    before = tree_hash(run_dir)
    proc = _cli(tmp_path, *ARGS[:2], "rounds=4", *ARGS[3:], f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr
    assert "holds a run of another configuration" in proc.stderr
    assert tree_hash(run_dir) == before


def test_refused_sweep_is_untouched(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *ARGS, "sparsifier=topk,regtopk", f"hydra.sweep.dir={sweep}"]
    assert _cli(tmp_path, *args).returncode == 0
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    before = tree_hash(sweep)
    proc = _cli(tmp_path, *[a.replace("rounds=3", "rounds=4") for a in args])
    assert proc.returncode == 2, proc.stderr
    assert tree_hash(sweep) == before
    assert list((tmp_path / "tmp").glob("regtopk-multirun-*")) == []  # its copy is cleaned up


def test_refused_flwr_run_output_dir_is_untouched(make_cfg, tmp_path):
    """`flwr run` with the output_dir of another configuration's run: the
    ServerApp refuses before it touches the directory (or the grid)."""
    from flwr.app import Context, RecordDict

    from regtopk_fl.runner import run_experiment
    from strategies.server_app import flwr_main

    out = tmp_path / "out"
    run_experiment(make_cfg(ARGS), out)
    before = tree_hash(out)
    cfg = make_cfg([*ARGS[:2], "rounds=4", *ARGS[3:], "runtime=flower"])
    run_config = {**to_run_config(cfg), "output_dir": str(out)}
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    with pytest.raises(ConfigError, match="another configuration"):
        flwr_main(None, context)
    assert tree_hash(out) == before
