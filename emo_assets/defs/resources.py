"""Run-scoped resources: a model cache (each model loaded once per run) and a best-effort MLflow logger.

Both are `ConfigurableResource`s. Dagster copies a resource for each run and calls `setup_for_execution`
once per run and process, so their private state (loaded models, load counts, an MLflow failure) lives
exactly as long as one run.
"""

import contextlib
import gc
import math
import os
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import dagster as dg
from pydantic import PrivateAttr

from emo_assets.core.config import Settings
from emo_assets.core.models import LoadedModel
from emo_assets.core.paths import model_slug
from emo_assets.core.models import load_configured_model


class ModelCache(dg.ConfigurableResource):
    """Loaded language models of the current run, by slug, with a count of loads per slug.

    Torch models are too large to pickle between steps or to keep several of at once, so callers
    `get` a model, use it for all its partitions, and `release` it before the next one. `loads` lets the
    assets report (and tests assert) that a run loaded each model once.
    """

    _models: dict = PrivateAttr(default_factory=dict)
    _loads: Counter = PrivateAttr(default_factory=Counter)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._models, self._loads = {}, Counter()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        for slug in list(self._models):
            self.release(slug)

    def get(self, model_id: str, settings: Settings) -> LoadedModel:
        """The loaded model `model_id` (loaded with the settings' device and dtype on first use in the run)."""
        slug = model_slug(model_id)
        if slug not in self._models:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # one bar per weight file would drown the run's own log lines
            self._models[slug] = load_configured_model(model_id, settings)
            self._loads[slug] += 1
        return self._models[slug]

    def release(self, slug: str) -> None:
        """Drop a model and return its memory (and GPU cache) before the next model is loaded.

        A full `gc.collect()` walks every object of the process (Dagster, MLflow, sklearn: about a second here),
        so it runs only when reference counting alone did not free the model (a reference cycle held it).
        """
        loaded = self._models.pop(slug, None)
        if loaded is None:
            return
        model = weakref.ref(loaded.model)
        del loaded
        if model() is not None:
            gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def loads(self) -> dict[str, int]:
        """How many times each slug was loaded in this run."""
        return dict(self._loads)


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a call (MLflow reads its HTTP settings at call time)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class MlflowTracker(dg.ConfigurableResource):
    """Logs finished MLflow runs (params, metrics, files as artifacts); never fails a materialization.

    MLflow is a secondary record: the files and Dagster's metadata are the primary one. Any MLflow error
    is turned into a status string (`not logged (<reason>)`) that the asset puts in its metadata, plus a
    warning. MLflow's HTTP client retries for minutes by default, so requests here fail fast, and after one
    failure the rest of the run does not try again. An experiment created here on a local store keeps its
    artifacts under `artifact_root` (the results folder), not in MLflow's cwd-relative `./mlruns`.
    """

    tracking_uri: str
    experiment: str = "emo_assets"
    artifact_root: str = ""
    request_timeout_s: int = 5

    _client: object = PrivateAttr(default=None)
    _failure: str | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._client, self._failure = None, None

    def log_run(
        self,
        name: str,
        *,
        params: Mapping[str, object],
        metrics: Mapping[str, object],
        tags: Mapping[str, str],
        log,
        files: Sequence[Path] = (),
    ) -> str:
        """Log one run; return `logged (run <id>[, N artifacts])` or `not logged (<reason>)` (and warn through `log`).

        Non-numeric and non-finite metrics are left out; keys are made MLflow-safe.
        """
        if self._failure is not None:
            return f"not logged ({self._failure}; not retried in this run)"
        fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.request_timeout_s),
                # no usage reports to MLflow's servers from a research data pipeline (and no waiting for them
                # offline) unless the user opts in by setting the variable
                "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true")}
        try:
            with _environment(fast):
                run_id = self._log(name, params, metrics, tags, files)
        except Exception as exc:  # MLflow raises many types (MlflowException, requests, sqlalchemy errors)
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}"[:300]
            self._failure = reason
            log.warning(f"MLflow at {self.tracking_uri} failed, the run is not logged there: {reason}")
            return f"not logged ({reason})"
        return f"logged (run {run_id}, {len(files)} artifacts)" if files else f"logged (run {run_id})"

    def _experiment_id(self, client) -> str:
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        local = self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri
        location = Path(self.artifact_root).resolve().as_uri() if local and self.artifact_root else None
        return client.create_experiment(self.experiment, artifact_location=location)

    def _log(self, name: str, params: Mapping, metrics: Mapping, tags: Mapping, files: Sequence[Path]) -> str:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        client = self._client
        run = client.create_run(self._experiment_id(client), run_name=name, tags=dict(tags))
        now = int(time.time() * 1000)
        numeric = {
            _mlflow_key(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        try:
            client.log_batch(
                run.info.run_id,
                metrics=[Metric(key, value, now, 0) for key, value in numeric.items()],
                params=[Param(_mlflow_key(key), str(value)[:500]) for key, value in params.items()],
            )
            for path in files:
                client.log_artifact(run.info.run_id, str(path), artifact_path=name.replace("/", "_"))
        except Exception:
            with contextlib.suppress(Exception):
                client.set_terminated(run.info.run_id, status="FAILED")
            raise
        client.set_terminated(run.info.run_id)
        return run.info.run_id


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits, `_ - . / space`; anything else becomes `_`."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in str(key))


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The resources every asset here uses, configured from the settings."""
    return {
        "model_cache": ModelCache(),
        "mlflow": MlflowTracker(
            tracking_uri=settings.mlflow_tracking_uri,
            experiment=settings.mlflow_experiment,
            artifact_root=str(settings.results_dir / "mlflow-artifacts"),
        ),
    }
