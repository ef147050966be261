"""The bench record's machine description and its printed table."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from fastvae.bench.dynamo import EXPECTED_GRAPHS, unexpected

# Instruction-set extensions that decide CPU GEMM throughput, as /proc/cpuinfo names them.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
ORDER = ("examples-loop", "eager", "eager+graph", "compile", "fastvae")


def _cpuinfo() -> tuple[str | None, list[str]]:
    """(model name, the ISA_FLAGS the kernel exposes to this machine) from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, []
    name, flags = None, set()
    for line in text.splitlines():
        if line.startswith("model name") and name is None:
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return name, [f for f in ISA_FLAGS if f in flags]


def machine(device: torch.device) -> dict[str, Any]:
    """Device, software versions, git commit and date for the record."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    cpu_name, isa = _cpuinfo()
    rec: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (cpu_name or platform.machine()),
        "device_type": device.type, "cpu": cpu_name, "cpu_cores": os.cpu_count(), "cpu_isa_flags": isa,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "git_commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    return rec


def new_record_path(out: str | None, stem: str) -> Path:
    """Where a benchmark writes its record: ``out``, or ``<stem>-<date>-<time>.json`` in the current folder.
    Never an existing file (the committed records in benchmarks/results/ are kept), and in a writable
    folder; both checked before any timing (FastVAEError otherwise)."""
    from fastvae.atomic import check_writable
    from fastvae.errors import FastVAEError

    if out is None:
        out = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path = check_writable(out)
    if path.exists():
        raise FastVAEError(f"{out}: exists; a benchmark writes a new record (give another --out, or move it)")
    return path


def save_record(path: Path, record: dict[str, Any]) -> None:
    """The record so far, replacing the last save atomically: a late failure keeps what was measured."""
    import json

    from fastvae.atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "device"


def _ms(v: dict[str, Any]) -> str:
    if "median_ms" not in v:
        return "error" if "error" in v else "n/a"
    return f"{v['median_ms']:.3f} ({v['p20_ms']:.3f}-{v['p80_ms']:.3f})"


def _mem(v: dict[str, Any]) -> str:
    if v.get("peak_allocated_bytes") is None:
        return ""
    return f" [{v['peak_allocated_bytes'] / 2**20:.0f}/{v['peak_reserved_bytes'] / 2**20:.0f} MiB]"


def speed_words(ratio: float) -> str:
    """``other time / fastvae time`` as words that read right either way: "1.80x faster", "1.25x slower"."""
    if ratio >= 1:
        return f"{ratio:.2f}x faster"
    return f"{1 / ratio:.2f}x slower"


def _columns(record: dict[str, Any]) -> tuple[list[str], list[str], bool, bool, bool]:
    """(contenders with a time column, contenders fastvae is compared with, and whether the compile-graphs,
    kernels/step and GEMM columns apply: kernel launches and cuBLAS bounds are GPU figures)."""
    cells = record["cells"]
    names = [n for n in ORDER if any(n in c["contenders"] for c in cells)]
    versus = [n for n in names if n != "fastvae"] if "fastvae" in names else []
    cuda = record.get("device_type", "cuda") == "cuda"
    gemm = any(c.get("gemm_lower_bound_ms") for c in cells)
    return names, versus, "compile" in names, cuda, gemm


def format_table(record: dict[str, Any]) -> str:
    names, versus, compiled, cuda, gemm = _columns(record)
    cols = ["preset", "batch", "dtype", *(f"{n} ms (p20-p80)" for n in names)]
    cols += ["compile graphs"] * compiled + ["kernels/step"] * cuda + [f"fastvae vs {n}" for n in versus]
    cols += ["fastvae / GEMM lower bound"] * gemm
    head = "| " + " | ".join(cols) + " |"
    lines = [
        f"device: {record['device']} ({record['cpu_cores']} cores, ISA {'+'.join(record['cpu_isa_flags']) or '?'}, "
        f"torch CPU capability {record['torch_cpu_capability']}; {record.get('torch_threads', '?')} torch thread(s); "
        f"torch {record['torch']}, triton {record['triton']}, CUDA {record['cuda']})",
        f"grid: {record['grid']['name']}", head, "|" + "---|" * len(cols),
    ]  # fmt: skip
    flagged = []
    for c in record["cells"]:
        row = [c["preset"], str(c["batch"]), c["dtype"]]
        for n in names:
            v = c["contenders"].get(n)
            dyn = (v or {}).get("dynamo")
            row.append("—" if v is None else _ms(v) + _mem(v) + (" *" if dyn and unexpected(dyn) else ""))
            if dyn and unexpected(dyn):
                flagged.append((c, dyn))
        if compiled:
            dyn = c["contenders"].get("compile", {}).get("dynamo")
            row.append(_dyn_label(dyn) if dyn else "—")
        if cuda:
            row.append(", ".join(f"{n} {v['launches_per_step']} ({v['launches_source']})"
                                 for n, v in c["contenders"].items() if v.get("launches_per_step")) or "—")  # fmt: skip
        sp = c.get("fastvae_speedup") or {}
        row += [speed_words(sp[n]) if n in sp else "—" for n in versus]
        if gemm:
            lb = c.get("fastvae_over_gemm_lower_bound")
            row.append(f"{lb:.2f}x" if lb else "—")
        lines.append("| " + " | ".join(row) + " |")
    lines += _footnotes(record, flagged, names, cuda)
    return "\n".join(lines)


def _dyn_label(d: dict[str, Any]) -> str:
    if not unexpected(d) and d["graphs"] == EXPECTED_GRAPHS:
        return f"{EXPECTED_GRAPHS} graphs, as expected (split at backward)"
    parts = [f"{d['graphs']} graph{'s' if d['graphs'] != 1 else ''}"]
    if d["graph_breaks"]:
        parts.append(f"{d['graph_breaks']} breaks")
    if d["fallbacks"]:
        parts.append(f"FELL BACK x{d['fallbacks']}")
    if d["recompiles"]:
        parts.append(f"RECOMPILED x{d['recompiles']} while timed")
    return ", ".join(parts)


def _footnotes(record: dict[str, Any], flagged: list, names: list[str], cuda: bool) -> list[str]:
    out = []
    if "fastvae" in names and not cuda:
        out.append("fastvae on a CPU: the step `fastvae train` runs there (the data set resident as one tensor, "
                   "batches gathered by index, noise keyed by seed and sample id, no DataLoader; reference "
                   "model, fused Adam). Its fused Triton engine needs CUDA.")  # fmt: skip
    if "examples-loop" in names:
        out.append("examples-loop: the pytorch/examples vae/main.py loop (DataLoader batch, .item() every step, "
                   "PyTorch's default Adam), run for its own network in fp32 only (— elsewhere).")  # fmt: skip
    if "compile" in names:
        out.append(f"compile graphs: {EXPECTED_GRAPHS} is what the step compiles to (dynamo does not trace "
                   "Tensor.backward(), and Optimizer.step breaks the graph around its no_grad region).")  # fmt: skip
    if any(
        c["contenders"].get(n, {}).get("peak_allocated_bytes") is not None
        for c in record["cells"]
        for n in ORDER
    ):
        out.append("[a/r MiB]: peak allocated / reserved device memory from a reset before the contender was "
                   "built (CUDA-graph pools included), less the resident data set all contenders share.")  # fmt: skip
    if flagged:
        reasons = sorted({r for _, d in flagged for r in d["break_reasons"] + d["fallback_reasons"]})
        fell = [f"{c['preset']} {c['batch']} {c['dtype']}" for c, d in flagged if d["fell_back"]]
        out.append("* compile is not compiled as expected in these cells (see 'compile graphs'). Reasons: "
                   + "; ".join(reasons))  # fmt: skip
        out.append("  cells where part of the step ran eager (fallback or recompile): "
                   + (", ".join(fell) if fell else "none"))  # fmt: skip
    out += _epoch_notes(record)
    if record.get("skipped"):
        out.append("skipped here: " + "; ".join(record["skipped"]))
    load = {k: "?" if v is None else f"{v:.1f}" for k, v in (record.get("load_avg_1min") or {}).items()}
    out.append(f"wall time of the run: {record.get('wall_s', 0):.0f} s; 1-min load average {load.get('start', '?')} "
               f"at the start, {load.get('end', '?')} at the end, on {record.get('cpu_cores')} cores")  # fmt: skip
    return out


def _epoch_notes(record: dict[str, Any]) -> list[str]:
    if "mnist_epoch" not in record:
        return []
    ep = record["mnist_epoch"]
    parts = [f"{n} {v['epoch_s']:.2f} s ({v['steps']} steps; runs " + ", ".join(f"{t:.2f}" for t in v["epoch_s_runs"])
             + ")" if "epoch_s" in v else f"{n} {v.get('error', 'n/a')}" for n, v in ep.items()]  # fmt: skip
    out = ["full MNIST epoch (60,000 samples, batch 128, fp32; fastest of the runs): " + "; ".join(parts)]
    base = ep.get("examples-loop", {}).get("epoch_s")
    if base:
        out.append("  against the examples loop's epoch: " + ", ".join(
            f"{n} {speed_words(base / v['epoch_s'])}" for n, v in ep.items()
            if n != "examples-loop" and "epoch_s" in v))  # fmt: skip
    return out
