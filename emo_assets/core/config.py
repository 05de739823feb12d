"""The project's configuration: one TOML file plus environment overrides.

The packaged `emo_assets/config.toml` names the emotions, dataset variants, model profiles and run settings.
`EMO_ASSETS_CONFIG` points at another TOML file instead. Single values are overridden by environment
variables (listed in `ENV_OVERRIDES`), so a Dagster deployment, CI or a test can change them without editing
files. Adding a model or a dataset variant is an edit of the TOML, not of code.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from emo_assets.core.dtypes import DTYPES
from emo_assets.core.paths import model_slug, safe_name
from emo_assets.core.selection import SelectionError, parse_layers, parse_positions

PACKAGED_CONFIG = Path(__file__).resolve().parents[1] / "config.toml"
# The checkout the package runs from (an editable install, as `make setup` makes); None for an installed wheel.
SOURCE_TREE = PACKAGED_CONFIG.parents[1] if (PACKAGED_CONFIG.parents[1] / "pyproject.toml").is_file() else None

# environment variable -> what it overrides
ENV_OVERRIDES = {
    "EMO_ASSETS_CONFIG": "path of the TOML file to read instead of the packaged one",
    "EMO_ASSETS_ROOT": "project root that relative paths are resolved against (default: cwd; the packaged "
    "config's dataset files are read from the checkout the package runs from)",
    "EMO_ASSETS_PROFILE": "model profile (paper | offline | any profile in the TOML)",
    "EMO_ASSETS_MODELS": "comma-separated model list, replaces the profile's models",
    "EMO_ASSETS_DATASETS": "comma-separated variant=path pairs, replaces the dataset variants",
    "EMO_ASSETS_EMOTIONS": "comma-separated emotion list",
    "EMO_ASSETS_RESULTS_DIR": "results directory",
    "EMO_ASSETS_BATCH_SIZE": "extraction batch size",
    "EMO_ASSETS_DEVICE": "cpu | cuda | auto",
    "EMO_ASSETS_COMPUTE_DTYPE": "float32 | bfloat16 | float16",
    "EMO_ASSETS_STORAGE_DTYPE": "float32 | bfloat16 | float16",
    "EMO_ASSETS_MLFLOW_URI": "MLflow tracking URI (MLFLOW_TRACKING_URI is honoured too)",
    "EMO_ASSETS_MAX_AGE_HOURS": "freshness limit of activation files",
    "EMO_ASSETS_TRUST_REMOTE_CODE": "1 to let transformers run model code from the hub (off by default)",
    "EMO_ASSETS_REUSE": "0 to forward every sentence instead of reusing rows of identical earlier extractions",
    "EMO_ASSETS_POSITIONS": "token rows stored per sentence: all | sentence_end | mean | last:N",
    "EMO_ASSETS_LAYERS": "layers stored: all, or indices and ranges such as 0,6,11 or 6-11 or -1",
}

DEVICES = ("cpu", "cuda", "auto")
_CUDA_INDEX = re.compile(r"cuda:[0-9]+")
# The words a boolean variable accepts; anything else is an error rather than a silent "false".
BOOLEAN_WORDS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}
# Where runs execute (`EMO_ASSETS_DEPLOYMENT`; deploy/<name>/ holds each one's configuration).
DEPLOYMENTS = ("local", "cluster", "kubernetes")


class ConfigError(ValueError):
    """The configuration file or an override is invalid."""


@dataclass(frozen=True)
class ExtractionSettings:
    batch_size: int = 32
    device: str = "auto"
    compute_dtype: str = "float32"
    storage_dtype: str = "float32"
    prepend_bos: bool = False
    attention: bool = False
    trust_remote_code: bool = False
    reuse: bool = True  # copy rows already extracted with identical inputs (see core.activations.reuse)
    positions: str = "all"  # see core.selection
    layers: str = "all"
    shard_max_bytes: int = 2**30  # a partition over this is written as shards plus a manifest (0: no bound)
    shard_sentences: int = 0  # ... or over this many sentences (0: no bound)

    def __post_init__(self) -> None:
        try:  # stored in their canonical spelling (TOML may give the layers as a list of integers)
            object.__setattr__(self, "positions", parse_positions(self.positions))
            object.__setattr__(self, "layers", parse_layers(self.layers))
        except SelectionError as exc:
            raise ConfigError(f"extraction.{exc}") from exc
        if self.batch_size < 1:
            raise ConfigError(f"extraction.batch_size must be >= 1, got {self.batch_size}")
        for name in ("shard_max_bytes", "shard_sentences"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(
                    f"extraction.{name} must be an integer >= 0 (0: no bound), got {getattr(self, name)!r}"
                )
        check_device(self.device, "extraction.device")
        for name in ("compute_dtype", "storage_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"extraction.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class AnalysisSettings:
    """`[analysis]`: PCA subspace size, probe folds, the random seed, and the emotion-word stems per emotion."""

    pca_components: int = 8
    cv_folds: int = 5
    seed: int = 0
    lexicon: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_toml(cls, raw: Mapping) -> AnalysisSettings:
        """From the `[analysis]` table; raises `ConfigError` naming the bad key."""
        values = dict(raw)
        unknown = sorted(set(values) - {"pca_components", "cv_folds", "seed", "lexicon"})
        if unknown:
            raise ConfigError(f"[analysis]: unknown key(s) {unknown}")
        numbers = {}
        for name in ("pca_components", "cv_folds", "seed"):
            if name in values:
                try:
                    numbers[name] = int(values[name])
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"[analysis] {name} must be an integer, got {values[name]!r}") from exc
        stems_by_emotion = dict(values.get("lexicon", {}))
        lexicon = {str(emotion): tuple(str(stem) for stem in stems) for emotion, stems in stems_by_emotion.items()}
        return cls(**numbers, lexicon=lexicon)

    def __post_init__(self) -> None:
        if self.pca_components < 1:
            raise ConfigError(f"analysis.pca_components must be >= 1, got {self.pca_components}")
        if self.cv_folds < 2:
            raise ConfigError(f"analysis.cv_folds must be >= 2, got {self.cv_folds}")

    def numbers(self) -> dict[str, int]:
        """The numeric settings (MLflow parameters)."""
        return {"pca_components": self.pca_components, "cv_folds": self.cv_folds, "seed": self.seed}


@dataclass(frozen=True)
class Settings:
    root: Path
    profile: str
    models: tuple[str, ...]
    emotions: tuple[str, ...]
    datasets: Mapping[str, Path]
    results_dir: Path
    extraction: ExtractionSettings
    mlflow_tracking_uri: str
    mlflow_experiment: str
    max_age_hours: float
    freshness_cron: str
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)

    @property
    def model_slugs(self) -> dict[str, str]:
        """slug -> model id for the active profile (slugs are the Dagster partition keys)."""
        return {model_slug(m): m for m in self.models}


def check_device(device: str, what: str) -> str:
    """`device` if it is one of `DEVICES` or `cuda:N`; else `ConfigError` naming `what` (a key or a flag)."""
    if device not in DEVICES and not _CUDA_INDEX.fullmatch(device):
        raise ConfigError(f"{what} must be one of {DEVICES} or cuda:N, got {device!r}")
    return device


def _boolean(value: str) -> bool:
    try:
        return BOOLEAN_WORDS[value.strip().lower()]
    except KeyError:
        raise ValueError(f"not a boolean; use one of {sorted(BOOLEAN_WORDS)}") from None


def _hours(value: str) -> float:
    """A number of hours, 0 or more (0: every file counts as too old)."""
    try:
        hours = float(value)
    except ValueError:
        hours = math.nan
    if not math.isfinite(hours) or hours < 0:
        raise ValueError("not a number of hours (0 or more)")
    return hours


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _parsed(env: Mapping[str, str], var: str, parse: Callable[[str], object]) -> object:
    """`parse(env[var])`, or `ConfigError` naming the variable and its value."""
    try:
        return parse(env[var])
    except ValueError as exc:
        raise ConfigError(f"{var}={env[var]!r}: {exc}") from exc


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML and apply environment overrides. Raises `ConfigError` naming the bad key."""
    env = os.environ if env is None else env
    config_path = Path(env.get("EMO_ASSETS_CONFIG") or PACKAGED_CONFIG)
    try:
        raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{config_path}: cannot read configuration: {exc}") from exc

    root = Path(env.get("EMO_ASSETS_ROOT") or os.getcwd()).resolve()

    def resolve(path: str | Path, base: Path = root) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() else base / path

    profile = env.get("EMO_ASSETS_PROFILE") or raw.get("profile", "offline")
    profiles = raw.get("profiles", {})
    if "EMO_ASSETS_MODELS" in env:
        models = _split(env["EMO_ASSETS_MODELS"])
    elif profile in profiles:
        models = list(profiles[profile])
    else:
        raise ConfigError(f"{config_path}: unknown profile {profile!r}; known: {sorted(profiles)}")

    if "EMO_ASSETS_DATASETS" in env:
        pairs = [item.split("=", 1) for item in _split(env["EMO_ASSETS_DATASETS"])]
        if any(len(pair) != 2 for pair in pairs):
            raise ConfigError("EMO_ASSETS_DATASETS must be comma-separated variant=path pairs")
        datasets = {name: resolve(path) for name, path in pairs}
    else:
        # The packaged config names the project's own dataset files: from a checkout they are read there wherever the
        # command runs, so a variant, and an offline tiny model trained on the variants' texts, is the same from any
        # folder and any EMO_ASSETS_ROOT. Results, and the paths of a config of the user's, follow the root.
        base = SOURCE_TREE if config_path == PACKAGED_CONFIG and SOURCE_TREE is not None else root
        datasets = {name: resolve(spec["path"], base) for name, spec in raw.get("datasets", {}).items()}

    emotions = _split(env["EMO_ASSETS_EMOTIONS"]) if "EMO_ASSETS_EMOTIONS" in env else raw.get("emotions", [])
    for emotion in emotions:
        safe_name(emotion, "emotion")
    for variant in datasets:
        safe_name(variant, "dataset variant")
    slugs = [model_slug(m) for m in models]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"two models of profile {profile!r} share a slug: {slugs}")
    if not emotions or not datasets or not models:
        raise ConfigError(f"{config_path}: emotions, datasets and models must all be non-empty")

    ext = dict(raw.get("extraction", {}))
    overrides = {
        "batch_size": ("EMO_ASSETS_BATCH_SIZE", int),
        "device": ("EMO_ASSETS_DEVICE", str),
        "compute_dtype": ("EMO_ASSETS_COMPUTE_DTYPE", str),
        "storage_dtype": ("EMO_ASSETS_STORAGE_DTYPE", str),
        "trust_remote_code": ("EMO_ASSETS_TRUST_REMOTE_CODE", _boolean),
        "reuse": ("EMO_ASSETS_REUSE", _boolean),
        "positions": ("EMO_ASSETS_POSITIONS", parse_positions),
        "layers": ("EMO_ASSETS_LAYERS", parse_layers),
    }
    for key, (var, parse) in overrides.items():
        if env.get(var):  # set and not empty: an empty variable keeps the TOML's value
            ext[key] = _parsed(env, var, parse)
    try:
        extraction = ExtractionSettings(**ext)
    except TypeError as exc:
        raise ConfigError(f"{config_path}: [extraction]: {exc}") from exc

    results_dir = resolve(env.get("EMO_ASSETS_RESULTS_DIR") or raw.get("results_dir", "results"))
    mlflow_cfg = raw.get("mlflow", {})
    tracking_uri = (
        env.get("EMO_ASSETS_MLFLOW_URI")
        or env.get("MLFLOW_TRACKING_URI")
        or mlflow_cfg.get("tracking_uri")
        or f"sqlite:///{results_dir / 'mlflow.db'}"
    )
    freshness = raw.get("freshness", {})
    return Settings(
        root=root,
        profile=profile,
        models=tuple(models),
        emotions=tuple(emotions),
        datasets=datasets,
        results_dir=results_dir,
        extraction=extraction,
        mlflow_tracking_uri=tracking_uri,
        mlflow_experiment=mlflow_cfg.get("experiment", "emo_assets"),
        max_age_hours=_parsed(env, "EMO_ASSETS_MAX_AGE_HOURS", _hours)
        if env.get("EMO_ASSETS_MAX_AGE_HOURS")
        else float(freshness.get("max_age_hours", 168)),
        freshness_cron=freshness.get("schedule_cron", "0 6 * * *"),
        analysis=AnalysisSettings.from_toml(raw.get("analysis", {})),
    )
