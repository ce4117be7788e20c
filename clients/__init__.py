"""Flower ClientApps of regtopk-fl."""
