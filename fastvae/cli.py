"""The ``fastvae`` command line (also ``python -m fastvae``).

Every command parses its flags, calls one library function (``fastvae.workflows``, ``fastvae.trainer.train``,
``fastvae.export.onnx_export.export_parts``, ``fastvae.bench``) and prints; what it computes is open to Python
users there. Every command turns bad input into one line on stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence

from fastvae.config import MAX_SEED
from fastvae.limits import IW_DEFAULT_CPU, IW_DEFAULT_GPU, MAX_SCORER_IW

EXIT_USAGE = 2
MAX_IMAGES = 100_000  # samples or interpolation steps drawn into one PNG
MAX_GRID_SIDE = 1_000  # manifold grid side: a million decoded points
MAX_IW = 1_000_000  # importance samples per data point (the IWAE paper's NLL uses 5,000)
MAX_TEMPERATURE = 1e3  # a larger scale of z overflows float32 in the decoder


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" once: not where the help text already says its default, and not for a None
    or False default (a flag that is off, or a value worked out later, which the help text explains)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:  # every command's --help shows the defaults
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        # argparse prints nothing at all for an option without help text, default included
        shown = action.default is not None and action.default is not False
        if action.help is None and action.option_strings and shown:
            action.help = "default: %(default)s"
        return action

    def error(self, message: str) -> None:  # one line, not usage + message
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    """Print one error line (from rank 0 alone under torchrun, so a bad flag is reported once)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"fastvae: error: {message}", file=sys.stderr)
    _tell_torchrun(f"fastvae: error: {message}")
    return code


