"""The Markdown report of one dataset variant, regenerated from the analysis outputs on disk.

`analysis_report_step` reads only files the other steps wrote (Parquet tables and PNGs under
`results/<variant>/analysis/`, plus the cross-variant stability table when there is one), so the report is a
pure function of the assets' outputs: rerunning it never recomputes anything. Images are linked relative to
the report's folder; a missing file is listed in the notes instead of producing a dead link.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from emo_assets.core.analysis.comparisons import stability_path
from emo_assets.core.analysis.inputs import (
    analysis_root,
    cross_model_dir,
    model_analysis_dir,
    read_parquet_if_exists,
    report_path,
)
from emo_assets.core.analysis.model_analysis import PRIMARY_KIND, StepResult, best_probe_layer
from emo_assets.core.analysis.report import render_report
from emo_assets.core.atomic import write_bytes_atomic
from emo_assets.core.datasets import read_dataset

OVERVIEW = (
    "Analysis of sentence-end (last real token) activations. Emotion vectors are per-emotion means; "
    "cosines are taken after subtracting the grand mean (raw cosines are ~1 because of anisotropy). Probes are read "
    "against the bag-of-words baseline and a shuffled-label control (selectivity = accuracy − control). Cross-model "
    "comparisons use linear CKA (plain and debiased), RSA of emotion cosine matrices and subspace overlap against a "
    "random-subspace baseline."
)


def _model_facts(results_dir: Path, variant: str, slug: str) -> str:
    from safetensors import safe_open

    path = model_analysis_dir(results_dir, variant, slug) / "emotion_vectors.safetensors"
    if not path.is_file():
        return f"{slug}: no emotion vectors"
    with safe_open(str(path), framework="numpy") as handle:
        meta = handle.metadata()
    stored = json.loads(meta.get("layers", "null"))
    subset = f" (stored: {stored})" if stored is not None and len(stored) != int(meta.get("n_layers", -1)) else ""
    return (
        f"`{slug}` ({meta.get('model_id')}): {meta.get('n_layers')} layers{subset}, d={meta.get('d_model')}, "
        f"{meta.get('n_sentences')} sentences, revision {meta.get('model_revision', '')[:12]}"
    )


def _at_best_layer(table: pl.DataFrame | None, best: dict[str, int], kind: str = PRIMARY_KIND) -> pl.DataFrame | None:
    if table is None:
        return None
    parts = [
        table.filter((pl.col("model") == m) & (pl.col("kind") == kind) & (pl.col("layer") == layer))
        for m, layer in best.items()
    ]
    parts = [p for p in parts if p.height]
    return pl.concat(parts, how="diagonal_relaxed") if parts else None


def analysis_report_step(
    results_dir: Path,
    variant: str,
    slugs: Sequence[str],
    dataset_path: Path | None = None,
    emotions: Sequence[str] | None = None,
    *,
    include_stability: bool = True,
) -> StepResult:
    """Write `results/<variant>/analysis/report.md` from the variant's analysis outputs (see module doc)."""
    results_dir = Path(results_dir)
    root = analysis_root(results_dir, variant)
    target = report_path(results_dir, variant)
    result = StepResult()
    notes: list[str] = []  # problems: logged as warnings by the asset, and listed in the report
    facts: list[str] = []  # method caveats and checks that passed: listed in the report only

    def gather(name: str) -> pl.DataFrame | None:
        return read_parquet_if_exists(model_analysis_dir(results_dir, variant, s) / name for s in slugs)

    probes, separation = gather("probes.parquet"), gather("separation.parquet")
    tokens, subspaces = gather("token_vectors.parquet"), gather("subspaces.parquet")
    present = [s for s in slugs if (model_analysis_dir(results_dir, variant, s) / "probes.parquet").is_file()]
    missing = [s for s in slugs if s not in present]
    if missing:
        notes.append(f"no probe results yet for: {', '.join(missing)}")
    best = {s: best_probe_layer(probes.filter(pl.col("model") == s)) for s in present} if probes is not None else {}

    dataset: dict[str, object] = {"variant": variant}
    if dataset_path is not None and Path(dataset_path).is_file():
        data = read_dataset(dataset_path, emotions) if emotions else read_dataset(dataset_path)
        dataset.update(path=str(dataset_path), sha256=data.sha256, sentences=len(data.samples))
        for emotion in data.emotions():
            dataset[f"sentences ({emotion})"] = len(data.by_emotion(emotion))

    extra: dict[str, pl.DataFrame] = {}
    word_rows = _at_best_layer(tokens, best)
    if word_rows is not None:
        extra["Token vectors vs sentence-end vectors (resid_post, best probe layer)"] = word_rows.select(
            "model", "layer", "emotion", "source", "n_tokens", "n_sentences", "cosine_centred", "cosine_raw"
        )
    sub_rows = _at_best_layer(subspaces, best)
    if sub_rows is not None:
        extra["Emotion subspaces (resid_post, best probe layer)"] = sub_rows.select(
            "model",
            "layer",
            "emotion",
            "k",
            "explained_variance_total",
            "explained_variance_pc1",
            "mean_overlap_other_emotions",
            "random_overlap_mean",
            "random_overlap_analytical",
        )
    lexicon = gather("lexicon_tokens.parquet")
    if lexicon is not None:
        extra["Lexicon tokens matched (emotion-word vectors)"] = lexicon.group_by(
            "model", "emotion", maintain_order=True
        ).agg(
            pl.col("count").sum().alias("n_tokens"),
            pl.col("token").sort_by("count", descending=True).head(8).str.join(", ").alias("most frequent"),
        )
    if lexicon is not None:
        facts.append(
            "emotion-word vectors skip each sentence's first token (attention sink), so sentences that open with "
            'the emotion word ("Thank you ...") add no token; stems split by the tokenizer are not matched'
        )
    for s in present:
        meta_path = model_analysis_dir(results_dir, variant, s) / "token_vectors.safetensors"
        if meta_path.is_file():
            from safetensors import safe_open

            with safe_open(str(meta_path), framework="numpy") as handle:
                status = str(handle.metadata().get("token_status"))
            (facts if status.startswith("verified") else notes).append(f"{s}: token strings {status}")

    cross = cross_model_dir(results_dir, variant)
    cka, rsa_t, overlap = (
        pl.read_parquet(cross / name) if (cross / name).is_file() else None
        for name in ("cka.parquet", "rsa.parquet", "subspace_overlap.parquet")
    )
    if cka is not None and rsa_t is not None:
        keys = ["model_a", "model_b", "kind", "layer_a", "layer_b"]
        matched = (
            cka.filter(pl.col("matched_depth") & (pl.col("kind") == PRIMARY_KIND))
            .filter(pl.col("model_a") != pl.col("model_b"))
            .join(rsa_t.select(*keys, "rsa_pearson", "rsa_spearman"), on=keys, how="left")
            .select(*keys, "cka", "cka_debiased", "rsa_pearson", "rsa_spearman")
        )
        if matched.height:
            extra["Cross-model CKA and RSA at matched relative depth (resid_post)"] = matched
        elif len(present) < 2:
            notes.append(
                "cross-model comparison needs at least two models; only self-CKA (layer by layer) was computed"
            )
    if overlap is not None and overlap.height:
        extra["Cross-model subspace overlap (mean over emotions) vs random subspaces"] = (
            overlap.group_by("model_a", "model_b", "kind", "layer_a", "layer_b", maintain_order=True)
            .agg(
                pl.col("k").first(),
                pl.col("overlap").mean(),
                pl.col("mean_angle_deg").mean(),
                pl.col("random_overlap_mean").first(),
                pl.col("random_overlap_analytical").first(),
            )
            .filter(pl.col("kind") == PRIMARY_KIND)
        )

    stability = None
    if include_stability and stability_path(results_dir).is_file():
        table = pl.read_parquet(stability_path(results_dir))
        table = table.filter((pl.col("variant_a") == variant) | (pl.col("variant_b") == variant))
        if table.height:
            stability = table.group_by("model", "kind", "variant_a", "variant_b", maintain_order=True).agg(
                pl.col("cosine_centred").mean().alias("mean cosine (centred)"),
                pl.col("cosine_centred").min().alias("min cosine (centred)"),
                pl.col("cosine_diff_vs_reference").mean().alias("mean cosine (vs neutral)"),
            )

    images: dict[str, Path] = {}
    for s in present:
        folder = model_analysis_dir(results_dir, variant, s)
        for name, caption in (
            ("layer_profile.png", "separation and probe accuracy vs layer"),
            ("cosine_heatmap.png", f"centred emotion cosines at layer {best.get(s)}"),
        ):
            if (folder / name).is_file():
                images[f"{s}: {caption}"] = folder / name
            else:
                notes.append(f"missing figure {folder / name}")
    if (cross / "cka_heatmap.png").is_file():
        images["debiased linear CKA across models (resid_post)"] = cross / "cka_heatmap.png"

    text = render_report(
        title=f"Emotion representations: {variant} dataset",
        dataset=dataset,
        models=[_model_facts(results_dir, variant, s) for s in slugs],
        probe_table=probes,
        separation_table=separation,
        stability_table=stability,
        extra_tables=extra,
        images=images,
        base_dir=root,
        overview=OVERVIEW,
        notes=facts + notes,
    )
    write_bytes_atomic(target, text.encode("utf-8"))
    result.files["report"] = target
    for caption, path in images.items():
        result.files[f"image: {caption}"] = Path(path)
    result.summary.update(
        n_models=len(present), n_images=len(images), n_tables=len(extra) + 2, best_layers=json.dumps(best)
    )
    result.notes = notes
    return result
