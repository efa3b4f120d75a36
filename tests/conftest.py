# Triton kernels run on the CPU in Triton's interpreter; it must be chosen before triton is imported.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """A fresh but reproducible seed per test (derived from its id)."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
