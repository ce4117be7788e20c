import importlib.util
import os

os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from regtopk_fl.paths import PROJECT_ROOT, resolve_path  # noqa: E402
from regtopk_fl.settings import CONF_DIR  # noqa: E402
from regtopk_fl.tasks.data import DEFAULT_DATA_PATH  # noqa: E402

# the offline CIFAR-10 archive (../shared/data); tests that read it skip without it
ARCHIVE = resolve_path(DEFAULT_DATA_PATH)
needs_archive = pytest.mark.skipif(not ARCHIVE.is_file(),
                                   reason=f"offline CIFAR-10 archive missing: {ARCHIVE}")


def compose_cfg(overrides=()):
    """The launcher's config for these overrides, without running Hydra's app."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.progress = False
    return cfg


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def make_cfg():
    return compose_cfg


@pytest.fixture
def one_thread():
    """Small tensors only: one torch thread avoids OpenMP wake-ups on a busy
    2-core machine (the thread-count test sets its own counts)."""
    from regtopk_fl.runner import torch_threads  # set, then put back

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a whole module (``pytestmark``): tiny convolutions on
    2 shared cores run ~30x faster on one intra-op thread than on two."""
    from regtopk_fl.runner import torch_threads  # set, then put back

    with torch_threads(1):
        yield
