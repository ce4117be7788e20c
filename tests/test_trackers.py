"""The ``tracker`` group: the run directory's own files stay as they were
(byte for byte), and the TensorBoard and MLflow sinks hold what metrics.csv
holds, read back with their own readers (EventAccumulator, MlflowClient),
also after a kill and resume and in a sweep; bad tracker settings stop the
launcher in one line with exit status 2."""
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from regtopk_fl.results import COLUMNS, RunRecorder
from regtopk_fl.runner import run_experiment
from regtopk_fl.settings import ConfigError, validate
from regtopk_fl.trackers import flat_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from kill_resume import launch  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "recorder_golden"
LINREG = ["task=linreg", "num_workers=4", "rounds=12", "threads=1", "sparsifier=regtopk",
          "sparsifier.sparsity=0.3", "network.uplink_mbps=1", "faults.drop_prob=0.2"]

# rows with every kind of cell: floats that need repr, 1e-12, inf, NaN and
# None (empty cells), ints past 2**32; the golden files are what the
# RunRecorder of 5441123 (before trackers) wrote for them, with the one column
# that came after it (#16's `patches`, after `resyncs`; its total in summary.json)
ROWS = [
    {"round": 0, "loss": 548.6312345678901, "gap": 3.6441234567890123, "accuracy": None,
     "test_loss": None, "uplink_bytes": 0, "uplink_coded_bytes": 0, "downlink_bytes": 0,
     "downlink_coded_bytes": 0, "resyncs": 0, "patches": 0, "sent": 0, "sampled": None,
     "replies": 0,
     "missing": 0, "rejected": 0, "comm_s": None, "wall_s": 0.012345678901234},
    {"round": 1, "loss": 0.1 + 0.2, "gap": 1e-12, "accuracy": float("nan"), "test_loss": 2.5,
     "uplink_bytes": 8000, "uplink_coded_bytes": 5123, "downlink_bytes": 16000,
     "downlink_coded_bytes": 9001, "resyncs": 20, "patches": 3, "sent": 20, "sampled": 20, "replies": 19,
     "missing": 1, "rejected": 2, "comm_s": 0.0123, "wall_s": 0.5},
    {"round": 2, "loss": float("inf"), "gap": 3.2e-12, "accuracy": 0.8125, "test_loss": 1e300,
     "uplink_bytes": 2**40, "uplink_coded_bytes": 12, "downlink_bytes": 7,
     "downlink_coded_bytes": None, "resyncs": None, "patches": None, "sent": 3, "sampled": 4, "replies": 4,
     "missing": 0, "rejected": 0, "comm_s": 1.5, "wall_s": 1.25},
]
IDENTITY = {"experiment": None, "task": "linreg", "runtime": "inprocess", "sparsifier": "regtopk",
            "sparsity": 0.01, "mu": 1.0, "distortion": "reference", "num_workers": 20,
            "rounds": 2, "seed": 0, "lr": 0.01, "local_steps": 1, "config_sha256": "ab" * 32}


def _csv(run_dir):
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _columns(rows):
    """{column: {round: value}} of metrics.csv's non-empty numeric cells (round aside)."""
    return {c: {int(r["round"]): float(r[c]) for r in rows if r[c] != ""}
            for c in COLUMNS[1:] if any(r[c] != "" for r in rows)}


