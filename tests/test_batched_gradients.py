"""The batched worker gradients (regtopk_fl/tasks/batched.py) against the
per-worker loop, on the CPU.

Not bitwise (other kernels, other summation orders), so within a stated
tolerance: 1e-6 relative per worker (L2) in fp32 where every worker computes
on one model (the engine's local_steps=1 case) and for the small CNN; where
each worker has its own model (local SGD: grouped convolutions), a ResNet's
fp32 gradient is only as exact as the loop's own (~1.5e-6 from the float64
gradient here), so there the batched result must be as close to the float64
gradient as the loop's, and equal to the loop within 1e-12 in float64.
"""
import pytest
import torch
import torch.nn.functional as F

from regtopk_fl.tasks import batched
from regtopk_fl.tasks.images import TinyImageTask, _ImageTask, make_tiny_images
from regtopk_fl.tasks.models import resnet18


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class SmallResNet(_ImageTask):
    """ResNet-18's topology (CIFAR stem) at width 4 on synthetic 8x8 images."""

    name = "small_resnet"

    def __init__(self, num_workers=4, dtype=torch.float32, batched_mode="auto"):
        self.dtype = dtype
        xtr, ytr, xte, yte = make_tiny_images(40 * num_workers, 20, 8, 10, 1.0, 0)
        self._setup(xtr.to(dtype), ytr, xte.to(dtype), yte, resnet18(10, "cifar", 0, 4),
                    num_workers=num_workers, seed=0, batch_size=20, local_steps=1,
                    partition="iid", alpha=0.5, size_ratio=5.0, min_partition_size=10,
                    augment=False, eval_batch_size=20, device=torch.device("cpu"),
                    batched_mode=batched_mode)


def _rel(a, b):
    """Per-row relative L2 difference, the largest."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def _inputs(task, per_worker: bool):
    """(params rows, buffers) as the engine passes them: one model expanded,
    or a model and BatchNorm statistics per worker (local SGD)."""
    R = task.num_workers
    w, b = task.init_params(), task.init_buffers()
    if not per_worker:
        return w.unsqueeze(0).expand(R, -1), b
    g = torch.Generator().manual_seed(0)
    rows = w.unsqueeze(0) + 0.01 * torch.randn(R, task.dim, generator=g, dtype=task.dtype)
    bufs = b.unsqueeze(0) + 0.1 * torch.rand(R, task.num_buffers, generator=g, dtype=task.dtype)
    return rows, bufs


def _both(make, per_worker, round=3):
    """(loop result, batched result) of one task config."""
    out = []
    for mode in (False, True):
        task = make(mode)
        rows, bufs = _inputs(task, per_worker)
        out.append(task.gradients(rows, bufs, list(range(task.num_workers)), round, 0))
    return out


def _check_close(loop, bat, tol):
    (g0, l0, b0), (g1, l1, b1) = loop, bat
    assert g1.shape == g0.shape and b1.shape == b0.shape
    assert _rel(g1, g0) <= tol, _rel(g1, g0)
    assert _rel(b1, b0) <= tol, _rel(b1, b0)  # each worker's own BatchNorm statistics
    assert max(abs(a - c) / abs(c) for a, c in zip(l1, l0)) <= tol
    assert isinstance(l1, list) and all(isinstance(v, float) for v in l1)


@pytest.mark.parametrize("per_worker", [False, True])
def test_tiny_image_batched_equals_loop(per_worker):
    loop, bat = _both(lambda m: TinyImageTask(num_workers=4, seed=1, batch_size=16,
                                              batched=m), per_worker)
    _check_close(loop, bat, 1e-6)


def test_small_resnet_one_model_equals_loop_fp32():
    loop, bat = _both(lambda m: SmallResNet(batched_mode=m), per_worker=False)
    _check_close(loop, bat, 1e-6)


@pytest.mark.parametrize("per_worker", [False, True])
def test_small_resnet_same_math_in_float64(per_worker):
    loop, bat = _both(lambda m: SmallResNet(dtype=torch.float64, batched_mode=m), per_worker)
    _check_close(loop, bat, 1e-12)


def test_small_resnet_per_worker_models_as_exact_as_the_loop():
    truth = _both(lambda m: SmallResNet(dtype=torch.float64, batched_mode=m), True)[0][0]
    task64 = SmallResNet(dtype=torch.float64)
    rows64, bufs64 = _inputs(task64, True)
    loop, bat = [], []
    for mode, out in ((False, loop), (True, bat)):
        task = SmallResNet(batched_mode=mode)
        # the float64 inputs rounded to fp32, so that both see the same model
        out.extend(task.gradients(rows64.float(), bufs64.float(), [0, 1, 2, 3], 3, 0))
    err_loop = _rel(loop[0].double(), truth)
    err_bat = _rel(bat[0].double(), truth)
    assert 0 < err_loop < 1e-4 and err_bat <= 2 * err_loop, (err_loop, err_bat)
    _check_close(loop, bat, 1e-5)


def test_auto_on_the_cpu_is_the_plain_loop_bitwise():
    """The default (batched=auto) on the CPU is the per-worker loop, bit for
    bit: each worker's model loaded, forward, cross-entropy, backward."""
    task = TinyImageTask(num_workers=3, seed=2, batch_size=16)
    assert task.batched == "auto"
    w, b = task.init_params(), task.init_buffers()
    rows = w.unsqueeze(0).expand(3, -1)
    grads, losses, bufs = task.gradients(rows, b, [0, 1, 2], 5, 0)
    ref = TinyImageTask(num_workers=3, seed=2, batch_size=16)
    model = ref.model.train()
    for r in range(3):
        ref._load(w, b)
        model.zero_grad(set_to_none=True)
        x, y = ref.batch(r, 5, 0)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.equal(grads[r], g)
        assert losses[r] == float(loss.detach())
        stats = torch.cat([t.reshape(-1) for t in ref._buffers])
        assert torch.equal(bufs[r], stats)


