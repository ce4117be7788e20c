"""faults.missing (#35): the in-process twin of a deployed run replays the
rounds in which workers were missing, "absent" (never got the message) or
"lost" (computed, the reply never arrived), and ends with the deployed
strategy's model; the strategy names each missing worker and why; a bad
schedule is refused in one line naming the key and the value."""
from __future__ import annotations

import pytest
import torch

from regtopk_fl import faults
from regtopk_fl.settings import ConfigError, validate
from test_deploy import _Federation, _linreg_cfg, task_identity  # noqa: F401 - a fixture


def _inprocess(make_cfg, schedule_path, rounds):
    from regtopk_fl.engine import InProcessRun
    from regtopk_fl.runner import build

    cfg = make_cfg(["task=linreg", "num_workers=3", "sparsifier=regtopk",
                    "sparsifier.sparsity=0.3", "task.dim=40", "task.samples_per_worker=30",
                    "device=cpu", f"faults.missing={schedule_path}"])
    validate(cfg)
    task, sparsifier = build(cfg)
    run = InProcessRun(task, sparsifier, lr=cfg.lr, seed=cfg.seed,
                       fault_cfg={"missing": str(schedule_path)})
    return [run.round(t) for t in range(1, rounds + 1)], run


def test_twin_replays_absent_and_lost_workers(make_cfg, task_identity, tmp_path, caplog):  # noqa: F811
    sched = tmp_path / "missing.txt"
    sched.write_text("# round worker kind\n2 0 lost\n3 1 offline\n4 0 lost\n5 0 offline\n")
    fed = _Federation(_linreg_cfg(make_cfg))
    with caplog.at_level("INFO", logger="strategies.sparse_strategy"):
        deployed = [fed.round(1), fed.round(2, lose=(0,)), fed.round(3, offline=(1,)),
                    fed.round(4, lose=(0,)), fed.round(5, offline=(0,)), fed.round(6)]
    rows, run = _inprocess(make_cfg, sched, 6)
    assert [r["missing"] for r in rows] == [d["missing"] for d in deployed] == [0, 1, 1, 1, 1, 0]
    assert [r["replies"] for r in rows] == [3, 2, 2, 2, 2, 3]
    assert [len(r["outcome"].accepted) for r in rows] == [
        len(d["outcome"].accepted) for d in deployed]
    assert [r["plan"].kind_list for r in rows] == [d["plan"].kind_list for d in deployed]
    torch.testing.assert_close(run.server.params, fed.server.params, rtol=1e-6, atol=0)
    # the twin without the "lost" kind (as drops) ends elsewhere: the kind matters
    sched.write_text("2 0\n3 1 offline\n4 0\n5 0 offline\n")
    _, other = _inprocess(make_cfg, sched, 6)
    assert not torch.allclose(other.server.params, fed.server.params, rtol=1e-6, atol=0)
    text = caplog.text
    assert "round 2: missing worker 0: no reply within the round's timeout" in text
    assert "round 3: missing worker 1: no online node holds it" in text


@pytest.mark.parametrize("text, runtime, why", [
    ("2 5\n", "inprocess", "worker 5 is not in 0..2"),
    ("2 x\n", "inprocess", "want ROUND WORKER"),
    ("2 1 late\n", "inprocess", "kind 'late'"),
    ("2 1\n2 1 lost\n", "inprocess", "listed twice"),
    ("0 1\n", "inprocess", "rounds count from 1"),
    ("2 1\n", "flower", "runtime=inprocess only"),
])
def test_bad_schedules_are_refused_in_one_line(make_cfg, tmp_path, text, runtime, why):
    path = tmp_path / "m.txt"
    path.write_text(text)
    cfg = make_cfg(["task=linreg", "num_workers=3", f"runtime={runtime}",
                    f"faults.missing={path}"])
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    msg = str(exc.value)
    assert msg.startswith(f"faults.missing='{path}'") and why in msg and "\n" not in msg


def test_unreadable_schedule_is_refused(make_cfg, tmp_path):
    cfg = make_cfg(["task=linreg", "num_workers=3", f"faults.missing={tmp_path / 'none.txt'}"])
    with pytest.raises(ConfigError, match=r"faults.missing=.*cannot be read"):
        validate(cfg)


def test_schedule_parse_and_default():
    assert faults.parse_missing("1 0\n3 2 lost  # cut\n4 1 offline") == {
        (1, 0): "absent", (3, 2): "lost", (4, 1): "offline"}
    assert faults.missing_schedule({"missing": None}) == {}
    assert faults.survivors({}, 0, [0, 1, 2], 1) == [0, 1, 2]


def test_a_lost_first_upload_goes_back_too(make_cfg, task_identity, tmp_path, caplog):  # noqa: F811
    """Worker 0's first reply never arrives: the server has no feedback for it
    next round, and the node still restores that upload (found by
    `make netns-test`: a reply after round 1's timeout); the twin agrees."""
    sched = tmp_path / "missing.txt"
    sched.write_text("1 0 lost\n")
    fed = _Federation(_linreg_cfg(make_cfg))
    with caplog.at_level("WARNING", logger="clients.client_app"):
        fed.round(1, lose=(0,))
        for t in (2, 3, 4):
            fed.round(t)
    assert "no feedback although the last upload was round 1" in caplog.text
    _, run = _inprocess(make_cfg, sched, 4)
    torch.testing.assert_close(run.server.params, fed.server.params, rtol=1e-6, atol=0)
