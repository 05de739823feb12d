"""The deployment switch and the files under `deploy/`, checked against Dagster's own config schemas.

No Kubernetes cluster exists here: the kubernetes files are validated as configuration only (instance, run
launcher, executor, the GPU tag of the torch steps, the Helm values' structure).
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config, validate_config
from dagster._core.instance.config import dagster_instance_config, dagster_instance_config_schema
from dagster._core.instance.ref import InstanceRef
from dagster_celery import celery_executor
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY, UserDefinedDagsterK8sConfig, get_user_defined_k8s_config

from emo_assets.core.config import load_settings
from emo_assets.defs import deployment
from emo_assets.defs.activations import activations_key
from emo_assets.defs.models import LANGUAGE_MODEL
from emo_assets_tests.conftest import REPO_ROOT
from emo_assets_tests.deploy.conftest import require_services
from emo_assets_tests.pipeline import pipeline_env

DEPLOY = REPO_ROOT / "deploy"
PG_ENV = {
    "DAGSTER_PG_HOST": "db",
    "DAGSTER_PG_USER": "dagster",
    "DAGSTER_PG_PASSWORD": "x",
    "DAGSTER_PG_DB": "dagster",
    "EMO_ASSETS_PG_HOST": "127.0.0.1",
    "EMO_ASSETS_PG_PORT": "5432",
    "EMO_ASSETS_PG_USER": "postgres",
    "EMO_ASSETS_PG_PASSWORD": "",
    "EMO_ASSETS_PG_DB": "dagster",
}


def _assert_valid(schema, value, what: str) -> None:
    result = validate_config(schema, value)
    assert result.success, f"{what}: {[error.message for error in result.errors]}"


def _instance_config(name: str, monkeypatch) -> dict:
    """deploy/<name>/dagster.yaml through Dagster's own instance loader and schema (env sources resolved)."""
    for key, value in PG_ENV.items():
        monkeypatch.setenv(key, value)
    config, instance_class = dagster_instance_config(str(DEPLOY / name))
    assert instance_class is None
    processed = process_config(dg.Shape(dagster_instance_config_schema()), config)
    assert processed.success, [error.message for error in processed.errors]
    return config


@pytest.mark.parametrize("name", ["local", "cluster", "kubernetes"])
def test_instance_files_pass_dagsters_instance_schema(name, monkeypatch, tmp_path):
    config = _instance_config(name, monkeypatch)
    if name == "local":
        assert "storage" not in config  # sqlite under DAGSTER_HOME
        assert (REPO_ROOT / ".dagster_home" / "dagster.yaml").resolve() == DEPLOY / "local" / "dagster.yaml"
    else:
        assert set(config["storage"]) == {"postgres"}
        assert config["concurrency"]["pools"]["default_limit"] >= 1
        assert config["run_monitoring"]["enabled"] is True
    # the run queue is Dagster's default coordinator: no file names it (or any other private dagster._ module)
    assert "run_coordinator" not in config and "dagster._" not in (DEPLOY / name / "dagster.yaml").read_text()
    ref = InstanceRef.from_dir(str(tmp_path), config_dir=str(DEPLOY / name))
    assert ref.run_coordinator_data.class_name == "QueuedRunCoordinator"


def _snake_case(value):
    """The Helm chart's camelCase keys as dagster.yaml writes them (`maxConcurrentRuns` -> `max_concurrent_runs`);
    the values of a tag limit (`applyLimitPerUniqueValue`) are copied as they are, in both."""
    if isinstance(value, list):
        return [_snake_case(item) for item in value]
    if not isinstance(value, dict):
        return value
    return {
        re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower(): item if key == "value" else _snake_case(item)
        for key, item in value.items()
    }


def test_pool_and_run_limits_agree_between_the_helm_values_and_the_instance_files(monkeypatch):
    """Under Helm the chart writes the instance from values.yaml's `concurrency:`; without it
    deploy/kubernetes/dagster.yaml is the instance: both must limit runs and the `torch` pool alike. The cluster
    deployment's limits follow its celery workers (up.sh's default count): one torch step and one backfill run per
    worker."""
    values = yaml.safe_load((DEPLOY / "kubernetes" / "values.yaml").read_text())
    kubernetes = _instance_config("kubernetes", monkeypatch)["concurrency"]
    assert _snake_case(values["concurrency"]) == kubernetes
    assert kubernetes["pools"]["default_limit"] >= 1 and kubernetes["runs"]["max_concurrent_runs"] >= 1
    assert not values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]  # one place for limits
    cluster = _instance_config("cluster", monkeypatch)["concurrency"]
    workers = int(re.search(r"EMO_ASSETS_CELERY_WORKERS:-(\d+)", (DEPLOY / "cluster" / "up.sh").read_text())[1])
    assert cluster["pools"]["default_limit"] == workers
    (backfill,) = cluster["runs"]["tag_concurrency_limits"]
    assert backfill["key"] == "dagster/backfill" and backfill["limit"] == workers


def test_cluster_instance_connects_to_postgres_as_configured(monkeypatch):
    from dagster_postgres import PostgresRunStorage
    from dagster_postgres.utils import pg_url_from_config

    config = _instance_config("cluster", monkeypatch)
    processed = process_config(PostgresRunStorage.config_type(), config["storage"]["postgres"]).value
    assert pg_url_from_config(processed) == "postgresql+psycopg2://postgres@127.0.0.1:5432/dagster"


def test_kubernetes_run_launcher_config_passes_its_schema(monkeypatch):
    config = _instance_config("kubernetes", monkeypatch)
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    _assert_valid(K8sRunLauncher.config_type(), config["run_launcher"]["config"], "K8sRunLauncher")


