"""Shared test setup."""
import os

import pytest
import torch

# The `mlflow server`s the tests start (subprocesses inherit this) run no job runner: it
# spawns seven huey consumers for MLflow's GenAI jobs, which take CPU from the other tests.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and steadier (as in the pipeline's stages)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
