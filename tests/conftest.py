"""Test set-up: Triton's interpreter on machines without CUDA, set before any kernel is imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config():
    from fastvae import VAEConfig

    return VAEConfig(input_dim=(1, 6, 6), hidden_dims=(17,), latent_dim=3, activation="tanh")


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    """A small learnable data set (blurry 8x8 strokes) as a .npz with x_train / x_test, uint8."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 600
    x = np.zeros((n, 8, 8), dtype=np.float32)
    for i in range(n):
        r, c = rng.integers(1, 7, size=2)
        x[i, r - 1 : r + 2, :] += rng.random() > 0.5
        x[i, :, c - 1 : c + 2] += rng.random() > 0.5
    x = (np.clip(x, 0, 1) * 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("data") / "strokes.npz"
    np.savez(path, x_train=x[:500], x_test=x[500:])
    return path


@pytest.fixture
def no_torch_env(tmp_path):
    """Environment for a subprocess in which importing torch fails; at exit it writes TORCH_LOADED or
    NO_TORCH to stderr, so a test can check that nothing pulled torch in."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys, atexit\n"
        "class _NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
        "atexit.register(lambda: sys.stderr.write('TORCH_LOADED\\n' if 'torch' in sys.modules else 'NO_TORCH\\n'))\n"
    )
    return {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
