"""Stage the torch-free modules of the repository into _src/ before setuptools packages them.

The list is exactly what the runtime imports (``tests/test_install.py`` checks that none imports torch).
An sdist of this folder carries _src/, so it builds without the repository around it."""

import shutil
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# repository folder -> (package folder in _src, modules)
MODULES = {
    "fastvae": (
        "fastvae",
        ("__init__.py", "_version.py", "errors.py", "atomic.py", "images.py", "inputs.py", "limits.py",
         "noise_keys.py"),
    ),
    "export": (
        "fastvae/export",
        ("__init__.py", "runtime.py", "sample.py", "encode.py", "score.py", "keyed_noise.py"),
    ),
}

if (ROOT / "fastvae" / "errors.py").is_file():  # in the repository: stage afresh
    shutil.rmtree(HERE / "_src", ignore_errors=True)
    for folder, (target, names) in MODULES.items():
        (HERE / "_src" / target).mkdir(parents=True)
        for name in names:
            shutil.copy2(ROOT / folder / name, HERE / "_src" / target / name)

setup()
