import os

os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from regtopk_fl.settings import CONF_DIR  # noqa: E402


def compose_cfg(overrides=()):
    """The launcher's config for these overrides, without running Hydra's app."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.progress = False
    return cfg


@pytest.fixture
def make_cfg():
    return compose_cfg


@pytest.fixture
def one_thread():
    """Small tensors only: one torch thread avoids OpenMP wake-ups on a busy
    2-core machine (the thread-count test sets its own counts)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
