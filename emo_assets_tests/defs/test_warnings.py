"""Warnings users see: Dagster's beta warnings for the APIs used on purpose are silenced (and only those); a
dataset's many warnings are logged as the first few and a count."""

import logging
import warnings

import dagster as dg

from emo_assets.core.datasets import WARNINGS_SHOWN
from emo_assets.definitions import build_defs
from emo_assets.defs.dagster_beta import USED_BETA_APIS, accepted_beta
from emo_assets.defs.datasets import dataset_file_key, emotion_dataset_key
from emo_assets.defs.jobs import partition_range
from emo_assets.defs.partitions import partitions_for
from emo_assets_tests.conftest import read_records, write_records
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
            warnings.warn("an unrelated warning", UserWarning, stacklevel=2)
        dg.observable_source_asset(name="after_the_block")(_observe)
    messages = [(w.category, str(w.message).split(" is currently")[0]) for w in caught]
    assert messages == [
        (dg.BetaWarning, "Function `multi_observable_source_asset`"),
        (UserWarning, "an unrelated warning"),
        (dg.BetaWarning, "Function `observable_source_asset`"),
    ]


def test_emotion_dataset_logs_the_first_warnings_and_a_count(tmp_path, own_datasets, mlflow_uri, instance):
    path = own_datasets["baseline"]
    records = read_records(path)
    copies = [{**records[i], "id": f"copy-{i}"} for i in range(WARNINGS_SHOWN + 3)]
    write_records(path, records + copies)
    settings = make_settings(tmp_path, {"baseline": path}, mlflow_uri)
    emotions = partition_range(partitions_for(settings).emotions.get_partition_keys())
    result = materialize(build_defs(settings), [emotion_dataset_key("baseline")], instance, emotions)
    assert result.success

    logged = [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]
    duplicates = [m for m in logged if ": text: duplicate text of line " in m]
    first_copy = len(records) + 1
    assert [int(m.split(":")[1]) for m in duplicates] == list(range(first_copy, first_copy + WARNINGS_SHOWN))
    assert sum(f"{path}: 3 more warnings not logged ({len(copies)} in all)" in m for m in logged) == 1


def test_the_suite_shows_dagsters_deprecations():
    """pyproject's `filterwarnings` hides only named third-party modules: a removal notice Dagster raises about
    a call of this project (attributed to the calling module, as Dagster's `deprecation_warning` does) reaches
    the test report, and one raised inside Dagster's own modules too."""
    for module in ("emo_assets.defs.datasets", "dagster._core.definitions.decorators.asset_decorator"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn_explicit(
                "`x` is deprecated and will be removed in 2.0", DeprecationWarning, "x.py", 1, module
            )
        assert [str(w.message) for w in caught] == ["`x` is deprecated and will be removed in 2.0"], module
