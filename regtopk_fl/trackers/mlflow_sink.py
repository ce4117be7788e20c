"""``tracker=mlflow``: a run's settings as MLflow params, its rows as metrics.

One MLflow run per job (run name: the sweep job's overrides, or the run
directory's name; tag ``regtopk.run_dir``), one MLflow experiment per sweep
(the sweep directory's name; a single run goes to the experiment preset's
name, else "adhoc"; ``tracker.experiment`` sets it). Metrics: every numeric
metrics.csv column, step = round, as float64; params: the job's flat
settings (values as JSON scalars, strings as they are).

The store: ``tracker.uri`` (e.g. ``http://127.0.0.1:5000``, a tracking
server), else the embedded default ``sqlite:///<dir>/mlflow.db`` where <dir>
is the sweep directory in a Hydra sweep (all its jobs in one store) and the
run directory otherwise. The client is mlflow-skinny (the ``mlflow`` extra);
the UI comes with the full ``mlflow`` package: ``mlflow ui
--backend-store-uri sqlite:///<dir>/mlflow.db``.

Rows are sent in batches when the recorder flushes (every 2 s, at each
checkpoint, at the end), from the process that runs the server. A run
resumed from its checkpoint (or restarted in the same directory) deletes
the MLflow run of the earlier attempt (MLflow's soft delete; ``mlflow gc``
purges it) and logs the restored rows into a new one, so every round is in
the job's run once.
"""
from __future__ import annotations

import json

from . import job_place, metrics, wall_clock

RUN_DIR_TAG = "regtopk.run_dir"
MAX_METRICS, MAX_PARAMS = 1000, 100  # MLflow's log_batch limits


class MlflowSink:
    requires = ("mlflow",)  # import names settings.validate() looks for
    extra = "mlflow"        # the pyproject extra that installs them

    def __init__(self, name: str = "mlflow", uri: str | None = None,
                 experiment: str | None = None):
        self.name, self.uri, self.experiment = name, uri, experiment
        self.pending: list = []

    @staticmethod
    def check(options: dict):
        """(key, why) for each bad option (settings.validate)."""
        for key in ("uri", "experiment"):
            v = options.get(key)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                yield key, "must be null or a non-empty string"

    def open(self, recorder) -> None:
        import contextlib
        import os

        # mlflow logs INFO to its own stderr handler at import; the console shows warnings
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        from filelock import FileLock
        from mlflow import MlflowClient

        self.recorder = recorder
        run_dir = recorder.dir.resolve()
        root, experiment, _, run_name = job_place(run_dir)
        experiment = self.experiment or experiment or recorder.settings.get("experiment") or "adhoc"
        uri = self.uri or f"sqlite:///{root / 'mlflow.db'}"
        # jobs of a sweep side by side (joblib) share the embedded store: one
        # at a time creates the database and the experiment
        lock = FileLock(str(root / "mlflow.db.lock")) if self.uri is None else (
            contextlib.nullcontext())
        with lock:
            self.client = MlflowClient(tracking_uri=uri)
            exp_id = self._experiment(experiment, None if self.uri else root / "mlartifacts")
            for old in self.client.search_runs([exp_id], filter_string=(
                    f"tags.`{RUN_DIR_TAG}` = {json.dumps(str(run_dir))}")):
                self.client.delete_run(old.info.run_id)  # an earlier attempt of this job
        tags = {RUN_DIR_TAG: str(run_dir)}
        tags.update({f"regtopk.{k}": str(v) for k, v in recorder.identity.items()
                     if v is not None})
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        from mlflow.entities import Param

        params = [Param(k, param_text(v)) for k, v in sorted(recorder.settings.items())]
        for i in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS])

    def _experiment(self, name: str, artifacts) -> str:
        """The experiment's id, created if new (by another job meanwhile: fine)."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                name, artifact_location=None if artifacts is None else artifacts.as_uri())
        except MlflowException:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def add(self, row: dict) -> None:
        from mlflow.entities import Metric

        step, ms = int(row["round"]), int(wall_clock(self.recorder, row) * 1000)
        self.pending.extend(Metric(k, v, ms, step) for k, v in metrics(row).items())

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=pending[i:i + MAX_METRICS])

    def close(self, summary: dict) -> None:
        self.flush()
        status = {"finished": "FINISHED", "failed": "FAILED"}.get(summary.get("status"), "KILLED")
        self.client.set_terminated(self.run_id, status)


def param_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)
