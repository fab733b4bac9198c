import os

import pytest

# DeepSpeed must never try MPI or CUDA in tests; single-process runs get a gloo rendezvous of their own.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    root = tmp_path / "ws"
    monkeypatch.setenv("LM2_WORKDIR", str(root))
    return root
