"""Flower server side of regtopk-fl: the sparse-aggregation strategy and the ServerApp."""
from .sparse_strategy import SparseAggregation

__all__ = ["SparseAggregation"]
