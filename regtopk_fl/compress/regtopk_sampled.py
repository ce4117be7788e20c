"""Sampling-aware RegTop-k: Delta's "other workers" term estimated for the
whole population when only m of N workers take part per round (issue #33).

Notation (arXiv 2501.05633, Bereyhi et al.): N workers with aggregation
weights omega_n, accumulated gradient a_n^t, upload ghat_n^t = S_k(a_n^t), the
server's aggregate ghat^t = sum_n omega_n ghat_n^t, and worker n's posterior
distortion on an entry j it sent in round t-1

    Delta_n^t[j] = (ghat^{t-1}[j] - omega_n ghat_n^{t-1}[j]) / (omega_n ghat_n^{t-1}[j])

(the ``reference`` denominator; ``paper`` puts omega_n a_n^t[j] there). The
score is |a_n^t[j]| tanh(|1 + Delta_n^t[j]| / mu). With full participation the
numerator is the others' part of the aggregate, O_n[j] = sum_{i != n}
omega_i ghat_i[j], so 1 + Delta is the aggregate over worker n's own share:
about N (aligned entries, tanh = 1) or about 0 (entries the others cancel,
score ~ 0). mu is set on that scale.

**Under sampling** (cohort P of m workers, drawn uniformly without
replacement; the server renormalises, w_i = omega_i / W_P with W_P =
sum_{i in P} omega_i, and ships ghat^{t-1} = sum_{i in P} w_i ghat_i and w_n)
the same formula gives

    Delta_n^P = (ghat^{t-1} - w_n ghat_n) / (w_n ghat_n) = O_n^P / (omega_n ghat_n),
    O_n^P = sum_{i in P, i != n} omega_i ghat_i

(W_P cancels): the others *of the cohort*, m - 1 of them, not N - 1. Both the
prior's scale and what decides whether worker n's entry survives aggregation
over the rounds to come are the population's O_n, of which O_n^P is a
(m-1)/(N-1) sample: an aligned entry gets 1 + Delta ~ m instead of ~ N (the
score falls into tanh's linear part, |a| |1 + Delta| / mu, i.e. mu acts N/m
times larger), and an entry the population cancels gets E[1 + Delta] =
(N - m)/(N - 1) instead of 0. Given n in P, every other worker is in P with
probability pi = (m - 1)/(N - 1), so the Horvitz-Thompson estimate O_n^P / pi
is unbiased for O_n (any weights omega), and the sampling-aware distortion is

    Delta_n^HT = O_n^P / (pi omega_n ghat_n) = c Delta_n^P,   c = (N - 1)/(m - 1).

**Its noise.** O_n^P is a sum over m - 1 of the N - 1 others drawn without
replacement; if their contributions omega_i ghat_i[j] spread with standard
deviation tau, Var(O_n^P) = (m - 1) tau^2 (1 - pi) (finite population), so

    sd(1 + Delta_n^HT) = sigma = rho sqrt((N - 1)(N - m)/(m - 1)),
    rho = tau / |omega_n ghat_n[j]|

(``spread`` = rho, default 1: the others spread as much as one's own
contribution; the worker cannot see tau). A score that takes |1 + Delta^HT| at
face value suppresses entries whose estimate is small *by chance*. With a flat
prior the true 1 + Delta given the estimate x is N(x, sigma^2), whose root mean
square is sqrt(x^2 + sigma^2); the rule scores

    |a_n^t[j]| tanh( sqrt((1 + Delta_n^HT[j])^2 + sigma^2) / mu ).

The cost over RegTop-k is one multiplication and one hypot on the previous
mask's entries.

* m = N: c = 1 and sigma = 0, and both operations are skipped: **bitwise
  RegTop-k** (tests/test_regtopk_sampled.py).
* m = 1: the cohort holds no other worker, O_n is unknown (c, sigma infinite):
  Top-k's scores.
* In between, the floor sigma only raises a score towards |a| (Top-k's): the
  rule keeps RegTop-k's suppression only where the estimated population
  aggregate is small beyond its sampling noise. With mu = 4 and N = 100,
  sigma = 10 / 20 / 31 at m = 50 / 20 / 10 (rho = 1) leaves every score within
  1.3 % of |a|; ``spread=0`` is the Horvitz-Thompson factor alone.
* Feedback older than the previous round (a worker that sat out) is an estimate
  of that round's population; ``participation.stale_feedback`` (keep / forget)
  still decides whether it is used.
* pi is uniform sampling's; ``participation.weighted=true`` (inclusion
  probabilities that depend on data size) is refused. Drops
  (``faults.drop_prob``) shrink a cohort below m: c is then slightly small.

m and N come from the run's settings (the yaml interpolates ``num_workers``
and ``participation.*``), so both runtimes build the same rule.
"""
from __future__ import annotations

