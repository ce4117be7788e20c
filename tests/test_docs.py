"""The documentation stays true (issue #31): links and anchors resolve, the
`regtopk-fl` commands of the README and docs/ parse and validate, every
number of the results index is in the page it links to, and the config
reference is what conf/ generates. Each check is also shown to fail on a
planted fault, in a copy in tmp_path."""
import shutil

import pytest

from conftest import load_script
from regtopk_fl.paths import PROJECT_ROOT

check = load_script("check_docs")
gen = load_script("gen_config_reference")


def _copy_docs(tmp_path):
    """README.md and docs/ in a scratch root."""
    shutil.copy(PROJECT_ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(PROJECT_ROOT / "docs", tmp_path / "docs")
    return tmp_path


# -- links and anchors ------------------------------------------------------------

def test_every_relative_link_and_anchor_resolves():
    files = check.markdown_files()
    assert PROJECT_ROOT / "README.md" in files and PROJECT_ROOT / "results" / "README.md" in files
    assert not any("/results/sweeps/" in f.as_posix() for f in files)
    assert check.check_links() == []


@pytest.mark.parametrize("heading,anchor", [
    ("No lockout: honest comebacks (issue #17)", "no-lockout-honest-comebacks-issue-17"),
    ("Verdict on the paper's figures", "verdict-on-the-papers-figures"),
    ("`hydra/launcher=ray` (hydra-ray-launcher)", "hydralauncherray-hydra-ray-launcher"),
    ("Which Delta reproduces Fig. 2 (`experiment=fig2_distortion`, S = 0.6, 5 seeds)",
     "which-delta-reproduces-fig-2-experimentfig2_distortion-s--06-5-seeds"),
    ("S × mu: Top-k − RegTop-k", "s--mu-top-k--regtop-k"),
])
def test_anchors_follow_githubs_slug_rule(heading, anchor):
    assert check.slug(heading) == anchor


def test_a_repeated_heading_gets_a_numbered_anchor():
    assert check.anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_a_planted_broken_link_and_anchor_are_reported(tmp_path):
    root = _copy_docs(tmp_path)
    before = set(check.check_links(root))  # the copy lacks results/: those links fail alike
    page = root / "docs" / "extending.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no-such-page.md), "
                    "[a section](reference.md#no-such-section) and [fine](reference.md#config-keys).\n"
                    "`[in code](not-checked.md)`\n")
    after = set(check.check_links(root))
    new = sorted(after - before)
    assert len(new) == 2, new
    assert "no-such-page.md: no such file or folder" in new[0] + new[1]
    assert any("#no-such-section" in p for p in new)


# -- commands -----------------------------------------------------------------------

def test_every_regtopk_fl_command_in_readme_and_docs_parses_and_validates():
    problems, checked, skipped = check.check_commands()
    assert problems == []
    assert checked >= 20, (checked, skipped)


@pytest.mark.parametrize("value,first", [
    ("topk,regtopk", "topk"), ("range(10)", "0"), ("range(2,5)", "2"),
    ("choice(a,b)", "a"), ("0.5,1,2,4", "0.5"), ("'a,b'", "'a,b'"), ("3", "3"),
])
def test_a_sweep_value_becomes_its_first_job(value, first):
    assert check.first_value(value) == first


def test_hydra_keys_are_dropped_and_placeholders_skip_the_command():
    ov, _ = check.command_overrides(
        "regtopk-fl -m experiment=fig2_linreg 'seed=range(5)' hydra/launcher=joblib "
        "hydra.launcher.n_jobs=2 hydra.sweep.dir=results/sweeps/<dir> threads=1 ...  # note")
    assert ov == ["experiment=fig2_linreg", "seed=0", "threads=1"]
    ov, why = check.command_overrides("regtopk-fl runtime.ray_address=<head> rounds=3")
    assert ov is None and "placeholder" in why
    ov, _ = check.command_overrides(
        "taskset -c 0 .venv/bin/regtopk-fl faults.hostile.attacks=\"3:nan 4:absent\" | tee log")
    assert ov == ["faults.hostile.attacks='3:nan 4:absent'"]


def test_a_planted_bad_override_is_reported(tmp_path):
    root = _copy_docs(tmp_path)
    page = root / "docs" / "extending.md"
    page.write_text(page.read_text() + "\n```bash\n"
                    "regtopk-fl sparsifier=topk sparsifier.sparsity=1.5   # out of range\n"
                    "regtopk-fl -m sparsifier=topk,nosuch rounds=3        # first value is fine\n"
                    "regtopk-fl -m sparsifier=nosuch,topk \\\n    rounds=3  # unknown choice\n"
                    "regtopk-fl runtime=flower no_such_key=1\n"
                    "```\n")
    problems, _, _ = check.check_commands(root)
    assert len(problems) == 3, problems
    assert "sparsifier.sparsity=1.5: must be in (0, 1]" in problems[0]
    assert "nosuch" in problems[1] and "docs/extending.md" in problems[1]
    assert "no_such_key" in problems[2]


