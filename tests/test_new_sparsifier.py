"""A new sparsifier is two files (#32): a module with its class and a yaml.

Written here into a temporary module on sys.path (and PYTHONPATH, for the
Flower simulation's Ray workers) and into a copy of conf/ (the CONF_DIR of
the settings, the registry and the deploy helpers), with a key of its own
(``boost``): it is in the registry and the plots' method order, validates
with its own one-line messages, runs in both runtimes with the same
trajectory, and goes through ``flwr run``'s run config without a
regenerated pyproject.toml. No file of the project changes."""
import csv
import os
import shutil

import pytest
import torch
from flwr.common.config import fuse_dicts, parse_config_args
from omegaconf import OmegaConf

from regtopk_fl import deploy, paths, settings
from regtopk_fl.settings import ConfigError, from_run_config, validate

MODULE = '''
"""Top-k of |a| with the even positions' |a| boosted (a test sparsifier)."""
from regtopk_fl import checks
from regtopk_fl.compress.base import Sparsifier, check_positive, check_sparsity, num_selected
from regtopk_fl.compress.exact_topk import rows_topk


class BoostEven(Sparsifier):
    name = "boost_even"
    plot_order = 4.9
    needs_context = False  # select ignores ctx

    def __init__(self, sparsity, boost=2.0, **_):
        self.sparsity = check_sparsity(sparsity)
        self.boost = check_positive("boost", boost)

    @classmethod
    def check_settings(cls, cfg, runtime):
        super().check_settings(cfg, runtime)
        checks.num(cfg, "sparsifier.boost", 0, lo_open=True,
                   allowed="must be a finite number > 0")

    def select(self, a, ctx):
        score = a.abs()
        score[:, ::2] *= self.boost
        return rows_topk(score, num_selected(self.sparsity, a.shape[1]))
'''
YAML = """_target_: my_sparsifiers.BoostEven
name: boost_even
sparsity: 0.25           # S = k/J
mu: null                 # unused (kept so sweeps over mu can include it)
boost: 3.0               # |a| on even positions is multiplied by this
"""
J, N, ROUNDS = 20, 3, 4
K = 5  # round(0.25 * 20)


@pytest.fixture
def new_sparsifier(tmp_path, monkeypatch):
    """The two files, and the project pointed at the copy of conf/."""
    (tmp_path / "my_sparsifiers.py").write_text(MODULE)  # file 1
    conf = tmp_path / "conf"
    shutil.copytree(paths.CONF_DIR, conf)
    (conf / "sparsifier" / "boost_even.yaml").write_text(YAML)  # file 2
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))  # Ray's workers
    for module in (paths, settings, deploy):
        monkeypatch.setattr(module, "CONF_DIR", conf)
    return conf


def _compose(conf, overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "sparsifier=boost_even", "task=linreg", f"task.dim={J}", f"num_workers={N}",
            f"rounds={ROUNDS}", "lr=0.05", "threads=1", "checkpoint.every=0",
            "progress=false", *overrides])
    return cfg


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_registry_validation_and_run_config(new_sparsifier, tmp_path):
    from regtopk_fl.compress import SPARSIFIERS, method_order

    conf = new_sparsifier
    assert SPARSIFIERS["boost_even"].__module__ == "my_sparsifiers"
    order = method_order()
    assert order.index("gaussiank") < order.index("boost_even") < order.index("regtopk")
    cfg = _compose(conf, [])
    validate(cfg)
    with pytest.raises(ConfigError, match=r"^sparsifier.boost=0: must be a finite number > 0$"):
        validate(_compose(conf, ["sparsifier.boost=0"]))
    with pytest.raises(ConfigError, match=r"^sparsifier.sparsity=2: must be in \(0, 1\]$"):
        validate(_compose(conf, ["sparsifier.sparsity=2"]))

    # flwr run: the committed pyproject.toml does not declare sparsifier.boost
    declared = deploy.pyproject_app_config()
    assert "sparsifier.boost" not in declared
    from test_deploy import check_declared_run_config
    check_declared_run_config(declared)  # and is still up to date
    cfg = _compose(conf, ["sparsifier.boost=1.5"])
    cmd = deploy.flwr_run_command(cfg, "mylink", output_dir=tmp_path / "out")
    argv = __import__("shlex").split(cmd)
    fused = fuse_dicts(declared, parse_config_args([argv[argv.index("--run-config") + 1]]))
    got = from_run_config(fused)
    validate(got)
    assert got.sparsifier.boost == 1.5 and got.sparsifier.name == "boost_even"
    assert OmegaConf.to_container(got.sparsifier) == OmegaConf.to_container(
        cfg.sparsifier, resolve=True)


@pytest.mark.flower
@pytest.mark.slow
def test_it_runs_in_both_runtimes(new_sparsifier, tmp_path):
    from regtopk_fl.runner import run_experiment

    conf = new_sparsifier
    runs = {}
    for runtime in ("inprocess", "flower"):
        summary = run_experiment(_compose(conf, [f"runtime={runtime}"]), tmp_path / runtime)
        assert summary["status"] == "finished" and summary["sparsifier"] == "boost_even"
        runs[runtime] = tmp_path / runtime
    ip, fl = (_rows(runs[r]) for r in ("inprocess", "flower"))
    assert [int(r["sent"]) for r in ip[1:]] == [N * K] * ROUNDS  # k entries per worker
    assert [r["sent"] for r in fl] == [r["sent"] for r in ip]
    assert [r["uplink_bytes"] for r in fl] == [r["uplink_bytes"] for r in ip]
    a = torch.load(runs["inprocess"] / "model.pt", weights_only=False)["params"]
    b = torch.load(runs["flower"] / "model.pt", weights_only=False)["params"]
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-6  # as test_runtime_equivalence
    assert float(ip[-1]["gap"]) < float(ip[0]["gap"])  # it trained
