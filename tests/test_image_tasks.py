"""Image tasks: CIFAR-10 loading (a tiny slice of the real offline archive),
partitions, models, and the stateless gradients of ImageTask/TinyImageTask."""
from __future__ import annotations

import tarfile
import urllib.error

import numpy as np
import pytest
import torch

from conftest import ARCHIVE, needs_archive
from regtopk_fl.tasks import data as D
from regtopk_fl.tasks import models as M
from regtopk_fl.tasks.images import ImageTask, TinyImageTask, make_tiny_images

pytestmark = pytest.mark.usefixtures("one_thread_module")


# -- models ------------------------------------------------------------------------
def test_resnet18_parameter_counts():
    import torchvision

    assert M.num_params(M.resnet18(10, "cifar", seed=0)) == 11_173_962
    ref = torchvision.models.resnet18(weights=None, num_classes=10)
    assert M.num_params(M.resnet18(10, "imagenet", seed=0)) == M.num_params(ref)
    with pytest.raises(ValueError):
        M.resnet18(10, "bogus")


def test_model_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = M.flat_params(M.tiny_cnn(seed=3))
    b = M.flat_params(M.tiny_cnn(seed=3))
    c = M.flat_params(M.tiny_cnn(seed=4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.random.get_rng_state())
    r1 = M.flat_params(M.resnet18(seed=1))[:5000]
    r2 = M.flat_params(M.resnet18(seed=1))[:5000]
    assert torch.equal(r1, r2)
    assert M.flat_buffers(M.tiny_cnn()).numel() == 32  # BN running mean + var of 16 channels


# -- partitions ----------------------------------------------------------------------
LABELS = np.arange(2000) % 10


def _check_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint and covering


def test_iid_partition_disjoint_covering_deterministic():
    p1 = D.partition_indices(LABELS, 7, "iid", seed=3)
    p2 = D.partition_indices(LABELS, 7, "iid", seed=3)
    _check_cover(p1, len(LABELS))
    assert all(np.array_equal(a, b) for a, b in zip(p1, p2))
    assert max(map(len, p1)) - min(map(len, p1)) <= 1
    p3 = D.partition_indices(LABELS, 7, "iid", seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(p1, p3))
    # iid: every worker sees (nearly) every class
    assert all(len(np.unique(LABELS[p])) == 10 for p in p1)


@pytest.mark.parametrize("ratio", [5.0, 10.0])
def test_unequal_partition_ratio(ratio):
    parts = D.partition_indices(LABELS, 10, "unequal", seed=1, size_ratio=ratio)
    _check_cover(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) / min(sizes) >= ratio
    again = D.partition_indices(LABELS, 10, "unequal", seed=1, size_ratio=ratio)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert D.unequal_sizes(2000, 10, ratio, seed=2) != sizes


def test_dirichlet_partition_respects_seed():
    kw = dict(alpha=0.3, min_partition_size=5)
    a = D.partition_indices(LABELS, 5, "dirichlet", seed=1, **kw)
    b = D.partition_indices(LABELS, 5, "dirichlet", seed=1, **kw)
    c = D.partition_indices(LABELS, 5, "dirichlet", seed=2, **kw)
    _check_cover(a, len(LABELS))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert min(map(len, a)) >= 5
    # label skew: some worker's class histogram is far from uniform
    hist = np.stack([np.bincount(LABELS[p], minlength=10) / len(p) for p in a])
    assert hist.max() > 0.25
    with pytest.raises(ValueError):
        D.partition_indices(LABELS, 5, "bogus")


def test_plot_label_distribution(tmp_path):
    labels = np.arange(300) % 10
    parts = D.partition_indices(labels, 3, "dirichlet", seed=0, alpha=0.5, min_partition_size=5)
    df = D.plot_label_distribution(labels, parts, tmp_path / "dist.png")
    assert (tmp_path / "dist.png").stat().st_size > 1000
    assert df.to_numpy().sum() == 300 and df.shape == (3, 10)


# -- CIFAR-10 loading --------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cifar-cache")


@pytest.fixture(scope="module")
def cifar_slice(cifar_cache):
    if not ARCHIVE.is_file():
        pytest.skip(f"offline CIFAR-10 archive missing: {ARCHIVE}")
    return D.load_cifar10(subset_per_class=2, test_subset=10, cache_dir=cifar_cache)


def _reference_images(names):
    """The named members of the archive, decoded with PIL (tarfile stream,
    stops once all are found)."""
    import io

    from PIL import Image

    want, out = set(names), {}
    with tarfile.open(ARCHIVE, "r|gz") as tf:
        for m in tf:
            if m.name in want:
                out[m.name] = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read()))
                                         .convert("RGB"))
                if len(out) == len(want):
                    break
    return out


