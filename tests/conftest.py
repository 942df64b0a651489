"""Shared pytest configuration.

Under CI (``CI`` set in the environment) hypothesis runs derandomized, so a CI verdict is
repeatable; locally it explores new examples on every run.

Fixtures of the comparison studies' tests: ``one_thread`` (a module runs its small studies
on one torch thread: no oversubscription of a shared 2-core CI box; use it with
``pytestmark = pytest.mark.usefixtures("one_thread")``) and ``fake_data`` (a directory with
a learnable synthetic Fashion-MNIST, one per test module).
"""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from .fake_fmnist import fake_fashion_mnist

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tests, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory) -> Path:
    """The synthetic Fashion-MNIST idx files (600 training, 300 test images)."""
    return fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"))
