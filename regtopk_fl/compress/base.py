"""Shared pieces of every sparsifier: the contract (:class:`Sparsifier`),
the selection result, k from S, validation, and the registry of the
``sparsifier`` config group (:func:`registry`).

A sparsifier works on a batch of accumulated gradients ``a`` of shape ``[N, J]``
(one row per worker; a single worker is ``N = 1``) and returns a
:class:`Selection`: flat indices into ``a.view(-1)``, grouped by row in row
order and ascending within a row, plus the count per row. It never changes
``a`` and never touches the error-feedback memory; the memory owns all state.

**Adding one is two files**: a module with a :class:`Sparsifier` subclass and
``conf/sparsifier/<name>.yaml`` whose ``_target_`` names it (its dotted path,
e.g. ``regtopk_fl.compress.dgc.DGC``) and whose ``name`` is the file's stem.
The registry, the validation (``settings.validate`` calls the class's
:meth:`Sparsifier.check_settings`), the plots' method order and the tests'
lists of methods all derive from those yamls; ``tests/test_sparsifiers.py``
ties every yaml to a class and every class to a yaml.
"""
from __future__ import annotations

import abc
import math
from pathlib import Path

import torch

from .. import checks


class SparsifierError(ValueError):
    """Invalid sparsifier parameter or input; the message names key and value."""


class Selection:
    """Entries chosen for upload: ``flat_idx`` indexes ``a.view(-1)`` (row-major),
    grouped by row, ascending within a row; ``counts`` [N] entries per row.

    A *dense* selection (``Selection(None, counts)``, every entry of every row)
    carries no index tensor: the worker step checks ``dense`` and never builds
    the N*J indices. ``flat_idx`` still materializes them on request, for
    callers that want them (tests, analysis)."""

    __slots__ = ("_flat", "counts")

    def __init__(self, flat_idx, counts):
        self._flat = flat_idx  # int64 [M], or None: every entry (dense)
        self.counts = counts  # int64 [N]; counts.sum() == M

    @property
    def dense(self) -> bool:
        return self._flat is None

    @property
    def flat_idx(self) -> torch.Tensor:
        if self._flat is None:
            self._flat = torch.arange(int(self.counts.sum()), device=self.counts.device)
        return self._flat

    def row_slices(self):
        """(start, stop) of each row's entries in ``flat_idx``."""
        ends = torch.cumsum(self.counts, 0).tolist()
        starts = [0] + ends[:-1]
        return list(zip(starts, ends))


def num_selected(sparsity: float, dim: int) -> int:
    """k = max(1, round(S * J)) with round-half-up; validates S and J."""
    check_sparsity(sparsity)
    if int(dim) < 1:
        raise SparsifierError(f"dim={dim}: the gradient must have at least one entry")
    return max(1, min(int(dim), int(math.floor(sparsity * dim + 0.5))))


def exact_budget(self, dim: int) -> int:
    """The upload budget of a method that sends exactly k entries per row:
    k = num_selected(S, J) (:meth:`Sparsifier.budget`'s default); the server
    refuses an upload of more entries (regtopk_fl/trust.py)."""
    return num_selected(self.sparsity, dim)


class Sparsifier(abc.ABC):
    """What the engine, the trust checks, the wire and the analysis know of a
    sparsifier; everything else is private to its module.

    Class attributes:

    * ``name``: the option's name, the stem of its ``conf/sparsifier/*.yaml``
      and the ``sparsifier`` column of every result; ``label``: how plots and
      tables name it (default: ``name``); ``plot_order``: its place among the
      methods in a plot (ascending; ties by name).
    * ``sends_indices``: an upload carries its indices (False: the value
      vector alone, which a dense selection needs no indices for).
    * ``needs_context``: :meth:`select` reads ``ctx``, the round's
      :class:`regtopk_fl.memory.SelectContext` (last round's mask and its
      feedback, the workers' weights, ids and the round: Delta's ingredients,
      and the seed of a random choice); False: the worker step passes None
      and builds none.
    * ``needs_all_workers``: :meth:`select` needs every worker's row at once
      (``ctx.weights`` of all of them): only the in-process engine can run it.
    * ``runtimes`` (and ``runtime_note``, why not elsewhere): the runtimes
      where it runs; :meth:`check_settings` refuses the others.
    * ``exact_count``: every row sends exactly :meth:`budget` entries (k);
      otherwise the count varies, at most the budget.
    * ``has_budget``: :meth:`budget` is a number (False: a dense method,
      whose every upload is all of J and which the server does not bound).
    * ``uses_mu``: regularised by ``sparsifier.mu`` (RegTop-k and its
      variants); the run's identity (summary.json) then records mu and
      distortion.

    Its settings are the keys of its yaml: the constructor takes them
    (``sparsity`` first; keys of other options are ignored through ``**_``)
    and raises :class:`SparsifierError` on a bad one;
    :meth:`check_settings` checks them in a config before any work, with
    ``settings.validate``'s one-line :class:`regtopk_fl.checks.ConfigError`.
    """

    name: str = ""
    label: str | None = None
    plot_order: float = math.inf
    sends_indices = True
    needs_context = True
    needs_all_workers = False
    runtimes = ("inprocess", "flower")
    runtime_note = ""
    exact_count = True
    has_budget = True
    uses_mu = False
    sparsity: float

    @abc.abstractmethod
    def select(self, a: torch.Tensor, ctx) -> "Selection":
        """The entries of each row of ``a`` ([N, J], never changed) to send."""

    def budget(self, dim: int) -> int | None:
        """The most entries one upload may hold at J = ``dim``: the server
        refuses more (regtopk_fl/trust.py) and ``faults.hostile``'s
        ``over_budget`` sends one more. A bound :meth:`select` never exceeds
        (a count that can exceed k needs a cap it enforces); None: no budget
        (``has_budget`` False). Default: k, exactly what is sent."""
        return exact_budget(self, dim)

    def budget_note(self, dim: int) -> str:
        """Where the budget comes from, for the server's refusal message."""
        return f"k of {self.name} at sparsity {self.sparsity:g}, J={dim}"

    @classmethod
    def check_settings(cls, cfg, runtime: str) -> None:
        """Check the ``sparsifier.*`` keys of ``cfg`` (and that it runs on
        ``runtime``); raise :class:`regtopk_fl.checks.ConfigError`. A subclass
        with keys of its own extends this (``super().check_settings`` first)."""
        checks.num(cfg, "sparsifier.sparsity", 0, 1, lo_open=True, allowed="must be in (0, 1]")
        if runtime not in cls.runtimes:
            checks.fail("sparsifier", cls.name, f"{cls.runtime_note or 'does not run there'}: "
                        f"use runtime={cls.runtimes[0]}")

    @classmethod
    def display_name(cls) -> str:
        return cls.label or cls.name


