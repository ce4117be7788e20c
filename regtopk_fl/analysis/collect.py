"""Collect the jobs of one or more Hydra sweeps into one tidy table.

Every job directory (``sweep/0``, ``sweep/1``, ... or a single run directory)
holds ``.hydra/config.yaml``, ``.hydra/overrides.yaml``, ``metrics.csv`` (one
row per round) and, once it finished, ``summary.json``. ``collect`` gives one
row per job:

* ``sweep``, ``job`` (path relative to its sweep), ``job_dir``;
* ``status`` (finished / failed / unfinished) and ``reason`` (empty when
  finished). A job without ``summary.json``, whose summary says anything but
  ``finished``, or whose ``metrics.csv`` has fewer rounds than ``rounds`` is
  *listed*, never dropped; its result numbers (``final_*``, ``best_*``, byte
  totals, wall time) stay empty so they cannot be averaged in by accident, and
  ``rounds_completed`` says how far it got;
* one column per override key, named as on the command line
  (``sparsifier``, ``sparsifier.sparsity``, ``task.sigma2``...), numbers as
  numbers; the list of those keys is in ``df.attrs["override_keys"]``;
* the canonical fields ``task, runtime, sparsifier, sparsity, mu, distortion,
  num_workers, rounds, seed, experiment`` (from summary.json, else the
  overrides, else ``.hydra/hydra.yaml``'s choices and ``.hydra/config.yaml``),
  then every other summary field flattened (``final_loss``, ``final_gap``,
  ``final_accuracy``, ``uplink_bytes``...);
* ``best_loss`` / ``best_gap`` (minimum) and ``best_accuracy`` (maximum) over
  ``metrics.csv``, and ``rounds_completed``.

**Repeats.** ``seed`` is the repeat axis, never a setting: the column
``setting`` names each job's swept override keys other than ``seed`` and
``experiment`` (``"sparsifier=topk sparsifier.sparsity=0.4"``), so the
repeats of one setting share it; ``df.attrs["repeat_key"]`` is ``"seed"``.
``regtopk-collect --summary`` adds one row per setting with n and the mean
and 95 % t-interval half-width of every ``final_*`` and ``best_*`` number
(:mod:`regtopk_fl.analysis.stats`). A sweep of ``seed=range(10)`` runs the
same data, initial model and batch order for every method at one seed (all
are functions of ``seed`` alone), so methods compare paired by seed.

``load_curves`` gives the per-round metrics of every job in long form, with
the job's identifying columns repeated on each row and the cumulative traffic:
``uplink_bytes_cum``, ``uplink_mb_cum`` (raw uplink), ``downlink_mb_cum`` and
``traffic_mb_cum`` (coded uplink + downlink, what travels), and
``comm_s_cum`` (simulated communication time, when the run had a network model).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd
import yaml

FINISHED, FAILED, UNFINISHED = "finished", "failed", "unfinished"
METRICS = ("loss", "gap", "accuracy")
# override key -> canonical column
CANONICAL_KEYS = {
    "task": "task", "task.name": "task",
    "runtime": "runtime", "runtime.name": "runtime",
    "sparsifier": "sparsifier", "sparsifier.name": "sparsifier",
    "sparsifier.sparsity": "sparsity", "sparsifier.mu": "mu",
    "sparsifier.distortion": "distortion",
    "num_workers": "num_workers", "rounds": "rounds", "num_rounds": "rounds",
    "seed": "seed", "experiment": "experiment",
}
CANONICAL = ("experiment", "task", "runtime", "sparsifier", "sparsity", "mu", "distortion",
             "num_workers", "rounds", "seed")
ID_COLUMNS = ("sweep", "job", "job_dir", "status", "reason", "setting")
REPEAT_KEY = "seed"
NOT_A_SETTING = (REPEAT_KEY, "experiment")
JOB_MARKERS = ("summary.json", "metrics.csv", ".hydra")
RESULT_SUFFIXES = ("_bytes", "wall_time_s")


class CollectError(ValueError):
    """Bad input (a missing sweep directory, one without jobs); the message says which."""


# ---------------------------------------------------------------- reading ----

def parse_value(text):
    """An override's value as Hydra would type it: int, float, bool, None or str."""
    s = str(text).strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    low = s.lower()
    if low in ("null", "none", "~"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def parse_overrides(lines) -> dict:
    """``["sparsifier=regtopk", "+task.sigma2=5", "~foo"]`` -> ``{"sparsifier": "regtopk",
    "task.sigma2": 5}`` (deletions and ``hydra.*`` keys are left out)."""
    out = {}
    for line in lines or ():
        key, eq, value = str(line).partition("=")
        key = key.strip().lstrip("+")
        if not eq or key.startswith("~") or key.startswith("hydra."):
            continue
        out[key] = parse_value(value)
    return out


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def find_jobs(sweep: Path) -> list:
    """Job directories below (or equal to) ``sweep``, in natural order (2 before 10)."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise CollectError(f"{sweep}: no such directory")
    jobs = {p.parent for marker in JOB_MARKERS for p in sweep.rglob(marker)
            if p.name != ".hydra" or p.is_dir()}
    # (a summary.json or metrics.csv inside some job's .hydra/ is not a job of its own)
    jobs = {j for j in jobs if ".hydra" not in j.relative_to(sweep).parts}
    return sorted(jobs, key=lambda j: _natural_key(j.relative_to(sweep)))


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def config_value(job_dir, key: str, default=None):
    """The value of a dotted ``key`` in a job's ``.hydra/config.yaml`` (what it
    ran with when the key was not overridden); a group's choice for a group."""
    node = _read_yaml(Path(job_dir) / ".hydra" / "config.yaml")
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return _name(node) if isinstance(node, dict) else node