def _tell_torchrun(line: str) -> None:
    """Under torchrun, put the error line in this worker's error file ($TORCHELASTIC_ERROR_FILE, in the
    layout of torch.distributed.elastic's ErrorHandler): torchrun's closing ChildFailedError report then
    shows it as the root cause, where it would say "To enable traceback see: ...". torchrun still prints
    that report, with its own traceback, whenever a worker exits non-zero: it offers no switch to quiet it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import time

    from fastvae.atomic import atomic_write_bytes

    doc = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        atomic_write_bytes(path, json.dumps(doc).encode())
    except OSError:  # the report then reads as it would without the file; the line is already on stderr
        pass


# ---- typed flag values ------------------------------------------------------------------------------
def _int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    want = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi:,}"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r:.40}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r:.40}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def _float_range(lo: float, lo_open: bool = False, hi: float | None = None) -> Callable[[str], float]:
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r:.40}") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            upper = "" if hi is None else f" and <= {hi:g}"
            raise argparse.ArgumentTypeError(
                f"expected a finite number {'>' if lo_open else '>='} {lo:g}{upper}, got {s!r:.40}"
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


# ---- commands: each turns parsed flags into one call of the library and a line of output ----------------
def train_config_from_args(a: argparse.Namespace):
    """The TrainConfig a ``fastvae train`` command line describes: every flag is named after its field
    (validated; raises FastVAEError)."""
    from fastvae.config import TrainConfig

    given = vars(a)
    fields = {f.name: given[f.name] for f in dataclasses.fields(TrainConfig) if f.name in given}
    return TrainConfig(**fields, progress=not a.quiet)


def cmd_train(a: argparse.Namespace) -> int:
    from fastvae.trainer import train

    result = train(train_config_from_args(a))
    if result.metrics and result.rank == 0:
        neg_elbo = result.metrics[-1]["test_neg_elbo"]
        what = "reconstruction NLL" if result.model.config.is_ae else "-ELBO"
        print(f"test {what} {neg_elbo:.3f} nats after {result.step} steps; run in {result.out}")
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from fastvae.sweeps import parse_seeds, parse_values, sweep

    grid = dict(
        betas=None if a.betas is None else parse_values(a.betas, "--beta"),
        seeds=None if a.seeds is None else parse_seeds(a.seeds),
        lrs=None if a.lrs is None else parse_values(a.lrs, "--lr"),
    )
    result = sweep(train_config_from_args(a), **grid)
    done, summary = sum(r["status"] == "done" for r in result.rows), result.out / "summary.md"
    print(f"{done} of {len(result.rows)} models trained for {result.step} steps; summary in {summary}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from fastvae.workflows import evaluate_run

    result = evaluate_run(a.run, iw=a.iw, limit=a.limit, data=a.data, device=a.device, progress=not a.json,
                          on_elbo=None if a.json else _print_elbo)  # fmt: skip
    if a.json:
        print(json.dumps(result.as_dict()))
    elif result.iw_k > 0:
        print(f"IW NLL k={result.iw_k}  {result.iw_nll:.3f} nats")
    return 0


def _print_elbo(result) -> None:
    """eval's first line, printed before the IW bound's minutes (``fastvae.workflows.RunEvaluation``)."""
    s = result.stats
    if result.is_ae:  # no ELBO and no importance-weighted bound: its figure is -log p(x|mu(x))
        from fastvae.workflows import AE_NOTE

        print(f"test reconstruction NLL  {s.rec:.3f} nats  (-log p(x|mu(x)), {s.n} samples; {AE_NOTE})")
        return
    objective = "" if result.beta == 1 else f"; objective at beta {result.beta:g}: {s.objective:.3f}"
    if result.objective == "iwae" or result.k > 1:
        objective += f"; training objective ({result.objective}, k={result.k}): {s.objective:.3f}"
    if result.conditional:
        objective += "; conditional: given the test labels"
    print(
        f"test -ELBO   {s.neg_elbo:.3f} nats  (reconstruction {s.rec:.3f}, KL {s.kl:.3f}"
        f"{objective}; {s.n} samples, {s.active_units} active units)",
        flush=True,
    )


def cmd_sample(a: argparse.Namespace) -> int:
    from fastvae.workflows import sample_run

    r = sample_run(a.run, a.n, seed=a.seed, temperature=a.temperature, label=a.label, ncol=a.ncol, out=a.out,
                   device=a.device)  # fmt: skip
    which = f" of label {r.label}" if r.label is not None else " (row r: label r % C)" if r.label_rows else ""
    print(f"wrote {a.n} samples{which} to {a.out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from fastvae.export.onnx_export import export_parts

    results = export_parts(a.run, a.out, a.part, iw=a.iw, int8=a.int8, reduce_range=a.int8_reduce_range,
                           progress=True)  # fmt: skip
    for res in results:
        extra, q = "", res.int8
        if q is not None:  # the errors as the metadata records them (6 significant digits)
            errs = ", ".join(f"{name} {v:.6g}" for name, v in q.errors.items())
            extra = f"; int8 ({'reduce_range' if q.reduce_range else 'full range'}) {errs}"
            extra += "" if q.elbo_change is None else f", test -ELBO change {q.elbo_change:+.3f} nats"
        print(
            f"wrote {res.part} {res.path} (onnxruntime vs PyTorch max |delta| {res.max_abs_diff:.1e}{extra})"
        )
    return 0


def cmd_interpolate(a: argparse.Namespace) -> int:
    from fastvae.workflows import interpolate_run

    interpolate_run(a.run, a.first, a.second, a.steps, label=a.label, out=a.out, device=a.device)
    print(f"wrote {a.out}: test image {a.first}, {a.steps} decoded points from mu({a.first}) to mu({a.second}), "
          f"test image {a.second}")  # fmt: skip
    return 0


def cmd_manifold(a: argparse.Namespace) -> int:
    from fastvae.workflows import manifold_run

    m = manifold_run(a.run, a.n, label=a.label, out=a.out, device=a.device)
    dims, z = m.dims, m.latent_dim
    other = "" if z == 2 else f" (the two most active of {z}; the rest at 0)"
    print(f"wrote {a.out}: {a.n}x{a.n} grid over latent dims {dims[0]} (down) and {dims[1]} (across){other}")
    return 0


def cmd_latents(a: argparse.Namespace) -> int:
    from fastvae.workflows import latents_run

    coords, axes = latents_run(a.run, a.limit, out=a.out, device=a.device)
    print(f"wrote {a.out}: {len(coords)} test posterior means ({axes})")
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    from fastvae.workflows import score_run

    r = score_run(a.run, a.data, iw=a.iw, labels=a.labels, out=a.out, plot=a.plot,
                  reference_limit=a.reference_limit, device=a.device, progress=True)  # fmt: skip
    first = "reconstruction NLL" if r.is_ae else "-ELBO"
    last = ", IW NLL undefined for an autoencoder" if r.is_ae else ""
    last = f", mean IW NLL {r.iw_nll.mean():.2f} nats" if r.iw else last
    print(f"wrote {a.out}: {len(r.neg_elbo)} samples, mean {first} {r.neg_elbo.mean():.2f} nats{last}")
    if a.plot:
        n_ref = len(r.reference)
        print(f"wrote {a.plot}: ROC AUC {r.auc:.3f} of the scored data against {n_ref} held-out test samples")
    return 0


def cmd_quality(a: argparse.Namespace) -> int:
    from fastvae.workflows import quality_run

    run, report = quality_run(a.run, a.n, a.seed, device=a.device)
    if a.json:
        print(json.dumps(report.as_dict()))
    elif report.unavailable:
        print(f"{run.path}: quality scores unavailable: {report.unavailable}")
    else:
        _print_quality(report, labelled=run.config.conditional)  # every row then has its label agreement
    return 0


def _print_quality(report, labelled: bool) -> None:
    """quality's table of a ``fastvae.quality.QualityReport``."""
    from fastvae.quality import cache_dir, max_entropy_bits

    top = max_entropy_bits(report.n_classes)
    print(
        f"judge: MLP classifier, test accuracy {report.classifier_accuracy:.4f} (cached in {cache_dir()})"
    )
    print(f"{'':30s} {'confidence':>10s} {'entropy bits':>13s} {'MNIST-FD':>9s}"
          f"{' label agreement' if labelled else ''}  class histogram")  # fmt: skip
    for name, sc in report.rows.items():
        hist = " ".join(str(c) for c in sc.histogram)
        agree = f" {sc.label_agreement:15.3f}" if labelled else ""
        print(
            f"{name:30s} {sc.confidence:10.3f} {sc.entropy_bits:8.2f}/{top:.2f} {sc.mnist_fd:9.2f}{agree}  {hist}"
        )
    print("MNIST-FD: Frechet distance of the judge's penultimate features to a random half of the test split")
    if labelled:
        print("label agreement: the share of images the judge assigns to the label they were drawn for "
              "(conditional VAE: prior samples row r of 10 label r % C; midpoints decoded with the first end's label)")  # fmt: skip


