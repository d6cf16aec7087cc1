import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_cli(*args: str, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m spatial_attention ARGS`` in a subprocess, capturing text output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "spatial_attention", *args],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def one_thread():
    """Small shapes gain nothing from a thread pool; one thread avoids its barriers on a
    shared machine. The previous count is restored. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption("--sweep-long", action="store_true", default=False,
                     help="run the random sweep (tests/test_sweep.py) with 10x more cases")
