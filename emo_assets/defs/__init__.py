"""Dagster definitions of emo_assets, one module per stage, each with `build_defs(settings) -> dg.Definitions`.

Every module builds its assets from the settings (profile, dataset variants, emotions) with factories, so
adding a model or a variant is a configuration edit. `emo_assets.definitions` merges the modules listed in
`DEFS_MODULES`; a new stage is a new module here plus one entry in that list, and its assets join a stage
job in `jobs.py` (what `emo-assets materialize` runs). A new analysis asset is one entry of `analysis.ANALYSES`.
Shared pieces for new stages:
`partitions.partitions_for(settings)` (the partitions definitions, identical objects on every call) and
`activations.activation_path(settings, variant, slug, emotion)` / `activations.activations_key(variant)`.
"""
