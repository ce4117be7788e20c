"""What every run writes into its run directory (a contract other tools use).

* ``metrics.csv``: one row per round (see COLUMNS), rewritten atomically
  (:class:`CsvFiles`, the ``tracker=csv`` sink, always one of the sinks);
* ``summary.json``: the run's identity and final numbers, written atomically,
  with ``status`` "running" while it goes and "finished" at the end;
* ``model.pt``: the final model;
* ``client_timing.csv`` (Flower runs): where each train message's time went
  in its ClientApp (:class:`ClientTiming`).

The rows also go to the sinks that ``tracker`` adds (regtopk_fl/trackers/:
TensorBoard, MLflow). A sink has four methods, all called in the process
that runs the server (in-process loop or Flower ServerApp):

* ``open(recorder)``: once, when the recorder is made, before any round; it
  drops what an earlier attempt in this run directory left in the sink
  (a killed run's rows come again, from its checkpoint);
* ``add(row)``: one round's row, in round order, also each row restored
  from a checkpoint (so after a resume every round is in the sink once);
* ``flush()``: make what was added durable (every ``flush_every_s`` seconds,
  at each checkpoint and at the end);
* ``close(summary)``: the run ended, ``summary["status"]`` says how.
"""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from array import array
from pathlib import Path

COLUMNS = ["round", "loss", "gap", "accuracy", "test_loss", "uplink_bytes",
           "uplink_coded_bytes", "downlink_bytes", "downlink_coded_bytes", "resyncs", "patches",
           "sent", "sampled", "replies", "missing", "rejected", "comm_s", "wall_s"]


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write, mode: str = "w") -> None:
    """Write a file so that a crash leaves the old file or the new one, never
    a truncated one: ``write(fh)`` into a temp file beside it, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"newline": ""} if "b" not in mode else {})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text))


def _cell(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def _total(values):
    """Sum of a column, None when it was never recorded (e.g. comm_s with the
    network model off)."""
    vals = [float(v) for v in values if v is not None and v != ""]
    return sum(vals) if vals else None


class CsvFiles:
    """The ``csv`` sink: ``metrics.csv``, rewritten whole at each flush."""

    def __init__(self, name: str = "csv"):
        self.name = name

    def open(self, recorder) -> None:
        self.recorder = recorder

    def add(self, row: dict) -> None:
        pass  # flush() writes every row

    def flush(self) -> None:
        import io
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        for row in self.recorder.rows:
            w.writerow([_cell(row.get(c)) for c in COLUMNS])
        atomic_write_text(self.recorder.dir / "metrics.csv", buf.getvalue())

    def close(self, summary: dict) -> None:
        pass


class ClientTiming:
    """A sink for Flower runs: ``client_timing.csv``, one row per train
    reply, the seconds its ClientApp said it spent on each phase
    (protocol/wire.py TIMING_PHASES, and their sum ``handle``), and
    ``summary.json`` ``client_timing_s``: the median of each over the run.
    What is left of a round's wall time beyond its clients' is Flower's and
    Ray's (messages, the ClientApp's start, the server's own work).

    The file grows by appending at each flush (a run of many clients has as
    many rows a round, so it is never rewritten whole); the medians keep one
    float per phase and message. Rows of this attempt only: a resumed run
    starts the file again."""

    name = "client_timing"

    def __init__(self, phases):
        self.phases = tuple(phases)
        self.seconds = {p: array("d") for p in (*self.phases, "handle")}
        self._pending: list = []

    def record(self, round: int, timing) -> None:
        """This round's ``[(worker, {phase: seconds})]``, in worker order."""
        for worker, sec in sorted(timing, key=lambda x: (x[0] is None, x[0] or 0)):
            values = [sec[p] for p in self.phases]
            values.append(sum(values))
            for p, v in zip(self.seconds, values):
                self.seconds[p].append(v)
            self._pending.append([round, worker, *values])

    def summary(self) -> dict:
        if not self.seconds["handle"]:
            return {}
        import statistics

        return {"client_timing_s": {p: statistics.median(v) for p, v in self.seconds.items()}}

    def open(self, recorder) -> None:
        self.path = recorder.dir / "client_timing.csv"
        atomic_write_text(self.path, ",".join(
            ["round", "worker", *(f"{p}_s" for p in self.phases), "handle_s"]) + "\n")
        recorder.extras.append(self.summary)

    def add(self, row: dict) -> None:
        pass

    def flush(self) -> None:
        if not self._pending:
            return
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows(
                [_cell(v) for v in r] for r in self._pending)
        self._pending = []

    def close(self, summary: dict) -> None:
        pass  # the recorder flushed before


