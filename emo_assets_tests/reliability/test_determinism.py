"""Same inputs, same bytes: two complete offline-profile extraction runs (both variants, four models, small
datasets), in two processes at the same time, write byte-identical activation and Parquet files.

Lower levels: `emo_assets_tests/core/test_extraction.py::test_same_inputs_give_byte_identical_files` (one
process), `emo_assets_tests/core/test_models.py::test_tiny_models_are_deterministic`, and the rerun after
SIGKILL in `emo_assets_tests/test_extract_cli.py` (another process, same bytes).
"""

from __future__ import annotations

import pytest

from emo_assets.core.storage import ActivationFile

pytestmark = pytest.mark.slow


def _outputs(hashes: dict[str, str], suffix: str) -> dict[str, str]:
    return {name: digest for name, digest in hashes.items() if name.endswith(suffix)}


@pytest.mark.parametrize(("suffix", "count"), [(".safetensors", 32), (".parquet", 8)])
def test_two_full_offline_runs_are_byte_identical(extraction_twice, suffix, count):
    here, there = _outputs(extraction_twice.hashes_here, suffix), _outputs(extraction_twice.hashes_there, suffix)
    assert len(here) == count, sorted(here)  # 2 variants x 4 models x 4 emotions / 2 variants x 4 emotions
    different = sorted(name for name in here if here[name] != there.get(name))
    assert not different, f"differ between the two runs: {different}"
    assert set(here) == set(there)


def test_the_compared_files_are_complete_activation_files(extraction_twice):
    """Guard against comparing two equally broken outputs."""
    names = _outputs(extraction_twice.hashes_there, ".safetensors")
    for name in list(names)[:4]:
        file = ActivationFile(extraction_twice.there / "results" / name)
        assert file.n_sentences > 0 and file.kinds == ["resid_post", "mlp_out"]
