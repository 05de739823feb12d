"""`[analysis]` settings: typed, with defaults and conversions in one place, bad values named."""

import json
import tomllib
from dataclasses import asdict

import pytest

from emo_assets.core.config import PACKAGED_CONFIG, AnalysisSettings, ConfigError, load_settings


def test_analysis_settings_are_read_from_the_toml(tmp_path):
    raw = tomllib.loads(PACKAGED_CONFIG.read_text(encoding="utf-8"))["analysis"]
    settings = load_settings({"EMO_ASSETS_ROOT": str(tmp_path)}).analysis
    assert isinstance(settings, AnalysisSettings)
    assert (settings.pca_components, settings.cv_folds, settings.seed) == (
        raw["pca_components"],
        raw["cv_folds"],
        raw["seed"],
    )
    assert {emotion: list(stems) for emotion, stems in settings.lexicon.items()} == raw["lexicon"]
    # the analysis data versions hash these settings as JSON: the same text as the TOML's table
    assert json.dumps(asdict(settings), sort_keys=True) == json.dumps(raw, sort_keys=True)


def test_missing_keys_take_the_defaults_and_strings_are_converted():
    assert AnalysisSettings.from_toml({}) == AnalysisSettings(pca_components=8, cv_folds=5, seed=0, lexicon={})
    assert AnalysisSettings.from_toml({"cv_folds": "3", "lexicon": {"anger": ["mad"]}}).cv_folds == 3


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"cv_folds": "five"}, "[analysis] cv_folds must be an integer, got 'five'"),
        ({"cv_folds": 1}, "analysis.cv_folds must be >= 2, got 1"),
        ({"pca_components": 0}, "analysis.pca_components must be >= 1, got 0"),
        ({"pca_compnents": 8}, "[analysis]: unknown key(s) ['pca_compnents']"),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError) as error:
        AnalysisSettings.from_toml(raw)
    assert str(error.value) == message