def cmd_compare(a: argparse.Namespace) -> int:
    from fastvae.workflows import compare_run_dirs

    names = a.names.split(",") if a.names else None
    text = compare_run_dirs(a.runs, a.out, table_out=a.table, names=names, device=a.device, n_quality=a.n,
                            seed=a.seed)  # fmt: skip
    print(text)
    print(f"wrote {a.out}" + (f" and {a.table}" if a.table else ""))
    return 0


def cmd_edit(a: argparse.Namespace) -> int:
    from fastvae.workflows import edit_run

    r = edit_run(a.run, a.image, a.attribute, attributes=a.attributes, strengths=a.strength, out=a.out,
                 device=a.device)  # fmt: skip
    print(f"wrote {a.out}: test image {a.image}, its reconstruction, then strengths {', '.join(f'{v:g}' for v in r.strengths)}"
          f" along {a.attribute} ({r.n_with} with / {r.n_without} without; |direction| {r.direction.norm():.2f})")  # fmt: skip
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from fastvae.bench import main_args

    return main_args(a)


def _preset_batches() -> str:
    """The batch size each preset brings, for --help: "pytorch-example: 128; paper, iwae: 100"."""
    from fastvae.config import PRESET_TRAINING

    by_batch: dict[int, list[str]] = {}
    for name, d in PRESET_TRAINING.items():
        by_batch.setdefault(d["batch_size"], []).append(name)
    return "; ".join(f"{', '.join(names)}: {b}" for b, names in by_batch.items())


_THREADS_HELP = "CPU threads for torch (default: $OMP_NUM_THREADS, else 1: see the README's 'Threads')"


# ---- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from fastvae import __version__

    p = _Parser(prog="fastvae", description="Train, evaluate, sample and export MLP VAEs.")
    p.add_argument("--version", action="version", version=f"fastvae {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_run_commands(sub)
    _add_disentangle(sub)
    _add_sweep(sub)
    return p


def _add_train(sub) -> None:
    from fastvae.config import TrainConfig

    t = sub.add_parser("train", help="train a VAE (also under torchrun for DDP)")
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # the flags' defaults are the config's

    def opt(flag: str, **kw) -> None:
        """A flag named after its TrainConfig field, defaulting to the field's default."""
        t.add_argument(flag, default=d[flag.lstrip("-").replace("-", "_")], **kw)

    _add_train_data(opt)
    _add_train_run(opt, d)
    _add_train_model(opt)
    _add_train_engine(opt)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)


def _add_train_data(opt) -> None:
    """train: the data and the host (preset, data source, image reading, threads, image output)."""
    from fastvae.config import PRESETS

    opt("--preset", help=" | ".join(PRESETS))
    opt(
        "--data",
        help="'mnist' (bundled), 'dsprites' or 'dsprites-small' (procedural, with known factors), a .npy/.npz file, "
        "or a folder of PNG/JPEG images (labels from subfolders)",
    )
    opt("--image-size", type=_dims, help="a folder of images: resize each to H,W (or H: square)")
    opt(
        "--grayscale",
        action="store_true",
        help="a folder of images: read as greyscale (default: RGB unless all are)",
    )
    opt("--threads", type=_int_at_least(1), help=_THREADS_HELP)
    opt(
        "--images-every",
        type=_int_at_least(1),
        help="also write samples and reconstructions every N epochs (images/)",
    )


