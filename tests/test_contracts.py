"""The written contracts of the config groups' classes (#32): a sparsifier
(compress/base.py) and a task (tasks/base.py) check their own keys, and
settings.validate knows neither by name."""
import ast
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from regtopk_fl import settings
from regtopk_fl.paths import CONF_DIR
from regtopk_fl.settings import ConfigError, group_options, validate


def _string_constants(path) -> list:
    """The string literals of a module's code (docstrings and comments aside)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_settings_names_no_sparsifier_and_no_task():
    """No string in settings.py's code names an option of the sparsifier or
    task group (as a word: ``"dense"``, ``task == "toy"``, ``"the toy task"``)."""
    names = set(group_options("sparsifier")) | set(group_options("task"))
    assert {"dense", "topk", "linreg", "cifar10"} <= names  # the check can fail
    source = Path(settings.__file__)
    found = sorted({(name, text) for text in _string_constants(source) for name in names
                    if re.search(rf"(?<![\w.-]){name}(?![\w-])", text)})
    assert found == []


def test_every_task_yaml_names_a_task_class():
    from hydra.utils import get_class

    from regtopk_fl.tasks import Task

    for path in sorted((CONF_DIR / "task").glob("*.yaml")):
        node = OmegaConf.load(path)
        cls = get_class(node["_target_"])
        assert issubclass(cls, Task) and cls.name == node["name"] == path.stem, path
        assert set(cls.runtimes) <= {"inprocess", "flower"} and cls.runtimes
        assert set(cls.devices) <= {"cpu", "cuda"} and cls.devices


def test_a_task_refuses_a_runtime_or_device_it_does_not_support(make_cfg, monkeypatch):
    from regtopk_fl.tasks.linreg import LinRegTask

    cfg = make_cfg(["task=linreg", "runtime=flower", "device=cpu"])
    validate(cfg)
    monkeypatch.setattr(LinRegTask, "runtimes", ("inprocess",))
    with pytest.raises(ConfigError, match=r"^task='linreg': runs on runtime=inprocess$"):
        validate(cfg)
    monkeypatch.setattr(LinRegTask, "runtimes", ("inprocess", "flower"))
    monkeypatch.setattr(LinRegTask, "devices", ("cuda",))
    with pytest.raises(ConfigError, match=r"^device='cpu': task=linreg runs on cuda$"):
        validate(cfg)


def test_a_target_that_is_no_such_class_is_named(make_cfg):
    cfg = make_cfg(["task=linreg"])
    cfg.sparsifier._target_ = "regtopk_fl.tasks.linreg.LinRegTask"
    with pytest.raises(ConfigError, match=r"^sparsifier._target_='regtopk_fl.tasks.linreg."
                       r"LinRegTask': must name a regtopk_fl.compress.base.Sparsifier"):
        validate(cfg)
    cfg = make_cfg(["task=linreg"])
    cfg.task._target_ = "no.such.Module"
    with pytest.raises(ConfigError, match=r"^task._target_='no.such.Module': must name a "):
        validate(cfg)


@pytest.mark.parametrize("name", group_options("sparsifier"))
def test_each_sparsifier_checks_its_own_keys_only(make_cfg, name):
    """Its own keys with the same one-line messages; the default config of
    each valid (global_topk only in-process, by its own runtimes)."""
    from regtopk_fl.compress import SPARSIFIERS

    cls = SPARSIFIERS[name]
    validate(make_cfg([f"sparsifier={name}", "task=linreg"]))
    for runtime in ("inprocess", "flower"):
        cfg = make_cfg([f"sparsifier={name}", "task=linreg", f"runtime={runtime}"])
        if runtime in cls.runtimes:
            validate(cfg)
        else:
            with pytest.raises(ConfigError, match=rf"^sparsifier='{name}': .*: use runtime="):
                validate(cfg)
    with pytest.raises(ConfigError, match=r"^sparsifier.sparsity=0: must be in \(0, 1\]$"):
        validate(make_cfg([f"sparsifier={name}", "task=linreg", "sparsifier.sparsity=0"]))
