"""The activations asset stores what `[extraction]` (here through the environment) or its run config selects, and
records the selection in the file header, the materialization metadata, the input fingerprint and MLflow."""

import dagster as dg
import mlflow

from emo_assets.core.activations import ActivationFile
from emo_assets.definitions import build_defs
from emo_assets.defs.activations import activation_path, activations_key, estimate_job_name
from emo_assets.defs.jobs import LOAD_MODELS, datasets_job
from emo_assets.defs.partitions import partitions_for
from emo_assets_tests.defs.conftest import make_settings, partition_metadata
from emo_assets_tests.pipeline import run_jobs


def _materialize(defs, settings, instance, key, config=None):
    return dg.materialize(
        [*defs.assets, *defs.asset_checks],  # the checks too: they read the stored layers and rows
        selection=[activations_key("baseline")],
        instance=instance,
        resources=defs.resources,
        partition_key=key,
        run_config={"ops": {"baseline__activations": {"config": config}}} if config else None,
        raise_on_error=False,
    )


def test_selection_from_settings_and_run_config_is_recorded(tmp_path, own_datasets, mlflow_uri, instance):
    env = {"EMO_ASSETS_MODELS": "tiny-gpt2", "EMO_ASSETS_POSITIONS": "sentence_end", "EMO_ASSETS_LAYERS": "-1"}
    settings = make_settings(tmp_path, {"baseline": own_datasets["baseline"]}, mlflow_uri, **env)
    defs = build_defs(settings)
    assert run_jobs(defs, [LOAD_MODELS, datasets_job("baseline")], instance)
    key = partitions_for(settings).key("tiny-gpt2", "anger")

    first = _materialize(defs, settings, instance, key)
    assert first.success
    meta = partition_metadata(first, activations_key("baseline"))[key]
    stored = ActivationFile(activation_path(settings, "baseline", "tiny-gpt2", "anger"))
    assert (stored.positions, stored.layers) == ("sentence_end", (3,))
    assert (meta["positions"], meta["layers"], meta["n_rows"]) == ("sentence_end", [3], stored.n_sentences)
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`dagster.run_id` = '{first.run_id}'", output_format="list"
    )
    assert [(r.data.params["positions"], r.data.params["layers"]) for r in runs] == [("sentence_end", "3")]

    second = _materialize(defs, settings, instance, key, {"positions": "mean", "layers": "0-1"})
    assert second.success
    again = partition_metadata(second, activations_key("baseline"))[key]
    stored = ActivationFile(activation_path(settings, "baseline", "tiny-gpt2", "anger"))
    assert (stored.positions, stored.layers, again["positions"], again["layers"]) == ("mean", (0, 1), "mean", [0, 1])
    assert again["n_reused"] == 0  # another selection: nothing reused from the first file
    assert again["input_fingerprint"] != meta["input_fingerprint"]

    bad = _materialize(defs, settings, instance, key, {"positions": "middle"})
    assert not bad.success
    failure = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
    assert "positions 'middle' is not one of" in failure.event_specific_data.error.message


def test_disk_estimate_job_records_the_bytes_without_extracting(tmp_path, own_datasets, mlflow_uri, instance):
    settings = make_settings(
        tmp_path, {"baseline": own_datasets["baseline"]}, mlflow_uri, EMO_ASSETS_MODELS="tiny-gpt2"
    )
    defs = build_defs(settings)
    assert run_jobs(defs, [LOAD_MODELS, datasets_job("baseline")], instance)
    job = defs.resolve_job_def(estimate_job_name("baseline"))
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert result.success
    observed = {
        e.asset_observation_data.asset_observation.partition: e.asset_observation_data.asset_observation.metadata
        for e in result.all_events
        if e.event_type_value == "ASSET_OBSERVATION"
    }
    parts = partitions_for(settings)
    assert set(observed) == {parts.key("tiny-gpt2", emotion) for emotion in settings.emotions}
    path = activation_path(settings, "baseline", "tiny-gpt2", "anger")
    assert not path.parent.exists()  # nothing extracted
    key = parts.key("tiny-gpt2", "anger")
    assert _materialize(defs, settings, instance, key).success
    assert observed[key]["estimated_bytes"].value == path.stat().st_size  # exact
