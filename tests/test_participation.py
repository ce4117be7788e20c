"""Client sampling (#12): the seeded sampler, the per-client state store the
in-process engine uses under sampling, and runtime.ray_address reaching ray.init."""
import collections

import pytest
import torch

from regtopk_fl.compress import RegTopK
from regtopk_fl.engine import InProcessRun
from regtopk_fl.memory import ErrorFeedbackMemory
from regtopk_fl.participation import Participation, clients_per_round, from_cfg, sample_clients
from regtopk_fl.tasks.linreg import LinRegTask


def test_sampler_is_seeded_by_seed_and_round_and_uniform():
    a = [sample_clients(50, 5, seed=1, round=t) for t in range(1, 401)]
    assert a == [sample_clients(50, 5, seed=1, round=t) for t in range(1, 401)]  # a re-run
    assert a[0] != a[1] and a[0] != sample_clients(50, 5, seed=2, round=1)
    assert all(len(s) == len(set(s)) == 5 and s == sorted(s) for s in a)  # no replacement
    counts = collections.Counter(n for s in a for n in s)
    assert len(counts) == 50 and 20 <= min(counts.values()) and max(counts.values()) <= 65  # mean 40
    assert sample_clients(50, 50, 1, 1) == list(range(50))  # m = N: everyone, no RNG


def test_weighted_sampling_follows_data_size():
    sizes = [1] * 9 + [100]
    picks = collections.Counter(n for t in range(1, 201) for n in sample_clients(10, 2, 0, t, sizes))
    assert picks[9] > 190  # the big client is nearly always in
    assert max(picks[n] for n in range(9)) < 60


def test_clients_per_round_from_settings(make_cfg):
    assert clients_per_round(100) == 100
    assert clients_per_round(100, per_round=7) == 7
    assert clients_per_round(100, fraction=0.1) == 10 and clients_per_round(3, fraction=0.01) == 1
    p = from_cfg(make_cfg(["num_workers=40", "participation.fraction=0.25",
                           "participation.weighted=true"]), sizes=list(range(1, 41)))
    assert p.per_round == 10 and p.sizes == tuple(range(1, 41)) and not p.full
    assert from_cfg(make_cfg([])).full


def _run(task, participation, faults=None, dense_memory=False, sparsifier=None):
    run = InProcessRun(task, sparsifier or RegTopK(0.3, mu=2), lr=0.01,
                       participation=participation,
                       fault_cfg=faults or {}, seed=3)
    if dense_memory:  # the [N, J] memory with rows=sampled: the reference arithmetic
        run.clients, run.memory = None, ErrorFeedbackMemory(task.num_workers, task.dim, task.dtype)
    return run


@pytest.mark.parametrize("method", ["regtopk", "topk", "dense"])
def test_client_states_equal_the_dense_memory_and_hold_only_sampled_clients(method):
    """RegTop-k reads a context (the stored masks and feedback); Top-k does
    not, so its batches start from the residuals alone; dense rows are stored
    as markers (no residual, an implicit mask). With NaN uploads rejected and
    put back into the residual, all three equal the [N, J] memory bitwise."""
    from regtopk_fl.compress import Dense, TopK

    task = LinRegTask(num_workers=60, dim=40, samples_per_worker=50)
    p = Participation(60, 4, seed=3)
    faults = {"drop_prob": 0.2, "nan_prob": 0.1}
    make = {"regtopk": lambda: RegTopK(0.3, mu=2), "topk": lambda: TopK(0.3),
            "dense": lambda: Dense()}[method]
    a = _run(task, p, faults, sparsifier=make())
    b = _run(task, p, faults, dense_memory=True, sparsifier=make())
    sampled, resyncs = set(), 0
    for t in range(1, 21):
        ra, rb = a.round(t), b.round(t)
        sampled |= set(p.clients(t))
        assert (ra["missing"], ra["plan"], ra["sampled"]) == (
            rb["missing"], rb["plan"], rb["sampled"])
        assert set(ra["plan"].kinds) == set(p.clients(t))  # only the sampled are sent anything
        for n in p.clients(t):  # a client that sat out the last round is caught up:
            if t > 2 and n not in p.clients(t - 1):  # (in round 2, g of round 1 + the seed do)
                assert ra["plan"].kinds[n] in ("patch", "full"), (t, n)  # never sent g
        resyncs = resyncs + ra["plan"].resyncs + ra["plan"].patches if t > 1 else 0
        assert ra["sampled"] == 4 and ra["replies"] + ra["missing"] == 4
    assert torch.equal(a.server.params, b.server.params)
    assert resyncs > 10  # 4 of 60 per round: nearly every sampled client is returning
    assert set(a.clients.states) <= sampled and len(a.clients) < 60
    # the store's rows are the dense memory's rows, and a rejected upload went
    # back into its worker's residual
    for n in sorted(a.clients.states):
        assert torch.equal(a.clients.gather([n]).eps[0], b.memory.eps[n])
    if method != "dense":  # (a dense residual is empty after every round's commit)
        assert any(bool(b.memory.eps[n].any()) for n in a.clients.states)
    if method == "dense":  # a dense row's mask and residual are markers until needed
        n = next(n for n, s in a.clients.states.items() if s["prev_local"] is None)
        assert a.clients.states[n]["eps"] is None
        mem = a.clients.gather([n])
        assert torch.equal(mem.prev_local, torch.arange(task.dim))
        assert torch.equal(mem.prev_sent, a.clients.states[n]["prev_sent"])


