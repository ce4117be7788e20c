"""scripts/bench_server_parts.py: each pair runs and is reported."""
import re

from conftest import load_script


def test_every_pair_is_timed(capsys):
    bench = load_script("bench_server_parts")
    assert bench.main(["--repeat", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(.+): ([0-9.]+) \(.*\) \| ([0-9.]+) \(.*\) = ([0-9.]+)x$", out, re.M)
    assert all(float(b) > 0 and float(c) > 0 for _, b, c, _ in rows)
    # the decoder pair needs the repository's history (a shallow clone has none)
    assert len(rows) == 3 or (len(rows) == 2 and "not measured (no git history" in out)
