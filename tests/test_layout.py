"""The core package stands alone: importing every module of regtopk_fl pulls
in neither the Flower apps (strategies/, clients/) nor Flower itself; the
runtime is chosen by the config's ``_target_``."""
import subprocess
import sys

from regtopk_fl.settings import CONF_DIR

PROBE = """
import importlib, pkgutil, sys
import regtopk_fl
for m in pkgutil.walk_packages(regtopk_fl.__path__, "regtopk_fl."):
    if m.name.endswith("__main__"):  # that one runs the launcher
        continue
    importlib.import_module(m.name)
bad = sorted(n for n in sys.modules if n.split(".")[0] in ("strategies", "clients", "flwr"))
print(",".join(bad))
"""


def test_core_package_imports_no_flower_app():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", out.stdout


def test_runtimes_are_named_by_target():
    from hydra.utils import get_method
    from omegaconf import OmegaConf

    for name in ("inprocess", "flower"):
        target = OmegaConf.load(CONF_DIR / "runtime" / f"{name}.yaml")["_target_"]
        assert callable(get_method(target)), target
