"""The downlink per sampled client against the model's bytes (issue #16).

    python scripts/downlink_report.py RUN_DIR [RUN_DIR ...] [--out FILE.md]

For each finished run directory (metrics.csv, model.pt): the model's bytes
(params + BatchNorm buffers, as a resync sends them without the optimizer
state), the coded downlink summed over rounds 1..R divided by the number of
clients sent something (``sampled``; every worker under full participation),
that ratio to the model's bytes, the same from round 2 on (round 1 sends only
headers: everyone builds model_0 from the seed), and the counts of patches
and resyncs. Counts and bytes only: no timings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch


def report(run_dir: Path) -> dict:
    rows = pd.read_csv(run_dir / "metrics.csv")
    rows = rows[rows["round"] > 0]
    model = torch.load(run_dir / "model.pt", weights_only=False, map_location="cpu")
    nbytes = sum(t.numel() * t.element_size() for t in (model["params"], model["buffers"])
                 if t is not None)
    sent = rows["sampled"].fillna(0).astype(int)
    later = rows["round"] > 1
    per = rows["downlink_coded_bytes"].sum() / max(1, sent.sum())
    per2 = rows.loc[later, "downlink_coded_bytes"].sum() / max(1, sent[later].sum())
    return {"run": str(run_dir), "rounds": int(rows["round"].max()),
            "model_bytes": int(nbytes), "clients_sent": int(sent.sum()),
            "patches": int(rows["patches"].sum()) if "patches" in rows else 0,  # older runs
            "resyncs": int(rows["resyncs"].sum()),
            "downlink_per_client": round(per), "per_client_over_model": round(per / nbytes, 4),
            "from_round_2_over_model": round(per2 / nbytes, 4),
            "max_round_per_client_over_model": round(float(
                (rows["downlink_coded_bytes"] / sent.clip(lower=1)).max() / nbytes), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    table = [report(r) for r in args.runs]
    cols = list(table[0])
    text = "\n".join(["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
                     + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in table])
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
