"""Run the whole CLI against generated bad input and count what each case gave.

    python tests/probe_cli.py [--workers 2] [--timeout 90]

Makes a small data set, trains a tiny run and exports its decoder, then runs every case as its own
process: bad values for every numeric flag of every command, damaged and foreign data files, tampered
run directories, unwritable outputs, and the torch-free sampler's flags and forged metadata. Each case is
classed as ``ok`` (exit 0), ``clean`` (exit 2, or 130 for an interrupt, with one ``fastvae: error:`` line
last and no traceback), ``traceback``, ``hang`` (past the timeout), ``crash`` (killed by a signal) or
``other``. Not a test (it takes minutes): the families are tested in tests/test_faults.py.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
BAD_INTS = ["-1", "0", "1e12", "10000000000000", str(2**64), "nan", "inf", "abc", "", "1.5", "0x10"]
BAD_FLOATS = ["-1", "0", "1e39", "nan", "inf", "-inf", "abc", "", "1e308", "1e-320"]
TINY = ["--hidden-dims", "8", "--latent-dim", "2", "--batch-size", "50", "--device", "cpu", "--quiet"]


def fastvae(*args: object) -> list[str]:
    return [sys.executable, "-m", "fastvae", *map(str, args)]


def sampler(*args: object) -> list[str]:
    return [sys.executable, "-m", "fastvae.export.sample", *map(str, args)]


def classify(code: int | None, err: str) -> str:
    if code is None:
        return "hang"
    if code < 0:
        return "crash"
    if "Traceback" in err:
        return "traceback"
    if code == 0:
        return "ok"
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("fastvae: error:")]
    if code in (2, 130) and len(errors) == 1 and lines[-1] == errors[0]:
        return "clean"
    return "other"


def run_case(case: tuple[str, list[str]], timeout: float) -> tuple[str, str, str]:
    name, cmd = case
    try:
        proc = subprocess.run(
            cmd, env=ENV, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        code, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        code, err = None, ""
    return name, classify(code, err), err.strip().splitlines()[-1][:200] if err.strip() else ""


def setup(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    x = (rng.random((300, 8, 8)) * 255).astype(np.uint8)
    data = root / "data.npz"
    np.savez(data, x_train=x[:250], x_test=x[250:], y_train=np.arange(250) % 10, y_test=np.arange(50) % 10)
    run = root / "run"
    subprocess.run(fastvae("train", "--data", data, "--out", run, "--epochs", "1", "--checkpoint-every", "2", *TINY),
                   env=ENV, check=True, capture_output=True)  # fmt: skip
    onnx = root / "decoder.onnx"
    subprocess.run(fastvae("export", run, "--out", onnx), env=ENV, check=True, capture_output=True)
    (root / "afile").write_text("x")
    return {"data": data, "run": run, "onnx": onnx, "afile": root / "afile"}


def data_file_cases(root: Path, base: dict[str, Path]) -> list[tuple[str, Path]]:
    """(name, path) of damaged or foreign data files."""
    good = base["data"].read_bytes()
    files = []

    def add(name: str, content: bytes | None = None, suffix: str = ".npz", make=None) -> None:
        path = root / f"data-{len(files)}{suffix}"
        if make:
            make(path)
        else:
            path.write_bytes(content or b"")
        files.append((name, path))

    for cut in (0, 10, 100, len(good) // 2, len(good) - 10):
        add(f"npz cut at {cut}", good[:cut])
    for pos in (30, len(good) // 3, len(good) - 100):
        flipped = bytearray(good)
        flipped[pos] ^= 0xFF
        add(f"npz byte {pos} flipped", bytes(flipped))
    arrays = {
        "1-D": np.zeros(10), "complex": np.zeros((5, 4), np.complex64), "NaN": np.full((5, 4), np.nan),
        "strings": np.array([["a"] * 4] * 5), "empty": np.zeros((0, 4)), "out of [0,1]": np.full((5, 4), 3.0),
        "int > 255": np.full((5, 4), 300), "huge float": np.full((5, 4), 1e300),
    }  # fmt: skip
    for name, arr in arrays.items():
        add(f"array {name}", make=lambda p, a=arr: np.save(p.with_suffix(""), a), suffix=".npy")
    add(
        "object array (pickled)",
        make=lambda p: np.save(p.with_suffix(""), np.array([{}, 1], dtype=object)),
        suffix=".npy",
    )
    add(".npy bytes named .npz", make=lambda p: p.write_bytes(_npy_bytes()))
    add("text file", b"hello\n", ".npz")
    add("wrong suffix", good, ".csv")
    add("directory", make=lambda p: p.mkdir())
    add("fifo", make=lambda p: os.mkfifo(p))
    files.append(("missing file", root / "nope.npz"))
    for name, labels in {
        "2-D labels": np.zeros((250, 2)),
        "short labels": np.zeros(3),
        "string labels": np.array(["a"] * 250),
    }.items():
        x = np.zeros((250, 4), np.uint8)
        add(
            name,
            make=lambda p, y=labels, x=x: np.savez(p, x_train=x, x_test=x[:5], y_train=y, y_test=np.zeros(5)),
        )
    return files


def _npy_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros((20, 4), np.uint8))
    return buf.getvalue()


def run_dir_variants(root: Path, run: Path) -> list[tuple[str, Path]]:
    """(name, run directory) copies of the trained run with one file damaged."""
    out = []

    def variant(name: str, mutate) -> None:
        d = root / f"run-{len(out)}"
        shutil.copytree(run, d, ignore=shutil.ignore_patterns(".lock"))
        mutate(d)
        out.append((name, d))

    def edit_json(rel: str, fn):
        def mutate(d: Path) -> None:
            p = d / rel if rel != "ckpt" else sorted((d / "checkpoints").iterdir())[-1] / "state.json"
            doc = json.loads(p.read_text())
            fn(doc)
            p.write_text(json.dumps(doc))

        return mutate

    variant("config.json deleted", lambda d: (d / "config.json").unlink())
    variant("config.json a directory", lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()))
    variant("config.json a fifo", lambda d: ((d / "config.json").unlink(), os.mkfifo(d / "config.json")))
    variant("config.json junk", lambda d: (d / "config.json").write_text("{not json"))
    variant(
        "config.json relu->tanh", edit_json("config.json", lambda c: c["model"].update(activation="tanh"))
    )
    variant(
        "config.json binarize 'false'",
        edit_json("config.json", lambda c: c["train"].update(binarize="false")),
    )
    variant("config.json no checksum", edit_json("config.json", lambda c: c.pop("config_sha256")))
    variant(
        "config.json huge dims", edit_json("config.json", lambda c: c["model"].update(hidden_dims=[10**12]))
    )
    variant("weights deleted", lambda d: (d / "model.safetensors").unlink())
    variant(
        "weights truncated",
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:50]),
    )
    variant(
        "weights a directory",
        lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors").mkdir()),
    )
    variant(
        "weights a fifo", lambda d: ((d / "model.safetensors").unlink(), os.mkfifo(d / "model.safetensors"))
    )
    variant("metrics.jsonl bad line", lambda d: (d / "metrics.jsonl").write_text("[1]\n{oops\n"))
    variant(
        "checkpoints a file",
        lambda d: (shutil.rmtree(d / "checkpoints"), (d / "checkpoints").write_text("x")),
    )
    for key, value in {
        "step": 10**9,
        "step ": -5,
        "epoch_loss": "x",
        "torch_rng": [],
        "optimizer": None,
    }.items():
        variant(
            f"state.json {key.strip()}={value!r}",
            edit_json("ckpt", lambda s, k=key.strip(), v=value: s.update({k: v})),
        )
    variant("state.json without keys", edit_json("ckpt", lambda s: s.clear()))
    return out


def cases(root: Path, base: dict[str, Path]) -> list[tuple[str, list[str]]]:
    run, data, onnx, afile = base["run"], base["data"], base["onnx"], base["afile"]
    out_paths = {
        "a folder": root,
        "under a file": afile / "x.png",
        "a missing folder": root / "missing" / "x.png",
    }
    c: list[tuple[str, list[str]]] = []
    train = ["train", "--data", data, "--max-steps", "2", *TINY]
    for flag in ("--epochs", "--batch-size", "--seed", "--max-steps", "--checkpoint-every", "--keep-checkpoints",
                 "--kl-warmup-steps", "--kl-warmup-epochs", "--latent-dim"):  # fmt: skip
        for v in BAD_INTS:
            c.append((f"train {flag} {v!r}", fastvae(*train, "--out", root / "t", "--overwrite", flag, v)))
    for flag in ("--lr", "--time-limit", "--free-bits", "--beta"):
        for v in BAD_FLOATS:
            c.append((f"train {flag} {v!r}", fastvae(*train, "--out", root / "t", "--overwrite", flag, v)))
    for v in ("0", "-3", "1e14", "a,b", "", "400,0", str(10**11)):
        c.append(
            (
                f"train --hidden-dims {v!r}",
                fastvae(*train, "--out", root / "t", "--overwrite", "--hidden-dims", v),
            )
        )
    for v in ("huge", "", "PAPER"):
        c.append(
            (f"train --preset {v!r}", fastvae(*train, "--out", root / "t", "--overwrite", "--preset", v))
        )
    for name, path in data_file_cases(root, base):
        c.append(
            (
                f"train --data {name}",
                fastvae(
                    "train", "--data", path, "--out", root / "t", "--overwrite", "--max-steps", "1", *TINY
                ),
            )
        )
    for name, where in out_paths.items():
        c.append(
            (f"train --out {name}", fastvae(*train, "--out", afile if name == "under a file" else where))
        )
    c.append(("train --resume --overwrite", fastvae(*train, "--out", root / "t", "--resume", "--overwrite")))
    for change in (["--lr", "0.5"], ["--seed", "3"], ["--batch-size", "25"]):
        c.append(
            (
                f"train --resume with {change}",
                fastvae("train", "--data", data, "--out", run, "--resume", *TINY, *change),
            )
        )
    for name, d in run_dir_variants(root, run):
        c.append((f"eval: {name}", fastvae("eval", d, "--iw", "5", "--device", "cpu")))
        c.append((f"sample: {name}", fastvae("sample", d, "--out", root / "s.png", "--device", "cpu")))
        c.append(
            (
                f"train --resume: {name}",
                fastvae("train", "--data", data, "--out", d, "--resume", "--epochs", "2", *TINY),
            )
        )
    for v in BAD_INTS:
        c.append(
            (f"sample -n {v!r}", fastvae("sample", run, "-n", v, "--out", root / "s.png", "--device", "cpu"))
        )
        c.append(
            (
                f"sample --seed {v!r}",
                fastvae("sample", run, "--seed", v, "--out", root / "s.png", "--device", "cpu"),
            )
        )
        c.append((f"eval --iw {v!r}", fastvae("eval", run, "--iw", v, "--device", "cpu")))
        c.append((f"eval --limit {v!r}", fastvae("eval", run, "--limit", v, "--iw", "0", "--device", "cpu")))
        c.append(
            (
                f"manifold -n {v!r}",
                fastvae("manifold", run, "-n", v, "--out", root / "m.png", "--device", "cpu"),
            )
        )
        c.append(
            (
                f"interpolate --steps {v!r}",
                fastvae(
                    "interpolate",
                    run,
                    "--a",
                    "0",
                    "--b",
                    "1",
                    "--steps",
                    v,
                    "--out",
                    root / "i.png",
                    "--device",
                    "cpu",
                ),
            )
        )
        c.append(
            (
                f"interpolate --a {v!r}",
                fastvae("interpolate", run, "--a", v, "--b", "1", "--out", root / "i.png", "--device", "cpu"),
            )
        )
        c.append(
            (
                f"score --iw {v!r}",
                fastvae("score", run, "--data", data, "--iw", v, "--out", root / "s.csv", "--device", "cpu"),
            )
        )
        c.append(
            (
                f"latents --limit {v!r}",
                fastvae("latents", run, "--limit", v, "--out", root / "l.png", "--device", "cpu"),
            )
        )
        c.append((f"sampler -n {v!r}", sampler(onnx, "-n", v, "--out", root / "g.png")))
        c.append((f"sampler --seed {v!r}", sampler(onnx, "--seed", v, "--out", root / "g.png")))
        c.append((f"sampler --threads {v!r}", sampler(onnx, "--threads", v, "--out", root / "g.png")))
    for v in BAD_FLOATS:
        c.append(
            (
                f"sample --temperature {v!r}",
                fastvae("sample", run, "--temperature", v, "--out", root / "s.png", "--device", "cpu"),
            )
        )
        c.append((f"sampler --temperature {v!r}", sampler(onnx, "--temperature", v, "--out", root / "g.png")))
    for name, where in out_paths.items():
        for cmd in (["sample", run], ["manifold", run], ["latents", run], ["interpolate", run, "--a", "0", "--b", "1"],
                    ["score", run, "--data", data, "--iw", "0"], ["export", run]):  # fmt: skip
            c.append(
                (
                    f"{cmd[0]} --out {name}",
                    fastvae(*cmd, "--out", where, "--device", "cpu")
                    if cmd[0] != "export"
                    else fastvae(*cmd, "--out", where),
                )
            )
        c.append((f"sampler --out {name}", sampler(onnx, "--out", where)))
        c.append((f"sampler --npy {name}", sampler(onnx, "--npy", where)))
    for name, path in (
        data_file_cases(root / "score-data", base) if (root / "score-data").mkdir() is None else []
    ):
        c.append(
            (
                f"score --data {name}",
                fastvae(
                    "score", run, "--data", path, "--iw", "0", "--out", root / "s.csv", "--device", "cpu"
                ),
            )
        )
    c += forged_onnx_cases(root, onnx)
    c.append(("no command", fastvae()))
    c.append(("unknown command", fastvae("frobnicate")))
    c.append(("eval missing run", fastvae("eval", root / "nothing")))
    c.append(("eval on a file", fastvae("eval", afile)))
    return c


def forged_onnx_cases(root: Path, onnx_path: Path) -> list[tuple[str, list[str]]]:
    import onnx

    out = []
    for key, value in [("latent_dim", "-3"), ("latent_dim", "0"), ("latent_dim", "abc"), ("latent_dim", "99999999999"),
                       ("latent_dim", "7"), ("data_shape", "[3, 3]"), ("data_shape", "not json"), ("data_shape", "[-1]"),
                       ("data_shape", "[1000000000]"), ("data_shape", "7"), ("fastvae_version", None)]:  # fmt: skip
        model = onnx.load(str(onnx_path))
        props = [p for p in model.metadata_props if p.key != key]
        del model.metadata_props[:]
        model.metadata_props.extend(props)
        if value is not None:
            model.metadata_props.add(key=key, value=value)
        path = root / f"forged-{len(out)}.onnx"
        onnx.save(model, str(path))
        out.append((f"sampler forged {key}={value!r}", sampler(path, "--out", root / "g.png")))
    (root / "junk.onnx").write_bytes(b"not a protobuf")
    out.append(("sampler junk model", sampler(root / "junk.onnx", "--out", root / "g.png")))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=90.0)
    p.add_argument("--json", help="write every case's outcome here")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fastvae-probe-"))
    base = setup(root)
    all_cases = cases(root, base)
    print(f"{len(all_cases)} cases, {a.workers} at a time", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(a.workers) as pool:
        results = list(pool.map(lambda case: run_case(case, a.timeout), all_cases))
    counts = collections.Counter(kind for _, kind, _ in results)
    for name, kind, last in results:
        if kind not in ("ok", "clean"):
            print(f"{kind:9s} {name}: {last}")
    print(
        f"{len(results)} cases: "
        + ", ".join(f"{k} {counts[k]}" for k in ("ok", "clean", "traceback", "hang", "crash", "other"))
    )
    if a.json:
        Path(a.json).write_text(
            json.dumps([dict(zip(("case", "outcome", "last_line"), r)) for r in results], indent=1)
        )
    shutil.rmtree(root, ignore_errors=True)
    return 0 if counts["ok"] + counts["clean"] == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
