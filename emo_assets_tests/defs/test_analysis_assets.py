"""The analysis assets end to end: the offline profile on the small datasets, both variants.

One module-scoped run of the stage jobs (`jobs.stage_order`, as `emo-assets materialize` runs them)
materializes the extraction and then every analysis asset; the tests read the run's materialization events and check each asset's metadata
against its files: paths exist, row counts equal Parquet heights, plots are PNGs matplotlib can read, the
report links images that exist, MLflow got the runs with their artifacts. The run takes about two minutes on
two cores (more than half of it the extraction), so those tests are marked `slow`.
"""

from pathlib import Path

import dagster as dg
import matplotlib.image as mpimg
import polars as pl
import pytest

from emo_assets.definitions import build_defs
from emo_assets.defs import analysis
from emo_assets.defs.jobs import stage_order
from emo_assets_tests.defs.conftest import make_settings
from emo_assets_tests.pipeline import run_jobs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VARIANTS = ("baseline", "extended")
# three of the four offline models keep the test short and still cover both cases of subspace overlap:
# tiny-gpt2 and tiny-pythia share d = 64, minilm (d = 384) is skipped
SLUGS = ["minilm", "tiny-gpt2", "tiny-pythia"]
PER_MODEL = [spec.name for spec in analysis.ANALYSES if spec.partitioning == analysis.MODEL]
UNPARTITIONED = [f"{v}/{s.name}" for v in VARIANTS for s in analysis.ANALYSES if s.partitioning == analysis.VARIANT]
UNPARTITIONED.append("vector_stability")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, small_datasets, mlflow_uri):
    """(settings, {asset: {partition: metadata}}, run log lines), everything materialized once."""
    tmp_path = tmp_path_factory.mktemp("analysis_e2e")
    settings = make_settings(tmp_path, dict(small_datasets), mlflow_uri, EMO_ASSETS_MODELS=",".join(SLUGS))
    defs = build_defs(settings)
    lines: list[str] = []
    events: dict[str, dict] = {}
    with dg.instance_for_test() as instance:
        ok = run_jobs(defs, stage_order(settings, VARIANTS), instance, lines)
        assert ok, "\n".join(lines)
        for key in instance.get_asset_keys():
            name = key.to_user_string()
            records = instance.fetch_materializations(key, limit=100).records
            events[name] = {
                r.asset_materialization.partition: {k: v.value for k, v in r.asset_materialization.metadata.items()}
                for r in reversed(records)
            }
    return settings, events, lines


def _check_metadata(meta: dict) -> None:
    """`<name>_rows` equals the height of the Parquet at `<name>_path`; every `*_path` and the uri exist."""
    paths = {k[: -len("_path")]: Path(v) for k, v in meta.items() if k.endswith("_path")}
    assert paths, meta
    for name, path in paths.items():
        assert path.is_file(), path
        if path.suffix == ".parquet":
            assert pl.read_parquet(path).height == meta[f"{name}_rows"], name
    uri = meta["dagster/uri"]
    assert uri.startswith("file://") and Path(uri[len("file://") :]).is_file()


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)


@pytest.mark.slow
def test_every_analysis_asset_materializes_per_model(pipeline):
    _, events, lines = pipeline
    for variant in VARIANTS:
        for name in PER_MODEL:
            partitions = events.get(f"{variant}/{name}", {})
            assert sorted(partitions) == sorted(SLUGS), (variant, name, "\n".join(lines))
            for _slug, meta in partitions.items():
                _check_metadata(meta)
                if name != "analysis_plots":
                    assert meta["dagster/partition_row_count"] == pl.read_parquet(meta["dagster/uri"][7:]).height
                assert meta["mlflow"].startswith("logged"), meta["mlflow"]
    for name in UNPARTITIONED:
        assert set(events.get(name, {})) == {None}, name
        meta = events[name][None]
        assert meta["mlflow"].startswith("logged"), meta["mlflow"]


@pytest.mark.slow
def test_probe_metadata_matches_its_table(pipeline):
    _, events, _ = pipeline
    for _slug, meta in events["baseline/linear_probes"].items():
        table = pl.read_parquet(meta["probes_path"])
        assert table.height == 2 * table["layer"].n_unique() and set(table["kind"]) == {"resid_post", "mlp_out"}
        resid = table.filter(pl.col("kind") == "resid_post")
        best = resid.sort(["accuracy_mean", "layer"], descending=[True, False]).row(0, named=True)
        assert (meta["best_layer"], meta["best_accuracy"]) == (best["layer"], best["accuracy_mean"])
        assert meta["bow_accuracy"] == table["bow_mean"][0]
        assert meta["n_folds"] == 5 and table["n_samples"].unique().to_list() == [24]  # 6 sentences x 4 emotions


@pytest.mark.slow
def test_plots_are_valid_pngs_and_shown_inline(pipeline):
    _, events, _ = pipeline
    for variant in VARIANTS:
        for _slug, meta in events[f"{variant}/analysis_plots"].items():
            for name in ("layer_profile", "cosine_heatmap"):
                _check_png(Path(meta[f"{name}_path"]))
                assert "data:image/png;base64," in meta[name]
        cross = events[f"{variant}/cross_model_alignment"][None]
        _check_png(Path(cross["cka_heatmap_path"]))
        assert "data:image/png;base64," in cross["cka_heatmap"]


