"""Shared fixtures: the debug recipe's built-in data, built once per test session."""

import pytest

from nanoseek.config import load_recipe
from nanoseek.data.builtin import DataConfig, cached


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data = load_recipe("debug")["data"]
    cached(DataConfig(**data, root=str(root)))
    return root


@pytest.fixture
def debug_recipe(data_root):
    """The debug recipe reading the session's data, without plots (matplotlib's import is slow)."""
    return load_recipe("debug", [f"data.root={data_root}", "pretrain.plots=false"])
