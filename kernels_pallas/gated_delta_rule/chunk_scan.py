"""Pallas kernels for the serial part of the chunkwise gated delta rule: the inter-chunk state scan.

The intra-chunk work (the UT transform, the masked q k^T) is parallel over chunks and runs as batched XLA
matmuls (``chimera_jax.ops.gated_delta_rule.chunk_prepare``). What remains is, per (b, h) and chunk n:

    U_n   = U~_n - W_n S_n                 # [c v]: corrected values
    O_n   = Q^_n S_n + P_n U_n             # [c v]: outputs
    S_n+1 = gamma_n S_n + Kd_n^T U_n       # [k v]: state, float32

One program owns one (b h, v-block) pair and walks its chunks in order, keeping S in registers. The backward
kernel walks them in reverse with the adjoint state dS, re-deriving U_n from the states S_n the forward saved:

    dU    = P^T dO + Kd dS                 dU~ = dU        dW = -dU S^T     dQ^ = dO S^T
    dP    = dO U^T                         dKd = U dS^T    dgamma = <S, dS>
    dS    <- Q^^T dO - W^T dU + gamma dS

dW, dQ^, dP, dKd and dgamma sum over v; with several v-blocks each block writes a partial that XLA adds up.
``gamma`` travels repeated over the c positions of its chunk (a [t] vector rather than [n]) so that every
load and store in the kernels is a power-of-two tile, as the GPU lowering wants.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _mm(a, b, *, ta=False, tb=False, mm_dtype):
    """A matmul on mm_dtype operands (bf16 tensor cores for bf16 inputs) with a float32 (or f64) result."""
    return pltriton.dot(a.astype(mm_dtype), b.astype(mm_dtype), trans_a=ta, trans_b=tb,
                        precision=jax.lax.Precision.HIGHEST if mm_dtype != jnp.bfloat16 else None)


def _fwd_kernel(ut_ref, w_ref, qh_ref, p_ref, kd_ref, gam_ref, s0_ref, o_ref, st_ref, states_ref, *,
                c, n_chunks, mm_dtype):
    mm = functools.partial(_mm, mm_dtype=mm_dtype)
    acc = st_ref.dtype

    def body(n, s):  # s: [k vb]
        rows = pl.ds(n * c, c)
        states_ref[n] = s
        u = ut_ref[rows, :].astype(acc) - mm(w_ref[rows, :], s)  # [c vb]
        o = mm(qh_ref[rows, :], s) + mm(p_ref[rows, :], u)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        gamma = jnp.max(gam_ref[rows].astype(acc))  # the c entries are equal
        return gamma * s + mm(kd_ref[rows, :], u, ta=True)

    s = jax.lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(acc))
    st_ref[...] = s


def _bwd_kernel(ut_ref, w_ref, qh_ref, p_ref, kd_ref, gam_ref, states_ref, do_ref, dst_ref,
                dut_ref, dw_ref, dqh_ref, dp_ref, dkd_ref, dgam_ref, ds0_ref, *, c, n_chunks, mm_dtype):
    mm = functools.partial(_mm, mm_dtype=mm_dtype)
    acc = ds0_ref.dtype

    def body(i, ds):  # ds: [k vb], the adjoint of the state at the end of chunk n
        n = n_chunks - 1 - i
        rows = pl.ds(n * c, c)
        s = states_ref[n].astype(acc)
        w = w_ref[rows, :]
        u = ut_ref[rows, :].astype(acc) - mm(w, s)
        do = do_ref[rows, :].astype(acc)
        du = mm(p_ref[rows, :], do, ta=True) + mm(kd_ref[rows, :], ds)  # [c vb]
        dut_ref[rows, :] = du.astype(dut_ref.dtype)
        dw_ref[rows, :] = (-mm(du, s, tb=True)).astype(dw_ref.dtype)
        dqh_ref[rows, :] = mm(do, s, tb=True).astype(dqh_ref.dtype)
        dp_ref[rows, :] = mm(do, u, tb=True).astype(dp_ref.dtype)
        dkd_ref[rows, :] = mm(u, ds, tb=True).astype(dkd_ref.dtype)
        dgam_ref[rows] = jnp.broadcast_to(jnp.sum(s * ds), (c,)).astype(dgam_ref.dtype)
        gamma = jnp.max(gam_ref[rows].astype(acc))
        return mm(qh_ref[rows, :], do, ta=True) - mm(w, du, ta=True) + gamma * ds

    ds = jax.lax.fori_loop(0, n_chunks, body, dst_ref[...].astype(acc))
    ds0_ref[...] = ds


def _vblock(r, dv):
    """v-columns per program: 64, or 32 when (b*h) alone gives under ~2 waves of programs on the chip; the
    chunk chain is serial, so programs are the only parallelism left."""
    vb = min(dv, 64)
    if r * (dv // vb) < 264 and dv >= 64:
        vb = 32
    return vb


def _compiler_params(dk):
    return pltriton.CompilerParams(num_warps=8 if dk >= 128 else 4, num_stages=1)


def _scan_fwd_call(ut, w, qh, p, kd, gam, s0, *, c, mm_dtype, interpret):
    """Flat layout: ut [r t v], w/qh/kd [r t k], p [r t c], gam [r t], s0 [r k v] (r = b*h)."""
    r, t, dv = ut.shape
    dk = w.shape[-1]
    n = t // c
    vb = _vblock(r, dv)
    acc = s0.dtype
    row = lambda width: pl.BlockSpec((None, t, width), lambda i, j: (i, 0, 0))
    vcol = pl.BlockSpec((None, t, vb), lambda i, j: (i, 0, j))
    kv = pl.BlockSpec((None, dk, vb), lambda i, j: (i, 0, j))
    kernel = functools.partial(_fwd_kernel, c=c, n_chunks=n, mm_dtype=mm_dtype)
    return pl.pallas_call(
        kernel,
        grid=(r, dv // vb),
        in_specs=[vcol, row(dk), row(dk), row(c), row(dk), pl.BlockSpec((None, t), lambda i, j: (i, 0)), kv],
        out_specs=[vcol, kv, pl.BlockSpec((None, n, dk, vb), lambda i, j: (i, 0, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((r, t, dv), acc), jax.ShapeDtypeStruct((r, dk, dv), acc),
                   jax.ShapeDtypeStruct((r, n, dk, dv), acc)],
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(dk),
        name="gdn_chunk_scan_fwd",
    )(ut, w, qh, p, kd, gam, s0)


def _scan_bwd_call(ut, w, qh, p, kd, gam, states, do, dst, *, c, mm_dtype, interpret):
    r, t, dv = ut.shape
    dk = w.shape[-1]
    n = t // c
    vb = _vblock(r, dv)
    nv = dv // vb
    acc = dst.dtype
    row = lambda width: pl.BlockSpec((None, t, width), lambda i, j: (i, 0, 0))
    vcol = pl.BlockSpec((None, t, vb), lambda i, j: (i, 0, j))
    kv = pl.BlockSpec((None, dk, vb), lambda i, j: (i, 0, j))
    part = lambda width: pl.BlockSpec((None, None, t, width), lambda i, j: (j, i, 0, 0))
    kernel = functools.partial(_bwd_kernel, c=c, n_chunks=n, mm_dtype=mm_dtype)
    sds = jax.ShapeDtypeStruct
    return pl.pallas_call(
        kernel,
        grid=(r, nv),
        in_specs=[vcol, row(dk), row(dk), row(c), row(dk), pl.BlockSpec((None, t), lambda i, j: (i, 0)),
                  pl.BlockSpec((None, n, dk, vb), lambda i, j: (i, 0, 0, j)), vcol, kv],
        out_specs=[vcol, part(dk), part(dk), part(c), part(dk),
                   pl.BlockSpec((None, None, t), lambda i, j: (j, i, 0)), kv],
        out_shape=[sds((r, t, dv), acc), sds((nv, r, t, dk), acc), sds((nv, r, t, dk), acc),
                   sds((nv, r, t, c), acc), sds((nv, r, t, dk), acc), sds((nv, r, t), acc), sds((r, dk, dv), acc)],
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(dk),
        name="gdn_chunk_scan_bwd",
    )(ut, w, qh, p, kd, gam, states, do, dst)


def differentiable_scan(fwd_call, bwd_call):
    """The scan over flat [r t .] inputs as a ``custom_vjp`` from one backend's forward and backward calls.

    ``fwd_call(ut, w, qh, p, kd, gam, s0, *, c, mm_dtype, interpret) -> (o, s_T, chunk-start states)`` and
    ``bwd_call(..., states, do, dst, ...)`` returning per-v-block partial gradients [nv r t .] (this GPU file's
    ``_scan_fwd_call`` / ``_scan_bwd_call``, or the TPU ones in ``chunk_scan_tpu.py``).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
    def scan(ut, w, qh, p, kd, gam, s0, c, mm_dtype, interpret):
        o, st, _ = fwd_call(ut, w, qh, p, kd, gam, s0, c=c, mm_dtype=mm_dtype, interpret=interpret)
        return o, st

    def scan_fwd(ut, w, qh, p, kd, gam, s0, c, mm_dtype, interpret):
        o, st, states = fwd_call(ut, w, qh, p, kd, gam, s0, c=c, mm_dtype=mm_dtype, interpret=interpret)
        return (o, st), (ut, w, qh, p, kd, gam, states)

    def scan_bwd(c, mm_dtype, interpret, res, cot):
        ut, w, qh, p, kd, gam, states = res
        do, dst = cot
        dut, dw, dqh, dp, dkd, dgam, ds0 = bwd_call(ut, w, qh, p, kd, gam, states, do.astype(dst.dtype), dst,
                                                    c=c, mm_dtype=mm_dtype, interpret=interpret)
        # gam is repeated over the c positions of a chunk and the forward read it once per chunk: its gradient
        # belongs on one of the copies only.
        r, t = gam.shape
        dgam = dgam.sum(0).reshape(r, t // c, c)
        dgam = jnp.zeros_like(dgam).at[..., 0].set(dgam[..., 0]).reshape(r, t)
        return (dut.astype(ut.dtype), dw.sum(0).astype(w.dtype), dqh.sum(0).astype(qh.dtype),
                dp.sum(0).astype(p.dtype), dkd.sum(0).astype(kd.dtype), dgam.astype(gam.dtype), ds0)

    scan.defvjp(scan_fwd, scan_bwd)
    return scan


def run_scan(scan, ci, s0, mm_dtype, interpret):
    """ci [b h n c .] and s0 [b h k v] -> the flat [r t .] operands of ``scan`` -> (o [b h n c v], s_T)."""
    b, h, n, c, dv = ci.u_tilde.shape
    dk = ci.w.shape[-1]
    acc = s0.dtype
    mm_dtype = jnp.dtype(mm_dtype or acc)
    io = mm_dtype if mm_dtype == jnp.bfloat16 else acc  # bf16 models stream bf16 operands

    def flat(x, width):
        return x.reshape(b * h, n * c, width).astype(io)

    ut, w, qh, kd = flat(ci.u_tilde, dv), flat(ci.w, dk), flat(ci.q_hat, dk), flat(ci.k_dec, dk)
    p = flat(ci.p, c)
    gam = jnp.repeat(ci.gamma.reshape(b * h, n).astype(acc), c, axis=1)  # [r t]
    o, st = scan(ut, w, qh, p, kd, gam, s0.reshape(b * h, dk, dv), c, mm_dtype, interpret)
    return o.reshape(b, h, n, c, dv), st.reshape(b, h, dk, dv)


_scan = differentiable_scan(_scan_fwd_call, _scan_bwd_call)


def chunk_scan_pallas(ci, s0, *, mm_dtype=None, interpret=None):
    """Drop-in for ``chunk_scan_xla``: ci holds [b h n c .] arrays, s0 [b h k v]; returns (o [b h n c v], s_T).

    mm_dtype: operand dtype of the kernel's matmuls (bf16 for bf16 models; default the compute dtype).
    interpret: run the kernel in the Pallas interpreter (default: whenever the backend is not a GPU).
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return run_scan(_scan, ci, s0, mm_dtype, bool(interpret))