@pytest.mark.slow
def test_cross_model_tables(pipeline):
    _, events, _ = pipeline
    meta = events["baseline/cross_model_alignment"][None]
    cka = pl.read_parquet(meta["cka_path"])
    assert {tuple(p) for p in cka.select("model_a", "model_b").unique().rows()} >= {("minilm", "tiny-gpt2")}
    assert cka["cka"].is_between(0, 1).all()
    overlap = pl.read_parquet(meta["subspace_overlap_path"])
    # the tiny models share d = 64, minilm (d = 384) is skipped for overlap
    assert "minilm" not in set(overlap["model_a"]) | set(overlap["model_b"])
    assert overlap.height > 0 and meta["skipped_overlap_pairs"] == 2
    assert "minilm (d=384)" in meta["notes"]


@pytest.mark.slow
def test_vector_stability_covers_both_variants(pipeline):
    _, events, _ = pipeline
    meta = events["vector_stability"][None]
    table = pl.read_parquet(meta["vector_stability_path"])
    assert set(table["model"]) == set(SLUGS)
    assert table.select("variant_a", "variant_b").unique().rows() == [("baseline", "extended")]
    assert meta["dagster/row_count"] == table.height


@pytest.mark.slow
def test_reports_link_existing_images(pipeline):
    settings, events, _ = pipeline
    for variant in VARIANTS:
        meta = events[f"{variant}/analysis_report"][None]
        report = Path(meta["dagster/uri"][len("file://") :])
        assert report == settings.results_dir / variant / "analysis" / "report.md"
        text = report.read_text(encoding="utf-8")
        for heading in ("## Probe accuracy per layer", "## Separation per layer", "## Stability", "## Figures"):
            assert heading in text
        links = [line[line.index("](") + 2 : -1] for line in text.splitlines() if line.startswith("![")]
        assert len(links) == meta["n_images"] == 2 * len(SLUGS) + 1
        for link in links:
            assert (report.parent / link).is_file(), link
            _check_png(report.parent / link)


@pytest.mark.slow
def test_mlflow_runs_carry_the_files_as_artifacts(pipeline):
    from mlflow import MlflowClient

    settings, events, _ = pipeline
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    status = events["baseline/analysis_plots"]["minilm"]["mlflow"]
    run_id = status.split("run ")[1].split(",")[0]
    folder = client.list_artifacts(run_id)[0].path
    names = sorted(Path(a.path).name for a in client.list_artifacts(run_id, folder))
    assert names == ["cosine_heatmap.png", "layer_profile.png"]


def test_vector_stability_needs_two_variants(tmp_path, small_datasets, mlflow_uri):
    settings = make_settings(tmp_path, {"baseline": small_datasets["baseline"]}, mlflow_uri)
    defs = build_defs(settings)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert "vector_stability" not in keys and "baseline/analysis_report" in keys
    assert stage_order(settings, ["baseline"])[-2:] == ["baseline_analysis", "baseline_comparisons"]
    assert "cross_variant_analysis" not in {job.name for job in defs.jobs}


def test_the_analysis_runs_on_sentence_ends_of_some_layers(tmp_path, small_datasets, mlflow_uri):
    """`emo-assets materialize`'s stage jobs with EMO_ASSETS_POSITIONS=sentence_end and EMO_ASSETS_LAYERS=0,-1:
    every analysis asset materializes, its tables name the model layers stored, and the token vectors' metadata
    says they do not apply and why."""
    env = {"EMO_ASSETS_MODELS": "tiny-gpt2", "EMO_ASSETS_POSITIONS": "sentence_end", "EMO_ASSETS_LAYERS": "0,-1"}
    settings = make_settings(tmp_path, {"baseline": small_datasets["baseline"]}, mlflow_uri, **env)
    defs = build_defs(settings)
    lines: list[str] = []
    with dg.instance_for_test() as instance:
        assert run_jobs(defs, stage_order(settings, ["baseline"]), instance, lines), "\n".join(lines)
        meta = {}
        for name in [*PER_MODEL, "analysis_report"]:
            records = instance.fetch_materializations(dg.AssetKey(["baseline", name]), limit=1).records
            assert records, (name, "\n".join(lines))
            meta[name] = {k: v.value for k, v in records[0].asset_materialization.metadata.items()}
    status = meta["token_vectors"]["token_status"]
    assert status.startswith("not applicable: the activation files store positions = sentence_end"), status
    assert meta["token_vectors"]["token_vectors_rows"] == 0
    for name, column in (
        ("emotion_vectors", "separation"),
        ("emotion_subspaces", "subspaces"),
        ("linear_probes", "probes"),
    ):
        table = pl.read_parquet(meta[name][f"{column}_path"])
        assert sorted(set(table["layer"])) == [0, 3], name  # tiny-gpt2 has 4 layers
    report = Path(meta["analysis_report"]["report_path"]).read_text(encoding="utf-8")
    assert "token strings not applicable" in report and "stored: [0, 3]" in report
