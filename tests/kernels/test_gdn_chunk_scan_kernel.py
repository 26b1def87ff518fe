"""The Pallas inter-chunk scan of the gated delta rule (forward and its custom backward) against the
token-by-token reference: float64 in the Pallas interpreter on the CPU (CI); fp32 / bf16 natively on a GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera_jax.ops.gated_delta_rule import gated_delta_rule

ON_GPU = jax.default_backend() == "gpu"


def _inputs(key, b, t, h, d, dtype):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, t, h, d), dtype)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, h, d), dtype)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h), dtype)) / 4
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h), dtype))
    s0 = jax.random.normal(ks[5], (b, h, d, d), dtype) * 0.5
    return q, k, v, g, beta, s0


def _rel(a, b):
    a, b = a.astype(jnp.float64 if a.dtype == jnp.float64 else jnp.float32), b.astype(a.dtype if a.dtype == jnp.float64 else jnp.float32)
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def _run(impl, seg, c, in_dtype, ut_inverse="pallas"):
    def f(q, k, v, g, beta, s0):
        cast = lambda x: x.astype(in_dtype)
        o, s = gated_delta_rule(cast(q), cast(k), cast(v), g, cast(beta), initial_state=s0,
                                output_final_state=True, segment_ids=seg, impl=impl, chunk_size=c,
                                ut_inverse=ut_inverse)
        return o, s
    return f


def _loss(f):
    return lambda *a: jnp.sum(jnp.sin(f(*a)[0].astype(a[0].dtype))) + jnp.sum(jnp.cos(f(*a)[1]))


def _check(b, t, h, d, c, in_dtype, comp_dtype, tol, packed, ut_inverse="pallas"):
    q, k, v, g, beta, s0 = _inputs(jax.random.key(t + d), b, t, h, d, comp_dtype)
    seg = None
    if packed:
        seg = jnp.asarray(np.repeat(np.arange(1, 5), -(-t // 4))[None, :t].repeat(b, 0))
        seg = seg.at[0, : t // 3].set(9)  # boundaries off the chunk edges, different per row
    got = _run("pallas", seg, c, in_dtype, ut_inverse)(q, k, v, g, beta, s0)
    ref = _run("reference", seg, c, comp_dtype)(q, k, v, g, beta, s0)
    assert _rel(got[0], ref[0]) < tol and _rel(got[1], ref[1]) < tol
    gg = jax.jit(jax.grad(_loss(_run("pallas", seg, c, in_dtype, ut_inverse)), argnums=range(6)))(
        q, k, v, g, beta, s0)
    gr = jax.jit(jax.grad(_loss(_run("reference", seg, c, comp_dtype)), argnums=range(6)))(q, k, v, g, beta, s0)
    for name, a, r in zip("q k v g beta initial_state".split(), gg, gr):
        assert not bool(jnp.isnan(a).any()), name
        assert _rel(a, r) < tol, (name, _rel(a, r))


@pytest.mark.skipif(ON_GPU, reason="float64 interpreter check; the GPU runs the native cases below")
@pytest.mark.parametrize("b,t,h,d,c,packed,ut_inverse", [(2, 29, 2, 8, 8, True, "xla"),
                                                         (1, 16, 1, 16, 8, False, "xla"),
                                                         (1, 70, 2, 8, 32, True, "pallas")])
def test_interpreted_float64(b, t, h, d, c, packed, ut_inverse):
    with jax.enable_x64(True):
        _check(b, t, h, d, c, jnp.float64, jnp.float64, 1e-10, packed, ut_inverse)


@pytest.mark.skipif(not ON_GPU, reason="native kernel needs a GPU")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("in_dtype,tol", [("float32", 2e-3), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("ut_inverse", ["xla", "pallas"])
def test_native_gpu(d, in_dtype, tol, ut_inverse):
    _check(2, 300, 2, d, 64, jnp.dtype(in_dtype), jnp.float32, tol, True, ut_inverse)


@pytest.mark.skipif(ON_GPU, reason="float64 interpreter check")
def test_interpreted_float64_narrow_v_blocks(monkeypatch):
    """The scan kernels with v split over several programs of 16 columns (chunk_scan.VBLOCK, swept by the
    benchmark at small b*h) still match the reference, values and gradients."""
    from kernels_pallas.gated_delta_rule import chunk_scan

    monkeypatch.setattr(chunk_scan, "VBLOCK", 16)
    with jax.enable_x64(True):
        _check(1, 40, 2, 32, 8, jnp.float64, jnp.float64, 1e-10, True)
    monkeypatch.setattr(chunk_scan, "VBLOCK", 24)
    with pytest.raises(ValueError, match="VBLOCK"):
        chunk_scan._vblock(4, 32)


@pytest.mark.skipif(ON_GPU, reason="interpreter check of the bf16 path; the GPU runs it natively above")
def test_interpreted_bfloat16_path():
    """bf16 inputs take the kernels' low-precision route (bf16 operands and chunk inputs, float32 state):
    values and gradients stay within bf16 error of the float32 reference."""
    _check(1, 40, 2, 16, 8, jnp.dtype("bfloat16"), jnp.float32, 3e-2, True)


@pytest.mark.skipif(ON_GPU, reason="the smoke run is the CPU interpreter path")
def test_benchmark_smoke(tmp_path, monkeypatch):
    """experiments/bench_gdn.py's jax and stage runs and its report, at one tiny shape in the interpreter."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "experiments"))
    import bench_gdn

    monkeypatch.setattr(bench_gdn, "SHAPES", [(1, 128, 2, 64)])
    monkeypatch.setattr(bench_gdn, "VB_SWEEP", [16])
    monkeypatch.setattr(bench_gdn, "INV_WARPS", [2])
    monkeypatch.setenv("GDN_IMPLS", "ours-pallas")
    bench_gdn.bench_jax(str(tmp_path / "jax.json"))
    bench_gdn.bench_stages(str(tmp_path / "stages.json"))
    bench_gdn.report(str(tmp_path), str(tmp_path / "jax.json"), str(tmp_path / "stages.json"))
    table = (tmp_path / "bench_gdn.md").read_text()
    assert "| B, T, H, D | ours-pallas |" in table and "| 1, 128, 2, 64 | " in table
    assert "scan_fwd_bwd_ms" in table and " err |" not in table and "## errors" not in table
    assert "scan_fwd_bwd_ms_vb16" in table and "inverse_ms_pallas_w2" in table
    del sys.modules["bench_gdn"]
