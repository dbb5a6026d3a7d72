"""Test environment: hermetic (temp HOME, no network, no hub downloads) and deterministic.

torchvision is imported first on purpose: importing triton (which torchvision/timm pull in through
torch._dynamo) after napari created a GL context segfaults (ENVIRONMENT.md).
"""

import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="lidc-cdam-test-home-")
os.environ["HOME"] = _HOME
os.environ["MPLCONFIGDIR"] = os.path.join(_HOME, ".matplotlib")
os.environ["XDG_CACHE_HOME"] = os.path.join(_HOME, ".cache")
os.environ["LIDC_CDAM_CACHE"] = os.path.join(_HOME, ".cache", "lidc-cdam")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download during tests
os.environ["MPLBACKEND"] = "Agg"

import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402,F401  (before any GL context: see module docstring)

# two threads at most (the machine has two cores) shared by the xdist workers (each gets its share, at least
# one), or what OMP_NUM_THREADS asks for (the other kernel set)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS")
                          or max(1, min(2, os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def demo_model():
    """The default demo model (the shipped one: nothing is trained); returns the model and the seconds
    it took to load."""
    import time

    from lidc_cdam.train.digits import load_or_train_demo_model

    start = time.perf_counter()
    model = load_or_train_demo_model(progress=False)
    return model, time.perf_counter() - start
