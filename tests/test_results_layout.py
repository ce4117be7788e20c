"""results/ holds outputs, not programs (issue #31): a probe that a recorded
number depends on lives in scripts/probes/, with a line on what it measures."""
from regtopk_fl.paths import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "results"


def test_no_python_file_under_results():
    sweeps = RESULTS / "sweeps"  # git-ignored run directories, not recorded results
    found = [p.relative_to(PROJECT_ROOT).as_posix() for p in RESULTS.rglob("*.py")
             if sweeps not in p.parents]
    assert not found, f"move these to scripts/ (or delete them): {found}"


def test_each_probe_says_what_it_measures():
    probes = sorted((PROJECT_ROOT / "scripts" / "probes").rglob("*.py"))
    assert probes
    for p in probes:
        assert p.read_text().startswith('"""Probe '), p
