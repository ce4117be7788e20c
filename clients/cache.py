"""Per-process cache of what a client builds from its settings (data, model,
sparsifier), so rounds never reload data or rebuild the model."""
from __future__ import annotations

import hashlib
import json

from omegaconf import OmegaConf

_CACHE: dict = {}


def settings_of(context, settings=None):
    from regtopk_fl.settings import from_run_config

    if context.run_config:
        return from_run_config(dict(context.run_config))
    if settings is None:
        raise RuntimeError("no settings: the run config is empty and none were given")
    return OmegaConf.create(settings)


def settings_and_build(context, settings=None):
    """(cfg, task, sparsifier, device), built once per process and config."""
    from regtopk_fl.runner import build, resolve_device

    cfg = settings_of(context, settings)
    key = hashlib.sha256(json.dumps(OmegaConf.to_container(cfg, resolve=True),
                                    sort_keys=True, default=str).encode()).hexdigest()
    if key not in _CACHE:
        task, sparsifier = build(cfg)
        _CACHE.clear()  # one experiment per process at a time
        _CACHE[key] = (cfg, task, sparsifier, resolve_device(cfg))
    return _CACHE[key]