def _cli(cwd, *args, extra_env=None, python_code=None):
    env = dict(os.environ, HYDRA_FULL_ERROR="0", **(extra_env or {}))
    cmd = [sys.executable, "-c", python_code, *args] if python_code else [
        sys.executable, "-m", "regtopk_fl", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# -- csv: today's files, unchanged ---------------------------------------------
def test_csv_files_are_byte_for_byte_the_old_recorders(tmp_path):
    rec = RunRecorder(tmp_path, IDENTITY)
    rec.elapsed = lambda: 12.5
    rec.extras.append(lambda: {"max_norm_ratio": 3.25})
    for row in ROWS:
        rec.add(row)
    summary = rec.close("finished")
    for name in ("metrics.csv", "summary.json"):
        assert (tmp_path / name).read_bytes() == (GOLDEN / name).read_bytes(), name
    assert summary == json.loads((GOLDEN / "summary.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "summary.json"]


def test_default_tracker_is_csv_and_adds_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = _cli(tmp_path, *LINREG, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix != ".log") == [
        ".hydra", "metrics.csv", "model.pt", "summary.json"]
    assert (run_dir / "metrics.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    assert [int(r["round"]) for r in _csv(run_dir)] == list(range(13))
    assert "tracker:\n  _target_: regtopk_fl.results.CsvFiles\n  name: csv" in (
        run_dir / ".hydra" / "config.yaml").read_text()


def test_the_tracker_does_not_change_the_fingerprint(make_cfg):
    """Changing the tracker keeps a run's identity: its checkpoint resumes,
    and run directories written before the tracker group still match."""
    from omegaconf import open_dict

    from regtopk_fl.checkpoint import config_fingerprint

    cfg = make_cfg(LINREG)
    base = config_fingerprint(cfg)
    assert config_fingerprint(make_cfg([*LINREG, "tracker=tensorboard"])) == base
    with open_dict(cfg):
        del cfg["tracker"]
    assert config_fingerprint(cfg) == base
    assert config_fingerprint(make_cfg([*LINREG[:-1]])) != base


# -- tensorboard ----------------------------------------------------------------
def _tb(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    assert len(list(Path(tb_dir).glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
               for tag in acc.Tags()["scalars"]}
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = content.get(metadata.SESSION_END_INFO_TAG)  # none while the run goes (or was killed)
    return scalars, start, end and metadata.parse_session_end_info_plugin_data(end)


def _hparam(value):
    kind = value.WhichOneof("kind")
    return {"number_value": value.number_value, "string_value": value.string_value,
            "bool_value": value.bool_value}[kind]


def _check_tb(run_dir, cfg=None):
    """Every numeric metrics.csv cell is a scalar of its round, once (float32,
    as TensorBoard keeps scalars); the settings are the session's hparams."""
    from tensorboard.plugins.hparams import api_pb2

    scalars, start, end = _tb(run_dir / "tb")
    want = _columns(_csv(run_dir))
    assert sorted(scalars) == sorted(want)
    for tag, by_round in want.items():
        assert [s for s, _ in scalars[tag]] == sorted(by_round), tag  # each round once, in order
        assert [v for _, v in scalars[tag]] == [float(np.float32(by_round[s]))
                                               for s in sorted(by_round)], tag
    if cfg is not None:
        settings = flat_settings(cfg)
        hp = {k: _hparam(v) for k, v in start.hparams.items()}
        assert hp == {k: v for k, v in settings.items() if v is not None}
    assert end.status == api_pb2.STATUS_SUCCESS
    return scalars


def test_tensorboard_holds_metrics_csv_and_the_settings(make_cfg, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = make_cfg([*LINREG, "tracker=tensorboard"])
    run_experiment(cfg, tmp_path)
    scalars = _check_tb(tmp_path, cfg)
    assert {"loss", "gap", "uplink_coded_bytes", "comm_s", "wall_s", "missing"} <= set(scalars)
    assert "accuracy" not in scalars  # linreg has none: empty in metrics.csv, absent here
    start = _tb(tmp_path / "tb")[1]
    hp = {k: _hparam(v) for k, v in start.hparams.items()}
    assert hp["sparsifier.name"] == "regtopk" and hp["sparsifier.sparsity"] == 0.3
    assert hp["faults.drop_prob"] == 0.2 and hp["threads"] == 1
    assert not {"progress", "checkpoint.every", "tracker.name"} & set(hp)  # not what it computes
    assert start.group_name == tmp_path.name  # the trial: the run directory's name


# -- mlflow ---------------------------------------------------------------------
def _mlflow_runs(store: Path, experiment: str, deleted=False):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, [e.name for e in client.search_experiments()]
    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    return client, client.search_runs([exp.experiment_id], run_view_type=view)


def _check_mlflow(client, run, run_dir, cfg=None):
    """Each metric's history is metrics.csv's column (float64: equal), one
    point per round; the settings are the params."""
    from regtopk_fl.trackers.mlflow_sink import param_text

    want = _columns(_csv(run_dir))
    assert sorted(run.data.metrics) == sorted(want)
    for key, by_round in want.items():
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert hist == sorted(by_round.items()), key
    if cfg is not None:
        assert run.data.params == {k: param_text(v) for k, v in flat_settings(cfg).items()}
    assert run.info.status == "FINISHED"
    assert run.data.tags["regtopk.run_dir"] == str(run_dir.resolve())


def test_mlflow_holds_metrics_csv_and_the_settings(make_cfg, tmp_path):
    pytest.importorskip("mlflow")
    cfg = make_cfg([*LINREG, "tracker=mlflow"])
    run_experiment(cfg, tmp_path)
    client, runs = _mlflow_runs(tmp_path, "adhoc")  # a single run: its own store, "adhoc"
    assert len(runs) == 1
    _check_mlflow(client, runs[0], tmp_path, cfg)
    assert runs[0].data.params["sparsifier.sparsity"] == "0.3"
    assert runs[0].data.params["network.downlink_mbps"] == "null"
    assert runs[0].data.tags["regtopk.sparsifier"] == "regtopk"


def test_mlflow_sweep_is_one_experiment_with_a_run_per_job(tmp_path):
    """A sweep's jobs share one store in the sweep directory, one experiment
    named after it, one MLflow run per job named by its overrides."""
    pytest.importorskip("mlflow")
    sweep = tmp_path / "my-sweep"
    proc = _cli(tmp_path, "-m", *LINREG, "sparsifier=topk,regtopk", "tracker=mlflow",
                f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    assert (sweep / "mlflow.db").is_file() and not (sweep / "0" / "mlflow.db").exists()
    client, runs = _mlflow_runs(sweep, "my-sweep")
    by_name = {r.info.run_name: r for r in runs}
    assert len(runs) == 2
    assert {r.data.params["sparsifier.name"] for r in runs} == {"topk", "regtopk"}
    for run in runs:
        job = Path(run.data.tags["regtopk.run_dir"])
        assert job.parent == sweep.resolve()
        assert run.info.run_name.startswith(job.name + " ")
        assert f"sparsifier={run.data.params['sparsifier.name']}" in run.info.run_name
        _check_mlflow(client, run, job)
    assert _csv(sweep / "0") != _csv(sweep / "1")  # the comparison could fail
    assert len(by_name) == 2


# -- resume: every round once -----------------------------------------------------
RESUME = ["task=linreg", "num_workers=4", "rounds=30", "sparsifier=regtopk", "threads=1",
          "sparsifier.sparsity=0.3", "checkpoint.every=10"]


@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow"])
def test_killed_and_resumed_run_logs_every_round_once(tmp_path, tracker):
    """Killed after round 14 (checkpoint after 10), resumed: the sink holds
    rounds 0..30 once each, equal to the resumed run's metrics.csv (wall_s
    included: the restored rows are logged again, not the killed attempt's)."""
    pytest.importorskip(tracker)
    run_dir = tmp_path / "run"
    args = [*RESUME, f"tracker={tracker}"]
    rc, out = launch(run_dir, args, crash_after=14)
    assert rc == -signal.SIGKILL, out
    if tracker == "tensorboard":  # the killed attempt wrote rounds up to its checkpoint at least
        scalars, _, end = _tb(run_dir / "tb")
        assert {s for s, _ in scalars["gap"]} >= set(range(11)) and end is None
    else:
        client, runs = _mlflow_runs(run_dir, "adhoc")
        assert len(runs) == 1 and runs[0].info.status == "RUNNING"
        assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "gap")} >= set(
            range(11))
    rc, out = launch(run_dir, args)
    assert rc == 0, out
    assert [int(r["round"]) for r in _csv(run_dir)] == list(range(31))
    if tracker == "tensorboard":
        _check_tb(run_dir)
    else:
        client, runs = _mlflow_runs(run_dir, "adhoc")
        assert len(runs) == 1
        _check_mlflow(client, runs[0], run_dir)
        _, every = _mlflow_runs(run_dir, "adhoc", deleted=True)
        assert sorted(r.info.lifecycle_stage for r in every) == ["active", "deleted"]


# -- the Flower runtime feeds the same recorder -------------------------------------
@pytest.mark.flower
@pytest.mark.slow
def test_flower_run_feeds_the_tracker(make_cfg, tmp_path):
    pytest.importorskip("mlflow")
    cfg = make_cfg(["task=linreg", "num_workers=2", "rounds=3", "runtime=flower", "threads=1",
                    "sparsifier=topk", "sparsifier.sparsity=0.3", "tracker=mlflow"])
    run_experiment(cfg, tmp_path)
    client, runs = _mlflow_runs(tmp_path, "adhoc")
    assert len(runs) == 1 and runs[0].data.params["runtime.name"] == "flower"
    _check_mlflow(client, runs[0], tmp_path, cfg)


@pytest.mark.parametrize("overrides", [
    ["tracker=mlflow", "tracker.uri=http://127.0.0.1:5000", "tracker.experiment=fig"],
    ["tracker=tensorboard", "tracker.subdir=events"],
    [],
])
def test_flwr_run_config_carries_the_tracker(make_cfg, overrides, tmp_path):
    """`flwr run` (the ServerApp reads the run config): the tracker's keys are
    declared in pyproject.toml and come back as the chosen tracker's own."""
    from flwr.common.config import fuse_dicts, parse_config_args
    from omegaconf import OmegaConf

    from regtopk_fl import deploy, trackers
    from regtopk_fl.settings import from_run_config

    cfg = make_cfg(["runtime=flower", *overrides])
    cmd = deploy.flwr_run_command(cfg, "mylink", output_dir=tmp_path / "out")
    argv = shlex.split(cmd)
    got = from_run_config(fuse_dicts(deploy.pyproject_app_config(),  # what the ServerApp gets
                                     parse_config_args([argv[argv.index("--run-config") + 1]])))
    assert OmegaConf.to_container(got.tracker) == OmegaConf.to_container(cfg.tracker)
    validate(got)
    sink, = trackers.build(got)
    assert type(sink).__name__ == {"mlflow": "MlflowSink", "tensorboard": "TensorBoardSink",
                                   "csv": "CsvFiles"}[cfg.tracker.name]
    assert {k: getattr(sink, k) for k in cfg.tracker if k != "_target_"} == {
        k: v for k, v in OmegaConf.to_container(cfg.tracker).items() if k != "_target_"}


# -- validation ---------------------------------------------------------------------
@pytest.mark.parametrize("overrides,named", [
    (["tracker=tensorboard", "tracker.subdir=''"], "tracker.subdir=''"),
    (["tracker=tensorboard", "tracker.subdir=/abs"], "tracker.subdir='/abs'"),
    (["tracker=tensorboard", "tracker.flush_secs=0"], "tracker.flush_secs=0"),
    (["tracker=tensorboard", "tracker.flush_secs=often"], "tracker.flush_secs='often'"),
    (["tracker=mlflow", "tracker.uri=''"], "tracker.uri=''"),
    (["tracker=mlflow", "tracker.experiment=3"], "tracker.experiment=3"),
    (["tracker=mlflow", "+tracker.port=5000"], "tracker.port=5000"),
    (["+tracker.subdir=tb"], "tracker.subdir='tb'"),
    (["tracker.name=tb"], "tracker.name='tb'"),
])
def test_bad_tracker_setting_is_named(make_cfg, overrides, named):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(overrides))
    assert "\n" not in str(err.value) and str(err.value).startswith(named + ":"), str(err.value)


@pytest.mark.parametrize("tracker,module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_missing_extra_names_the_extra(make_cfg, monkeypatch, tracker, module):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ConfigError) as err:
        validate(make_cfg([f"tracker={tracker}"]))
    assert str(err.value) == (f"tracker='{tracker}': needs the {module} package, not installed "
                              f"here: pip install -e '.[{tracker}]' (or pip install "
                              f"'regtopk-fl[{tracker}]')")
    for other in ("csv", "tensorboard", "mlflow"):  # the others need nothing missing here
        if other != tracker and (other == "csv" or real(other) is not None):
            validate(make_cfg([f"tracker={other}"]))


# the launcher with mlflow made unimportable, as where the extra is not installed
HIDE_MLFLOW = ("import sys; sys.modules['mlflow'] = None; sys.argv[0] = 'regtopk-fl'; "
               "from regtopk_fl.launcher import main; main()")


@pytest.mark.parametrize("args,named,code", [
    (["tracker=nosuch"], "tracker='nosuch': unknown choice", None),
    (["-m", "tracker=csv,nosuch"], "tracker='nosuch': unknown choice", None),
    (["tracker.foo=1"], "tracker.foo='1': tracker=csv has no such key", None),
    (["tracker=tensorboard", "tracker.uri=http://x"],
     "tracker.uri='http://x': tracker=tensorboard has no such key", None),
    (["tracker=tensorboard", "tracker.flush_secs=-1"], "tracker.flush_secs=-1: must be", None),
    (["tracker=mlflow"], "tracker='mlflow': needs the mlflow package", HIDE_MLFLOW),
])
def test_launcher_stops_in_one_line(tmp_path, args, named, code):
    run_dir = tmp_path / "run"
    proc = _cli(tmp_path, *args, "rounds=2", f"hydra.run.dir={run_dir}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", python_code=code)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], proc.stderr
    assert lines[0].startswith("regtopk-fl: error: ")
    assert not run_dir.exists() and not (tmp_path / "sweep").exists()


def test_client_timing_appends_rows_and_gives_medians(tmp_path):
    """client_timing.csv grows by appending at each flush (never rewritten
    whole), its rows in worker order with ``handle_s`` their sum; the
    summary's medians are over every message."""
    import csv as _csv

    from regtopk_fl.results import ClientTiming, RunRecorder

    rec = RunRecorder(tmp_path, {"task": "t"})
    timing = ClientTiming(("a", "b"))
    rec.attach(timing)
    timing.record(1, [(1, {"a": 0.5, "b": 1.0}), (0, {"a": 0.25, "b": 0.25})])
    rec.flush()
    timing.record(2, [(0, {"a": 1.0, "b": 2.0})])
    summary = rec.close("finished")
    with open(tmp_path / "client_timing.csv") as fh:
        rows = list(_csv.DictReader(fh))
    assert [(r["round"], r["worker"], r["handle_s"]) for r in rows] == [
        ("1", "0", "0.5"), ("1", "1", "1.5"), ("2", "0", "3.0")]
    assert summary["client_timing_s"] == {"a": 0.5, "b": 1.0, "handle": 1.5}
