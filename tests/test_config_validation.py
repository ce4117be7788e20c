"""Fail fast: every bad setting stops the launcher before any work with one
line naming the key and the value, exit status 2, no traceback, and no run
directory left behind that looks like a run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_cfg
from regtopk_fl.settings import ConfigError, validate

BAD = [  # (overrides, key named in the message)
    (["sparsifier.sparsity=0"], "sparsifier.sparsity=0"),
    (["sparsifier.sparsity=1.5"], "sparsifier.sparsity=1.5"),
    (["sparsifier.sparsity=-0.1"], "sparsifier.sparsity=-0.1"),
    (["sparsifier.sparsity=abc"], "sparsifier.sparsity='abc'"),
    (["sparsifier=regtopk", "sparsifier.mu=0"], "sparsifier.mu=0"),
    (["sparsifier=regtopk", "sparsifier.mu=-2"], "sparsifier.mu=-2"),
    (["sparsifier=regtopk", "sparsifier.distortion=nope"], "sparsifier.distortion='nope'"),
    (["num_workers=0"], "num_workers=0"),
    (["num_workers=2.5"], "num_workers=2.5"),
    (["rounds=0"], "rounds=0"),
    (["lr=0"], "lr=0"),
    (["lr=-0.1"], "lr=-0.1"),
    (["momentum=1.0"], "momentum=1.0"),
    (["weight_decay=-1"], "weight_decay=-1"),
    (["local_steps=0"], "local_steps=0"),
    (["local_steps=2", "local_lr=0"], "local_lr=0"),
    (["eval_every=0"], "eval_every=0"),
    (["seed=-1"], "seed=-1"),
    (["faults.drop_prob=1.0"], "faults.drop_prob=1.0"),
    (["faults.nan_prob=2"], "faults.nan_prob=2"),
    (["checkpoint.every=-5"], "checkpoint.every=-5"),
    (["checkpoint.every=often"], "checkpoint.every='often'"),
    (["checkpoint.seconds=0"], "checkpoint.seconds=0"),
    (["device=tpu"], "device='tpu'"),
    (["deterministic=maybe"], "deterministic='maybe'"),
    (["tf32=yes"], "tf32='yes'"),
    (["runtime=flower", "runtime.prompt_delivery=3"], "runtime.prompt_delivery=3"),
    (["broadcast=models"], "broadcast='models'"),
    (["runtime=flower", "runtime.state_dir=''"], "runtime.state_dir=''"),
    (["network.uplink_mbps=0"], "network.uplink_mbps=0"),
    (["network.downlink_mbps=-1"], "network.downlink_mbps=-1"),
    (["network.latency_ms=-3"], "network.latency_ms=-3"),
    (["threads=0"], "threads=0"),
    (["task=toy", "num_workers=3"], "num_workers=3"),
    (["task=linreg", "task.dim=0"], "task.dim=0"),
    (["task=linreg", "task.sigma2=-1"], "task.sigma2=-1"),
    (["task=linreg", "task.size_ratio=0.5"], "task.size_ratio=0.5"),
    (["task=tiny_image", "task.batch_size=0"], "task.batch_size=0"),
    (["task=tiny_image", "task.batched=sometimes"], "task.batched='sometimes'"),
    (["task=tiny_image", "task.partition=weird"], "task.partition='weird'"),
    (["task=tiny_image", "task.partition=dirichlet", "task.alpha=0"], "task.alpha=0"),
    (["task=tiny_image", "num_workers=5000"], "num_workers=5000"),
    # download=false: the path alone (auto would ask the network: test_cifar_download_auto_*)
    (["task=cifar10", "task.data_path=/nonexistent/cifar.tar.gz", "task.download=false"],
     "task.data_path='/nonexistent/cifar.tar.gz'"),
    (["task=cifar10", f"task.data_path={__file__}", "task.download=sometimes"],
     "task.download='sometimes'"),
    (["task=cifar10", "task.stem=vgg"], "task.stem='vgg'"),
    # an existing data_path (validation only checks that it exists), so that the
    # case does not depend on the offline archive being there
    (["task=cifar10", f"task.data_path={__file__}", "task.subset_per_class=1", "num_workers=11"],
     "num_workers=11"),
    (["sparsifier=global_topk", "runtime=flower"], "sparsifier='global_topk'"),
    # the class sparsifier._target_ names runs; sparsifier.name is what the run records
    (["sparsifier=regtopk", "sparsifier.name=topk"], "sparsifier.name='topk'"),
    (["sparsifier=topk", "sparsifier._target_=regtopk_fl.compress.RegTopK"], "sparsifier.name='topk'"),
    (["runtime=flower", "runtime.client_gpus=2"], "runtime.client_gpus=2"),
    (["runtime=flower", "runtime.client_gpus=most"], "runtime.client_gpus='most'"),
    (["server.max_norm_ratio=0.5"], "server.max_norm_ratio=0.5"),
    (["server.max_norm_ratio=abc"], "server.max_norm_ratio='abc'"),
    (["server.max_upload_norm=0"], "server.max_upload_norm=0"),
    (["server.trust_num_examples=maybe"], "server.trust_num_examples='maybe'"),
    (["server.max_weight_share=0"], "server.max_weight_share=0"),
    (["server.max_weight_share=1.5"], "server.max_weight_share=1.5"),
    (["aggregate=trimmed_mean", "aggregate.trim_fraction=0.5"], "aggregate.trim_fraction=0.5"),
    (["aggregate=centered_clip", "aggregate.clip_ratio=0"], "aggregate.clip_ratio=0"),
    (["aggregate=centered_clip", "aggregate.iters=0"], "aggregate.iters=0"),
    (["aggregate.name=mode"], "aggregate.name='mode'"),
    (["aggregate._target_=regtopk_fl.compress.TopK"], "aggregate._target_='regtopk_fl.compress.TopK'"),
    (["server.node_keys=''"], "server.node_keys=''"),
    (["num_workers=4", "faults.hostile.worker=4"], "faults.hostile.worker=4"),
    (["faults.hostile.worker=1", "faults.hostile.attacks=3:fly"], "faults.hostile.attacks='3:fly'"),
    (["faults.hostile.worker=1", "faults.hostile.attacks=3:impersonate"],
     "faults.hostile.attacks='3:impersonate'"),
    (["sparsifier=dense", "faults.hostile.worker=1", "faults.hostile.attacks=3:dense_all"],
     "faults.hostile.attacks='3:dense_all'"),
    (["faults.hostile.scale=0"], "faults.hostile.scale=0"),
    (["faults.hostile.attacks=3:absent"], "faults.hostile.worker=-1"),
    (["participation.clients_per_round=0"], "participation.clients_per_round=0"),
    (["num_workers=10", "participation.clients_per_round=11"], "participation.clients_per_round=11"),
    (["participation.clients_per_round=2.5"], "participation.clients_per_round=2.5"),
    (["participation.fraction=0"], "participation.fraction=0"),
    (["participation.fraction=1.5"], "participation.fraction=1.5"),
    (["participation.clients_per_round=5", "participation.fraction=0.5"],
     "participation.fraction=0.5"),
    (["participation.weighted=maybe"], "participation.weighted='maybe'"),
    (["participation.stale_feedback=drop"], "participation.stale_feedback='drop'"),
    (["runtime=flower", "participation.stale_feedback=forget"],
     "participation.stale_feedback='forget'"),
    (["runtime=flower", "runtime.ray_address=nohost"], "runtime.ray_address='nohost'"),
    (["runtime=flower", "runtime.ray_address=ray://127.0.0.1:port"],
     "runtime.ray_address='ray://127.0.0.1:port'"),
    (["runtime=flower", "runtime.num_cpus=0"], "runtime.num_cpus=0"),
    (["runtime=flower", "runtime.num_cpus=many"], "runtime.num_cpus='many'"),
    (["runtime=flower", "runtime.num_cpus=2", "runtime.ray_address=auto"], "runtime.num_cpus=2"),
    (["runtime=flower", "runtime.num_cpus=1", "runtime.client_cpus=2"], "runtime.num_cpus=1"),
]


@pytest.mark.parametrize("overrides,named", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_setting_is_named(make_cfg, overrides, named):
    cfg = make_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(named + ":"), msg


def _offline(monkeypatch):
    from regtopk_fl.tasks import data as D

    monkeypatch.setattr(D, "download_blocker", lambda timeout=3.0: (
        "www.cs.toronto.edu unreachable (gaierror: [Errno -2] Name or service not known)"))


def test_cifar_download_auto_is_the_default_and_offline_names_both_ways_out(
        make_cfg, tmp_path, monkeypatch):
    """task.download=auto (#31): a missing data_path is fetched where the host
    answers; offline the run stops in one line naming both ways out. Never
    touches the network (the probe is replaced)."""
    from regtopk_fl.tasks import data as D

    missing = tmp_path / "nowhere.tar.gz"
    over = ["task=cifar10", f"task.data_path={missing}", f"task.cache_dir={tmp_path / 'cache'}"]
    cfg = make_cfg(over)
    assert cfg.task.download == "auto"
    _offline(monkeypatch)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"task.data_path='{missing}': does not exist")
    assert "offline" in msg and "cifar10-jpeg.tar.gz" in msg and "go online" in msg
    assert "task.download=auto" in msg
    # false names both ways out too
    with pytest.raises(ConfigError, match="task.download=auto or true"):
        validate(make_cfg([*over, "task.download=false"]))
    # true always tries (the loader says what failed)
    validate(make_cfg([*over, "task.download=true"]))
    # a copy fetched before, in the cache: fine offline
    (tmp_path / "cache" / "cifar-10-batches-py").mkdir(parents=True)
    validate(cfg)
    # online: the loader fetches it
    (tmp_path / "cache" / "cifar-10-batches-py").rmdir()
    monkeypatch.setattr(D, "download_blocker", lambda timeout=3.0: None)
    validate(cfg)
    # an existing data_path needs no network at all
    monkeypatch.setattr(D, "download_blocker", lambda timeout=3.0: 1 / 0)
    validate(make_cfg(["task=cifar10", f"task.data_path={__file__}"]))


def test_the_old_aggregate_keys_of_a_run_config_are_named():
    """A run config from before #17 (server.aggregate) fails in one line
    saying where the key went, instead of silently averaging."""
    from regtopk_fl.settings import from_run_config, to_run_config

    flat = to_run_config(compose_cfg(["runtime=flower"]))
    flat["server.aggregate"] = "median"
    with pytest.raises(ConfigError, match=r"^server.aggregate='median': moved to the config "
                       r"group aggregate"):
        validate(from_run_config(flat))


def test_default_and_presets_are_valid(make_cfg):
    for overrides in ([], ["experiment=fig1_toy"], ["experiment=fig2_linreg"],
                      ["experiment=fig3_cifar10_cpu", f"task.data_path={__file__}"],
                      ["experiment=gaussiank", f"task.data_path={__file__}"],
                      ["task=tiny_image", "num_workers=4"], ["runtime=flower"],
                      ["server.max_norm_ratio=null", "aggregate=median",
                       "server.trust_num_examples=true", "faults.hostile.worker=1",
                       "faults.hostile.attacks=3-4:absent 5:nan 6:over_budget 7-9:sign_flip"],
                      ["runtime=flower", "faults.hostile.worker=0",
                       "faults.hostile.attacks=2:nan 3:impersonate"],
                      ["experiment=sweep_participation"], ["experiment=sweep_participation_tiny"],
                      ["runtime=flower", "runtime.ray_address=auto",
                       "participation.fraction=0.5", "participation.weighted=true"],
                      ["runtime=flower", "runtime.ray_address=ray://127.0.0.1:10001"],
                      ["runtime=flower", "runtime.num_cpus=3"],
                      ["runtime=flower", "runtime.num_cpus=null"],
                      ["experiment=net_linreg"], ["broadcast=model", "network.uplink_mbps=1"]):
        validate(make_cfg(overrides))


def _launch(tmp_path, *args):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "regtopk_fl", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,named", [
    (["sparsifier.sparsity=1.5"], "sparsifier.sparsity=1.5"),
    (["sparsifier=regtopk", "sparsifier.mu=0"], "sparsifier.mu=0"),
    (["server.max_norm_ratio=0.5"], "server.max_norm_ratio=0.5"),
    (["task=cifar10", "task.data_path=/no/such/file", "task.download=false"],
     "task.data_path='/no/such/file'"),
    (["sparsifier=nosuch"], "sparsifier='nosuch'"),
    (["runtime=nosuch"], "runtime='nosuch'"),
    (["-m", "sparsifier=topk,nosuch"], "sparsifier='nosuch'"),
    (["aggregate=nosuch"], "aggregate='nosuch'"),
    (["server.aggregate=median"], "server.aggregate='median'"),  # moved to the group (#17)
])
def test_launcher_exits_2_in_one_line(tmp_path, args, named):
    run_dir = tmp_path / "run"
    proc = _launch(tmp_path, *args, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert named in lines[0] and "Traceback" not in proc.stderr
    assert not run_dir.exists() and not (tmp_path / "sweep").exists()


def test_bad_value_in_a_sweep_leaves_no_job_dir(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _launch(tmp_path, "-m", "task=toy", "num_workers=2", "rounds=1", "lr=-1",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2 and "lr=-1" in proc.stderr
    assert not any(Path(sweep).glob("*/metrics.csv")) if sweep.exists() else True
