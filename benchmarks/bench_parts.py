"""CPU benchmark of every exported part (decoder, encoder, scorer) against PyTorch eager doing the same work.

    python benchmarks/bench_parts.py --run DIR [--threads N] [--iw K] [--out FILE.json]

For each part and batch 1, 64, 1024: the median seconds of one call of PyTorch eager (the same module
the exporter traces, under inference_mode), onnxruntime fp32, int8 with full-range weights and int8 with
``reduce_range``, timed in alternating rounds with the same thread count (``torch.set_num_threads`` and
onnxruntime's intra-op threads), inputs made beforehand (the same z / x / eps for every contender).
Then int8 accuracy with and without reduce_range against fp32 (what decides the default), a bf16
reference point (torch eager in bf16: oneDNN on AVX-512 bf16; onnxruntime's CPU provider has no bf16
Gemm), and the anomaly AUC of the scorer (scrambled digits against held-out test digits) from PyTorch,
ONNX fp32 and ONNX int8. Writes a new record (--out, or cpu-parts-<date>-<time>.json in the current folder;
an existing file is refused, so benchmarks/results/cpu-parts.json is kept), rewritten after each section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampler import _interleaved_medians, cpu_name  # noqa: E402

BATCHES = (1, 64, 1024)


def cpu_flags() -> list[str]:
    want = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in want if f in have]
    except OSError:
        pass
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="trained run directory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iw", type=int, default=100, help="K of the IW scorer used for the AUC")
    p.add_argument("--bench-iw", type=int, default=10, help="K of the IW scorer that is timed")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--auc-n", type=int, default=1000, help="images per class for the AUC")
    p.add_argument("--out", default=None,
                   help="JSON record, a new file (default: cpu-parts-<date>-<time>.json in the current folder)")  # fmt: skip
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    from fastvae.errors import FastVAEError

    try:
        return _bench(a)
    except FastVAEError as exc:  # a bad --run or --out: one line, before any timing
        print(f"bench_parts: error: {exc}", file=sys.stderr)
        return 2


def _bench(a: argparse.Namespace) -> int:
    import onnxruntime as ort
    import torch

    from fastvae.bench.report import new_record_path, save_record
    from fastvae.export import Scorer
    from fastvae.export import onnx_export as ox
    from fastvae.runs import load_run
    from fastvae.toolkit import anomaly_scores, roc_auc

    out = new_record_path(a.out, "cpu-parts").resolve()
    a.run = str(Path(a.run).resolve())
    torch.set_num_threads(a.threads)
    run = load_run(a.run)
    model = run.model.float().eval()
    cfg = run.config
    tmp = Path(tempfile.mkdtemp(prefix="fastvae-bench-parts-"))
    record: dict = {
        "machine": {
            "cpu": cpu_name(), "flags": cpu_flags(), "cores_used": a.threads, "os_cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "shared": "yes: other engineers' jobs ran on the same 2 cores",
        },
        "run": {"path": str(a.run), "preset": cfg.preset, "test_elbo": run.doc.get("final_test_neg_elbo")},
        "threads": a.threads,
    }  # fmt: skip

    def session(path):
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads = a.threads, 1
        o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), sess_options=o, providers=["CPUExecutionProvider"])

    # ---- export each part in fp32, int8 and int8 reduce_range ------------------------------------------
    specs = {"decoder": 0, "encoder": 0, "scorer": 0, f"scorer_iw{a.bench_iw}": a.bench_iw}
    files, accuracy = {}, {}
    for name, k in specs.items():
        part = name.split("_")[0]
        for variant, kw in (
            ("fp32", {}),
            ("int8", {"int8": True}),
            ("int8_rr", {"int8": True, "reduce_range": True}),
        ):
            res = ox.export_part(a.run, tmp / f"{name}-{variant}.onnx", part, iw=k, **kw)
            files[name, variant] = res.path
            if variant != "fp32":
                accuracy.setdefault(name, {})[variant] = {
                    m: v for m, v in res.metadata.items() if m.startswith("int8_")
                }
        print(f"exported {name}", flush=True)
    record["int8_accuracy"] = accuracy
    save_record(out, record)

    # ---- throughput ---------------------------------------------------------------------------------
    x_all = run.test_images(0, max(BATCHES)).float().flatten(1)
    rows_all = torch.arange(len(x_all))
    throughput = []
    for name, k in specs.items():
        part = name.split("_")[0]
        module = {"decoder": ox._ProbDecoder, "encoder": ox._Encoder}.get(part)
        module = ox._Scorer(model, k) if part == "scorer" else module(model)
        sessions = {v: session(files[name, v]) for v in ("fp32", "int8", "int8_rr")}
        for b in BATCHES:
            if part == "decoder":
                feeds = {"z": np.random.default_rng(0).standard_normal((b, cfg.latent_dim), dtype=np.float32)}
            else:
                feeds = {"x": x_all[:b].numpy()}
                if part == "scorer":
                    feeds.update(ox.scorer_noise(run.seed, rows_all[:b], cfg.latent_dim, k))
            targs = [torch.from_numpy(v) for v in feeds.values()]

            def torch_fn(targs=targs, module=module):
                with torch.inference_mode():
                    return module(*targs)

            fns = {"torch": torch_fn}
            for v, s in sessions.items():
                fns[v] = lambda s=s, feeds=feeds: s.run(None, feeds)
            med = _interleaved_medians(fns, b * max(1, k), rounds=a.rounds)
            row = {"part": name, "batch": b, **{f"{c}_ms": 1e3 * t for c, t in med.items()}}
            row.update({f"{c}_per_s": b / t for c, t in med.items()})
            throughput.append(row)
            print(
                json.dumps({kk: round(v, 4) if isinstance(v, float) else v for kk, v in row.items()}),
                flush=True,
            )
    record["throughput"] = throughput
    save_record(out, record)

    # ---- bf16 reference point: torch eager (oneDNN) decoder and encoder at batch 1024 --------------------
    bf = {}
    z = torch.randn(1024, cfg.latent_dim, generator=torch.Generator().manual_seed(0))
    x = x_all[:1024]
    m16 = run.model.__class__(cfg)
    m16.load_state_dict(model.state_dict())
    m16 = m16.bfloat16().eval()
    with torch.inference_mode():
        fns = {
            "dec_fp32": lambda: model.decode(z), "dec_bf16": lambda: m16.decode(z.bfloat16()),
            "enc_fp32": lambda: model.encode(x), "enc_bf16": lambda: m16.encode(x.bfloat16()),
        }  # fmt: skip
        med = _interleaved_medians(fns, 1024, rounds=a.rounds)
        p32, p16 = torch.sigmoid(model.decode(z)), torch.sigmoid(m16.decode(z.bfloat16()).float())
        mu32, mu16 = model.encode(x)[0], m16.encode(x.bfloat16())[0].float()
    bf = {f"{kk}_ms": 1e3 * v for kk, v in med.items()}
    bf["decoder_bf16_max_prob_error"] = float((p16 - p32).abs().max())
    bf["encoder_bf16_max_mu_error"] = float((mu16 - mu32).abs().max())
    try:  # onnxruntime: a graph cast to bf16 (the CPU provider has no bf16 Gemm/MatMul kernels)
        import onnx
        from onnx import TensorProto, helper

        g = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])], "bf16",
            [helper.make_tensor_value_info("a", TensorProto.BFLOAT16, [None, 20]),
             helper.make_tensor_value_info("b", TensorProto.BFLOAT16, [20, 400])],
            [helper.make_tensor_value_info("c", TensorProto.BFLOAT16, [None, 400])],
        )  # fmt: skip
        mm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        mm.ir_version = 10
        onnx.save(mm, str(tmp / "bf16.onnx"))
        session(tmp / "bf16.onnx")
        bf["onnxruntime_bf16_matmul"] = "loads"
    except Exception as exc:
        bf["onnxruntime_bf16_matmul"] = f"not available: {str(exc).splitlines()[0][:200]}"
    record["bf16"] = bf
    save_record(out, record)
    print(json.dumps(bf), flush=True)

    # ---- anomaly AUC: scrambled digits against held-out test digits -----------------------------------
    n = a.auc_n
    normal = run.test_images(0, n, raw=True).float().flatten(1)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(cfg.flat_dim))
    other = run.test_images(n, 2 * n, raw=True).float().flatten(1)
    half = cfg.flat_dim // 2  # lower half of the image only: a harder case where the AUC is not 1
    half_perm = torch.cat(
        [
            torch.arange(half),
            half + torch.from_numpy(np.random.default_rng(1).permutation(cfg.flat_dim - half)),
        ]
    )
    sets = {"scrambled": other[:, perm], "half_scrambled": other[:, half_perm]}
    scorer_files = {}
    for v, kw in (("fp32", {}), ("int8", {"int8": True})):
        scorer_files[v] = ox.export_part(a.run, tmp / f"auc-{v}.onnx", "scorer", iw=a.iw, **kw).path
    scores: dict = {}
    ne, iw = anomaly_scores(model, normal, a.iw)  # row-keyed noise, seed 0, rows 0.. of each set
    scores["torch", "normal"] = {"neg_elbo": ne, "iw_nll": iw}
    for s_name, xs in sets.items():
        ne, iw = anomaly_scores(model, xs, a.iw)
        scores["torch", s_name] = {"neg_elbo": ne, "iw_nll": iw}
    for v, path in scorer_files.items():
        sc = Scorer(path, threads=a.threads)
        scores[v, "normal"] = sc.score(normal.numpy(), seed=0)
        for s_name, xs in sets.items():
            scores[v, s_name] = sc.score(xs.numpy(), seed=0)
    auc = {}
    for s_name in sets:
        for metric in ("neg_elbo", "iw_nll"):
            auc[f"{s_name}/{metric}"] = {
                c: roc_auc(np.asarray(scores[c, "normal"][metric], np.float64), np.asarray(scores[c, s_name][metric], np.float64))
                for c in ("torch", "fp32", "int8")
            }  # fmt: skip
    diffs = {
        c: float(max(np.abs(np.asarray(scores[c, "normal"]["neg_elbo"]) - scores["torch", "normal"]["neg_elbo"]).max(),
                     np.abs(np.asarray(scores[c, "normal"]["iw_nll"]) - scores["torch", "normal"]["iw_nll"]).max()))
        for c in ("fp32", "int8")
    }  # fmt: skip
    record["auc"] = {
        "n_per_class": n,
        "iw_k": a.iw,
        "seed": 0,
        "auc": auc,
        "max_abs_score_diff_vs_torch": diffs,
    }
    print(json.dumps(record["auc"], indent=1), flush=True)
    record["date"] = time.strftime("%Y-%m-%d %H:%M")
    record["complete"] = True
    save_record(out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
