import torch

from tests.conftest import pytest_collection_modifyitems  # noqa: F401  (skip `gpu` tests without CUDA)

HAS_CUDA = torch.cuda.is_available()
