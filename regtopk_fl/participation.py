"""Client sampling: which workers take part in round t.

The choice is a pure function of (seed, round) and the settings, never of a
generator's running state, so the in-process engine, the Flower strategy, a
resumed run and a re-run all pick the same clients without sharing or
checkpointing any RNG.

Settings (``participation.*``):

* ``clients_per_round`` (m) or ``fraction`` (m = max(1, round(fraction * N)));
  neither: every client every round (no RNG is drawn, so full participation
  is bitwise today's behaviour);
* ``weighted``: draw without replacement with probability proportional to
  the clients' data sizes (numpy's sequential weighted draw) instead of
  uniformly. The server still weights the replies by data size, renormalised
  over the replies it got (as for drops), so weighted sampling favours large
  clients twice: it is a knob for "big clients are online more often", not an
  unbiased estimator of the full gradient;
* ``stale_feedback``: ``keep`` (default) - a client that last took part in
  round r < t - 1 computes RegTop-k's Delta from the global gradient of round
  r, the one it saw; ``forget`` - that old feedback is dropped, so its previous
  mask reads as unknown (Delta = Q, plain Top-k scores). ``forget`` is an
  ablation (in-process only) that measures what the stale Delta costs or buys.

Faults (``faults.drop_prob``) act on the sampled clients only: a sampled client
that drops is "missing"; a client that was not sampled is not.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TAG = 0x53414D50  # "SAMP": keeps this stream apart from any other seeded by (seed, round)
STALE_POLICIES = ("keep", "forget")


def clients_per_round(num_clients: int, per_round=None, fraction=None) -> int:
    """m from the settings (all clients when neither is set)."""
    if per_round is not None:
        return min(int(per_round), int(num_clients))
    if fraction is not None:
        return max(1, min(int(num_clients), int(float(fraction) * num_clients + 0.5)))
    return int(num_clients)


def sample_clients(num_clients: int, per_round: int, seed: int, round: int,
                   sizes=None) -> list:
    """The ascending ids of the ``per_round`` clients of ``round``; uniform
    without replacement, or proportional to ``sizes`` when given."""
    n, m = int(num_clients), int(per_round)
    if m >= n:
        return list(range(n))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(round), _TAG])))
    p = None
    if sizes is not None:
        p = np.asarray(sizes, dtype=np.float64)
        p = p / p.sum()
    return sorted(int(i) for i in rng.choice(n, size=m, replace=False, p=p))


@dataclass(frozen=True)
class Participation:
    """The sampling rule of one run."""

    num_clients: int
    per_round: int
    seed: int = 0
    sizes: tuple | None = None  # data sizes when weighted, else None
    stale_feedback: str = "keep"

    @property
    def full(self) -> bool:
        return self.per_round >= self.num_clients

    def clients(self, round: int) -> list:
        return sample_clients(self.num_clients, self.per_round, self.seed, round, self.sizes)

    def keeps(self, last_round, round: int) -> bool:
        """Whether feedback about an upload of ``last_round`` is used in ``round``."""
        return self.stale_feedback == "keep" or last_round is None or round - last_round <= 1


def from_cfg(cfg, sizes=None) -> Participation:
    """The run's rule from its settings; ``sizes`` (the clients' data sizes) is
    needed only when ``participation.weighted`` is true."""
    from omegaconf import OmegaConf

    get = lambda key, default=None: OmegaConf.select(cfg, f"participation.{key}", default=default)
    n = int(cfg.num_workers)
    m = clients_per_round(n, get("clients_per_round"), get("fraction"))
    weighted = bool(get("weighted", False))
    if weighted and sizes is None:
        raise ValueError("participation.weighted needs the clients' data sizes")
    return Participation(n, m, int(cfg.seed), tuple(int(s) for s in sizes) if weighted else None,
                         str(get("stale_feedback", "keep")))
