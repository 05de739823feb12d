"""The asset graph's shape is a contract: keys, partitions, dependencies and mappings, checks, schedule.

`EXPECTED` is the offline profile's graph written out by hand; a change to the graph must change it too.
`dagster definitions validate` runs in a subprocess, as CI does.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg

from emo_assets.definitions import build_defs
from emo_assets.defs.automation import SENSOR
from emo_assets.defs.checks import freshness_check_keys
from emo_assets.defs.jobs import job_runs, stage_order
from emo_assets.defs.schedules import FRESHNESS_SCHEDULE
from emo_assets_tests.defs.conftest import make_settings

REPO = Path(__file__).resolve().parents[2]
EMOTIONS = ["gratitude", "anger", "apology", "neutral"]
SLUGS = ["minilm", "tiny-gpt2", "tiny-pythia", "tiny-gpt-neo"]
MODEL_X_EMOTION = {"emotion": EMOTIONS, "model": SLUGS}
ONE_DIMENSION = "MultiToSingleDimensionPartitionMapping"
ALL, SAME = "AllPartitionMapping", "IdentityPartitionMapping"
PER_MODEL = ("emotion_vectors", "token_vectors", "emotion_subspaces", "linear_probes", "analysis_plots")

# asset key -> (partition keys: None | list | {dimension: keys}, {dependency: partition mapping})
EXPECTED = {
    "language_model": (SLUGS, {}),
    **{
        key: value
        for v in ("baseline", "extended")
        for key, value in {
            f"{v}/dataset_file": (None, {}),
            f"{v}/emotion_dataset": (EMOTIONS, {f"{v}/dataset_file": "AllPartitionMapping"}),
            f"{v}/activations": (
                MODEL_X_EMOTION,
                {f"{v}/emotion_dataset": ONE_DIMENSION, "language_model": ONE_DIMENSION},
            ),
            f"{v}/activations_summary": (None, {f"{v}/activations": ALL}),
            **{f"{v}/{name}": (SLUGS, {f"{v}/activations": ONE_DIMENSION}) for name in PER_MODEL[:4]},
            f"{v}/analysis_plots": (SLUGS, {f"{v}/emotion_vectors": SAME, f"{v}/linear_probes": SAME}),
            f"{v}/cross_model_alignment": (
                None,
                {f"{v}/activations": ALL, f"{v}/emotion_vectors": ALL, f"{v}/emotion_subspaces": ALL},
            ),
            f"{v}/analysis_report": (
                None,
                {**{f"{v}/{name}": ALL for name in (*PER_MODEL, "cross_model_alignment")}, "vector_stability": ALL},
            ),
        }.items()
    },
    "vector_stability": (None, {"baseline/emotion_vectors": ALL, "extended/emotion_vectors": ALL}),
}
EXPECTED_CHECKS = {
    f"{v}/{asset}:{name}"
    for v in ("baseline", "extended")
    for asset, names in {
        "emotion_dataset": ["schema", "row_count", "unique_ids", "unique_texts"],
        "activations": [
            "file_verifies",
            "sample_count",
            "values_finite",
            "shape_matches_model",
            "offsets_valid",
            "partitions_fresh",
        ],
    }.items()
    for name in names
}


def _partitions(node):
    definition = node.partitions_def
    if definition is None:
        return None
    if isinstance(definition, dg.MultiPartitionsDefinition):
        return {dim.name: list(dim.partitions_def.get_partition_keys()) for dim in definition.partitions_defs}
    return list(definition.get_partition_keys())


def graph_snapshot(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    return {
        key.to_user_string(): (
            _partitions(graph.get(key)),
            {
                p.to_user_string(): type(graph.get_partition_mapping(key, p)).__name__
                for p in graph.get(key).parent_keys
            },
        )
        for key in graph.get_all_asset_keys()
    }


def test_offline_graph_matches_the_expected_structure(tmp_path, small_datasets, mlflow_uri):
    defs = build_defs(make_settings(tmp_path, small_datasets, mlflow_uri))
    assert graph_snapshot(defs) == EXPECTED
    graph = defs.resolve_asset_graph()
    # the inferred one-dimension mappings pick the right dimension
    child = dg.AssetKey(["baseline", "activations"])
    mapped = {
        parent.to_user_string(): list(
            graph.get_parent_partition_keys_for_child(
                "anger|tiny-gpt2", parent, child
            ).partitions_subset.get_partition_keys()
        )
        for parent in graph.get(child).parent_keys
    }
    assert mapped == {"baseline/emotion_dataset": ["anger"], "language_model": ["tiny-gpt2"]}
    checks = {f"{k.asset_key.to_user_string()}:{k.name}" for k in graph.asset_check_keys}
    assert checks == EXPECTED_CHECKS
    specs = [spec for checks_def in defs.asset_checks for spec in checks_def.check_specs]
    blocking = {f"{s.asset_key.to_user_string()}:{s.name}" for s in specs if s.blocking}
    assert blocking == {c for c in EXPECTED_CHECKS if not c.endswith(":partitions_fresh")}
    # what a check reads besides its asset is a declared dependency (language_model's metadata via the instance)
    reads = {
        f"{s.asset_key.to_user_string()}:{s.name}": sorted(d.asset_key.to_user_string() for d in s.additional_deps)
        for s in specs
        if s.additional_deps
    }
    assert reads == {
        key: value
        for v in ("baseline", "extended")
        for key, value in {
            f"{v}/emotion_dataset:row_count": [f"{v}/dataset_file"],
            f"{v}/activations:sample_count": [f"{v}/emotion_dataset"],
            f"{v}/activations:shape_matches_model": ["language_model"],
            f"{v}/activations:partitions_fresh": [f"{v}/dataset_file", "language_model"],
        }.items()
    }
    for variant in ("baseline", "extended"):
        for asset in ("activations", "activations_summary"):
            assert graph.get(dg.AssetKey([variant, asset])).freshness_policy is not None
    torch_assets = {a.key.to_user_string() for a in defs.assets if getattr(a, "op", None) and a.op.pool == "torch"}
    assert torch_assets == {"language_model", "baseline/activations", "extended/activations"}
    schedule = defs.resolve_schedule_def(FRESHNESS_SCHEDULE)
    assert schedule.cron_schedule == "0 6 * * *"


def test_profiles_and_variants_are_configuration(tmp_path, small_datasets, mlflow_uri):
    paper = build_defs(make_settings(tmp_path, small_datasets, mlflow_uri, EMO_ASSETS_PROFILE="paper"))
    snapshot = graph_snapshot(paper)
    assert snapshot["language_model"][0] == ["gpt2", "EleutherAI-pythia-160m", "EleutherAI-gpt-neo-125M"]
    assert snapshot["baseline/activations"][0]["model"] == snapshot["language_model"][0]

    three = {**small_datasets, "held_out": small_datasets["baseline"]}
    snapshot = graph_snapshot(build_defs(make_settings(tmp_path, three, mlflow_uri)))
    assert {key for key in snapshot if key.startswith("held_out/")} == {
        key.replace("baseline/", "held_out/") for key in EXPECTED if key.startswith("baseline/")
    }
    settings = make_settings(tmp_path, three, mlflow_uri)
    assert len(freshness_check_keys(settings)) == 3


def _project_command(args: list[str], cwd: Path = REPO, **env) -> str:
    """stdout + stderr of one of the venv's programs run in `cwd` (default: this project) without the test
    settings; fails the test when it exits non-zero."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EMO_ASSETS_") or k == "EMO_ASSETS_MODEL_CACHE"}
    program = Path(sys.executable).with_name(args[0])
    venv = {"VIRTUAL_ENV": str(Path(sys.executable).parents[1])}  # dg compares it with the project's .venv
    completed = subprocess.run(
        [str(program), *args[1:]], cwd=cwd, env={**clean, **venv, **env}, capture_output=True, text=True, timeout=180
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout + completed.stderr


def test_dagster_definitions_validate_passes():
    """The three ways the code location is loaded: the module (CI, the Helm chart), workspace.yaml (`dagster
    dev`, `emo-assets ui`) and the `dg` project (`[tool.dg]`)."""
    assert "Validation successful" in _project_command(
        ["dagster", "definitions", "validate", "-m", "emo_assets.definitions"]
    )
    assert "code location emo_assets." in _project_command(
        ["dagster", "definitions", "validate", "-w", "workspace.yaml"]
    )
    assert "All definitions loaded successfully" in _project_command(["dg", "check", "defs"])


def test_a_module_scaffolded_with_dg_joins_the_code_location(tmp_path):
    """`dg scaffold defs` writes a module into the defs folder; the loader picks it up with no list to edit."""
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copytree(REPO / "emo_assets", tmp_path / "emo_assets", ignore=shutil.ignore_patterns("__pycache__"))
    _project_command(["dg", "scaffold", "defs", "dagster.asset", "scaffolded_asset.py"], cwd=tmp_path)
    assert (tmp_path / "emo_assets" / "defs" / "scaffolded_asset.py").is_file()
    listing = (
        "from emo_assets.definitions import build_defs; print(build_defs().resolve_asset_graph().get_all_asset_keys())"
    )
    keys = _project_command(["python", "-c", listing], cwd=tmp_path, PYTHONPATH=str(tmp_path))
    assert "AssetKey(['scaffolded_asset'])" in keys and "AssetKey(['language_model'])" in keys


def test_stage_jobs_cover_every_asset_once(tmp_path, small_datasets, mlflow_uri):
    """Each stage job's assets and partitions; together they materialize every asset of the graph."""
    defs = build_defs(make_settings(tmp_path, small_datasets, mlflow_uri))
    jobs = {}
    for name in stage_order(make_settings(tmp_path, small_datasets, mlflow_uri), ["baseline", "extended"]):
        job = defs.resolve_job_def(name)
        keys = sorted(k.to_user_string() for k in job.asset_layer.executable_asset_keys)
        jobs[name] = (keys, [span for span, _ in job_runs(job)])
    per_variant = {
        f"{v}_{job}": value
        for v in ("baseline", "extended")
        for job, value in {
            "datasets": ([f"{v}/dataset_file", f"{v}/emotion_dataset"], ["4 partitions"]),
            "activations": ([f"{v}/activations", f"{v}/activations_summary"], ["16 partitions"]),
            "analysis": (sorted(f"{v}/{name}" for name in PER_MODEL), ["4 partitions"]),
            "comparisons": ([f"{v}/analysis_report", f"{v}/cross_model_alignment"], ["unpartitioned"]),
        }.items()
    }
    assert jobs == {
        "load_models": (["language_model"], SLUGS),
        **per_variant,
        "cross_variant_analysis": (["vector_stability"], ["unpartitioned"]),
    }
    covered = sorted(key for keys, _ in jobs.values() for key in keys)
    assert covered == sorted(EXPECTED)  # every asset in exactly one job
    sensor = defs.resolve_sensor_def(SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    graph = defs.resolve_asset_graph()
    automated = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).automation_condition}
    assert automated == {
        key
        for key in EXPECTED
        if key.split("/")[-1]
        in (*PER_MODEL, "activations_summary", "cross_model_alignment", "analysis_report", "vector_stability")
    }
