"""Stage 1 of benchmarks/gpu_acceptance.sh: the machine and versions, and where fastvae was imported from.

    python env_info.py --run RUN_DIR [--gpu NAME]

Writes RUN_DIR/env.json and RUN_DIR/env.md. Every field is read from the running system; one that cannot be
read is recorded as null with the reason, never guessed. Exit 1 when fastvae (with its kernels and export
subpackages) cannot be imported: the later stages need it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

SMI_FIELDS = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,compute_cap"


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as exc:  # a broken install is a finding, not a crash
        return f"not importable: {type(exc).__name__}"


def _smi() -> dict[str, Any]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"nvidia-smi: {type(exc).__name__}"}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:200]}
    rows = [dict(zip(SMI_FIELDS.split(","), (v.strip() for v in ln.split(",")))) for ln in out.stdout.splitlines()]
    return {"gpus": rows}


def _torch() -> dict[str, Any]:
    try:
        import torch
    except Exception as exc:
        return {"error": f"torch not importable: {type(exc).__name__}: {exc}"}
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "cudnn": torch.backends.cudnn.version()}  # fmt: skip
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_bytes=p.total_memory, device_count=torch.cuda.device_count())  # fmt: skip
    return info


def _fastvae() -> dict[str, Any]:
    try:
        import fastvae
        import fastvae.export
        import fastvae.kernels
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {name: str(Path(m.__file__).parent) for name, m in
            (("fastvae", fastvae), ("fastvae.kernels", fastvae.kernels), ("fastvae.export", fastvae.export))}  # fmt: skip


def collect(gpu: str) -> dict[str, Any]:
    return {
        "gpu": gpu or None, "python": platform.python_version(), "executable": sys.executable,
        "platform": platform.platform(), "cpu_cores": os.cpu_count(),
        "install_mode": os.environ.get("INSTALL_MODE"), "install_rc": os.environ.get("INSTALL_RC"),
        **_torch(), "triton": _version("triton"), "numpy": _version("numpy"),
        "setuptools": _version("setuptools"), "pip": _version("pip"), "onnxruntime": _version("onnxruntime"),
        "nvidia_smi": _smi(), "fastvae_paths": _fastvae(),
    }  # fmt: skip


def markdown(env: dict[str, Any]) -> str:
    smi = (env["nvidia_smi"].get("gpus") or [{}])[0]
    paths = env["fastvae_paths"]
    lines = [
        f"- device: {env.get('device') or env['gpu'] or 'no CUDA device'}"
        + (f" (sm_{env['capability'].replace('.', '')}, {env['sms']} SMs)" if env.get("capability") else ""),
        f"- driver {smi.get('driver_version', 'n/a')}; torch {env.get('torch')} (CUDA {env.get('cuda')}); "
        f"triton {env['triton']}; python {env['python']}; numpy {env['numpy']}; setuptools {env['setuptools']}",
        f"- install: {env['install_mode']} (pip exit {env['install_rc']}); fastvae from "
        + (paths["error"] if "error" in paths else f"{paths['fastvae']}, kernels from {paths['fastvae.kernels']}"),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--gpu", default="")
    a = p.parse_args()
    env = collect(a.gpu)
    (a.run / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    (a.run / "env.md").write_text(markdown(env))
    print(markdown(env), end="")
    return 1 if "error" in env["fastvae_paths"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
