"""The torch-free runtimes against bad input and forged files: small ONNX parts built with onnx.helper, so
each case is fast and the expected numbers come from numpy (or fastvae's torch noise), not the runtime."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper, save

from fastvae.errors import FastVAEError
from fastvae.export import Encoder, Sampler, Scorer

ROOT = Path(__file__).resolve().parents[1]
Z, SIDE, C = 3, 2, 4  # latent width, image side (D = 4), classes of the conditional parts
D = SIDE * SIDE
rng = np.random.default_rng(0)
W_DEC, E_DEC = rng.standard_normal((Z, D)).astype(np.float32), rng.standard_normal((C, D)).astype(np.float32)
W_MU, W_LV = rng.standard_normal((D, Z)).astype(np.float32), rng.standard_normal((D, Z)).astype(np.float32)


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _save(path, part, inputs, outputs, nodes, inits=(), **meta):
    """An opset-18 model with fastvae's metadata (``meta`` overrides or adds keys; None removes one)."""
    graph = helper.make_graph(nodes, part, inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    props = {"fastvae_version": "test", "part": part, "latent_dim": str(Z), "data_shape": f"[1, {SIDE}, {SIDE}]",
             "likelihood": "bernoulli", "classes": "0", **meta}  # fmt: skip
    helper.set_model_props(model, {k: v for k, v in props.items() if v is not None})
    save(model, str(path))
    return path


def decoder(path, classes=0, extra_input=None, **meta):
    """x_prob = sigmoid(z W [+ E[y]] [+ extra_input])."""
    ins, nodes = [_vi("z", ["B", Z])], [helper.make_node("MatMul", ["z", "W"], ["h0"])]
    last, inits = "h0", [("W", W_DEC)]
    if extra_input:  # a foreign input the runtime never feeds
        ins.append(_vi(extra_input, ["B", D]))
        nodes.append(helper.make_node("Add", [last, extra_input], ["h1"]))
        last = "h1"
    if classes:
        ins.append(_vi("y", ["B"], TensorProto.INT64))
        nodes += [
            helper.make_node("Gather", ["E", "y"], ["ey"]),
            helper.make_node("Add", [last, "ey"], ["h2"]),
        ]
        last, inits = "h2", [*inits, ("E", E_DEC)]
    nodes.append(helper.make_node("Sigmoid", [last], ["x_prob"]))
    return _save(path, "decoder", ins, [_vi("x_prob", ["B", D])], nodes, inits, classes=str(classes), **meta)


def encoder(path, classes=0, **meta):
    """mu = x A [+ y], logvar = x B."""
    ins = [_vi("x", ["B", D])]
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["mu0"]),
        helper.make_node("MatMul", ["x", "Bw"], ["logvar"]),
    ]
    if classes:
        ins.append(_vi("y", ["B"], TensorProto.INT64))
        nodes += [
            helper.make_node("Cast", ["y"], ["yf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["yf", "ax1"], ["yc"]),
            helper.make_node("Add", ["mu0", "yc"], ["mu"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["mu0"], ["mu"]))
    inits = [("A", W_MU), ("Bw", W_LV), ("ax1", np.array([1], np.int64))]
    return _save(path, "encoder", ins, [_vi("mu", ["B", Z]), _vi("logvar", ["B", Z])], nodes, inits,
                 classes=str(classes), **meta)  # fmt: skip


def scorer(path, k=0, **meta):
    """neg_elbo = rec + kl, rec = sum(x), kl = sum(eps) over a row; iw_nll = sum(eps_iw) (k > 0): the
    scores show the noise the runtime fed."""
    ins = [_vi("x", ["B", D]), _vi("eps", ["B", Z])] + ([_vi("eps_iw", ["B", k, Z])] if k else [])
    nodes = [
        helper.make_node("ReduceSum", ["x", "ax1"], ["rec"], keepdims=0),
        helper.make_node("ReduceSum", ["eps", "ax1"], ["kl"], keepdims=0),
        helper.make_node("Add", ["rec", "kl"], ["neg_elbo"]),
    ]
    outs = [_vi(n, ["B"]) for n in ("neg_elbo", "rec", "kl")]
    if k:
        nodes.append(helper.make_node("ReduceSum", ["eps_iw", "ax12"], ["iw_nll"], keepdims=0))
        outs.append(_vi("iw_nll", ["B"]))
    inits = [("ax1", np.array([1], np.int64)), ("ax12", np.array([1, 2], np.int64))]
    meta = {"iw_k": str(k), "eval_seed": "5", **meta}
    return _save(path, "scorer", ins, outs, nodes, inits, **meta)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    return {
        "decoder": decoder(d / "dec.onnx"),
        "decoder_c": decoder(d / "dec_c.onnx", classes=C),
        "encoder": encoder(d / "enc.onnx"),
        "encoder_c": encoder(d / "enc_c.onnx", classes=C),
        "scorer": scorer(d / "sc.onnx", k=2),
    }


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def test_hand_built_parts_run_as_numpy_computes_them(parts):
    """The fixtures are sound: each runtime reproduces the float64 numpy value of its graph."""
    z = rng.standard_normal((5, Z))
    np.testing.assert_allclose(Sampler(parts["decoder"]).decode(z), _sigmoid(z @ W_DEC), rtol=1e-5)
    y = np.array([0, 3, 1, 2, 3])
    got = Sampler(parts["decoder_c"]).decode(z, y)
    np.testing.assert_allclose(got, _sigmoid(z @ W_DEC + E_DEC[y]), rtol=1e-5)
    x = rng.random((5, D))
    mu, logvar = Encoder(parts["encoder_c"]).encode(x, y)
    np.testing.assert_allclose(mu, x @ W_MU + y[:, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logvar, x @ W_LV, rtol=1e-5, atol=1e-6)


# ---- item 6 / 13: dtypes ---------------------------------------------------------------------------
BAD_ARRAYS = {
    "complex": lambda shape: np.full(shape, 0.5 + 0.25j),
    "complex with zero imaginary part": lambda shape: np.full(shape, 0.5 + 0j),
    "string": lambda shape: np.full(shape, "0.5"),
    "bytes": lambda shape: np.full(shape, b"0.5"),
    "object": lambda shape: np.full(shape, 0.5, dtype=object),
    "datetime": lambda shape: np.full(shape, np.datetime64("2020-01-01")),
}


@pytest.mark.parametrize("kind", BAD_ARRAYS)
def test_non_real_arrays_are_refused_not_cast(parts, kind):
    """Casting would drop the imaginary part, parse the strings or unpack the objects: each is refused."""
    make = BAD_ARRAYS[kind]
    with pytest.raises(FastVAEError, match="x must hold real numbers"):
        Encoder(parts["encoder"]).encode(make((2, D)))
    with pytest.raises(FastVAEError, match="x must hold real numbers"):
        Scorer(parts["scorer"]).score(make((2, D)))
    with pytest.raises(FastVAEError, match="z must hold real numbers"):
        Sampler(parts["decoder"]).decode(make((2, Z)))
    for part, first in (("encoder_c", rng.random((2, D))), ("decoder_c", rng.standard_normal((2, Z)))):
        call = Encoder(parts[part]).encode if part == "encoder_c" else Sampler(parts[part]).decode
        with pytest.raises(FastVAEError, match="labels"):
            call(first, make((2,)))


def test_string_bool_and_fractional_labels_are_refused(parts):
    enc, x = Encoder(parts["encoder_c"]), rng.random((2, D))
    for labels in (np.array(["1", "2"]), ["1", "2"], np.array([True, False]), np.array([1.5, 2.0]),
                   np.array([np.nan, 1.0]), [[1], [2]], [1, "a"]):  # fmt: skip
        with pytest.raises(FastVAEError, match="labels"):
            enc.encode(x, labels)
    mu = enc.encode(x, np.array([1.0, 3.0]))[0]  # integral floats are labels
    np.testing.assert_allclose(mu, x @ W_MU + np.array([[1.0], [3.0]]), rtol=1e-5, atol=1e-6)


def test_ragged_lists_are_one_error(parts):
    with pytest.raises(FastVAEError, match="not an array of numbers"):
        Encoder(parts["encoder"]).encode([[0.1, 0.2, 0.3, 0.4], [0.1]])
    with pytest.raises(FastVAEError, match="z must"):
        Sampler(parts["decoder"]).decode({"z": 1})


def test_accepted_dtypes_give_the_float64_result(parts):
    """bool (0/1), integers, float16/32/64 and uint8 pixels (/ 255) are real inputs: each is accepted."""
    enc = Encoder(parts["encoder"])
    bits = rng.random((3, D)) < 0.5
    for x, ref in (
        (bits, bits.astype(np.float64)),
        (bits.astype(np.int64), bits.astype(np.float64)),
        (np.array([[0, 128, 255, 7]], np.uint8), np.array([[0, 128, 255, 7]]) / 255.0),
        (np.full((1, D), 0.5, np.float16), np.full((1, D), 0.5)),
    ):
        np.testing.assert_allclose(enc.encode(x)[0], ref @ W_MU, rtol=1e-5, atol=1e-6)
    z = np.arange(2 * Z).reshape(2, Z)  # integer latents
    np.testing.assert_allclose(Sampler(parts["decoder"]).decode(z), _sigmoid(z @ W_DEC), rtol=1e-5)


# ---- item 6 / 13: seeds ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1.7, 1.0, "abc", "3", True, -1, 2**63, 2**70, np.float64(2.0), [1]])
def test_scorer_and_sampler_refuse_seeds_outside_the_integers_0_to_2_63(parts, seed):
    x = rng.random((2, D))
    with pytest.raises(FastVAEError, match=r"seed must be an integer in 0\.\.9223372036854775807"):
        Scorer(parts["scorer"]).score(x, seed=seed)
    with pytest.raises(FastVAEError, match="seed must be an integer"):
        Sampler(parts["decoder"]).sample(2, seed)


def test_scorer_noise_is_fastvae_noise_for_any_seed_in_range(parts):
    """Seeds at the ends of the range (and 2**62, which a 2**64 wrap would not reach) draw fastvae's own
    keyed noise (the torch implementation is the reference), and distinct seeds draw distinct noise."""
    from fastvae.evaluate import EVAL_SALT, IW_SALT
    from fastvae.noise import row_normal

    s, x = Scorer(parts["scorer"]), rng.random((3, D))
    rows = torch.arange(10, 13)
    kls = {}
    for seed in (0, 1, 2**62, 2**63 - 1, np.int64(7)):
        got = s.score(x, seed=seed, row_offset=10)
        ref = row_normal(int(seed), EVAL_SALT, rows, Z).double().sum(1).numpy()
        np.testing.assert_allclose(got["kl"], ref, rtol=1e-5, atol=1e-5)
        ref_iw = row_normal(int(seed), IW_SALT, rows, 2 * Z).double().sum(1).numpy()
        np.testing.assert_allclose(got["iw_nll"], ref_iw, rtol=1e-5, atol=1e-5)
        kls[int(seed)] = tuple(got["kl"])
    assert len(set(kls.values())) == len(kls)
    default = s.score(x, row_offset=10)["kl"]  # the eval_seed metadata: 5
    np.testing.assert_allclose(default, row_normal(5, EVAL_SALT, rows, Z).double().sum(1).numpy(), rtol=1e-5)


@pytest.mark.parametrize("offset", [-1, 1.5, True, "0", 2**63])
def test_scorer_refuses_bad_row_offsets(parts, offset):
    with pytest.raises(FastVAEError, match="row_offset must be an integer"):
        Scorer(parts["scorer"]).score(rng.random((2, D)), row_offset=offset)


def _cli(module, args):
    return subprocess.run([sys.executable, "-m", f"fastvae.export.{module}", *map(str, args)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _one_line(p, needle):
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr and needle in p.stderr, p.stderr


def test_cli_seed_out_of_range_is_one_line(parts, tmp_path):
    np.save(tmp_path / "x.npy", rng.random((2, D)).astype(np.float32))
    _one_line(_cli("score", [parts["scorer"], tmp_path / "x.npy", "--out", tmp_path / "s.csv", "--seed", 2**70]),
              "seed must be an integer in 0..")  # fmt: skip
    _one_line(
        _cli("sample", [parts["decoder"], "--npy", tmp_path / "s.npy", "--seed", 2**64]), "seed must be"
    )
    np.save(tmp_path / "c.npy", np.full((2, D), 0.5 + 0.5j))
    _one_line(_cli("encode", [parts["encoder"], tmp_path / "c.npy", "--out", tmp_path / "mu.npy"]),
              "x must hold real numbers")  # fmt: skip
    assert not any(p.name in ("s.csv", "s.npy", "mu.npy") for p in tmp_path.iterdir())


# ---- item 10: forged parts -------------------------------------------------------------------------
FORGED = {
    "iw_k not an integer": (scorer, {"k": 2, "iw_k": "abc"}, "malformed iw_k metadata"),
    "eval_seed not an integer": (scorer, {"eval_seed": "abc"}, "malformed eval_seed metadata"),
    "eval_seed out of range": (scorer, {"eval_seed": str(2**64)}, "implausible metadata eval_seed"),
    "negative iw_k": (scorer, {"iw_k": "-3"}, "implausible metadata iw_k"),
    "huge iw_k": (scorer, {"iw_k": "1000000"}, "implausible metadata iw_k"),
    "iw_k without an eps_iw input": (
        scorer,
        {"iw_k": "4"},
        "graph inputs x, eps; a fastvae scorer has x, eps, eps_iw",
    ),
    "eps_iw without iw_k": (scorer, {"k": 3, "iw_k": "0"}, "a fastvae scorer has x, eps"),
    "iw_k unlike the graph's K": (scorer, {"k": 3, "iw_k": "5"}, "'eps_iw' has size 3 in dimension 1"),
    "two-input decoder": (decoder, {"extra_input": "w"}, "graph inputs z, w; a fastvae decoder has z"),
    "labels the metadata denies": (decoder, {"classes": C, "_classes": "0"}, "has z (metadata classes=0)"),
    "labels the graph lacks": (decoder, {"_classes": "3"}, "has z, y (metadata classes=3)"),
    "encoder missing logvar": (
        encoder,
        {"_drop": "logvar"},
        "graph outputs mu; a fastvae encoder has mu, logvar",
    ),
    "latent_dim unlike the graph": (encoder, {"latent_dim": "5"}, "'mu' has size 3 in dimension 1"),
}


def _forge(path, case):
    build, kw, _ = FORGED[case]
    kw = dict(kw)
    drop, classes_meta = kw.pop("_drop", None), kw.pop("_classes", None)
    p = build(path, **kw)
    if classes_meta is not None or drop:
        import onnx

        m = onnx.load(str(p))
        if classes_meta is not None:
            helper.set_model_props(m, {**{e.key: e.value for e in m.metadata_props}, "classes": classes_meta})
        if drop:
            keep = [o for o in m.graph.output if o.name != drop]
            del m.graph.output[:]
            m.graph.output.extend(keep)
        save(m, str(p))
    return p


@pytest.mark.parametrize("case", FORGED)
def test_forged_parts_are_one_error(tmp_path, case):
    path = _forge(tmp_path / "forged.onnx", case)
    cls = {"scorer": Scorer, "decoder": Sampler, "encoder": Encoder}[FORGED[case][0].__name__]
    with pytest.raises(FastVAEError, match=FORGED[case][2].replace("(", r"\(").replace(")", r"\)")):
        cls(path)


@pytest.mark.parametrize("case", ["iw_k not an integer", "eval_seed not an integer", "iw_k without an eps_iw input",
                                  "two-input decoder", "encoder missing logvar"])  # fmt: skip
def test_forged_parts_in_the_clis_are_one_line(tmp_path, case):
    path = _forge(tmp_path / "forged.onnx", case)
    np.save(tmp_path / "x.npy", rng.random((2, D)).astype(np.float32))
    module = {"scorer": "score", "decoder": "sample", "encoder": "encode"}[FORGED[case][0].__name__]
    args = (
        ["--npy", tmp_path / "o.npy"]
        if module == "sample"
        else [tmp_path / "x.npy", "--out", tmp_path / "o.npy"]
    )
    _one_line(_cli(module, [path, *args]), FORGED[case][2])


def test_a_graph_that_fails_at_run_time_is_one_error(tmp_path):
    """A graph whose declared inputs check out but that cannot run (a Reshape to a size the batch lacks)
    fails with a FastVAEError naming the file, not onnxruntime's exception."""
    ins = [_vi("x", ["B", D])]
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["mu"]),
        helper.make_node("Reshape", ["x", "shape"], ["logvar"]),
    ]
    path = _save(tmp_path / "bad.onnx", "encoder", ins, [_vi("mu", ["B", Z]), _vi("logvar", ["B", Z])], nodes,
                 [("shape", np.array([-1, Z], np.int64))])  # fmt: skip
    with pytest.raises(FastVAEError, match="the model failed to run"):
        Encoder(path)


# ---- item 8: export --iw bound -----------------------------------------------------------------------
def test_export_iw_is_bounded(tmp_path, capsys):
    from fastvae.cli import main
    from fastvae.export.onnx_export import export_parts
    from fastvae.limits import MAX_SCORER_IW

    for iw in (MAX_SCORER_IW + 1, 10**6, -1, 2.5, True):
        for part in ("scorer", "all"):  # refused before any part is written
            with pytest.raises(FastVAEError, match=f"iw must be an integer in 0..{MAX_SCORER_IW:,}"):
                export_parts(tmp_path / "no-run", tmp_path / "out", part, iw=iw)
    argv = ["export", str(tmp_path), "--part", "scorer", "--iw", "1000000", "--out", str(tmp_path / "s.onnx")]
    assert main(argv) == 2  # argparse's error: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"0..{MAX_SCORER_IW:,}" in err, err
    assert not list(tmp_path.iterdir())


# ---- item 14: the runtime-only install -----------------------------------------------------------------
def test_runtime_install_says_exporting_needs_the_full_package(tmp_path, no_torch_env):
    """The modules the runtime distribution ships (runtime/setup.py's list), alone on the path with torch
    blocked: the runtimes import, and asking for an exporter is one ImportError line naming the package."""
    ns: dict = {}
    src = (ROOT / "runtime" / "setup.py").read_text()
    exec(src[src.index("MODULES = {") : src.index("\nif ")], ns)  # the MODULES table only
    for folder, (target, names) in ns["MODULES"].items():
        (tmp_path / "site" / target).mkdir(parents=True)
        for name in names:
            shutil.copy2(ROOT / folder / name, tmp_path / "site" / target / name)
    # an editable install's finder maps fastvae.export.* to the repository: drop it, so the staged copy
    # (which lacks onnx_export.py, as the runtime wheel does) is all there is
    code = (
        "import os, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        "import fastvae, fastvae.export as e\n"
        "assert fastvae.__file__.startswith(os.environ['SITE']), fastvae.__file__\n"
        "from fastvae.export import Sampler, Scorer, Encoder\n"
        "from fastvae.errors import FastVAEError\n"
        "for name in ('export_decoder', 'export_parts'):\n"
        "    try:\n"
        "        exec(f'from fastvae.export import {name}')\n"
        "    except ImportError as exc:\n"
        "        assert isinstance(exc, FastVAEError) and '\\n' not in str(exc)\n"
        "        print(exc)\n"
    )
    site = str(tmp_path / "site")
    env = {**no_torch_env, "PYTHONPATH": f"{site}:{no_torch_env['PYTHONPATH']}", "SITE": site}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 2 and all(
        "full fastvae package" in ln and "fastvae-engine[export]" in ln for ln in lines
    )
    assert "NO_TORCH" in p.stderr


@pytest.mark.parametrize("cls", [Encoder, Scorer, Sampler])
def test_bad_model_paths_and_threads_are_one_error(parts, cls):
    path = parts[{Encoder: "encoder", Scorer: "scorer", Sampler: "decoder"}[cls]]
    for bad in (123, None, np.zeros(3)):
        with pytest.raises(FastVAEError, match="must be a path"):
            cls(bad)
    for threads in (1.5, "2", True, 0):
        with pytest.raises(FastVAEError, match="threads must be an integer"):
            cls(path, threads=threads)
    assert cls(path, threads=np.int64(1)).threads == 1
