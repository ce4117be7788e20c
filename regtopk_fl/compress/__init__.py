"""Sparsifiers: each chooses a mask from the accumulated gradient it is given.

Every class is a :class:`Sparsifier` (the contract, in ``base.py``) with
``select(a, ctx) -> Selection`` for a batch ``a`` of shape [N, J]; none
keeps state (the error-feedback memory does). Adding one is two files: its
module here and ``conf/sparsifier/<name>.yaml`` whose ``_target_`` names the
class by its module path (``regtopk_fl.compress.dgc.DGC``).
:data:`SPARSIFIERS` is read from those yamls (:func:`registry`); nothing
here lists them. The classes imported below are the older ones, whose yamls
name them by the package (``regtopk_fl.compress.TopK``): a ``_target_`` is
part of a run's config fingerprint, so those stay as they are.
"""
from collections.abc import Mapping

from .base import (Selection, Sparsifier, SparsifierError, method_order, num_selected,
                   registry)
from .dense import Dense
from .gaussiank import GaussianK, RegTopKGaussianK
from .global_topk import GlobalTopK
from .randomk import RandomK
from .regtopk import RegTopK
from .topk import TopK


class _Registry(Mapping):
    """``{name: class}`` of ``conf/sparsifier/*.yaml``, read when first used
    (and again when a yaml changes): :func:`registry` behind a mapping."""

    def __getitem__(self, name):
        return registry()[name]

    def __iter__(self):
        return iter(registry())

    def __len__(self):
        return len(registry())

    def __repr__(self):
        return f"SPARSIFIERS({registry()!r})"


SPARSIFIERS = _Registry()

__all__ = ["Selection", "Sparsifier", "SparsifierError", "num_selected", "registry",
           "method_order", "SPARSIFIERS", "Dense", "TopK", "RegTopK", "GaussianK",
           "RegTopKGaussianK", "RandomK", "GlobalTopK"]