def test_forgetting_stale_feedback_changes_only_regtopk_rows_that_skipped_rounds():
    task = LinRegTask(num_workers=12, dim=30, samples_per_worker=40)
    keep, forget = Participation(12, 3, seed=0), Participation(12, 3, seed=0, stale_feedback="forget")
    a, b = _run(task, keep), _run(task, forget)
    first_stale = None
    for t in range(1, 30):
        a.round(t), b.round(t)
        same = torch.equal(a.server.params, b.server.params)
        if first_stale is None and not same:
            first_stale = t
    # the runs agree until a client comes back after skipping a round
    last, t0 = {}, None
    for t in range(1, 30):
        for n in keep.clients(t):
            if t0 is None and n in last and t - last[n] > 1:
                t0 = t
            last[n] = t
    assert first_stale == t0 is not None


def test_ray_address_reaches_ray_init(make_cfg, monkeypatch, tmp_path):
    """runtime.ray_address goes into backend_config["init_args"]["address"],
    which flwr's RayBackend passes to ray.init (no simulation is started)."""
    import flwr.simulation

    import simulation

    seen = {}
    monkeypatch.setattr(flwr.simulation, "run_simulation",
                        lambda **kw: seen.update(kw["backend_config"]))
    for address, want in ((None, None), ("auto", "auto"),
                          ("127.0.0.1:6379", "127.0.0.1:6379")):
        seen.clear()
        cfg = make_cfg(["runtime=flower", "device=cpu", f"runtime.ray_address={address or 'null'}"])
        simulation.run_simulation(cfg, None, None, None, None)
        assert seen["init_args"].get("address") == want
        assert seen["init_args"]["include_dashboard"] is False


@pytest.mark.parametrize("setting,address,affinity,want,ray_count,env_address", [
    ("auto", None, {0, 1}, 2, 16, None),  # held to 2 of 16 cores (taskset): Ray gets 2
    ("auto", None, {0, 1}, 2, None, None),  # (Ray cannot count: the affinity's)
    ("auto", None, set(range(8)), 4, 4, None),  # a cgroup quota of 4 still holds
    ("auto", None, set(range(16)), None, 16, None),  # every core: Ray's own count
    ("null", None, {0, 1}, None, 16, None),
    ("3", None, set(range(16)), 3, 16, None),
    ("auto", "auto", {0, 1}, None, 16, None),  # a cluster's nodes declare their own CPUs
    ("auto", None, {0, 1}, None, 16, "10.0.0.1:6379"),  # so does one RAY_ADDRESS names
])
def test_local_ray_gets_the_usable_cpus(make_cfg, monkeypatch, setting, address, affinity,
                                        want, ray_count, env_address):
    """runtime.num_cpus reaches ray.init's num_cpus (and the GPU share's count
    of clients at once): a process held to fewer cores than the machine's
    would otherwise get an actor for every core of the machine."""
    import flwr.simulation

    import simulation
    from regtopk_fl import gpu_share, ray_cluster

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: affinity, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr(ray_cluster, "_ray_cpu_count", lambda: ray_count)
    if env_address:
        monkeypatch.setenv("RAY_ADDRESS", env_address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = {}
    monkeypatch.setattr(flwr.simulation, "run_simulation",
                        lambda **kw: seen.update(kw["backend_config"]))
    cfg = make_cfg(["runtime=flower", "device=cpu", "num_workers=8",
                    f"runtime.num_cpus={setting}", f"runtime.ray_address={address or 'null'}"])
    simulation.run_simulation(cfg, None, None, None, None)
    assert seen["init_args"].get("num_cpus") == want
    assert ("address" in seen["init_args"]) == (address is not None)
    calls = []
    monkeypatch.setattr(gpu_share, "clients_at_once",
                        lambda n, m, cpus, per: calls.append(cpus) or 1)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    gpu_share.client_share(cfg, "cpu", measure=lambda *a, **k: None)
    assert calls == [want or 16]


def test_a_number_that_ray_address_overrides_is_said(make_cfg, monkeypatch, caplog):
    """An exported RAY_ADDRESS attaches ray.init to a cluster, so an explicit
    runtime.num_cpus cannot be passed: it is dropped with a warning, not silently."""
    from regtopk_fl.ray_cluster import ray_local_cpus

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with caplog.at_level("WARNING", logger="regtopk_fl.ray_cluster"):
        assert ray_local_cpus(make_cfg(["runtime=flower", "runtime.num_cpus=3"])) == {}
    assert "runtime.num_cpus=3 is not used: RAY_ADDRESS=10.0.0.1:6379" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="regtopk_fl.ray_cluster"):
        assert ray_local_cpus(make_cfg(["runtime=flower"])) == {}  # auto: nothing to say
    assert caplog.text == ""


@pytest.mark.parametrize("key", ["init_ray"])
def test_flwr_ray_backend_passes_init_args(key):
    """Guards the assumption above against a Flower upgrade."""
    import inspect

    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    src = inspect.getsource(getattr(RayBackend, key))
    assert "init_args_key" in src and "ray.init(" in src
