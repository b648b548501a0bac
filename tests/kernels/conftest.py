import pytest
import torch

from lora_serving import kernels
from tests.kernels.lora_checks import run_interpreted_triton_checks


@pytest.fixture(scope="session")
def interpreted_triton_results():
    """Without a GPU: every Triton check's outcome, from one interpreter subprocess."""
    if torch.cuda.is_available():
        return None
    if not kernels.triton_available():
        pytest.skip("triton does not import")
    return run_interpreted_triton_checks()
