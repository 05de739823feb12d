"""Model resolution and loading: hub ids through a real (offline) HF cache, local dirs, layer discovery, safety.

The hub-id path is exercised with tiny stand-ins saved into a temp Hugging Face cache under the real ids
(`models--gpt2/snapshots/<commit>`), loaded with `HF_HUB_OFFLINE=1` in a subprocess (huggingface_hub reads
its environment at import time).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emo_assets.core.layers import find_hook_points
from emo_assets.core.models import ModelLoadError, load_model, weights_sha256
from emo_assets.core.offline_models import (
    TINY_RECIPES,
    add_to_hub_cache,
    save_random_model,
    tiny_model_dir,
    train_tokenizer,
)

PAPER_IDS = {"gpt2": "tiny-gpt2", "EleutherAI/pythia-160m": "tiny-pythia", "EleutherAI/gpt-neo-125M": "tiny-gpt-neo"}


def fake_hub_cache(home: Path, texts: list[str]) -> dict[str, str]:
    """Lay out tiny models as the hub client would cache them; returns hub id -> commit."""
    commits = {}
    for index, (hub_id, tiny) in enumerate(PAPER_IDS.items()):
        commits[hub_id] = f"{index + 1:x}" * 40
        add_to_hub_cache(home / "hub", hub_id, tiny_model_dir(tiny, texts), commits[hub_id])
    return commits


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_paper_hub_ids_load_from_the_hf_cache_offline(tmp_path, small_texts):
    commits = fake_hub_cache(tmp_path / "hf", small_texts)
    code = (
        "import json; from emo_assets.core.models import load_model\n"
        "out = {}\n"
        f"for hub_id in {list(PAPER_IDS)!r}:\n"
        "    m = load_model(hub_id, device='cpu')\n"
        "    out[hub_id] = [m.slug, m.source, m.revision, m.architecture, m.n_layers]\n"
        "print(json.dumps(out))\n"
    )
    result = run_python(code, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {
        "gpt2": ["gpt2", "hub", commits["gpt2"], "GPT2Model", 4],
        "EleutherAI/pythia-160m": [
            "EleutherAI-pythia-160m",
            "hub",
            commits["EleutherAI/pythia-160m"],
            "GPTNeoXModel",
            4,
        ],
        "EleutherAI/gpt-neo-125M": [
            "EleutherAI-gpt-neo-125M",
            "hub",
            commits["EleutherAI/gpt-neo-125M"],
            "GPTNeoModel",
            4,
        ],
    }


def test_uncached_hub_model_fails_with_remedies(tmp_path):
    code = "from emo_assets.core.models import load_model\nload_model('EleutherAI/pythia-160m', device='cpu')"
    result = run_python(code, {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "ModelLoadError" in result.stderr and "'EleutherAI/pythia-160m'" in result.stderr
    for remedy in ("network", "HF_HOME", "HF_HUB_OFFLINE", "local model directory", "offline model"):
        assert remedy in result.stderr


def test_local_directory_revision_is_the_weights_sha256(tmp_path, small_texts):
    source = tiny_model_dir("tiny-gpt-neo", small_texts)
    local = tmp_path / "my-model"
    local.mkdir()
    for file in source.iterdir():
        (local / file.name).write_bytes(file.read_bytes())
    loaded = load_model(str(local), device="cpu")
    assert (loaded.source, loaded.slug) == ("local", "my-model")
    assert loaded.revision == weights_sha256(local) and len(loaded.revision) == 64
    assert loaded.disk_bytes == sum(f.stat().st_size for f in local.iterdir())
    assert not loaded.model.training


def test_remote_code_is_not_run_by_default(tmp_path):
    marker = tmp_path / "remote_code_ran"
    model_dir = tmp_path / "evil"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}})
    )
    (model_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ModelLoadError):
        load_model(str(model_dir), device="cpu")
    assert not marker.exists()


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu")


def _tiny(config_cls, **kwargs):
    torch.manual_seed(0)
    from transformers import AutoModel

    return AutoModel.from_config(config_cls(**kwargs)).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_layer_discovery_on_llama_style_decoders(family):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    model = _tiny(
        config_cls,
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    points = find_hook_points(model)
    assert points.names["resid_post"] == ["layers.0", "layers.1", "layers.2"]
    assert points.names["mlp_out"] == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    assert points.names["attn_out"] == ["layers.0.self_attn", "layers.1.self_attn", "layers.2.self_attn"]


def test_layer_discovery_names_for_offline_models(offline_models):
    expected = {
        "minilm": ("encoder.layer.0", "encoder.layer.0.output.dense", "encoder.layer.0.attention.output.dense"),
        "tiny-gpt2": ("h.0", "h.0.mlp", "h.0.attn"),
        "tiny-pythia": ("layers.0", "layers.0.mlp", "layers.0.attention"),
        "tiny-gpt-neo": ("h.0", "h.0.mlp", "h.0.attn"),
    }
    for name, (block, mlp, attn) in expected.items():
        names = find_hook_points(offline_models[name].model).names
        assert (names["resid_post"][0], names["mlp_out"][0], names["attn_out"][0]) == (block, mlp, attn)
        assert len(names["resid_post"]) == offline_models[name].n_layers


def test_tiny_models_are_deterministic(small_texts, tmp_path, monkeypatch):
    first = weights_sha256(tiny_model_dir("tiny-gpt2", small_texts))
    monkeypatch.setenv("EMO_ASSETS_MODEL_CACHE", str(tmp_path))
    assert weights_sha256(tiny_model_dir("tiny-gpt2", small_texts)) == first


@pytest.fixture
def transformers_warnings_shown():
    """transformers at its default verbosity (an in-process CLI run earlier in the session may have lowered it)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    yield
    hf_logging.set_verbosity(previous)


