"""A paper model of each kernel's time on an H100 SXM: an ESTIMATE from counted work, not a measurement.

Each launch the resource report records (``resources.record_step``: real arguments, grid, tiles) is turned
into counted work, and the compile of that launch (CTAs per SM from registers, warps and shared memory;
whether its PTX has asynchronous copies) turns the work into time:

- FLOPs the math needs (``flops_needed``) and FLOPs the tiles execute (``flops_padded``: every block padded
  to its tile shape, masked lanes included);
- L2 bytes: every CTA's own tile loads and stores (re-reads of a weight tile by each row block count each
  time); HBM bytes: compulsory, each tensor the kernel touches once;
- elementwise ALU work: the binarization hash, Philox noise, exp / log of the loss;
- the chain of dependent global loads one CTA waits on (``dependent_loads``): each trip of a loop whose loads
  are synchronous costs a full load latency, since the loop neither prefetches nor overlaps its trips. Loop
  trip counts come from the launch shapes (K / BLOCK_K, rows per split / BLOCK_R, partial tiles T, ...).

Model (per kernel):

    time  = launch floor + max(waves, L2 bytes / L2 rate, HBM bytes / HBM rate)
    waves: the busiest SM runs ceil(CTAs / SMs) CTAs, ctas_per_sm at a time; one wave of r resident CTAs
           takes max(dependent loads x latency + w, r x w), with w = one CTA's padded dot FLOPs at the dot's
           peak rate per SM plus its ALU ops at the ALU rate per SM: the CTA's own critical path, or the
           SM's throughput when enough CTAs share it.

Assumptions (``H100``; none of them measured here, the GPU acceptance run puts measured times beside them):
- H100 SXM: 132 SMs at 1.83 GHz (the clock NVIDIA's dense tensor peaks are quoted at); dense peaks 989 TFLOP/s
  bf16 and 494 TFLOP/s TF32 on wgmma, half of that for mma.sync, 67 TFLOP/s fp32 FMA (IEEE dots);
  ALU work at 64 ops / clock / SM (the int32 multiply rate); HBM3 3.35 TB/s; L2 5.5 TB/s.
- 2 µs per kernel inside a CUDA graph (launch floor), kernels run back to back, no overlap.
- A step whose compulsory bytes (summed over its kernels) fit in 40 MB stays L2-resident between replays:
  its kernels read only the gathered data rows from HBM. Otherwise every kernel pays its compulsory bytes.
- 500 cycles for each dependent synchronous global load (L2 hit latency under load). Whether the main
  (dot) loop waits on its loads is read from the compiled PTX (``resources.main_loop``): a main loop with any
  ``ld.global`` waits a full latency per trip (the loads of a trip are issued together, so one latency per
  trip, not per load); one whose loads are all ``cp.async`` pays it once, for its prologue. Other loops
  (partial sums, the group scan, the Adam slices) are counted as synchronous, one latency per trip.
- Op counts: the binarization hash 12 ops per pixel, Philox + Box-Muller 70 per latent element, the BCE
  and its gradient 25 per output element, Adam 20 per parameter.
- A persistent whole-step kernel (not built): the same per-stage times without the launch floors, one grid
  barrier (1 µs) between stages, one launch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import triton

from fastvae.kernels.linear_act import AMode


@dataclass(frozen=True)
class Machine:
    sms: int = 132
    clock_hz: float = 1.83e9
    launch_s: float = 2e-6
    load_latency_cycles: int = 500
    bf16_flops: float = 989e12  # dense, wgmma
    tf32_flops: float = 494e12  # dense, wgmma
    mma_sync_fraction: float = 0.5  # mma.sync against wgmma
    fma_flops: float = 67e12  # fp32 FMA: IEEE dots
    alu_ops_per_sm_clock: int = 64
    hbm_bytes_per_s: float = 3.35e12
    l2_bytes_per_s: float = 5.5e12
    grid_barrier_s: float = 1e-6
    l2_resident_bytes: float = 40e6  # a step whose tensors fit in this share of the 50 MB L2 stays there
    gemm_floor_fraction: float = 0.4  # the GEMM floor: needed FLOPs at 40 % of the dense peak


H100 = Machine()
HASH_OPS = 12  # per binarized pixel
PHILOX_OPS = 70  # per latent element drawn (randint4x + Box-Muller)
BCE_OPS = 25  # per output element (exp, log, sigmoid, the gradient)
ADAM_OPS = 20  # per parameter
LOAD_CONVERT_OPS = 4  # per gathered pixel (uint8 -> float, / 255, cast)


@dataclass
class Work:
    flops_needed: float = 0.0
    flops_padded: float = 0.0
    l2_bytes: float = 0.0
    hbm_bytes: float = 0.0
    alu_ops: float = 0.0
    cold_bytes: float = 0.0  # read from HBM even when the step is L2-resident: the gathered data rows
    dependent_loads: int = 0
    async_loop: bool = False


def _es(kw: dict, name: str) -> int:
    t = kw.get(name)
    return t.element_size() if isinstance(t, torch.Tensor) else 0


def _loop(trips: int, pipelined: bool) -> int:
    """Dependent loads of a loop of ``trips``: one per trip, or one for the prologue when pipelined."""
    return min(trips, 1) if pipelined else trips


def _layer_fwd(kw: dict, grid: tuple, pipelined: bool) -> Work:
    m, n, k, bm, bn, bk = kw["M"], kw["N"], kw["K"], kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    gm, gn = grid
    ctas, mp, np_, mode = gm * gn, gm * bm, gn * bn, kw["A_MODE"]
    ew, ey, zp = _es(kw, "w_ptr"), _es(kw, "y_ptr"), kw["ZP"]
    w = Work(async_loop=pipelined)
    if mode == AMode.LATENT:  # z finished in the prologue from T_in head partials (summed in a loop)
        t_in, ez, z, samples = kw["T_in"], _es(kw, "z_ptr"), kw["Z"], kw["SAMPLES"]
        kp = bk
        w.l2_bytes += ctas * (t_in * bm * 2 * zp * 4 + zp * bn * ew)
        w.hbm_bytes += (
            t_in * (m // samples) * 2 * zp * 4 + n * k * ew + m * (z * ez + 4) + (m // samples) * 8 * z
        )
        w.dependent_loads += 1 + t_in + 1  # rng / first partial, the partial-sum loop, the weight tile
        if kw["USE_RNG"]:
            w.alu_ops += ctas * bm * zp * PHILOX_OPS  # every feature tile redraws its rows' noise
    else:
        trips, kp = triton.cdiv(k, bk), triton.cdiv(k, bk) * bk
        ea = 1 if mode == 1 else _es(kw, "a_ptr")
        w.l2_bytes += ctas * (bm * kp * ea + bn * kp * ew)
        w.hbm_bytes += m * k * ea + n * k * ew
        w.dependent_loads += _loop(trips, pipelined) + 1
        if mode == AMode.GATHER:  # cursor -> batch indices -> pixels; x written once, by the first tile
            ex = _es(kw, "x_out_ptr")
            w.cold_bytes += m * k  # the batch's uint8 rows of the resident data set (47 MB for MNIST)
            w.l2_bytes += m * k * ex
            w.hbm_bytes += m * k * ex
            w.dependent_loads += 2
            w.alu_ops += ctas * bm * kp * (LOAD_CONVERT_OPS + (HASH_OPS if kw["BINARIZE"] else 0))
    w.flops_needed += 2 * m * n * k
    w.flops_padded += 2 * mp * np_ * kp
    w.l2_bytes += m * n * ey
    w.hbm_bytes += m * n * ey
    if kw["HEAD"]:  # this tile's share of the head GEMM (2Z outputs, padded to 2 ZP)
        z = kw["Z"]
        w.flops_needed += 2 * m * n * 2 * z
        w.flops_padded += 2 * mp * np_ * 2 * zp
        w.l2_bytes += ctas * (2 * zp * bn * ew + bm * 2 * zp * 4)
        w.hbm_bytes += 2 * z * n * ew + gn * m * 2 * zp * 4
        w.dependent_loads += 1
    return w


def _output(kw: dict, grid: tuple, pipelined: bool) -> Work:
    m, d, k, bm, bn, bk = kw["M"], kw["D"], kw["K"], kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    gm, gn = grid
    ctas, trips = gm * gn, triton.cdiv(k, bk)
    eh, ew, ex, ed = _es(kw, "hd_ptr"), _es(kw, "w_ptr"), _es(kw, "x_ptr"), _es(kw, "dlogits_ptr")
    kp = trips * bk
    return Work(
        flops_needed=2 * m * d * k,
        flops_padded=2 * gm * bm * gn * bn * kp,
        l2_bytes=ctas * (bm * kp * eh + bn * kp * ew) + m * d * (ex + ed) + gn * m * 4,
        hbm_bytes=m * k * eh + d * k * ew + (m // kw["SAMPLES"]) * d * ex + m * d * ed + gn * m * 4,
        alu_ops=gm * bm * gn * bn * BCE_OPS,
        dependent_loads=_loop(trips, pipelined) + 1,
        async_loop=pipelined,
    )


def _layer_bwd(kw: dict, grid: tuple, pipelined: bool) -> Work:
    # dx (M, K) = dy (M, N) @ W (N, K): BLOCK_N is the reduction chunk, BLOCK_K the output tile
    m, n, k, bm, bn, bk = kw["M"], kw["N"], kw["K"], kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    gm, gk = grid
    ctas, trips = gm * gk, triton.cdiv(n, bn)
    edy, ew, edx = _es(kw, "dy_ptr"), _es(kw, "w_ptr"), _es(kw, "dx_ptr")
    eh = _es(kw, "h_ptr")
    np_, mp, kp = trips * bn, gm * bm, gk * bk
    w = Work(
        flops_needed=2 * m * n * k,
        flops_padded=2 * mp * kp * np_,
        l2_bytes=ctas * (bm * np_ * edy + np_ * bk * ew) + m * k * (eh + edx),
        hbm_bytes=m * n * edy + n * k * ew + m * k * (eh + edx),
        dependent_loads=_loop(trips, pipelined) + 1,
        async_loop=pipelined,
    )
    if kw["DZ"]:
        z, zp = kw["Z"], kw["ZP"]
        w.flops_needed += 2 * m * k * z
        w.flops_padded += 2 * mp * kp * zp
        w.l2_bytes += ctas * (bk * zp * _es(kw, "wz_ptr") + bm * zp * 4)
        w.hbm_bytes += k * z * _es(kw, "wz_ptr") + gk * m * zp * 4
        w.dependent_loads += 1
    if kw["FINALIZE"]:  # the first tile's CTAs sum T_rec BCE partials in a loop
        w.dependent_loads += kw["T_rec"]
        w.l2_bytes += kw["T_rec"] * m * 4
        w.hbm_bytes += kw["T_rec"] * m * 4
    return w


def _latent_bwd(kw: dict, grid: tuple, pipelined: bool) -> Work:
    m, h, z, t, samples = kw["M"], kw["H"], kw["Z"], kw["T"], kw["K"]
    bm, bn, zp = kw["BLOCK_M"], kw["BLOCK_N"], kw["ZP"]
    gm, gn = grid
    ctas = gm * gn
    k = samples if kw["MULTI"] else 1
    ew, eh = _es(kw, "wh_ptr"), _es(kw, "h_ptr")
    w = Work(
        flops_needed=2 * m * h * 2 * z,
        flops_padded=2 * gm * bm * gn * bn * 2 * zp,
        l2_bytes=ctas * (k * t * bm * zp * 4 + bm * 2 * z * 4 + 2 * zp * bn * ew + bm * bn * eh) + m * h * eh,
        hbm_bytes=t * m * k * zp * 4 + m * 2 * z * 4 + 2 * z * h * ew + 2 * m * h * eh,
        dependent_loads=2 + k * t + 1,  # mulv / s, the partial sums (per sample), W_head and h
    )
    if kw["USE_RNG"]:
        w.alu_ops += ctas * bm * k * zp * PHILOX_OPS  # every feature tile regenerates its rows' noise
    return w


def _wgrad(kw: dict, grid: tuple, pipelined: bool, plan) -> Work:
    from fastvae.kernels.weight_grad import ADAM_ROWS

    bn, bk, br, s = kw["BLOCK_N"], kw["BLOCK_K"], kw["BLOCK_R"], kw["S"]
    es = _es(kw, "ws_ptr")
    w = Work(async_loop=pipelined)
    longest = 0
    for g in plan.grad_groups():
        m = g.m or plan.rows
        per_split = triton.cdiv(triton.cdiv(m, s), br) * br
        tn, tk = triton.cdiv(g.n, bn), triton.cdiv(g.k, bk)
        trips = triton.cdiv(min(per_split, m), br)
        longest = max(longest, trips)
        a_bytes = 0 if (g.label_div and kw["PRECISION"] == "ieee") else bk * es
        w.flops_needed += 2 * m * g.n * g.k
        w.flops_padded += 2 * tn * bn * tk * bk * s * per_split
        w.l2_bytes += tn * tk * s * trips * br * (bn * es + a_bytes) + s * g.n * g.k * 4
        w.hbm_bytes += m * g.n * es + (0 if g.label_div else m * g.k * es) + s * g.n * g.k * 4
    w.dependent_loads = (
        (kw["G"] - 1) + 1 + _loop(longest, pipelined) + 1
    )  # group scan, table row, loop, store
    if kw["FUSED_ADAM"]:  # gradient read back, p, m, v read and written (+ the bf16 copy), slice by slice
        p = kw["P"]
        per = 4 + 12 + 12 + (2 if kw["WRITE_LOWP"] else 0)
        w.l2_bytes += p * per
        w.hbm_bytes += p * per
        w.alu_ops += p * ADAM_OPS
        w.dependent_loads += 1 + bn // ADAM_ROWS
    return w


def _split_sum(kw: dict, grid: tuple, pipelined: bool) -> Work:
    p, s = kw["P"], kw["S"]
    per = s * 4 + ((4 + 12 + 12 + (2 if kw["WRITE_LOWP"] else 0)) if kw["FUSED_ADAM"] else 4)
    return Work(l2_bytes=p * per, hbm_bytes=p * per, alu_ops=p * ADAM_OPS, dependent_loads=s + 2)


def _finalize(kw: dict, grid: tuple, pipelined: bool) -> Work:
    m, t, k = kw["M"], kw["T"], kw["K"] if kw["MULTI"] else 1
    passes = 2 if kw["IW"] else 1
    return Work(
        l2_bytes=passes * t * m * k * 4 + m * k * 8,
        hbm_bytes=t * m * k * 4 + m * k * 8,
        alu_ops=m * k * 20,
        dependent_loads=2 + passes * k * t,
    )


_MODELS = {
    "_layer_fwd_kernel": _layer_fwd,
    "_bernoulli_output_kernel": _output,
    "_layer_bwd_kernel": _layer_bwd,
    "_latent_bwd_kernel": _latent_bwd,
    "_split_sum_kernel": _split_sum,
    "_finalize_loss_kernel": _finalize,
}


def kernel_work(launch, plan, pipelined: bool) -> Work:
    """The counted work of one recorded launch (``pipelined``: its main loop has no synchronous load)."""
    if launch.name == "_grouped_wgrad_kernel":
        return _wgrad(launch.kwargs, launch.grid, pipelined, plan)
    if launch.name not in _MODELS:
        raise ValueError(f"no work model for {launch.name}")
    return _MODELS[launch.name](launch.kwargs, launch.grid, pipelined)


def dot_rate(dot: str, dtype: torch.dtype, machine: Machine = H100) -> float:
    """FLOP/s of the whole GPU for a dot compiled to ``dot`` in ``dtype`` (operands: bf16, or fp32 as TF32)."""
    if dot == "FMA":
        return machine.fma_flops
    peak = machine.bf16_flops if dtype == torch.bfloat16 else machine.tf32_flops
    return peak * (machine.mma_sync_fraction if dot == "mma" else 1.0)


def l2_resident(works: list[Work], machine: Machine = H100) -> bool:
    """Does the step's working set stay in L2 between replays? Bounded by the sum of every kernel's
    compulsory bytes (a tensor written by one kernel and read by the next counts twice: an overestimate)."""
    return sum(w.hbm_bytes - w.cold_bytes for w in works) <= machine.l2_resident_bytes


def estimate_kernel(
    work: Work,
    ctas: int,
    ctas_per_sm: int,
    dot: str,
    dtype: torch.dtype,
    resident: bool = False,
    machine: Machine = H100,
) -> dict:
    """ESTIMATE of one kernel's time from its counted work and occupancy (see the module docstring);
    ``resident``: the step's working set stays in L2, so only ``cold_bytes`` come from HBM."""
    sms, cps = machine.sms, max(ctas_per_sm, 1)
    per_sm = math.ceil(ctas / sms)  # CTAs on the busiest SM
    rate = dot_rate(dot, dtype, machine) if dot != "none" else math.inf
    cta_work = (work.flops_padded / ctas) / (rate / sms) + (work.alu_ops / ctas) / (
        machine.alu_ops_per_sm_clock * machine.clock_hz
    )
    latency = work.dependent_loads * machine.load_latency_cycles / machine.clock_hz
    full, last = divmod(per_sm, cps)
    waves_s = full * max(latency + cta_work, cps * cta_work)
    if last:
        waves_s += max(latency + cta_work, last * cta_work)
    l2_s = work.l2_bytes / machine.l2_bytes_per_s
    hbm_s = (work.cold_bytes if resident else work.hbm_bytes) / machine.hbm_bytes_per_s
    parts = {"waves": waves_s, "l2": l2_s, "hbm": hbm_s}
    bound = max(parts, key=parts.get)
    if bound == "waves":
        bound = "latency" if latency >= cta_work * min(cps, per_sm) else "compute"
    body = max(parts.values())
    return dict(
        asdict(work),
        waves=math.ceil(per_sm / cps),
        latency_us=round(latency * 1e6, 3),
        cta_work_us=round(cta_work * 1e6, 3),
        l2_us=round(l2_s * 1e6, 3),
        hbm_us=round(hbm_s * 1e6, 3),
        body_us=round(body * 1e6, 3),
        time_us=round((machine.launch_s + body) * 1e6, 3),
        bound=bound,
        measured_us=None,  # filled in beside the estimate by a GPU run
    )


