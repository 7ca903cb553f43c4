import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="Full backward hook is firing")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
