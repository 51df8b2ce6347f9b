import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():
    # Without a GPU the Triton kernels (tests/test_kernels.py) run on triton's CPU interpreter. triton
    # decides at import time (its own @jit helpers, e.g. tl.sum, are built then), and other test modules
    # import it indirectly (diffusers, transformers), so the switch must be set before any of them.
    os.environ["TRITON_INTERPRET"] = "1"


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 on two cores: one intra-op thread per worker, or the workers' OpenMP threads oversubscribe
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # the few slow tests first: under -n 2 the two workers then finish together, not one waiting on them
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread: two on 2 shared cores oversubscribe badly (OpenMP spin-waits, several times
    slower under load); one keeps the CPU tests fast and their timing predictable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
