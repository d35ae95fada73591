import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch

torch.set_num_threads(1)  # unit tests share 2 cores with env subprocesses: avoid OpenMP oversubscription

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def robomimic_lift_file(tmp_path_factory):
    """Three scripted lift demos in Robomimic's hdf5 layout, generated once per test session."""
    import make_datasets

    path = str(tmp_path_factory.mktemp("data") / "lift_3.hdf5")
    make_datasets.generate_robomimic("lift", path, num_demos=3, num_workers=1)
    return path
