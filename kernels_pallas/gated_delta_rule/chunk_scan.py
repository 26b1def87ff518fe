"""Pallas kernels for the serial part of the chunkwise gated delta rule: the inter-chunk state scan.

The intra-chunk work (the UT transform, the masked q k^T) is parallel over chunks and runs as batched XLA
matmuls (``chimera_jax.ops.gated_delta_rule.chunk_prepare``). What remains is, per (b, h) and chunk n:

    U_n   = U~_n - W_n S_n                 # [c v]: corrected values
    O_n   = Q^_n S_n + P_n U_n             # [c v]: outputs
    S_n+1 = gamma_n S_n + Kd_n^T U_n       # [k v]: state, float32

One program owns one (b h, v-block) pair and walks its chunks in order, keeping S in registers; it also writes
the chunk-start states S_n and U_n for the backward. The backward kernel walks the chunks in reverse carrying
only the adjoint state dS (the serial part):

    dU    = P^T dO + Kd dS                 dU~ = dU
    dS    <- Q^^T dO - W^T dU + gamma dS

and writes dU and every chunk-end dS. The gradients that sum over v are then batched XLA products over all
chunks at once, with no per-v-block partial sums:

    dW = -dU S^T    dQ^ = dO S^T    dP = dO U^T    dKd = U dS^T    dgamma = <S, dS>

For bf16 models the matmul operands, o, S_n and U_n are bf16; the carried state and all accumulation are float32.
``gamma`` travels repeated over the c positions of its chunk (a [t] vector rather than [n]) so that every
load and store in the kernels is a power-of-two tile, as the GPU lowering wants.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from chimera_jax.ops.gated_delta_rule import chunk_matmul


def _mm(a, b, *, ta=False, tb=False, mm_dtype):
    """A matmul on mm_dtype operands (bf16 tensor cores for bf16 inputs) with a float32 (or f64) result."""
    return pltriton.dot(a.astype(mm_dtype), b.astype(mm_dtype), trans_a=ta, trans_b=tb,
                        precision=jax.lax.Precision.HIGHEST if mm_dtype != jnp.bfloat16 else None)


def _fwd_kernel(ut_ref, w_ref, qh_ref, p_ref, kd_ref, gam_ref, s0_ref, o_ref, st_ref, states_ref, *u_ref,
                c, n_chunks, mm_dtype):
    mm = functools.partial(_mm, mm_dtype=mm_dtype)
    acc = st_ref.dtype

    def body(n, s):  # s: [k vb]
        rows = pl.ds(n * c, c)
        states_ref[n] = s.astype(states_ref.dtype)
        u = ut_ref[rows, :].astype(acc) - mm(w_ref[rows, :], s)  # [c vb]
        o = mm(qh_ref[rows, :], s) + mm(p_ref[rows, :], u)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        if u_ref:  # the corrected values, kept for the backward's parallel products
            u_ref[0][rows, :] = u.astype(u_ref[0].dtype)
        gamma = jnp.max(gam_ref[rows].astype(acc))  # the c entries are equal
        return gamma * s + mm(kd_ref[rows, :], u, ta=True)

    s = jax.lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(acc))
    st_ref[...] = s


def _bwd_kernel(w_ref, qh_ref, p_ref, kd_ref, gam_ref, do_ref, dst_ref, du_ref, dse_ref, ds0_ref, *,
                c, n_chunks, mm_dtype):
    """The adjoint chain only: dU per chunk and dS at every chunk end. Every column block of v is independent
    (dU and dS are linear in dO and dS column by column), so v-blocks need no partial sums."""
    mm = functools.partial(_mm, mm_dtype=mm_dtype)
    acc = ds0_ref.dtype

    def body(i, ds):  # ds: [k vb], the adjoint of the state at the end of chunk n
        n = n_chunks - 1 - i
        rows = pl.ds(n * c, c)
        dse_ref[n] = ds
        do = do_ref[rows, :].astype(acc)
        du = mm(p_ref[rows, :], do, ta=True) + mm(kd_ref[rows, :], ds)  # [c vb]
        du_ref[rows, :] = du.astype(du_ref.dtype)
        gamma = jnp.max(gam_ref[rows].astype(acc))
        return mm(qh_ref[rows, :], do, ta=True) - mm(w_ref[rows, :], du, ta=True) + gamma * ds

    ds = jax.lax.fori_loop(0, n_chunks, body, dst_ref[...].astype(acc))
    ds0_ref[...] = ds


# v-columns per program; None = the rule in _vblock. Benchmarks set it to sweep (GDN_VB_SWEEP in bench_gdn.py).
VBLOCK = None


def _vblock(r, dv):
    """v-columns per program: 64, or 32 when (b*h) alone gives under ~2 waves of programs on the chip, or 16
    under one wave; the chunk chain is serial, so programs are the only parallelism left."""
    if VBLOCK is not None:
        if dv % VBLOCK or VBLOCK < 16:
            raise ValueError(f"chunk_scan.VBLOCK = {VBLOCK} must be >= 16 and divide the value head dim {dv}")
        return VBLOCK
    vb = min(dv, 64)
    if r * (dv // vb) < 264 and dv >= 64:
        vb = 32
    if r * (dv // vb) < 132 and vb == 32:
        # Under one program per SM even at 32 columns (e.g. b*h = 8): 16 columns doubled the programs and took
        # the scan's forward + backward from 3.92 to 3.44 ms at (1, 32768, 8, 128) on an H100, while it was
        # slower wherever 32 already filled the chip (experiments/results/bench_gdn_run7_sweep.md).
        vb = 16
    return vb


# Triton's software-pipelining depth for the chunk loop: the next chunks' tiles load while this one computes,
# which is what the serial chain waits on. None = by head size and operand width, from the H100 sweep in
# an earlier run (kernels_pallas/NOTES.md, run 4-5; bf16: 3 for k = 128, 2 for k = 64; float32 tiles are twice as large and 3
# stages of them overflow the 227 KiB of shared memory, so float32 keeps 1); benchmarks set it to sweep.
NUM_STAGES = None


def _compiler_params(dk, mm_dtype):
    ns = NUM_STAGES
    if ns is None:
        ns = (3 if dk >= 128 else 2) if jnp.dtype(mm_dtype) == jnp.bfloat16 else 1
    return pltriton.CompilerParams(num_warps=8 if dk >= 128 else 4, num_stages=ns)


def _scan_fwd_call(ut, w, qh, p, kd, gam, s0, *, c, mm_dtype, interpret, save_u=False):
    """Flat layout: ut [r t v], w/qh/kd [r t k], p [r t c], gam [r t], s0 [r k v] (r = b*h).
    Returns o [r t v], s_T [r k v], the chunk-start states [r n k v] and, with save_u, U [r t v]."""
    r, t, dv = ut.shape
    dk = w.shape[-1]
    n = t // c
    vb = _vblock(r, dv)
    acc = s0.dtype
    # o, the chunk-start states and U leave in the matmul operand dtype (bf16 for bf16 models): the backward
    # only uses the states and U as bf16 operands, and a 24-layer model keeps them all from forward to backward.
    io = jnp.dtype(mm_dtype) if jnp.dtype(mm_dtype) == jnp.bfloat16 else acc
    row = lambda width: pl.BlockSpec((None, t, width), lambda i, j: (i, 0, 0))
    vcol = pl.BlockSpec((None, t, vb), lambda i, j: (i, 0, j))
    kv = pl.BlockSpec((None, dk, vb), lambda i, j: (i, 0, j))
    kernel = functools.partial(_fwd_kernel, c=c, n_chunks=n, mm_dtype=mm_dtype)
    out_specs = [vcol, kv, pl.BlockSpec((None, n, dk, vb), lambda i, j: (i, 0, 0, j))]
    out_shape = [jax.ShapeDtypeStruct((r, t, dv), io), jax.ShapeDtypeStruct((r, dk, dv), acc),
                 jax.ShapeDtypeStruct((r, n, dk, dv), io)]
    if save_u:
        out_specs.append(vcol)
        out_shape.append(jax.ShapeDtypeStruct((r, t, dv), io))
    return pl.pallas_call(
        kernel,
        grid=(r, dv // vb),
        in_specs=[vcol, row(dk), row(dk), row(c), row(dk), pl.BlockSpec((None, t), lambda i, j: (i, 0)), kv],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(dk, mm_dtype),
        name="gdn_chunk_scan_fwd",
    )(ut, w, qh, p, kd, gam, s0)


def _scan_bwd_call(w, qh, p, kd, gam, do, dst, *, c, mm_dtype, interpret):
    """The adjoint chain: returns dU [r t v], the adjoint of every chunk-end state [r n k v] and dS0 [r k v]."""
    r, t, dv = do.shape
    dk = w.shape[-1]
    n = t // c
    vb = _vblock(r, dv)
    acc = dst.dtype
    row = lambda width: pl.BlockSpec((None, t, width), lambda i, j: (i, 0, 0))
    vcol = pl.BlockSpec((None, t, vb), lambda i, j: (i, 0, j))
    kv = pl.BlockSpec((None, dk, vb), lambda i, j: (i, 0, j))
    kernel = functools.partial(_bwd_kernel, c=c, n_chunks=n, mm_dtype=mm_dtype)
    sds = jax.ShapeDtypeStruct
    return pl.pallas_call(
        kernel,
        grid=(r, dv // vb),
        in_specs=[row(dk), row(dk), row(c), row(dk), pl.BlockSpec((None, t), lambda i, j: (i, 0)), vcol, kv],
        out_specs=[vcol, pl.BlockSpec((None, n, dk, vb), lambda i, j: (i, 0, 0, j)), kv],
        out_shape=[sds((r, t, dv), acc), sds((r, n, dk, dv), acc), sds((r, dk, dv), acc)],
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(dk, mm_dtype),
        name="gdn_chunk_scan_bwd",
    )(w, qh, p, kd, gam, do, dst)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _scan(ut, w, qh, p, kd, gam, s0, c, mm_dtype, interpret):
    """The GPU scan as a ``custom_vjp``: the kernels walk the serial chains, the gradients that sum over v are
    batched XLA products in ``_scan_vjp_bwd`` (the module docstring has the formulas)."""
    o, st, _ = _scan_fwd_call(ut, w, qh, p, kd, gam, s0, c=c, mm_dtype=mm_dtype, interpret=interpret)
    return o, st


def _scan_vjp_fwd(ut, w, qh, p, kd, gam, s0, c, mm_dtype, interpret):
    o, st, states, u = _scan_fwd_call(ut, w, qh, p, kd, gam, s0, c=c, mm_dtype=mm_dtype, interpret=interpret,
                                      save_u=True)
    return (o, st), (w, qh, p, kd, gam, states, u)


def _scan_vjp_bwd(c, mm_dtype, interpret, res, cot):
    w, qh, p, kd, gam, states, u = res
    do, dst = cot
    acc = dst.dtype
    du, dse, ds0 = _scan_bwd_call(w, qh, p, kd, gam, do.astype(acc), dst, c=c, mm_dtype=mm_dtype,
                                  interpret=interpret)
    r, t, dv = u.shape
    n = t // c
    chunked = lambda x: x.reshape(r, n, c, x.shape[-1])
    mm = functools.partial(chunk_matmul, mm_dtype=mm_dtype, acc=acc)
    du_, do_, u_ = chunked(du), chunked(do.astype(acc)), chunked(u)
    dw = -mm("rncv,rnkv->rnck", du_, states)
    dqh = mm("rncv,rnkv->rnck", do_, states)
    dkd = mm("rncv,rnkv->rnck", u_, dse)
    dp = mm("rniv,rnjv->rnij", do_, u_)
    # gam is repeated over the c positions of a chunk and the forward read it once per chunk: its gradient
    # belongs on one of the copies only.
    dgam = jnp.sum(states.astype(acc) * dse, axis=(-2, -1))  # [r n]
    dgam = jnp.zeros((r, n, c), acc).at[..., 0].set(dgam).reshape(r, t)
    flat = lambda x, like: x.reshape(like.shape).astype(like.dtype)
    return (du.astype(w.dtype), flat(dw, w), flat(dqh, qh), flat(dp, p), flat(dkd, kd), dgam.astype(gam.dtype),
            ds0)


_scan.defvjp(_scan_vjp_fwd, _scan_vjp_bwd)


def differentiable_scan(fwd_call, bwd_call):
    """The scan over flat [r t .] inputs as a ``custom_vjp`` from one backend's forward and backward calls.

    ``fwd_call(ut, w, qh, p, kd, gam, s0, *, c, mm_dtype, interpret) -> (o, s_T, chunk-start states)`` and
    ``bwd_call(..., states, do, dst, ...)`` returning per-v-block partial gradients [nv r t .]: the protocol of
    the TPU kernels (``chunk_scan_tpu.py``), whose backward still sums over v in the kernel. The GPU kernels
    use ``_scan`` above.
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




def chunk_scan_pallas(ci, s0, *, mm_dtype=None, interpret=None):
    """Drop-in for ``chunk_scan_xla``: ci holds [b h n c .] arrays, s0 [b h k v]; returns (o [b h n c v], s_T).

    mm_dtype: operand dtype of the kernel's matmuls (bf16 for bf16 models; default the compute dtype).
    interpret: run the kernel in the Pallas interpreter (default: whenever the backend is not a GPU).
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return run_scan(_scan, ci, s0, mm_dtype, bool(interpret))
