"""Names that would leave the results directory are rejected before any file is touched.

Dataset variants, model slugs and emotions become folder and file names. Whether they come from the
environment (`EMO_ASSETS_EMOTIONS`, `EMO_ASSETS_DATASETS`, `EMO_ASSETS_MODELS`), a command line or code, `../`,
absolute paths and path separators must fail with `UnsafeNameError`, and the whole temp tree must be
unchanged afterwards. Model ids may legitimately *be* paths (local model folders): for them the guarantee is
that the slug, the only part that becomes a folder name, is one harmless path component.
"""

from __future__ import annotations

import random

import pytest

from emo_assets import cli
from emo_assets.core.config import ConfigError, load_settings
from emo_assets.core.paths import UnsafeNameError, activation_dir, activation_file, model_slug, safe_name, variant_dir
from emo_assets.extract import main as extract_main
from emo_assets_tests.reliability.helpers import tree

HOSTILE = [
    "../escape",
    "../../etc",
    "/tmp/abs",
    "a/b",
    "a\\b",
    "..",
    ".",
    "",
    ".hidden",
    "-rf",
    "x/../../y",
    "~",
    "~/x",
    "con\x00nul",
    "a\nb",
    "…/x",
    "ok/",
    " lead",
]
HOSTILE_MODELS = [
    "a/b/c",
    "..",
    ".",
    "./..",
    "x/..",
    "../..",
    "a\\..\\b",
    "org/..",
    "/",
    "~\x00x",
    "a\x00/b",
    "~no-such-user-here",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_safe_name_rejects(value):
    with pytest.raises(UnsafeNameError):
        safe_name(value, "emotion")


@pytest.mark.parametrize("model_id", HOSTILE_MODELS)
def test_model_slug_rejects(model_id):
    with pytest.raises(UnsafeNameError):
        model_slug(model_id)


def test_path_helpers_never_leave_the_results_dir(tmp_path):
    """Fuzz: every name the helpers accept stays one component below its parent; nothing is created."""
    results = tmp_path / "results"
    rng = random.Random(0)
    alphabet = "ab./\\~-_ \x00é"
    accepted = 0
    for _ in range(4000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        for build in (
            lambda n: activation_dir(results, n, "m"),
            lambda n: activation_dir(results, "v", n),
            lambda n: activation_file(results / "out", n),
            lambda n: variant_dir(results, n, "datasets"),
            lambda n: activation_dir(results, "v", model_slug(n)),
        ):
            try:
                path = build(name)
            except UnsafeNameError:
                continue
            accepted += 1
            resolved = path.resolve()
            assert resolved.is_relative_to(results.resolve()), (name, path)
            assert len(resolved.relative_to(results.resolve()).parts) == len(path.relative_to(results).parts)
    assert accepted > 100  # the fuzzing reached the accepting branch too
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "model_id", ["../../outside-model", "/abs/path/to/my-model", "~/models/mine", "gpt2", "EleutherAI/pythia-160m"]
)
def test_model_ids_that_are_paths_get_a_single_component_slug(tmp_path, model_id):
    slug = model_slug(model_id)
    folder = activation_dir(tmp_path / "results", "baseline", slug)
    assert folder.parent == tmp_path / "results" / "baseline" / "activations"
    assert folder.resolve().parent == folder.parent.resolve()


def _base_env(tmp_path, datasets) -> dict[str, str]:
    return {
        "EMO_ASSETS_ROOT": str(tmp_path),
        "EMO_ASSETS_RESULTS_DIR": str(tmp_path / "results"),
        "EMO_ASSETS_DATASETS": ",".join(f"{k}={v}" for k, v in datasets.items()),
        "EMO_ASSETS_PROFILE": "offline",
        "EMO_ASSETS_MLFLOW_URI": "http://127.0.0.1:9",
    }


OVERRIDES = [
    ("EMO_ASSETS_EMOTIONS", "anger,../../escape"),
    ("EMO_ASSETS_EMOTIONS", "anger,/tmp/abs"),
    ("EMO_ASSETS_EMOTIONS", "gratitude,sub/dir"),
    ("EMO_ASSETS_DATASETS", "../evil={baseline}"),
    ("EMO_ASSETS_DATASETS", "/abs={baseline}"),
    ("EMO_ASSETS_DATASETS", "a/b={baseline}"),
    ("EMO_ASSETS_MODELS", "tiny-gpt2,org/../.."),
    ("EMO_ASSETS_MODELS", "a/b/c"),
    ("EMO_ASSETS_MODELS", ".."),
]


@pytest.mark.parametrize(("variable", "value"), OVERRIDES)
def test_environment_overrides_are_rejected_by_the_settings(tmp_path, small_datasets, variable, value):
    env = {**_base_env(tmp_path, small_datasets), variable: value.format(**small_datasets)}
    before = tree(tmp_path)
    with pytest.raises((UnsafeNameError, ConfigError)):
        load_settings(env)
    assert tree(tmp_path) == before


def _sandbox(tmp_path, monkeypatch, small_datasets, variable, value):
    """Set the environment of one hostile run; return the folder to snapshot (the whole tmp tree)."""
    for key, item in _base_env(tmp_path, small_datasets).items():
        monkeypatch.setenv(key, item)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv(variable, value.format(**small_datasets))
    monkeypatch.chdir(tmp_path)
    return tmp_path.parent  # the escapes aim at ../ of the root: watch its parent too


@pytest.mark.parametrize(("variable", "value"), OVERRIDES)
def test_emo_assets_materialize_rejects_them_before_touching_anything(
    tmp_path, monkeypatch, small_datasets, capsys, variable, value
):
    watched = _sandbox(tmp_path, monkeypatch, small_datasets, variable, value)
    before = tree(watched)
    assert cli.main(["materialize"]) == 2
    assert "error: invalid " in capsys.readouterr().err
    assert tree(watched) == before


def _extract(small_datasets, tmp_path, *extra: str) -> int:
    """The extract CLI on tiny-gpt2 and the baseline dataset, into `tmp_path/out`."""
    dataset, out = str(small_datasets["baseline"]), str(tmp_path / "out")
    return extract_main(["--model", "tiny-gpt2", "--dataset", dataset, "--output", out, *extra, "--no-progress"])


@pytest.mark.parametrize(("variable", "value"), [o for o in OVERRIDES if o[0] != "EMO_ASSETS_MODELS"])
def test_extract_cli_rejects_them_before_touching_anything(
    tmp_path, monkeypatch, small_datasets, capsys, variable, value
):
    watched = _sandbox(tmp_path, monkeypatch, small_datasets, variable, value)
    before = tree(watched)
    code = _extract(small_datasets, tmp_path)
    assert code == 2
    assert "error: invalid " in capsys.readouterr().err
    assert tree(watched) == before


@pytest.mark.parametrize("emotion", ["../../escape", "/tmp/abs", "a/b", ".."])
def test_extract_cli_rejects_a_hostile_emotion_argument(tmp_path, monkeypatch, small_datasets, capsys, emotion):
    watched = _sandbox(tmp_path, monkeypatch, small_datasets, "EMO_ASSETS_PROFILE", "offline")
    before = tree(watched)
    code = _extract(small_datasets, tmp_path, "--emotion", emotion)
    assert code == 2 and "invalid emotion" in capsys.readouterr().err
    assert tree(watched) == before


@pytest.mark.parametrize("variant", ["../escape", "/abs"])
def test_materialize_rejects_a_hostile_variant_argument(tmp_path, monkeypatch, small_datasets, capsys, variant):
    watched = _sandbox(tmp_path, monkeypatch, small_datasets, "EMO_ASSETS_PROFILE", "offline")
    before = tree(watched)
    assert cli.main(["materialize", "--variant", variant]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert tree(watched) == before
