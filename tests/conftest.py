import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """A fresh but reproducible seed per test (derived from its id)."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
