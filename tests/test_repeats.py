"""Seeds make comparisons paired: at one seed every method starts from the same
model and sees the same data and minibatches (issue #18). Built through the
launcher's own config and build(), as a `-m sparsifier=topk,regtopk
seed=range(10)` sweep builds each job."""
import pytest
import torch

from conftest import compose_cfg
from regtopk_fl.runner import build

METHODS = ("topk", "regtopk", "gaussiank", "randomk", "dense")


def first_round(overrides):
    task, sparsifier = build(compose_cfg(overrides))
    params, buffers = task.init_params(), task.init_buffers()
    res = task.local_update(params, buffers, [0, task.num_workers - 1], 1)
    return task, params, res


@pytest.mark.parametrize("task_overrides", [
    ["task=linreg", "num_workers=5", "task.dim=20", "task.size_ratio=3"],
    ["task=tiny_image", "num_workers=3", "task.samples=120", "task.partition=unequal",
     "task.size_ratio=3", "task.batch_size=8"],
], ids=["linreg", "tiny_image"])
def test_methods_share_init_data_and_first_gradient_per_seed(task_overrides, one_thread):
    runs = {sp: first_round([*task_overrides, f"sparsifier={sp}", "seed=3"]) for sp in METHODS}
    ref_task, ref_params, ref = runs["topk"]
    for sp, (task, params, res) in runs.items():
        assert torch.equal(params, ref_params), sp
        assert task.num_examples() == ref_task.num_examples(), sp
        assert torch.equal(res.grad, ref.grad), sp
        if hasattr(task, "batch_indices"):
            for n in range(task.num_workers):
                assert torch.equal(task.batch_indices(n, 1, 0), ref_task.batch_indices(n, 1, 0))
                assert torch.equal(task.batch_indices(n, 7, 0), ref_task.batch_indices(n, 7, 0))
    # and another seed is another repeat: another model, data split and gradient
    task, params, res = first_round([*task_overrides, "sparsifier=topk", "seed=4"])
    assert not torch.equal(params, ref_params)
    assert not torch.equal(res.grad, ref.grad)
