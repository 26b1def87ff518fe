"""The fused Pallas prepare stage of the gated delta rule (forward kernel and its hand-written backward) against
the XLA ``chunk_prepare`` and, end to end, against the token-by-token reference: float64 in the Pallas
interpreter on the CPU (CI); fp32 / bf16 natively on a GPU."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera_jax.ops import gated_delta_rule as gdr
from kernels_pallas.gated_delta_rule import chunk_scan_pallas
from kernels_pallas.gated_delta_rule.chunk_prepare import chunk_prepare_pallas

ON_GPU = jax.default_backend() == "gpu"
SCALE = 0.3


def _inputs(key, b, t, h, dk, dv, dtype):
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (b, t, h, dk), dtype)
    k = jax.random.normal(ks[1], (b, t, h, dk), dtype)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, h, dv), dtype)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h), dtype)) / 4
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h), dtype))
    return q, k, v, g, beta


def _reset(b, t, c):
    """Row 0: document starts inside chunks (at 3, and two in chunk 1: c + 5 and c + 11) and on a chunk edge (2c);
    row 1: none."""
    r = np.zeros((b, t), bool)
    r[0, [3, c + 5, c + 11, 2 * c]] = True
    return jnp.asarray(r)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(b.ravel())
    return float(np.linalg.norm((a - b).ravel()) / (den if den > 0 else 1.0))


def _both(c, **kw):
    """(pallas, xla) as functions of (q, k, v, g, beta, reset) -> ChunkInputs."""
    pal = lambda *a: chunk_prepare_pallas(*a, scale=SCALE, chunk_size=c, **kw)
    ref = lambda *a: gdr.chunk_prepare(*a, scale=SCALE, chunk_size=c)
    return pal, ref


def _vjp(f, x, reset, cots):
    """Gradients of (q, k, v, g, beta) under the given output cotangents, jitted (one compile, not one per op)."""
    return jax.jit(lambda x, reset, cots: jax.vjp(lambda *a: f(*a, reset), *x)[1](cots))(x, reset, cots)


def _check_values_and_grads(b, t, h, dk, dv, c, dtype, tol_fwd, tol_bwd, **kw):
    x = _inputs(jax.random.key(t + dk + dv), b, t, h, dk, dv, dtype)
    reset = _reset(b, t, c)
    pal, ref = _both(c, **kw)
    got_out, ref_out = jax.jit(pal)(*x, reset), jax.jit(ref)(*x, reset)
    for name, a, r in zip(ref_out._fields, got_out, ref_out):
        assert a.shape == r.shape, (name, a.shape, r.shape)
        assert _rel(a, r) < tol_fwd, (name, _rel(a, r))
    assert float(jnp.abs(ref_out.gamma).max()) > 0  # row 1 has no document start: gamma is exercised
    # Random cotangents on all six outputs, so every path of the backward is exercised.
    cks = jax.random.split(jax.random.key(7), 6)
    cots = [jax.random.normal(ck, o.shape, jnp.float32).astype(o.dtype) for ck, o in zip(cks, ref_out)]
    got = _vjp(pal, x, reset, type(ref_out)(*(ct.astype(o.dtype) for ct, o in zip(cots, got_out))))
    exp = _vjp(ref, x, reset, type(ref_out)(*cots))
    for name, a, r in zip("q k v g beta".split(), got, exp):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert not bool(jnp.isnan(a).any()), name
        assert _rel(a, r) < tol_bwd, (name, _rel(a, r))


@pytest.mark.skipif(ON_GPU, reason="float64 interpreter check; the GPU runs the native cases below")
def test_float64_matches_xla_prepare():
    """leaf < c: the diagonal-block series and their block-series combination; k != v catches swapped dims."""
    with jax.enable_x64(True):
        _check_values_and_grads(2, 48, 2, 16, 32, 16, jnp.float64, 1e-10, 1e-9, leaf=4)


@pytest.mark.skipif(ON_GPU, reason="interpreter check")
def test_float32_matches_xla_prepare():
    """leaf = c: a single diagonal block (the plain series)."""
    _check_values_and_grads(2, 48, 1, 16, 16, 16, jnp.float32, 1e-5, 1e-4)


def test_bf16_outputs_and_errors():
    """bf16 inputs give bf16 outputs by default (gamma stays float32), also with bf16 operands for T rhs;
    bad shapes name the field."""
    x = _inputs(jax.random.key(1), 1, 16, 1, 16, 16, jnp.bfloat16)
    ref = gdr.chunk_prepare(*x, jnp.zeros((1, 16), bool), scale=SCALE, chunk_size=16)
    for solve_dtype in (None, jnp.bfloat16):
        out = chunk_prepare_pallas(*x, jnp.zeros((1, 16), bool), scale=SCALE, chunk_size=16, solve_dtype=solve_dtype)
        assert out.u_tilde.dtype == jnp.bfloat16 and out.p.dtype == jnp.bfloat16 and out.gamma.dtype == jnp.float32
        for name, a, r in zip(ref._fields, out, ref):
            assert _rel(a, r) < 2e-2, (name, solve_dtype)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_prepare_pallas(*x, jnp.zeros((1, 16), bool), scale=SCALE, chunk_size=12)
    with pytest.raises(ValueError, match="reset"):
        chunk_prepare_pallas(*x, jnp.zeros((1, 8), bool), scale=SCALE, chunk_size=16)
    with pytest.raises(ValueError, match="inv_precision"):
        chunk_prepare_pallas(*x, jnp.zeros((1, 16), bool), scale=SCALE, chunk_size=16, inv_precision="tf32")


def _op(impl_prepare, seg, c, in_dtype, monkeypatch):
    """The chunked op with the Pallas scan and the given prepare stage, as a function of the inputs (through a
    ``prepare=`` argument where ``gated_delta_rule_chunked`` has one, else by swapping the module's
    ``chunk_prepare`` while tracing)."""
    takes_prepare = "prepare" in inspect.signature(gdr.gated_delta_rule_chunked).parameters

    def f(q, k, v, g, beta, s0):
        cast = lambda y: y.astype(in_dtype)
        kw = dict(scale=SCALE, initial_state=s0, segment_ids=seg, chunk_size=c, scan=chunk_scan_pallas)
        if takes_prepare:
            return gdr.gated_delta_rule_chunked(cast(q), cast(k), cast(v), g, cast(beta), prepare=impl_prepare, **kw)
        with monkeypatch.context() as m:
            m.setattr(gdr, "chunk_prepare", impl_prepare)
            return gdr.gated_delta_rule_chunked(cast(q), cast(k), cast(v), g, cast(beta), **kw)
    return f


def _check_end_to_end(b, t, h, d, c, in_dtype, comp_dtype, tol, monkeypatch):
    q, k, v, g, beta = _inputs(jax.random.key(t), b, t, h, d, d, comp_dtype)
    s0 = jax.random.normal(jax.random.key(3), (b, h, d, d), comp_dtype) * 0.5
    seg = np.repeat(np.arange(1, 5), -(-t // 4))[None, :t].repeat(b, 0)
    seg[0, : t // 3] = 9  # boundaries off the chunk edges, different per row
    seg = jnp.asarray(seg)
    ref_f = lambda *a: gdr.gated_delta_rule_reference(*a[:5], scale=SCALE, initial_state=a[5], segment_ids=seg)
    got_f = _op(chunk_prepare_pallas, seg, c, in_dtype, monkeypatch)
    loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a)[0].astype(comp_dtype))) + jnp.sum(jnp.cos(f(*a)[1])))
    x = (q, k, v, g, beta, s0)
    got, ref = jax.jit(got_f)(*x), jax.jit(ref_f)(*x)
    assert _rel(got[0], ref[0]) < tol and _rel(got[1], ref[1]) < tol
    gg = jax.jit(jax.grad(loss(got_f), argnums=range(6)))(*x)
    gr = jax.jit(jax.grad(loss(ref_f), argnums=range(6)))(*x)
    for name, a, r in zip("q k v g beta initial_state".split(), gg, gr):
        assert not bool(jnp.isnan(a).any()), name
        assert _rel(a, r) < tol, (name, _rel(a, r))


@pytest.mark.skipif(ON_GPU, reason="float64 interpreter check")
def test_end_to_end_with_pallas_scan_float64(monkeypatch):
    """Padded length (t = 29 with c = 8), packed documents, an initial state; values and all six gradients."""
    with jax.enable_x64(True):
        _check_end_to_end(2, 29, 2, 8, 8, jnp.float64, jnp.float64, 1e-10, monkeypatch)


def test_benchmark_smoke(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    import bench_gdn_prepare

    if ON_GPU:
        pytest.skip("the smoke run is the CPU interpreter path")
    rows = bench_gdn_prepare.main(["--smoke", "--remat", "default", "--out", str(tmp_path)])
    assert [r["impl"] for r in rows] == ["xla", "pallas"]
    assert all("error" not in r for r in rows), rows
    assert rows[1]["ok"] and rows[1]["prep_fwd_bwd_ms"] > 0
    assert (tmp_path / "bench_gdn_prepare.md").read_text().count("| 1, ") == 2


@pytest.mark.skipif(ON_GPU, reason="the GPU compiles the kernels for real in the native tests")
@pytest.mark.parametrize("d,dtype,kw", [(128, "bfloat16", {}),
                                        (64, "float32", dict(inv_precision="tf32x3"))])
def test_lowers_to_triton_on_cpu(d, dtype, kw, monkeypatch):
    """Both kernels lower to Triton IR (every op in them has a Triton lowering rule, the block shapes pass the
    Triton builder) without a GPU, by declaring an H100 to the Pallas Triton lowering. Not checked here: the
    Triton compile to PTX and the run."""
    try:
        from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg
        info = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
    except (ImportError, AttributeError) as e:  # private API: a JAX upgrade may move it
        pytest.skip(f"Pallas Triton internals moved: {e}")
    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda *a, **k: info)
    b, t, h = 1, 128, 2
    sds = jax.ShapeDtypeStruct
    x = [sds((b, t, h, d), dtype)] * 3 + [sds((b, t, h), "float32"), sds((b, t, h), dtype), sds((b, t), bool)]

    def fwd_bwd(q, k, v, g, beta, reset):
        f = lambda *a: chunk_prepare_pallas(*a, reset, scale=SCALE, chunk_size=64, interpret=False, **kw)
        out, vjp = jax.vjp(f, q, k, v, g, beta)
        return vjp(out)

    text = jax.jit(fwd_bwd).trace(*x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel


@pytest.mark.skipif(not ON_GPU, reason="native kernel needs a GPU")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("in_dtype,tol,kw", [("float32", 2e-3, {}), ("bfloat16", 3e-2, {}),
                                             ("bfloat16", 3e-2, {"inv_precision": "tf32x3"})])
def test_native_gpu(d, in_dtype, tol, kw):
    dt = jnp.dtype(in_dtype)
    x = _inputs(jax.random.key(d), 2, 256, 2, d, d, jnp.float32)
    reset = _reset(2, 256, 64)
    xd = [y.astype(dt) if i != 3 else y for i, y in enumerate(x)]  # g stays float32, as in the models
    pal, ref = _both(64, **kw)
    got_out, ref_out = jax.jit(pal)(*xd, reset), jax.jit(ref)(*x, reset)
    for name, a, r in zip(ref_out._fields, got_out, ref_out):
        assert _rel(a, r) < tol, (name, _rel(a, r))
    cots = [jax.random.normal(jax.random.key(i), o.shape, jnp.float32) for i, o in enumerate(ref_out)]
    got = _vjp(pal, xd, reset, type(ref_out)(*(ct.astype(o.dtype) for ct, o in zip(cots, got_out))))
    exp = _vjp(ref, x, reset, type(ref_out)(*cots))
    for name, a, r in zip("q k v g beta".split(), got, exp):
        assert _rel(a, r) < tol, (name, _rel(a, r))


@pytest.mark.skipif(not ON_GPU, reason="native kernel needs a GPU")
def test_native_gpu_refuses_the_pair_that_does_not_complete():
    x = [y.astype(jnp.bfloat16) for y in _inputs(jax.random.key(0), 2, 256, 1, 64, 64, jnp.float32)]
    with pytest.raises(NotImplementedError, match="tf32x3"):
        chunk_prepare_pallas(*x, _reset(2, 256, 64), scale=SCALE, chunk_size=64, inv_precision="tf32x3",
                             solve_dtype="bfloat16")


@pytest.mark.skipif(not ON_GPU, reason="native kernel needs a GPU")
def test_native_gpu_end_to_end(monkeypatch):
    _check_end_to_end(2, 300, 2, 64, 64, jnp.bfloat16, jnp.float32, 3e-2, monkeypatch)
