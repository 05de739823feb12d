"""Each non-public Dagster call of `emo_assets.dagster_private`, run against the installed Dagster.

A Dagster release may change any of them without a deprecation period: this module is where an upgrade that
breaks one fails, by name. `end_abandoned_run` is exercised by
`test_cli.py::test_runs_of_a_killed_process_release_their_pool_slot` (a run of a dead process, a claimed slot).
"""

import dagster as dg
import pytest

from emo_assets import dagster_private
from emo_assets.defs.dagster_beta import BACKFILL_POLICY, accepted_beta

LETTERS = dg.StaticPartitionsDefinition(["a", "b", "c"])


with accepted_beta(BACKFILL_POLICY):

    @dg.asset(partitions_def=LETTERS, backfill_policy=dg.BackfillPolicy.single_run())
    def letters(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        if "c" in context.partition_keys:
            raise dg.Failure(description="no c here")
        return dg.MaterializeResult(metadata={"keys": ",".join(context.partition_keys)})


@dg.asset_check(asset=letters)
def letters_known(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, description="letters are never known")


JOB = dg.define_asset_job("letters_job", [letters])
DEFS = dg.Definitions(assets=[letters], asset_checks=[letters_known], jobs=[JOB])


def _run(instance, tags):
    return DEFS.resolve_job_def("letters_job").execute_in_process(instance=instance, tags=tags, raise_on_error=False)


def test_the_partition_tags_set_which_partitions_a_run_covers():
    range_tags = {
        dagster_private.ASSET_PARTITION_RANGE_START_TAG: "a",
        dagster_private.ASSET_PARTITION_RANGE_END_TAG: "b",
    }
    with dg.instance_for_test() as instance:
        covered = _run(instance, range_tags).get_asset_materialization_events()
        assert sorted(e.partition for e in covered) == ["a", "b"]
        single = _run(instance, {dagster_private.PARTITION_NAME_TAG: "b"}).get_asset_materialization_events()
        assert [e.partition for e in single] == ["b"]


def test_job_asset_nodes_are_the_jobs_assets_with_their_policies():
    (node,) = dagster_private.job_asset_nodes(DEFS.resolve_job_def("letters_job"))
    assert node.key == dg.AssetKey("letters")
    assert node.partitions_def == LETTERS and node.backfill_policy == dg.BackfillPolicy.single_run()


@pytest.mark.parametrize("keys", [("a", "b"), ("b", "c")], ids=["succeeds", "fails"])
def test_run_events_read_checks_and_failures_back_from_the_instance(keys):
    tags = {
        dagster_private.ASSET_PARTITION_RANGE_START_TAG: keys[0],
        dagster_private.ASSET_PARTITION_RANGE_END_TAG: keys[1],
    }
    with dg.instance_for_test() as instance:
        result = _run(instance, tags)
        events = dagster_private.run_events(instance, result.run_id, dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        failures = dagster_private.run_events(instance, result.run_id, dg.DagsterEventType.STEP_FAILURE)
        if result.success:
            (check,) = [dagster_private.check_evaluation(event) for event in events]
            assert (check.asset_key, check.check_name, check.passed) == (dg.AssetKey("letters"), "letters_known", False)
            assert check.description == "letters are never known" and failures == []
        else:
            assert events == []  # the check did not run after its asset failed
            (failure,) = failures
            data = dagster_private.step_failure_data(failure)
            assert failure.step_key == "letters" and data.user_failure_data.description == "no c here"
            assert data.error.message == result.failure_data_for_node("letters").error.message
