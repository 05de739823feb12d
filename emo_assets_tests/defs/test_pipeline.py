"""The whole offline-profile graph, both variants, materialized by `emo-assets materialize` in this process.

The command runs once for the module (on the small datasets, a temp results dir, a temp DAGSTER_HOME and
the session's sqlite MLflow store); the tests then compare what Dagster recorded with what is on disk and
in MLflow.
"""

import contextlib
import io
import json
import os

import dagster as dg
import pytest
from mlflow import MlflowClient

from emo_assets import cli
from emo_assets.core.activations import ActivationFile
from emo_assets.defs.activations import activation_path, activations_key
from emo_assets.defs.datasets import emotion_parquet_path
from emo_assets.defs.jobs import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG, stage_order
from emo_assets.defs.partitions import partitions_for
from emo_assets_tests.conftest import read_records
from emo_assets_tests.defs.conftest import make_settings
from emo_assets_tests.pipeline import pipeline_env

VARIANTS = ("baseline", "extended")
pytestmark = pytest.mark.slow  # end to end: every model, both variants


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, small_datasets, mlflow_uri):
    """Run the CLI once; return (settings, instance, exit code, printed text)."""
    root = tmp_path_factory.mktemp("pipeline")
    env = pipeline_env(root, small_datasets, mlflow_uri)  # the command sets the profile too; restored afterwards
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        with contextlib.redirect_stdout(output):
            code = cli.main(["materialize", "--profile", "offline"])
        settings = make_settings(root, small_datasets, mlflow_uri)
        with dg.DagsterInstance.get() as instance:
            yield settings, instance, code, output.getvalue()


def _latest(instance, key: dg.AssetKey, partition: str | None = None):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1
    ).records
    assert records, f"{key.to_user_string()}[{partition}] was not materialized"
    return records[0]


def _metadata(record) -> dict:
    return {name: entry.value for name, entry in record.asset_materialization.metadata.items()}


