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


def test_packaging_metadata_hygiene():
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "fastvae-engine"  # "fastvae" on the package index is another project
    extras = meta["optional-dependencies"]
    assert extras["triton"] == ["triton>=3.6,<3.10"]  # the tested range, 3.6-3.9
    assert "fastvae-engine[triton,export,plot]" in extras["test"]
    assert not any(
        r.startswith(("onnx", "matplotlib", "triton")) for r in extras["test"]
    )  # composed, not repeated
    assert "CC-BY-SA-3.0" in meta["license"] and "fastvae/datasets/README.md" in meta["license-files"]
    first = (ROOT / "fastvae" / "datasets" / "README.md").read_text().splitlines()[0]
    assert "/" not in first and "MNIST" in first  # no internal folder name as its heading
    runtime = tomllib.loads((ROOT / "runtime" / "pyproject.toml").read_text())["project"]
    assert runtime["name"] == "fastvae-engine-runtime"
    assert not any(d.startswith("torch") for d in runtime["dependencies"])


def test_runtime_modules_import_no_torch(tmp_path):
    """Every module the runtime distribution ships imports without torch (runtime/setup.py's list)."""
    ns: dict = {}
    src = (ROOT / "runtime" / "setup.py").read_text()
    exec(src[src.index("MODULES = {") : src.index("\nif ")], ns)  # the MODULES table only
    names = [
        f"fastvae.{'export.' if folder == 'export' else ''}{n[:-3]}".replace(".__init__", "")
        for folder, (_, files) in ns["MODULES"].items()
        for n in files
    ]
    code = (
        f"import sys\nfor m in {names!r}: __import__(m)\nassert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_sdist_carries_its_tests(tmp_path):
    import tarfile

    import pytest

    pytest.importorskip("build")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    (sdist,) = tmp_path.glob("fastvae_engine-*.tar.gz")
    names = tarfile.open(sdist).getnames()
    top = names[0].split("/")[0]
    for need in ("tests/conftest.py", "tests/test_data.py", "runtime/setup.py", "runtime/pyproject.toml"):
        assert f"{top}/{need}" in names, need
    assert not any("/runtime/_src/" in n for n in names)
