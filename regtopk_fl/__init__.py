"""regtopk-fl: gradient sparsification with error feedback (RegTop-k, Top-k,
Gaussian-k) for federated learning on Flower, with an in-process twin."""
__version__ = "0.1.0"