import math

from .. import checks
from ..participation import clients_per_round
from .base import SparsifierError, num_selected
from .exact_topk import Lowered, rows_topk
from .regtopk import RegTopK, off_mask_scale, prev_scores, regularized_abs


def noise_floor(clients: int, per_round: int, spread: float):
    """sigma = spread * sqrt((N - 1)(N - m)/(m - 1)), the standard deviation
    of 1 + Delta^HT when the others' contributions spread by ``spread`` times
    one's own; None at m = N or spread = 0 (no term), inf at m = 1."""
    n, m = int(clients), int(per_round)
    if m >= n or spread == 0:
        return None
    if m <= 1:
        return float("inf")
    return float(spread) * math.sqrt((n - 1) * (n - m) / (m - 1))


def population_scale(clients: int, per_round: int):
    """c = (N - 1)/(m - 1); None at m = N (no rescaling); inf at m = 1
    (nothing known about the others: every Delta reads as unknown)."""
    n, m = int(clients), int(per_round)
    if m >= n:
        return None
    if m <= 1:
        return float("inf")
    return (n - 1) / (m - 1)


class RegTopKSampled(RegTopK):
    name = "regtopk_sampled"
    label = "regtopk_sampled"
    plot_order = 5.5

    def __init__(self, sparsity: float, mu: float = 1.0, distortion: str = "reference",
                 q: float = 1e8, clients=None, per_round=None, fraction=None,
                 spread: float = 1.0, **kw):
        super().__init__(sparsity, mu=mu, distortion=distortion, q=q, **kw)
        # clients None (built without the run's settings): nothing known of
        # the sampling, every worker assumed in: RegTop-k
        if clients is not None and (isinstance(clients, bool) or int(clients) < 1):
            raise SparsifierError(f"clients={clients!r}: must be the number of workers N >= 1")
        self.clients = None if clients is None else int(clients)
        if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not (
                math.isfinite(spread) and spread >= 0):
            raise SparsifierError(f"spread={spread!r}: must be a finite number >= 0")
        self.spread = float(spread)
        self.per_round = None
        self.scale = self.noise = None
        if self.clients is not None:
            self.per_round = clients_per_round(self.clients, per_round, fraction)
            if self.per_round < 1:
                raise SparsifierError(f"per_round={per_round!r}: must be >= 1")
            self.scale = population_scale(self.clients, self.per_round)
            self.noise = noise_floor(self.clients, self.per_round, self.spread)

    @classmethod
    def check_settings(cls, cfg, runtime):
        super().check_settings(cfg, runtime)
        checks.num(cfg, "sparsifier.clients", 1, integer=True,
                   allowed="must be the number of workers (an integer >= 1; default ${num_workers})")
        checks.num(cfg, "sparsifier.per_round", 1, integer=True, required=False,
                   allowed="must be an integer >= 1 or null (default "
                           "${participation.clients_per_round})")
        checks.num(cfg, "sparsifier.fraction", 0, 1, lo_open=True, required=False,
                   allowed="must be in (0, 1] or null (default ${participation.fraction})")
        checks.num(cfg, "sparsifier.spread", 0, allowed="must be a finite number >= 0")
        if checks.get(cfg, "participation.weighted"):
            checks.fail("participation.weighted", True, "regtopk_sampled's Horvitz-Thompson "
                        "factor assumes uniform sampling: use participation.weighted=false")

    def score(self, a, ctx):
        if self.scale == float("inf"):
            return a.abs().mul_(off_mask_scale(self.mu, self.q))
        return regularized_abs(a, ctx, self.mu, self.distortion, self.q, scale=self.scale,
                               noise=self.noise)

    def select(self, a, ctx):
        if self.scale is None:  # full participation: RegTop-k, bitwise
            return super().select(a, ctx)
        k = num_selected(self.sparsity, a.shape[1])
        if off_mask_scale(self.mu, self.q) != 1.0:
            return rows_topk(self.score(a, ctx), k)
        if self.scale == float("inf") or not ctx.prev_flat.numel():
            return rows_topk(a, k, absolute=True)
        return rows_topk(a, k, absolute=True, lowered=Lowered(
            ctx.prev_flat, lambda pos: prev_scores(a, ctx, self.mu, self.distortion, self.q, pos,
                                                   scale=self.scale, noise=self.noise)[1]))
