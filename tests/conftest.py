"""Test tiers: the CPU tier runs everywhere; `-m gpu` and `-m multigpu` need GPUs and skip
themselves (with the reason) where there are none."""
import pytest
import torch


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    n = gpu_count()
    for item in items:
        if "gpu" in item.keywords and n < 1:
            item.add_marker(pytest.mark.skip(reason="needs a GPU (run -m gpu on a GPU machine)"))
        if "multigpu" in item.keywords and n < 2:
            item.add_marker(pytest.mark.skip(reason="needs 2+ GPUs (run -m multigpu)"))