class RunRecorder:
    """Collects per-round rows, writes summary.json and model.pt, and hands
    the rows to its sinks: :class:`CsvFiles` always (metrics.csv), then the
    ones given (``sinks``, e.g. the ``tracker`` group's; regtopk_fl/trackers/).
    ``settings``: the job's flat settings ("a.b" -> value) for the sinks that
    record them (hyperparameters, params)."""

    def __init__(self, run_dir, identity: dict, flush_every_s: float = 2.0, sinks=(),
                 settings: dict | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.identity = dict(identity)
        self.settings = dict(settings or {})
        self.rows: list = []
        self.flush_every_s = flush_every_s
        self.offset_s = 0.0  # wall time of a resumed run's earlier part
        self._last_flush = 0.0
        self.extras: list = []  # callables -> dicts merged into summary.json (e.g. trust.py)
        # metrics.csv whatever the tracker: plots, collect and resuming read it
        self.sinks = [CsvFiles(), *(s for s in sinks if not isinstance(s, CsvFiles))]
        for sink in self.sinks:
            sink.open(self)
        self.t0 = time.perf_counter()  # the run's clock starts once its sinks are ready

    def elapsed(self) -> float:
        return self.offset_s + time.perf_counter() - self.t0

    def add(self, row: dict) -> None:
        row = dict(row)
        row.setdefault("wall_s", self.elapsed())
        self.rows.append(row)
        for sink in self.sinks:
            sink.add(row)
        if time.perf_counter() - self._last_flush > self.flush_every_s:
            self.flush()

    def attach(self, sink) -> None:
        """One more sink, after the recorder was made (a runtime's own)."""
        self.sinks.append(sink)
        sink.open(self)

    def restore(self, rows: list, offset_s: float) -> None:
        """A checkpoint's rows and wall time (checkpoint.py); the sinks get
        the rows again, as the run's first rows."""
        self.rows, self.offset_s = [], offset_s
        for row in rows:
            self.rows.append(row)
            for sink in self.sinks:
                sink.add(row)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()
        self._last_flush = time.perf_counter()

    def final(self) -> dict:
        out = {}
        for key in ("loss", "gap", "accuracy"):
            vals = [r.get(key) for r in self.rows
                    if r.get(key) is not None and not (isinstance(r.get(key), float) and math.isnan(r.get(key)))]
            if vals:
                out[key] = vals[-1]
        return out

    def summary(self, status: str) -> dict:
        s = dict(self.identity)
        s.update({
            "status": status,
            "rounds_done": max((int(r["round"]) for r in self.rows), default=0),
            "final": self.final(),
            "uplink_bytes": int(sum(r.get("uplink_bytes", 0) for r in self.rows)),
            "uplink_coded_bytes": int(sum(r.get("uplink_coded_bytes", 0) for r in self.rows)),
            "downlink_bytes": int(sum(r.get("downlink_bytes", 0) for r in self.rows)),
            "downlink_coded_bytes": int(sum(r.get("downlink_coded_bytes") or 0 for r in self.rows)),
            "resyncs": int(sum(r.get("resyncs") or 0 for r in self.rows)),
            "patches": int(sum(r.get("patches") or 0 for r in self.rows)),
            "comm_s": _total(r.get("comm_s") for r in self.rows),
            "wall_time_s": self.elapsed(),
        })
        for extra in self.extras:
            s.update(extra())
        return s

    def write_summary(self, status: str) -> dict:
        s = self.summary(status)
        atomic_write_text(self.dir / "summary.json", json.dumps(s, indent=2, sort_keys=True) + "\n")
        return s

    def save_model(self, params, buffers) -> None:
        """``model.pt``: the final global model (and BatchNorm buffers), atomically."""
        import torch

        atomic_write(self.dir / "model.pt",
                     lambda fh: torch.save({"params": params, "buffers": buffers}, fh), "wb")

    def close(self, status: str = "finished") -> dict:
        """Flush, write summary.json with ``status`` and close every sink."""
        self.flush()
        summary = self.write_summary(status)
        for sink in self.sinks:
            sink.close(summary)
        return summary
