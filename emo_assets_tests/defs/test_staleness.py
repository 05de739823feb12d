"""Editing a dataset file and observing `<V>/dataset_file` marks what was built from it unsynced."""

import dagster as dg
import pytest
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from emo_assets.defs.activations import activations_key
from emo_assets.defs.datasets import dataset_file_key, emotion_dataset_key
from emo_assets.defs.jobs import partition_range
from emo_assets.defs.partitions import partitions_for
from emo_assets_tests.conftest import read_records, write_records
from emo_assets_tests.pipeline import materialize


@pytest.fixture
def instance():
    """Dagster's sqlite storage, as the UI reads it (overrides the in-memory default of conftest)."""
    with dg.instance_for_test() as instance:
        yield instance


def _resolver(defs, instance) -> CachingStaleStatusResolver:
    """What the UI uses for "unsynced" (a fresh one per question: it caches)."""
    return CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))


def _status(defs, instance, key, partition) -> StaleStatus:
    return _resolver(defs, instance).get_status(key, partition)


def _causes(defs, instance, key, partition):
    return _resolver(defs, instance).get_stale_causes(key, partition)


def test_observing_an_edited_dataset_marks_downstream_unsynced(baseline_ready, own_datasets):
    settings, defs, instance = baseline_ready
    keys = partitions_for(settings).activations.get_partition_keys()[:2]
    assert materialize(defs, [activations_key("baseline")], instance, partition_range(keys)).success
    dataset, activations = emotion_dataset_key("baseline"), activations_key("baseline")
    assert _status(defs, instance, dataset, "anger") == StaleStatus.FRESH
    assert _status(defs, instance, activations, keys[0]) == StaleStatus.FRESH

    records = read_records(own_datasets["baseline"])
    extra = {"text": "Thanks a million for the lift.", "emotion": "gratitude"}
    write_records(own_datasets["baseline"], [*records, extra])
    assert _status(defs, instance, dataset, "anger") == StaleStatus.FRESH  # not observed yet

    assert materialize(defs, [dataset_file_key("baseline")], instance).success
    assert _status(defs, instance, dataset, "anger") == StaleStatus.STALE
    (cause,) = _causes(defs, instance, dataset, "anger")
    assert cause.dependency.asset_key == dataset_file_key("baseline")

    # Dagster 1.13 marks direct children only; the activations follow once the rows are rebuilt
    assert materialize(defs, [dataset], instance, partition_range(settings.emotions)).success
    assert _status(defs, instance, dataset, "anger") == StaleStatus.FRESH
    assert _status(defs, instance, activations, keys[0]) == StaleStatus.STALE
    assert {c.dependency.asset_key for c in _causes(defs, instance, activations, keys[0])} == {dataset}
