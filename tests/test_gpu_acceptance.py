"""benchmarks/gpu_acceptance.sh rehearsed on the CPU (issue 24): its plumbing, not GPU figures.

The script runs every stage under its own timeout and rewrites $OUT/summary.md at every stage start and
end. These tests force a stage to fail and another to hang (ACCEPT_FORCE_FAIL / ACCEPT_FORCE_HANG), kill a
whole call at its limit, simulate a setuptools that cannot read the pyproject, and check what is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_acceptance.sh"
STAGES = ("env", "correctness", "record", "sweep", "quality", "copy")
sys.path.insert(0, str(REPO / "benchmarks" / "acceptance"))

import stage_report  # noqa: E402


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None, outer: float | None = None):
    """The script as the device would run it, with $OUT, work and results folders under tmp_path."""
    full = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **(env or {})}
    cmd = ["bash", str(SCRIPT), "--dry-run", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "res"), *args]
    if outer is not None:  # the device tool's call limit: the whole call killed
        cmd = ["timeout", str(outer), *cmd]
    return subprocess.run(cmd, env=full, capture_output=True, text=True, cwd=tmp_path, timeout=900)


def _rows(summary: str) -> dict[str, str]:
    """stage -> status column of the summary's table."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 4 and cells[1].isdigit() and cells[2].split(" ")[0] in STAGES:
            rows[cells[2].split(" ")[0]] = cells[3]
    return rows


def _run_dir(tmp_path: Path) -> Path:
    (d,) = (tmp_path / "work").glob("dryrun-*")
    return d


def test_a_hung_stage_and_a_failed_stage_leave_the_others_intact(tmp_path):
    env = {"ACCEPT_FORCE_HANG": "sweep", "ACCEPT_LIMIT_sweep": "3", "ACCEPT_FORCE_FAIL": "quality"}
    r = _run(tmp_path, "--stages", "sweep,quality,copy", env=env)  # the hang would sleep 100,000 s
    assert r.returncode == 0, r.stderr
    rows = _rows((tmp_path / "out" / "summary.md").read_text())
    assert rows["sweep"] == "**timed out**"
    assert rows["quality"] == "**failed** (exit 1)"
    assert rows["copy"] == "ok"
    assert rows["env"] == rows["record"] == "not selected"
    (dest,) = (tmp_path / "res").glob("dryrun-*")
    readme = (dest / "README.md").read_text()
    assert "**timed out**" in readme and "forced failure" in readme  # the failure's last log line
    assert _rows((dest / "summary.md").read_text())["copy"] == "ok"  # rewritten after the copy finished
    with tarfile.open(tmp_path / "out" / "acceptance.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        assert {"sweep.log", "quality.log", "summary.md", "README.md"} <= names
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "acceptance.tar.gz", "summary.md"]


@pytest.mark.slow
def test_a_call_killed_at_its_limit_still_leaves_a_readable_summary(tmp_path):
    env = {"ACCEPT_FORCE_HANG": "sweep", "ACCEPT_LIMIT_sweep": "12"}
    r = _run(tmp_path, "--stages", "sweep,copy", env=env, outer=6)
    assert r.returncode == 124
    summary = (tmp_path / "out" / "summary.md").read_text()
    rows = _rows(summary)
    assert rows["sweep"].startswith("running")
    assert "the call ended during this stage" in summary
    assert rows["copy"] == "pending"
    with tarfile.open(tmp_path / "out" / "acceptance.tar.gz") as tar:  # complete, not half written
        assert any(n.endswith("summary.md") for n in tar.getnames())


