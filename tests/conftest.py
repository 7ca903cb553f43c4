import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="Full backward hook is firing")

# Helpers, not tests: --doctest-modules would import them a second time under a
# top-level name (they hold no examples).
collect_ignore = ["_resume_worker.py", "_state.py", "cases.py", "curvature_helpers.py"]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: extra intra-op threads only oversubscribe a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
