import os
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """A fresh but reproducible seed per test: the CRC-32 of its id (Python's ``hash`` of a string is salted
    per process, so it was not reproducible across runs)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# Markers, so that a quick subset runs in a minute or two (`python -m pytest -m "not slow"`); `.ci/run` runs all.
_MARKERS = {
    "slow": "starts a server process, a Ray cluster or the real model (tens of seconds)",
    "cluster": "a real local Ray cluster (needs the cluster extra)",
}
_SLOW_MODULES = {"test_server.py", "test_cluster.py", "test_structured.py", "test_weight_cache.py",
                 "test_bench_serve.py", "test_server_fuzz.py", "test_structured_fuzz.py"}


@pytest.fixture
def two_threads():
    """torch's intra-op threads pinned to 2 for the test (restored after): kernels split work by thread, and a test
    that needs several groups or blocks per thread sizes its operands for two."""
    from helpers import torch_threads  # (not at the top: the environment above comes before chunkattn's import)

    with torch_threads(2):
        yield


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.name
        if module in _SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if module == "test_cluster.py":
            item.add_marker(pytest.mark.cluster)
