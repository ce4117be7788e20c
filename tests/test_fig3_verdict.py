"""Issue #30's tables: the GPU script's CPU smoke run (both cells, paired
compare tables), and scripts/fig3_verdict.py from kept runs to the verdict
block of the results index."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_fig3")
    data = tmp / "data.tar.gz"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_data.py"), "synthetic", str(data),
                    "--train", "100", "--test", "10"], check=True, capture_output=True)
    env = dict(os.environ, OUT=str(tmp / "out"), DEVICE="cpu", ROUNDS="2", SEEDS="2", PAR="2",
               CELLS="paper cause",
               DATA=str(data), BUNDLE=str(tmp / "none"), PY=sys.executable, CAP_S="400",
               EXTRA="task.width=4 task.test_subset=10 eval_every=1 threads=1")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_fig3_verdict.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return tmp / "out"


def test_gpu_script_runs_both_cells_and_compares_them(gpu_smoke):
    log = (gpu_smoke / "fig3_verdict_gpu.log").read_text()
    for cell in ("paper", "cause"):
        c = pd.read_csv(gpu_smoke / cell / "compare" / "compare.csv")
        assert c["n"].tolist() == [2] and c["seeds"].tolist() == ["0 1"], cell
        assert f"== {cell}:" in log
    # the cause cell ran the ablation's switch: 10 local steps, last gradient
    hydra = (gpu_smoke / "cause" / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "local_steps=10" in hydra and "upload=last_gradient" in hydra
    assert not list(gpu_smoke.rglob("model.pt"))


def test_verdict_table_from_kept_runs(gpu_smoke, tmp_path):
    """Kept runs -> regtopk-plot's compare -> a verdict row with n, CI and a word;
    the index's block is replaced and nothing else of the page changes."""
    sweeps = tmp_path / "sweeps"
    shutil.copytree(gpu_smoke / "paper", sweeps / "fig3_paper_1e-3")
    index = tmp_path / "README.md"
    index.write_text("# results\n\n<!-- verdict:begin -->\nPLACEHOLDER\n<!-- verdict:end -->\n\nkept\n")
    out = tmp_path / "fig3"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fig3_verdict.py"),
                           "--sweeps", str(sweeps), "--out", str(out), "--index", str(index)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = sorted(p.name for p in (out / "paper_1e-3" / "runs").iterdir() if p.is_dir())
    assert kept == ["0", "1", "2", "3"]
    assert (out / "paper_1e-3" / "runs" / "0" / ".hydra" / "overrides.yaml").exists()
    c = pd.read_csv(out / "paper_1e-3" / "compare.csv").iloc[0]
    text = index.read_text()
    assert text.startswith("# results\n\n<!-- verdict:begin -->\n") and text.endswith("kept\n")
    assert "PLACEHOLDER" not in text
    row = next(ln for ln in text.splitlines() if "S = 1e-3, 1500 it." in ln)
    lo, hi = (("+" if v > 0 else "") + f"{v:.4g}" for v in (c["ci_low"], c["ci_high"]))
    assert f"[{lo}, {hi}]" in row and "| 2 |" in row
    # a stage that did not run says so, with its command
    assert "not run (`bash scripts/fig3_evidence.sh paper_1e-4`)" in text
    # rerunning from the kept files alone gives the same table
    before = (out / "verdict.md").read_text()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "fig3_verdict.py"), "--no-keep",
                    "--sweeps", str(tmp_path / "none"), "--out", str(out), "--index",
                    str(index)], check=True, capture_output=True, cwd=ROOT)
    assert (out / "verdict.md").read_text() == before


@pytest.mark.parametrize("lo, hi, size, word", [
    (0.5, 2.0, None, "reproduced"),
    (-0.5, 2.0, None, "not resolved"),
    (-2.0, -0.5, None, "not reproduced"),
    (0.5, 2.0, 8.0, "not reproduced"),     # resolved, but the stated 8 points excluded
    (-0.2, 9.0, 8.0, "not resolved"),
    (8.5, 12.0, 8.0, "reproduced"),
])
def test_verdict_word(lo, hi, size, word):
    assert load_script("fig3_verdict").verdict_word(lo, hi, size) == word


def test_a_switch_is_a_cause_only_where_its_base_is_not_reproduced():
    v = load_script("fig3_verdict")
    rows = [{"figure": "Fig. 3", "claim": "text", "_lo": -0.1, "verdict": "not reproduced"},
            {"figure": "Fig. 3, ablation", "claim": "base", "base": True, "_lo": -1,
             "verdict": "not resolved"},
            {"figure": "Fig. 3, ablation", "claim": "+ local", "_lo": 1, "verdict": "reproduced"}]
    assert v.overall(rows)["verdict"] == "**reproduced only under + local**"
    rows[1]["verdict"] = "reproduced"
    assert v.overall(rows)["verdict"] == "**not reproduced**"


def test_a_stage_whose_seeds_all_tie_is_not_reproduced(tmp_path, monkeypatch):
    """CI [0, 0] (RegTop-k's run bitwise Top-k's on every seed) opens no gap:
    'not reproduced', not 'not resolved'."""
    v = load_script("fig3_verdict")
    monkeypatch.setattr(v, "OUT", tmp_path)
    row = {"n": 5, "diff_mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_wilcoxon": float("nan"),
           "wins": 0, "losses": 0, "ties": 5}
    for d in (tmp_path / "ablation_sparsity", tmp_path / "ablation_sparsity" / "last5"):
        d.mkdir(parents=True)
        pd.DataFrame([row]).to_csv(d / "compare.csv", index=False)
    r = v.stage_row("ablation_sparsity")
    assert r["verdict"] == "not reproduced" and "tied on all 5 seeds" in r["measured"]
    row.update(ties=2, wins=2, losses=1, ci_low=-0.1, ci_high=0.3)
    pd.DataFrame([row]).to_csv(tmp_path / "ablation_sparsity" / "compare.csv", index=False)
    assert v.stage_row("ablation_sparsity")["verdict"] == "not resolved"