def _lm_head_checkpoint(folder: Path, texts: list[str], extra_key: str | None = None) -> Path:
    """A tiny Pythia saved with its (untied) LM head `embed_out`, as hub checkpoints are; optionally one more
    3-element tensor under `extra_key` (added, or replacing a weight of another shape)."""
    tokenizer = train_tokenizer(texts)
    model_dir = save_random_model(folder, TINY_RECIPES["tiny-pythia"](len(tokenizer)), tokenizer, lm_head=True)
    if extra_key:
        from safetensors.torch import load_file, save_file

        weights = model_dir / "model.safetensors"
        tensors = load_file(weights)
        save_file({**tensors, extra_key: torch.zeros(3)}, weights, metadata={"format": "pt"})
    return model_dir


def _messages(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def test_lm_head_checkpoint_loads_quietly_with_one_line(tmp_path, small_texts, caplog, transformers_warnings_shown):
    model_dir = _lm_head_checkpoint(tmp_path / "pythia-lm", small_texts)
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as handle:
        assert "embed_out.weight" in handle.keys()  # the checkpoint really carries the head
    with caplog.at_level(logging.INFO):
        loaded = load_model(str(model_dir), device="cpu")
    assert not [m for m in _messages(caplog, "transformers.modeling_utils") if "LOAD REPORT" in m]
    lines = _messages(caplog, "emo_assets.core.models")
    assert len(lines) == 1 and "embed_out.weight" in lines[0] and "base model GPTNeoXModel" in lines[0]
    assert loaded.info["unused_head_keys"] == ["embed_out.weight"]
    assert loaded.architecture == "GPTNeoXModel"


def test_other_load_problems_keep_the_transformers_report(tmp_path, small_texts, caplog, transformers_warnings_shown):
    model_dir = _lm_head_checkpoint(tmp_path / "pythia-odd", small_texts, extra_key="gpt_neox.layers.0.stray")
    with caplog.at_level(logging.INFO):
        loaded = load_model(str(model_dir), device="cpu")
    reports = [m for m in _messages(caplog, "transformers.modeling_utils") if "LOAD REPORT" in m]
    assert len(reports) == 1 and "layers.0.stray" in reports[0] and "embed_out.weight" in reports[0]
    assert not _messages(caplog, "emo_assets.core.models")
    assert "unused_head_keys" not in loaded.info


def test_a_failed_load_keeps_the_transformers_report(tmp_path, small_texts, caplog, transformers_warnings_shown):
    model_dir = _lm_head_checkpoint(
        tmp_path / "pythia-bad", small_texts, extra_key="gpt_neox.final_layer_norm.weight"
    )  # wrong shape: load fails
    with caplog.at_level(logging.INFO), pytest.raises(ModelLoadError, match="pythia-bad"):
        load_model(str(model_dir), device="cpu")
    reports = [m for m in _messages(caplog, "transformers.modeling_utils") if "LOAD REPORT" in m]
    assert len(reports) == 1 and "final_layer_norm.weight" in reports[0] and "MISMATCH" in reports[0]
    assert not _messages(caplog, "emo_assets.core.models")
