"""Fixtures for the Dagster-level tests: settings over the small datasets, an MLflow store, run helpers.

Settings come from `load_settings(env)` with an explicit environment (no process-wide variables), results
and the datasets live under `tmp_path`, and every test gets its own instance. One sqlite MLflow
store is shared by the session (creating one costs ~10 s on 2 cores); tests find their own MLflow runs by
the Dagster run id tag.
"""

import shutil
from pathlib import Path

import dagster as dg
import pytest

from emo_assets.core.config import load_settings
from emo_assets.definitions import build_defs
from emo_assets.defs.jobs import LOAD_MODELS, datasets_job
from emo_assets_tests.pipeline import pipeline_env, run_jobs

TWO_MODELS = "tiny-gpt2,tiny-pythia"


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def make_settings(tmp_path: Path, datasets: dict[str, Path], mlflow_uri: str, **env: str):
    """Settings for a test: the offline profile, results under `tmp_path`, `env` on top (EMO_ASSETS_* values)."""
    return load_settings(pipeline_env(tmp_path, datasets, mlflow_uri, **env))


@pytest.fixture
def own_datasets(tmp_path, small_datasets) -> dict[str, Path]:
    """Copies of the small datasets that a test may edit."""
    folder = tmp_path / "data"
    folder.mkdir()
    return {variant: Path(shutil.copyfile(path, folder / path.name)) for variant, path in small_datasets.items()}


@pytest.fixture
def instance():
    """An in-memory instance: a sqlite one on disk costs ~0.1 s per stored event, i.e. seconds per run.

    A test module that needs Dagster's on-disk storage overrides this fixture with `instance_for_test`.
    """
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


@pytest.fixture
def baseline_ready(tmp_path, own_datasets, mlflow_uri, instance):
    """(settings, defs, instance) for baseline with two tiny models, everything before activations materialized."""
    settings = make_settings(tmp_path, {"baseline": own_datasets["baseline"]}, mlflow_uri, EMO_ASSETS_MODELS=TWO_MODELS)
    defs = build_defs(settings)
    assert run_jobs(defs, [LOAD_MODELS, datasets_job("baseline")], instance)
    return settings, defs, instance


def partition_metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict[str, dict]:
    """partition (or None) -> {metadata key: value} of the run's materializations of `key`."""
    return {
        m.partition: {name: entry.value for name, entry in m.metadata.items()}
        for m in (e.materialization for e in result.get_asset_materialization_events())
        if m.asset_key == key
    }


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    """`<asset>:<check>` -> the run's asset check evaluation."""
    return {
        f"{e.event_specific_data.asset_key.to_user_string()}:{e.event_specific_data.check_name}": e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
