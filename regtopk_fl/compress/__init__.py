"""Sparsifiers: each chooses a mask from the accumulated gradient it is given.

Every class has ``select(a, ctx) -> Selection`` for a batch ``a`` of shape
[N, J]; none keeps state (the error-feedback memory does). Adding one is one
new file plus a line here and a config file in ``conf/sparsifier/``.
"""
from .base import Selection, SparsifierError, num_selected
from .dense import Dense
from .gaussiank import GaussianK, RegTopKGaussianK
from .global_topk import GlobalTopK
from .randomk import RandomK
from .regtopk import RegTopK
from .topk import TopK

SPARSIFIERS = {cls.name: cls for cls in
               (Dense, TopK, RegTopK, GaussianK, RegTopKGaussianK, RandomK, GlobalTopK)}

__all__ = ["Selection", "SparsifierError", "num_selected", "SPARSIFIERS", "Dense", "TopK",
           "RegTopK", "GaussianK", "RegTopKGaussianK", "RandomK", "GlobalTopK"]
