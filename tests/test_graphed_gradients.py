"""The recorded per-worker step (``task.batched=graph``, tasks/graphed.py)
against the per-worker loop, on the CPU.

The CPU has no CUDA graphs: there the recorded step runs eagerly on every
replay (``EagerCapture``), through the same static inputs and outputs as on
a GPU. These tests check that plumbing: every worker's parameters, images,
labels and BatchNorm statistics reach the step afresh, and its gradient,
statistics and loss come back as the loop's. Whether the recorded CUDA
graph equals the loop is checked on a GPU (scripts/gpu_grad_check.py).

Bitwise where both paths compute one model held at the same alignment (the
engine's local_steps=1 rows, one expanded model, and a Flower client's one
row): the same kernels on the same bytes. Where each worker has its own
model (local SGD), the loop computes on row r of the caller's [R, J] tensor
and the recorded step on its own aligned copy; BLAS and oneDNN may pick
their code paths by alignment and CPU, so there the two are compared within
1e-6 relative (L2, per worker), which still catches any input that reaches
the wrong worker.
"""
import pytest
import torch

from regtopk_fl.tasks import graphed
from regtopk_fl.tasks.images import TinyImageTask

from test_batched_gradients import SmallResNet, _inputs


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _loop_and_graph(make, per_worker, workers, round=3):
    out = []
    for mode in (False, "graph"):
        task = make(mode)
        rows, bufs = _inputs(task, per_worker)
        out.append(task.gradients(rows[:len(workers)], bufs if bufs is None or bufs.dim() == 1
                                  else bufs[:len(workers)], workers, round, 0))
    return out


def _assert_equal(loop, graph):
    (g0, l0, b0), (g1, l1, b1) = loop, graph
    assert torch.equal(g1, g0)
    assert (b0 is None and b1 is None) or torch.equal(b1, b0)
    assert l1 == l0 and all(isinstance(v, float) for v in l1)


def _assert_close(loop, graph, tol=1e-6):
    """Per worker (row), relative L2 difference of gradients and statistics, and of losses."""
    (g0, l0, b0), (g1, l1, b1) = loop, graph
    assert g1.shape == g0.shape and b1.shape == b0.shape
    for a, b in ((g1, g0), (b1, b0)):
        assert float(((a - b).norm(dim=1) / b.norm(dim=1)).max()) <= tol
    assert max(abs(a - c) / abs(c) for a, c in zip(l1, l0)) <= tol
    assert all(isinstance(v, float) for v in l1)


@pytest.mark.parametrize("per_worker", [False, True])
def test_small_resnet_graph_step_is_the_loop(per_worker):
    loop, graph = _loop_and_graph(lambda m: SmallResNet(batched_mode=m), per_worker,
                                  [0, 1, 2, 3])
    (_assert_close if per_worker else _assert_equal)(loop, graph)
    assert len({float(g.norm()) for g in graph[0]}) == 4  # four different workers


def test_the_recorded_step_is_what_ran():
    """The graph path was taken, not a silent fall-back to the loop."""
    task = SmallResNet(batched_mode="graph")
    rows, bufs = _inputs(task, False)
    task.gradients(rows, bufs, [0, 1, 2, 3], 1, 0)
    assert task._graphed_fn.recorded == 1 and task._graphed_fn.failed is None


def test_tiny_image_graph_step_one_worker_and_unequal_batches():
    """A single worker (a Flower client) and partitions smaller than a batch
    (unequal shapes: one recording per shape)."""
    def make(m):
        return TinyImageTask(num_workers=3, seed=1, batch_size=16, batched=m,
                             partition="unequal", size_ratio=8.0, samples=60)

    for workers in ([1], [0, 1, 2]):
        loop, graph = _loop_and_graph(make, False, workers)
        _assert_equal(loop, graph)
    task = make("graph")
    shapes = {tuple(task.batch(n, 1, 0)[0].shape) for n in range(3)}
    assert len(shapes) > 1  # the case is what it claims
    rows, bufs = _inputs(task, False)
    task.gradients(rows, bufs, [0, 1, 2], 1, 0)
    task.gradients(rows, bufs, [0, 1, 2], 2, 0)
    assert task._graphed_fn.recorded == len(shapes)  # recorded once per shape, then replayed


def test_later_rounds_and_other_paths_leave_the_recording_intact():
    """Evaluation and the loop re-point the model's parameters; the recorded
    step keeps reading its own static vector."""
    task = SmallResNet(batched_mode="graph")
    ref = SmallResNet(batched_mode=False)
    for rnd in (1, 2, 3):
        rows, bufs = _inputs(task, True)
        rows = rows + 0.01 * rnd
        got = task.gradients(rows, bufs, [0, 1, 2, 3], rnd, 0)
        task.evaluate(rows[0] * 2, bufs[0])
        _assert_close(ref.gradients(rows, bufs, [0, 1, 2, 3], rnd, 0), got)  # a model per worker
    assert task._graphed_fn.recorded == 1


def test_a_new_recording_when_the_kernel_settings_change():
    calls = []

    class Counting(graphed.EagerCapture):
        def __call__(self, step, device):
            calls.append(graphed._settings())
            return super().__call__(step, device)

    task = SmallResNet(batched_mode="graph")
    task._graphed_fn = graphed.GraphedGradients(task, capture=Counting())
    rows, bufs = _inputs(task, False)
    before = torch.backends.cudnn.deterministic
    try:
        task.gradients(rows, bufs, [0, 1], 1, 0)
        task.gradients(rows, bufs, [0, 1], 2, 0)
        torch.backends.cudnn.deterministic = not before
        task.gradients(rows, bufs, [0, 1], 3, 0)
    finally:
        torch.backends.cudnn.deterministic = before
    assert len(calls) == 2 and calls[0] != calls[1]


def test_graph_is_a_valid_setting_and_others_are_refused():
    with pytest.raises(ValueError, match="must be auto, true, false or graph"):
        TinyImageTask(num_workers=2, batched="sometimes")
    assert TinyImageTask(num_workers=2, batched="graph").batched == "graph"


def test_a_step_that_cannot_be_recorded_falls_back_to_the_loop(caplog):
    class Refusing:
        calls = 0

        def __call__(self, step, device):
            Refusing.calls += 1
            raise RuntimeError("operation not permitted when stream is capturing")

    task = SmallResNet(batched_mode="graph")
    task._graphed_fn = graphed.GraphedGradients(task, capture=Refusing())
    rows, bufs = _inputs(task, True)
    with caplog.at_level("WARNING"):
        got = task.gradients(rows, bufs, [0, 1, 2, 3], 2, 0)
    assert "could not be recorded" in caplog.text and "not permitted" in caplog.text
    _assert_equal(SmallResNet(batched_mode=False).gradients(rows, bufs, [0, 1, 2, 3], 2, 0), got)
    task.gradients(rows, bufs, [0, 1, 2, 3], 3, 0)
    assert Refusing.calls == 1  # not tried again
