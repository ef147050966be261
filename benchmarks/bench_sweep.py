"""CPU benchmark of a sweep: N models as one batched step (``fastvae sweep``) against N single-model steps.

    python benchmarks/bench_sweep.py [--threads 1] [--ns 1,4,16] [--preset pytorch-example] [--out FILE.json]

Both contenders are the project's own steps on MNIST at the preset's batch: the sweep's step
(``fastvae.sweeps._Sweep._step``: every model's keyed batch and noise, one vmap-ed objective and backward,
one stacked Adam update) for N = 1, 4, 16 models, and the trainer's eager step (``fastvae.trainer``: keyed
batch and noise, objective, backward, finiteness check, fused Adam) of one model, which N sequential
``fastvae train`` runs repeat N times. Timed interleaved in one process (each round times every contender
in turn, after a pause and an untimed step), the median per step; with --threads 1 the clock is this
thread's CPU time (torch computes in it), which other processes on a shared machine do not inflate as
they do the wall clock. Reported: models x steps per second.
Writes a new JSON record (--out, or cpu-sweep-<date>-<time>.json in the current folder; an existing file
is refused, so nothing in benchmarks/results is overwritten).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_parts import cpu_flags  # noqa: E402
from bench_sampler import cpu_name  # noqa: E402


def _sweep_step(cfg, n: int, root: Path):
    """A callable doing one step of an N-model sweep (the real ``_Sweep``, set up in ``root``)."""
    import dataclasses

    import torch

    from fastvae.distributed import DistInfo
    from fastvae.schedules import epoch_permutation
    from fastvae.sweeps import _Sweep
    from fastvae.trainer import _StopSignals

    seeds = list(range(n))
    s = _Sweep(dataclasses.replace(cfg, out=str(root / f"sweep{n}")), DistInfo(device=torch.device("cpu")),
               _StopSignals(), [], (None, seeds, None))  # fmt: skip
    perms = torch.stack([epoch_permutation(m.cfg.seed, 0, s.n_train, s.device) for m in s.members])
    b, state = cfg.batch_size, {"i": 0}

    def step() -> None:
        i = state["i"] % s.spe
        s._step(0, perms[:, i * b : (i + 1) * b])
        s.step += 1
        state["i"] += 1

    return step


def _single_step(cfg, root: Path):
    """A callable doing one step of ``fastvae train`` (the trainer's eager step)."""
    import dataclasses

    import torch

    from fastvae.distributed import DistInfo
    from fastvae.schedules import epoch_permutation
    from fastvae.trainer import _Run, _StopSignals

    run = _Run(dataclasses.replace(cfg, out=str(root / "single"), engine=False), DistInfo(device=torch.device("cpu")),
               _StopSignals(), [])  # fmt: skip
    run.stepper.load_epoch(epoch_permutation(cfg.seed, 0, run.n_train, run.device), 0, 0)
    state = {"i": 0}

    def step() -> None:
        run.stepper.step(state["i"] % run.steps_per_epoch, state["i"])
        state["i"] += 1

    return step


def _medians(fns: dict, rounds: int, per_round: int, clock) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(0.05)
            fn()  # untimed: warm caches and thread pools
            for _ in range(per_round):
                t = clock()
                fn()
                times[name].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ns", default="1,4,16", help="model counts of the batched step")
    p.add_argument("--preset", default="pytorch-example")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON record, a new file")
    a = p.parse_args(argv)
    out = Path(a.out or time.strftime("cpu-sweep-%Y%m%d-%H%M%S.json"))
    if out.exists():
        raise SystemExit(f"{out}: exists; choose a new --out")
    import torch

    from fastvae.config import TrainConfig

    torch.set_num_threads(a.threads)
    ns = [int(v) for v in a.ns.split(",")]
    cfg = TrainConfig(preset=a.preset, device="cpu", backend="torch", progress=False, threads=a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        fns = {"train (one model)": _single_step(cfg, Path(tmp))}
        fns.update({f"sweep N={n}": _sweep_step(cfg, n, Path(tmp)) for n in ns})
        # --threads 1: torch computes in this thread, so its CPU time is the work itself, whatever else the
        # (shared) machine runs; the wall clock is reported beside it
        clock = time.thread_time if a.threads == 1 else time.perf_counter
        med = _medians(fns, a.rounds, a.per_round, clock)
    single = med.pop("train (one model)")
    rows = [{"n": n, "sweep_step_s": med[f"sweep N={n}"], "sweep_model_steps_per_s": n / med[f"sweep N={n}"],
             "sequential_model_steps_per_s": 1 / single, "speedup": single * n / med[f"sweep N={n}"]}
            for n in ns]  # fmt: skip
    doc = {"cpu": cpu_name(), "flags": cpu_flags(), "threads": a.threads, "torch": torch.__version__,
           "python": platform.python_version(), "preset": a.preset, "batch": cfg.batch_size,
           "clock": clock.__name__, "train_step_s": single, "rounds": a.rounds, "per_round": a.per_round, "rows": rows}  # fmt: skip
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{doc['cpu']} ({', '.join(doc['flags'])}), {a.threads} thread(s), {a.preset} batch {cfg.batch_size}, "
          f"clock {clock.__name__}")  # fmt: skip
    print(
        f"{'N':>4} {'sweep step s':>13} {'sweep models*steps/s':>21} {'N x train models*steps/s':>25} {'speedup':>8}"
    )
    for r in rows:
        print(f"{r['n']:>4} {r['sweep_step_s']:>13.4f} {r['sweep_model_steps_per_s']:>21.1f} "
              f"{r['sequential_model_steps_per_s']:>25.1f} {r['speedup']:>7.2f}x")  # fmt: skip
    print(f"record: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
