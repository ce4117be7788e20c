"""task.data_cache for the linear regression: the cached data is bitwise the
data the seed draws, a second build reads the file instead of drawing, and
an unreadable file is rebuilt, with a warning."""
from __future__ import annotations

import math

import pytest
import torch

from regtopk_fl.tasks import linreg
from regtopk_fl.tasks.linreg import LinRegTask

FIELDS = ("gram", "z", "yy", "w_star", "truth", "inv_m")
KW = dict(num_workers=7, dim=5, samples_per_worker=30, size_ratio=3.0, seed=4)


def _same(a, b):
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.sizes == b.sizes
    assert torch.equal(a.init_params(), b.init_params())


def test_cached_build_is_the_drawn_one_and_is_read_back(tmp_path, monkeypatch):
    plain = LinRegTask(**KW)
    first = LinRegTask(**KW, data_cache=tmp_path)
    files = list(tmp_path.glob("linreg-N7-J5-*.pt"))
    assert len(files) == 1
    _same(plain, first)
    monkeypatch.setattr(linreg, "_build", lambda *a: pytest.fail("drew the data again"))
    second = LinRegTask(**KW, data_cache=tmp_path)
    _same(plain, second)
    # another seed is another file (and a fresh draw)
    monkeypatch.undo()
    other = LinRegTask(**{**KW, "seed": 5}, data_cache=tmp_path)
    assert len(list(tmp_path.glob("linreg-*.pt"))) == 2
    assert not torch.equal(other.gram, plain.gram)


def test_an_unreadable_cache_is_rebuilt_with_a_warning(tmp_path):
    LinRegTask(**KW, data_cache=tmp_path)
    (f,) = tmp_path.glob("linreg-*.pt")
    f.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        again = LinRegTask(**KW, data_cache=tmp_path)
    _same(LinRegTask(**KW), again)
    assert torch.load(f, weights_only=True)["gram"].shape == (7, 5, 5)  # rewritten


def test_the_gradient_is_unchanged_by_the_cache(tmp_path):
    a, b = LinRegTask(**KW), LinRegTask(**KW, data_cache=tmp_path)
    LinRegTask(**KW, data_cache=tmp_path)  # now read from the file
    c = LinRegTask(**KW, data_cache=tmp_path)
    w = a.init_params().unsqueeze(0).expand(3, -1)
    ga = a.gradients(w, None, [0, 3, 6], 1, 0)
    for t in (b, c):
        g = t.gradients(w, None, [0, 3, 6], 1, 0)
        assert torch.equal(ga[0], g[0]) and ga[1] == g[1]


def test_share_leaves_the_built_data_for_the_clients(tmp_path, monkeypatch):
    """The Flower simulation's driver shares its task with the Ray actors
    (simulation/__init__.py): they read the file instead of drawing again."""
    task = LinRegTask(**KW)
    extra = task.share(tmp_path / "task")
    assert extra == {"data_cache": str(tmp_path / "task")}
    monkeypatch.setattr(linreg, "_build", lambda *a: pytest.fail("drew the data again"))
    _same(task, LinRegTask(**KW, **extra))


def test_share_leaves_a_runs_own_cache_alone(tmp_path):
    task = LinRegTask(**KW, data_cache=tmp_path / "mine")
    assert task.share(tmp_path / "scratch") == {}
    assert not (tmp_path / "scratch").exists()


def _drawn_in_one_thread(n, j, m, mean, sigma2, h2, noise_var, seed):
    """The draw as one thread spells it (equal sizes, uniform init): the
    reference the pipelined ``_build`` must equal bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    u = mean + math.sqrt(sigma2) * torch.randn(n, generator=gen, dtype=torch.float64)
    truth = u[:, None] + math.sqrt(h2) * torch.randn(n, j, generator=gen, dtype=torch.float64)
    grams, zs, yys = [], [], []
    for k in range(n):
        a = torch.randn(m, j, generator=gen, dtype=torch.float64)
        y = a @ truth[k] + math.sqrt(noise_var) * torch.randn(m, generator=gen, dtype=torch.float64)
        grams.append(a.T @ a), zs.append(a.T @ y), yys.append(y @ y)
    w0 = (torch.rand(j, generator=gen, dtype=torch.float64) * 2 - 1) * (1.0 / math.sqrt(j))
    return {"truth": truth, "gram": torch.stack(grams), "z": torch.stack(zs),
            "yy": torch.stack(yys), "w0": w0}


@pytest.mark.parametrize("threads", [1, 2])
def test_the_pipelined_draw_is_the_one_thread_draw_bitwise(threads):
    # worker k's products run on a second thread while k+1 is drawn; the
    # numbers must be those of one thread doing both, at the caller's thread count
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n, j, m = 23, 100, 500  # the paper's J and m: BLAS's blocked paths
        built = linreg._build(n, j, m, 0.0, 5.0, 1.0, 0.5, 1.0, "uniform", 11)
        ref = _drawn_in_one_thread(n, j, m, 0.0, 5.0, 1.0, 0.5, 11)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    for key, want in ref.items():
        assert torch.equal(built[key], want), key
    assert built["gram"].shape == (n, j, j) and not torch.equal(built["gram"][0], built["gram"][1])


def test_a_background_build_is_the_same_data_and_shares_before_it_is_read(tmp_path,
                                                                          monkeypatch):
    """background=True (the runner's, issue #34): the constructor returns
    while the data is drawn on a thread; the data reads back bitwise as the
    synchronous build's once first read; share() asked before the draw is
    done returns at once and its file is written before the data can be
    read; an error of the draw is raised where the data is first read."""
    import threading

    plain = LinRegTask(**KW)
    go, real_build = threading.Event(), linreg._build

    def held_build(*args):
        assert go.wait(30), "the test never let the draw go"
        return real_build(*args)

    monkeypatch.setattr(linreg, "_build", held_build)
    task = LinRegTask(**KW, background=True)  # returns although the draw waits
    assert "_pending" in vars(task) and not task._pending.done()
    assert task.share(tmp_path / "shared") == {"data_cache": str(tmp_path / "shared")}
    assert not list((tmp_path / "shared").glob("*.pt"))  # not written yet: nothing drawn
    go.set()
    _same(plain, task)  # the first read waits for the data
    assert "_pending" not in vars(task)
    (f,) = (tmp_path / "shared").glob("linreg-N7-J5-*.pt")
    assert torch.equal(torch.load(f, weights_only=True)["gram"], plain.gram)

    def broken(*args):
        raise MemoryError("no room for the Gram matrices")

    monkeypatch.setattr(linreg, "_build", broken)
    bad = LinRegTask(**{**KW, "seed": 9}, background=True)
    with pytest.raises(MemoryError, match="no room"):
        bad.num_examples()
    with pytest.raises(AttributeError, match="no_such_thing"):
        plain.no_such_thing


def test_a_task_drawn_in_the_background_pickles_with_its_data(tmp_path):
    """A task still drawing pickles once its data is there (the thread and
    its lock stay behind), reads back bitwise and shares its data."""
    import pickle

    task = LinRegTask(**KW, background=True)
    back = pickle.loads(pickle.dumps(task))
    plain = LinRegTask(**KW)
    _same(plain, back)
    assert back.share(tmp_path) == {"data_cache": str(tmp_path)}
    (f,) = tmp_path.glob("linreg-N7-J5-*.pt")
    assert torch.equal(torch.load(f, weights_only=True)["gram"], plain.gram)