def fill_from_config(jobs: pd.DataFrame, key: str) -> pd.Series:
    """An override key's values, where a job did not override it the value in
    its ``.hydra/config.yaml`` (so sweeps that differ in one override line up)."""
    col = jobs[key].copy() if key in jobs else pd.Series(None, index=jobs.index, dtype=object)
    miss = col.isna()
    if miss.any():
        col = col.astype(object)
        col[miss] = [config_value(j, key) for j in jobs.loc[miss, "job_dir"]]
    return col


def setting_labels(df: pd.DataFrame, keys) -> pd.Series:
    """One label per row from the swept ``keys`` other than the repeat key:
    ``"sparsifier=topk sparsifier.sparsity=0.4"`` (empty when nothing else was swept)."""
    keys = [k for k in keys if k not in NOT_A_SETTING and k in df
            and df[k].nunique(dropna=True) > 1]
    if not keys or df.empty:
        return pd.Series("", index=df.index, dtype=object)
    parts = [df[k].map(lambda v, k=k: "" if v is None or (isinstance(v, float) and v != v)
                       else f"{k}={v}") for k in keys]
    return pd.concat(parts, axis=1).apply(lambda r: " ".join(x for x in r if x), axis=1)


def _name(node):
    """A config group's choice: the node itself when a string, else its ``name``."""
    if isinstance(node, dict):
        return node.get("name")
    return node if isinstance(node, str) else None


def _from_config(job: Path) -> dict:
    """Canonical fields from ``.hydra/config.yaml`` and ``.hydra/hydra.yaml``'s choices."""
    cfg = _read_yaml(job / ".hydra" / "config.yaml") or {}
    out = {}
    if isinstance(cfg, dict):
        sp = cfg.get("sparsifier")
        if isinstance(sp, dict):
            out.update({k: sp[k] for k in ("sparsity", "mu", "distortion") if k in sp})
        for key in ("task", "runtime", "sparsifier", "experiment"):
            out[key] = _name(cfg.get(key))
        for key, alias in (("num_workers", None), ("rounds", "num_rounds"), ("seed", None)):
            value = cfg.get(key, cfg.get(alias) if alias else None)
            if value is None and isinstance(cfg.get("task"), dict):
                value = cfg["task"].get(key)  # e.g. task.num_workers
            out[key] = value
    hydra = _read_yaml(job / ".hydra" / "hydra.yaml") or {}
    try:
        choices = hydra["hydra"]["runtime"]["choices"]
    except (KeyError, TypeError):
        choices = {}
    for key in ("task", "runtime", "sparsifier", "experiment"):
        if isinstance(choices.get(key), str):
            out[key] = choices[key]
    return {k: v for k, v in out.items() if v is not None}


