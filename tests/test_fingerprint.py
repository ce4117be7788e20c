"""A checkpoint written before this version still resumes: the config
fingerprint (checkpoint.config_fingerprint) of a setting that already existed
is the one the code of commit 5441123 computed for it, although the settings
have moved since (the aggregate group, the Flower runtime's entry point) and
gained keys (at their defaults they compute what ran before).

The hashes below were computed by 5441123's own code for the old spelling of
each setting (``server.aggregate=median`` then, ``aggregate=median`` now)."""
import pytest

from regtopk_fl.checkpoint import config_fingerprint

BEFORE = [
    ([], "c950b943d1a66fb31630dd0063262569b7c7f41e4f8c9ebae3345e34d3b9ae7a"),
    (['experiment=fig2_linreg'], "42cd07cb736f1aade72e9464f8d5602f14ba6ccaef3cb4c3789f43ef3e663bab"),
    (['task=tiny_image', 'sparsifier=gaussiank', 'runtime=flower'], "f5537b5534046d1099e8154e16f64ba6ef39f73b936ddf8ab9e23244c9d430b2"),
    (['participation.clients_per_round=5'], "d61bc020395fc09c751492fbc30cb29d215f32fdfea1f55271cfda22cb5b294c"),
    (['sparsifier=topk', 'momentum=0.9'], "6c8fbf611c4d94c101336aeb3ebee091331a757d1ad4dad45339e53d75257613"),
    (['aggregate=trimmed_mean', 'aggregate.trim_fraction=0.2'], "6e9c6cc52a64a31ee1c07d14dff2986f171d199c6a3d35d1c3cb7381b12ac12e"),
    (['aggregate=median'], "50409ec3796241d07880c9d0eca0c8def4cb5fe282f8880f0f2ff66134441d4f"),
    (['experiment=fig3_cifar10_cpu'], "2f4b25f97e2f12cdcf96c0cb78345666ea0cca239403a3af521741f24c968574"),
    (['faults.hostile.worker=1', 'faults.hostile.attacks=3:absent'], "14233c6e981c0d8a356b70a64ee001f78ac0207f75bbbfd47c7c3bb8bd74d11b"),
]


@pytest.mark.parametrize("overrides, fingerprint", BEFORE)
def test_old_checkpoints_keep_their_fingerprint(make_cfg, overrides, fingerprint):
    assert config_fingerprint(make_cfg(overrides)) == fingerprint


def test_new_settings_change_the_fingerprint(make_cfg):
    """The mapping does not hide what is new: a setting that did not exist
    then, or a non-default value of a new key, gives another fingerprint."""
    base = config_fingerprint(make_cfg([]))
    for overrides in (["aggregate=centered_clip"], ["faults.hostile.scale=3"],
                      ["sparsifier=gaussiank", "sparsifier.budget_factor=4"]):
        assert config_fingerprint(make_cfg(overrides)) not in (base, *[h for _, h in BEFORE])


def test_where_ray_schedules_leaves_the_fingerprint(make_cfg):
    """runtime.num_cpus changes how many clients run at once, not what a run
    computes: a checkpoint resumes under any value of it."""
    base = config_fingerprint(make_cfg(["runtime=flower"]))
    for v in ("null", "3", "auto"):
        assert config_fingerprint(make_cfg(["runtime=flower", f"runtime.num_cpus={v}"])) == base


def test_download_auto_fingerprints_as_false(make_cfg):
    """task.download=auto (#31's default) reads data_path where it exists, as
    false did: a CIFAR-10 checkpoint made with false resumes; true stays apart."""
    fp = {v: config_fingerprint(make_cfg(["experiment=fig3_cifar10_cpu", f"task.download={v}"]))
          for v in ("auto", "false", "true")}
    pinned = dict((tuple(o), h) for o, h in BEFORE)[("experiment=fig3_cifar10_cpu",)]
    assert fp["auto"] == fp["false"] == pinned
    assert fp["true"] != fp["false"]
