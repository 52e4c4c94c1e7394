"""Fixtures shared by the kernel tests (test_kernels.py, test_compensation.py), registered by conftest.

``salad_pack.kernels`` is imported inside the fixtures, not here: test_kernels selects the Triton CPU
interpreter (TRITON_INTERPRET=1) before the kernels are first imported.
"""
import pytest
from seeds import fresh_seed


@pytest.fixture
def seed():
    """A fresh seed per test (``SALAD_TEST_SEED`` replays one), printed so a failure can be replayed."""
    return fresh_seed()


@pytest.fixture
def poison():
    """Triton options for a test: every output buffer pre-filled with NaN (unwritten elements fail)."""
    import salad_pack.kernels as K
    return K.TritonOptions(poison=True)


@pytest.fixture(params=[False, True], ids=["ptr", "tma"])
def fwd_path(request):
    """Triton options that run the kernels through their pointer loads, or through tensor
    descriptors (TMA) wherever the tensors allow them (also where the tuned config says no);
    outputs poisoned as with the `poison` fixture."""
    import salad_pack.kernels as K
    return K.TritonOptions(poison=True, tma=request.param)
