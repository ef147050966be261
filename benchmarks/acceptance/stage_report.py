"""Stage results of benchmarks/gpu_acceptance.sh, from the files the stage's steps left in RUN_DIR.

    python stage_report.py correctness RUN_DIR   # -> correctness.json, correctness.md
    python stage_report.py quality RUN_DIR       # -> quality.json, quality.md
    python stage_report.py readme RUN_DIR        # -> README.md (stage 6)

Only what the files say is reported: a step whose file is missing is "did not finish", never a number.
correctness and quality exit 1 when a check failed (a failed test, a sanitizer error, a fused error past
its bound, a training run that failed), so the summary marks the stage; the last line printed says why.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _json(path: Path) -> Any:
    """The file as JSON, or its last line as JSON (a command's --json output after progress lines)."""
    text = (_read(path) or "").strip()
    for candidate in (text, text.splitlines()[-1] if text else ""):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    return None


def _rc(run: Path, name: str) -> int | None:
    text = _read(run / f"{name}.rc")
    return int(text) if text and text.strip().lstrip("-").isdigit() else None


def pytest_result(run: Path, name: str) -> dict[str, Any]:
    """Counts and failures from the junit XML; from the -v log's PASSED/FAILED lines when the run was
    killed before it wrote the XML (marked partial)."""
    rc, log = _rc(run, name), _read(run / f"{name}.log") or ""
    if log.startswith("skipped"):
        return {"status": log.strip()}
    if not log and not (run / f"{name}.xml").exists():
        return {"status": "did not run"}
    try:
        root = ET.parse(run / f"{name}.xml").getroot()
    except (OSError, ET.ParseError):
        words = [ln.split(" ")[1] if " " in ln else "" for ln in log.splitlines() if "::" in ln]
        return {"rc": rc, "partial": True, "passed": words.count("PASSED"), "failed": words.count("FAILED")
                + words.count("ERROR"), "skipped": words.count("SKIPPED"), "seconds": None,
                "failures": [{"test": ln.split(" ")[0], "message": "see the log"} for ln in log.splitlines()
                             if "::" in ln and (" FAILED" in ln or " ERROR" in ln)]}  # fmt: skip
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                           "message": (bad.get("message") or "")[:300]})  # fmt: skip
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return {"rc": rc, "passed": passed, "failed": n["failures"] + n["errors"], "skipped": n["skipped"],
            "failures": failed, "seconds": float(suite.get("time", 0))}  # fmt: skip


def tf32_result(run: Path) -> dict[str, Any]:
    doc = _json(run / "tf32.json")
    if doc is None:
        return {"rc": _rc(run, "tf32"), "status": "did not finish"}
    out: dict[str, Any] = {"rc": _rc(run, "tf32"), "device": doc["device"], "modes": {}}
    for r in doc["results"]:
        errs = r["errors"]
        worst = max(errs, key=lambda k: errs[k].get("fused_rel", errs[k]["torch_rel"]) / errs[k]["bound"])
        out["modes"][r["mode"]] = {
            "fused": r["fused"], "worst_param": worst, **errs[worst],
            "outside_bound": [k for k, e in errs.items() if e.get("within_bound") is False],
            "outside_flat": [k for k, e in errs.items() if e.get("within_flat") is False],
        }
    return out


def sanitizer_result(run: Path) -> dict[str, Any]:
    log = _read(run / "sanitizer-memcheck.log") or ""
    if log.startswith("skipped"):
        return {"status": log.strip()}
    summary = [ln.strip() for ln in log.splitlines() if "ERROR SUMMARY" in ln]
    return {"rc": _rc(run, "sanitizer-memcheck"), "error_summary": summary[-1] if summary else None}


def resources_result(run: Path) -> dict[str, Any]:
    doc = _json(run / "resources.json")
    if doc is None:
        return {"rc": _rc(run, "resources"), "status": "did not finish"}
    return {"rc": _rc(run, "resources"), "configs": [f"{d['preset']} B={d['batch']} {d['dtype']}" for d in doc],
            "kernels": sum(len(d["kernels"]) for d in doc),
            "spill_bytes": sum(k["spill_bytes"] for d in doc for k in d["kernels"])}  # fmt: skip