@needs_archive
def test_cifar_slice_labels_follow_class_folders(cifar_slice):
    a = cifar_slice
    assert a.x_train.shape == (20, 32, 32, 3) and a.x_train.dtype == np.uint8
    assert a.y_train.tolist() == [c for c in range(10) for _ in range(2)]
    assert a.x_test.shape == (10, 32, 32, 3) and a.y_test.tolist() == list(range(10))
    names = [f"train/{cls}/000{i}.jpg" for cls in D.CIFAR10_CLASSES for i in range(2)]
    ref = _reference_images(names)
    for j, name in enumerate(names):  # image j is file 000{j%2} of class j//2
        diff = np.abs(ref[name].astype(int) - a.x_train[j].astype(int)).max()
        assert diff <= 2, (name, diff)
    # the images differ from each other (not one image repeated)
    assert len({a.x_train[j].tobytes() for j in range(20)}) == 20


@needs_archive
def test_cifar_slice_is_cached(cifar_slice, cifar_cache, monkeypatch):
    files = list(cifar_cache.glob("*.npz"))
    assert len(files) == 1 and "sub2-test10" in files[0].name
    D._CACHE.clear()

    def boom(*a, **k):
        raise AssertionError("archive decoded again instead of read from the cache")

    monkeypatch.setattr(D, "_read_jpeg_archive", boom)
    b = D.load_cifar10(subset_per_class=2, test_subset=10, cache_dir=cifar_cache)
    assert np.array_equal(b.x_train, cifar_slice.x_train)
    assert np.array_equal(b.y_test, cifar_slice.y_test)
    assert D.load_cifar10(subset_per_class=2, test_subset=10, cache_dir=cifar_cache) is b


def test_missing_path_raises_file_not_found(tmp_path):
    missing = tmp_path / "nowhere" / "cifar10-jpeg.tar.gz"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        D.load_cifar10(missing, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageTask(num_workers=2, data_path=str(missing), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        D.load_cifar10(tmp_path, cache_dir=tmp_path)  # an empty folder


def test_download_offline_error_says_so(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train=True, download=False):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(RuntimeError, match="internet"):
        D.load_cifar10(tmp_path / "dl", download=True)


def _fake_cifar10(calls, offline=False):
    """torchvision's CIFAR10 without the network: records (root, train, download)."""
    class Fake:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            if offline:
                raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
            n = 20 if train else 10
            self.data = np.zeros((n, 32, 32, 3), np.uint8)
            self.targets = [i % 10 for i in range(n)]
    return Fake


def test_download_auto_uses_data_path_else_fetches_into_the_cache(tmp_path, monkeypatch):
    """download=auto (#31): the folder at data_path when it is there (nothing
    fetched), else torchvision's copy fetched into cache_dir; offline, the
    error names both ways out."""
    import torchvision.datasets

    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _fake_cifar10(calls))
    monkeypatch.setattr(D, "_CACHE", {})
    folder = tmp_path / "tv"
    (folder / "cifar-10-batches-py").mkdir(parents=True)
    a = D.load_cifar10(folder, cache_dir=tmp_path / "cache", download="auto")
    assert calls == [(str(folder), True, False), (str(folder), False, False)]
    assert a.x_train.shape == (20, 32, 32, 3)

    calls.clear()
    cache = tmp_path / "cache"
    a = D.load_cifar10(tmp_path / "missing.tar.gz", cache_dir=cache, download="auto",
                       test_subset=10)
    assert calls == [(str(cache), True, True), (str(cache), False, True)]
    assert len(a.y_test) == 10 and a.source == str(cache)

    monkeypatch.setattr(D, "_CACHE", {})
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _fake_cifar10([], offline=True))
    with pytest.raises(RuntimeError) as err:
        D.load_cifar10(tmp_path / "missing.tar.gz", cache_dir=cache, download="auto")
    msg = str(err.value)
    assert "\n" not in msg and "offline" in msg and "cifar10-jpeg.tar.gz" in msg
    assert "reach the internet" in msg
    for value, mode in ((True, True), ("false", False), ("auto", "auto"), (False, False)):
        assert D.download_mode(value) == mode
    with pytest.raises(ValueError, match="true, false, auto"):
        D.download_mode("sometimes")


