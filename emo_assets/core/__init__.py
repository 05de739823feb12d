"""Plain-Python core of emo_assets: datasets, models, extraction, storage and analysis. No Dagster here."""
