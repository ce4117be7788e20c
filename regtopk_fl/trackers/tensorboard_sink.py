"""``tracker=tensorboard``: a run's rows as TensorBoard scalars, its settings
as HParams.

Event files go to ``<run dir>/<subdir>/`` (default ``tb``), written by
torch.utils.tensorboard's SummaryWriter in the process that runs the server:
* one scalar per numeric metrics.csv column and round (tag = column name,
  step = round; TensorBoard keeps scalars as float32), one event per round;
* the job's settings as the HParams plugin's session start info, and its end
  status (finished / failed) as the session end info. No experiment summary
  is written, so TensorBoard builds one from all the sessions under its
  logdir: ``tensorboard --logdir <sweep dir>`` compares a sweep's jobs in the
  HParams view, the settings that differ between them first.

A run resumed from its checkpoint (or restarted in the same directory)
starts the directory's event files anew and writes the restored rows again,
so every round is in them once.
"""
from __future__ import annotations

import time
from pathlib import Path

from . import job_place, metrics, wall_clock


class TensorBoardSink:
    requires = ("tensorboard",)  # import names settings.validate() looks for
    extra = "tensorboard"        # the pyproject extra that installs them

    def __init__(self, name: str = "tensorboard", subdir: str = "tb", flush_secs: float = 30):
        self.name, self.subdir, self.flush_secs = name, subdir, flush_secs
        self.writer = None

    @staticmethod
    def check(options: dict):
        """(key, why) for each bad option (settings.validate)."""
        sub = options.get("subdir")
        if (not isinstance(sub, str) or not sub.strip() or Path(sub).is_absolute()
                or ".." in Path(sub).parts):
            yield "subdir", "must be a folder name inside the run directory (e.g. tb)"
        fs = options.get("flush_secs")
        if isinstance(fs, bool) or not isinstance(fs, (int, float)) or not fs > 0:
            yield "flush_secs", "must be a number > 0"

    def open(self, recorder) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.recorder = recorder
        self.dir = recorder.dir / self.subdir
        for old in self.dir.glob("events.out.tfevents.*"):  # an earlier attempt's record
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(self.dir), flush_secs=self.flush_secs)
        trial = job_place(recorder.dir)[2]  # the HParams table's "Trial ID": the job's folder
        self.writer.file_writer.add_summary(session_start(recorder.settings, trial), 0)

    def add(self, row: dict) -> None:
        """One event per round holding all its scalars (what add_scalar
        writes, one value each: 16 events a round cost ~16x the time)."""
        from tensorboard.compat.proto import summary_pb2

        values = [summary_pb2.Summary.Value(tag=tag, simple_value=value)
                  for tag, value in metrics(row).items()]
        self.writer.file_writer.add_summary(summary_pb2.Summary(value=values),
                                            int(row["round"]), wall_clock(self.recorder, row))

    def flush(self) -> None:
        self.writer.flush()

    def close(self, summary: dict) -> None:
        rounds = summary.get("rounds_done", 0)
        self.writer.file_writer.add_summary(session_end(summary.get("status")), rounds)
        self.writer.close()


def hparam_values(settings: dict) -> dict:
    """Settings the HParams plugin can hold (bool, number, string); None is
    left out (a job without the key shows an empty cell)."""
    return {k: v for k, v in settings.items()
            if isinstance(v, (bool, int, float, str))}


def session_start(settings: dict, trial: str):
    from tensorboard.plugins.hparams import summary_v2

    return summary_v2.hparams_pb(hparam_values(settings), trial_id=trial,
                                 start_time_secs=time.time())


def session_end(status: str | None):
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    code = {"finished": api_pb2.STATUS_SUCCESS, "failed": api_pb2.STATUS_FAILURE}.get(
        status, api_pb2.STATUS_UNKNOWN)
    data = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=code, end_time_secs=time.time()))
    summary = summary_pb2.Summary()
    summary.value.add(tag=metadata.SESSION_END_INFO_TAG,
                      metadata=metadata.create_summary_metadata(data),
                      tensor=metadata.NULL_TENSOR)
    return summary