# -- the registry: conf/sparsifier/*.yaml -> classes ------------------------------
_REGISTRY: dict = {}


def registry(conf_dir=None) -> dict:
    """``{name: class}`` of the ``sparsifier`` config group: one entry per
    ``<conf>/sparsifier/*.yaml`` (its stem), the class its ``_target_`` names,
    sorted by the classes' ``plot_order``, then name. Read from the files
    (``regtopk_fl.paths.CONF_DIR`` unless given) and cached until one of
    them changes; nobody keeps this list by hand."""
    from .. import paths

    folder = Path(conf_dir if conf_dir is not None else paths.CONF_DIR) / "sparsifier"
    files = sorted(folder.glob("*.yaml"))
    key = (str(folder), tuple((f.name, f.stat().st_mtime_ns) for f in files))
    if key not in _REGISTRY:
        from hydra.utils import get_class
        from omegaconf import OmegaConf

        found = {}
        for f in files:
            target = OmegaConf.load(f).get("_target_")
            if target is None:
                raise SparsifierError(f"{f}: has no _target_ (the sparsifier class)")
            found[f.stem] = get_class(target)
        _REGISTRY.clear()  # one conf tree at a time (tests point CONF_DIR at a copy)
        _REGISTRY[key] = dict(sorted(found.items(), key=lambda kv: (kv[1].plot_order, kv[0])))
    return dict(_REGISTRY[key])


def method_order(conf_dir=None) -> tuple:
    """The sparsifiers' names in their plot order (:func:`registry`'s order)."""
    return tuple(registry(conf_dir))


def check_sparsity(sparsity) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise SparsifierError(f"sparsity={sparsity!r}: must be a number in (0, 1]") from None
    if not (0.0 < s <= 1.0):
        raise SparsifierError(f"sparsity={sparsity!r}: must be in (0, 1]")
    return s


def check_positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SparsifierError(f"{name}={value!r}: must be a positive number") from None
    if not (v > 0.0 and math.isfinite(v)):
        raise SparsifierError(f"{name}={value!r}: must be a finite number > 0")
    return v


def check_k(k: int, dim: int) -> int:
    if not (1 <= int(k) <= int(dim)):
        raise SparsifierError(f"k={k}: must be in [1, J={dim}]")
    return int(k)


def all_entries(n: int, dim: int, device) -> Selection:
    """Every entry of every row, as a dense selection (no index tensor)."""
    return Selection(None, torch.full((n,), dim, dtype=torch.int64, device=device))


def mask_selection(mask: torch.Tensor) -> Selection:
    """Selection from a boolean [N, J] mask (row-major, ascending)."""
    flat = torch.nonzero(mask.reshape(-1), as_tuple=False).squeeze(1)
    counts = mask.sum(dim=1, dtype=torch.int64)
    return Selection(flat, counts)


def row_of_entry(counts, device=None) -> torch.Tensor:
    """Row number of every entry of a row-grouped flat array with these counts.

    (torch.repeat_interleave does this, but costs ~10 ms per call on CPU in
    torch 2.14; this is microseconds.)
    """
    c = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    if device is None and isinstance(counts, torch.Tensor):
        device = counts.device
    n, total = len(c), int(sum(c))
    if n == 0 or total == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    if all(x == c[0] for x in c):
        return torch.arange(n, device=device).unsqueeze(1).expand(n, c[0]).reshape(-1)
    ends = torch.cumsum(torch.as_tensor(c, dtype=torch.int64, device=device), 0)
    return torch.searchsorted(ends, torch.arange(total, device=device), right=True)
