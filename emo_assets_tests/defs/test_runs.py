"""A run over many model x emotion partitions loads each model once and writes every partition."""

import weakref

import dagster as dg

from emo_assets.defs import resources as resources_module
from emo_assets.defs.activations import activation_path, activations_key
from emo_assets.defs.jobs import partition_range
from emo_assets.defs.partitions import partitions_for
from emo_assets_tests.defs.conftest import check_results, partition_metadata
from emo_assets_tests.pipeline import materialize


def test_a_partition_range_loads_each_model_once_and_releases_it(baseline_ready, monkeypatch):
    settings, defs, instance = baseline_ready
    parts = partitions_for(settings)
    loads, models, alive_at_load = [], [], []
    load = resources_module.load_configured_model

    def counting_load(model_id, s):
        alive_at_load.append([ref() is not None for ref in models])  # earlier models must be freed by now
        loaded = load(model_id, s)
        loads.append(model_id)
        models.append(weakref.ref(loaded.model))
        return loaded

    monkeypatch.setattr(resources_module, "load_configured_model", counting_load)

    # emotion-major order interleaves the models: gratitude|tiny-gpt2, gratitude|tiny-pythia, anger|tiny-gpt2, ...
    keys = parts.activations.get_partition_keys()[:4]
    assert [parts.split(k)[0] for k in keys] == ["tiny-gpt2", "tiny-pythia"] * 2
    result = materialize(defs, [activations_key("baseline")], instance, partition_range(keys))

    assert result.success
    assert sorted(loads) == ["tiny-gpt2", "tiny-pythia"]
    assert alive_at_load == [[], [False]]  # the first model was released before the second was loaded
    assert [ref() for ref in models] == [None, None]  # and the last one at the end of its group
    written = partition_metadata(result, activations_key("baseline"))
    assert sorted(written) == sorted(keys)
    assert all(meta["model_loads_in_run"] == {"tiny-gpt2": 1, "tiny-pythia": 1} for meta in written.values())
    on_disk = {
        k
        for k in parts.activations.get_partition_keys()
        if activation_path(settings, "baseline", *parts.split(k)).is_file()
    }
    assert on_disk == set(keys)
    checks = check_results(result)
    assert all(c.passed for c in checks.values())
    assert checks["baseline/activations:sample_count"].metadata["partitions_checked"].value == 4

    # run on their own, the integrity checks verify the existing files; freshness reports the missing ones
    alone = check_results(materialize(defs, dg.AssetSelection.checks_for_assets(activations_key("baseline")), instance))
    assert alone["baseline/activations:file_verifies"].passed
    assert alone["baseline/activations:file_verifies"].metadata["partitions_checked"].value == 4
    missing = alone["baseline/activations:partitions_fresh"].metadata["failed_partitions"].value
    assert sorted(missing) == sorted(set(parts.activations.get_partition_keys()) - set(keys))


def test_a_single_partition_run_records_its_own_data_version(baseline_ready):
    settings, defs, instance = baseline_ready
    result = materialize(defs, [activations_key("baseline")], instance, {"dagster/partition": "neutral|tiny-pythia"})
    assert result.success
    (event,) = result.get_asset_materialization_events()
    meta = event.materialization.metadata
    assert event.materialization.tags["dagster/data_version"] == meta["input_fingerprint"].value
    assert meta["model_loads_in_run"].value == {"tiny-pythia": 1}