def test_kubernetes_executor_config_passes_k8s_job_executor_schema():
    value = yaml.safe_load((DEPLOY / "kubernetes" / "executor.yaml").read_text())["execution"]["config"]
    _assert_valid(k8s_job_executor.config_schema.config_type, value, "k8s_job_executor")


def test_celery_worker_config_passes_the_celery_executor_schema(monkeypatch):
    monkeypatch.setenv("EMO_ASSETS_CELERY_BROKER", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("EMO_ASSETS_CELERY_BACKEND", "redis://127.0.0.1:6379/1")
    value = yaml.safe_load((DEPLOY / "cluster" / "celery.yaml").read_text())["execution"]["config"]
    processed = process_config(celery_executor.config_schema.config_type, value)
    assert processed.success, [error.message for error in processed.errors]
    assert processed.value["broker"] == "redis://127.0.0.1:6379/0"


def test_torch_steps_request_a_gpu_and_the_torch_queue(small_datasets, tmp_path):
    settings = load_settings(pipeline_env(tmp_path, small_datasets, f"sqlite:///{tmp_path / 'mlflow.db'}"))
    from emo_assets.definitions import build_defs

    graph = build_defs(settings).resolve_asset_graph()
    UserDefinedDagsterK8sConfig.from_dict(deployment.TORCH_OP_TAGS[USER_DEFINED_K8S_CONFIG_KEY])
    for key in (LANGUAGE_MODEL, *(activations_key(variant) for variant in settings.datasets)):
        tags = graph.get(key).assets_def.op.tags
        k8s = get_user_defined_k8s_config(tags)  # what the k8s executor reads from a step's tags
        assert k8s.container_config["resources"]["limits"] == {"nvidia.com/gpu": "1"}, key
        assert tags["dagster-celery/queue"] == deployment.TORCH_QUEUE, key
    analysis = [k for k in graph.materializable_asset_keys if k.path[-1] == "emotion_vectors"]
    assert analysis and all(USER_DEFINED_K8S_CONFIG_KEY not in graph.get(k).assets_def.op.tags for k in analysis)


def test_helm_values_have_the_keys_the_dagster_chart_reads():
    values = yaml.safe_load((DEPLOY / "kubernetes" / "values.yaml").read_text())
    (code,) = values["dagster-user-deployments"]["deployments"]
    assert {"name", "image", "dagsterApiGrpcArgs", "port"} <= set(code)
    assert code["dagsterApiGrpcArgs"] == ["--module-name", "emo_assets.definitions"]
    assert {"name": "EMO_ASSETS_DEPLOYMENT", "value": "kubernetes"} in code["env"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert "EMO_ASSETS_DEPLOYMENT=kubernetes" in launcher["envVars"]
    assert values["postgresql"]["enabled"] is False and values["global"]["postgresqlSecretName"]
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "QueuedRunCoordinator"
    # the chart's run launcher and deploy/kubernetes/dagster.yaml's mount the same results volume
    instance = yaml.safe_load((DEPLOY / "kubernetes" / "dagster.yaml").read_text())["run_launcher"]["config"]
    assert launcher["volumes"] == instance["volumes"]
    assert [m["mountPath"] for m in launcher["volumeMounts"]] == [m["mount_path"] for m in instance["volume_mounts"]]


def test_dockerfile_chooses_the_torch_build_with_a_build_arg():
    lines = (DEPLOY / "kubernetes" / "Dockerfile").read_text().splitlines()
    assert any(line.startswith("ARG TORCH_INDEX=") for line in lines)
    torch_install = next(i for i, line in enumerate(lines) if '--index-url "$TORCH_INDEX"' in line)
    project_install = next(i for i, line in enumerate(lines) if "pip install -c constraints.txt" in line)
    assert torch_install < project_install  # torch first, so the project's install finds it satisfied


@pytest.mark.parametrize(
    ("name", "executor_name"), [("local", "in_process"), ("cluster", "celery"), ("kubernetes", "k8s")]
)
def test_the_deployment_switch_chooses_the_executor(name, executor_name):
    assert deployment.executor({"EMO_ASSETS_DEPLOYMENT": name}).name == executor_name
    if name == "local":
        assert deployment.executor({}).name == executor_name  # the default


def test_an_unknown_deployment_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="local, cluster, kubernetes"):
        deployment.deployment_name({"EMO_ASSETS_DEPLOYMENT": "swarm"})


def test_an_unreachable_broker_is_named_in_the_error():
    with socket.socket() as sock:  # a port nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    with pytest.raises(dg.Failure, match=f"celery broker {url} is not reachable"):
        deployment.check_broker(url, timeout_s=2)


@pytest.mark.skipif(os.geteuid() != 0, reason="as another user PostgreSQL runs as that user, who owns the folder")
def test_cluster_up_refuses_a_folder_postgres_cannot_enter(tmp_path):
    """pytest's tmp_path lies under a folder private to root (mode 0700), as a `mktemp -d` one does: up.sh must
    say so before it starts anything, not fail inside initdb after Redis and the rest were set up."""
    require_services()
    folder = tmp_path / "cluster"
    env = {**os.environ, "EMO_ASSETS_CLUSTER_DIR": str(folder)}
    completed = subprocess.run([str(DEPLOY / "cluster" / "up.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2, completed.stderr
    (error,) = completed.stderr.splitlines()
    blocked = error.split("the postgres user cannot enter ")[1].split(" (")[0]
    assert Path(blocked) in tmp_path.parents or Path(blocked) == tmp_path
    assert stat.S_IMODE(os.stat(blocked).st_mode) & 0o001 == 0  # others may not enter it
    assert f"cannot use {folder}; nothing was started" in error and f"chmod o+x {blocked}" in error
    assert not folder.exists()