def test_which_path_runs_where():
    p = batched.path_for
    assert p("auto", "cuda", 8) == p("auto", "cuda", 1) == "graph"  # engine and Flower client
    assert p("auto", "cpu", 8) == p("auto", torch.device("cpu"), 8) == "loop"
    assert p(True, "cpu", 2) == p(True, "cuda", 8) == "vmap"
    assert p(True, "cpu", 1) == "loop"  # one worker: nothing to batch
    assert p(False, "cuda", 8) == p(False, "cpu", 8) == "loop"
    assert p("graph", "cpu", 3) == p("graph", "cuda", 1) == "graph"
    with pytest.raises(ValueError, match="batched='yes'"):
        TinyImageTask(num_workers=2, batched="yes")


def test_unequal_batches_fall_back_to_the_loop():
    """A partition smaller than a batch gives that worker a smaller batch:
    the rows cannot be stacked, so the loop runs (bitwise the loop's result)."""
    kw = dict(num_workers=3, seed=0, batch_size=20, samples=60, partition="unequal",
              size_ratio=5.0)
    task, ref = TinyImageTask(batched=True, **kw), TinyImageTask(batched=False, **kw)
    assert len({len(task.batch_indices(n, 1, 0)) for n in range(3)}) > 1
    w, b = task.init_params(), task.init_buffers()
    rows = w.unsqueeze(0).expand(3, -1)
    g1, l1, b1 = task.gradients(rows, b, [0, 1, 2], 1, 0)
    g0, l0, b0 = ref.gradients(rows, b, [0, 1, 2], 1, 0)
    assert torch.equal(g1, g0) and l1 == l0 and torch.equal(b1, b0)


def test_engine_with_batched_gradients_follows_the_loop(make_cfg, tmp_path):
    """Ten in-process rounds of tiny_image (RegTop-k), batched against the
    loop: the same trajectory within float rounding, the same byte counts."""
    import pandas as pd

    from regtopk_fl.runner import run_experiment

    models = {}
    for mode in ("false", "true"):
        cfg = make_cfg(["task=tiny_image", "num_workers=4", "rounds=10", "eval_every=5",
                        "sparsifier.sparsity=0.1", "checkpoint.every=0",
                        f"task.batched={mode}"])
        run_experiment(cfg, tmp_path / mode)
        models[mode] = torch.load(tmp_path / mode / "model.pt", weights_only=True)
        models[mode + "_csv"] = pd.read_csv(tmp_path / mode / "metrics.csv")
    a, b = models["false"]["params"], models["true"]["params"]
    assert float((a - b).norm() / a.norm()) <= 1e-5
    ca, cb = models["false_csv"], models["true_csv"]
    assert (ca["uplink_bytes"] == cb["uplink_bytes"]).all()
    assert (ca["sent"] == cb["sent"]).all()
