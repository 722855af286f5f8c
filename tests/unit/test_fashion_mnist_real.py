"""The real Fashion-MNIST files, when installed (CI installs the Debian package dataset-fashion-mnist)."""

import os

import pytest
import torch

from distillery.data.fashion_mnist import find_files, load_fashion_mnist_arrays

REQUIRED = os.environ.get("DISTILLERY_REQUIRE_FASHION_MNIST") == "1"


@pytest.mark.skipif(
    find_files() is None and not REQUIRED, reason="Fashion-MNIST not installed on this machine"
)
def test_real_fashion_mnist_has_the_official_sizes_and_balanced_classes():
    x_train, y_train, x_test, y_test = load_fashion_mnist_arrays(allow_download=False)
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert torch.equal(y_train.bincount(), torch.full((10,), 6000))
    assert torch.equal(y_test.bincount(), torch.full((10,), 1000))
    assert 0.25 < x_train.mean() < 0.32  # the known mean pixel intensity is ~0.286