def _add_train_run(opt, d: dict) -> None:
    """train: how long and where (epochs, batch, learning rate, seed, device, run directory, limits,
    checkpoints, resume)."""
    from fastvae.config import BACKENDS, LR_SCHEDULES

    opt("--epochs", type=_int_at_least(1), help=f"training epochs (default: {d['epochs']} for every preset)")
    opt("--batch-size", type=_int_at_least(1),
        help=f"global batch (default: from the preset; {_preset_batches()})")  # fmt: skip
    opt("--lr", type=_float_range(0.0, lo_open=True),
        help=f"Adam's learning rate (default: {d['lr']:g} for every preset)")  # fmt: skip
    opt("--lr-schedule", choices=LR_SCHEDULES)
    opt("--seed", type=_int_at_least(0, MAX_SEED),
        help=f"seeds the initialization, the batch order and the noise (default: {d['seed']})")  # fmt: skip
    opt("--device", help="auto | cpu | cuda")
    opt("--backend", choices=BACKENDS)
    opt("--out", help="run directory (default: runs/<preset>-<time>)")
    opt(
        "--binarize",
        action=argparse.BooleanOptionalAction,
        help="dynamic binarization (default: the preset's)",
    )
    opt("--max-steps", type=_int_at_least(1), help="stop after N optimizer steps (default: run every epoch)")
    opt(
        "--time-limit",
        type=_float_range(0.0, lo_open=True),
        help="seconds of training, then evaluate and save",
    )
    opt("--checkpoint-every", type=_int_at_least(1), help="steps")
    opt("--keep-checkpoints", type=_int_at_least(1))
    opt("--resume", action="store_true", help="continue the run in --out (start it if there is none)")
    opt("--overwrite", action="store_true", help="replace the run in --out")


def _add_train_model(opt) -> None:
    """train: the model and its objective (KL schedule, free bits, networks, likelihood, beta, k)."""
    from fastvae import config as c
    from fastvae.config import ACTIVATIONS, LIKELIHOODS, MODELS

    opt("--kl-warmup-steps", type=_int_at_least(0), help="beta rises linearly over N steps")
    opt("--kl-warmup-epochs", type=_int_at_least(0), help="... or over N epochs")
    opt("--free-bits", type=_float_range(0.0), help="per-dimension KL floor, nats")
    opt("--hidden-dims", type=_dims, help="e.g. 400 or 200,200 (default: the preset's)")
    opt("--latent-dim", type=_int_at_least(1), help="default: the preset's")
    opt("--activation", choices=ACTIVATIONS, help="default: the preset's")
    opt("--likelihood", choices=LIKELIHOODS, help="default: the preset's")
    opt("--beta", type=_float_range(0.0), help="KL weight (default: the preset's, 1)")
    opt(
        "--model",
        choices=MODELS,
        help="vae, or ae: a plain autoencoder with the same networks (default: vae)",
    )
    opt("--conditional", action="store_true",
        help="a conditional VAE on the data's labels (y_train / y_test): encoder and decoder see onehot(y)")  # fmt: skip
    opt("--objective", choices=c.OBJECTIVES,
        help="elbo (mean of k single-sample ELBOs) or iwae (k-sample importance-weighted bound); default: the preset's")  # fmt: skip
    opt(
        "--k",
        type=_int_at_least(1, c.MAX_SAMPLES),
        help="latent samples per training row (default: the preset's, 1)",
    )


def _add_train_engine(opt) -> None:
    """train: the device engine (dtype, CUDA graph, device-resident step)."""
    from fastvae.config import DTYPES

    opt("--dtype", choices=DTYPES, help="bf16: fp32 master weights, bf16 compute (CUDA engine)")
    opt("--cuda-graph", action=argparse.BooleanOptionalAction,
        help="replay the whole step as a CUDA graph (default: on for CUDA, single process)")  # fmt: skip
    opt("--engine", action=argparse.BooleanOptionalAction,
        help="device-resident step (default: on for CUDA, single process)")  # fmt: skip