def test_install_falls_back_when_setuptools_cannot_read_the_pyproject(tmp_path):
    # An old setuptools (< 77 cannot read `license = "MIT AND ..."`): its PEP 517 hooks fail as that does.
    fake = tmp_path / "old-setuptools" / "setuptools"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "61.0.0"\n')
    (fake / "build_meta.py").write_text(
        "def _fail(*a, **k):\n"
        "    raise ValueError('FAKE-OLD-SETUPTOOLS: invalid pyproject.toml config: project.license')\n"
        + "".join(f"{h} = _fail\n" for h in ("get_requires_for_build_editable", "prepare_metadata_for_build_editable",
                                             "build_editable", "get_requires_for_build_wheel",
                                             "prepare_metadata_for_build_wheel", "build_wheel", "build_sdist"))
    )  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))
    r = _run(tmp_path, "--stages", "env", env={"PYTHONPATH": pythonpath})
    assert r.returncode == 0, r.stderr
    run = _run_dir(tmp_path)
    assert "FAKE-OLD-SETUPTOOLS" in (run / "install.log").read_text()
    info = json.loads((run / "env.json").read_text())
    assert info["install_mode"] == "shadow" and info["setuptools"] == "61.0.0"
    shadow = tmp_path / "work" / "shadow" / "fastvae"
    assert info["fastvae_paths"] == {"fastvae": str(shadow), "fastvae.kernels": str(shadow / "kernels"),
                                     "fastvae.export": str(shadow / "export")}  # fmt: skip
    assert _rows((tmp_path / "out" / "summary.md").read_text())["env"] == "ok"


