"""Dagster-level failure behaviour, in process: bad datasets, an unavailable model, a hung MLflow server,
corrupt activation files. Runs use an in-memory (ephemeral) or test instance and results under `tmp_path`.

Covered elsewhere (not repeated here):
* bit-flipped / NaN activation files fail the blocking checks and stop `activations_summary` in the same run:
  `emo_assets_tests/defs/test_checks.py::test_corrupt_files_fail_the_checks_and_block_the_summary`;
  the reader itself: `emo_assets_tests/core/test_storage.py::test_truncated_file_raises`,
  `test_bit_flip_in_data_raises`, `test_bit_flip_in_header_raises`.
* MLflow refusing connections (`http://127.0.0.1:9`): `emo_assets_tests/defs/test_mlflow.py`.
"""

from __future__ import annotations

import dagster as dg
import pytest

from emo_assets.core.datasets import validate_dataset
from emo_assets.definitions import build_defs
from emo_assets.defs import activations as activations_module
from emo_assets.defs.activations import activation_path, activations_key
from emo_assets.defs.datasets import emotion_dataset_key
from emo_assets.defs.jobs import (
    LOAD_MODELS,
    analysis_job,
    datasets_job,
    job_runs,
    partition_range,
    stage_order,
)
from emo_assets.defs.models import LANGUAGE_MODEL
from emo_assets.defs.partitions import partitions_for
from emo_assets.defs.summary import summary_key
from emo_assets_tests.conftest import REPO_ROOT
from emo_assets_tests.fake_servers import SilentServer
from emo_assets_tests.pipeline import materialize, run_jobs
from emo_assets_tests.reliability.helpers import dagster_settings, step_failures, temp_files, tree

BAD = REPO_ROOT / "emo_assets_tests" / "data" / "bad"
BAD_KINDS = [
    "invalid_json.jsonl",
    "top_level_array.jsonl",
    "unknown_emotion.jsonl",
    "duplicate_id.jsonl",
    "invalid_utf8.jsonl",
    "unpaired_surrogate_text.jsonl",
    "zero_samples_for_an_emotion.jsonl",
    "empty_file.jsonl",
    "directory_not_a_file.jsonl",
]


def _fifty_mb_line(folder):
    """The good records of a corpus file plus one 50 MB line (skipped in bounded memory by the validator)."""
    path = folder / "huge_line.jsonl"
    with open(path, "wb") as stream:
        stream.write((BAD / "duplicate_id.jsonl").read_bytes().splitlines(keepends=True)[0])
        stream.write(b'{"emotion": "anger", "text": "')
        for _ in range(50):
            stream.write(b"a" * (1 << 20))
        stream.write(b'"}\n')
        stream.write(b"".join((BAD / "duplicate_id.jsonl").read_bytes().splitlines(keepends=True)[3:]))
    return path


KINDS = [*BAD_KINDS, "50mb_line", "missing_file"]


@pytest.fixture(scope="module")
def bad_graph(tmp_path_factory):
    """One graph whose dataset variants are the bad files (`v<i>` is KINDS[i]); one instance for all runs."""
    root = tmp_path_factory.mktemp("bad_inputs")
    special = {"50mb_line": lambda: _fifty_mb_line(root), "missing_file": lambda: root / "absent.jsonl"}
    paths = {f"v{i}": special[kind]() if kind in special else BAD / kind for i, kind in enumerate(KINDS)}
    settings = dagster_settings(root / "pipeline", paths, EMO_ASSETS_MODELS="tiny-gpt2")
    with dg.DagsterInstance.ephemeral() as instance:  # in memory: no sqlite commits, ~10x faster runs
        yield settings, build_defs(settings), instance, paths


@pytest.mark.parametrize("kind", KINDS)
def test_bad_dataset_fails_emotion_dataset_with_the_validator_message(bad_graph, kind):
    settings, defs, instance, paths = bad_graph
    variant = f"v{KINDS.index(kind)}"
    _, issues = validate_dataset(paths[variant], settings.emotions)
    errors = [str(issue) for issue in issues if issue.severity == "error"]
    assert errors, f"{kind}: the validator found nothing"
    before = tree(settings.root)
    result = materialize(defs, [emotion_dataset_key(variant)], instance, partition_range(settings.emotions))
    assert not result.success
    message = step_failures(result)[f"{variant}__emotion_dataset"]
    for error in errors:
        assert error in message, f"{error!r} not in the failure:\n{message}"
    assert not result.get_asset_materialization_events()
    assert tree(settings.root) == before, "the failed materialization wrote files"
    assert not settings.results_dir.exists(), "a failed materialization created the results folder"


