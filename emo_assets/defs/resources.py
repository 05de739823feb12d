"""Run-scoped resources: a model cache (each model loaded once per run) and a best-effort MLflow logger.

Both are `ConfigurableResource`s. Dagster copies a resource for each run and calls `setup_for_execution`
once per run and process, so their private state (loaded models, load counts, an MLflow failure) lives
exactly as long as one run. A new local MLflow store is created by a child process started at setup (see
`_start_creating_store`), the one piece of state that outlives a run.
"""

import contextlib
import gc
import json
import logging
import math
import os
import subprocess
import sys
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from emo_assets.core.config import Settings
from emo_assets.core.datasets import file_sha256
from emo_assets.core.models import LoadedModel, hide_load_progress, load_configured_model
from emo_assets.core.paths import model_slug
from emo_assets.defs import loaded_settings

# MLflow 3's experiment kind (the UI's "experiment type"): this project's runs are model development.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
MAX_DIGEST = 36  # MLflow's limit on a dataset digest (mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE)


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
            hide_load_progress()
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


@dataclass(frozen=True)
class TrackedDataset:
    """A dataset file that a logged run read: shown in MLflow's Dataset column as `name (digest)`."""

    name: str  # the dataset variant, e.g. "baseline"
    path: Path
    sha256: str | None = None  # of the bytes the run read; None: hash the file as it is when the run is logged


# Creates the store of the tracking URI given as argument, the way the logging client would on first use.
_CREATE_STORE = "import sys; from mlflow import MlflowClient; MlflowClient(tracking_uri=sys.argv[1])"
_CREATING: dict[str, subprocess.Popen] = {}


