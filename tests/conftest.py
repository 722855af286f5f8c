"""Shared test fixtures: a private teacher cache and deterministic torch settings."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never read or write the user's ~/.cache/distillery from tests."""
    cache = tmp_path_factory.getbasetemp() / "distillery-cache"
    monkeypatch.setenv("DISTILLERY_CACHE", str(cache))
    yield


@pytest.fixture(autouse=True)
def _torch_defaults():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
