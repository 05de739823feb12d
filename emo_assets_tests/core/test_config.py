"""`[analysis]` settings: typed, with defaults and conversions in one place, bad values named."""

import json
import os
import subprocess
import sys
import tomllib
from dataclasses import asdict
from pathlib import Path

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


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("EMO_ASSETS_MAX_AGE_HOURS", "soon", "EMO_ASSETS_MAX_AGE_HOURS='soon': not a number of hours (0 or more)"),
        ("EMO_ASSETS_MAX_AGE_HOURS", "-1", "EMO_ASSETS_MAX_AGE_HOURS='-1': not a number of hours (0 or more)"),
        ("EMO_ASSETS_REUSE", "maybe", "EMO_ASSETS_REUSE='maybe': not a boolean; use one of"),
        ("EMO_ASSETS_TRUST_REMOTE_CODE", "maybe", "EMO_ASSETS_TRUST_REMOTE_CODE='maybe': not a boolean; use one of"),
        ("EMO_ASSETS_DEVICE", "tpu", "extraction.device must be one of ('cpu', 'cuda', 'auto') or cuda:N, got 'tpu'"),
    ],
)
def test_an_invalid_environment_value_is_named(tmp_path, variable, value, message):
    with pytest.raises(ConfigError) as error:
        load_settings({"EMO_ASSETS_ROOT": str(tmp_path), variable: value})
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("EMO_ASSETS_MAX_AGE_HOURS", "0.5", "max_age_hours", 0.5),
        ("EMO_ASSETS_REUSE", "Off", "reuse", False),
        ("EMO_ASSETS_REUSE", "yes", "reuse", True),
        ("EMO_ASSETS_TRUST_REMOTE_CODE", "TRUE", "trust_remote_code", True),
        ("EMO_ASSETS_DEVICE", "cuda:1", "device", "cuda:1"),
    ],
)
def test_valid_environment_values_are_read(tmp_path, variable, value, field, expected):
    settings = load_settings({"EMO_ASSETS_ROOT": str(tmp_path), variable: value})
    assert getattr(settings if field == "max_age_hours" else settings.extraction, field) == expected


def test_the_validator_reports_a_bad_variable_in_one_line(tmp_path):
    """`python -m emo_assets.validate` keeps checking the file with the default emotions, and says why."""
    dataset = PACKAGED_CONFIG.parents[1] / "data" / "emotion_dataset.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "emo_assets.validate", str(dataset)],
        env={**os.environ, "EMO_ASSETS_MAX_AGE_HOURS": "soon"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "EMO_ASSETS_MAX_AGE_HOURS='soon': not a number of hours (0 or more)" in proc.stderr


def test_the_packaged_datasets_are_the_checkouts_files_from_any_root(tmp_path, monkeypatch):
    """They name the project's own files (and so the tiny models' corpus); results and a user's config follow
    the root."""
    checkout = PACKAGED_CONFIG.parents[1]
    raw = tomllib.loads(PACKAGED_CONFIG.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    for env in ({}, {"EMO_ASSETS_ROOT": str(tmp_path / "root")}):
        settings = load_settings(env)
        assert settings.datasets == {name: checkout / spec["path"] for name, spec in raw["datasets"].items()}
        assert settings.results_dir == Path(env.get("EMO_ASSETS_ROOT", tmp_path)) / raw["results_dir"]
    own = tmp_path / "my_config.toml"
    own.write_text(PACKAGED_CONFIG.read_text(encoding="utf-8"), encoding="utf-8")
    settings = load_settings({"EMO_ASSETS_CONFIG": str(own), "EMO_ASSETS_ROOT": str(tmp_path / "root")})
    assert settings.datasets == {name: tmp_path / "root" / spec["path"] for name, spec in raw["datasets"].items()}
