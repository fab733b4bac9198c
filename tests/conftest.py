import os

import pytest
import torch

# DeepSpeed must never try MPI or CUDA in tests; single-process runs get a gloo rendezvous of their own.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    root = tmp_path / "ws"
    monkeypatch.setenv("LM2_WORKDIR", str(root))
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    matrices gain nothing from more, and lose a lot when a shared 2-core machine is oversubscribed."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