def _add_toolkit(sub) -> None:
    """interpolate, manifold, latents, score: a run directory in, a file out."""

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
    i.add_argument("--a", dest="first", type=_int_at_least(0), required=True, help="test image index")
    i.add_argument("--b", dest="second", type=_int_at_least(0), required=True, help="test image index")
    i.add_argument("--steps", type=_int_at_least(2, MAX_IMAGES), default=10)
    i.add_argument("--label", type=str, default=None,
                   help="conditional VAE: decode the path with this label, a class name or 0..C-1 (default: image a's)")  # fmt: skip

    m = run_command("manifold", "decode a grid over the latent space (2-D, or the 2 most active dims)",
                    "manifold.png", cmd_manifold)  # fmt: skip
    m.add_argument("-n", type=_int_at_least(2, MAX_GRID_SIDE), default=20, help="grid side")
    m.add_argument(
        "--label", type=str, default=None, help="conditional VAE: the class to draw, a name or 0..C-1 (required)"
    )

    lt = run_command(
        "latents", "scatter of test posterior means coloured by label", "latents.png", cmd_latents
    )
    lt.add_argument("--limit", type=_int_at_least(1), default=5000, help="test samples to plot")

    sc = run_command("score", "per-sample -ELBO and IW NLL as anomaly scores (CSV)", "scores.csv", cmd_score)
    sc.add_argument(
        "--data", required=True, help=".npy/.npz of samples to score, or 'mnist' (its test split)"
    )
    sc.add_argument(
        "--iw", type=_int_at_least(0, MAX_IW), default=100, help="importance samples (0: -ELBO only)"
    )
    sc.add_argument("--labels", default=None, help="conditional VAE: .npy of the samples' integer labels")
    sc.add_argument("--plot", default=None, help="also draw a histogram against the run's test split (PNG)")
    sc.add_argument("--reference-limit", type=_int_at_least(1), default=1000, help="test samples for --plot")
    sc.add_argument("--threads", type=_int_at_least(1), default=None, help=_THREADS_HELP)

    from fastvae.cache import cache_dir

    q = sub.add_parser(
        "quality", help="judge prior samples and interpolation midpoints with a digit classifier",
        description="Judge a run's prior samples and interpolation midpoints with an MLP classifier trained "
        f"on its data's labels (seconds on a CPU), cached in {cache_dir()} ($FASTVAE_CACHE to move it).",
    )
    q.add_argument("run", help="run directory")
    q.add_argument("--device", default="auto", help="auto | cpu | cuda")
    q.set_defaults(func=cmd_quality)
    q.add_argument("-n", type=_int_at_least(100), default=5000, help="images per score")
    q.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0)
    q.add_argument("--json", action="store_true")

    ed = run_command("edit", "move one test image's code along an attribute direction", "edit.png", cmd_edit)
    ed.add_argument("--image", type=_int_at_least(0), required=True, help="test image index")
    ed.add_argument("--attribute", required=True, help="label=A->B, or a column of --attributes")
    ed.add_argument("--attributes", default=None, help=".csv (header row) or .npy, one row per test image")
    ed.add_argument("--strength", default="-2,-1,1,2", help="comma-separated multiples of the direction")


def _add_compare(sub) -> None:
    c = sub.add_parser("compare", help="runs side by side: samples, interpolations, latent map, scores")
    c.add_argument("runs", nargs="+", help="two or more run directories")
    c.add_argument("--out", default="compare.png", help="PNG figure")
    c.add_argument("--table", default=None, help="also write the Markdown table here")
    c.add_argument("--names", default=None, help="comma-separated column names (default: the folder names)")
    c.add_argument("-n", type=_int_at_least(100), default=5000, help="images per quality score")
    c.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0)
    c.add_argument("--device", default="auto", help="auto | cpu | cuda")
    c.set_defaults(func=cmd_compare)


def _add_run_commands(sub) -> None:
    """The commands that read a run directory, and bench."""
    from fastvae.config import DTYPES

    e = sub.add_parser("eval", help="test -ELBO and importance-weighted NLL of a run")
    e.add_argument("run", help="run directory")
    e.add_argument("--iw", type=_int_at_least(0, MAX_IW), default=None,
                   help=f"importance samples (0: skip; default {IW_DEFAULT_GPU} on a GPU, the IWAE paper's NLL, "
                        f"{IW_DEFAULT_CPU} on a CPU)")  # fmt: skip
    e.add_argument("--limit", type=_int_at_least(1), default=None, help="first N test samples")
    e.add_argument("--data", default=None, help="data to evaluate on (default: the run's)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true")
    e.add_argument("--threads", type=_int_at_least(1), default=None, help=_THREADS_HELP)
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="draw samples from the prior and write a PNG grid")
    s.add_argument("run", help="run directory")
    s.add_argument("-n", type=_int_at_least(1, MAX_IMAGES), default=64)
    s.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0)
    s.add_argument("--temperature", type=_float_range(0.0, lo_open=True, hi=MAX_TEMPERATURE), default=1.0,
                   help="scale of z")  # fmt: skip
    s.add_argument("--ncol", type=_int_at_least(1), default=None,
                   help="grid columns (default: a square grid; 10 for a conditional VAE's label rows)")  # fmt: skip
    s.add_argument("--label", type=str, default=None,
                   help="conditional VAE: samples of this label, a class name or 0..C-1 (default: row r shows label r %% C)")  # fmt: skip
    s.add_argument("--device", default="auto")
    s.add_argument("--out", default="samples.png",
                   help="PNG file (default: samples.png in the current folder, as interpolate, manifold and "
                        "latents write theirs)")  # fmt: skip
    s.set_defaults(func=cmd_sample)

    _add_toolkit(sub)
    _add_compare(sub)

    b = sub.add_parser(
        "bench", help="time whole training steps of fastvae against the pytorch/examples loop, eager, compile "
        "and CUDA graphs"
    )
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--full", action="store_true",
                   help="the full grid (3 presets x batches 128 1024 16384) on the CPU too; the CPU default is "
                        "bounded to a few minutes (pytorch-example, batches 128 1024, fp32)")  # fmt: skip
    b.add_argument("--presets", nargs="+", default=None, help="default: the grid's")
    b.add_argument("--batch-sizes", nargs="+", type=_int_at_least(1), default=None, help="default: the grid's")
    b.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None,
                   help="default: fp32 tf32 bf16 on CUDA, fp32 on the CPU")  # fmt: skip
    b.add_argument(
        "--steps", type=_int_at_least(5), default=None, help="timed steps per cell (default: 200 on a GPU, 30 on a CPU)"
    )
    b.add_argument("--warmup", type=_int_at_least(0), default=None,
                   help="untimed steps per contender (default: 20 on a GPU, 5 on a CPU)")  # fmt: skip
    b.add_argument("--rounds", type=_int_at_least(1), default=None, help="interleaved timing rounds (default: 5)")
    b.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="CPU threads for torch, as for train (default: $OMP_NUM_THREADS, else 1; recorded)")  # fmt: skip
    b.add_argument("--no-epoch", action="store_true", help="skip the full-MNIST-epoch timing")
    b.add_argument("--out", default=None,
                   help="JSON record, a new file: an existing one is refused (default: "
                        "fastvae-bench-<device>-<date>-<time>.json in the current folder)")  # fmt: skip
    b.set_defaults(func=cmd_bench)

    x = sub.add_parser(
        "export", help="export the decoder, encoder or scorer to ONNX (checked against PyTorch)"
    )
    x.add_argument("run", help="run directory")
    x.add_argument("--part", choices=["decoder", "encoder", "scorer", "all"], default="decoder")
    x.add_argument("--out", required=True, help="ONNX file to write (a folder for --part all)")
    x.add_argument("--iw", type=_int_at_least(0, MAX_SCORER_IW), default=0,
                   help="scorer: also the K-sample importance-weighted NLL (eps_iw input (B, K, Z))")  # fmt: skip
    x.add_argument("--int8", action="store_true", help="dynamic int8 weight quantization")
    x.add_argument("--int8-reduce-range", action="store_true",
                   help="7-bit int8 weights: for AVX2 CPUs without VNNI (default off: full 8-bit range)")  # fmt: skip
    x.set_defaults(func=cmd_export)


