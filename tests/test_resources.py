"""The resource report (``fastvae.kernels.resources``): every launch of the step each preset trains, compiled for
sm_90 as the launchers specialise it (ptxas -v), with the paper-model estimate (``fastvae.kernels.estimate``).

The matrix is presets x B in {128, 1024, 16384} x {fp32, tf32, bf16}: 45 cells, a few hundred compiles. CI
compiles a representative subset (every preset at B = 128 in the three dtypes, where the CTA rule applies, and
the TF32 cells that spilled before the 16-row chunks of the 128 x 128 weight gradients); the whole matrix is
the ``slow`` test. Both check the same rules:
- no spill bytes and no stack frame in any kernel; at least one CTA per SM;
- bf16 large GEMMs on tensor cores;
- at B = 128, >= 96 CTAs in every kernel carrying a 784 x H GEMM (forward, input gradient, weight gradient);
- kernel counts per step: 6 (1 hidden layer, conditional too), 10 (iwae), 11 (iwae-k5) at B = 128, one
  more (the split-K sum) at most at larger batches;
- the first (gathering) layer's main loop has no synchronous global load in its PTX (all cp.async);
- the step is the one the preset trains (binarization, labels, K samples read from the recorded launches
  against the preset's training settings, written out independently here);
- the estimate counts the step's needed FLOPs as the network's shapes say (an independent count below).
These are compiled, not timed; the estimate is a model (no time is asserted).
"""

import json
import os
import subprocess
import sys

import pytest

from fastvae.config import PRESET_TRAINING, PRESETS

BINARIZED = {"pytorch-example": False, "paper": False, "iwae": True, "iwae-k5": True}  # as the presets train
KERNELS_AT_128 = {"pytorch-example": 6, "paper": 6, "iwae": 10, "iwae-k5": 11, "pytorch-example+y10": 6}
CI_CELLS = ["pytorch-example:16384:tf32", "iwae-k5:1024:tf32", "pytorch-example+y10:16384:tf32"]


