"""The ``deterministic`` switch (regtopk_fl/determinism.py): what it sets, in
the server process and in a Flower client, and that it changes no result on
the CPU (bit for bit), so turning it on for a GPU comparison leaves the
recorded CPU numbers alone."""
import os
from types import SimpleNamespace

import pytest
import torch

from regtopk_fl import determinism


@pytest.fixture(autouse=True)
def _restore():
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    determinism.apply(False)
    if env is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = env


def test_apply_sets_and_resets():
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    determinism.apply(True)
    st = determinism.state()
    assert st == {"deterministic_algorithms": True, "cudnn_deterministic": True,
                  "cudnn_benchmark": False, "cudnn_tf32": False, "matmul_tf32": False,
                  "cublas_workspace_config": ":4096:8"}
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # adaptive_avg_pool2d (docstring)
    determinism.apply(False)
    st = determinism.state()
    assert not st["deterministic_algorithms"] and not st["cudnn_deterministic"]
    assert not st["cudnn_tf32"] and not st["matmul_tf32"]  # fp32, unlike torch's cuDNN default


def test_tf32_on_request_and_off_again(make_cfg):
    determinism.apply_cfg(make_cfg(["tf32=true"]))
    st = determinism.state()
    assert st["cudnn_tf32"] and st["matmul_tf32"] and not st["deterministic_algorithms"]
    determinism.apply_cfg(make_cfg([]))
    st = determinism.state()
    assert not st["cudnn_tf32"] and not st["matmul_tf32"]


def test_a_client_applies_it(make_cfg):
    """A ClientApp applies the switch before it builds its task (clients/cache.py)."""
    from omegaconf import OmegaConf

    from clients.cache import _CACHE, settings_and_build

    cfg = make_cfg(["task=linreg", "num_workers=2", "deterministic=true", "runtime=flower",
                    "tf32=true"])
    ctx = SimpleNamespace(run_config={}, node_config={"partition-id": 0})
    determinism.apply(False)
    _CACHE.clear()
    settings_and_build(ctx, OmegaConf.to_container(cfg, resolve=True))
    assert determinism.state()["deterministic_algorithms"]
    assert determinism.state()["cudnn_tf32"]
    _CACHE.clear()


def test_same_result_on_the_cpu(make_cfg, tmp_path, one_thread):
    """tiny_image (BatchNorm, convolutions), RegTop-k, 6 rounds in-process:
    the final model and metrics with the switch on equal those with it off."""
    import pandas as pd

    from regtopk_fl.runner import run_experiment

    out = {}
    for det in ("false", "true"):
        cfg = make_cfg(["task=tiny_image", "num_workers=3", "rounds=6", "eval_every=3",
                        "sparsifier.sparsity=0.1", "checkpoint.every=0", f"deterministic={det}"])
        run_experiment(cfg, tmp_path / det)
        assert determinism.state()["deterministic_algorithms"] == (det == "true")
        out[det] = (torch.load(tmp_path / det / "model.pt", weights_only=True),
                    pd.read_csv(tmp_path / det / "metrics.csv").drop(columns=["wall_s"]))
    assert torch.equal(out["false"][0]["params"], out["true"][0]["params"])
    assert torch.equal(out["false"][0]["buffers"], out["true"][0]["buffers"])
    pd.testing.assert_frame_equal(out["false"][1], out["true"][1])


def test_new_switches_at_their_defaults_keep_old_fingerprints(make_cfg):
    """A run directory or checkpoint written before deterministic, task.batched
    and runtime.client_gpus=auto existed still resumes (same fingerprint)."""
    from omegaconf import OmegaConf, open_dict

    from regtopk_fl.checkpoint import config_fingerprint

    cfg = make_cfg(["task=tiny_image", "runtime=flower"])
    old = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(old):
        del old["deterministic"]
        del old["tf32"]
        del old.task["batched"]
        old.runtime.client_gpus = 0.0
    assert config_fingerprint(cfg) == config_fingerprint(old)
    on = make_cfg(["task=tiny_image", "runtime=flower", "deterministic=true"])
    assert config_fingerprint(on) != config_fingerprint(cfg)  # a different run
    tf32 = make_cfg(["task=tiny_image", "runtime=flower", "tf32=true"])
    assert config_fingerprint(tf32) != config_fingerprint(cfg)
