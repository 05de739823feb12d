"""The Dagster calls of emo_assets that are not public API, in one place, each with why no public one serves.

Dagster may change any of them in a release without notice. `emo_assets_tests/defs/test_dagster_private.py` runs
each one against the installed Dagster, so an upgrade that breaks one fails there by name, before a user's run.
Everything else in emo_assets uses `import dagster as dg` and the `dagster_graphql` client only.
"""

import dagster as dg

# The run tags that make one run cover one partition or a range of them. `DagsterGraphQLClient.submit_job_execution`
# and a backfill-like sequence of runs can set a run's partitions only through tags, and Dagster exports the tag
# names from this private module only.
from dagster._core.storage.tags import (  # noqa: F401 (re-exported)
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)


def job_asset_nodes(job: dg.JobDefinition) -> list:
    """The asset nodes (key, partitions_def, backfill_policy) a resolved job executes: a `JobDefinition` exposes
    its assets only through its asset layer, which is not public."""
    graph = job.asset_layer.asset_graph
    return [graph.get(key) for key in job.asset_layer.executable_asset_keys]


def run_events(instance: dg.DagsterInstance, run_id: str, event_type: dg.DagsterEventType) -> list[dg.DagsterEvent]:
    """The events of `event_type` of a run that executed in another process (a cluster run). Dagster has no public
    read of a run's event log: `ExecuteInProcessResult` holds the events of an in-process run only, and
    `DagsterGraphQLClient` reports a run's status, not its events."""
    return [entry.dagster_event for entry in instance.all_logs(run_id, of_type=event_type) if entry.dagster_event]


def check_evaluation(event: dg.DagsterEvent) -> dg.AssetCheckEvaluation:
    """The evaluation an ASSET_CHECK_EVALUATION event of `run_events` carries (its event-specific data)."""
    return event.event_specific_data


def step_failure_data(event: dg.DagsterEvent):
    """The failure data (error, and a `dg.Failure`'s description) a STEP_FAILURE event of `run_events` carries,
    as `ExecuteInProcessResult.failure_data_for_node` returns it for an in-process run."""
    return event.step_failure_data


def end_abandoned_run(instance: dg.DagsterInstance, run: dg.DagsterRun, reason: str) -> None:
    """Mark failed a run whose process died while it ran in-process, and free the pool slots it held. No public
    call can: the run has no run launcher or webserver that could terminate it (it ran inside an `emo-assets`
    process), and the daemon's run monitoring frees the slots of runs that ended only."""
    instance.report_run_failed(run, reason)
    instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
