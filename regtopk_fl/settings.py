"""One settings schema for every entry point (Hydra launcher, Flower apps
under ``flwr run``): validation before any work, and the flat run-config form.

``validate(cfg)`` raises :class:`ConfigError` with one line naming the key,
the value and what is allowed; the launcher prints it and exits with 2.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from . import checks
from .paths import CONF_DIR


def config_groups() -> tuple:
    """The config groups: the folders of conf/ (task, sparsifier, runtime, ...)."""
    return tuple(sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()))


def group_options(group: str) -> tuple:
    """The choices of a config group: the names of its conf/<group>/*.yaml."""
    return tuple(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


def uses_mu(sparsifier: str) -> bool:
    """Whether a sparsifier is regularised by mu (its class's ``uses_mu``)."""
    from .compress import SPARSIFIERS

    cls = SPARSIFIERS.get(sparsifier)
    return cls is not None and cls.uses_mu


def option_class(cfg, group: str, base: type):
    """The class a config group's ``_target_`` names (``sparsifier``,
    ``task``), which checks its own keys; it must be a ``base``."""
    from hydra.utils import get_class

    target = _get(cfg, f"{group}._target_")
    try:
        cls = get_class(target)
    except Exception:  # noqa: BLE001 - Hydra's errors: name the target
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        _fail(f"{group}._target_", target, f"must name a {base.__module__}.{base.__name__} "
              f"(conf/{group}/*.yaml)")
    return cls


# the one-line checks (regtopk_fl/checks.py), shared with the config groups' classes
ConfigError = checks.ConfigError
_get, _fail, _num, _choice, _bool = checks.get, checks.fail, checks.num, checks.choice, \
    checks.boolean


def sparsifier_class(cfg):
    """The run's sparsifier class (a :class:`regtopk_fl.compress.Sparsifier`)."""
    from .compress import Sparsifier

    return option_class(cfg, "sparsifier", Sparsifier)


def task_class(cfg):
    """The run's task class (a :class:`regtopk_fl.tasks.Task`)."""
    from .tasks import Task

    return option_class(cfg, "task", Task)


def validate_trust(cfg, n: int, runtime: str) -> None:
    """The ``server:`` block (regtopk_fl/trust.py), the ``aggregate`` group
    (regtopk_fl/aggregate/) and ``faults.hostile``."""
    from .hostile import BOTH_RUNTIMES, BUDGET_ATTACKS, parse

    _num(cfg, "server.max_norm_ratio", 1, required=False,
         allowed="must be null (off) or a number >= 1")
    _num(cfg, "server.max_upload_norm", 0, lo_open=True, required=False,
         allowed="must be null (off) or a number > 0")
    _bool(cfg, "server.trust_num_examples")
    _num(cfg, "server.max_weight_share", 0, 1, lo_open=True, required=False,
         allowed="must be in (0, 1]")
    if _get(cfg, "server.weighting") is not None:
        from .trust import WEIGHTINGS

        _choice(cfg, "server.weighting", WEIGHTINGS)
    for old in ("aggregate", "trim_fraction"):  # moved to the config group (#17)
        if _get(cfg, f"server.{old}") is not None:
            _fail(f"server.{old}", _get(cfg, f"server.{old}"), "moved to the config group "
                  "aggregate: aggregate=NAME on the command line (aggregate.name and "
                  "aggregate.trim_fraction in a run config)")
    _aggregate(cfg)
    keys = _get(cfg, "server.node_keys")
    if keys is not None and (not isinstance(keys, str) or not keys.strip()):
        _fail("server.node_keys", keys, "must be null or the path of a PARTITION PUBLIC-KEY file")
    who = _num(cfg, "faults.hostile.worker", -1, n - 1, integer=True, required=False,
               allowed=f"must be -1 (nobody) or a partition id in 0..{n - 1}")
    _num(cfg, "faults.hostile.scale", 0, lo_open=True, required=False,
         allowed="must be a finite number > 0")
    spec = _get(cfg, "faults.hostile.attacks")
    if spec is not None:
        try:
            plan = parse(spec)
        except ValueError as exc:
            _fail("faults.hostile.attacks", spec, str(exc))
        flower_only = sorted({a for a in plan.values() if a not in BOTH_RUNTIMES})
        if flower_only and runtime != "flower":
            _fail("faults.hostile.attacks", spec, f"{flower_only[0]} tampers with a Flower "
                  "message: use runtime=flower (runtime=inprocess knows "
                  f"{', '.join(BOTH_RUNTIMES)})")
        budgeted = sorted({a for a in plan.values() if a in BUDGET_ATTACKS})
        if budgeted and not sparsifier_class(cfg).has_budget:
            _fail("faults.hostile.attacks", spec, f"{budgeted[0]}: a "
                  f"{_get(cfg, 'sparsifier.name')} run has no upload budget to exceed")
        if plan and (who is None or who < 0):
            _fail("faults.hostile.worker", who, "must name the partition that makes the attacks")


def _aggregate(cfg) -> None:
    """The aggregation rule: a choice of conf/aggregate/, its parameters
    checked by its own class (regtopk_fl/aggregate/)."""
    from .aggregate import AggregateError, from_cfg

    if _get(cfg, "aggregate") is None:
        return  # the paper's mean
    _choice(cfg, "aggregate.name", group_options("aggregate"))
    try:
        from_cfg(cfg)
    except AggregateError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - Hydra's instantiate errors: name the target
        _fail("aggregate._target_", _get(cfg, "aggregate._target_"),
              f"cannot be instantiated ({str(exc).splitlines()[0] if str(exc) else exc})")


def validate(cfg: DictConfig) -> None:
    """Check every user-settable key; raise ConfigError on the first bad one."""
    from .broadcast import MODES
    from .participation import STALE_POLICIES

    _choice(cfg, "task.name", group_options("task"))
    _choice(cfg, "sparsifier.name", group_options("sparsifier"))
    runtime = _choice(cfg, "runtime.name", group_options("runtime"))
    sparsifier = sparsifier_class(cfg)
    name = _get(cfg, "sparsifier.name")
    if sparsifier.name != name:  # the class runs; the name is what the run records
        _fail("sparsifier.name", name, f"must be the name of the class sparsifier._target_ "
              f"names ({_get(cfg, 'sparsifier._target_')} is {sparsifier.name!r})")
    sparsifier.check_settings(cfg, runtime)  # its own keys (compress/base.py)
    n = _num(cfg, "num_workers", 1, integer=True, allowed="must be an integer >= 1")
    tn = _get(cfg, "task.num_workers")  # ${num_workers} under Hydra; a run config sets both
    if tn is not None and tn != n:
        _fail("task.num_workers", tn, f"must equal num_workers={n} (set both)")
    _num(cfg, "rounds", 1, integer=True, allowed="must be an integer >= 1")
    _num(cfg, "lr", 0, lo_open=True, allowed="must be a finite number > 0")
    _num(cfg, "momentum", 0, 1, hi_open=True, allowed="must be in [0, 1)")
    _num(cfg, "weight_decay", 0, allowed="must be >= 0")
    _num(cfg, "seed", 0, integer=True, allowed="must be an integer >= 0")
    _num(cfg, "eval_every", 1, integer=True, allowed="must be an integer >= 1")
    steps = _num(cfg, "local_steps", 1, integer=True, allowed="must be an integer >= 1")
    if steps > 1:
        _num(cfg, "local_lr", 0, lo_open=True, allowed="must be a finite number > 0")
    if _get(cfg, "upload") is not None:
        from .tasks.base import UPLOADS

        _choice(cfg, "upload", UPLOADS)
    _num(cfg, "faults.drop_prob", 0, 1, hi_open=True, allowed="must be in [0, 1)")
    _num(cfg, "faults.nan_prob", 0, 1, allowed="must be in [0, 1]")
    _missing(cfg, n, runtime)
    if _get(cfg, "checkpoint.every") != "auto":
        _num(cfg, "checkpoint.every", 0, integer=True,
             allowed="must be auto or an integer >= 0 (0 = off)")
    _num(cfg, "checkpoint.seconds", 0, lo_open=True, allowed="must be a finite number > 0")
    validate_trust(cfg, n, runtime)
    _choice(cfg, "device", ("auto", "cpu", "cuda"))
    _bool(cfg, "deterministic")
    _bool(cfg, "tf32")
    _choice(cfg, "broadcast", MODES)
    for key in ("network.uplink_mbps", "network.downlink_mbps"):
        _num(cfg, key, 0, lo_open=True, required=False, allowed="must be null or a number > 0")
    _num(cfg, "network.latency_ms", 0, required=False, allowed="must be null or a number >= 0")
    _num(cfg, "threads", 1, integer=True, required=False, allowed="must be null or an integer >= 1")
    _num(cfg, "observe.every", 0, integer=True, required=False, allowed="must be an integer >= 0")
    _participation(cfg, n, runtime, STALE_POLICIES)
    _tracker(cfg)
    if _get(cfg, "device") == "cuda":
        import torch
        if not torch.cuda.is_available():
            _fail("device", "cuda", "no CUDA device is available here (use auto or cpu)")
    if runtime == "flower":
        _num(cfg, "runtime.client_cpus", 0, lo_open=True, allowed="must be > 0")
        _ray_num_cpus(cfg)
        if _get(cfg, "runtime.client_gpus") != "auto":
            _num(cfg, "runtime.client_gpus", 0, 1, allowed="must be auto or a number in [0, 1]")
        _num(cfg, "runtime.round_timeout_s", 0, lo_open=True, required=False,
             allowed="must be > 0")
        _num(cfg, "runtime.wait_for_nodes_s", 0, required=False, allowed="must be >= 0")
        _num(cfg, "runtime.poll_interval_s", 0, lo_open=True, required=False,
             allowed="must be > 0")
        _bool(cfg, "runtime.prompt_delivery", default=True)
        sd = _get(cfg, "runtime.state_dir")
        if sd is not None and (not isinstance(sd, str) or not sd.strip()):
            _fail("runtime.state_dir", sd, "must be auto, null or a directory path")
        _ray_address(cfg)
    task_class(cfg).check_settings(cfg, n, runtime)  # its own keys (tasks/base.py)


def _missing(cfg, n: int, runtime: str) -> None:
    """faults.missing: a readable ROUND WORKER [absent|offline|lost] file, in-process
    only (a deployed run's twin, regtopk_fl/faults.py)."""
    from .faults import parse_missing

    path = _get(cfg, "faults.missing")
    if path is None:
        return
    if not isinstance(path, str) or not path.strip():
        _fail("faults.missing", path, "must be null or the path of a ROUND WORKER "
              "[absent|offline|lost] file")
    if runtime != "inprocess":
        _fail("faults.missing", path, "replays a deployed run's missing workers in its twin: "
              "runtime=inprocess only")
    try:
        text = open(path).read()
    except OSError as exc:
        _fail("faults.missing", path, f"cannot be read ({exc.strerror})")
    try:
        sched = parse_missing(text)
    except ValueError as exc:
        _fail("faults.missing", path, str(exc))
    for (r, w), _ in sched.items():
        if not 0 <= w < n:
            _fail("faults.missing", path, f"round {r}: worker {w} is not in 0..{n - 1}")
        if r < 1:
            _fail("faults.missing", path, f"round {r}: rounds count from 1")


def _participation(cfg, n: int, runtime: str, policies) -> None:
    """participation.*: at most one of clients_per_round / fraction."""
    m = _num(cfg, "participation.clients_per_round", 1, n, integer=True, required=False,
             allowed=f"must be null or an integer in [1, num_workers={n}]")
    f = _num(cfg, "participation.fraction", 0, 1, lo_open=True, required=False,
             allowed="must be null or in (0, 1]")
    if m is not None and f is not None:
        _fail("participation.fraction", f, "set participation.clients_per_round or "
              "participation.fraction, not both")
    w = _get(cfg, "participation.weighted", False)
    if not isinstance(w, bool):
        _fail("participation.weighted", w, "must be true or false")
    policy = _get(cfg, "participation.stale_feedback", "keep")
    if policy not in policies:
        _fail("participation.stale_feedback", policy, f"must be one of {', '.join(policies)}")
    if policy == "forget" and runtime != "inprocess":
        _fail("participation.stale_feedback", policy, "forget is an in-process ablation: "
              "use runtime=inprocess")


def _tracker(cfg) -> None:
    """tracker: a conf/tracker/ choice, only the keys its class takes, their
    values (the class's ``check``), and its packages installed (else: which
    pyproject extra installs them). Settings without ``tracker`` (an older
    ``flwr run`` config) write the csv files only."""
    import importlib.util
    import inspect

    from hydra.utils import get_class

    node = _get(cfg, "tracker")
    if node is None:
        return
    name = _choice(cfg, "tracker.name", group_options("tracker"))
    target = _get(cfg, "tracker._target_")
    try:
        cls = get_class(target)
    except Exception:
        _fail("tracker._target_", target, "must name a sink class (conf/tracker/*.yaml)")
    opts = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
            if k != "_target_"}
    takes = set(inspect.signature(cls).parameters)
    for key in sorted(set(opts) - takes):
        _fail(f"tracker.{key}", opts[key], f"tracker={name} has no such key; its keys: "
              f"{', '.join(sorted(takes))}")
    for key, why in getattr(cls, "check", lambda o: ())(opts):
        _fail(f"tracker.{key}", opts.get(key), why)
    for module in getattr(cls, "requires", ()):
        if importlib.util.find_spec(module) is None:
            _fail("tracker", name, f"needs the {module} package, not installed here: "
                  f"pip install -e '.[{cls.extra}]' (or pip install 'regtopk-fl[{cls.extra}]')")


def _ray_address(cfg) -> None:
    """runtime.ray_address: null, ``auto``, ``host:port`` or ``ray://host:port``."""
    v = _get(cfg, "runtime.ray_address")
    if v is None or v == "auto":
        return
    hostport = v[len("ray://"):] if isinstance(v, str) and v.startswith("ray://") else v
    host, _, port = hostport.rpartition(":") if isinstance(hostport, str) else ("", "", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        _fail("runtime.ray_address", v, "must be null, auto, host:port (a running Ray "
              "cluster's GCS) or ray://host:port (Ray Client)")


def _ray_num_cpus(cfg) -> None:
    """runtime.num_cpus: auto, null or an integer >= client_cpus; only for a local Ray."""
    v = _get(cfg, "runtime.num_cpus")
    if v is None or v == "auto":
        return
    _num(cfg, "runtime.num_cpus", 1, integer=True,
         allowed="must be auto, null or an integer >= 1")
    if _get(cfg, "runtime.ray_address") not in (None, ""):
        _fail("runtime.num_cpus", v, "must be auto or null with runtime.ray_address (a "
              "cluster's nodes declare their own CPUs)")
    cpus = _get(cfg, "runtime.client_cpus")
    if isinstance(cpus, (int, float)) and v < cpus:
        _fail("runtime.num_cpus", v, f"must be >= runtime.client_cpus ({cpus}): no client "
              "could start")


# -- the flat form used as Flower's run config ---------------------------------
RUN_KEYS = ("task", "sparsifier", "aggregate", "runtime", "faults", "checkpoint", "server",
            "broadcast", "network", "participation", "num_workers", "rounds", "lr", "momentum",
            "weight_decay", "seed", "eval_every", "local_steps", "local_lr", "upload", "device",
            "deterministic", "experiment", "observe", "threads", "progress", "output_dir",
            "tracker")


def to_run_config(cfg: DictConfig) -> dict:
    """Flatten the resolved settings to Flower run-config pairs ("a.b" -> scalar).
    None becomes "" (run config values must be int, float, str or bool)."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, (list, tuple)):
            flat[prefix] = ",".join(str(x) for x in node)
        else:
            flat[prefix] = "" if node is None else node

    for key in RUN_KEYS:
        if key in tree:
            walk(key, tree[key])
    return flat


# The one run-config key that carries the others pyproject.toml does not declare
# (a JSON object of flat pairs): a config group option added after pyproject.toml
# was written (conf/<group>/<name>.yaml with keys of its own) runs under
# `flwr run` without regenerating the table (deploy.flwr_run_command fills it).
EXTRA_KEY = "extra_keys"


def from_run_config(run_config: dict) -> DictConfig:
    """Inverse of :func:`to_run_config` ("" -> None).

    A Flower run config holds every key the app declares in pyproject.toml
    ([tool.flwr.app.config]: the union over all task/sparsifier/runtime
    choices), so keys that belong only to *other* choices of a group (e.g.
    ``task.dim`` of linreg in a cifar10 run) are dropped here. The keys that
    travel in :data:`EXTRA_KEY` (undeclared ones) are unpacked first."""
    import json

    run_config = dict(run_config)
    extra = run_config.pop(EXTRA_KEY, "")
    if extra:
        try:
            carried = json.loads(extra)
        except ValueError:
            carried = None
        if not isinstance(carried, dict):
            _fail(EXTRA_KEY, extra, "must be a JSON object of run-config keys")
        for key, value in carried.items():
            run_config.setdefault(key, value)  # a declared key keeps its own value
    tree: dict = {}
    for key, value in run_config.items():
        node = tree
        parts = str(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = None if value == "" else value
    _drop_foreign_keys(tree)
    return OmegaConf.create(tree)


GROUP_KEYS = tuple(g for g in config_groups() if g != "experiment")  # groups of options


def group_option_keys(group: str) -> dict:
    """{option name: set of its keys} for one config group under conf/."""
    out = {}
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        out[path.stem] = set(OmegaConf.load(path).keys()) - {"defaults"}
    return out


def _drop_foreign_keys(tree: dict) -> None:
    for group in GROUP_KEYS:
        node = tree.get(group)
        if not isinstance(node, dict) or not (CONF_DIR / group).is_dir():
            continue
        options = group_option_keys(group)
        own = options.get(node.get("name"))
        if own is None:  # an option we do not know: leave it to validate()
            continue
        foreign = set().union(*options.values()) - own
        for key in foreign & set(node):
            del node[key]
