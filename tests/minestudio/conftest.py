"""Fixtures of the MineStudio tests."""

import pickle

import pytest

from tests.minestudio.standin_config import TINY_VPT


@pytest.fixture
def tiny_model_file(tmp_path):
    """A VPT .model file as MineStudio's load_vpt_policy reads it: the pickled policy kwargs and temperature."""
    path = tmp_path / "tiny.model"
    path.write_bytes(pickle.dumps({"model": {"args": {"net": {"args": TINY_VPT},
                                                      "pi_head_opts": {"temperature": 2.0}}}}))
    return path