def correctness(run: Path) -> int:
    res = {"pytest": pytest_result(run, "pytest-gpu"), "pytest_rest": pytest_result(run, "pytest-rest"), "tf32": tf32_result(run), "sanitizer": sanitizer_result(run),
           "resources": resources_result(run)}  # fmt: skip
    (run / "correctness.json").write_text(json.dumps(res, indent=2) + "\n")
    lines, problems = _correctness_lines(res)
    (run / "correctness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    verdict = "; ".join(problems) if problems else "every check that ran passed"
    (run / "correctness.note").write_text(verdict)
    print(verdict)
    return 1 if problems else 0


def _correctness_lines(res: dict[str, Any]) -> tuple[list[str], list[str]]:
    tf, san, rs = res["tf32"], res["sanitizer"], res["resources"]
    lines, problems = [], []
    for key, what in (("pytest", "GPU-marked kernel/engine tests"), ("pytest_rest", "the other kernel/engine tests")):
        py = res[key]
        if "passed" in py:
            secs = "killed before the end: counted from the log" if py.get("partial") else f"{py['seconds']:.1f} s"
            lines.append(f"- {what}: {py['passed']} passed, {py['failed']} failed, {py['skipped']} skipped ({secs})")
            lines += [f"  - FAILED {f['test']}: {f['message'][:200]}" for f in py["failures"]]
            if py["failed"]:
                problems.append(f"{py['failed']} test(s) failed")
            if py.get("partial") and key == "pytest":
                problems.append("the GPU-marked tests were killed at their limit")
        else:
            lines.append(f"- {what}: {py.get('status', 'did not run')}")
    for mode, m in tf.get("modes", {}).items():
        fused = f"fused {m['fused_rel']:.2e}, " if "fused_rel" in m else f"fused {m['fused']}, "
        lines.append(f"- {mode}: worst parameter {m['worst_param']}: {fused}PyTorch's own {m['torch_rel']:.2e}, "
                     f"bound {m['bound']:.2e} (flat {m['flat_tol']:.0e}); outside the bound: "
                     f"{', '.join(m['outside_bound']) or 'none'}; outside the flat tolerance: {', '.join(m['outside_flat']) or 'none'}")  # fmt: skip
        if m["outside_bound"]:
            problems.append(f"{mode} fused error past the bound")
    if "modes" not in tf:
        lines.append(f"- TF32/bf16 error: {tf['status']} (exit {tf['rc']})")
        problems.append("the TF32 measurement did not finish")
    if "status" in san:
        lines.append(f"- compute-sanitizer memcheck: {san['status']}")
    else:
        lines.append(f"- compute-sanitizer memcheck (small step): exit {san['rc']}; {san['error_summary'] or 'no summary line'}")
        if san["rc"] != 0:
            problems.append("memcheck reported errors or did not finish")
    if "configs" in rs:
        lines.append(f"- resource report (sm_90, compiled): {', '.join(rs['configs'])}: {rs['kernels']} kernels, "
                     f"{rs['spill_bytes']} spill bytes (resources.json)")  # fmt: skip
    else:
        lines.append(f"- resource report: {rs['status']} (exit {rs['rc']})")
        problems.append("the resource report did not finish")
    return lines, problems


def _metrics(run: Path, name: str) -> list[dict[str, Any]]:
    text = _read(run / f"metrics-{name}.jsonl") or ""
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def _train(run: Path, name: str) -> dict[str, Any]:
    wall, rows = _json(run / f"train-{name}.wall.json"), _metrics(run, name)
    if wall is None:
        log = (_read(run / f"train-{name}.log") or "did not run").strip().splitlines()
        return {"status": log[-1] if log else "did not run"}
    out = {"rc": wall["rc"], "wall_s": wall["wall_s"], "time_limit_s": wall.get("time_limit_s")}
    if rows:
        last = rows[-1]
        out.update(epochs=last["epoch"], steps=last["step"], test_neg_elbo=last["test_neg_elbo"],
                   train_seconds=sum(r["seconds"] for r in rows))  # fmt: skip
    return out


def quality(run: Path) -> int:
    res = {f"pytorch-example {b}": _train(run, f"pe-{b}") for b in ("triton", "torch")}
    res["iwae"] = _train(run, "iwae")
    ev = _json(run / "eval-iwae.json")
    res["iwae_eval"] = ev if isinstance(ev, dict) else {"rc": _rc(run, "eval-iwae"), "status": "did not finish"}
    (run / "quality.json").write_text(json.dumps(res, indent=2) + "\n")
    lines, problems = ["| run | epochs | steps | test −ELBO (nats) | train s (metrics) | wall s |", "|---|---|---|---|---|---|"], []
    for name in ("pytorch-example triton", "pytorch-example torch", "iwae"):
        r = res[name]
        if "test_neg_elbo" in r:
            lines.append(f"| {name} | {r['epochs']} | {r['steps']} | {r['test_neg_elbo']:.3f} | {r['train_seconds']:.1f} | {r['wall_s']} |")
        else:
            lines.append(f"| {name} | — | — | — | — | {r.get('status') or 'exit ' + str(r.get('rc'))} |")
        if r.get("rc") not in (None, 0):
            problems.append(f"{name} exited {r['rc']}")
    e = res["iwae_eval"]
    lines += ["", f"iwae IW NLL: {e['iw_nll']:.3f} nats (k = {e['iw_k']}, {e['n']} test images)" if "iw_nll" in e
              else f"iwae IW NLL: {e.get('status')} (exit {e.get('rc')})"]  # fmt: skip
    (run / "quality.md").write_text("\n".join(lines) + "\n")
    verdict = "; ".join(problems) if problems else "every run that started finished"
    (run / "quality.note").write_text(verdict)
    print("\n".join(lines) + "\n" + verdict)
    return 1 if problems else 0


FILES = {"summary.md": "stage table and results, rewritten at every stage start and end",
         "env.json": "versions, nvidia-smi fields, where fastvae was imported from", "install.log": "the offline install",
         "correctness.json": "tests, TF32/bf16 errors, memcheck, resource report", "tf32.json": "every parameter's errors",
         "resources.json": "sm_90 resource report (compiled, not timed)", "record.json": "the record stage, every cell",
         "quality.json": "the training runs and the IW NLL", "pytest-gpu.log": "the GPU tests' output"}  # fmt: skip


def kernel_tables(run: Path) -> list[str]:
    """fastvae's per-kernel device times (record.json, torch.profiler) beside the resource report's
    compiled sm_90 figures for the same preset, batch and dtype (resources.json), matched by kernel name."""
    rec, res = _json(run / "record.json") or {}, _json(run / "resources.json") or []
    out = []
    for cell in rec.get("cells", []):
        prof = cell["contenders"].get("fastvae", {}).get("profile")
        if not prof:
            continue
        compiled: dict[str, list] = {}
        for d in res:
            if (d["preset"], d["batch"], d["dtype"]) == (cell["preset"], cell["batch"], cell["dtype"]):
                for k in d["kernels"]:
                    compiled.setdefault(k["kernel"], []).append(k)
        out += ["", f"fastvae kernels, {cell['preset']} B={cell['batch']} {cell['dtype']}: measured µs per step "
                f"(torch.profiler, {prof['steps']} steps) beside the compiled sm_90 resources"
                + ("" if compiled else " (no resource report for this cell)"), "",
                "| kernel | launches/step | µs/step | µs/launch | estimate µs/launch (paper model) | registers | CTAs | CTAs/SM | waves | dot |",
                "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for k in prof["kernels"]:
            c = compiled.get(k["name"], [])
            col = lambda f, c=c: "/".join(str(r[f]) for r in c) or "—"  # one value per launch of that kernel
            est = "/".join(str(r["estimate"]["time_us"]) for r in c if "estimate" in r) or "—"
            out.append(f"| {k['name'][:60]} | {k['per_step']:g} | {k['us_per_step']:.2f} | {k['us_per_launch']:.2f} | "
                       f"{est} | {col('registers')} | {col('ctas')} | {col('ctas_per_sm')} | {col('waves')} | {col('dot')} |")  # fmt: skip
    return out


def readme(run: Path) -> int:
    """README.md of the results folder: the summary at copy time (what ran, what did not) and the files."""
    summary = (_read(run / "summary.md") or "(no summary.md)").split("\n", 1)[-1]
    env = _json(run / "env.json") or {}
    head = [f"# GPU acceptance record: {run.name}", "",
            "Generated by `bash benchmarks/gpu_acceptance.sh` (issue 24) at its stage 6; every figure below was "
            "measured in that call (the stage JSON files hold them all). Versions: "
            f"torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, python {env.get('python')}, "
            f"install {env.get('install_mode')}."]  # fmt: skip
    files = [f"- `{f}`: {d}" for f, d in FILES.items() if (run / f).exists()]
    kernels = kernel_tables(run)
    if kernels:
        summary += "\n\n## Per-kernel times beside the resource report\n" + "\n".join(kernels)
    text = "\n".join(head) + "\n" + summary + "\n\n## Files\n\n" + "\n".join(files) + "\n"
    (run / "README.md").write_text(text)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("correctness", "quality", "readme"):
        print("usage: stage_report.py correctness|quality|readme RUN_DIR", file=sys.stderr)
        return 2
    return {"correctness": correctness, "quality": quality, "readme": readme}[argv[0]](Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
