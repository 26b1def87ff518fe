"""The TPU (Mosaic) variant of the gated delta rule's inter-chunk scan, run on the CPU in the Pallas TPU
interpreter: values and all six gradients against the token-by-token reference, the scan alone against the
plain-JAX scan and the GPU kernel (interpreted), and the Pallas -> Mosaic TPU lowering (no TPU needed for it)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera_jax.ops.gated_delta_rule import (chunk_prepare, chunk_scan_xla, gated_delta_rule_chunked,
                                              gated_delta_rule_reference)
from chimera_jax.ops.common import resets
from kernels_pallas.gated_delta_rule import chunk_scan_tpu as tpu_scan
from kernels_pallas.gated_delta_rule.chunk_scan import chunk_scan_pallas


def _inputs(key, b, t, h, dk, dv, dtype):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (b, t, h, dk), dtype)
    k = jax.random.normal(ks[1], (b, t, h, dk), dtype)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, h, dv), dtype)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h), dtype)) / 4
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h), dtype))
    s0 = jax.random.normal(ks[5], (b, h, dk, dv), dtype) * 0.5  # a non-zero initial state
    return q, k, v, g, beta, s0


def _packed(b, t):
    seg = np.repeat(np.arange(1, 4), -(-t // 3))[None, :t].repeat(b, 0)
    seg[0, : t // 5] = 9  # document starts off the chunk edges, different per row
    return jnp.asarray(seg)


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def _op(scan, c, seg):
    def f(q, k, v, g, beta, s0):
        return (gated_delta_rule_chunked(q, k, v, g, beta, scale=q.shape[-1] ** -0.5, initial_state=s0,
                                         segment_ids=seg, chunk_size=c, scan=scan) if scan is not None else
                gated_delta_rule_reference(q, k, v, g, beta, scale=q.shape[-1] ** -0.5, initial_state=s0,
                                           segment_ids=seg))
    return f


def _loss(f):
    def loss(*a):
        o, s = f(*a)
        return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(s))
    return loss


TPU_SCAN = functools.partial(tpu_scan.chunk_scan_pallas_tpu, interpret=True)


def test_values_and_gradients_match_reference():
    """Packed documents, non-zero initial state, 4 chunks; forward and the custom backward kernel. float32
    (full-precision matmuls): the TPU interpreter, like a TPU, has no float64."""
    b, t, h, d, c, tol = 1, 64, 2, 64, 16, 2e-5
    args = _inputs(jax.random.key(0), b, t, h, d, d, jnp.float32)
    seg = _packed(b, t)
    got, ref = _op(TPU_SCAN, c, seg)(*args), _op(None, c, seg)(*args)
    assert got[0].dtype == ref[0].dtype and got[1].dtype == ref[1].dtype
    assert _rel(got[0], ref[0]) < tol and _rel(got[1], ref[1]) < tol, (_rel(got[0], ref[0]), _rel(got[1], ref[1]))
    gg = jax.grad(_loss(_op(TPU_SCAN, c, seg)), argnums=range(6))(*args)
    gr = jax.grad(_loss(_op(None, c, seg)), argnums=range(6))(*args)
    for name, a, r in zip("q k v g beta initial_state".split(), gg, gr):
        assert not bool(jnp.isnan(a).any()), name
        assert _rel(a, r) < tol, (name, _rel(a, r))


def test_scan_matches_xla_scan_and_gpu_kernel_with_two_v_blocks():
    """v = 256 gives two 128-wide v-blocks (the per-block partial sums of the backward are added up); the
    scan alone against the plain-JAX scan and the GPU kernel in its interpreter, values and VJP."""
    b, t, h, dk, dv, c = 1, 64, 2, 64, 256, 32
    q, k, v, g, beta, s0 = _inputs(jax.random.key(1), b, t, h, dk, dv, jnp.float32)
    ci = chunk_prepare(q, k, v, g, beta, resets(None, b, t), scale=dk ** -0.5, chunk_size=c)
    got = TPU_SCAN(ci, s0)
    ref = chunk_scan_xla(ci, s0)
    gpu = chunk_scan_pallas(ci, s0, interpret=True)
    for a, r, p in zip(got, ref, gpu):
        assert a.shape == r.shape
        assert _rel(a, r) < 2e-6 and _rel(a, p) < 2e-6, (_rel(a, r), _rel(a, p))
    cot = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype), ref)
    vg = jax.vjp(TPU_SCAN, ci, s0)[1](cot)
    vr = jax.vjp(chunk_scan_xla, ci, s0)[1](cot)
    for a, r in zip(jax.tree.leaves(vg), jax.tree.leaves(vr)):
        assert _rel(a, r) < 2e-6, _rel(a, r)


@pytest.mark.parametrize("mm_dtype", ["float32", "bfloat16"])
def test_lowers_to_mosaic_tpu(mm_dtype):
    """Pallas -> Mosaic TPU lowering on the CPU (checks the (8, 128) block rule and every op's lowering rule;
    Mosaic's own compilation needs a TPU and is not run here)."""
    r, t, c, dk, dv = 2, 128, 64, 128, 256
    io = jnp.dtype(mm_dtype)
    z = lambda *s, d=io: jnp.zeros(s, d)
    ins = (z(r, t, dv), z(r, t, dk), z(r, t, dk), z(r, t, c), z(r, t, dk), z(r, t, d=jnp.float32))
    kw = dict(c=c, mm_dtype=io, interpret=False)
    fwd = jax.jit(functools.partial(tpu_scan.scan_fwd_call_tpu, **kw))
    bwd = jax.jit(functools.partial(tpu_scan.scan_bwd_call_tpu, **kw))
    f32 = dict(d=jnp.float32)
    for fn, args in ((fwd, ins + (z(r, dk, dv, **f32),)),
                     (bwd, ins + (z(r, t // c, dk, dv, **f32), z(r, t, dv, **f32), z(r, dk, dv, **f32)))):
        text = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
        assert "tpu_custom_call" in text


def test_bad_chunk_size_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 8"):
        tpu_scan.check_tiling(2, 48, 12, 64, 64)
    with pytest.raises(ValueError, match="must divide"):
        tpu_scan.check_tiling(2, 50, 16, 64, 64)
