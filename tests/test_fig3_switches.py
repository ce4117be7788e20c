"""The switches of the authors' Fig. 3 code (issue #18), on tiny data: local
pretrained weights with fc replaced, resize, ImageNet normalisation, a softmax
before the cross-entropy, the last local minibatch's gradient as the upload,
random shares with max/min >= 5; each validated, and off by default."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import open_dict

from conftest import ARCHIVE, compose_cfg, needs_archive
from regtopk_fl.checkpoint import config_fingerprint
from regtopk_fl.runner import build, run_experiment
from regtopk_fl.settings import ConfigError, from_run_config, to_run_config, validate
from regtopk_fl.tasks import data as D
from regtopk_fl.tasks import images as I
from regtopk_fl.tasks import models as M
from regtopk_fl.tasks.images import ImageTask, TinyImageTask

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A torchvision ResNet-18 state_dict (1000 classes, as torchvision ships it),
    randomly initialised with another seed than any task model, BN statistics set."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        net = torchvision.models.resnet18(weights=None)
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


# -- pretrained weights -----------------------------------------------------------------
def test_pretrained_weights_load_everything_but_fc(weights):
    path, ref = weights
    model = M.resnet18(10, "imagenet", seed=0, pretrained=path)
    own = M.resnet18(10, "imagenet", seed=0)  # the seeded model, fc for 10 classes
    state = model.state_dict()
    for key, value in ref.items():
        if key in M.REPLACED:
            continue
        assert torch.equal(state[key], value), key
    assert state["fc.weight"].shape == (10, 512)
    assert torch.equal(state["fc.weight"], own.state_dict()["fc.weight"])  # replaced, seeded
    assert not torch.equal(state["conv1.weight"], own.state_dict()["conv1.weight"])
    with pytest.raises(ValueError, match="stem=imagenet"):
        M.resnet18(10, "cifar", 0, pretrained=path)


def test_pretrained_weights_refuse_another_model(tmp_path):
    bad = tmp_path / "cnn.pth"
    torch.save(M.tiny_cnn().state_dict(), bad)
    with pytest.raises(ValueError, match="not a torchvision ResNet-18 state_dict .*missing"):
        M.resnet18(10, "imagenet", 0, pretrained=bad)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a tensor file")
    with pytest.raises(ValueError, match="not a torch state_dict file"):
        M.read_state_dict(junk)


@needs_archive
def test_cifar_task_with_pretrained_weights_resize_and_imagenet_norm(weights, tmp_path):
    path, ref = weights
    task = ImageTask(num_workers=2, seed=0, batch_size=4, subset_per_class=2, test_subset=10,
                     cache_dir=str(tmp_path), stem="imagenet", pretrained_weights=str(path),
                     resize=48, loss="softmax_ce")
    torch.testing.assert_close(task._mean.flatten(), torch.tensor(I.IMAGENET_MEAN))
    x, _ = task.batch(0, 1, 0)
    assert x.shape == (4, 3, 48, 48)
    model = M.resnet18(10, "imagenet", 0, pretrained=path)
    assert torch.equal(task.init_params(), M.flat_params(model))
    grads, losses, _ = task.gradients(task.init_params(), task.init_buffers(), [0, 1], 1, 0)
    assert torch.isfinite(grads).all() and all(np.isfinite(losses))
    plain = ImageTask(num_workers=2, seed=0, batch_size=4, subset_per_class=2, test_subset=10,
                      cache_dir=str(tmp_path))
    torch.testing.assert_close(plain._mean.flatten(), torch.tensor(D.CIFAR10_MEAN))
    assert plain.batch(0, 1, 0)[0].shape == (4, 3, 32, 32)


# -- resize, normalisation, loss ---------------------------------------------------------
def test_resize_feeds_the_model_the_resized_images():
    task = TinyImageTask(num_workers=2, seed=0, samples=80, num_test=20, resize=16)
    x, _ = task.batch(0, 1, 0)
    assert x.shape[-2:] == (16, 16)
    raw = task.x_train[task.batch_indices(0, 1, 0)]
    # bilinear upsampling by 2 keeps each image's mean (up to the border rows)
    torch.testing.assert_close(x.mean(dim=(2, 3)), raw.mean(dim=(2, 3)), atol=0.05, rtol=0)
    grads, _, _ = task.gradients(task.init_params(), task.init_buffers(), [0], 1, 0)
    assert torch.isfinite(grads).all()
    assert task.evaluate(task.init_params(), task.init_buffers())["accuracy"] >= 0
    same = TinyImageTask(num_workers=2, seed=0, samples=80, num_test=20, resize=8)
    plain = TinyImageTask(num_workers=2, seed=0, samples=80, num_test=20)
    assert torch.equal(same.batch(0, 1, 0)[0], plain.batch(0, 1, 0)[0])  # 8 -> 8: untouched


def test_normalize_choices():
    assert TinyImageTask(num_workers=2, samples=40)._mean is None  # auto = none here
    t = TinyImageTask(num_workers=2, samples=40, normalize="imagenet")
    torch.testing.assert_close(t._std.flatten(), torch.tensor(I.IMAGENET_STD))
    with pytest.raises(ValueError, match="task.normalize"):
        TinyImageTask(num_workers=2, samples=40, normalize="zscore")


def test_softmax_ce_is_the_cross_entropy_of_the_softmax():
    kw = dict(num_workers=2, seed=0, samples=80, num_test=20)
    sm, ce = TinyImageTask(loss="softmax_ce", **kw), TinyImageTask(**kw)
    params, bufs = sm.init_params(), sm.init_buffers()
    g_sm, loss_sm, _ = sm.gradients(params, bufs, [1], 1, 0)
    g_ce, loss_ce, _ = ce.gradients(params, bufs, [1], 1, 0)
    # by hand, on the same batch and model
    sm._load(params, bufs)
    x, y = sm.batch(1, 1, 0)
    sm.model.train()
    sm.model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = F.cross_entropy(torch.softmax(sm.model(x), dim=1), y)
        out.backward()
    by_hand = torch.cat([p.grad.reshape(-1) for p in sm.model.parameters()])
    assert loss_sm[0] == pytest.approx(float(out.detach()), rel=1e-6)
    torch.testing.assert_close(g_sm[0], by_hand)
    assert not torch.allclose(g_sm, g_ce) and loss_sm[0] != pytest.approx(loss_ce[0])
    # the softmax's probabilities are in [0, 1]: the loss is within log(C) +- 1
    assert abs(loss_sm[0] - np.log(10)) < 1.0


# -- upload = last_gradient --------------------------------------------------------------
def test_last_gradient_is_the_last_local_minibatch_gradient():
    cfg = compose_cfg(["task=linreg", "num_workers=3", "task.dim=10", "local_steps=3",
                       "local_lr=0.05", "upload=last_gradient"])
    task, _ = build(cfg)
    assert task.upload == "last_gradient"  # set by build() for both runtimes
    w0 = task.init_params()
    res = task.local_update(w0, None, [0, 2], 1, 3, 0.05)
    w = w0.unsqueeze(0).repeat(2, 1)
    for step in range(2):  # two local steps, then the gradient there
        g, _, _ = task.gradients(w, None, [0, 2], 1, step)
        w = w - 0.05 * g
    g_last, _, _ = task.gradients(w, None, [0, 2], 1, 2)
    torch.testing.assert_close(res.grad, g_last)
    task.upload = "model_change"
    change = task.local_update(w0, None, [0, 2], 1, 3, 0.05)
    assert not torch.allclose(change.grad, res.grad)
    # with one local step both uploads are the gradient itself
    task.upload = "last_gradient"
    one = task.local_update(w0, None, [0, 2], 1, 1, 0.05).grad
    task.upload = "model_change"
    assert torch.equal(one, task.local_update(w0, None, [0, 2], 1, 1, 0.05).grad)


def test_upload_travels_in_the_flower_run_config():
    cfg = compose_cfg(["task=tiny_image", "num_workers=2", "local_steps=2",
                       "upload=last_gradient"])
    back = from_run_config(to_run_config(cfg))
    assert back.upload == "last_gradient"
    task, _ = build(back)  # what a ClientApp builds
    assert task.upload == "last_gradient"


def test_last_gradient_run_trains(tmp_path):
    cfg = compose_cfg(["task=tiny_image", "num_workers=4", "task.samples=200", "rounds=4",
                       "local_steps=3", "local_lr=0.1", "lr=0.1", "upload=last_gradient",
                       "sparsifier=topk", "sparsifier.sparsity=0.1", "task.loss=softmax_ce",
                       "task.resize=12", "task.partition=unequal", "task.size_ratio=3",
                       "eval_every=4"])
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["status"] == "finished" and np.isfinite(summary["final"]["loss"])


# -- random shares, validation, defaults -------------------------------------------------
def test_fig3_authors_shares_are_random_with_ratio_5():
    cfg = compose_cfg(["experiment=fig3_authors", "task.pretrained_weights=null",
                       f"task.data_path={__file__}"])
    validate(cfg)  # valid without weights (from scratch) ...
    assert cfg.task.partition == "unequal" and cfg.task.size_ratio == 5
    sizes = D.unequal_sizes(50000, cfg.num_workers, cfg.task.size_ratio, seed=cfg.seed)
    assert sum(sizes) == 50000 and max(sizes) / min(sizes) >= 5
    assert len(set(sizes)) == cfg.num_workers  # random, not equal
    ablation = compose_cfg(["experiment=fig3_ablation", "local_steps=10",
                            "upload=last_gradient"])  # its local-steps cell
    validate(ablation)
    assert ablation.task.partition == "unequal" and ablation.local_steps > 1


@pytest.mark.parametrize("overrides,named", [
    (["experiment=fig3_authors"], "task.pretrained_weights='required'"),
    (["task=cifar10", "task.stem=imagenet", "task.pretrained_weights=/no/such.pth"],
     "task.pretrained_weights='/no/such.pth'"),
    (["task=cifar10", "task.pretrained_weights=WEIGHTS"], "task.pretrained_weights='WEIGHTS'"),
    (["task=cifar10", "task.stem=imagenet", "task.pretrained_weights=CNN"],
     "task.pretrained_weights='CNN'"),
    (["task=tiny_image", "+task.pretrained_weights=WEIGHTS"], "task.pretrained_weights='WEIGHTS'"),
    (["task=tiny_image", "task.resize=4"], "task.resize=4"),
    (["task=cifar10", "task.resize=1.5"], "task.resize=1.5"),
    (["task=tiny_image", "task.loss=hinge"], "task.loss='hinge'"),
    (["task=cifar10", "task.normalize=zscore"], "task.normalize='zscore'"),
    (["upload=delta"], "upload='delta'"),
])
def test_bad_switch_is_named(overrides, named, weights, tmp_path):
    cnn = tmp_path / "cnn.pth"
    torch.save(M.tiny_cnn().state_dict(), cnn)
    subst = {"WEIGHTS": str(weights[0]), "CNN": str(cnn)}
    overrides = [o.replace("WEIGHTS", subst["WEIGHTS"]).replace("CNN", subst["CNN"])
                 for o in overrides]
    named = named.replace("WEIGHTS", subst["WEIGHTS"]).replace("CNN", subst["CNN"])
    cfg = compose_cfg([*overrides, f"task.data_path={__file__}"] if any(
        "cifar10" in o or "fig3" in o for o in overrides) else overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(named + ":"), msg


def test_defaults_leave_runs_and_fingerprints_as_before(tmp_path):
    """Every default of the new switches is the code path of before: the same
    metrics bit for bit as the switches spelled out as no-ops, and the
    fingerprint of a config without the new keys (old checkpoints resume)."""
    base = ["task=tiny_image", "num_workers=3", "task.samples=90", "rounds=3", "eval_every=1",
            "local_steps=2", "sparsifier=topk", "sparsifier.sparsity=0.2"]
    noop = ["upload=model_change", "task.loss=ce", "task.normalize=auto", "task.resize=8"]
    a = run_experiment(compose_cfg(base), tmp_path / "a")
    b = run_experiment(compose_cfg([*base, *noop]), tmp_path / "b")
    assert a["final"] == b["final"]
    ma = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    mb = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert ma[0].endswith(",wall_s")
    assert [r.rsplit(",", 1)[0] for r in ma] == [r.rsplit(",", 1)[0] for r in mb]
    cfg, old = compose_cfg(base), compose_cfg(base)
    with open_dict(old):
        del old["upload"]
        for key in ("pretrained_weights", "resize", "normalize", "loss"):
            old.task.pop(key, None)
    assert config_fingerprint(cfg) == config_fingerprint(old)
    assert config_fingerprint(cfg) != config_fingerprint(compose_cfg([*base, "task.loss=softmax_ce"]))