# -- ImageTask (ResNet-18 on the slice) --------------------------------------------------
@needs_archive
def test_cifar_task_gradients_stateless(cifar_slice, cifar_cache):
    task = ImageTask(num_workers=2, seed=0, batch_size=4, subset_per_class=2, test_subset=10,
                     cache_dir=str(cifar_cache))
    assert task.name == "cifar10" and task.dim == 11_173_962
    assert task.num_examples() == [10, 10]
    w, b = task.init_params(), task.init_buffers()
    rows = w.unsqueeze(0).expand(2, -1)
    w_copy = w.clone()
    g1, l1, b1 = task.gradients(rows, b, [0, 1], 3, 0)
    g2, l2, b2 = task.gradients(rows, b, [0, 1], 3, 0)
    assert g1.shape == (2, task.dim) and b1.shape == (2, task.num_buffers)
    assert torch.equal(g1, g2) and l1 == l2 and torch.equal(b1, b2)
    assert torch.equal(w, w_copy)  # the expanded rows were not written into
    assert torch.isfinite(g1).all() and g1.abs().sum() > 0
    assert not torch.equal(b1[0], b)  # BatchNorm statistics moved
    ev = task.evaluate(w, b)
    assert 0.0 <= ev["accuracy"] <= 100.0 and np.isfinite(ev["test_loss"])
    # rounds walk through each worker's data: different rounds, different batches
    i3, i4 = task.batch_indices(0, 3, 0), task.batch_indices(0, 4, 0)
    assert not torch.equal(i3, i4)


# -- TinyImageTask ---------------------------------------------------------------------------
def test_tiny_data_deterministic():
    a, b = make_tiny_images(seed=5), make_tiny_images(seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], make_tiny_images(seed=6)[0])


def test_tiny_gradients_stateless_and_per_worker():
    task = TinyImageTask(num_workers=4, seed=1, batch_size=16)
    w, b = task.init_params(), task.init_buffers()
    rows = w.unsqueeze(0).expand(4, -1)
    g1, l1, b1 = task.gradients(rows, b, [0, 1, 2, 3], 7, 0)
    task.gradients(rows, b, [2, 3], 1, 0)  # unrelated calls in between
    g2, l2, b2 = task.gradients(rows, b, [0, 1, 2, 3], 7, 0)
    assert torch.equal(g1, g2) and l1 == l2 and torch.equal(b1, b2)
    # a worker's row does not depend on who else is asked, nor on the task object
    g3, _, b3 = task.gradients(w.unsqueeze(0), b, [2], 7, 0)
    assert torch.equal(g3[0], g1[2]) and torch.equal(b3[0], b1[2])
    other = TinyImageTask(num_workers=4, seed=1, batch_size=16)
    assert torch.equal(other.gradients(rows, b, [0, 1, 2, 3], 7, 0)[0], g1)
    # different rounds: different batches and gradients
    assert not torch.equal(task.gradients(rows, b, [0, 1, 2, 3], 8, 0)[0], g1)
    # per-worker buffers [R, B] are accepted
    g4, _, _ = task.gradients(rows, b.unsqueeze(0).repeat(4, 1), [0, 1, 2, 3], 7, 0)
    assert torch.equal(g4, g1)


