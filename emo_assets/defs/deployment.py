"""Where the steps of a run execute, chosen by `EMO_ASSETS_DEPLOYMENT` (local | cluster | kubernetes).

A deployment is configuration, not code: the instance (`DAGSTER_HOME/dagster.yaml`, from `deploy/<name>/`) says
where runs and events are stored and how runs are queued and launched; this module only picks the executor that
runs a run's steps, and every deployment runs the same assets.

- local (default): in-process. A process per step would re-import torch and the model classes for every step
  and could not share a loaded model between the partitions of a run.
- cluster: `dagster_celery`'s celery executor; each step is a celery task on a worker process that loaded the
  code location once. The broker and result backend come from `EMO_ASSETS_CELERY_BROKER` / `_BACKEND`.
- kubernetes: `dagster_k8s.k8s_job_executor`, one pod per step; the torch steps request a GPU through
  `TORCH_OP_TAGS`.

A single-run backfill policy keeps a model's partitions in one step, so wherever a step runs, it loads its
model once for all of them.
"""

import os
from collections.abc import Mapping

import dagster as dg

from emo_assets.core.config import DEPLOYMENTS

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"

# Steps that load a model: on celery they go to the `torch` queue (workers on GPU machines listen to it), on
# Kubernetes their pod requests one GPU. Other deployments ignore both tags.
TORCH_QUEUE = "torch"
TORCH_OP_TAGS = {
    "dagster-celery/queue": TORCH_QUEUE,
    "dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}},
}


def deployment_name(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    name = env.get("EMO_ASSETS_DEPLOYMENT") or "local"
    if name not in DEPLOYMENTS:
        raise ValueError(f"EMO_ASSETS_DEPLOYMENT must be one of {', '.join(DEPLOYMENTS)}, got {name!r}")
    return name


def broker_urls(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(broker, result backend) of the celery deployment; the backend defaults to the broker."""
    env = os.environ if env is None else env
    broker = env.get("EMO_ASSETS_CELERY_BROKER") or DEFAULT_BROKER
    return broker, env.get("EMO_ASSETS_CELERY_BACKEND") or broker


def check_broker(url: str, timeout_s: float = 5.0) -> None:
    """Raise a `dg.Failure` naming `url` when the broker does not answer: without this, submitting the first step
    fails after kombu's retries with a bare socket error that names neither celery nor the URL."""
    from kombu import Connection
    from kombu.utils.url import maybe_sanitize_url

    with Connection(url, connect_timeout=timeout_s) as connection:
        try:
            connection.ensure_connection(max_retries=1)
        except Exception as exc:  # kombu raises OperationalError or the transport's own socket errors
            raise dg.Failure(
                description=f"The celery broker {maybe_sanitize_url(url)} is not reachable ({exc}); nothing was "
                "run. Start it (make cluster-up) or set EMO_ASSETS_CELERY_BROKER."
            ) from exc


def _celery_executor(broker: str, backend: str) -> dg.ExecutorDefinition:
    from dagster_celery import celery_executor

    @dg.executor(
        name="celery",
        config_schema=celery_executor.config_schema,
        requirements=dg.multiple_process_executor_requirements(),  # what celery_executor itself declares
    )
    def checked_celery_executor(init_context):
        check_broker(init_context.executor_config.get("broker") or broker)
        return celery_executor.executor_creation_fn(init_context)

    return checked_celery_executor.configured(
        {"broker": broker, "backend": backend, "config_source": {"worker_prefetch_multiplier": 1}}
    )


def executor(env: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """The executor of every job of the code location, for the deployment named in `env`."""
    name = deployment_name(env)
    if name == "cluster":
        return _celery_executor(*broker_urls(env))
    if name == "kubernetes":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    return dg.in_process_executor


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(executor=executor())
