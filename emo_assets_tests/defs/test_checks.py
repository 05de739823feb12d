"""Integrity checks: a bad activation file fails its blocking check and stops the summary in the same run;
a bad dataset fails `emotion_dataset` with the validator's `FILE:LINE` messages.
"""

import dagster as dg
import numpy as np
import pytest

from emo_assets.core.activations import ActivationFile, write_activation_file
from emo_assets.definitions import build_defs
from emo_assets.defs import activations as activations_module
from emo_assets.defs.activations import activations_key
from emo_assets.defs.datasets import emotion_dataset_key
from emo_assets.defs.jobs import partition_range
from emo_assets.defs.partitions import partitions_for
from emo_assets.defs.summary import summary_key
from emo_assets_tests.conftest import read_records, write_records
from emo_assets_tests.defs.conftest import check_results, make_settings, partition_metadata
from emo_assets_tests.pipeline import materialize


def _flip_a_bit(path) -> None:
    """Change the lowest mantissa bit of the file's last float: the data checksum no longer matches."""
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))


def _store_a_nan(path) -> None:
    """Rewrite the file with one NaN and a *valid* checksum: only the finiteness check can notice."""
    file = ActivationFile(path)
    arrays = {kind: np.array(file.raw(kind)) for kind in file.kinds}
    arrays["resid_post"][1, 2, 3] = np.nan
    offsets, input_ids, header = np.array(file.offsets), np.array(file.input_ids), file.header
    del file
    write_activation_file(path, arrays, offsets=offsets, input_ids=input_ids, header=header)


@pytest.mark.slow  # fault injection
def test_corrupt_files_fail_the_checks_and_block_the_summary(baseline_ready, monkeypatch):
    settings, defs, instance = baseline_ready
    extract = activations_module.extract_files
    damage = {("tiny-gpt2", "anger"): _flip_a_bit, ("tiny-pythia", "apology"): _store_a_nan}

    def damaging_extract(loaded, jobs, options):
        results = extract(loaded, jobs, options)
        for job, result in zip(jobs, results):
            damage.get((loaded.slug, job.source.emotion), lambda p: None)(result.path)
        return results

    monkeypatch.setattr(activations_module, "extract_files", damaging_extract)
    keys = partitions_for(settings).activations.get_partition_keys()
    result = materialize(defs, [activations_key("baseline"), summary_key("baseline")], instance, partition_range(keys))

    assert not result.success
    assert len(partition_metadata(result, activations_key("baseline"))) == 8  # the asset itself succeeded
    assert not partition_metadata(result, summary_key("baseline"))  # ... but the summary never ran
    checks = check_results(result)
    verifies, finite = checks["baseline/activations:file_verifies"], checks["baseline/activations:values_finite"]
    assert not verifies.passed and verifies.severity == dg.AssetCheckSeverity.ERROR
    assert verifies.metadata["failed_partitions"].value == ["anger|tiny-gpt2"]
    assert "checksum mismatch" in verifies.description
    assert not finite.passed and finite.metadata["failed_partitions"].value == ["apology|tiny-pythia"]
    for name in ("sample_count", "shape_matches_model", "offsets_valid"):
        assert checks[f"baseline/activations:{name}"].passed, checks[f"baseline/activations:{name}"].description
    assert checks["baseline/activations:sample_count"].metadata["partitions_checked"].value == 8
    assert [e.step_key for e in result.all_events if e.is_step_failure] == ["baseline_activations_checks"]
    assert "baseline__activations_summary" not in {e.step_key for e in result.all_events if e.is_step_start}


def test_invalid_dataset_fails_with_file_and_line(tmp_path, own_datasets, mlflow_uri, instance):
    records = read_records(own_datasets["baseline"])
    records[3]["emotion"] = "joy"
    records[5]["text"] = ""
    write_records(own_datasets["baseline"], records)
    settings = make_settings(tmp_path, {"baseline": own_datasets["baseline"]}, mlflow_uri)
    result = materialize(
        build_defs(settings), [emotion_dataset_key("baseline")], instance, partition_range(settings.emotions)
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    message = failure.user_failure_data.description
    assert f"{own_datasets['baseline']}:4: emotion: unknown emotion 'joy'" in message
    assert f"{own_datasets['baseline']}:6: text: empty" in message
    assert not (settings.results_dir / "baseline" / "datasets").exists()  # nothing written


def test_duplicate_texts_warn_without_blocking(tmp_path, own_datasets, mlflow_uri, instance):
    records = read_records(own_datasets["baseline"])
    copy = next(r for r in records if r["emotion"] == "anger")
    records.append({**copy, "id": "copy-of-an-anger-sentence"})
    write_records(own_datasets["baseline"], records)
    settings = make_settings(tmp_path, {"baseline": own_datasets["baseline"]}, mlflow_uri)
    result = materialize(
        build_defs(settings), [emotion_dataset_key("baseline")], instance, partition_range(settings.emotions)
    )
    assert result.success
    checks = check_results(result)
    texts = checks["baseline/emotion_dataset:unique_texts"]
    assert not texts.passed and texts.severity == dg.AssetCheckSeverity.WARN
    assert texts.metadata["failed_partitions"].value == ["anger"]
    assert all(checks[f"baseline/emotion_dataset:{n}"].passed for n in ("schema", "row_count", "unique_ids"))
    anger = partition_metadata(result, emotion_dataset_key("baseline"))["anger"]
    assert anger["dagster/partition_row_count"] == 7 and anger["dataset_warnings"] == 1
    assert anger["words_min"] <= anger["words_mean"] <= anger["words_max"]
