import pytest

from emo_assets.core.analysis.blas import one_blas_thread


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Test-side matrix work (random rotations, synthetic data) with one BLAS thread, like the library itself:
    on 2-core machines multi-threaded OpenBLAS is many times slower on these small matrices."""
    with one_blas_thread():
        yield
