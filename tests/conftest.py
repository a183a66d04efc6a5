"""Test tiers. The CPU tier runs the Triton kernels through the interpreter: on a machine without a
GPU (or with `CUDA_VISIBLE_DEVICES=`, which hides them). `-m gpu` and `-m multigpu` need GPUs.
Each tier skips itself, with the reason, where it cannot run."""
import os

# The one-GPU tests of the collectives run up to 8 virtual ranks, each spinning on its own stream
# until its peers arrive. Streams that share a hardware queue serialize, so a rank's kernel could
# wait behind a peer that waits on it: give every stream its own queue (CUDA's default is 8,
# HIP's 4). Read when the CUDA/HIP context is created, hence before torch touches the GPU.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
os.environ.setdefault("GPU_MAX_HW_QUEUES", "8")

import pytest  # noqa: E402
import torch  # noqa: E402

from aiter_dist.testing import gpu_world


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    n = gpu_count()
    for item in items:
        if "gpu" not in item.keywords and "multigpu" not in item.keywords and n > 0:
            item.add_marker(pytest.mark.skip(
                reason="CPU tier: Triton runs compiled on a GPU machine; run it with "
                       "CUDA_VISIBLE_DEVICES= (the interpreter then runs the kernels)"))
        if "gpu" in item.keywords and n < 1:
            item.add_marker(pytest.mark.skip(reason="needs a GPU (run -m gpu on a GPU machine)"))
        if "multigpu" in item.keywords and (n < 1 or gpu_world() < 2):
            item.add_marker(pytest.mark.skip(
                reason="needs 2+ GPUs (run -m multigpu), or AITER_DIST_TEST_GPU_RANKS=2 to share "
                       "one GPU between two ranks over the IPC workspace"))