def run_report(tmp_path, args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.json"
    proc = subprocess.run([sys.executable, "-m", "fastvae.kernels.resources", *args, "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=3600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def needed_flops(preset, batch):
    """FLOPs of one step's GEMMs from the network's shapes: forward of every layer, input gradient of every
    layer but the first, weight gradient of every layer (the decoder side on B K rows); a conditional model
    adds its two label weights' gradients (the label enters the forward as a gathered bias, not a GEMM)."""
    name, conditional = preset.removesuffix("+y10"), preset.endswith("+y10")
    cfg = PRESETS[name]
    b, bk, d, z = batch, batch * cfg.k, 784, cfg.latent_dim
    hs = list(cfg.hidden_dims)
    enc = list(zip([d, *hs], hs)) + [(hs[-1], 2 * z)]  # (in, out) of each encoder-side GEMM, head included
    dec = list(zip([z, *hs[::-1]], [*hs[::-1], d]))
    mac = lambda pairs: sum(i * o for i, o in pairs)  # noqa: E731
    fwd = b * mac(enc) + bk * mac(dec)
    dgrad = b * mac(enc[1:]) + bk * mac(dec)
    wgrad = b * mac(enc) + bk * mac(dec) + (b * hs[0] * 10 + bk * hs[-1] * 10 if conditional else 0)
    return 2 * (fwd + dgrad + wgrad)


def check_cells(cells):
    for c in cells:
        where = f"{c['preset']} B={c['batch']} {c['dtype']}"
        name = c["preset"].removesuffix("+y10")
        ks = c["kernels"]
        for k in ks:
            assert k["spill_bytes"] == 0 and k["stack_bytes"] == 0, (where, k["kernel"], k["flags"])
            assert k["ctas_per_sm"] >= 1, (where, k["kernel"])
            if c["dtype"] == "bf16" and k["large_gemm"]:
                assert k["dot"] in ("mma", "wgmma"), (where, k["kernel"])  # tensor cores
            est = k["estimate"]
            assert est["flops_padded"] >= est["flops_needed"] and est["time_us"] >= 2.0, (where, k["kernel"])
        # the step as trained: binarization from the preset's training settings, labels, K
        first = ks[0]["flags"]
        assert (
            first["A_MODE"] == 1 and first["BINARIZE"] == BINARIZED[name] == PRESET_TRAINING[name]["binarize"]
        )
        assert c["binarize"] == BINARIZED[name], where
        assert ks[0]["loop_sync_loads"] == 0, where  # the gather's pixels come by cp.async: no load chain
        assert first["LABEL"] == c["preset"].endswith("+y10"), where
        out = [k for k in ks if k["kernel"] == "_bernoulli_output_kernel"]
        assert len(out) == 1 and out[0]["flags"]["SAMPLES"] == PRESETS[name].k, (
            where
        )  # the decoder's B K rows
        multi = PRESETS[name].k > 1 or PRESETS[name].objective == "iwae"
        assert any(k["kernel"] == "_finalize_loss_kernel" for k in ks) == multi, where
        assert ks[-1]["flags"]["ADVANCE"], where  # the step's last kernel advances cursor and RNG
        limit = KERNELS_AT_128[c["preset"]]
        if c["batch"] == 128:
            assert len(ks) == limit, (where, [k["kernel"] for k in ks])
            large = [k for k in ks if k["large_gemm"]]
            assert len(large) >= 4, where  # first layer fwd, output fwd, output input-grad, weight gradients
            for k in large:
                assert k["ctas"] >= 96, (where, k["kernel"], k["grid"])
        else:
            assert len(ks) <= limit + 1, (where, [k["kernel"] for k in ks])
        assert c["estimate"]["flops_needed"] == needed_flops(c["preset"], c["batch"]), where
        assert c["estimate"]["total_us"] == pytest.approx(sum(k["estimate"]["time_us"] for k in ks), abs=0.05)


def test_resource_report_subset(tmp_path):
    """Every preset at B = 128 in fp32, TF32 and bf16, and the TF32 cells that used to spill."""
    cells, _ = run_report(tmp_path, ["--matrix", "--batch", "128"])
    assert len(cells) == 5 * 3
    more, out = run_report(tmp_path, [a for c in CI_CELLS for a in ("--cell", c)])
    assert [f"{c['preset']}:{c['batch']}:{c['dtype']}" for c in more] == CI_CELLS
    check_cells(cells + more)
    assert "ESTIMATE pytorch-example B=16384 tf32: step" in out


@pytest.mark.slow
def test_resource_report_whole_matrix(tmp_path):
    """presets x B in {128, 1024, 16384} x {fp32, tf32, bf16}."""
    cells, _ = run_report(tmp_path, ["--matrix"])
    assert len(cells) == 5 * 3 * 3
    check_cells(cells)


def test_bad_cell_is_one_line():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastvae.kernels.resources", "--cell", "pytorch-example:0:fp32"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "PRESET:BATCH:DTYPE" in proc.stderr.strip().splitlines()[-1]


def test_estimate_waves_latency_and_memory_bounds():
    """The paper model's arithmetic on hand-made work (no compile): latency-bound waves, throughput-bound
    waves, and a memory-bound kernel, against the formulas written out here."""
    import torch

    from fastvae.kernels.estimate import H100, Work, estimate_kernel

    clock, lat, sms = H100.clock_hz, H100.load_latency_cycles, H100.sms
    # 264 CTAs at 1 CTA/SM: 2 waves of one 10-load chain each, no work
    e = estimate_kernel(Work(dependent_loads=10), 264, 1, "none", torch.float32)
    assert e["waves"] == 2 and e["bound"] == "latency"
    assert e["time_us"] == pytest.approx((H100.launch_s + 2 * 10 * lat / clock) * 1e6, abs=1e-3)
    # the same CTAs at 2 CTAs/SM: one wave
    assert estimate_kernel(Work(dependent_loads=10), 264, 2, "none", torch.float32)["waves"] == 1
    # compute: 132 CTAs of FMA work, one per SM: each CTA's FLOPs at one SM's share of the FMA peak
    flops = 132 * 1e9
    e = estimate_kernel(Work(flops_padded=flops, dependent_loads=1), 132, 4, "FMA", torch.float32)
    assert e["bound"] == "compute"
    assert e["body_us"] == pytest.approx((1e9 / (H100.fma_flops / sms) + lat / clock) * 1e6, rel=1e-3)
    # memory: HBM bytes count unless the step is L2-resident, then only the cold (gathered) bytes
    w = Work(hbm_bytes=3.35e9, cold_bytes=0.0, l2_bytes=1.0, dependent_loads=1)
    assert estimate_kernel(w, 132, 1, "none", torch.float32)["body_us"] == pytest.approx(1000.0, rel=1e-3)
    assert estimate_kernel(w, 132, 1, "none", torch.float32, resident=True)["bound"] == "latency"


def test_main_loop_reads_the_ptx_loop_comments():
    from fastvae.kernels.resources import main_loop

    ptx = "\n".join([
        "\tld.global.b64 { %rd1 }, [ %rd2 + 0 ];",  # outside any loop
        "$L__BB0_2:                              // =>This Inner Loop Header: Depth=1",
        "\tcp.async.cg.shared.global [ %r1 + 0 ], [ %rd3 + 0 ], 0x10, %r2;",
        "\t@%p7 ld.global.b16 { %rs1 }, [ %rd23 + 0 ];",
        "$L__BB0_4:                              //   in Loop: Header=BB0_2 Depth=1",
        "\t@%p8 ld.global.b16 { %rs2 }, [ %rd24 + 0 ];",
        "\t@%p15 bra \t$L__BB0_2;",
        "$L__BB0_3:                              // %._crit_edge",
        "\tld.global.b32 { %r9 }, [ %rd5 + 0 ];",
        "$L__BB0_7:                              // =>This Inner Loop Header: Depth=1",
        "\tbra.uni \t$L__BB0_7;",
    ])  # fmt: skip
    assert main_loop(ptx) == {"loop_sync_loads": 2, "loop_async_copies": 1}
    assert main_loop("ld.global.b32 { %r9 }, [ %rd5 + 0 ];") == {"loop_sync_loads": 0, "loop_async_copies": 0}
