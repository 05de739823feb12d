"""Analysis assets: thin Dagster wrappers around `emo_assets.core.analysis`, generated from one table.

`ANALYSES` lists every analysis asset of a dataset variant V: its name, its partitioning (`MODEL`: one
partition per model, reading all emotion partitions of that model's `V/activations` through
`MultiToSingleDimensionPartitionMapping`; `VARIANT`: one per variant), its compute function and its main
table. The asset factories, the report's dependencies, the stage jobs (`emo_assets.defs.jobs`) and the
automation sensor all read that table, so a new analysis is one entry there.

- `V/emotion_vectors`        sentence-end emotion vectors, cosines, separation (safetensors + Parquet)
- `V/token_vectors`          first-token-free means and emotion-word vectors vs sentence-end ones
- `V/emotion_subspaces`      per-emotion PCA subspaces, principal angles, overlap vs random
- `V/linear_probes`          per-layer probes, bag-of-words baseline, shuffled-label control, selectivity
- `V/analysis_plots`         layer profile and best-layer cosine heatmap (PNG; MLflow artifacts; shown inline)
- `V/cross_model_alignment`  CKA (plain, debiased), RSA, subspace overlap between every pair of models
- `V/analysis_report`        `results/V/analysis/report.md`, rebuilt from the outputs above
- `vector_stability`         baseline vs extended emotion vectors (defined only with two or more variants)

Outputs are files at deterministic paths (`emo_assets.core.analysis.inputs`); the assets return metadata
only. Every asset logs one MLflow run per model (or one per unpartitioned materialization) with its headline
numbers and its files as artifacts; MLflow trouble never fails an asset (metadata `mlflow` says what
happened). The per-model assets use a single-run backfill policy: a run over several models gets them all in
`context.partition_keys` and reports metadata per partition.

Every analysis asset is automated (`automation.py`): with the daemon running, it is requested once all of its
inputs exist and one of them was updated, e.g. a model's analysis after the last of its activation partitions.

The module is longer than the other stages because it holds the table and the five asset factories it drives;
each factory is a thin wrapper, and keeping them beside the table is what makes a half-registered asset
impossible to write.
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import dagster as dg
import polars as pl

from emo_assets.core.activations import ActivationFileError
from emo_assets.core.analysis.comparisons import cross_model_alignment_step, vector_stability_step
from emo_assets.core.analysis.inputs import AnalysisInputError, ModelActivations, token_strings
from emo_assets.core.analysis.model_analysis import (
    StepResult,
    emotion_subspaces_step,
    emotion_vectors_step,
    linear_probes_step,
    model_plots_step,
    token_vectors_step,
)
from emo_assets.core.analysis.report import PROBE_COLUMNS, markdown_table
from emo_assets.core.analysis.variant_report import analysis_report_step
from emo_assets.core.config import AnalysisSettings, Settings
from emo_assets.core.datasets import DatasetError
from emo_assets.core.models import corpus_texts
from emo_assets.defs import loaded_settings
from emo_assets.defs.activations import activations_key
from emo_assets.defs.analysis_metadata import image_markdown, log_mlflow, step_metadata
from emo_assets.defs.automation import ANALYSIS_CONDITION
from emo_assets.defs.partitions import MODEL_DIM, fingerprint, partitions_for, step_data_version
from emo_assets.defs.resources import MlflowTracker, TrackedDataset

CODE_VERSION = "1"
STABILITY_KEY = dg.AssetKey("vector_stability")
MODEL, VARIANT = "model", "variant"  # partitioning of an analysis asset: per model partition, or one per variant


@dataclass(frozen=True)
class AnalysisSpec:
    """One analysis asset of every variant: `build(settings, variant, spec)` makes its `AssetsDefinition`.

    The per-model assets that read the activations share `_per_model_asset`, which calls
    `compute(acts, settings, config)` per model and describes its `main_table`; the others have a factory of
    their own. `description` is formatted with `variant` and `config` (the `AnalysisSettings`).
    """

    name: str
    partitioning: str  # MODEL or VARIANT
    build: Callable[[Settings, str, "AnalysisSpec"], dg.AssetsDefinition]
    description: str = ""
    kinds: frozenset[str] = frozenset()
    compute: Callable[[ModelActivations, Settings, AnalysisSettings], StepResult] | None = None
    main_table: str | None = None
    needs_texts: bool = False


def analysis_key(variant: str, name: str) -> dg.AssetKey:
    """`<variant>/<name>` for the names in `ANALYSES`."""
    return dg.AssetKey([variant, name])


def analysis_keys(variant: str) -> tuple[list[dg.AssetKey], list[dg.AssetKey]]:
    """(per-model keys, per-variant keys) of the analysis assets of `variant`, in table order."""
    by = {MODEL: [], VARIANT: []}
    for spec in ANALYSES:
        by[spec.partitioning].append(analysis_key(variant, spec.name))
    return by[MODEL], by[VARIANT]


def _inputs_version(acts: ModelActivations, config: AnalysisSettings) -> str:
    """Data version of one model's analysis: the activation files' checksums, the settings, the code version."""
    checksums = {e: f.header.checksum for e, f in acts.files.items()}
    return fingerprint({"checksums": checksums, "config": asdict(config), "code": CODE_VERSION})


def _per_model_asset(settings: Settings, variant: str, spec: AnalysisSpec) -> dg.AssetsDefinition:
    parts, config, name = partitions_for(settings), settings.analysis, spec.name
    # stated although Dagster infers it, so that a reader sees which activation partitions a model's analysis reads
    mapping = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=MODEL_DIM)

    @dg.asset(
        key=analysis_key(variant, name),
        deps=[dg.AssetDep(activations_key(variant), partition_mapping=mapping)],
        partitions_def=parts.models,
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name=f"{variant}_analysis",
        kinds=set(spec.kinds),
        code_version=CODE_VERSION,
        automation_condition=ANALYSIS_CONDITION,
        description=spec.description.format(variant=variant, config=config),
    )
    def _asset(context: dg.AssetExecutionContext, mlflow: MlflowTracker) -> dg.MaterializeResult:
        versions = {}
        for slug in context.partition_keys:
            started, began = time.perf_counter(), time.time()
            try:
                dataset = settings.datasets[variant] if spec.needs_texts else None
                acts = ModelActivations.load(
                    settings.results_dir, variant, slug, settings.emotions, dataset_path=dataset
                )
                result = spec.compute(acts, settings, config)
            except (AnalysisInputError, ActivationFileError, DatasetError, FileNotFoundError) as exc:
                raise dg.Failure(description=f"{variant}/{name}[{slug}]: {exc}") from exc
            seconds = time.perf_counter() - started
            for note in result.notes:
                context.log.warning(f"{variant}/{name}[{slug}]: {note}")
            params = {
                "stage": "analysis",
                "task": name,
                "dataset": variant,
                "model": acts.model_id,
                "model_revision": acts.model_revision,
                "dataset_sha256": acts.dataset_sha256,
                **config.numbers(),
            }
            metrics = {**result.summary, "wall_seconds": seconds}
            status = log_mlflow(
                context,
                mlflow,
                f"{variant}/{slug}/{name}",
                params=params,
                metrics=metrics,
                files=result.paths(),
                started=began,
                datasets=[TrackedDataset(variant, settings.datasets[variant], acts.dataset_sha256)],
            )
            meta = step_metadata(result, spec.main_table, partitioned=True)
            meta.update(
                model_id=acts.model_id, n_sentences=acts.n_sentences, wall_seconds=round(seconds, 3), mlflow=status
            )
            versions[slug] = _inputs_version(acts, config)
            context.log.info(
                f"{variant}/{name}[{slug}]: {len(result.paths())} files in {seconds:.1f}s; mlflow {status}"
            )
            context.add_asset_metadata(meta, partition_key=slug)
        return dg.MaterializeResult(data_version=step_data_version(versions))

    return _asset


def _plots_asset(settings: Settings, variant: str, spec: AnalysisSpec) -> dg.AssetsDefinition:
    parts = partitions_for(settings)

    @dg.asset(
        key=analysis_key(variant, "analysis_plots"),
        deps=[analysis_key(variant, "emotion_vectors"), analysis_key(variant, "linear_probes")],
        partitions_def=parts.models,
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name=f"{variant}_analysis",
        kinds={"matplotlib", "png", "mlflow"},
        code_version=CODE_VERSION,
        automation_condition=ANALYSIS_CONDITION,
        description=f"Per model ({variant}): separation and probe accuracy vs layer (with bag-of-words baseline, "
        "shuffled-label control and chance) and the centred emotion cosine heatmap at the best probe layer; "
        "PNGs under results/<variant>/analysis/<model>/, logged to MLflow, shown in the metadata.",
    )
    def analysis_plots(context: dg.AssetExecutionContext, mlflow: MlflowTracker) -> dg.MaterializeResult:
        for slug in context.partition_keys:
            started = time.time()
            try:
                result = model_plots_step(settings.results_dir, variant, slug)
            except FileNotFoundError as exc:
                raise dg.Failure(description=f"{variant}/analysis_plots[{slug}]: {exc}") from exc
            params = {"stage": "analysis", "task": "plots", "dataset": variant, "model": slug}
            status = log_mlflow(
                context,
                mlflow,
                f"{variant}/{slug}/analysis_plots",
                params=params,
                metrics=result.summary,
                files=list(result.files.values()),
                started=started,
                datasets=[TrackedDataset(variant, settings.datasets[variant])],
            )
            meta = step_metadata(result, None, partitioned=True)
            meta["layer_profile"] = image_markdown(result.files["layer_profile"], f"{slug}: layer profile")
            meta["cosine_heatmap"] = image_markdown(result.files["cosine_heatmap"], f"{slug}: cosines at best layer")
            meta["dagster/uri"] = result.files["layer_profile"].as_uri()
            meta["n_images"] = len(result.files)
            meta["mlflow"] = status
            context.add_asset_metadata(meta, partition_key=slug)
        return dg.MaterializeResult()

    return analysis_plots


def _cross_model_asset(settings: Settings, variant: str, spec: AnalysisSpec) -> dg.AssetsDefinition:
    config = settings.analysis

    all_parts = dg.AllPartitionMapping()
    # every model's emotion vectors and subspaces are read from those assets' files (checked against the
    # activations, recomputed when they do not fit)
    reused = [analysis_key(variant, name) for name in ("emotion_vectors", "emotion_subspaces")]

    @dg.asset(
        key=analysis_key(variant, "cross_model_alignment"),
        deps=[dg.AssetDep(key, partition_mapping=all_parts) for key in [activations_key(variant), *reused]],
        group_name=f"{variant}_analysis",
        kinds={"numpy", "parquet", "mlflow"},
        code_version=CODE_VERSION,
        automation_condition=ANALYSIS_CONDITION,
        description=f"Between every pair of models ({variant}, same sentences): linear CKA (plain and debiased) per "
        "layer pair, RSA of centred emotion cosine matrices, and subspace overlap vs random subspaces (models of "
        "equal width only); heatmap of the debiased CKA.",
    )
    def cross_model_alignment(context: dg.AssetExecutionContext, mlflow: MlflowTracker) -> dg.MaterializeResult:
        started, began = time.perf_counter(), time.time()
        try:
            models = {
                slug: ModelActivations.load(settings.results_dir, variant, slug, settings.emotions)
                for slug in settings.model_slugs
            }
            result = cross_model_alignment_step(
                models, settings.results_dir, variant, k=config.pca_components, seed=config.seed
            )
        except (AnalysisInputError, ActivationFileError, ValueError) as exc:
            raise dg.Failure(description=f"{variant}/cross_model_alignment: {exc}") from exc
        for note in result.notes:
            context.log.info(note)
        files = list(result.paths())
        params = {
            "stage": "analysis",
            "task": "cross_model_alignment",
            "dataset": variant,
            "models": list(settings.model_slugs),
            "pca_components": config.pca_components,
        }
        status = log_mlflow(
            context,
            mlflow,
            f"{variant}/cross_model_alignment",
            params=params,
            metrics=result.summary,
            files=files,
            started=began,
            datasets=[TrackedDataset(variant, settings.datasets[variant], next(iter(models.values())).dataset_sha256)],
        )
        meta = step_metadata(result, "cka", partitioned=False)
        if "cka_heatmap" in result.files:
            meta["cka_heatmap"] = image_markdown(result.files["cka_heatmap"], "debiased linear CKA")
        meta.update(wall_seconds=round(time.perf_counter() - started, 3), mlflow=status)
        version = fingerprint({slug: _inputs_version(acts, config) for slug, acts in models.items()})
        return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(version))

    return cross_model_alignment


def _stability_asset(settings: Settings) -> dg.AssetsDefinition:
    variants = list(settings.datasets)

    @dg.asset(
        key=STABILITY_KEY,
        deps=[
            dg.AssetDep(analysis_key(v, "emotion_vectors"), partition_mapping=dg.AllPartitionMapping())
            for v in variants
        ],
        group_name="analysis",
        kinds={"numpy", "parquet", "mlflow"},
        code_version=CODE_VERSION,
        automation_condition=ANALYSIS_CONDITION,
        description=f"Cosine between the centred emotion vectors of {' and '.join(variants)} per model, kind, layer and "
        "emotion: do the directions depend on the dataset? results/_cross_variant/vector_stability.parquet.",
    )
    def vector_stability(context: dg.AssetExecutionContext, mlflow: MlflowTracker) -> dg.MaterializeResult:
        started = time.time()
        try:
            result = vector_stability_step(settings.results_dir, variants, list(settings.model_slugs))
        except (FileNotFoundError, ValueError) as exc:
            raise dg.Failure(description=f"vector_stability: {exc}") from exc
        params = {
            "stage": "analysis",
            "task": "vector_stability",
            "datasets": variants,
            "models": list(settings.model_slugs),
        }
        status = log_mlflow(
            context,
            mlflow,
            "vector_stability",
            params=params,
            metrics=result.summary,
            files=result.paths(),
            started=started,
            datasets=[TrackedDataset(v, settings.datasets[v]) for v in variants],
        )
        meta = step_metadata(result, "vector_stability", partitioned=False)
        meta["mlflow"] = status
        return dg.MaterializeResult(metadata=meta)

    return vector_stability


def _report_asset(settings: Settings, variant: str, spec: AnalysisSpec) -> dg.AssetsDefinition:
    per_model, per_variant = analysis_keys(variant)
    all_parts = dg.AllPartitionMapping()
    deps = [dg.AssetDep(key, partition_mapping=all_parts) for key in per_model]
    deps += [dg.AssetDep(key) for key in per_variant if key != analysis_key(variant, spec.name)]
    with_stability = len(settings.datasets) >= 2
    if with_stability:
        deps.append(dg.AssetDep(STABILITY_KEY))

    @dg.asset(
        key=analysis_key(variant, "analysis_report"),
        deps=deps,
        group_name=f"{variant}_analysis",
        kinds={"markdown", "mlflow"},
        code_version=CODE_VERSION,
        automation_condition=ANALYSIS_CONDITION,
        description=f"results/{variant}/analysis/report.md: the key tables and figures of the {variant} analysis, "
        "rebuilt from the analysis assets' files.",
    )
    def analysis_report(context: dg.AssetExecutionContext, mlflow: MlflowTracker) -> dg.MaterializeResult:
        started = time.time()
        result = analysis_report_step(
            settings.results_dir,
            variant,
            list(settings.model_slugs),
            settings.datasets[variant],
            settings.emotions,
            include_stability=with_stability,
        )
        for note in result.notes:
            context.log.warning(f"{variant}/analysis_report: {note}")
        report = result.files["report"]
        params = {"stage": "analysis", "task": "report", "dataset": variant, "models": list(settings.model_slugs)}
        status = log_mlflow(
            context,
            mlflow,
            f"{variant}/analysis_report",
            params=params,
            metrics={k: v for k, v in result.summary.items() if k != "best_layers"},
            files=[report, *(p for k, p in result.files.items() if k.startswith("image: "))],
            started=started,
            datasets=[TrackedDataset(variant, settings.datasets[variant])],
        )
        text = report.read_text(encoding="utf-8")
        images = {k[len("image: ") :]: str(p) for k, p in result.files.items() if k.startswith("image: ")}
        meta = step_metadata(result, None, partitioned=False)
        meta.update(
            {
                "dagster/uri": report.as_uri(),
                "report": dg.MetadataValue.md(text),
                "images": dg.MetadataValue.json(images),
                "report_bytes": len(text.encode("utf-8")),
                "mlflow": status,
            }
        )
        return dg.MaterializeResult(metadata=meta)

    return analysis_report


# -- compute functions of the per-model assets that read the activations ---------------------------------
def _emotion_vectors(acts: ModelActivations, settings: Settings, config: AnalysisSettings) -> StepResult:
    return emotion_vectors_step(acts, settings.results_dir)


def _token_vectors(acts: ModelActivations, settings: Settings, config: AnalysisSettings) -> StepResult:
    tokens = token_strings(acts, lambda: corpus_texts(settings.datasets.values()))
    return token_vectors_step(acts, settings.results_dir, config.lexicon, tokens)


def _emotion_subspaces(acts: ModelActivations, settings: Settings, config: AnalysisSettings) -> StepResult:
    return emotion_subspaces_step(acts, settings.results_dir, config.pca_components, seed=config.seed)


def _linear_probes(acts: ModelActivations, settings: Settings, config: AnalysisSettings) -> StepResult:
    result = linear_probes_step(acts, settings.results_dir, cv_folds=config.cv_folds, seed=config.seed)
    table = pl.read_parquet(result.tables["probes"].path)
    best = table.filter(pl.col("kind") == result.summary["best_kind"])
    result.summary["probe_table"] = markdown_table(best, PROBE_COLUMNS)
    return result


# The analysis assets of a variant, in dependency order (a spec reads only the specs above it).
ANALYSES = (
    AnalysisSpec(
        "emotion_vectors",
        MODEL,
        _per_model_asset,
        compute=_emotion_vectors,
        main_table="emotion_vectors",
        kinds=frozenset({"numpy", "safetensors", "parquet"}),
        description="Emotion vectors ({variant}): per model, layer and kind, the mean sentence-end activation per "
        "emotion, differences vs neutral and vs the grand mean (raw and unit), norms, centred cosine matrix, "
        "separation score. emotion_vectors.safetensors + Parquet tables.",
    ),
    AnalysisSpec(
        "token_vectors",
        MODEL,
        _per_model_asset,
        compute=_token_vectors,
        main_table="token_vectors",
        needs_texts=True,
        kinds=frozenset({"numpy", "safetensors", "parquet"}),
        description="Token vectors ({variant}): first-token-free sentence means and emotion-word token vectors "
        "(lexicon from settings) per layer, with their cosine to the sentence-end vectors.",
    ),
    AnalysisSpec(
        "emotion_subspaces",
        MODEL,
        _per_model_asset,
        compute=_emotion_subspaces,
        main_table="subspaces",
        kinds=frozenset({"scikit-learn", "safetensors", "parquet"}),
        description="Emotion subspaces ({variant}): per emotion and layer, the top-{config.pca_components} PCA "
        "subspace of centred sentence-end activations; explained variance; principal angles and overlap between "
        "emotions vs random subspaces.",
    ),
    AnalysisSpec(
        "linear_probes",
        MODEL,
        _per_model_asset,
        compute=_linear_probes,
        main_table="probes",
        needs_texts=True,
        kinds=frozenset({"scikit-learn", "parquet"}),
        description="Probes ({variant}): per layer and kind, 4-way L2 logistic regression with stratified "
        "{config.cv_folds}-fold CV, bag-of-words baseline on the same folds, shuffled-label control, selectivity.",
    ),
    AnalysisSpec("analysis_plots", MODEL, _plots_asset),
    AnalysisSpec("cross_model_alignment", VARIANT, _cross_model_asset),
    AnalysisSpec("analysis_report", VARIANT, _report_asset),
)


def build_defs(settings: Settings) -> dg.Definitions:
    assets = [spec.build(settings, variant, spec) for variant in settings.datasets for spec in ANALYSES]
    if len(settings.datasets) >= 2:
        assets.append(_stability_asset(settings))
    return dg.Definitions(assets=assets)


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs(loaded_settings())
