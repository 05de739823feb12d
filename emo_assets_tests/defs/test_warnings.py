"""Dagster's beta warnings for the APIs the project uses on purpose are silenced, and only those."""

import warnings

import dagster as dg

from emo_assets.cli import partition_range
from emo_assets.defs.dagster_beta import USED_BETA_APIS, accepted_beta
from emo_assets.defs.datasets import dataset_file_key, emotion_dataset_key
from emo_assets.defs.partitions import partitions_for
from emo_assets.definitions import build_defs
from emo_assets_tests.defs.conftest import make_settings
from emo_assets_tests.pipeline import materialize


def _observe() -> dg.ObserveResult:
    return dg.ObserveResult(data_version=dg.DataVersion("1"))


def _observe_many():
    yield dg.ObserveResult(asset_key="other", data_version=dg.DataVersion("1"))


def test_building_and_materializing_emit_no_beta_warning(tmp_path, small_datasets, mlflow_uri, instance):
    settings = make_settings(tmp_path, {"baseline": small_datasets["baseline"]}, mlflow_uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        defs = build_defs(settings)
        assert materialize(defs, [dataset_file_key("baseline")], instance).success
        emotions = partition_range(partitions_for(settings).emotions.get_partition_keys())
        assert materialize(defs, [emotion_dataset_key("baseline")], instance, emotions).success
    beta = [str(w.message) for w in caught if issubclass(w.category, dg.BetaWarning)]
    assert beta == []


def test_only_the_used_apis_are_silenced_and_only_inside_the_block():
    spec = dg.AssetSpec("other")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with accepted_beta(*USED_BETA_APIS):
            dg.observable_source_asset(name="silenced")(_observe)
            dg.multi_observable_source_asset(specs=[spec])(_observe_many)  # another beta API: still reported
            warnings.warn("an unrelated warning", UserWarning)
        dg.observable_source_asset(name="after_the_block")(_observe)
    messages = [(w.category, str(w.message).split(" is currently")[0]) for w in caught]
    assert messages == [
        (dg.BetaWarning, "Function `multi_observable_source_asset`"),
        (UserWarning, "an unrelated warning"),
        (dg.BetaWarning, "Function `observable_source_asset`"),
    ]