# ---- dSprites: disentanglement, traversals, factor edits (fastvae.disentangle) ------------------------
def cmd_disentangle(a: argparse.Namespace) -> int:
    from fastvae.disentangle import disentanglement

    r = disentanglement(a.run, n=a.n, n_test=a.n_test, seed=a.seed, num_bins=a.bins, with_sap=not a.no_sap,
                        device=_device_of(a))  # fmt: skip
    if a.json:
        print(json.dumps(r.as_dict()))
        return 0
    sap = "" if r.sap is None else f"  SAP {r.sap.score:.3f}"
    rec = "" if r.rec is None else f"; test reconstruction {r.rec:.2f} nats"
    print(
        f"MIG {r.mig.score:.3f}{sap}  ({r.grid}, {r.n:,} + {r.n_test:,} seeded samples, seed {r.seed}{rec})"
    )
    print(
        f"{'factor':12s} {'latent':>6s} {'MI/H':>6s} {'MIG gap':>8s}"
        + ("" if r.sap is None else f" {'SAP latent':>10s} {'SAP gap':>8s}")
    )
    for row in r.rows():
        extra = "" if r.sap is None else f" {'z' + str(row['sap_latent']):>10s} {row['sap_gap']:8.3f}"
        print(
            f"{row['factor']:12s} {'z' + str(row['latent']):>6s} {row['mi_share']:6.3f} {row['mig_gap']:8.3f}{extra}"
        )
    print("KL per latent (nats): " + " ".join(f"z{j} {k:.2f}" for j, k in enumerate(r.kl_per_dim)))
    return 0


def _device_of(a: argparse.Namespace):
    from fastvae.backends import resolve_device

    return resolve_device(getattr(a, "device", "auto"))


def cmd_traverse(a: argparse.Namespace) -> int:
    from fastvae.workflows import traverse_run

    r = traverse_run(a.run, image=a.image, steps=a.steps, limit=a.limit, n=a.n, seed=a.seed, out=a.out,
                     device=a.device)  # fmt: skip
    print(f"wrote {a.out}: {len(r.labels)} active latents of {r.latent_dim} (KL > 0.01 nats), test image "
          f"{a.image}, {a.steps} steps over +-{a.limit:g}; MIG {r.mig:.3f}")  # fmt: skip
    return 0


