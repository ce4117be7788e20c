"""Start-up (#34): an in-process run imports only what it uses. Not Flower,
not Ray, and not torch's compiler stack (torch._dynamo, torch._inductor,
sympy: about 1.2 s), which ``torch.use_deterministic_algorithms`` imports
on every call (regtopk_fl/determinism.py now calls it only where something
changes). Timing is scripts/bench_startup.py's job, never a test's."""
import json
import subprocess
import sys

from regtopk_fl.paths import PROJECT_ROOT

HEAVY = ["flwr", "ray", "torch._dynamo", "torch._inductor", "sympy"]


def _python(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_in_process_run_imports_neither_flower_nor_the_compiler(tmp_path):
    got = _python(f"""
import atexit, json, sys
HEAVY = {HEAVY!r}
atexit.register(lambda: print(json.dumps({{"loaded": [m for m in HEAVY if m in sys.modules],
                                          "torch": "torch" in sys.modules}})))
sys.argv = ["regtopk-fl", "task=linreg", "num_workers=3", "rounds=2", "progress=false",
            "checkpoint.every=0", "hydra.run.dir={tmp_path / 'run'}"]
from regtopk_fl.launcher import main
main()
""")
    assert got == {"loaded": [], "torch": True}
    assert (tmp_path / "run" / "summary.json").exists()


def test_determinism_sets_inductor_only_where_it_must():
    """Off in a fresh process: nothing to set, inductor stays unloaded. On:
    torch's switch and inductor's are set; off again: both reset."""
    got = _python("""
import json, sys
import torch
from regtopk_fl import determinism
determinism.apply(False)
fresh = "torch._inductor.config" in sys.modules
determinism.apply(True)
import torch._inductor.config as ic
on = [torch.are_deterministic_algorithms_enabled(), ic.deterministic,
      torch.is_deterministic_algorithms_warn_only_enabled()]
determinism.apply(False)
off = [torch.are_deterministic_algorithms_enabled(), ic.deterministic]
print(json.dumps({"fresh": fresh, "on": on, "off": off}))
""")
    assert got == {"fresh": False, "on": [True, True, True], "off": [False, False]}


def test_the_narrow_resnet_is_torchvisions_bit_for_bit(monkeypatch):
    """The narrow ResNet-18 (width < 64) is built from the suite's own block,
    without torchvision; against the same network built from torchvision's
    BasicBlock: the same state_dict names, the same seeded init, the same
    loss and gradient and BatchNorm statistics after a step, bit for bit."""
    import torch
    from torchvision.models.resnet import BasicBlock, conv1x1

    from regtopk_fl.tasks import models

    def run():
        m = models.resnet18(10, "cifar", seed=3, width=8)
        x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        loss = torch.nn.functional.cross_entropy(m(x), torch.arange(6) % 10)
        loss.backward()
        return (m.state_dict(), loss.detach(), [p.grad for p in m.parameters()],
                [n for n, _ in m.named_parameters()])

    ours = run()
    monkeypatch.setattr(models, "_BasicBlock", BasicBlock)
    monkeypatch.setattr(models, "_conv1x1", conv1x1)
    theirs = run()
    assert list(ours[0]) == list(theirs[0]) and ours[3] == theirs[3]
    assert all(torch.equal(ours[0][k], theirs[0][k]) for k in ours[0])  # init and BN stats
    assert torch.equal(ours[1], theirs[1])
    assert all(torch.equal(a, b) for a, b in zip(ours[2], theirs[2]))


def test_partitions_are_cached_and_read_back_equal(tmp_path, monkeypatch):
    """A partition is computed with flwr-datasets once and read back from
    cache_dir afterwards, equal, without calling flwr-datasets again; another
    seed is another file."""
    import numpy as np

    from regtopk_fl.tasks import data as D

    labels = np.random.default_rng(0).integers(0, 10, 500)
    plain = {}
    for scheme in ("iid", "unequal", "dirichlet"):
        plain[scheme] = D.partition_indices(labels, 7, scheme, seed=2)
        first = D.partition_indices(labels, 7, scheme, seed=2, cache_dir=tmp_path)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype
                   for a, b in zip(first, plain[scheme]))
    assert len(list(tmp_path.glob("partition-*.npz"))) == 3

    def refuse(*a, **k):
        raise AssertionError("flwr-datasets asked again")

    monkeypatch.setattr(D, "make_partitioner", refuse)
    for scheme in plain:
        again = D.partition_indices(labels, 7, scheme, seed=2, cache_dir=tmp_path)
        assert len(again) == 7 and all(np.array_equal(a, b) and a.dtype == b.dtype
                                       for a, b in zip(again, plain[scheme]))
    with __import__("pytest").raises(AssertionError, match="asked again"):
        D.partition_indices(labels, 7, "iid", seed=3, cache_dir=tmp_path)