def step_summary(kernels: list[dict], dtype: torch.dtype, machine: Machine = H100) -> dict:
    """Per-step totals of the per-kernel estimates: the kernel sequence, a persistent whole-step kernel
    (the same stage bodies, one launch, a grid barrier between stages), and the GEMM floor."""
    est = [k["estimate"] for k in kernels]
    total = sum(e["time_us"] for e in est)
    bodies = sum(e["body_us"] for e in est)
    persistent = machine.launch_s * 1e6 + bodies + (len(est) - 1) * machine.grid_barrier_s * 1e6
    needed = sum(e["flops_needed"] for e in est)
    peak = (
        machine.fma_flops if all(k["dot"] in ("FMA", "none") for k in kernels) else dot_rate("wgmma", dtype)
    )
    floor = needed / (machine.gemm_floor_fraction * peak) * 1e6
    return dict(
        l2_resident=sum(e["hbm_bytes"] - e["cold_bytes"] for e in est) <= machine.l2_resident_bytes,
        kernels=len(est),
        total_us=round(total, 2),
        launch_floor_us=round(len(est) * machine.launch_s * 1e6, 2),
        persistent_us=round(persistent, 2),
        flops_needed=needed,
        flops_padded=sum(e["flops_padded"] for e in est),
        gemm_floor_us=round(floor, 2),
        vs_gemm_floor=round(total / floor, 2) if floor else None,
    )
