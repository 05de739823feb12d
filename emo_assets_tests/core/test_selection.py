"""Capture selection: each `positions` / `layers` choice stores exactly the rows an independent forward gives.

The reference is `reference_activations` of test_extraction (each sentence alone, plain HF forward, its own
hooks), for a decoder (tiny-gpt2) and an encoder (minilm); tolerance 1e-5 as there. The mean is taken here with
numpy over the reference's token rows. Also: with the same batches, a selection's rows are bit-identical to the
matching rows of the default (`all`) file, rows are never reused across selections, and bad spellings are refused
naming the value.
"""

from __future__ import annotations

import numpy as np
import pytest

from emo_assets.core.activations import ActivationFile
from emo_assets.core.config import PACKAGED_CONFIG, ConfigError, ExtractionSettings, load_settings
from emo_assets.core.extraction import ExtractionError, ExtractionOptions, extract_to_file
from emo_assets.core.selection import SelectionError, parse_layers, parse_positions, resolve_layers
from emo_assets.extract import main
from emo_assets_tests.conftest import read_records
from emo_assets_tests.core.test_extraction import IDS, TEXTS, reference_activations

SELECTIONS = [
    ("all", "all"),
    ("sentence_end", "all"),
    ("mean", "0,-1"),
    ("last:3", "1-2"),
    ("sentence_end", "-2"),
    ("all", "1,-1"),
]


def expected_rows(reference: np.ndarray, positions: str) -> np.ndarray:
    """The rows `positions` keeps of one sentence's token rows [n_tokens, d] (computed here, independently)."""
    if positions == "all":
        return reference
    if positions == "sentence_end":
        return reference[-1:]
    if positions == "mean":
        return reference.mean(axis=0, keepdims=True)
    return reference[-int(positions.split(":")[1]) :]


@pytest.fixture(scope="module")
def references(offline_models):
    return {
        name: [reference_activations(offline_models[name], text) for text in TEXTS] for name in ("tiny-gpt2", "minilm")
    }


