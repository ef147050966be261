"""The ``fastvae`` command line (also ``python -m fastvae``).

Every command turns bad input into one line on stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"fastvae: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# ---- typed flag values ------------------------------------------------------------------------------
def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def _float_range(lo: float, lo_open: bool = False) -> Callable[[str], float]:
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(
                f"expected a finite number {'>' if lo_open else '>='} {lo:g}, got {s!r}"
            )
        return v

    parse.__name__ = "number"
    return parse


def _dims(s: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in s.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return dims


# ---- commands ---------------------------------------------------------------------------------------
def train_config_from_args(a: argparse.Namespace):
    """The TrainConfig a ``fastvae train`` command line describes (validated; raises FastVAEError)."""
    from fastvae.trainer import TrainConfig

    return TrainConfig(
        preset=a.preset,
        data=a.data,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        lr_schedule=a.lr_schedule,
        seed=a.seed,
        device=a.device,
        out=a.out,
        backend=a.backend,
        binarize=a.binarize,
        max_steps=a.max_steps,
        time_limit=a.time_limit,
        checkpoint_every=a.checkpoint_every,
        keep_checkpoints=a.keep_checkpoints,
        resume=a.resume,
        overwrite=a.overwrite,
        kl_warmup_steps=a.kl_warmup_steps,
        kl_warmup_epochs=a.kl_warmup_epochs,
        dtype=a.dtype,
        engine=a.engine,
        cuda_graph=a.cuda_graph,
        free_bits=a.free_bits,
        progress=not a.quiet,
        hidden_dims=a.hidden_dims,
        latent_dim=a.latent_dim,
        activation=a.activation,
        likelihood=a.likelihood,
        beta=a.beta,
    )


def cmd_train(a: argparse.Namespace) -> int:
    from fastvae.trainer import train

    result = train(train_config_from_args(a))
    if result.metrics and result.rank == 0:
        print(
            f"test -ELBO {result.metrics[-1]['test_loss']:.3f} nats after {result.step} steps; run in {result.out}"
        )
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from fastvae.backends import resolve_device
    from fastvae.checkpoint import load_model, read_run_config
    from fastvae.data import DeviceData, load_dataset
    from fastvae.evaluate import elbo_stats, importance_weighted_nll

    device = resolve_device(a.device)
    config, doc = read_run_config(a.run)
    model = load_model(a.run, device)
    train_cfg = doc.get("train", {})
    binarize = bool(train_cfg.get("binarize", False))
    seed = int(train_cfg.get("seed", 0))
    data = load_dataset(a.data or train_cfg.get("data", "mnist"), config.likelihood)
    if data.data_shape != config.data_shape:
        raise_error(f"{a.data}: samples have shape {data.data_shape}, the model expects {config.data_shape}")
    test = DeviceData(data.x_test, device)
    stats = elbo_stats(model, test, seed=seed, binarize=binarize, limit=a.limit)
    result = {
        "n": stats.n,
        "test_elbo": stats.loss,
        "test_rec": stats.rec,
        "test_kl": stats.kl,
        "active_units": stats.active_units,
    }
    if a.iw > 0:
        result["iw_k"] = a.iw
        result["iw_nll"] = importance_weighted_nll(
            model, test, a.iw, seed=seed, binarize=binarize, limit=a.limit, progress=not a.json
        )
    if a.json:
        print(json.dumps(result))
    else:
        print(
            f"test -ELBO   {stats.loss:.3f} nats  (reconstruction {stats.rec:.3f}, KL {stats.kl:.3f}; "
            f"{stats.n} samples, {stats.active_units} active units)"
        )
        if a.iw > 0:
            print(f"IW NLL k={a.iw}  {result['iw_nll']:.3f} nats")
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    import torch

    from fastvae.backends import resolve_device
    from fastvae.checkpoint import load_model
    from fastvae.images import save_grid

    device = resolve_device(a.device)
    model = load_model(a.run, device)
    g = torch.Generator(device=device)
    g.manual_seed(a.seed)
    x = model.sample(a.n, generator=g, temperature=a.temperature).float().cpu().numpy()
    _check_out(a.out)
    save_grid(x, model.config.data_shape, a.out, ncol=a.ncol or math.ceil(math.sqrt(a.n)))
    print(f"wrote {a.n} samples to {a.out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from fastvae.export.onnx_export import export_decoder

    res = export_decoder(a.run, a.out, int8=a.int8)
    extra = ""
    if a.int8:
        extra = (
            f"; int8 max probability error {res.metadata['int8_max_prob_error']}, "
            f"test -ELBO change {float(res.metadata['int8_test_elbo_change']):+.3f} nats"
        )
    print(f"wrote {res.path} (onnxruntime vs PyTorch max |delta| {res.max_abs_diff:.1e}{extra})")
    return 0


def _load_run(a: argparse.Namespace):
    """(model, model config, run doc, test images as float (N, D), test labels or None) of a run."""
    import torch

    from fastvae.backends import resolve_device
    from fastvae.checkpoint import load_model, read_run_config
    from fastvae.data import load_dataset, unit_float

    device = resolve_device(getattr(a, "device", "auto"))
    config, doc = read_run_config(a.run)
    model = load_model(a.run, device)
    data = load_dataset(doc.get("train", {}).get("data", "mnist"), config.likelihood)
    return model, config, doc, torch.from_numpy(unit_float(data.x_test)), data.y_test


def cmd_interpolate(a: argparse.Namespace) -> int:
    import torch

    from fastvae.images import save_grid
    from fastvae.toolkit import interpolate

    model, config, _, x, _ = _load_run(a)
    for name, i in (("--a", a.a), ("--b", a.b)):
        if not 0 <= i < len(x):
            raise_error(f"{name} {i} is not a test image index (0..{len(x) - 1})")
    _check_out(a.out)
    path = interpolate(model, x[a.a], x[a.b], a.steps).cpu()
    row = torch.cat([x[a.a][None], path, x[a.b][None]]).numpy()  # image a, the line, image b
    save_grid(row, config.data_shape, a.out, ncol=len(row), scale=3)
    print(
        f"wrote {a.out}: test image {a.a}, {a.steps} decoded points from mu({a.a}) to mu({a.b}), test image {a.b}"
    )
    return 0


def cmd_manifold(a: argparse.Namespace) -> int:
    from fastvae.images import save_grid
    from fastvae.toolkit import kl_per_dim_on, manifold, most_active_dims

    model, config, _, x, _ = _load_run(a)
    _check_out(a.out)
    if config.latent_dim == 2:
        dims = (0, 1)
    else:
        dims = tuple(most_active_dims(kl_per_dim_on(model, x[:2000]), 2))
    images, _ = manifold(model, a.n, dims)
    save_grid(images.cpu().numpy(), config.data_shape, a.out, ncol=a.n, scale=2)
    other = "" if config.latent_dim == 2 else f" (the two most active of {config.latent_dim}; the rest at 0)"
    print(f"wrote {a.out}: {a.n}x{a.n} grid over latent dims {dims[0]} (down) and {dims[1]} (across){other}")
    return 0


def cmd_latents(a: argparse.Namespace) -> int:
    from fastvae.toolkit import posterior_means, project_2d

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise_error("fastvae latents needs matplotlib: pip install 'fastvae[plot]'")
    model, config, _, x, labels = _load_run(a)
    _check_out(a.out)
    n = min(a.limit, len(x))
    coords, axes = project_2d(posterior_means(model, x[:n]))
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    if labels is not None:
        labels = labels[:n]
        for c in sorted(set(labels.tolist())):
            m = labels == c
            ax.scatter(
                coords[m, 0], coords[m, 1], s=3, alpha=0.6, label=str(c), color=plt.cm.tab10(int(c) % 10)
            )
        ax.legend(title="label", markerscale=4, loc="best", fontsize=8)
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=3, alpha=0.6)
    ax.set_title(f"posterior means of {n} test samples: {axes}", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out)
    plt.close(fig)
    print(f"wrote {a.out}: {n} test posterior means ({axes})")
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    import csv

    import torch

    from fastvae.data import load_array, unit_float
    from fastvae.toolkit import anomaly_scores

    model, config, _, x_test, _ = _load_run(a)
    arr = load_array(a.data, config.likelihood)
    if arr.shape[1:] != config.data_shape and arr.reshape(len(arr), -1).shape[1] != config.flat_dim:
        raise_error(f"{a.data}: samples have shape {arr.shape[1:]}, the model expects {config.data_shape}")
    x = torch.from_numpy(unit_float(arr))
    _check_out(a.out)
    nelbo, iw = anomaly_scores(model, x, a.iw)
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "neg_elbo", f"iw_nll_k{a.iw}"])
        for i, (e, q) in enumerate(zip(nelbo, iw)):
            w.writerow([i, f"{e:.4f}", f"{q:.4f}"])
    print(
        f"wrote {a.out}: {len(x)} samples, mean -ELBO {nelbo.mean():.2f} nats, mean IW NLL {iw.mean():.2f} nats"
    )
    if a.plot:
        _plot_scores(model, x_test[: a.reference_limit], nelbo if a.iw == 0 else iw, a)
    return 0


def _plot_scores(model, x_ref, scores, a: argparse.Namespace) -> None:
    """Histogram of the scores against the run's own held-out test split, with the ROC AUC."""
    import numpy as np

    from fastvae.toolkit import anomaly_scores, roc_auc

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise_error("--plot needs matplotlib: pip install 'fastvae[plot]'")
    _check_out(a.plot)
    ref_elbo, ref_iw = anomaly_scores(model, x_ref, a.iw)
    ref = ref_elbo if a.iw == 0 else ref_iw
    auc = roc_auc(ref, scores)
    what = "-ELBO" if a.iw == 0 else f"IW NLL (k={a.iw})"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    bins = np.histogram_bin_edges(np.concatenate([ref, scores]), bins=60)
    ax.hist(ref, bins=bins, alpha=0.6, density=True, label=f"held-out test split ({len(ref)})")
    ax.hist(scores, bins=bins, alpha=0.6, density=True, label=f"{Path(a.data).name} ({len(scores)})")
    ax.set_xlabel(f"{what}, nats")
    ax.set_ylabel("density")
    ax.set_title(f"anomaly scores: ROC AUC {auc:.3f} (scored data vs test split)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.plot)
    plt.close(fig)
    print(f"wrote {a.plot}: ROC AUC {auc:.3f} of the scored data against {len(ref)} held-out test samples")


def cmd_bench(a: argparse.Namespace) -> int:
    from fastvae.bench import main_args

    return main_args(a)


def _check_out(path: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise_error(f"{path}: the folder {parent} does not exist")


def raise_error(message: str) -> None:
    from fastvae.errors import FastVAEError

    raise FastVAEError(message)


# ---- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from fastvae import __version__

    p = _Parser(prog="fastvae", description="Train, evaluate, sample and export MLP VAEs.")
    p.add_argument("--version", action="version", version=f"fastvae {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a VAE (also under torchrun for DDP)")
    t.add_argument("--preset", default="pytorch-example", help="pytorch-example | paper | iwae")
    t.add_argument("--data", default="mnist", help="'mnist' (bundled) or a .npy/.npz file")
    t.add_argument("--epochs", type=_int_at_least(1), default=10)
    t.add_argument("--batch-size", type=_int_at_least(1), default=None, help="global batch (preset default)")
    t.add_argument("--lr", type=_float_range(0.0, lo_open=True), default=1e-3)
    t.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    t.add_argument("--seed", type=_int_at_least(0), default=0)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    t.add_argument("--out", default=None, help="run directory (default runs/<preset>-<time>)")
    t.add_argument(
        "--binarize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dynamic binarization, re-drawn every batch (default: the preset's)",
    )
    t.add_argument("--max-steps", type=_int_at_least(1), default=None)
    t.add_argument("--time-limit", type=_float_range(0.0, lo_open=True), default=None,
                   help="seconds of training, then evaluate and save")  # fmt: skip
    t.add_argument("--checkpoint-every", type=_int_at_least(1), default=None, help="steps")
    t.add_argument("--keep-checkpoints", type=_int_at_least(1), default=3)
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --out (start it if there is none)"
    )
    t.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    t.add_argument(
        "--kl-warmup-steps", type=_int_at_least(0), default=0, help="beta rises linearly over N steps"
    )
    t.add_argument("--kl-warmup-epochs", type=_int_at_least(0), default=0, help="... or over N epochs")
    t.add_argument("--free-bits", type=_float_range(0.0), default=0.0)
    t.add_argument("--hidden-dims", type=_dims, default=None, help="e.g. 400 or 200,200")
    t.add_argument("--latent-dim", type=_int_at_least(1), default=None)
    t.add_argument("--activation", choices=["relu", "tanh"], default=None)
    t.add_argument("--likelihood", choices=["bernoulli", "gaussian"], default=None)
    t.add_argument("--beta", type=_float_range(0.0), default=None)
    t.add_argument("--dtype", choices=["fp32", "tf32", "bf16"], default="fp32",
                   help="bf16: fp32 master weights, bf16 compute (CUDA engine)")  # fmt: skip
    t.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the whole step as a CUDA graph (default: on for CUDA, single process)")  # fmt: skip
    t.add_argument("--engine", action=argparse.BooleanOptionalAction, default=None,
                   help="device-resident step (default: on for CUDA, single process)")  # fmt: skip
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="test -ELBO and importance-weighted NLL of a run")
    e.add_argument("run", help="run directory")
    e.add_argument("--iw", type=_int_at_least(0), default=5000, help="importance samples (0: skip)")
    e.add_argument("--limit", type=_int_at_least(1), default=None, help="first N test samples")
    e.add_argument("--data", default=None, help="data to evaluate on (default: the run's)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="draw samples from the prior and write a PNG grid")
    s.add_argument("run", help="run directory")
    s.add_argument("-n", type=_int_at_least(1), default=64)
    s.add_argument("--seed", type=_int_at_least(0), default=0)
    s.add_argument("--temperature", type=_float_range(0.0, lo_open=True), default=1.0, help="scale of z")
    s.add_argument("--ncol", type=_int_at_least(1), default=None)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True, help="PNG file")
    s.set_defaults(func=cmd_sample)

    def run_command(name: str, help: str, out: str, func) -> argparse.ArgumentParser:
        """A subcommand on a run directory, with --out (default ``out``) and --device."""
        c = sub.add_parser(name, help=help)
        c.add_argument("run", help="run directory")
        c.add_argument("--out", default=out)
        c.add_argument("--device", default="auto", help="auto | cpu | cuda")
        c.set_defaults(func=func)
        return c

    i = run_command("interpolate", "decode the line between two test images' posterior means", "interpolation.png",
                    cmd_interpolate)  # fmt: skip
    i.add_argument("--a", type=_int_at_least(0), required=True, help="test image index")
    i.add_argument("--b", type=_int_at_least(0), required=True, help="test image index")
    i.add_argument("--steps", type=_int_at_least(2), default=10)

    m = run_command("manifold", "decode a grid over the latent space (2-D, or the 2 most active dims)",
                    "manifold.png", cmd_manifold)  # fmt: skip
    m.add_argument("-n", type=_int_at_least(2), default=20, help="grid side")

    lt = run_command(
        "latents", "scatter of test posterior means coloured by label", "latents.png", cmd_latents
    )
    lt.add_argument("--limit", type=_int_at_least(1), default=5000, help="test samples to plot")

    sc = run_command("score", "per-sample -ELBO and IW NLL as anomaly scores (CSV)", "scores.csv", cmd_score)
    sc.add_argument(
        "--data", required=True, help=".npy/.npz of samples to score, or 'mnist' (its test split)"
    )
    sc.add_argument("--iw", type=_int_at_least(0), default=100, help="importance samples (0: -ELBO only)")
    sc.add_argument("--plot", default=None, help="also draw a histogram against the run's test split (PNG)")
    sc.add_argument("--reference-limit", type=_int_at_least(1), default=1000, help="test samples for --plot")

    b = sub.add_parser(
        "bench", help="time one training step of fastvae against eager, compile and CUDA graphs"
    )
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--full", action="store_true",
                   help="the full grid (3 presets x batches 128 1024 16384) on the CPU too; the CPU default is "
                        "bounded to a few minutes (pytorch-example, batches 128 1024, fp32)")  # fmt: skip
    b.add_argument("--presets", nargs="+", default=None, help="default: the grid's")
    b.add_argument("--batch-sizes", nargs="+", type=_int_at_least(1), default=None)
    b.add_argument("--dtypes", nargs="+", choices=["fp32", "tf32", "bf16"], default=None,
                   help="default: fp32 tf32 bf16 on CUDA, fp32 on the CPU")  # fmt: skip
    b.add_argument(
        "--steps", type=_int_at_least(5), default=None, help="timed steps per cell (200 GPU, 30 CPU)"
    )
    b.add_argument("--warmup", type=_int_at_least(0), default=None)
    b.add_argument("--rounds", type=_int_at_least(1), default=None, help="interleaved timing rounds (5)")
    b.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch CPU threads (default torch's; recorded either way)")  # fmt: skip
    b.add_argument("--no-epoch", action="store_true", help="skip the full-MNIST-epoch timing")
    b.add_argument("--out", default=None, help="JSON record (default benchmarks/results/<device>.json)")
    b.set_defaults(func=cmd_bench)

    x = sub.add_parser("export", help="export the decoder to ONNX (checked against PyTorch)")
    x.add_argument("run", help="run directory")
    x.add_argument("--out", required=True, help="ONNX file to write")
    x.add_argument("--int8", action="store_true", help="dynamic int8 weight quantization")
    x.set_defaults(func=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fastvae.errors import FastVAEError

    try:
        return args.func(args)
    except FastVAEError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted")
    except MemoryError:
        return _fail("out of memory; try a smaller --batch-size or --limit")