def cmd_edit_factor(a: argparse.Namespace) -> int:
    from fastvae.dsprites import FACTORS
    from fastvae.workflows import edit_factor_run

    r = edit_factor_run(a.run, a.image, a.factor, strengths=a.strength, measure=a.measure, seed=a.seed,
                        out=a.out, device=a.device)  # fmt: skip
    print(f"wrote {a.out}: test image {a.image}, its reconstruction, then {r.factor} along z{r.latent} "
          f"(MI/H {r.mi_share:.2f}; 1 strength = {r.sd:.2f}, its codes' std)")  # fmt: skip
    print("read back (nearest grid image): " + "; ".join(f"{s:+g}: {r.factor} {v:.3g}" for s, v in
          zip(r.strengths, r.read_back[1:])) + f" (reconstruction {r.read_back[0]:.3g})")  # fmt: skip
    if r.change is not None:
        print(f"mean |change| over {a.measure} seeded images against their reconstructions, read back by nearest "
              "neighbour, as a share of each factor's range (shape: share changed); last: mean signed change "
              f"of {r.factor}'s value")  # fmt: skip
        print(f"{'strength':>8s} " + " ".join(f"{f:>11s}" for f in FACTORS) + f" {'signed':>8s}")
        for s, row, d in zip(r.strengths, r.change, r.signed):
            print(f"{s:+8g} " + " ".join(f"{v:11.3f}" for v in row) + f" {d:+8.3f}")
    return 0


def cmd_dsprites(a: argparse.Namespace) -> int:
    from fastvae.dsprites import grid, write_npz

    path = write_npz(a.out, a.grid)
    print(f"wrote {path}: {len(grid(a.grid)):,} images of the procedural dSprites re-creation (keys imgs, "
          "latents_classes, latents_values, metadata; not the original file)")  # fmt: skip
    return 0


def _cmd_edit_any(a: argparse.Namespace) -> int:
    """``fastvae edit``: along a dSprites factor's latent (--factor), or an attribute direction."""
    from fastvae.errors import FastVAEError

    if a.factor is not None:
        if a.attribute is not None or a.attributes is not None:
            raise FastVAEError("--factor and --attribute/--attributes exclude each other")
        return cmd_edit_factor(a)
    if a.attribute is None:
        raise FastVAEError("edit needs --attribute (label=A->B or a column of --attributes) or --factor (dSprites)")
    return cmd_edit(a)