def read_metrics(job: Path) -> pd.DataFrame | None:
    path = job / "metrics.csv"
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=["round", *METRICS])
    for col in df.columns:
        converted = pd.to_numeric(df[col], errors="coerce")
        if converted.notna().sum() == df[col].notna().sum():  # numeric or empty column
            df[col] = converted
    return df


def rounds_completed(metrics: pd.DataFrame | None, expected=None) -> int:
    """Distinct training rounds in ``metrics.csv``. A row for round 0 is an initial
    evaluation when the rounds run 0..R (R+1 distinct values for R expected rounds)."""
    if metrics is None or "round" not in metrics or metrics.empty:
        return 0
    rounds = metrics["round"].dropna()
    n = int(rounds.nunique())
    if (rounds == 0).any() and expected is not None and not pd.isna(expected) and n > expected:
        n -= 1
    return n


def is_result(column: str) -> bool:
    """A number that only a finished job has (blanked for the others)."""
    return column.startswith(("final_", "best_")) or column.endswith(RESULT_SUFFIXES)


def _flatten(summary: dict) -> dict:
    flat = pd.json_normalize(summary, sep="_").iloc[0].to_dict()
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()
            if v != {}}  # an empty "final" says nothing


def _status(summary, summary_error, metrics, done, expected):
    """(status, reason) of one job."""
    if summary_error:
        return FAILED, summary_error
    state = summary.get("status", FINISHED)
    if state == FAILED:
        error = summary.get("error")
        return FAILED, "status failed" + (f": {error}" if error else "")
    if state != FINISHED:
        return UNFINISHED, f"status {state}"
    if metrics is None:
        return UNFINISHED, "no metrics.csv"
    if expected is not None and not pd.isna(expected) and done < expected:
        return UNFINISHED, f"metrics.csv has {done} of {int(expected)} rounds"
    return FINISHED, ""


def read_job(sweep: Path, job: Path):
    """(row dict, override keys, metrics DataFrame or None) of one job."""
    overrides = parse_overrides(_read_yaml(job / ".hydra" / "overrides.yaml"))
    metrics = read_metrics(job)

    summary, summary_error = {}, None
    try:
        summary = json.loads((job / "summary.json").read_text())
        if not isinstance(summary, dict):
            summary, summary_error = {}, "summary.json is not a JSON object"
    except FileNotFoundError:
        summary_error = "no summary.json"
    except (OSError, ValueError) as e:
        summary_error = f"summary.json unreadable ({e})"

    row = dict.fromkeys(CANONICAL)
    row.update(_from_config(job))
    row.update({CANONICAL_KEYS[k]: v for k, v in overrides.items() if k in CANONICAL_KEYS})
    row.update(overrides)
    row.update(_flatten(summary) if summary else {})
    row.pop("status", None)
    summary_status = summary.get("status")

    done = rounds_completed(metrics, row.get("rounds"))
    status, reason = _status(summary, summary_error, metrics, done, row.get("rounds"))
    best = {}
    if metrics is not None and status == FINISHED:
        for col, how in (("loss", "min"), ("gap", "min"), ("accuracy", "max")):
            if col in metrics:
                best[f"best_{col}"] = metrics[col].agg(how)
    ident = {"sweep": str(sweep), "job": job.relative_to(sweep).as_posix() or ".",
             "job_dir": str(job), "status": status, "reason": reason,
             "summary_status": summary_status}
    if status != FINISHED:  # keep its numbers out of any aggregate
        row = {k: v for k, v in row.items() if not is_result(k)}
    return {**ident, **row, **best, "rounds_completed": done}, list(overrides), metrics


