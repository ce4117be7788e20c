"""What the server believes about an upload beyond its form: its weight, its
size in entries and its size in norm (the ``server:`` settings and the run's
sparsifier). ``payload.validate_upload`` already refuses malformed uploads;
this module refuses well-formed ones that lie or overreach.

* **Weights.** A worker's weight w_n follows its number of examples. The
  server builds the same seeded partition as the clients (``task.num_examples()``)
  and uses its own count; a reply that claims another count is rejected
  (``num-examples=10^12`` once took almost all the weight). Where only the
  client knows its data size, ``trust_num_examples=true`` uses the reported
  counts, but no worker gets more than ``max_weight_share`` of the total
  (water-filling: the capped shares are fixed and the rest renormalised).
* **Budget.** An upload may carry at most the run's budget of entries,
  which every sparsifier states through the contract (compress/base.py,
  ``Sparsifier.budget(J)``, a bound its own selection never exceeds): k =
  max(1, round(S * J)) for Top-k, RegTop-k, Random-k and the global Top-k;
  where the count varies, the cap the method enforces: ``budget_factor`` x
  k for Gaussian-k, RegTop-k on Gaussian-k and trimmed top-k
  (``sparsifier.budget_factor``, default 128), floor(``upper_bound`` x k)
  for DGC (1.3 k by default: more candidates are cut to the exact top-k).
  The server takes the budget from its own sparsifier config
  (``sparsifier.budget(J)``), never from a reply. A dense upload of all J entries, a coded one of all J,
  or k + 1 entries is rejected; ``dense`` runs have no budget. (An upload
  over budget once made ``sent`` 250 where four honest workers sent 200, and
  gained its worker influence over the model.)
* **Magnitude.** An upload whose L2 norm exceeds ``max_norm_ratio`` times the
  round's reference norm, plus its worker's deferred allowance (below), is
  rejected (finite values of 1e30 once turned the model into 1e29s);
  ``max_upload_norm`` is an absolute cap, off by default (it defers nothing).
  The reference is the *lower* median of the norms of the round's remaining
  uploads: with two workers the plain median is their mean, which any single
  upload exceeds by at most 2x, so the guard could never fire; the lower
  median is the smaller norm there. A hostile minority (fewer than half of
  the replies) cannot move the lower median above an honest norm. When the
  reference is 0 (half the uploads are exactly zero) no ratio is applied.
  BatchNorm buffers, which are averaged into the model as well, get the same
  ratio rule on their own norm (not deferred: buffers do not accumulate).
* **No lockout: refused rounds defer their allowance.** A rejected upload
  goes back into its worker's residual (error feedback loses nothing), so the
  worker's next upload carries the gradients of every round since its last
  accepted one. Against one round's median such an upload grows with the
  refused rounds, and after enough of them (about 11 in the run that filed
  issue #17; 50 in tests/test_comeback.py, whose comeback was 45x the
  median) an honest worker was refused forever (its refusals grew the
  residual further). So every round in which
  worker n is refused, for whatever reason (a NaN, a stale replica, a
  missed check), adds ``max_norm_ratio x`` that round's reference norm to
  n's *deferred allowance* D_n, and n's bound is ``max_norm_ratio x
  reference + D_n``; an accepted upload spends from D_n what it used above
  the round's own allowance. This follows what error feedback does: the
  bound grows by one round's allowance per refused round, whatever the
  reference does meanwhile (a run converging at a geometric rate shrinks the
  median; a bound that scaled today's median by the number of refused rounds
  fell behind the residual's older, larger gradients), while an honest
  residual grows by one gradient (below 6.8x the median in every recorded
  preset) per round. So a comeback is accepted within a bounded number of
  rounds, and what a comeback does not spend stays for the residual it
  leaves behind. Honest runs never defer (nothing refused: every recorded
  number is unchanged). The price: a worker's accepted norms never exceed,
  summed over the rounds it took part in, ``max_norm_ratio x`` their
  references; a hostile worker can spend its allowance late (refused for R
  rounds, then one upload of about ``max_norm_ratio x`` R medians), never
  more. A 1e30 upload is still rejected. Robust aggregation
  (regtopk_fl/aggregate/) limits what one upload within the bounds can do.
  Only the server's own record counts (rounds it refused); a reply that
  never arrived (a timeout) defers nothing. D_n is in the checkpoint.

Aggregation rules live in regtopk_fl/aggregate/ (``aggregate=`` config
group); :func:`install` gives the server both the guard and the rule.

A rejected upload is treated as every other rejection: the Coordinator marks
it and the worker puts it back into its residual.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from .aggregate.base import lower_median  # the reference norm (shared with centered clipping)

log = logging.getLogger(__name__)

# The largest norm / lower-median ratio of any honest upload in the recorded
# presets is 6.72 (Gaussian-k on CIFAR-10, whose selected count varies from
# worker to worker); linear regression stays below 4.9 (N=50: 4.33), Top-k /
# RegTop-k on CIFAR-10 below 1.6 (results/README.md "How large is an honest
# upload", scripts/norm_ratio_survey.py). 20 leaves a margin of about 3x; a
# false rejection only delays an upload (it goes back into the residual, and
# the refused round's allowance is deferred to the worker's next uploads).
DEFAULT_MAX_NORM_RATIO = 20.0
WEIGHTINGS = ("data_share", "uniform")  # server.weighting


@dataclass
class TrustPolicy:
    max_norm_ratio: float | None = DEFAULT_MAX_NORM_RATIO
    max_upload_norm: float | None = None
    trust_num_examples: bool = False
    max_weight_share: float = 0.5
    weighting: str = "data_share"  # or "uniform" (the authors' 1/N; issue #30)

    @classmethod
    def from_cfg(cls, cfg) -> "TrustPolicy":
        def get(key, default):
            v = OmegaConf.select(cfg, f"server.{key}", default=default)
            return None if v == "" else v

        ratio = get("max_norm_ratio", DEFAULT_MAX_NORM_RATIO)
        cap = get("max_upload_norm", None)
        return cls(None if ratio is None else float(ratio), None if cap is None else float(cap),
                   bool(get("trust_num_examples", False)), float(get("max_weight_share", 0.5)),
                   str(get("weighting", "data_share")))


def upload_norm(reply) -> float:
    """L2 norm of what the upload adds to the model (its values; a sparse
    upload's zeros add nothing)."""
    v = reply.upload.values
    return float(torch.linalg.vector_norm(v.to(torch.float64))) if v.numel() else 0.0


STACK_MAX = 1 << 16  # longer rows are reduced one by one: stacking them is a copy of them all


def l2_norms(tensors) -> list:
    """The float64 L2 norm of each tensor, as :func:`upload_norm` computes it:
    one reduction over the rows of a stacked [R, n] matrix when they are
    equally long (each row reduced on its own, in the same order as alone:
    bitwise the same floats, tested on every CPU kernel path torch has
    here) when they are equally long and short (below ``STACK_MAX``
    entries), else one by one (a dense upload of J entries: no stacked copy)."""
    if len(tensors) > 1 and len({t.numel() for t in tensors}) == 1 and \
            0 < tensors[0].numel() < STACK_MAX:
        rows = torch.stack(tensors).reshape(len(tensors), -1).to(torch.float64)
        return torch.linalg.vector_norm(rows, dim=1).tolist()
    return [float(torch.linalg.vector_norm(t.to(torch.float64))) if t.numel() else 0.0
            for t in tensors]


def upload_entries(reply) -> int:
    """The entries an upload carries: its values (J for a dense upload)."""
    return int(reply.upload.values.numel())


def capped_shares(counts, cap: float) -> list:
    """Shares proportional to ``counts``, none above ``cap`` (water-filling).
    When even equal shares exceed the cap (cap * n < 1), equal shares."""
    n = len(counts)
    total = float(sum(counts))
    shares = [c / total for c in counts]
    if cap >= 1.0 or max(shares) <= cap:
        return shares
    if cap * n < 1.0:
        return [1.0 / n] * n
    fixed: set = set()
    while True:
        free = [i for i in range(n) if i not in fixed]
        rest = 1.0 - cap * len(fixed)
        free_total = float(sum(counts[i] for i in free))
        new = {i: rest * counts[i] / free_total for i in free}
        over = {i for i, s in new.items() if s > cap}
        if not over:
            return [cap if i in fixed else new[i] for i in range(n)]
        fixed |= over


class Guard:
    """The server's checks and weights for one run (``FedServer.trust``).

    ``sizes[n]`` is the server's own count of worker n's examples (None: it
    does not know them, so reported counts are used, capped). ``budget`` is
    the most entries one upload may carry (None: no budget, a dense run) and
    ``budget_note`` says where it comes from. ``max_ratio`` is the largest
    norm / reference ratio among accepted uploads so far (the evidence behind
    ``max_norm_ratio``; written to summary.json). ``deferred[n]`` is worker
    n's deferred allowance (module docstring); ``comebacks`` records each
    accepted upload that used some of it: (worker, norm / reference, norm /
    (reference + D_n / max_norm_ratio))."""

    def __init__(self, policy: TrustPolicy | None = None, sizes=None, budget=None,
                 budget_note: str = ""):
        self.policy = policy or TrustPolicy()
        self.sizes = None if sizes is None else [int(s) for s in sizes]
        self.budget = None if budget is None else int(budget)
        self.budget_note = budget_note
        self.max_ratio = 0.0
        self.deferred: dict = {}  # worker -> norm allowance deferred by refused rounds
        self.comebacks: list = []
        self._round = (0.0, {})  # (this round's reference norm, {accepted worker: norm})

    # -- which replies to believe --------------------------------------------
    def screen(self, replies: list) -> tuple:
        """(accepted, {worker: reason}) for replies that passed validation."""
        p, rejected, ok = self.policy, {}, []
        for r in replies:
            why = self._count_problem(r) or self._budget_problem(r)
            if why is None:
                ok.append(r)
            else:
                rejected[r.worker] = why
        norms = l2_norms([r.upload.values for r in ok])  # upload_norm of each
        if p.max_upload_norm is not None:  # the absolute cap, before the median
            over = [norm > p.max_upload_norm for norm in norms]
            for r, norm, o in zip(ok, norms, over):
                if o:
                    rejected[r.worker] = (f"upload norm {norm:.3g} > server.max_upload_norm="
                                          f"{p.max_upload_norm:g}")
            ok = [r for r, o in zip(ok, over) if not o]
            norms = [norm for norm, o in zip(norms, over) if not o]
        if not ok:
            self._round = (0.0, {})
            return ok, rejected
        ref = lower_median(norms)
        # BatchNorm buffers are averaged into the model too: the same rule
        # (honest workers' buffers are alike; 1e30 running variances are not)
        with_bufs = [r for r in ok if r.buffers is not None]
        bnorms = iter(l2_norms([r.buffers for r in with_bufs]))
        bufs = [None if r.buffers is None else next(bnorms) for r in ok]
        bref = lower_median([b for b in bufs if b is not None]) if with_bufs else 0.0
        keep, kept_norms = [], {}
        for r, norm, bnorm in zip(ok, norms, bufs):
            ratio = norm / ref if ref > 0 else (0.0 if norm == 0 else math.inf)
            deferred = self.deferred.get(r.worker, 0.0)
            if ref > 0 and p.max_norm_ratio is not None and (
                    (norm - deferred) / ref if deferred else ratio) > p.max_norm_ratio:
                extra = (f" + deferred {deferred:.3g} from refused rounds" if deferred else "")
                rejected[r.worker] = (f"upload norm {norm:.3g} is {ratio:.3g}x the round's "
                                      f"median {ref:.3g} (server.max_norm_ratio="
                                      f"{p.max_norm_ratio:g}{extra})")
            elif (bnorm is not None and bref > 0 and p.max_norm_ratio is not None
                  and bnorm > p.max_norm_ratio * bref):
                rejected[r.worker] = (f"buffers norm {bnorm:.3g} is {bnorm / bref:.3g}x the "
                                      f"round's median {bref:.3g} (server.max_norm_ratio="
                                      f"{p.max_norm_ratio:g})")
            else:
                keep.append(r)
                kept_norms[r.worker] = norm
                if ref > 0:
                    self.max_ratio = max(self.max_ratio, ratio)
                    if deferred:
                        self.comebacks.append(
                            (r.worker, ratio, norm / (ref + deferred / p.max_norm_ratio)))
        self._round = (ref, kept_norms)
        return keep, rejected

    def _count_problem(self, reply):
        if self.policy.trust_num_examples or self.sizes is None:
            return None
        n = reply.worker
        if not 0 <= n < len(self.sizes):
            return f"worker {n} is not one of the {len(self.sizes)} partitions"
        if reply.num_examples != self.sizes[n]:
            return (f"claims num_examples={reply.num_examples}, but partition {n} holds "
                    f"{self.sizes[n]} (server.trust_num_examples=false)")
        return None

    def _budget_problem(self, reply):
        if self.budget is None:
            return None
        m = upload_entries(reply)
        if m <= self.budget:
            return None
        form = "dense" if reply.upload.indices is None else "sparse"
        return (f"a {form} upload of {m} entries is over the budget of {self.budget}"
                f"{' (' + self.budget_note + ')' if self.budget_note else ''}")

    # -- after the round: the deferred allowances ---------------------------------
    def settle(self, accepted, rejected) -> None:
        """Worker n's refusal this round (any reason: ``rejected``) defers one
        round's allowance, ``max_norm_ratio x`` the reference; an accepted
        upload spends from its deferral what it used above the round's own
        allowance. Called by the Coordinator once per round, after step."""
        ref, norms = self._round
        self._round = (0.0, {})
        ratio = self.policy.max_norm_ratio
        if ratio is None:
            return
        for n in accepted:
            d = self.deferred.get(n)
            if d:
                left = d - max(0.0, norms.get(n, 0.0) - ratio * ref)
                if left > 0:
                    self.deferred[n] = left
                else:
                    del self.deferred[n]
        if ref > 0:
            for n in rejected:
                self.deferred[n] = self.deferred.get(n, 0.0) + ratio * ref

    def state_dict(self) -> dict:
        return {"deferred": {int(n): float(d) for n, d in self.deferred.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.deferred = {int(n): float(d) for n, d in state.get("deferred", {}).items()}

    # -- how much each accepted reply counts -----------------------------------
    def weights(self, replies: list) -> list:
        if self.policy.weighting == "uniform":  # no counts read at all: 1 / replies
            return [1.0 / len(replies)] * len(replies)
        if self.policy.trust_num_examples or self.sizes is None:
            counts = [r.num_examples for r in replies]
            shares = capped_shares(counts, self.policy.max_weight_share)
            if shares != [c / float(sum(counts)) for c in counts]:
                log.info("reported num_examples %s capped at share %g: weights %s", counts,
                         self.policy.max_weight_share, [round(s, 4) for s in shares])
            return shares
        counts = [self.sizes[r.worker] for r in replies]
        total = float(sum(counts))  # the same arithmetic as FedServer's own rule
        return [c / total for c in counts]


def budget_of(sparsifier, dim: int) -> tuple:
    """(most entries per upload or None, where that comes from) for the run's
    own sparsifier: its ``budget(J)`` and ``budget_note(J)`` (compress/base.py;
    None for a sparsifier without a budget, e.g. dense)."""
    budget = sparsifier.budget(int(dim))
    if budget is None:
        return None, ""
    return int(budget), sparsifier.budget_note(int(dim))


def install(server, cfg, task, recorder=None, sparsifier=None) -> Guard:
    """Give ``server`` (a FedServer) the run's guard and aggregation rule.
    The server's own counts come from the task's seeded partition, as the
    clients build it; the budget from the run's sparsifier config
    (``sparsifier``, or instantiated from ``cfg.sparsifier``), never from a
    client. ``summary.json`` then records ``max_norm_ratio`` (the largest
    accepted norm / median ratio of the run, since its last start)."""
    from . import aggregate

    if sparsifier is None:
        from hydra.utils import instantiate
        sparsifier = instantiate(OmegaConf.to_container(cfg.sparsifier, resolve=True))
    budget, note = budget_of(sparsifier, task.dim)
    guard = Guard(TrustPolicy.from_cfg(cfg), task.num_examples(), budget, note)
    server.trust = guard
    server.aggregate = aggregate.from_cfg(cfg)
    if recorder is not None:
        recorder.extras.append(lambda: {"max_norm_ratio": guard.max_ratio})
    return guard