def test_a_missing_archive_or_weights_file_is_not_the_commands_fault():
    assert check.check_command(["experiment=fig3_authors",
                                "task.pretrained_weights=/no/such/resnet18.pth"]) == ""
    assert check.check_command(["task=cifar10", "task.data_path=/no/such/archive.tar.gz"]) == ""
    assert "must be" in check.check_command(["experiment=fig3_authors", "task.resize=3",
                                             "task.pretrained_weights=null"])


# -- numbers of the results index --------------------------------------------------

def _copy_results(tmp_path):
    """Every Markdown page of results/ (sub-folders too: the index links
    compare tables there), in the same layout."""
    src, res = PROJECT_ROOT / "results", tmp_path / "results"
    for p in src.rglob("*.md"):
        rel = p.relative_to(src)
        if rel.parts[0] in ("sweeps", "runs", "cache"):
            continue
        (res / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, res / rel)
    return res


def test_every_number_of_the_results_index_is_in_the_page_it_links():
    assert check.check_index_numbers() == []


def test_numbers_ignore_link_targets_and_words():
    assert check.numbers("[fig3.md](fig3.md#fig-3) 1.12× (1.09-1.17×), 11,173,962 h200 "
                         "−0.040 3.2e-12 <!-- 99 -->") == [
        "1.12", "1.09", "1.17", "11173962", "0.040", "3.2e-12"]
    assert check.appears("0.4", "x 0.4 y") and not check.appears("0.4", "x 0.45 y")
    assert not check.appears("0.4", "x 10.4 y") and check.appears("1.41", "flwr 1.41.0")


def test_a_changed_number_in_the_index_or_its_page_is_reported(tmp_path):
    res = _copy_results(tmp_path)
    assert check.check_index_numbers(res / "README.md") == []
    index = res / "README.md"
    text = index.read_text()
    assert "0.0166 ×" in text
    index.write_text(text.replace("0.0166 ×", "0.0167 ×", 1))
    problems = check.check_index_numbers(index)
    assert len(problems) == 1 and "0.0167" in problems[0] and "bytes.md" in problems[0]
    index.write_text(text)
    page = res / "speed.md"
    page.write_text(page.read_text().replace("3.79", "3.80"))
    problems = check.check_index_numbers(index)
    assert len(problems) == 1 and "'3.79'" in problems[0]


def test_a_number_with_no_page_beside_it_is_reported(tmp_path):
    res = _copy_results(tmp_path)
    index = res / "README.md"
    index.write_text(index.read_text() + "\n## Loose\n\nA claim of 42 % with no link.\n")
    problems = check.check_index_numbers(index)
    assert len(problems) == 1 and "no page linked" in problems[0]


# -- the generated config reference ----------------------------------------------

def test_the_config_reference_is_what_conf_generates():
    doc = (PROJECT_ROOT / "docs" / "reference.md").read_text()
    assert gen.committed(doc) == gen.generate(), (
        "docs/reference.md differs from conf/: run python scripts/gen_config_reference.py --write")


def test_the_config_reference_lists_every_key_and_group():
    text = gen.generate()
    for key in ("`num_workers`", "`server.max_norm_ratio`", "`participation.stale_feedback`",
                "`sparsifier=regtopk`", "`distortion`", "`runtime=flower`", "`client_gpus`",
                "`aggregate=trimmed_mean`", "`trim_fraction`", "`tracker=mlflow`", "`fig2_linreg`"):
        assert key in text, key


def test_a_changed_default_or_comment_fails_the_check(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(PROJECT_ROOT / "conf", conf)
    doc = tmp_path / "reference.md"
    shutil.copy(PROJECT_ROOT / "docs" / "reference.md", doc)
    assert gen.main(["--write", "--conf", str(conf), "--doc", str(doc)]) == 0
    assert gen.main(["--check", "--conf", str(conf), "--doc", str(doc)]) == 0
    y = conf / "sparsifier" / "regtopk.yaml"
    y.write_text(y.read_text().replace("mu: 1.0 ", "mu: 2.0 "))
    assert gen.main(["--check", "--conf", str(conf), "--doc", str(doc)]) == 1
    assert gen.main(["--write", "--conf", str(conf), "--doc", str(doc)]) == 0
    assert gen.main(["--check", "--conf", str(conf), "--doc", str(doc)]) == 0
    assert "| `mu` | `2.0` |" in doc.read_text()
    c = conf / "config.yaml"
    c.write_text(c.read_text().replace("# N, the number of workers", "# N, workers"))
    assert gen.main(["--check", "--conf", str(conf), "--doc", str(doc)]) == 1