def test_command_succeeds_on_a_persistent_instance(pipeline):
    settings, instance, code, output = pipeline
    assert code == 0, output
    names = stage_order(settings, VARIANTS)
    assert names == [
        "load_models",
        "baseline_datasets",
        "baseline_activations",
        "extended_datasets",
        "extended_activations",
        "baseline_analysis",
        "extended_analysis",
        "cross_variant_analysis",
        "baseline_comparisons",
        "extended_comparisons",
    ]
    records = instance.get_run_records(ascending=True)
    # in order, all in this process: one run per model for the model loads (each partition records its own
    # revision as data version), one run over all partitions for every other job
    runs = [r.dagster_run.job_name for r in records]
    assert runs == ["load_models"] * len(settings.model_slugs) + names[1:]
    assert [r.dagster_run.tags["dagster/partition"] for r in records[:4]] == list(settings.model_slugs)
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
    # one printed line per job, with what its run record says
    job_lines = [line for line in output.splitlines() if "(run " in line]
    for record, line in zip(records, job_lines, strict=True):
        seconds = record.end_time - record.start_time
        assert line.startswith(f"{record.dagster_run.job_name} [")
        assert f"] ok in {seconds:.1f}s (run {record.dagster_run.run_id})" in line
    assert job_lines[0].startswith("load_models [minilm] ok")
    assert job_lines[5].startswith("baseline_activations [16 partitions] ok")
    assert job_lines[-1].startswith("extended_comparisons [unpartitioned] ok")
    activations_run = records[5].dagster_run
    tags = activations_run.tags
    assert (tags[ASSET_PARTITION_RANGE_START_TAG], tags[ASSET_PARTITION_RANGE_END_TAG]) == (
        partitions_for(settings).activations.get_partition_keys()[0],
        partitions_for(settings).activations.get_partition_keys()[-1],
    )
    checks = instance.all_logs(activations_run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    assert checks and all(e.dagster_event.event_specific_data.passed for e in checks)
    assert (settings.root / "dagster_home" / "dagster.yaml").read_text() == (cli.TEMPLATE).read_text()
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    assert instance.run_monitoring_enabled and instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0


def test_metadata_matches_the_files(pipeline, small_datasets):
    settings, instance, _, _ = pipeline
    parts = partitions_for(settings)
    assert len(parts.activations.get_partition_keys()) == 16
    texts = {
        (v, e): {r["text"] for r in read_records(small_datasets[v]) if r["emotion"] == e}
        for v in VARIANTS
        for e in settings.emotions
    }
    for variant in VARIANTS:
        counts = {e: sum(r["emotion"] == e for r in read_records(small_datasets[variant])) for e in settings.emotions}
        for emotion in settings.emotions:
            meta = _metadata(_latest(instance, dg.AssetKey([variant, "emotion_dataset"]), emotion))
            assert meta["dagster/partition_row_count"] == counts[emotion]
            assert meta["file_size_bytes"] == os.stat(emotion_parquet_path(settings, variant, emotion)).st_size
        for key in parts.activations.get_partition_keys():
            slug, emotion = parts.split(key)
            path = activation_path(settings, variant, slug, emotion)
            meta = _metadata(_latest(instance, activations_key(variant), key))
            size = os.stat(path).st_size
            assert meta["file_size_bytes"] == size and meta["file_size_mb"] == size / 2**20
            assert meta["n_samples"] == meta["dagster/partition_row_count"] == counts[emotion]
            file = ActivationFile(path)
            assert (meta["n_tokens"], meta["n_layers"], meta["d_model"]) == (file.n_tokens, file.n_layers, file.d_model)
            assert meta["dagster/uri"] == path.as_uri() and meta["dtype"] == "float32"
            assert meta["layers_saved"] == "resid_post, mlp_out"
            model = _metadata(_latest(instance, dg.AssetKey("language_model"), slug))
            assert meta["model_revision"] == model["revision"] == file.metadata["model_revision"]
            assert meta["dataset_sha256"] == file.metadata["dataset_sha256"]
            # extended runs after baseline: its sentences that baseline holds are copied, not forwarded
            shared = len(texts["extended", emotion] & texts["baseline", emotion]) if variant == "extended" else 0
            assert (meta["n_reused"], meta["n_computed"]) == (shared, counts[emotion] - shared)
            assert (file.header.reuse.reused if file.header.reuse else 0) == shared
            assert meta["mlflow"].startswith("logged (run ")
            assert meta["model_loads_in_run"] == dict.fromkeys(settings.model_slugs, 1)  # one load per model per run
        summary = _metadata(_latest(instance, dg.AssetKey([variant, "activations_summary"])))
        keys = parts.activations.get_partition_keys()
        sizes = [os.stat(activation_path(settings, variant, *parts.split(k))).st_size for k in keys]
        assert summary[f"{variant}_total_files"] == 16
        assert summary[f"{variant}_total_size_mb"] == pytest.approx(sum(sizes) / 2**20)
        table = summary["dagster/table"]
        assert [(r.data["model"], r.data["emotion"], r.data["samples"]) for r in table.records] == [
            (slug, e, counts[e]) for slug in settings.model_slugs for e in settings.emotions
        ]
        report = json.loads((settings.results_dir / variant / "summary" / "activations_summary.json").read_text())
        assert report["total_files"] == 16


def test_model_metadata(pipeline):
    settings, instance, _, _ = pipeline
    for slug in settings.model_slugs:
        meta = _metadata(_latest(instance, dg.AssetKey("language_model"), slug))
        assert (meta["n_layers"], meta["d_model"]) == ((6, 384) if slug == "minilm" else (4, 64))
        assert meta["n_params"] > 0 and meta["disk_size_bytes"] > 0 and meta["dtype"] == "float32"
        record = _latest(instance, dg.AssetKey("language_model"), slug)
        assert record.asset_materialization.tags["dagster/data_version"] == meta["revision"]


def test_mlflow_has_a_run_per_partition_and_the_summaries(pipeline, mlflow_uri):
    settings, instance, _, _ = pipeline
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("emo_assets")
    for variant in VARIANTS:
        run_id = _latest(instance, activations_key(variant), "anger|tiny-gpt2").run_id
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`dagster.run_id` = '{run_id}'")
        by_name = {run.info.run_name: run for run in runs}
        assert len(runs) == 17  # 16 partitions + the summary
        run = by_name[f"{variant}/tiny-gpt2/anger"]
        meta = _metadata(_latest(instance, activations_key(variant), "anger|tiny-gpt2"))
        assert run.data.params["stage"] == "extraction" and run.data.params["task"] == "activation_extraction"
        params = run.data.params
        assert (params["dataset"], params["model"], params["emotion"]) == (variant, "tiny-gpt2", "anger")
        assert run.data.params["dtype"] == "float32" and run.data.params["batch_size"] == "32"
        assert run.data.metrics["file_size_mb"] == pytest.approx(meta["file_size_mb"])
        assert run.data.metrics["n_samples"] == meta["n_samples"]
        assert (run.data.metrics["n_reused"], run.data.metrics["n_computed"]) == (meta["n_reused"], meta["n_computed"])
        sources = [source["path"] for source in meta["reuse_sources"]]
        assert run.data.params["reuse_sources"] == (", ".join(sources) or "none")
        assert "samples_per_s" in run.data.metrics
        assert run.data.tags["dagster.partition_key"] == "anger|tiny-gpt2"
        assert meta["mlflow"] == f"logged (run {run.info.run_id})"
        summary = by_name[f"{variant}/activations_summary"]
        assert summary.data.metrics[f"{variant}_total_files"] == 16
        assert summary.data.metrics["tiny-gpt2_anger_size_mb"] == pytest.approx(meta["file_size_mb"])
        assert summary.data.params["models"] == str(list(settings.model_slugs))