@pytest.mark.slow
def test_the_whole_dry_run(tmp_path):
    env = {"ACCEPT_FORCE_HANG": "sweep", "ACCEPT_LIMIT_sweep": "3", "ACCEPT_FORCE_FAIL": "correctness"}
    r = _run(tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    rows = _rows((tmp_path / "out" / "summary.md").read_text())
    assert rows == {"env": "ok", "correctness": "**failed** (exit 1)", "record": "ok", "sweep": "**timed out**",
                    "quality": "ok", "copy": "ok"}  # fmt: skip
    (dest,) = (tmp_path / "res").glob("dryrun-*")
    rec = json.loads((dest / "record.json").read_text())
    assert rec["dry_run"] and rec["device_type"] == "cpu"
    eager = rec["cells"][0]["contenders"]["eager"]
    assert eager["median_ms"] > 0 and eager["launches_source"] == "traced"
    assert [a["mode"] for a in rec["cells"][0]["compile_attempts"]][0] == "max-autotune-no-cudagraphs"
    assert "fastvae (needs CUDA)" in rec["skipped"]
    assert rec["mnist_epoch"]["examples-loop"]["steps"] == 8
    quality = json.loads((dest / "quality.json").read_text())
    assert quality["pytorch-example torch"]["rc"] == 0 and quality["pytorch-example torch"]["steps"] == 20
    assert "skipped" in quality["pytorch-example triton"]["status"]
    assert quality["iwae_eval"]["iw_k"] == 5
    readme = (dest / "README.md").read_text()
    assert "## 3 record" in readme and "## 5 quality" in readme and "## Files" in readme


# ---- the pieces, on constructed inputs -----------------------------------------------------------


def test_a_killed_pytest_is_counted_from_its_verbose_log(tmp_path):
    (tmp_path / "pytest-gpu.log").write_text(
        "tests/test_kernels.py::test_a PASSED [ 10%]\ntests/test_kernels.py::test_b[x] FAILED [ 20%]\n"
        "tests/test_engine.py::test_c SKIPPED (needs a CUDA GPU) [ 30%]\ntests/test_engine.py::test_d PASSED\n"
    )
    (tmp_path / "pytest-gpu.rc").write_text("124\n")
    res = stage_report.pytest_result(tmp_path, "pytest-gpu")
    assert (res["partial"], res["passed"], res["failed"], res["skipped"], res["rc"]) == (True, 2, 1, 1, 124)
    assert res["failures"][0]["test"] == "tests/test_kernels.py::test_b[x]"
    assert stage_report.pytest_result(tmp_path, "pytest-rest") == {"status": "did not run"}


def test_a_fused_error_past_its_bound_fails_the_stage(tmp_path):
    errs = {"loss": {"torch_rel": 1e-4, "flat_tol": 5e-3, "bound": 5e-3, "fused_rel": 1e-3, "within_flat": True,
                     "within_bound": True},
            "decoder.0.weight": {"torch_rel": 3e-3, "flat_tol": 5e-3, "bound": 6e-3, "fused_rel": 6.8e-3,
                                 "within_flat": False, "within_bound": False}}  # fmt: skip
    doc = {"device": "X", "results": [{"mode": "tf32", "rows": 1000, "fused": "measured", "errors": errs}]}
    (tmp_path / "tf32.json").write_text(json.dumps(doc))
    res = stage_report.tf32_result(tmp_path)["modes"]["tf32"]
    assert res["worst_param"] == "decoder.0.weight" and res["outside_bound"] == ["decoder.0.weight"]
    assert stage_report.correctness(tmp_path) == 1
    assert "tf32 fused error past the bound" in (tmp_path / "correctness.note").read_text()


def test_per_kernel_times_sit_beside_the_resource_report(tmp_path):
    prof = {"steps": 20, "kernels": [{"name": "_layer_fwd_kernel", "per_step": 2, "us_per_step": 9.0, "us_per_launch": 4.5},
                                     {"name": "void at::native::foo", "per_step": 1, "us_per_step": 1.0, "us_per_launch": 1.0}]}  # fmt: skip
    rec = {"cells": [{"preset": "pytorch-example", "batch": 128, "dtype": "fp32",
                      "contenders": {"fastvae": {"profile": prof}, "eager": {}}}]}  # fmt: skip
    k = {"ctas": 104, "ctas_per_sm": 8, "waves": 0.1, "dot": "FMA"}
    res = [{"preset": "pytorch-example", "batch": 128, "dtype": "fp32",
            "kernels": [{"kernel": "_layer_fwd_kernel", "registers": 62, "estimate": {"time_us": 5.5}, **k},
                        {"kernel": "_layer_fwd_kernel", "registers": 40, "estimate": {"time_us": 6.5}, **k}]},
           {"preset": "pytorch-example", "batch": 128, "dtype": "bf16", "kernels": [{"kernel": "_layer_fwd_kernel", "registers": 99, **k}]}]  # fmt: skip
    (tmp_path / "record.json").write_text(json.dumps(rec))
    (tmp_path / "resources.json").write_text(json.dumps(res))
    rows = [ln for ln in stage_report.kernel_tables(tmp_path) if ln.startswith("| _layer") or ln.startswith("| void")]
    assert rows[0] == "| _layer_fwd_kernel | 2 | 9.00 | 4.50 | 5.5/6.5 | 62/40 | 104/104 | 8/8 | 0.1/0.1 | FMA/FMA |"
    assert rows[1].startswith("| void at::native::foo | 1 | 1.00 | 1.00 | — | — |")


def test_a_compile_mode_past_its_deadline_is_dropped_for_later_cells(monkeypatch):
    from fastvae import bench
    from fastvae.bench import contenders as bench_contenders
    from fastvae.bench import gpu as bench_gpu

    def fake_build(name, *args):
        if bench_contenders.COMPILE_MODE == "max-autotune-no-cudagraphs":
            t = time.monotonic()
            while time.monotonic() - t < 30:  # a compile that would outlast the deadline
                pass
        return "contender", {}, None

    monkeypatch.setattr(bench, "_build", fake_build)
    modes = list(bench_gpu.COMPILE_MODES)
    c, entry, _, attempts = bench_gpu.build_compile(None, None, None, 128, "fp32", 0, modes, 0.5)
    assert c == "contender" and entry["compile_mode"] == "reduce-overhead"
    assert [(a["mode"], a["result"]) for a in attempts] == [
        ("max-autotune-no-cudagraphs", "missed the deadline"), ("reduce-overhead", "compiled")]
    assert modes == ["reduce-overhead", "default"]
