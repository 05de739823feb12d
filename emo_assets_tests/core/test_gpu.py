"""The CUDA path gives the CPU path's activations. Skipped where there is no GPU (CI); run on a GPU machine with
`python -m pytest -q emo_assets_tests/core/test_gpu.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emo_assets.core.activations import ActivationFile
from emo_assets.core.extraction import ExtractionOptions, extract_to_file
from emo_assets.core.models import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-pythia", "tiny-gpt-neo", "minilm"])
def test_cuda_extraction_matches_cpu(name, small_texts, tmp_path):
    ids = [f"s{i}" for i in range(len(small_texts))]
    files = {}
    for device in ("cpu", "cuda"):
        loaded = load_model(name, device=device, training_texts=lambda: small_texts)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        result = extract_to_file(
            loaded, small_texts, ids, tmp_path / f"{device}.safetensors", ExtractionOptions(batch_size=8)
        )
        files[device] = ActivationFile(result.path)
    for kind in ("resid_post", "mlp_out"):
        cpu, gpu = files["cpu"].raw(kind), files["cuda"].raw(kind)
        np.testing.assert_allclose(gpu, cpu, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(files["cpu"].input_ids, files["cuda"].input_ids)
