"""Deployment Runtime (SuperLink + SuperNodes, `flwr run`): the run config
in pyproject.toml, the `flwr run` command builder, the Flower app bundle, the
ClientApp's restart / stale-feedback handling and the strategy's behaviour
when nodes go away -- all without a network. The loopback proof with real
processes (TLS, node authentication, 3 SuperNodes, a killed node, a killed
and resumed ServerApp) is
``make federation-test`` (scripts/federation_test.py); here it runs only when
REGTOPK_DEPLOY_TESTS=1: it takes ~8 minutes on 2 quiet cores (20 + 12 + 9 + 4
rounds at ~6 s per round, plus a ~60 s wait for the SuperLink to notice the
killed node), too long for `make test`.
"""
import os
import shlex
import subprocess
import sys
import zipfile

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.config import fuse_dicts, parse_config_args
from omegaconf import OmegaConf

from regtopk_fl import deploy
from regtopk_fl.paths import PROJECT_ROOT
from regtopk_fl.settings import EXTRA_KEY, from_run_config, to_run_config

REPO = PROJECT_ROOT


@pytest.fixture
def task_identity(monkeypatch):
    """Message() needs the process's task identity (Flower sets it in its processes)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 77)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


# -- pyproject.toml / flwr run --------------------------------------------------
def check_declared_run_config(declared: dict) -> None:
    """pyproject.toml's table against conf/: every key of the default config
    (runtime=flower) declared with its value, and output_dir and extra_keys;
    no key that conf/ no longer has; every other declared key holding the
    value of some choice (or preset) that has it. A key that only an option
    added since has need not be declared: it travels in extra_keys (#32)."""
    hint = ("pyproject.toml [tool.flwr.app.config] is out of date: "
            "python -m regtopk_fl.deploy pyproject --write")
    values = deploy.app_config_values()
    stale = sorted(set(declared) - set(values) - {"output_dir", EXTRA_KEY})
    assert not stale, f"{hint} (keys conf/ no longer has: {stale})"
    base = to_run_config(deploy.compose_config(["runtime=flower"]))
    for key, value in {**base, "output_dir": "", EXTRA_KEY: ""}.items():
        assert key in declared and deploy._same(declared[key], value), (hint, key)
    for key, value in declared.items():
        if key in values:
            assert any(deploy._same(value, v) for v in values[key]), (hint, key, value)


def test_pyproject_run_config_matches_conf():
    declared = deploy.pyproject_app_config()
    check_declared_run_config(declared)
    for key in ("task.name", "sparsifier.sparsity", "runtime.round_timeout_s", "output_dir",
                "num_workers", "rounds", EXTRA_KEY):
        assert key in declared
    # the generated table is the declared one, up to keys of options added since
    generated = deploy.app_config_defaults()
    assert {k: v for k, v in generated.items() if k in declared} == declared


def test_undeclared_option_keys_travel_in_extra_keys(make_cfg, tmp_path):
    """An option's own key that pyproject.toml does not declare (here
    sparsifier.budget_factor, left out of a copy of the table) travels in
    extra_keys, and the apps read it back; a key no option has is refused."""
    flat = {k: v for k, v in deploy.pyproject_app_config().items()
            if k != "sparsifier.budget_factor"}
    (tmp_path / "pyproject.toml").write_text(
        "[project]\nname = 'x'\n\n[tool.flwr.app]\npublisher = 'x'\n\n"
        + deploy.render_app_config(flat))
    cfg = make_cfg(["sparsifier=gaussiank", "sparsifier.budget_factor=4", "task=linreg"])
    cmd = deploy.flwr_run_command(cfg, "mylink", app=str(tmp_path), output_dir=tmp_path / "o")
    assert '"sparsifier.budget_factor": 4' in cmd and "extra_keys=" in cmd
    argv = shlex.split(cmd)
    fused = fuse_dicts(flat, parse_config_args([argv[argv.index("--run-config") + 1]]))
    got = from_run_config(fused)
    want = from_run_config(deploy.deploy_run_config(cfg, tmp_path / "o"))
    assert OmegaConf.to_container(got) == OmegaConf.to_container(want)
    assert got.sparsifier.budget_factor == 4 and EXTRA_KEY not in got
    with pytest.raises(ValueError, match="not declared"):  # no option has this one
        deploy.flwr_run_command(make_cfg(["+sparsifier.not_a_key=1"]), app=str(tmp_path))


def _fused(cmd: str) -> dict:
    """What the apps receive: pyproject defaults fused with the command's overrides."""
    argv = shlex.split(cmd)
    overrides = parse_config_args([argv[argv.index("--run-config") + 1]])
    return fuse_dicts(deploy.pyproject_app_config(), overrides)  # raises on undeclared keys


@pytest.mark.parametrize("overrides", [
    ["task=linreg", "num_workers=3", "sparsifier=regtopk", "sparsifier.sparsity=0.3", "rounds=20"],
    ["task=tiny_image", "sparsifier=topk", "num_workers=4", "task.samples=200", "lr=1"],
    ["experiment=fig1_toy", "sparsifier=dense", "runtime=flower", "runtime.round_timeout_s=30"],
])
@pytest.mark.parametrize("only_changed", [True, False])
def test_flwr_run_command_round_trips(make_cfg, overrides, only_changed, tmp_path):
    cfg = make_cfg(overrides)
    cmd = deploy.flwr_run_command(cfg, "mylink", output_dir=tmp_path / "out",
                                  only_changed=only_changed)
    assert cmd.startswith("flwr run . mylink --run-config ")
    got = from_run_config(_fused(cmd))
    want = from_run_config(deploy.deploy_run_config(cfg, tmp_path / "out"))
    assert OmegaConf.to_container(got) == OmegaConf.to_container(want)
    # the apps see the config's own keys (no keys of other task/sparsifier choices)
    assert set(got.task) == set(cfg.task) and set(got.sparsifier) == set(cfg.sparsifier)
    for key in ("num_workers", "rounds", "lr", "seed"):
        assert got[key] == cfg[key] and type(got[key]) is type(cfg[key])
    assert OmegaConf.to_container(got.task) == OmegaConf.to_container(cfg.task, resolve=True)
    assert got.runtime.name == "flower" and got.output_dir == str(tmp_path / "out")


def test_flwr_run_command_rejects_undeclared_keys(make_cfg):
    cfg = make_cfg(["+task.not_a_key=1"])
    with pytest.raises(ValueError, match="not declared"):
        deploy.flwr_run_command(cfg)


def test_from_run_config_is_inverse_for_real_configs(make_cfg):
    cfg = make_cfg(["task=tiny_image", "sparsifier=gaussiank"])
    flat = to_run_config(cfg)
    assert to_run_config(from_run_config(flat)) == flat


@pytest.mark.slow
def test_launcher_print_flwr_run(tmp_path):
    run_dir = tmp_path / "sweep" / "run"  # (the launcher also removes an emptied parent)
    r = subprocess.run([sys.executable, "-m", "regtopk_fl", "num_workers=3", "rounds=7",
                        "print_flwr_run=mylink", f"hydra.run.dir={run_dir}"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("flwr run . mylink --run-config ")
    assert "rounds=7" in line and "num_workers=3" in line and f'output_dir="{run_dir}"' in line
    assert not run_dir.exists()  # nothing ran


# -- the Flower app bundle ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec, inside flwr build
def test_fab_ships_the_apps_and_imports_from_its_copy(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    assert len(fab) < 1_000_000
    path = tmp_path / "app.fab"
    path.write_bytes(fab)
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "app")
    for must in ("pyproject.toml", "clients/client_app.py", "strategies/server_app.py",
                 "strategies/sparse_strategy.py", "regtopk_fl/settings.py",
                 "regtopk_fl/tasks/linreg.py", "conf/config.yaml", "conf/task/linreg.yaml"):
        assert must in names
    assert not any(n.startswith(("tests/", "results/", "docs/", ".venv/")) for n in names)
    # Flower's own loader, as flwr-serverapp / flwr-clientapp use it on the FAB copy
    code = (
        "import sys\n"
        "from flwr.supercore.object_ref import load_app\n"
        "sa = load_app('strategies.server_app:app', RuntimeError, project_dir=sys.argv[1])\n"
        "ca = load_app('clients.client_app:app', RuntimeError, project_dir=sys.argv[1])\n"
        "import clients, strategies, regtopk_fl.settings as s\n"
        "for m in (clients, strategies, s):\n"
        "    assert m.__file__.startswith(sys.argv[1]), m.__file__\n"
        "assert (s.CONF_DIR / 'task' / 'linreg.yaml').exists(), s.CONF_DIR\n"
        "print(type(sa).__name__, type(ca).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "app")], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ServerApp", "ClientApp"]


# -- ClientApp: node config, restarts, stale feedback -------------------------
def _linreg_cfg(make_cfg, **kw):
    over = ["task=linreg", "num_workers=3", "sparsifier=regtopk", "sparsifier.sparsity=0.3",
            "task.dim=40", "task.samples_per_worker=30", "runtime=flower", "device=cpu"]
    return make_cfg(over + [f"{k}={v}" for k, v in kw.items()])


class _Federation:
    """The ServerApp's strategy and N ClientApps wired together in-process,
    with hooks to restart a node (fresh Context) or lose its reply."""

    def __init__(self, cfg, node_config_extra=None):
        from regtopk_fl.fedround import Coordinator, FedServer
        from regtopk_fl.runner import build
        from strategies.sparse_strategy import SparseAggregation

        self.cfg = cfg
        self.run_config = to_run_config(cfg)
        task, _ = build(cfg)
        self.server = FedServer(task.init_params(), task.init_buffers(), lr=cfg.lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        coord = Coordinator(self.server, cfg.broadcast, verify=True)  # as run_server does
        coord.start(range(int(cfg.num_workers)))
        self.strategy = SparseAggregation(coord, cfg.num_workers, wait_for_nodes_s=0)
        self.n = int(cfg.num_workers)
        self.extra = node_config_extra or {}
        self.contexts = {100 + i: self.new_context(i) for i in range(self.n)}
        self.rows = []
        self.strategy.on_round = lambda _t, info: self.rows.append(info)

    def new_context(self, i):
        node_config = {"partition-id": i, "num-partitions": self.n, **self.extra.get(i, {})}
        return Context(run_id=77, node_id=100 + i, node_config=node_config, state=RecordDict(),
                       run_config=dict(self.run_config))

    def get_node_ids(self):
        return [n for n in self.contexts if n - 100 not in self.offline]

    offline = ()

    def send_and_receive(self, messages, timeout=None):
        """The strategy's queries (identify, restore) answered by the ClientApp's handlers."""
        from clients.client_app import handle_identify, handle_restore

        out = []
        for m in messages:
            kind = m.metadata.message_type.rsplit(".", 1)[-1]
            assert kind in ("identify", "restore"), m.metadata.message_type
            handler = handle_identify if kind == "identify" else handle_restore
            out.append(handler(m, self.contexts[m.metadata.dst_node_id]))
        return out

    def checkpoint(self, t):
        """What the server checkpoints after round t (strategy state + every memory)."""
        from clients.client_app import handle_checkpoint
        from protocol import wire

        memories = {}
        for node, ctx in self.contexts.items():
            ask = Message(RecordDict({}), dst_node_id=node, message_type="query.checkpoint")
            worker, memory = wire.read_memory(handle_checkpoint(ask, ctx).content)
            memories[worker] = memory
        return self.strategy.state_dict(memories)

    def resume(self, state, first_round):
        """A new ServerApp resumed from ``state`` (the nodes keep running)."""
        from regtopk_fl.fedround import Coordinator, FedServer
        from regtopk_fl.runner import build
        from strategies.sparse_strategy import SparseAggregation

        task, _ = build(self.cfg)
        self.server = FedServer(task.init_params(), task.init_buffers(), lr=self.cfg.lr)
        coord = Coordinator(self.server, self.cfg.broadcast, verify=True)
        coord.start(range(self.n))
        self.strategy = SparseAggregation(coord, self.n, wait_for_nodes_s=0,
                                          first_round=first_round)
        self.strategy.on_round = lambda _t, info: self.rows.append(info)
        self.strategy.load_state_dict(state)

    def round(self, t, restart=(), lose=(), offline=()):
        from clients.client_app import handle_train

        self.offline = tuple(offline)
        for i in restart:
            self.contexts[100 + i] = self.new_context(i)
        msgs = self.strategy.configure_train(t, ArrayRecord(), ConfigRecord(), self)
        replies, self.errors = [], {}
        for m in msgs:
            reply = handle_train(m, self.contexts[m.metadata.dst_node_id])
            if reply.has_error():
                self.errors[m.metadata.dst_node_id - 100] = reply.error
            if m.metadata.dst_node_id - 100 not in lose:
                replies.append(reply)
        self.strategy.aggregate_train(t, replies)
        return self.rows[-1]


def test_node_config_data_path_overrides_task_path(make_cfg):
    from clients.cache import apply_node_config

    cfg = make_cfg(["task=cifar10"])
    apply_node_config(cfg, {"data-path": "/node/data", "cache-dir": "/node/cache"})
    assert cfg.task.data_path == "/node/data" and cfg.task.cache_dir == "/node/cache"
    lin = make_cfg(["task=linreg"])
    apply_node_config(lin, {"data-path": "/node/data"})  # linreg has no data: ignored
    assert "data_path" not in lin.task


def test_client_builds_once_per_config(make_cfg):
    """A client's message of a known config reuses what it built (the key is
    the plain settings and the node's path overrides); another config builds
    its own."""
    from clients.cache import settings_and_build

    def ctx(node=None):
        return Context(run_id=1, node_id=1, node_config={"partition-id": 0, **(node or {})},
                       state=RecordDict(), run_config={})

    plain = lambda cfg: OmegaConf.to_container(cfg, resolve=True)  # noqa: E731
    one = plain(make_cfg(["task=linreg", "num_workers=3"]))
    first = settings_and_build(ctx(), one)
    assert settings_and_build(ctx(), plain(make_cfg(["task=linreg", "num_workers=3"]))) is first
    other = settings_and_build(ctx(), plain(make_cfg(["task=linreg", "num_workers=4"])))
    assert other is not first and other[1].num_workers == 4
    node = settings_and_build(ctx({"data-path": "/node/d"}), one)  # a node's own paths
    assert settings_and_build(ctx({"data-path": "/node/d"}), one) is node
    assert settings_and_build(ctx(), one) is not node


def test_state_file_mapping_is_kept_until_the_file_is_replaced(tmp_path):
    """A client keeps its mapping of a state file between messages (its
    pages stay mapped), and maps the file again once another process has
    replaced it (a new inode: what it holds is no longer the file)."""
    from clients import state_files

    base = tmp_path / "run-1-partition-0.pt"
    state_files.save(base, {"eps": torch.arange(1 << 16, dtype=torch.float32)}, {"r": 1})
    first = state_files.load(base)["eps"]
    again = state_files.load(base)["eps"]
    assert again.data_ptr() == first.data_ptr()
    first += 1  # shared: the file holds it, and the next load sees it
    assert float(state_files.load(base)["eps"][0]) == 1.0
    raw = tmp_path / "run-1-partition-0.pt.eps.raw"
    replaced = tmp_path / "replaced.raw"  # another actor writes a new file in its place
    torch.full((1 << 16,), 7.0).numpy().tofile(replaced)
    os.replace(replaced, raw)
    now = state_files.load(base)["eps"]
    assert now.data_ptr() != first.data_ptr() and float(now[5]) == 7.0


class FakeCudart:
    """cudaHostRegister / cudaHostUnregister as calls recorded (0: success)."""

    def __init__(self, code=0):
        self.code, self.calls = code, []

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size))
        return self.code

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


@pytest.fixture
def fresh_mappings(monkeypatch):
    from clients import state_files

    for name in ("_MAPPED", "_PINNED"):
        monkeypatch.setattr(state_files, name, {})
    monkeypatch.setattr(state_files, "_PIN_FAILED", [])
    return state_files


def test_gpu_client_pins_each_mapping_once_and_unpins_it_before_dropping(tmp_path, monkeypatch,
                                                                         fresh_mappings):
    """A GPU client's state files are registered with CUDA once per mapping
    (its copies are then direct DMA), and unregistered before the mapping
    goes: when another actor replaced the file, and when the state is removed."""
    state_files = fresh_mappings
    cudart = FakeCudart()
    monkeypatch.setattr(state_files, "_cudart", lambda: cudart)
    base = tmp_path / "run-1-partition-0.pt"
    state_files.save(base, {"eps": torch.arange(1 << 16, dtype=torch.float32)}, {"r": 1})
    first = state_files.load(base)["eps"]
    assert state_files.pin_mapped() == 1 and state_files.pin_mapped() == 1
    assert cudart.calls == [("register", first.data_ptr(), 4 << 16)]
    raw = tmp_path / "run-1-partition-0.pt.eps.raw"
    torch.full((1 << 16,), 7.0).numpy().tofile(tmp_path / "new.raw")
    os.replace(tmp_path / "new.raw", raw)
    now = state_files.load(base)["eps"]  # the old mapping is unregistered before it goes
    assert cudart.calls[1] == ("unregister", first.data_ptr()) and len(cudart.calls) == 2
    state_files.pin_mapped()
    assert cudart.calls[2] == ("register", now.data_ptr(), 4 << 16)
    state_files.remove(base)
    assert cudart.calls[3] == ("unregister", now.data_ptr()) and not state_files._PINNED


def test_a_refused_pin_leaves_the_state_pageable_and_is_not_retried(tmp_path, monkeypatch, caplog,
                                                                   fresh_mappings):
    state_files = fresh_mappings
    cudart = FakeCudart(code=2)  # e.g. cudaErrorMemoryAllocation
    monkeypatch.setattr(state_files, "_cudart", lambda: cudart)
    cleared = []  # CUDA's last error is reset, or the next kernel launch would raise it
    monkeypatch.setattr(state_files, "_clear_cuda_error", lambda: cleared.append(1) or True)
    base = tmp_path / "run-1-partition-0.pt"
    state_files.save(base, {"eps": torch.ones(1 << 16)}, {"r": 1})
    state_files.load(base)
    with caplog.at_level("WARNING"):
        assert state_files.pin_mapped() == 0
    assert "stay pageable" in caplog.text and "returned 2" in caplog.text
    state_files.save(tmp_path / "other.pt", {"eps": torch.ones(1 << 16)}, {"r": 1})
    state_files.load(tmp_path / "other.pt")
    assert state_files.pin_mapped() == 0 and len(cudart.calls) == 1  # not tried again
    assert cleared == [1]
    assert float(state_files.load(base)["eps"].sum()) == 1 << 16  # the state is intact


def test_message_settings_are_read_once_per_config(make_cfg):
    """What a client reads on every message comes from the config once, as
    plain values, and is dropped with the config."""
    import gc

    from clients import cache

    cfg = make_cfg(["task=linreg", "num_workers=3", "lr=0.5", "faults.drop_prob=0.25",
                    "runtime=flower", "runtime.state_dir=/dev/shm/x",
                    "+runtime.state_inplace=true"])
    got = cache.message_settings(cfg)
    assert cache.message_settings(cfg) is got
    assert got.opt == (0.5, 0.0, 0.0) and got.num_workers == 3 and got.state_inplace
    assert got.state_dir == "/dev/shm/x" and got.faults["drop_prob"] == 0.25
    assert isinstance(got.faults, dict)  # plain: no OmegaConf lookups per message
    key = id(cfg)
    del cfg
    gc.collect()
    assert key not in cache._PLAIN


def test_state_meta_packs_every_kind_it_holds_exactly():
    """The small part of a state file (clients/state_files.py pack/unpack):
    tensors of every dtype and shape come back bitwise, writable and in
    memory of their own; plain values and mapped-tensor records as they were."""
    from clients import state_files

    small = {"f32": torch.randn(3, 4), "f64": torch.randn(7, dtype=torch.float64),
             "i64": torch.arange(-5, 5), "i32": torch.tensor([1, 2], dtype=torch.int32),
             "bool": torch.tensor([True, False, True]), "bf16": torch.randn(5).bfloat16(),
             "scalar": torch.tensor(2.5), "empty": torch.zeros(0, dtype=torch.int64),
             "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
             "none": None, "round": 7, "lr": 0.01, "name": "x", "on": True,
             "big": ("mapped", (1, 100), "float32")}
    data = state_files.pack(small)
    back = state_files.unpack(data)
    assert back.keys() == small.keys()
    for key, value in small.items():
        if isinstance(value, torch.Tensor):
            got = back[key]
            assert got.dtype == value.dtype and got.shape == value.shape, key
            assert got.view(-1).view(torch.uint8).tolist() == \
                value.reshape(-1).view(torch.uint8).tolist(), key  # bitwise, NaN and -0.0 too
        else:
            assert back[key] == value, key
    with pytest.raises(TypeError, match="tags"):  # would come back as a list
        state_files.pack({"tags": (1, 2)})
    back["f64"][0] = 123.0  # its own memory: writable, and the bytes are not touched
    assert state_files.unpack(data)["f64"][0] == small["f64"][0]


def test_restarted_node_with_state_dir_resumes_exactly(make_cfg, task_identity, tmp_path):
    """Node 1 loses its Context (a killed + restarted SuperNode) before rounds
    3 and 5; with a state dir the run is bit-identical to the uninterrupted one."""
    cfg = _linreg_cfg(make_cfg)
    ref, fed = _Federation(cfg), _Federation(cfg, {1: {"state-dir": str(tmp_path / "s1")}})
    for t in range(1, 7):
        ref.round(t)
        fed.round(t, restart=(1,) if t in (3, 5) else ())
    assert torch.equal(ref.server.params, fed.server.params)
    assert (tmp_path / "s1" / "run-77-partition-1.pt").exists()
    assert not list((tmp_path / "s1").glob(".*tmp"))  # atomic writes leave no temp file


def _patch_cfg(make_cfg, **kw):
    """linreg with J = 400 and k = 8: a few rounds change far fewer than J entries."""
    return _linreg_cfg(make_cfg, **{"task.dim": 400, "sparsifier.sparsity": 0.02, **kw})


def test_restarted_node_is_patched_from_its_state_dir_replica(make_cfg, task_identity,
                                                              tmp_path):
    """Node 1's replies of rounds 4 and 5 are lost after it applied their
    messages (its replica, in its state dir, is then at round 4 while the
    server knows round 2), and it is restarted (fresh Context) before round 6:
    it gets a patch from round 2, not the model, which brings its round-4
    replica to the server's model (digest checked); bitwise the run without
    the restart."""
    cfg = _patch_cfg(make_cfg)
    ref, fed = _Federation(cfg), _Federation(cfg, {1: {"state-dir": str(tmp_path / "s1")}})
    for t in range(1, 9):
        lose = (1,) if t in (4, 5) else ()
        a = ref.round(t, lose=lose)
        b = fed.round(t, lose=lose, restart=(1,) if t == 6 else ())
        assert not fed.errors and not ref.errors
        assert b["plan"].kind_list == a["plan"].kind_list
    assert torch.equal(ref.server.params, fed.server.params)
    plans = [info["plan"] for info in fed.rows]
    assert plans[5].kind_list == ["delta", "patch", "delta"] and plans[5].base_list[1] == 2
    assert plans[5].resyncs == 0 and plans[5].coded[1] < 400 * 8  # far less than the model
    assert all(not any(info["outcome"].rejected.values()) for info in fed.rows)


def test_resumed_server_patches_nodes_from_the_replicas_they_claim(make_cfg, task_identity,
                                                                   tmp_path):
    """The ServerApp is killed after round 5's checkpoint and a new one
    resumes while the SuperNodes (with state dirs) keep their replicas.
    Each node says in its identify answer which replica it holds; the server
    checks that against its digest table: nodes 0 and 1 (round 4) get the
    round-5 gradient, node 2 (offline in round 5: round 3) a patch from round
    3, and node 1, whose state-dir replica was altered, the full model (a
    stale digest claim). The run ends bitwise the uninterrupted one's."""
    from clients.node_state import load_replica, save_replica

    dirs = {i: {"state-dir": str(tmp_path / f"s{i}")} for i in range(3)}
    cfg = _patch_cfg(make_cfg)
    ref, fed = _Federation(cfg, dirs), _Federation(cfg, {})
    fed.extra = {i: {"state-dir": str(tmp_path / f"f{i}")} for i in range(3)}
    fed.contexts = {100 + i: fed.new_context(i) for i in range(3)}
    for t in range(1, 6):
        ref.round(t, offline=(2,) if t == 5 else ())
        fed.round(t, offline=(2,) if t == 5 else ())
    state = fed.checkpoint(5)
    fed.resume(state, first_round=6)
    fed.contexts = {100 + i: fed.new_context(i) for i in range(3)}  # the nodes reconnect
    tampered = load_replica(fed.contexts[101], cfg)
    tampered.params[3] += 1.0
    save_replica(fed.contexts[101], tampered, cfg)
    for t in range(6, 9):
        a = ref.round(t)
        b = fed.round(t - 5)  # Flower counts from 1 again after a resume
        assert not fed.errors and not b["outcome"].rejected
    resumed = fed.rows[5]["plan"]
    assert resumed.kind_list == ["delta", "full", "patch"] and resumed.base_list[2] == 3
    assert ref.rows[5]["plan"].kind_list == ["delta", "delta", "patch"]
    assert resumed.coded[2] == ref.rows[5]["plan"].coded[2]  # as if never interrupted
    assert torch.equal(ref.server.params, fed.server.params)
    assert fed.rows[6]["plan"].kind_list == ["delta"] * 3


def test_fresh_node_ignores_feedback_instead_of_crashing(make_cfg, task_identity, caplog):
    """Without a state dir a restarted node has neither memory nor replica: it
    cannot apply round 2's gradient, so it answers REPLICA_STALE (no upload
    from a wrong model) and gets the full model next round (a resync), where
    the server's feedback about its last upload is ignored (logged)."""
    from protocol.wire import REPLICA_STALE

    cfg = _linreg_cfg(make_cfg)
    fed = _Federation(cfg)
    for t in (1, 2):
        fed.round(t)
    info = fed.round(3, restart=(2,))
    assert list(fed.errors) == [2] and fed.errors[2].code == REPLICA_STALE
    assert len(info["outcome"].accepted) == fed.n - 1 and info["missing"] == 1
    assert info["plan"].resyncs == 0
    with caplog.at_level("WARNING", logger="clients.client_app"):
        info = fed.round(4)
    assert "ignoring feedback" in caplog.text and not fed.errors
    assert info["plan"].resyncs == 1 and info["plan"].kind_list.count("full") == 1
    assert len(info["outcome"].accepted) == fed.n and info["missing"] == 0
    assert torch.isfinite(fed.server.params).all()


def test_lost_upload_goes_back_into_the_residual(make_cfg, task_identity, caplog):
    """Node 0's round-2 reply never reaches the server: next round the server's
    feedback is about round 1, so the client puts its round-2 upload back into
    the residual (as for a rejected upload): nothing of its gradient is lost."""
    from clients.node_state import load_memory
    from regtopk_fl.runner import build

    cfg = _linreg_cfg(make_cfg)
    fed = _Federation(cfg)
    task, _ = build(cfg)
    fed.round(1)
    ctx = fed.contexts[100]
    before = load_memory(ctx, task, "cpu").eps.clone()  # residual after round 1
    p2 = fed.server.params.clone()
    info = fed.round(2, lose=(0,))
    assert info["missing"] == 1 and len(info["outcome"].accepted) == 2
    p3 = fed.server.params.clone()
    with caplog.at_level("WARNING", logger="clients.client_app"):
        fed.round(3)
    assert "never received" in caplog.text
    mem = load_memory(ctx, task, "cpu")
    sent = torch.zeros(task.dim, dtype=mem.eps.dtype)
    sent[mem.prev_local] = mem.prev_sent
    g2 = task.local_update(p2, None, [0], 2, 1, cfg.lr).grad[0]
    g3 = task.local_update(p3, None, [0], 3, 1, cfg.lr).grad[0]
    # residual + what the server got in round 3 == residual after round 1 + both gradients
    torch.testing.assert_close(mem.eps[0] + sent, before[0] + g2 + g3, rtol=1e-5, atol=1e-6)


# -- strategy: nodes that go away ------------------------------------------------
class _Grid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def test_strategy_waits_for_all_nodes_only_before_round_one():
    import time

    from regtopk_fl.fedround import Coordinator, FedServer
    from strategies.sparse_strategy import SparseAggregation

    s = SparseAggregation(Coordinator(FedServer(torch.zeros(4))), 3, wait_for_nodes_s=0.5)
    t0 = time.monotonic()
    assert s._nodes(_Grid([1, 2])) == [1, 2] and time.monotonic() - t0 >= 0.5
    t0 = time.monotonic()
    assert s._nodes(_Grid([1, 2])) == [1, 2] and time.monotonic() - t0 < 0.3


def test_polling_grid_polls_fast_and_honours_timeout(task_identity):
    import time

    from strategies.polling_grid import PollingGrid

    class Fake:
        def __init__(self):
            self.pulls = 0

        def push_messages(self, msgs):
            self.msgs = list(msgs)
            return [f"id{i}" for i in range(len(self.msgs))]

        def pull_messages(self, ids):
            self.pulls += 1
            if self.pulls < 3:
                return []
            out = []
            for i in sorted(ids):
                ins = Message(RecordDict(), dst_node_id=5, message_type="train")
                ins.metadata.__dict__["_message_id"] = i
                if i != "id1" or self.pulls >= 5:
                    out.append(Message(RecordDict(), reply_to=ins))
            return out

    fake = Fake()
    grid = PollingGrid(fake, poll_s=0.05)
    t0 = time.monotonic()
    got = grid.send_and_receive([object(), object()], timeout=10)
    assert len(got) == 2 and time.monotonic() - t0 < 1.0
    fake2 = Fake()
    fake2.pull_messages = lambda ids: []
    t0 = time.monotonic()
    assert list(PollingGrid(fake2, 0.05).send_and_receive([object()], timeout=0.3)) == []
    assert 0.25 < time.monotonic() - t0 < 1.5


# -- the loopback proof with real processes (slow: opt-in) ------------------------
@pytest.mark.deploy
@pytest.mark.skipif(os.environ.get("REGTOPK_DEPLOY_TESTS") != "1",
                    reason="real SuperLink/SuperNodes on 127.0.0.1, ~8 min: "
                           "REGTOPK_DEPLOY_TESTS=1 or make federation-test")
def test_federation_on_loopback():
    sys.path.insert(0, str(REPO / "scripts"))
    import federation_test

    assert federation_test.main([]) == 0


def test_simulation_state_dir_keeps_tensors_out_of_the_context(make_cfg, task_identity, tmp_path):
    """runtime.state_dir (what the launcher's simulation sets to a per-run
    /dev/shm directory): memory and replica live in files, context.state
    keeps only the round tags, and the run is bitwise the one that keeps
    everything in context.state."""
    from clients.node_state import MEMORY_KEY, META_KEY, REPLICA_KEY, REPLICA_META_KEY

    plain = _Federation(_linreg_cfg(make_cfg, momentum=0.5))
    files = _Federation(_linreg_cfg(make_cfg, momentum=0.5, **{"runtime.state_dir": tmp_path}))
    for t in (1, 2, 3):
        plain.round(t)
        files.round(t)
        for i in range(3):
            assert set(files.contexts[100 + i].state.keys()) == {META_KEY, REPLICA_META_KEY}
            assert {MEMORY_KEY, REPLICA_KEY} <= set(plain.contexts[100 + i].state.keys())
    assert torch.equal(files.server.params, plain.server.params)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"run-77-partition-{i}{w}.pt" for i in range(3) for w in ("", "-replica"))


def test_a_new_tensor_of_the_same_size_is_written_where_the_file_lies(tmp_path,
                                                                     fresh_mappings):
    """A replica that is not the mapping (a resync's model) goes into the
    file of the same size in place: no new file whose pages fault in again
    (#34); every process's mapping sees it; another size is a new file."""
    sf = fresh_mappings
    base = tmp_path / "run-1-partition-0-replica.pt"
    sf.save(base, {"params": torch.zeros(1 << 16)}, {"round": 1})
    raw = tmp_path / "run-1-partition-0-replica.pt.params.raw"
    inode = os.stat(raw).st_ino
    held = sf.load(base)["params"]
    new = torch.arange(1 << 16, dtype=torch.float32)
    sf.save(base, {"params": new}, {"round": 2})
    assert os.stat(raw).st_ino == inode
    assert torch.equal(held, new)  # this process's mapping: the file itself
    sf._MAPPED.clear()  # another actor, which never mapped it
    other = sf.load(base)
    assert torch.equal(other["params"], new) and other["round"] == 2
    assert other["params"].data_ptr() != held.data_ptr()
    sf.save(base, {"params": torch.ones(1 << 17)}, {"round": 3})  # never resized in place
    assert os.stat(raw).st_ino != inode
    assert torch.equal(sf.load(base)["params"], torch.ones(1 << 17))
    assert torch.equal(held, new)  # the old mapping was left as it was


def test_inplace_state_files_update_where_they_lie(make_cfg, task_identity, tmp_path,
                                                    monkeypatch):
    """The launcher's simulation (runtime.state_inplace): the residual and the
    replica's parameters and momentum are shared mappings of raw files that a
    round updates in place; the run is bitwise the one that keeps everything
    in context.state, and a restarted node without them is resynced."""
    from clients import state_files

    monkeypatch.setattr(state_files, "BIG", 40)  # J = 40 here: map the J-sized tensors
    over = {"momentum": 0.5, "runtime.state_dir": tmp_path, "+runtime.state_inplace": "true"}
    plain = _Federation(_linreg_cfg(make_cfg, momentum=0.5))
    files = _Federation(_linreg_cfg(make_cfg, **over))
    for t in (1, 2, 3, 4):
        before = files.server.params.clone()  # model_{t-1}, what round t computes on
        plain.round(t)
        files.round(t)
        assert not files.errors
    assert torch.equal(files.server.params, plain.server.params)
    raws = sorted(p.name for p in tmp_path.glob("*.raw"))
    assert raws == sorted([f"run-77-partition-{i}.pt.eps.raw" for i in range(3)]
                          + [f"run-77-partition-{i}-replica.pt.{k}.raw"
                             for i in range(3) for k in ("params", "momentum")])
    # the mapped replica is the model round 4 was computed on, bit for bit
    rep = state_files.load(tmp_path / "run-77-partition-1-replica.pt")
    assert torch.equal(rep["params"], before) and rep["round"] == 3
    state_files.remove(tmp_path / "run-77-partition-1-replica.pt")  # a node that lost it
    info = files.round(5)
    plain.round(5)
    assert list(files.errors) == [1] and info["missing"] == 1
    info = files.round(6)
    plain.round(6)
    assert not files.errors and info["plan"].resyncs == 1
