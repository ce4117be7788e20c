"""Per-process cache of what a client builds from its settings (data, model,
sparsifier), so rounds never reload data or rebuild the model."""
from __future__ import annotations

import hashlib
import json
import logging

from omegaconf import OmegaConf

_CACHE: dict = {}
log = logging.getLogger(__name__)


def settings_of(context, settings=None):
    from regtopk_fl.settings import from_run_config

    if context.run_config:
        return from_run_config(dict(context.run_config))
    if settings is None:
        raise RuntimeError("no settings: the run config is empty and none were given")
    return OmegaConf.create(settings)


# SuperNode --node-config keys that override a task setting on that node only
NODE_OVERRIDES = {"data-path": "data_path", "cache-dir": "cache_dir"}


def apply_node_config(cfg, node_config) -> None:
    """A SuperNode's own paths (``--node-config 'data-path="/data/cifar10-jpeg.tar.gz"'``)
    replace the run config's ``task.data_path`` / ``task.cache_dir`` on that node.
    Ignored (with a log line) for tasks without that setting."""
    for node_key, task_key in NODE_OVERRIDES.items():
        value = node_config.get(node_key)
        if value in (None, ""):
            continue
        if task_key in cfg.task:
            cfg.task[task_key] = str(value)
        else:
            log.info("node config %s=%r ignored: task %s has no %s", node_key, value,
                     cfg.task.name, task_key)


def settings_and_build(context, settings=None):
    """(cfg, task, sparsifier, device), built once per process and config."""
    from regtopk_fl import determinism
    from regtopk_fl.device import resolve_device
    from regtopk_fl.runner import build

    cfg = settings_of(context, settings)
    apply_node_config(cfg, getattr(context, "node_config", None) or {})
    key = hashlib.sha256(json.dumps(OmegaConf.to_container(cfg, resolve=True),
                                    sort_keys=True, default=str).encode()).hexdigest()
    if key not in _CACHE:
        determinism.apply(determinism.of(cfg))  # before the task touches CUDA
        task, sparsifier = build(cfg)
        _CACHE.clear()  # one experiment per process at a time
        _CACHE[key] = (cfg, task, sparsifier, resolve_device(cfg.device))
    return _CACHE[key]