def _add_disentangle(sub) -> None:
    """disentangle, traverse, dsprites; and ``edit --factor`` on the existing edit command."""
    from fastvae.dsprites import FACTORS, GRIDS

    d = sub.add_parser("disentangle", help="MIG and SAP of a run trained on dSprites, per factor")
    d.add_argument("run", help="run directory (trained with --data dsprites or dsprites-small)")
    d.add_argument(
        "-n",
        type=_int_at_least(2, 1_000_000),
        default=10_000,
        help="seeded images for MIG (and SAP's training)",
    )
    d.add_argument(
        "--n-test", type=_int_at_least(2, 1_000_000), default=5_000, help="further images SAP is scored on"
    )
    d.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0)
    d.add_argument(
        "--bins", type=_int_at_least(2, 10_000), default=20, help="histogram bins per latent (MIG)"
    )
    d.add_argument("--no-sap", action="store_true", help="MIG only (SAP fits 50 linear SVMs)")
    d.add_argument("--json", action="store_true")
    d.add_argument("--device", default="auto", help="auto | cpu | cuda")
    d.set_defaults(func=cmd_disentangle)

    t = sub.add_parser("traverse", help="latent traversals of a dSprites run, rows labelled by factor (PNG)")
    t.add_argument("run", help="run directory")
    t.add_argument("--out", default="traversal.png")
    t.add_argument("--image", type=_int_at_least(0), default=0, help="test image whose code is traversed")
    t.add_argument("--steps", type=_int_at_least(2, 100), default=10)
    t.add_argument(
        "--limit",
        type=_float_range(0.0, lo_open=True, hi=MAX_TEMPERATURE),
        default=3.0,
        help="sweep +-limit (prior sigmas)",
    )
    t.add_argument(
        "-n", type=_int_at_least(2, 1_000_000), default=10_000, help="seeded images that label the rows"
    )
    t.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.set_defaults(func=cmd_traverse)

    x = sub.add_parser(
        "dsprites", help="write the procedural dSprites re-creation as an .npz (original keys)"
    )
    x.add_argument("--out", required=True, help=".npz file")
    x.add_argument("--grid", choices=list(GRIDS), default="dsprites")
    x.set_defaults(func=cmd_dsprites)

    ed = sub.choices["edit"]
    for action in ed._actions:
        if action.dest == "attribute":
            action.required = False  # --factor is the other way to name an edit
    ed.add_argument(
        "--factor",
        default=None,
        help=f"dSprites run: move along the latent carrying this factor ({', '.join(FACTORS)})",
    )
    ed.add_argument("--measure", type=_int_at_least(0, 100_000), default=100,
                    help="--factor: read back the factors of N seeded edited images (0: skip)")  # fmt: skip
    ed.add_argument(
        "--seed", type=_int_at_least(0, MAX_SEED), default=0, help="--factor: evaluation sample seed"
    )
    ed.set_defaults(func=_cmd_edit_any)


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--strength -2,-1,1`` as ``--strength=-2,-1,1``: argparse takes a value starting with '-' for a flag."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--strength" and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"--strength={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _add_sweep(sub) -> None:
    from fastvae import config as c

    t = sub.add_parser("sweep", help="train a grid of VAEs (beta x seeds x lr) as one batched computation")
    d = {f.name: f.default for f in dataclasses.fields(c.TrainConfig)}

    def opt(flag: str, **kw) -> None:
        t.add_argument(flag, default=d[flag.lstrip("-").replace("-", "_")], **kw)

    t.add_argument("--beta", dest="betas", help="KL weights, e.g. 0.25,0.5,1,2,4,8 (default: the preset's)")
    t.add_argument("--seeds", help="seeds, e.g. 0-3 or 0,5,7 (default: 0)")
    t.add_argument("--lr", dest="lrs", help=f"Adam learning rates, e.g. 1e-3,3e-4 (default: {d['lr']:g})")
    opt("--preset", help=" | ".join(c.PRESETS))
    opt("--data", help="'mnist' (bundled), a .npy/.npz file, or a folder of images")
    opt("--image-size", type=_dims, help="a folder of images: resize each to H,W (or H: square)")
    opt("--grayscale", action="store_true", help="a folder of images: read as greyscale")
    opt("--threads", type=_int_at_least(1), help=_THREADS_HELP)
    opt("--epochs", type=_int_at_least(1), help=f"training epochs (default: {d['epochs']})")
    opt("--batch-size", type=_int_at_least(1), help="every model's batch (default: the preset's)")
    opt("--lr-schedule", choices=c.LR_SCHEDULES)
    opt("--device", help="auto | cpu | cuda")
    opt("--out", help="the sweep's folder (default: runs/sweep-<preset>-<time>)")
    opt("--binarize", action=argparse.BooleanOptionalAction, help="dynamic binarization (default: the preset's)")
    opt("--max-steps", type=_int_at_least(1), help="stop after N optimizer steps")
    opt("--checkpoint-every", type=_int_at_least(1), help="steps")
    opt("--keep-checkpoints", type=_int_at_least(1))
    opt("--resume", action="store_true", help="continue the sweep in --out exactly")
    opt("--overwrite", action="store_true", help="replace the sweep in --out")
    opt("--kl-warmup-steps", type=_int_at_least(0), help="beta rises linearly over N steps")
    opt("--kl-warmup-epochs", type=_int_at_least(0), help="... or over N epochs")
    opt("--free-bits", type=_float_range(0.0), help="per-dimension KL floor, nats")
    opt("--hidden-dims", type=_dims, help="e.g. 400 or 200,200 (default: the preset's)")
    opt("--latent-dim", type=_int_at_least(1), help="default: the preset's")
    opt("--activation", choices=c.ACTIVATIONS, help="default: the preset's")
    opt("--likelihood", choices=c.LIKELIHOODS, help="default: the preset's")
    opt("--model", choices=c.MODELS, help="vae, or ae (default: vae)")
    opt("--objective", choices=c.OBJECTIVES, help="elbo or iwae (default: the preset's)")
    opt("--k", type=_int_at_least(1, c.MAX_SAMPLES), help="latent samples per training row")
    opt("--eval-batch-size", type=_int_at_least(1))
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_sweep)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: every failure the user can cause ends in one ``fastvae: error:`` line and exit
    status 2 (130 for Ctrl-C, 128 + signal for a preemption that saved a checkpoint)."""
    try:
        try:
            args = build_parser().parse_args(
                _join_negative_values(list(sys.argv[1:] if argv is None else argv))
            )
        except SystemExit as done:  # --help, --version, or a bad flag already reported in one line
            return done.code if isinstance(done.code, int) else 0
        if args.command in ("eval", "score"):  # train sets them from its config
            from fastvae.backends import set_threads

            set_threads(args.threads)
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # sorted into user errors below; the rest is re-raised
        return _fail_for(exc)


def _fail_for(exc: Exception) -> int:
    """One line for the failures bad input, full disks and small machines cause; a bug keeps its traceback."""
    from fastvae.errors import FastVAEError, Preempted

    if isinstance(exc, Preempted):
        return _fail(str(exc), exc.exit_code)
    if isinstance(exc, FastVAEError):
        return _fail(str(exc))
    if isinstance(exc, MemoryError) or _is_out_of_memory(exc):
        return _fail("out of memory; try a smaller --batch-size, model, -n or --limit")
    if isinstance(exc, OSError):  # disk full, read-only file system, permissions, a path under a file
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}")
    raise exc


def _is_out_of_memory(exc: Exception) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
