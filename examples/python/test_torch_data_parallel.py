"""Runs the torch.distributed example (torch_data_parallel.py) on two processes with the gloo
backend: the ranks must hold the single-process weights and state bit for bit and reproduce its
loss and gradients, and without the all-reduce of the counts the example must report the drift.
Reported as skipped, with the reason, where PyTorch or its gloo backend is missing."""

import importlib
import pathlib
import sys

import pytest

try:
    import torch.distributed as dist
except ImportError:
    dist = None

if dist is None:
    MISSING = "PyTorch is not installed: the torch.distributed example is not run here"
elif not dist.is_available() or not dist.is_gloo_available():
    MISSING = "this PyTorch has no gloo backend for torch.distributed"
else:
    MISSING = None
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def example():
    # The example, and the in-tree cbce package unless one is installed; the processes that
    # torch.multiprocessing starts inherit this search path.
    sys.path.insert(0, str(HERE))
    if importlib.util.find_spec("cbce") is None:
        sys.path.insert(0, str(HERE.parent.parent / "python"))
    return importlib.import_module("torch_data_parallel")


def test_two_ranks_reproduce_the_single_process_run(example):
    report = example.run(world_size=2)

    assert report["world_size"] == 2
    assert report["failures"] == []


def test_ranks_that_skip_the_all_reduce_are_reported_to_drift(example):
    report = example.run(world_size=2, all_reduce_counts=False)

    assert any("the weights of rank" in failure for failure in report["failures"])
    assert any("state blob" in failure for failure in report["failures"])
