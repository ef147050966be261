"""CPU sampling benchmark: the torch-free ONNX sampler (fp32, int8) against the PyTorch decoder.

    python benchmarks/bench_sampler.py [--run DIR] [--threads N] [--out FILE.json]

All three are measured side by side in one run, in alternating rounds, on the same CPU, with the same thread count: for
batches 1, 64, 1024, 16384 the median latency of one call that draws z and decodes it (the sampler's numpy generator,
torch.randn for PyTorch under inference_mode), and samples/s from that median. Then
the cold start: a new Python process that imports, loads the model and draws its first 64 samples,
timed from outside (interpreter start included), median of 5. Without --run, a pytorch-example model is
trained for one epoch first (speed does not depend on how well it is trained).

The record goes to a new file (--out, or cpu-sampler-<date>-<time>.json in the current folder; an existing
file is refused, so the committed records in benchmarks/results/ are kept), rewritten after every batch
size, so a late failure keeps what was measured. --run and --out are checked before anything is timed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCHES = (1, 64, 1024, 16384)


def _interleaved_medians(fns: dict, batch: int, rounds: int = 6) -> dict[str, float]:
    """Median seconds per call of each contender, timed in alternating blocks so that drift in the
    machine's speed hits every contender alike. Each block starts after a pause and two untimed calls:
    onnxruntime's and torch's worker threads spin for a while after a call, and with as many threads as
    cores a still-spinning pool would slow the next contender."""
    per_round = max(3, min(60, int(8000 / batch)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(0.05)
            fn()
            fn()
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _cold_start(code: str, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, cwd=tempfile.gettempdir()
        )
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="trained run directory (default: train pytorch-example for 1 epoch)")
    p.add_argument(
        "--threads", type=int, default=None, help="threads for every contender (default: physical cores)"
    )
    p.add_argument("--out", default=None,
                   help="JSON record, a new file (default: cpu-sampler-<date>-<time>.json in the current folder)")  # fmt: skip
    a = p.parse_args(argv)
    from fastvae.errors import FastVAEError

    try:
        return _bench(a)
    except FastVAEError as exc:  # a bad --run or --out: one line, before minutes of work where possible
        print(f"bench_sampler: error: {exc}", file=sys.stderr)
        return 2


def _bench(a: argparse.Namespace) -> int:
    import torch

    from fastvae import load_model, train
    from fastvae.bench.report import new_record_path, save_record
    from fastvae.export import Sampler, export_decoder
    from fastvae.export.runtime import physical_cores

    out = new_record_path(a.out, "cpu-sampler").resolve()
    if a.run:  # absolute: the cold-start processes run in another folder
        a.run = str(Path(a.run).resolve())
        load_model(a.run, "cpu")  # a missing or broken run fails here, not after minutes of timing
    work = Path(tempfile.mkdtemp(prefix="fastvae-bench-"))
    run = a.run or str(
        train(epochs=1, out=str(work / "run"), device="cpu", progress=False, backend="torch").out.resolve()
    )
    threads = a.threads or physical_cores()
    torch.set_num_threads(threads)
    fp32 = export_decoder(run, work / "fp32.onnx").path
    int8 = export_decoder(run, work / "int8.onnx", int8=True)
    s32, s8 = Sampler(fp32, threads=threads), Sampler(int8.path, threads=threads)
    model = load_model(run, "cpu")
    zdim = model.config.latent_dim

    def torch_sample(n):
        with torch.inference_mode():
            return torch.sigmoid(model.decode(torch.randn(n, zdim)))

    rows = []
    record = {
        "cpu": cpu_name(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "date": time.strftime("%Y-%m-%d"),
        "model": "pytorch-example decoder 20-400-784",
        "int8_max_prob_error": float(int8.metadata["int8_max_prob_error"]),
        "int8_test_elbo_change": float(int8.metadata["int8_test_elbo_change"]),
        "rows": rows,
        "complete": False,
    }
    for b in BATCHES:
        # no per-call seed: each side continues its own generator's stream, as torch.randn does
        med = _interleaved_medians(
            {
                "torch": lambda b=b: torch_sample(b),
                "fp32": lambda b=b: s32.sample(b),
                "int8": lambda b=b: s8.sample(b),
            },
            b,
        )
        t_torch, t32, t8 = med["torch"], med["fp32"], med["int8"]
        rows.append({
            "batch": b,
            "torch_ms": t_torch * 1e3, "onnx_fp32_ms": t32 * 1e3, "onnx_int8_ms": t8 * 1e3,
            "torch_samples_per_s": b / t_torch, "onnx_fp32_samples_per_s": b / t32, "onnx_int8_samples_per_s": b / t8,
            "fp32_vs_torch": t_torch / t32, "int8_vs_torch": t_torch / t8, "int8_vs_fp32": t32 / t8,
        })  # fmt: skip
        save_record(out, record)
    cold_onnx = _cold_start(
        f"import fastvae.export.sample as s; s.Sampler({str(fp32)!r}, threads={threads}).sample(64, 0)"
    )
    cold_torch = _cold_start(
        f"import torch, fastvae; torch.set_num_threads({threads}); m = fastvae.load_model({run!r});"
        f"torch.sigmoid(m.decode(torch.randn(64, {zdim})))"
    )
    record["cold_start_s"] = {"onnx_sampler": cold_onnx, "torch": cold_torch}
    record["complete"] = True
    save_record(out, record)

    _print_table(record)
    print(f"record: {out}")
    return 0


def _print_table(record: dict) -> None:
    from fastvae.bench.report import speed_words

    print(
        f"\nCPU: {record['cpu']}, {record['threads']} threads; torch {record['torch']}, onnxruntime {record['onnxruntime']}"
    )
    print("| batch | torch eager | onnx fp32 | onnx int8 | onnx fp32 vs torch | int8 vs torch | int8 vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in record["rows"]:
        print(f"| {r['batch']} | {r['torch_samples_per_s']:,.0f}/s ({r['torch_ms']:.3f} ms) "
              f"| {r['onnx_fp32_samples_per_s']:,.0f}/s ({r['onnx_fp32_ms']:.3f} ms) "
              f"| {r['onnx_int8_samples_per_s']:,.0f}/s ({r['onnx_int8_ms']:.3f} ms) "
              f"| {speed_words(r['fp32_vs_torch'])} | {speed_words(r['int8_vs_torch'])} "
              f"| {speed_words(r['int8_vs_fp32'])} |")  # fmt: skip
    cold = record["cold_start_s"]
    print(f"cold start (new process, import + load + 64 samples): onnx sampler {cold['onnx_sampler']:.3f} s, "
          f"torch {cold['torch']:.3f} s")  # fmt: skip
    print(f"int8: max probability error {record['int8_max_prob_error']:.3g}, "
          f"test -ELBO change {record['int8_test_elbo_change']:+.3f} nats")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
