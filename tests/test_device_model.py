"""clients/device_model.py: a GPU client's model on its device, updated on
the broadcast step's entries where the process holds the previous round's
model, else copied whole. Run here with the CPU standing in for the device
(the copies are real copies there too)."""
import pytest
import torch

from clients import device_model
from regtopk_fl.broadcast import GlobalStep, Replica


@pytest.fixture(autouse=True)
def _empty():
    device_model.forget()
    yield
    device_model.forget()


def _step(gen, replica, k=20):
    dim = replica.params.numel()
    idx = torch.randperm(dim, generator=gen)[:k].sort().values
    return GlobalStep(replica.round + 1, torch.randn(k, generator=gen), idx, dim)


def test_the_step_entries_bring_the_held_model_along_bitwise():
    gen = torch.Generator().manual_seed(1)
    replica = Replica(torch.randn(3000, generator=gen), None, 0.1)
    held = device_model.on_device(7, replica, None, "cpu")  # a resync: a whole copy
    assert torch.equal(held, replica.params) and held.data_ptr() != replica.params.data_ptr()
    for _ in range(5):
        step = _step(gen, replica)
        assert replica.apply(step) is None
        got = device_model.on_device(7, replica, step, "cpu")
        assert got is held and torch.equal(got, replica.params)  # updated in place


@pytest.mark.parametrize("case", ["other run", "skipped round", "momentum", "dense step",
                                  "patch or resync"])
def test_anything_else_copies_the_whole_model(case):
    gen = torch.Generator().manual_seed(2)
    momentum = 0.9 if case == "momentum" else 0.0
    replica = Replica(torch.randn(3000, generator=gen), None, 0.1, momentum)
    held = device_model.on_device(7, replica, None, "cpu")
    step = _step(gen, replica)
    if case == "skipped round":  # the process did not serve the round before
        assert replica.apply(step) is None
        step = _step(gen, replica)
    if case == "dense step":
        step = GlobalStep(replica.round + 1, torch.randn(3000, generator=gen), None, 3000)
    assert replica.apply(step) is None
    got = device_model.on_device(8 if case == "other run" else 7, replica,
                                 None if case == "patch or resync" else step, "cpu")
    assert got is not held and torch.equal(got, replica.params)