def test_tiny_batches_walk_epochs():
    task = TinyImageTask(num_workers=4, seed=2, batch_size=20, samples=400, num_test=50)
    spe = task.steps_per_epoch(0)
    assert spe == 5
    epoch = torch.cat([task.batch_indices(0, t, 0) for t in range(1, spe + 1)])
    assert len(torch.unique(epoch)) == 100  # one epoch covers the partition once
    assert set(epoch.tolist()) == set(task.partitions[0].tolist())
    nxt = torch.cat([task.batch_indices(0, t, 0) for t in range(spe + 1, 2 * spe + 1)])
    assert not torch.equal(epoch, nxt)  # a fresh permutation each epoch
    assert torch.equal(task.batch_indices(0, 3, 0), task.batch_indices(0, 3, 0))


def test_tiny_augmentation_seeded():
    plain = TinyImageTask(num_workers=2, seed=0)
    aug = TinyImageTask(num_workers=2, seed=0, augment=True)
    x1, y1 = aug.batch(1, 4, 0)
    x2, y2 = aug.batch(1, 4, 0)
    x0, y0 = plain.batch(1, 4, 0)
    assert torch.equal(x1, x2) and torch.equal(y1, y0)
    assert x1.shape == x0.shape and not torch.equal(x1, x0)


def test_tiny_task_trains_above_chance():
    task = TinyImageTask(num_workers=4, seed=0)
    w, b = task.init_params(), task.init_buffers()
    before = task.evaluate(w, b)["accuracy"]
    for t in range(1, 31):
        rows = w.unsqueeze(0).expand(4, -1)
        g, losses, bufs = task.gradients(rows, b, [0, 1, 2, 3], t, 0)
        w = w - 0.1 * g.mean(0)
        b = bufs.mean(0)
    after = task.evaluate(w, b)
    assert after["accuracy"] > 50.0 and after["accuracy"] > before + 25, (before, after)


def test_local_steps_pseudo_gradient():
    L, lr, workers = 3, 0.05, [0, 2]
    task = TinyImageTask(num_workers=4, seed=0, local_steps=L)
    w, b = task.init_params(), task.init_buffers()
    res = task.local_update(w, b, workers, 2, local_steps=L, local_lr=lr)
    # by hand: L SGD steps per worker on the batches of (round 2, step s)
    w_end = w.unsqueeze(0).repeat(2, 1)
    bufs = b.unsqueeze(0).repeat(2, 1)
    for s in range(L):
        g, _, bufs = task.gradients(w_end, bufs, workers, 2, s)
        w_end.sub_(g, alpha=lr)
    expect = (w.unsqueeze(0) - w_end) / lr
    assert torch.equal(res.grad, expect)  # same arithmetic, so bitwise
    assert torch.equal(res.buffers, bufs)
    # the steps of a round use distinct batches, and round 2 follows round 1
    idx = [task.batch_indices(0, r, s) for r in (1, 2) for s in range(L)]
    assert len({tuple(i.tolist()) for i in idx}) == 2 * L
    one = task.gradients(w.unsqueeze(0).expand(2, -1), b, workers, 2, 0)[0]
    assert not torch.allclose(res.grad, one)
    with pytest.raises(ValueError, match="local_steps"):
        task.gradients(w.unsqueeze(0), b, [0], 2, L)