@pytest.mark.parametrize("name", ["tiny-gpt2", "minilm"])
@pytest.mark.parametrize(("positions", "layers"), SELECTIONS)
def test_selection_equals_independent_forward(name, positions, layers, offline_models, references, tmp_path):
    loaded = offline_models[name]
    options = ExtractionOptions(batch_size=4, positions=positions, layers=layers)
    result = extract_to_file(loaded, TEXTS, IDS, tmp_path / "sel.safetensors", options)
    stored = ActivationFile(result.path)
    wanted = resolve_layers(layers, loaded.n_layers)
    assert stored.layers == wanted == result.layers and stored.positions == positions == result.positions
    assert stored.n_layers == loaded.n_layers and stored.header.format_version == 2
    assert stored.sentence_ids == IDS and stored.n_sentences == len(TEXTS)
    lengths = [len(loaded.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    np.testing.assert_array_equal(np.diff(stored.token_offsets), lengths)  # the tokens are kept whatever is stored
    for kind in ("resid_post", "mlp_out"):
        for layer in wanted:
            ends = stored.sentence_end(kind, layer)
            for index in range(len(TEXTS)):
                expected = expected_rows(references[name][index][kind][layer], positions)
                got = stored.sentence(kind, layer, index)
                np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5, err_msg=f"{kind} {layer} {index}")
                np.testing.assert_array_equal(ends[index], got[-1])  # the representative row is the last one
    missing = next((layer for layer in range(loaded.n_layers) if layer not in wanted), None)
    if missing is not None:
        with pytest.raises(KeyError, match=f"layer {missing} is not stored"):
            stored.sentence_end("resid_post", missing)


@pytest.mark.parametrize("positions", ["sentence_end", "last:2"])
def test_selected_rows_are_the_default_files_rows_bit_for_bit(positions, offline_models, tmp_path):
    """Same batches, same forward: a selection stores exactly the matching rows of the default file."""
    loaded = offline_models["tiny-gpt2"]
    full = ActivationFile(
        extract_to_file(loaded, TEXTS, IDS, tmp_path / "all.safetensors", ExtractionOptions(batch_size=4)).path
    )
    assert (full.positions, full.layers) == ("all", tuple(range(loaded.n_layers)))
    assert "token_offsets" not in full.metadata and full.n_rows == full.n_tokens  # the default layout is unchanged
    options = ExtractionOptions(batch_size=4, positions=positions, layers="1,3")
    part = ActivationFile(extract_to_file(loaded, TEXTS, IDS, tmp_path / "part.safetensors", options).path)
    keep = 1 if positions == "sentence_end" else 2
    for layer in (1, 3):
        for index in range(len(TEXTS)):
            np.testing.assert_array_equal(
                part.sentence("mlp_out", layer, index), full.sentence("mlp_out", layer, index)[-keep:]
            )


def test_rows_are_never_reused_across_selections(offline_models, tmp_path):
    loaded = offline_models["tiny-gpt2"]
    first = extract_to_file(loaded, TEXTS, IDS, tmp_path / "a.safetensors", ExtractionOptions(positions="sentence_end"))
    for positions, layers in [("all", "all"), ("mean", "all"), ("sentence_end", "0-2")]:
        options = ExtractionOptions(positions=positions, layers=layers)
        again = extract_to_file(
            loaded, TEXTS, IDS, tmp_path / f"{positions}.safetensors", options, reuse_from=[first.path]
        )
        assert (again.reuse.computed, again.reuse.reused) == (len(TEXTS), 0), (positions, layers)
    same = extract_to_file(
        loaded,
        TEXTS,
        IDS,
        tmp_path / "same.safetensors",
        ExtractionOptions(positions="sentence_end"),
        reuse_from=[first.path],
    )
    assert (same.reuse.computed, same.reuse.reused) == (0, len(TEXTS))
    np.testing.assert_array_equal(
        ActivationFile(same.path).raw("resid_post"), ActivationFile(first.path).raw("resid_post")
    )


@pytest.mark.parametrize("value", ["first", "last:0", "last:x", "sentence-end", ""])
def test_bad_positions_are_refused(value):
    with pytest.raises(SelectionError, match="positions"):
        parse_positions(value)


@pytest.mark.parametrize("value", ["", "a", "1,,2", "1-", "1.5"])
def test_bad_layer_spellings_are_refused(value):
    with pytest.raises(SelectionError, match="layers"):
        parse_layers(value)


def test_layer_specs_resolve_against_the_model():
    assert resolve_layers("all", 4) == (0, 1, 2, 3)
    assert resolve_layers("3,0,0", 4) == (0, 3)
    assert resolve_layers("1-2,-1", 4) == (1, 2, 3)
    assert resolve_layers("-2--1", 4) == (2, 3)
    assert parse_layers([0, 6, 11]) == "0,6,11"
    with pytest.raises(SelectionError, match="layer 4 is out of range for a model of 4 layers"):
        resolve_layers("0,4", 4)
    with pytest.raises(SelectionError, match="empty"):
        resolve_layers("3-1", 4)


def test_extraction_refuses_a_layer_the_model_lacks_before_writing(offline_models, tmp_path):
    with pytest.raises(ExtractionError, match="layer 12 is out of range"):
        extract_to_file(
            offline_models["tiny-gpt2"], TEXTS, IDS, tmp_path / "x.safetensors", ExtractionOptions(layers="12")
        )
    assert list(tmp_path.iterdir()) == []


# -- where the selection is set: [extraction], environment, CLI ---------------------------------------------------
def test_settings_take_the_toml_and_the_environment(tmp_path):
    config = tmp_path / "config.toml"
    text = PACKAGED_CONFIG.read_text(encoding="utf-8").replace('layers = "all"', "layers = [0, -1]")
    config.write_text(text, encoding="utf-8")
    env = {"EMO_ASSETS_CONFIG": str(config), "EMO_ASSETS_ROOT": str(tmp_path)}
    assert (load_settings(env).extraction.positions, load_settings(env).extraction.layers) == ("all", "0,-1")
    extraction = load_settings({**env, "EMO_ASSETS_POSITIONS": "last:4", "EMO_ASSETS_LAYERS": "6-11"}).extraction
    assert (extraction.positions, extraction.layers) == ("last:4", "6-11")
    assert ExtractionOptions.from_settings(extraction).output_fields()["positions"] == "last:4"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EMO_ASSETS_POSITIONS": "middle"}, "EMO_ASSETS_POSITIONS='middle': positions 'middle' is not one of"),
        ({"EMO_ASSETS_LAYERS": "1..3"}, "EMO_ASSETS_LAYERS='1..3': layers '1..3' is not 'all' or"),
    ],
)
def test_bad_environment_values_are_named(tmp_path, env, message):
    with pytest.raises(ConfigError) as error:
        load_settings({"EMO_ASSETS_ROOT": str(tmp_path), **env})
    assert str(error.value).startswith(message)


def test_bad_toml_value_is_named():
    with pytest.raises(ConfigError, match=r"^extraction\.positions 'first' is not one of"):
        ExtractionSettings(positions="first")


def test_cli_flags_store_the_selection(small_datasets, tmp_path, monkeypatch):
    monkeypatch.setenv("EMO_ASSETS_DATASETS", ",".join(f"{k}={v}" for k, v in small_datasets.items()))
    args = ["--model", "tiny-gpt2", "--dataset", str(small_datasets["baseline"]), "--emotion", "anger"]
    out = tmp_path / "out"
    assert main([*args, "--output", str(out), "--positions", "mean", "--layers", "-1", "--no-progress"]) == 0
    stored = ActivationFile(out / "activations_anger.safetensors")
    assert (stored.positions, stored.layers) == ("mean", (stored.n_layers - 1,))
    assert (
        stored.n_rows
        == stored.n_sentences
        == sum(r["emotion"] == "anger" for r in read_records(small_datasets["baseline"]))
    )


@pytest.mark.parametrize(("flag", "value"), [("--positions", "every"), ("--layers", "x")])
def test_cli_refuses_bad_flags_with_exit_2(small_datasets, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as code:
        main(["--model", "tiny-gpt2", "--output", str(tmp_path / "out"), flag, value])
    assert code.value.code == 2
    assert f"argument {flag}: {flag[2:]} {value!r} is not" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_layer_beyond_the_model_with_exit_2(small_datasets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMO_ASSETS_DATASETS", ",".join(f"{k}={v}" for k, v in small_datasets.items()))
    args = ["--model", "tiny-gpt2", "--dataset", str(small_datasets["baseline"]), "--layers", "0,40"]
    assert main([*args, "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "layer 40 is out of range for a model of 4 layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
