"""TPU (Mosaic) variant of the gated delta rule's serial inter-chunk scan; same maths as ``chunk_scan.py``.

Per (b h) and chunk n (see ``chunk_scan.py`` for the backward formulas):

    U_n   = U~_n - W_n S_n                 # [c v]
    O_n   = Q^_n S_n + P_n U_n             # [c v]
    S_n+1 = gamma_n S_n + Kd_n^T U_n       # [k v], float32

The GPU kernel loads a whole time length per program and loops over chunks inside it. On a TPU the grid itself
is the loop: grid (b*h, v-blocks, chunks) with the chunk axis last and "arbitrary" (sequential), so that the
Pallas pipeline streams one chunk's tiles HBM -> VMEM per step (double-buffered) while the state S stays in a
VMEM scratch across steps. S is loaded from the initial state at chunk 0 and written out at the last chunk;
the state and initial-state blocks keep one block index along the chunk axis, so they are fetched once and
written back once. The backward walks the chunk axis in reverse through its index maps.

Tiling: Mosaic wants the last two dims of every block to be multiples of (8, 128) or the full array dims.
Row blocks are one chunk (c rows, c a multiple of 8); columns are the full k, the full c (for P) or a v-block
of 128 (or the full v when v is not a multiple of 128). gamma arrives repeated over the c positions of its
chunk, as in the GPU call, and is viewed as [r t 1] so that its block (c, 1) is legal (1 = the full last dim).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.gated_delta_rule.chunk_scan import differentiable_scan, run_scan

_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a^T @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b^T


def _mm(a, b, dims, *, mm_dtype, acc):
    """A matmul on mm_dtype operands (bf16 MXU passes for bf16 models) with a float32 (or f64) result."""
    prec = None if mm_dtype == jnp.bfloat16 else jax.lax.Precision.HIGHEST
    return jax.lax.dot_general(a.astype(mm_dtype), b.astype(mm_dtype), dims, precision=prec,
                               preferred_element_type=acc)


def _fwd_kernel(ut_ref, w_ref, qh_ref, p_ref, kd_ref, gam_ref, s0_ref, o_ref, st_ref, states_ref, s_ref, *,
                mm_dtype):
    acc = s_ref.dtype
    mm = functools.partial(_mm, mm_dtype=mm_dtype, acc=acc)
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s_ref[...] = s0_ref[...].astype(acc)

    s = s_ref[...]  # [k vb]: the state at the start of chunk n
    states_ref[...] = s.astype(states_ref.dtype)
    u = ut_ref[...].astype(acc) - mm(w_ref[...], s, _NN)  # [c vb]
    o = mm(qh_ref[...], s, _NN) + mm(p_ref[...], u, _NN)
    o_ref[...] = o.astype(o_ref.dtype)
    gamma = jnp.max(gam_ref[...].astype(acc))  # the c entries are equal
    s = gamma * s + mm(kd_ref[...], u, _TN)
    s_ref[...] = s

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        st_ref[...] = s.astype(st_ref.dtype)


def _bwd_kernel(ut_ref, w_ref, qh_ref, p_ref, kd_ref, gam_ref, states_ref, do_ref, dst_ref,
                dut_ref, dw_ref, dqh_ref, dp_ref, dkd_ref, dgam_ref, ds0_ref, ds_ref, *, mm_dtype):
    acc = ds_ref.dtype
    mm = functools.partial(_mm, mm_dtype=mm_dtype, acc=acc)
    i = pl.program_id(2)  # step i visits chunk n_chunks - 1 - i (the index maps reverse it)

    @pl.when(i == 0)
    def _():
        ds_ref[...] = dst_ref[...].astype(acc)

    ds = ds_ref[...]  # [k vb]: adjoint of the state at the end of this chunk
    s = states_ref[...].astype(acc)
    w = w_ref[...]
    u = ut_ref[...].astype(acc) - mm(w, s, _NN)
    do = do_ref[...].astype(acc)
    du = mm(p_ref[...], do, _TN) + mm(kd_ref[...], ds, _NN)  # [c vb]
    dut_ref[...] = du.astype(dut_ref.dtype)
    dw_ref[...] = (-mm(du, s, _NT)).astype(dw_ref.dtype)
    dqh_ref[...] = mm(do, s, _NT).astype(dqh_ref.dtype)
    dp_ref[...] = mm(do, u, _NT).astype(dp_ref.dtype)
    dkd_ref[...] = mm(u, ds, _NT).astype(dkd_ref.dtype)
    dgam_ref[...] = jnp.broadcast_to(jnp.sum(s * ds), dgam_ref.shape).astype(dgam_ref.dtype)
    gamma = jnp.max(gam_ref[...].astype(acc))
    ds = mm(qh_ref[...], do, _TN) - mm(w, du, _TN) + gamma * ds
    ds_ref[...] = ds

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = ds.astype(ds0_ref.dtype)


def vblock_tpu(dv: int) -> int:
    """v-columns per program: one lane-dense 128-wide block, or the full v when v is not a multiple of 128."""
    return 128 if dv % 128 == 0 else dv


def check_tiling(r, t, c, dk, dv):
    """Raise a clear error when the blocks would break Mosaic's (8, 128) tiling rule."""
    if c <= 0 or t % c:
        raise ValueError(f"chunk size c={c} must divide the time length t={t}")
    if c % 8 and c != t:
        raise ValueError(f"chunk size c={c} must be a multiple of 8 (the TPU sublane tile) or equal t={t}")
    del r, dk, dv  # k and c columns are full dims; v-blocks are 128 or the full v (vblock_tpu)


