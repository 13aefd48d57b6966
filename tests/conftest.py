"""Fixtures and session settings; shared helper functions are in helpers.py."""

import pytest
import torch

import d2norm  # noqa: F401  (stand-in for detectron2._C where needed, get_norm patch)

# The suite's models are tiny: one thread is as fast as two on an idle machine and avoids
# OpenMP spin-waiting slowdowns (10x seen) when the machine is shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """Synthetic splits generated once per test session."""
    root = str(tmp_path_factory.mktemp("d2norm_data"))
    from d2norm.data import register_synthetic_datasets

    register_synthetic_datasets(root, ["d2norm_shapes_tiny_train", "d2norm_shapes_tiny_val"])
    return root
