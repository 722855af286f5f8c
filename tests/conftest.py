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


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run only when selected (``-m slow``); the default suite skips them, saying so."""
    if config.option.markexpr:
        return
    skip = pytest.mark.skip(reason="slow: longer run outside the default suite (select with -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