def _params(interpret, semantics):
    if interpret:
        return dict(interpret=interpret if not isinstance(interpret, bool) else pltpu.InterpretParams())
    return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


_SEMANTICS = ("parallel", "parallel", "arbitrary")


def scan_fwd_call_tpu(ut, w, qh, p, kd, gam, s0, *, c, mm_dtype, interpret):
    """Same call as the GPU ``_scan_fwd_call``: ut [r t v], w/qh/kd [r t k], p [r t c], gam [r t], s0 [r k v].

    Returns (o [r t v], s_T [r k v], chunk-start states [r n k v]), all in s0.dtype.
    interpret: False (compile for a TPU), True or a ``pltpu.InterpretParams`` (TPU interpreter).
    """
    r, t, dv = ut.shape
    dk = w.shape[-1]
    check_tiling(r, t, c, dk, dv)
    n = t // c
    vb = vblock_tpu(dv)
    acc = s0.dtype
    row = lambda width: pl.BlockSpec((None, c, width), lambda i, j, m: (i, m, 0))
    vcol = pl.BlockSpec((None, c, vb), lambda i, j, m: (i, m, j))
    kv = pl.BlockSpec((None, dk, vb), lambda i, j, m: (i, 0, j))  # constant along chunks: fetched/written once
    return pl.pallas_call(
        functools.partial(_fwd_kernel, mm_dtype=mm_dtype),
        grid=(r, dv // vb, n),
        in_specs=[vcol, row(dk), row(dk), row(c), row(dk), row(1), kv],
        out_specs=[vcol, kv, pl.BlockSpec((None, None, dk, vb), lambda i, j, m: (i, m, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((r, t, dv), acc), jax.ShapeDtypeStruct((r, dk, dv), acc),
                   jax.ShapeDtypeStruct((r, n, dk, dv), acc)],
        scratch_shapes=[pltpu.VMEM((dk, vb), acc)],
        name="gdn_chunk_scan_fwd_tpu",
        **_params(interpret, _SEMANTICS),
    )(ut, w, qh, p, kd, gam.reshape(r, t, 1), s0)


def scan_bwd_call_tpu(ut, w, qh, p, kd, gam, states, do, dst, *, c, mm_dtype, interpret):
    """Same call as the GPU ``_scan_bwd_call``; the sums over v come back as per-v-block partials [nv r t .]."""
    r, t, dv = ut.shape
    dk = w.shape[-1]
    check_tiling(r, t, c, dk, dv)
    n = t // c
    vb = vblock_tpu(dv)
    nv = dv // vb
    acc = dst.dtype
    rev = lambda m: n - 1 - m
    row = lambda width: pl.BlockSpec((None, c, width), lambda i, j, m: (i, rev(m), 0))
    vcol = pl.BlockSpec((None, c, vb), lambda i, j, m: (i, rev(m), j))
    kv = pl.BlockSpec((None, dk, vb), lambda i, j, m: (i, 0, j))
    part = lambda width: pl.BlockSpec((None, None, c, width), lambda i, j, m: (j, i, rev(m), 0))
    sds = jax.ShapeDtypeStruct
    dut, dw, dqh, dp, dkd, dgam, ds0 = pl.pallas_call(
        functools.partial(_bwd_kernel, mm_dtype=mm_dtype),
        grid=(r, nv, n),
        in_specs=[vcol, row(dk), row(dk), row(c), row(dk), row(1),
                  pl.BlockSpec((None, None, dk, vb), lambda i, j, m: (i, rev(m), 0, j)), vcol, kv],
        out_specs=[vcol, part(dk), part(dk), part(c), part(dk), part(1), kv],
        out_shape=[sds((r, t, dv), acc), sds((nv, r, t, dk), acc), sds((nv, r, t, dk), acc),
                   sds((nv, r, t, c), acc), sds((nv, r, t, dk), acc), sds((nv, r, t, 1), acc), sds((r, dk, dv), acc)],
        scratch_shapes=[pltpu.VMEM((dk, vb), acc)],
        name="gdn_chunk_scan_bwd_tpu",
        **_params(interpret, _SEMANTICS),
    )(ut, w, qh, p, kd, gam.reshape(r, t, 1), states, do, dst)
    return dut, dw, dqh, dp, dkd, dgam.reshape(nv, r, t), ds0


_scan = differentiable_scan(scan_fwd_call_tpu, scan_bwd_call_tpu)


def chunk_scan_pallas_tpu(ci, s0, *, mm_dtype=None, interpret=None):
    """Drop-in for ``chunk_scan_xla`` / ``chunk_scan_pallas``: ci holds [b h n c .] arrays, s0 [b h k v];
    returns (o [b h n c v], s_T [b h k v]); differentiable (custom backward kernel).

    mm_dtype: operand dtype of the kernel's matmuls (bf16 for bf16 models; default the compute dtype).
    interpret: None (interpret whenever the backend is not a TPU), False, True or a ``pltpu.InterpretParams``.
    """
    b, h, _, _, dv = ci.u_tilde.shape
    dk = ci.w.shape[-1]
    if s0.shape != (b, h, dk, dv):
        raise ValueError(f"initial state s0 must be [b h k v] = {(b, h, dk, dv)}; got {s0.shape}")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return run_scan(_scan, ci, s0, mm_dtype, interpret or False)
