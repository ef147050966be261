"""The package installs with kernels/ and export/ mapped to fastvae.kernels and fastvae.export."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_install_maps_kernels_and_export(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert not (target / "kernels").exists() and not (target / "export").exists()  # no top-level shadowing
    assert (target / "fastvae" / "datasets" / "mnist.npz").is_file()
    code = (
        "import fastvae, fastvae.kernels, fastvae.export, os;"
        "assert fastvae.__file__.startswith(os.environ['TARGET']), fastvae.__file__;"
        "assert fastvae.kernels.__file__.startswith(os.environ['TARGET']);"
        "print(fastvae.export.__name__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "TARGET": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fastvae.export"


def test_installed_package_imports_from_any_directory(tmp_path):
    code = "import fastvae.kernels, fastvae.export; print(fastvae.kernels.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_import_fastvae_does_not_import_torch(tmp_path):
    code = "import sys, fastvae, fastvae.export; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