def sweep_experiment(sweep: Path):
    """The ``experiment`` preset named in the sweep's top-level ``multirun.yaml``."""
    hydra = (_read_yaml(sweep / "multirun.yaml") or {}).get("hydra")
    if not isinstance(hydra, dict):
        return None
    choices = (hydra.get("runtime") or {}).get("choices") or {}
    if isinstance(choices.get("experiment"), str):
        return choices["experiment"]
    task = (hydra.get("overrides") or {}).get("task") or []
    return parse_overrides(task).get("experiment")


def scan(sweep_dirs):
    """(jobs table, {job_dir: metrics DataFrame or None})."""
    if isinstance(sweep_dirs, (str, Path)):
        sweep_dirs = [sweep_dirs]
    rows, keys, curves = [], [], {}
    for sweep in map(Path, sweep_dirs):
        jobs = find_jobs(sweep)
        if not jobs:
            raise CollectError(f"{sweep}: no jobs (no summary.json, metrics.csv or .hydra/ "
                               "below it)")
        experiment = sweep_experiment(sweep)
        for job in jobs:
            row, job_keys, metrics = read_job(sweep, job)
            if row.get("experiment") is None:
                row["experiment"] = experiment
            rows.append(row)
            keys += [k for k in job_keys if k not in keys]
            curves[row["job_dir"]] = metrics
    if not rows:
        raise CollectError("no sweep directory given")
    df = pd.DataFrame(rows)
    for key in keys:  # a key some sweeps override: the others' value from their config
        if df[key].isna().any() and df[key].notna().any():  # (else keep and forget runs pool)
            df[key] = fill_from_config(df, key)
    df["setting"] = setting_labels(df, keys)
    finals = [f"final_{m}" for m in METRICS]
    order = list(dict.fromkeys([*ID_COLUMNS, *keys, *CANONICAL, *finals, *df.columns]))
    df = df.reindex(columns=order)
    always = {*ID_COLUMNS, *keys, *CANONICAL, *finals}
    df = df[[c for c in df.columns if c in always or df[c].notna().any()]]
    df.attrs["override_keys"] = keys
    df.attrs["repeat_key"] = REPEAT_KEY
    return df, curves


# ------------------------------------------------------------------ API -----

def collect(sweep_dirs) -> pd.DataFrame:
    """One row per job of the given sweep (or run) directories; see the module doc."""
    return scan(sweep_dirs)[0]


def curves_from(jobs: pd.DataFrame, metrics: dict) -> pd.DataFrame:
    """Long per-round table from ``scan``'s output (for callers that already scanned)."""
    frames = {j: m for j, m in metrics.items() if m is not None and not m.empty}
    if not frames:
        return pd.DataFrame(columns=["job_dir", "round", *METRICS])
    long = pd.concat(frames, names=["job_dir", None]).reset_index(level=0)
    keys = jobs.attrs.get("override_keys", [])
    ident = [c for c in dict.fromkeys([*ID_COLUMNS, *keys, *CANONICAL])
             if c in jobs and (c == "job_dir" or c not in long)]
    long = long.merge(jobs[ident], on="job_dir", how="left")
    if "uplink_bytes" in long:
        long["uplink_bytes_cum"] = long.groupby("job_dir")["uplink_bytes"].cumsum()
        long["uplink_mb_cum"] = long["uplink_bytes_cum"] / 1e6
    # traffic as it travels: coded bytes where the run recorded them
    up = _coded(long, "uplink")
    down = _coded(long, "downlink")
    if up is not None and down is not None:
        by = long["job_dir"]
        long["traffic_mb_cum"] = (up + down).groupby(by).cumsum() / 1e6
        long["downlink_mb_cum"] = down.groupby(by).cumsum() / 1e6
    if "comm_s" in long and long["comm_s"].notna().any():
        long["comm_s_cum"] = long["comm_s"].groupby(long["job_dir"]).cumsum()
    front = [c for c in ident if c != "job_dir"]
    long = long[[*front, "job_dir", *[c for c in long if c not in ident]]]
    long.attrs["override_keys"] = keys
    return long