def _new_sqlite_store(tracking_uri: str) -> Path | None:
    """The database file of a sqlite tracking URI whose file does not exist yet; None for any other URI."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(tracking_uri).database
    return Path(database) if database and not Path(database).exists() else None


def _start_creating_store(tracking_uri: str, environment: Mapping[str, str]) -> None:
    """Create a new sqlite store in a child process, so that its dozens of schema migrations, each committed
    to disk, overlap the run's first work (model loads, the first forward passes) instead of delaying its first
    log. A child process, not a thread: importing MLflow and SQLAlchemy's lazily loaded modules next to the
    run's own imports is not thread-safe. If the child fails, the first log creates the store as before."""
    path = _new_sqlite_store(tracking_uri)
    if path is None or tracking_uri in _CREATING:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _CREATING[tracking_uri] = subprocess.Popen(
        [sys.executable, "-c", _CREATE_STORE, tracking_uri],
        env={**os.environ, **environment},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_store(tracking_uri: str) -> None:
    child = _CREATING.pop(tracking_uri, None)
    if child is not None:
        child.wait()


class MlflowTracker(dg.ConfigurableResource):
    """Logs finished MLflow runs (params, metrics, files as artifacts); never fails a materialization.

    MLflow is a secondary record: the files and Dagster's metadata are the primary one. Any MLflow error
    is turned into a status string (`not logged (<reason>)`) that the asset puts in its metadata, plus a
    warning. MLflow's HTTP client retries for minutes by default, so requests here fail fast, and after one
    failure the rest of the run does not try again. An experiment created here on a local store keeps its
    artifacts under `artifact_root` (the results folder), not in MLflow's cwd-relative `./mlruns`.

    What the MLflow UI shows:
    - The experiment's kind tag says "model development" (MLflow's clients and assistant read it; the 3.17 web
      UI decides between its GenAI overview and the runs table by its own switch, see `make mlflow-ui`).
    - A run is logged after its work, so the caller passes when the work started (and ended): the run's
      start and end are those times, not the few milliseconds of logging.
    - Each dataset file a run read is a dataset input (source: its path; digest: its sha256, cut to the 36
      characters MLflow stores, the full value in the input tag `sha256`), which fills the Dataset column.
    """

    tracking_uri: str
    experiment: str = "emo_assets"
    artifact_root: str = ""
    request_timeout_s: int = 5

    _client: object = PrivateAttr(default=None)
    _experiment: str | None = PrivateAttr(default=None)
    _failure: str | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._client, self._experiment, self._failure = None, None, None
        _start_creating_store(self.tracking_uri, self._environment())

    def _environment(self) -> dict[str, str]:
        """MLflow's settings for every call: fail fast, and no usage reports to MLflow's servers from a research
        data pipeline (nor waiting for them offline) unless the user opts in by setting the variable."""
        return {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.request_timeout_s),
            "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
        }

    def log_run(
        self,
        name: str,
        *,
        params: Mapping[str, object],
        metrics: Mapping[str, object],
        tags: Mapping[str, str],
        log,
        started: float,
        ended: float | None = None,
        datasets: Sequence[TrackedDataset] = (),
        files: Sequence[Path] = (),
    ) -> str:
        """Log one run; return `logged (run <id>[, N artifacts])` or `not logged (<reason>)` (and warn through `log`).

        `started` and `ended` (default: now) are the work's wall-clock times (`time.time()`); `datasets` the
        files it read. Non-numeric and non-finite metrics are left out; keys are made MLflow-safe.
        """
        ended = time.time() if ended is None else ended
        if self._failure is not None:
            return f"not logged ({self._failure}; not retried in this run)"
        try:
            with _environment(self._environment()):
                run_id = self._log(name, params, metrics, tags, files, (started, ended), datasets)
        except Exception as exc:  # MLflow raises many types (MlflowException, requests, sqlalchemy errors)
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}"[:300]
            self._failure = reason
            log.warning(f"MLflow at {self.tracking_uri} failed, the run is not logged there: {reason}")
            return f"not logged ({reason})"
        return f"logged (run {run_id}, {len(files)} artifacts)" if files else f"logged (run {run_id})"

    def _experiment_id(self, client) -> str:
        """The experiment's id (created on first use), with its kind tag set once per run of this resource."""
        if self._experiment is not None:
            return self._experiment
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            local = self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri
            location = Path(self.artifact_root).resolve().as_uri() if local and self.artifact_root else None
            self._experiment = client.create_experiment(
                self.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT}
            )
        else:
            self._experiment = experiment.experiment_id
            if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_DEVELOPMENT:  # made without it, e.g. by hand
                client.set_experiment_tag(self._experiment, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
        return self._experiment

    def _log(
        self,
        name: str,
        params: Mapping,
        metrics: Mapping,
        tags: Mapping,
        files: Sequence[Path],
        times: tuple[float, float],
        datasets: Sequence[TrackedDataset],
    ) -> str:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        if self._client is None:
            _wait_for_store(self.tracking_uri)
            # a new sqlite store announces its schema creation at INFO on the console; the run lines say enough
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        client = self._client
        # MLflow stores milliseconds: round outwards so that the run covers the whole work
        start_ms, end_ms = math.floor(times[0] * 1000), math.ceil(times[1] * 1000)
        run = client.create_run(self._experiment_id(client), start_time=start_ms, run_name=name, tags=dict(tags))
        numeric = {
            _mlflow_key(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        try:
            client.log_batch(
                run.info.run_id,
                metrics=[Metric(key, value, end_ms, 0) for key, value in numeric.items()],
                params=[Param(_mlflow_key(key), str(value)[:500]) for key, value in params.items()],
            )
            if datasets:
                client.log_inputs(run.info.run_id, datasets=[_dataset_input(d) for d in datasets])
            for path in files:
                client.log_artifact(run.info.run_id, str(path), artifact_path=name.replace("/", "_"))
        except Exception:
            with contextlib.suppress(Exception):
                client.set_terminated(run.info.run_id, status="FAILED", end_time=end_ms)
            raise
        client.set_terminated(run.info.run_id, end_time=end_ms)
        return run.info.run_id


def _dataset_input(dataset: TrackedDataset):
    """The MLflow dataset input of a local file (what `mlflow.data` builds for a local source, without its
    source-guessing registry, which warns when two source types match a path)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    sha256 = dataset.sha256 or file_sha256(dataset.path)
    source = json.dumps({"uri": str(Path(dataset.path).resolve())})
    entity = Dataset(dataset.name, sha256[:MAX_DIGEST], "local", source)
    return DatasetInput(entity, tags=[InputTag("sha256", sha256)])


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


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(resources=build_resources(loaded_settings()))
