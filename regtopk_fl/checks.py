"""The settings checks every part shares: one-line :class:`ConfigError`
messages ``key=value: what is allowed``.

``settings.validate`` checks the global keys with these; a config group's
class (a sparsifier, ``compress/base.py``; a task, ``tasks/base.py``) checks
its own keys with the same functions, so every message has one form
wherever it is raised. Imports nothing of the package (the core's modules
all may use it without an import cycle).
"""
from __future__ import annotations

import math

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A user setting is invalid; str(e) is the one-line message."""


def get(cfg, key, default=None):
    """``cfg``'s value at a dotted ``key`` (``default`` where it has none)."""
    return OmegaConf.select(cfg, key, default=default)


def fail(key, value, allowed):
    raise ConfigError(f"{key}={value!r}: {allowed}")


def num(cfg, key, lo=None, hi=None, lo_open=False, hi_open=False, integer=False,
        required=True, allowed=None):
    """The number at ``key``, within [lo, hi] (``lo_open``/``hi_open``:
    excluded); None when absent and not ``required``."""
    v = get(cfg, key)
    if v is None:
        if required:
            fail(key, v, allowed or "is required")
        return None
    ok_type = isinstance(v, int) and not isinstance(v, bool) if integer else (
        isinstance(v, (int, float)) and not isinstance(v, bool))
    if not ok_type or (not integer and not math.isfinite(float(v))):
        fail(key, v, allowed or f"must be {'an integer' if integer else 'a finite number'}")
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (
        hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        fail(key, v, allowed)
    return v


def choice(cfg, key, options):
    v = get(cfg, key)
    if v not in options:
        fail(key, v, f"must be one of {', '.join(map(str, options))}")
    return v


def boolean(cfg, key, default=False):
    v = get(cfg, key)
    if v is None:
        return default
    if not isinstance(v, bool):
        fail(key, v, "must be true or false")
    return v
