"""Aggregation rules: how the server turns one round's accepted uploads into
the global gradient g (step 4 of ``FedServer.step``).

Each rule is a small class with ``combine(g, batch)``, chosen by the config
group ``conf/aggregate/*.yaml`` through ``_target_`` (``aggregate=median`` on
the command line), the way sparsifiers are chosen. Adding a rule is one code
file with its class and one yaml naming it: validation reads the choices from
``conf/aggregate/`` (settings.group_options), and ``from_cfg`` instantiates
whatever ``_target_`` names (tests/test_aggregate.py adds one that way).

* ``mean`` is the paper's g = sum_n w_n g_hat_n (Algorithm 1), bitwise the
  arithmetic the server has always done.
* ``trimmed_mean``, ``median`` (coordinate-wise) and ``centered_clip`` (norm
  clipping) are Byzantine-robust baselines and **a deviation from the paper**.
  RegTop-k's feedback is then the g that was applied, whichever rule made it.
* ``upload_clip`` (upload_clip.py, issue #33) is made for sparse uploads:
  each upload's norm on its own entries against the round's lower median,
  the paper's mean bit for bit when no upload is an outlier. It was added as
  one file and its yaml, so it is not imported here (``_target_`` names its
  module).

Every rule runs on the server (both runtimes call the same FedServer) and
writes g only on the union of the accepted uploads' supports, which is what
the sparse downlink broadcasts (broadcast.py).
"""
from omegaconf import OmegaConf

from .base import AggregateError, Batch, Rule, lower_median, on_support
from .centered_clip import CenteredClip
from .mean import Mean
from .median import Median
from .trimmed_mean import TrimmedMean


def from_cfg(cfg) -> Rule:
    """The run's rule, instantiated from its ``aggregate`` node (the mean when
    the config has none). Raises AggregateError on a bad parameter."""
    from hydra.utils import instantiate

    node = OmegaConf.select(cfg, "aggregate", default=None)
    if node is None:
        return Mean()
    try:
        rule = instantiate(OmegaConf.to_container(node, resolve=True))
    except Exception as exc:  # Hydra wraps the constructor's error: raise that one
        cause = exc
        while cause is not None and not isinstance(cause, AggregateError):
            cause = cause.__cause__
        raise (cause or exc) from None
    if not isinstance(rule, Rule):
        raise AggregateError("aggregate._target_", node.get("_target_"),
                             "must name an aggregation rule (a regtopk_fl.aggregate.Rule)")
    return rule


__all__ = ["AggregateError", "Batch", "Rule", "lower_median", "on_support", "from_cfg", "Mean", "TrimmedMean",
           "Median", "CenteredClip"]