def _unavailable_model_run(tmp_path, small_datasets, monkeypatch):
    """language_model for a hub id that is not cached while the hub is unreachable (connection refused)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    settings = dagster_settings(tmp_path, small_datasets, EMO_ASSETS_MODELS="EleutherAI/pythia-160m")
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize(
            build_defs(settings), [LANGUAGE_MODEL], instance, {"dagster/partition": "EleutherAI-pythia-160m"}
        )
    assert not result.success
    assert not (tmp_path / "results").exists()
    return result


def _names_model_and_remedies(message: str) -> None:
    assert "'EleutherAI/pythia-160m'" in message, message
    for remedy in ("network", "HF_HOME", "HF_HUB_OFFLINE", "local model directory", "offline model"):
        assert remedy in message, message


def test_unavailable_model_fails_language_model_naming_the_model_and_remedies(tmp_path, small_datasets, monkeypatch):
    result = _unavailable_model_run(tmp_path, small_datasets, monkeypatch)
    _names_model_and_remedies(step_failures(result)["language_model"])


def test_unavailable_model_message_is_the_step_failure_itself(tmp_path, small_datasets, monkeypatch):
    result = _unavailable_model_run(tmp_path, small_datasets, monkeypatch)
    _names_model_and_remedies(step_failures(result, causes=False)["language_model"])


@pytest.fixture
def hung_server():
    """A TCP port that accepts connections but never answers: a hung MLflow server."""
    server = SilentServer(hang=True)
    yield server
    server.close()


@pytest.mark.slow
def test_hung_mlflow_server_costs_one_timeout_and_is_reported(tmp_path, small_datasets, hung_server):
    """One request reaches the hung server and times out; every other partition is reported without waiting."""
    settings = dagster_settings(
        tmp_path, small_datasets, EMO_ASSETS_MODELS="tiny-gpt2", EMO_ASSETS_MLFLOW_URI=hung_server.uri
    )
    defs = build_defs(settings)
    keys = partitions_for(settings).activations.get_partition_keys()
    with dg.DagsterInstance.ephemeral() as instance:
        assert run_jobs(defs, [LOAD_MODELS, datasets_job("baseline")], instance)
        result = materialize(
            defs, [activations_key("baseline"), summary_key("baseline")], instance, partition_range(keys)
        )
        warnings = [
            e.user_message
            for e in instance.all_logs(result.run_id)
            if e.level == 30 and "MLflow" in (e.user_message or "")
        ]
    assert result.success
    assert hung_server.connections == 1
    statuses = [m.materialization.metadata["mlflow"].value for m in result.get_asset_materialization_events()]
    assert len(statuses) == len(keys) + 1
    assert all(s.startswith("not logged (") for s in statuses), statuses
    attempted = [s for s in statuses if not s.endswith("not retried in this run)")]
    assert len(attempted) == 1 and ("Timeout" in attempted[0] or "timed out" in attempted[0]), statuses
    assert len(warnings) == 1 and hung_server.uri in warnings[0]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


@pytest.mark.slow
def test_truncated_activation_file_stops_the_pipeline_before_analysis(tmp_path, small_datasets, monkeypatch):
    """A truncated file fails `file_verifies`, the run fails, no later stage runs; an analysis run started
    by hand on that file fails naming it instead of computing on garbage."""
    settings = dagster_settings(tmp_path, small_datasets, EMO_ASSETS_MODELS="tiny-gpt2")
    defs = build_defs(settings)
    extract = activations_module.extract_files

    def truncating_extract(loaded, jobs, options):
        results = extract(loaded, jobs, options)
        for job, result in zip(jobs, results):
            if job.source.emotion == "anger":
                _truncate(result.path)
        return results

    monkeypatch.setattr(activations_module, "extract_files", truncating_extract)
    lines = []
    with dg.DagsterInstance.ephemeral() as instance:
        assert run_jobs(defs, stage_order(settings, ["baseline"]), instance, lines) is False
        jobs = [line.split(" [")[0] for line in lines if "(run " in line]
        assert jobs == ["load_models", "baseline_datasets", "baseline_activations"], lines
        assert any(line.startswith("baseline_activations [4 partitions] FAILED") for line in lines), lines
        failed_check = [line for line in lines if "FAILED baseline/activations:file_verifies" in line]
        assert failed_check and "truncated" in failed_check[0], lines
        failed_steps = [line.split(":")[0].strip() for line in lines if line.startswith("    baseline_")]
        assert failed_steps == ["baseline_activations_checks"], lines  # the blocking check stopped the summary
        assert not (settings.results_dir / "baseline" / "analysis").exists()
        assert not (settings.results_dir / "baseline" / "summary").exists()

        analysis = defs.resolve_job_def(analysis_job("baseline"))
        ((_, tags),) = job_runs(analysis)  # one run over every model
        result = analysis.execute_in_process(instance=instance, tags=tags, raise_on_error=False)
    assert not result.success
    bad = activation_path(settings, "baseline", "tiny-gpt2", "anger")
    messages = step_failures(result)
    assert messages and all(str(bad) in m and "truncated" in m for m in messages.values()), messages
    assert temp_files(settings.results_dir) == []
