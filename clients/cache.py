"""Per-process cache of what a client builds from its settings (data, model,
sparsifier), so rounds never reload data or rebuild the model."""
from __future__ import annotations

import hashlib
import json
import logging
import weakref
from dataclasses import dataclass

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


def match_cpu_share() -> int:
    """Compute with as many torch threads as CPUs Ray gave this client
    (``runtime.client_cpus``, floored, at least 1); returns the count in use.

    Ray means the same when it sets ``OMP_NUM_THREADS`` for its workers, but
    only where the environment leaves it unset: with ``OMP_NUM_THREADS=2``
    exported, each of the two actors on a 2-core machine computed with 2
    threads (4 busy threads on 2 cores, and torch's OpenMP threads wait for
    each other at every parallel region). Outside Ray (a SuperNode, the
    driver) torch's own setting stays."""
    import torch

    from regtopk_fl.ray_cluster import ray_cpu_share

    share = ray_cpu_share()
    if share is not None and torch.get_num_threads() != share:
        torch.set_num_threads(share)
    return torch.get_num_threads()


def settings_and_build(context, settings=None):
    """(cfg, task, sparsifier, device), built once per process and config.

    Keyed by what the config is made of (the run config or the launcher's
    settings, and the node's path overrides), so that a message of a known
    config costs a hash of plain data, not OmegaConf's (about 3 ms a message,
    a sixth of a Flower client's round of linear regression)."""
    from regtopk_fl import determinism
    from regtopk_fl.device import resolve_device
    from regtopk_fl.runner import build

    node = getattr(context, "node_config", None) or {}
    source = dict(context.run_config) if context.run_config else settings
    key = hashlib.sha256(json.dumps([source, {k: node.get(k) for k in NODE_OVERRIDES}],
                                    sort_keys=True, default=str).encode()).hexdigest()
    if key not in _CACHE:
        cfg = settings_of(context, settings)
        apply_node_config(cfg, node)
        determinism.apply_cfg(cfg)  # before the task touches CUDA
        match_cpu_share()  # before the task's first parallel op
        task, sparsifier = build(cfg)
        _CACHE.clear()  # one experiment per process at a time
        _CACHE[key] = (cfg, task, sparsifier, resolve_device(cfg.device))
    return _CACHE[key]


@dataclass(frozen=True)
class MessageSettings:
    """The settings a client reads on every message, as plain values."""

    state_dir: str | None  # runtime.state_dir (None: context.state)
    state_inplace: bool  # runtime.state_inplace: the simulation's mapped files
    opt: tuple  # (lr, momentum, weight_decay) of the server optimizer
    # what a train message reads besides (None where a partial config, as
    # some tests build for the state functions alone, leaves them out)
    faults: dict  # the faults group, plain
    seed: int | None
    local_steps: int | None
    local_lr: float | None
    num_workers: int | None


_PLAIN: dict = {}  # id(cfg) -> MessageSettings, dropped with the cfg


def message_settings(cfg) -> MessageSettings:
    """``cfg``'s per-message settings, read once per config object: every
    OmegaConf lookup costs tens of microseconds, and a message made about
    twenty (about 0.25 ms of a linear-regression message's 1.8). The config must
    not change after its first message (the cached configs never do)."""
    got = _PLAIN.get(id(cfg))
    if got is None:
        def opt(key, kind):
            value = OmegaConf.select(cfg, key, default=None)
            return None if value is None else kind(value)

        got = MessageSettings(
            state_dir=OmegaConf.select(cfg, "runtime.state_dir", default=None),
            state_inplace=bool(OmegaConf.select(cfg, "runtime.state_inplace", default=False)),
            opt=(float(cfg.lr), float(cfg.momentum), float(cfg.weight_decay)),
            faults=OmegaConf.to_container(cfg.faults, resolve=True) if "faults" in cfg else {},
            seed=opt("seed", int), local_steps=opt("local_steps", int),
            local_lr=opt("local_lr", float), num_workers=opt("num_workers", int))
        weakref.finalize(cfg, _PLAIN.pop, id(cfg), None)  # before it is kept
        _PLAIN[id(cfg)] = got
    return got