def _coded(df: pd.DataFrame, side: str):
    """``{side}_coded_bytes``, falling back to the raw count where a run did
    not record coded bytes (runs made before the sparse downlink)."""
    raw, coded = f"{side}_bytes", f"{side}_coded_bytes"
    if raw not in df:
        return None
    out = pd.to_numeric(df[raw], errors="coerce")
    if coded in df:
        out = pd.to_numeric(df[coded], errors="coerce").fillna(out)
    return out


def summarise(jobs: pd.DataFrame) -> pd.DataFrame:
    """One row per ``setting`` (finished jobs only): the setting's override
    values, ``n`` (repeats), and for every ``final_*`` / ``best_*`` column its
    mean and the half-width of its 95 % t-interval (``*_hw``)."""
    from .stats import t_interval

    fin = jobs[jobs["status"] == FINISHED]
    keys = [k for k in jobs.attrs.get("override_keys", []) if k not in NOT_A_SETTING]
    cols = [c for c in fin.columns if c.startswith(("final_", "best_"))
            and pd.api.types.is_numeric_dtype(fin[c]) and fin[c].notna().any()]
    rows = []
    for setting, g in fin.groupby("setting", sort=False, dropna=False):
        row = {"setting": setting, **{k: g[k].iloc[0] for k in keys if k in g},
               "n": len(g), "seeds": " ".join(map(str, sorted(g[REPEAT_KEY].dropna().unique())))
               if REPEAT_KEY in g else ""}
        for c in cols:
            mean, hw, _ = t_interval(g[c])
            row[c], row[f"{c}_hw"] = mean, hw
        rows.append(row)
    return pd.DataFrame(rows)


def load_curves(sweep_dirs) -> pd.DataFrame:
    """Per-round metrics of every job (finished or not: filter on ``status``), long form:
    job identity, override keys, canonical fields, then the metrics.csv columns."""
    return curves_from(*scan(sweep_dirs))


# ------------------------------------------------------------------ CLI -----

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def write_table(df: pd.DataFrame, out: Path) -> list:
    """CSV, and Parquet beside it when pyarrow is importable; returns the files written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    written = [out]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return written
    parquet = out.with_suffix(".parquet")
    try:
        # mixed-type override columns (e.g. 5 and "iid") would not fit one Arrow type
        mixed = [c for c in df.columns if df[c].dtype == object]
        df.astype({c: "string" for c in mixed}).to_parquet(parquet, index=False)
        written.append(parquet)
    except (ValueError, TypeError, OSError) as e:
        print(f"regtopk-collect: warning: no Parquet written ({e})", file=sys.stderr)
    return written


def main(argv=None) -> int:
    parser = OneLineParser(prog="regtopk-collect",
                            description="Collect sweep jobs into one table (one row per job).")
    parser.add_argument("sweeps", nargs="+", metavar="SWEEP_DIR",
                        help="Hydra sweep (or single run) directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV to write (default: <first SWEEP_DIR>/table.csv); "
                             "a .parquet is written beside it")
    parser.add_argument("--summary", action="store_true",
                        help="also write <OUT stem>_summary.csv: one row per setting (seed "
                             "is the repeat axis) with n, mean and 95%% t-interval half-width")
    args = parser.parse_args(argv)
    try:
        df = collect(args.sweeps)
    except CollectError as e:
        parser.error(str(e))
    out = args.out or Path(args.sweeps[0]) / "table.csv"
    files = write_table(df, out)
    if args.summary:
        summary = out.with_name(out.stem + "_summary.csv")
        summarise(df).to_csv(summary, index=False)
        files.append(summary)
    counts = df["status"].value_counts()
    print(f"{len(df)} jobs ({', '.join(f'{n} {s}' for s, n in counts.items())}) -> "
          + ", ".join(map(str, files)))
    for job in df[df["status"] != FINISHED].itertuples():
        print(f"  {job.job_dir}: {job.status} ({job.reason})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
