"""One Pallas kernel for the intra-chunk ("prepare") stage of the chunkwise gated delta rule, and one for its
backward, tied by a ``custom_vjp`` whose only residuals are the inputs.

The meaning is exactly that of ``chimera_jax.ops.gated_delta_rule.chunk_prepare`` (the XLA form, the slow
reference beside this one). One program owns one (b, h, chunk): it loads the chunk's q, k [c k], v [c v], g, beta
and the document-start flags, and keeps every [c c] quantity in registers. Per chunk, with ``i`` the row (query
or later token) and ``j`` the column:

    seg_i  = number of document starts in [0, i]          conn_ij = j <= i and seg_i == seg_j
    G      = cumsum(g)                                   D_ij    = exp(G_i - G_j) on conn, else 0
    gam_i  = exp(G_i) where seg_i == 0, else 0           e_j     = exp(G_last - G_j) where seg_j == seg_last
    A      = strictly-lower(beta_i D_ij (k k^T)_ij)      T       = (I + A)^-1
    U~ = T (beta v)      W = T (beta gam k)      Q^ = scale gam q      P = scale (q k^T) D      Kd = e k

Only P among the [c c] quantities reaches HBM. The inverse is formed by matmuls only, as in the XLA form: the
diagonal blocks of ``leaf`` rows by the nilpotent series (I + A_d)^-1 = (I - A_d)(I + A_d^2)(I + A_d^4)...
(all diagonal blocks at once: a block-diagonal matrix stays block-diagonal under products), then
(I + A) = (I + A_d)(I + N) with N = (I + A_d)^-1 A_off strictly block-lower, so T = (I + N)^-1 (I + A_d)^-1
with the same series over the c / leaf blocks. No register slicing is needed, which Triton does not have.

Backward (cotangents dU~, dW, dQ^, dP, dKd, dgam of all six outputs; the kernel recomputes everything above):

    dT   = dU~ (beta v)^T + dW (beta gam k)^T       d(beta v) = T^T dU~        d(beta gam k) = T^T dW
    dA   = -strictly-lower(T^T dT T^T)
    dKK  = dA beta_i D                 dD  = dA beta_i KK + scale dP (q k^T)      dQK = scale dP D
    dq   = dQK k + scale gam dQ^       dk  = dQK^T q + (dKK + dKK^T) k + beta gam d(beta gam k) + e dKd
    dG_i = sum_j (dD D)_ij - sum_j (dD D)_ji + dgam_i gam_i - de_i e_i  (+ sum_j de_j e_j on the last row)
    dg   = reverse cumsum of dG within the chunk

where dgam also collects the gam terms of W and Q^, and de_j = <dKd_j, k_j>. Masked entries go through
``where`` before ``exp`` so that no inf (and no nan in the gradient) appears.

Lowering: the (deprecated) Pallas Triton path on GPU, ``interpret=True`` elsewhere. Block shapes must be powers
of two. The products whose inputs are the model's own activations (k k^T, q k^T, and the dq / dk products) run
on ``mm_dtype`` operands (bf16 tensor cores for bf16 models); everything on the way to and through the inverse
stays in the compute dtype (float32, or float64 in tests) with ``inv_precision``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from chimera_jax.ops.common import state_dtype
from chimera_jax.ops.gated_delta_rule import ChunkInputs

INV_PRECISIONS = ("highest", "tf32x3")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static settings of one call (hashable: it is a non-differentiable argument of the custom_vjp)."""
    scale: float
    c: int
    cd: str             # compute dtype: float32, or float64
    mm_dtype: str       # operand dtype of the activation products (k k^T, q k^T, dq, dk)
    inv_precision: str  # "highest" (IEEE float32 FMA) or "tf32x3" (3-pass TF32 tensor cores), GPU only
    solve_dtype: str    # operands of T rhs (and its backward): the compute dtype, or bfloat16 (tensor cores)
    leaf: int
    out_dtype: str
    num_warps: int | None
    num_stages: int | None
    bwd_num_warps: int | None
    interpret: bool


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ------------------------------------------------------------------------------------------ in-kernel math

def _dot(a, b, *, ta=False, tb=False, dtype, precision, out):
    """a @ b (a^T, b^T on request) on ``dtype`` operands with an ``out`` result (float32 / float64)."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                               preferred_element_type=out)


class _Chunk:
    """The intra-chunk quantities both kernels need, recomputed from the loaded inputs (all [c], [c c] or [c .])."""

    def __init__(self, q, k, g, beta, reset, cfg: _Config):
        c, cd = cfg.c, jnp.dtype(cfg.cd)
        self.cfg = cfg
        mm = jnp.dtype(cfg.mm_dtype)
        hi = jax.lax.Precision.HIGHEST
        self.mm = functools.partial(_dot, dtype=mm, precision=None if mm == jnp.bfloat16 else hi, out=cd)
        if cfg.interpret or cfg.inv_precision == "highest" or cd != jnp.float32:
            inv_prec = hi
        else:
            inv_prec = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        self.fm = functools.partial(_dot, dtype=cd, precision=inv_prec, out=cd)
        sd = jnp.dtype(cfg.solve_dtype)
        self.sm = functools.partial(_dot, dtype=sd, precision=inv_prec if sd == cd else None, out=cd)

        row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
        self.row, self.col = row, col
        self.tril = col <= row
        self.strict = col < row
        # Cumulative sums as masked row sums: exact for the 0/1 flags, and the reverse sum of the backward is the
        # same mask summed over the other axis.
        seg = jnp.sum(jnp.where(self.tril, reset[None, :], 0.0), axis=1)  # [c] document index within the chunk
        conn = self.tril & (seg[:, None] == seg[None, :])  # [c c]: no document start in (j, i]
        conn0 = seg == 0.0  # [c]: no document start in [0, i]
        conn_last = seg == jnp.sum(reset)  # [c]: no document start in (j, c-1]
        G = jnp.sum(jnp.where(self.tril, g[None, :], 0.0), axis=1)  # [c]
        G_last = jnp.sum(g)
        self.dec = jnp.where(conn, jnp.exp(jnp.where(conn, G[:, None] - G[None, :], 0.0)), 0.0)  # [c c]
        self.gam = jnp.where(conn0, jnp.exp(jnp.where(conn0, G, 0.0)), 0.0)  # [c]
        self.e = jnp.where(conn_last, jnp.exp(jnp.where(conn_last, G_last - G, 0.0)), 0.0)  # [c]
        self.kk = self.mm(k, k, tb=True)  # [c c]
        self.qk = self.mm(q, k, tb=True)
        self.a = jnp.where(self.strict, beta[:, None] * self.dec * self.kk, 0.0)
        self.t = self._unit_lower_inverse(self.a)

    def _series(self, n, eye, span_to):
        """(I + n)^-1 for nilpotent n with n^span_to = 0: (I - n)(I + n^2)(I + n^4)... by repeated squaring."""
        inv = eye - n
        p, span = -n, 2
        while span < span_to:
            p = self.fm(p, p)
            inv = inv + self.fm(inv, p)
            span *= 2
        return inv

    def _unit_lower_inverse(self, a):
        c, leaf = self.cfg.c, min(self.cfg.leaf, self.cfg.c)
        eye = jnp.where(self.row == self.col, 1.0, 0.0).astype(a.dtype)
        diag_block = (self.row // leaf) == (self.col // leaf)
        d = self._series(jnp.where(diag_block, a, 0.0), eye, leaf)  # (I + A_d)^-1, block diagonal
        if leaf == c:
            return d
        n = self.fm(d, jnp.where(diag_block, 0.0, a))  # (I + A_d)^-1 A_off: strictly block-lower
        return self.fm(self._series(n, eye, c // leaf), d)


def _load(ref, cd):
    return ref[...].astype(cd)


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, reset_ref,
                ut_ref, w_ref, qh_ref, p_ref, kd_ref, gam_ref, *, cfg: _Config):
    cd = jnp.dtype(cfg.cd)
    q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [c k] [c k] [c v], input dtype
    g, beta, reset = _load(g_ref, cd), _load(beta_ref, cd), _load(reset_ref, cd)  # [c]
    ch = _Chunk(q, k, g, beta, reset, cfg)
    kf = k.astype(cd)
    ut_ref[...] = ch.sm(ch.t, beta[:, None] * v.astype(cd)).astype(ut_ref.dtype)
    w_ref[...] = ch.sm(ch.t, (beta * ch.gam)[:, None] * kf).astype(w_ref.dtype)
    qh_ref[...] = ((cfg.scale * ch.gam)[:, None] * q.astype(cd)).astype(qh_ref.dtype)
    p_ref[...] = (cfg.scale * ch.qk * ch.dec).astype(p_ref.dtype)
    kd_ref[...] = (ch.e[:, None] * kf).astype(kd_ref.dtype)
    gam_ref[...] = ch.gam.astype(gam_ref.dtype)


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, reset_ref,
                dut_ref, dw_ref, dqh_ref, dp_ref, dkd_ref, dgam_ref,
                dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, *, cfg: _Config):
    cd = jnp.dtype(cfg.cd)
    q, k = q_ref[...], k_ref[...]
    g, beta, reset = _load(g_ref, cd), _load(beta_ref, cd), _load(reset_ref, cd)
    ch = _Chunk(q, k, g, beta, reset, cfg)
    fm, sm, mm, scale = ch.fm, ch.sm, ch.mm, cfg.scale
    qf, kf, vf = q.astype(cd), k.astype(cd), v_ref[...].astype(cd)
    dut, dw, dqh = _load(dut_ref, cd), _load(dw_ref, cd), _load(dqh_ref, cd)
    dp, dkd, dgam = _load(dp_ref, cd), _load(dkd_ref, cd), _load(dgam_ref, cd)

    bg = beta * ch.gam  # [c]
    rv = beta[:, None] * vf  # [c v]
    rk = bg[:, None] * kf  # [c k]
    # The UT transform: sol = T rhs.
    dt = sm(dut, rv, tb=True) + sm(dw, rk, tb=True)  # [c c]
    drv = sm(ch.t, dut, ta=True)  # [c v]
    drk = sm(ch.t, dw, ta=True)  # [c k]
    # T = (I + A)^-1 -> dA = -T^T dT T^T, on the strictly lower entries A depends on.
    da = jnp.where(ch.strict, -fm(fm(ch.t, dt, ta=True), ch.t, tb=True), 0.0)
    # A = beta_i D_ij KK_ij and P = scale QK_ij D_ij.
    dkk = da * beta[:, None] * ch.dec
    dqk = scale * dp * ch.dec
    dd = da * beta[:, None] * ch.kk + scale * dp * ch.qk

    rk_k = jnp.sum(drk * kf, axis=1)  # [c]: <d(beta gam k)_i, k_i>
    dgam_all = dgam + beta * rk_k + scale * jnp.sum(dqh * qf, axis=1)
    dbeta = jnp.sum(da * ch.dec * ch.kk, axis=1) + jnp.sum(drv * vf, axis=1) + ch.gam * rk_k
    dq = mm(dqk, k) + (scale * ch.gam)[:, None] * dqh
    dk = (mm(dqk, q, ta=True) + mm(dkk + dkk.T, k) + bg[:, None] * drk + ch.e[:, None] * dkd)
    dv = beta[:, None] * drv

    # Through the decays to G, then to g (G = cumsum g, so dg is the reverse cumsum of dG).
    z = dd * ch.dec
    y = jnp.sum(dkd * kf, axis=1) * ch.e  # [c]: d e_j * e_j
    last = jax.lax.broadcasted_iota(jnp.int32, (cfg.c,), 0) == cfg.c - 1  # [c]
    dG = (jnp.sum(z, axis=1) - jnp.sum(z, axis=0) + dgam_all * ch.gam - y
          + jnp.where(last, jnp.sum(y), 0.0))
    dg = jnp.sum(jnp.where(ch.tril, dG[:, None], 0.0), axis=0)

    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dg_ref[...] = dg.astype(dg_ref.dtype)
    dbeta_ref[...] = dbeta.astype(dbeta_ref.dtype)


# ---------------------------------------------------------------------------------------------- the calls

def _compiler_params(cfg: _Config, dk, bwd=False):
    if cfg.interpret:
        return None
    warps = (cfg.bwd_num_warps if bwd else None) or cfg.num_warps or (8 if dk >= 128 else 4)
    return pltriton.CompilerParams(num_warps=warps, num_stages=cfg.num_stages or 1)


def _in_specs(c, dk, dv):
    """Inputs stay in the caller's [b t h .] layout: each program reads its chunk's rows with stride h."""
    tok = lambda width: pl.BlockSpec((None, c, None, width), lambda b, h, n: (b, n, h, 0))
    vec = pl.BlockSpec((None, c, None), lambda b, h, n: (b, n, h))
    return [tok(dk), tok(dk), tok(dv), vec, vec, pl.BlockSpec((None, c), lambda b, h, n: (b, n))]


def _chunk_specs(c, dk, dv):
    """The [b h n c .] outputs of the forward (cotangent inputs of the backward); gam as [b h n c]."""
    out = lambda width: pl.BlockSpec((None, None, None, c, width), lambda b, h, n: (b, h, n, 0, 0))
    return [out(dv), out(dk), out(dk), out(c), out(dk),
            pl.BlockSpec((None, None, None, c), lambda b, h, n: (b, h, n, 0))]


def _fwd_call(q, k, v, g, beta, reset, cfg: _Config):
    b, t, h, dk = q.shape
    dv, c = v.shape[-1], cfg.c
    n = t // c
    od, cd = jnp.dtype(cfg.out_dtype), jnp.dtype(cfg.cd)
    sds = jax.ShapeDtypeStruct
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(b, h, n),
        in_specs=_in_specs(c, dk, dv),
        out_specs=_chunk_specs(c, dk, dv),
        out_shape=[sds((b, h, n, c, dv), od), sds((b, h, n, c, dk), od), sds((b, h, n, c, dk), od),
                   sds((b, h, n, c, c), od), sds((b, h, n, c, dk), od), sds((b, h, n, c), cd)],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg, dk),
        name="gdn_chunk_prepare_fwd",
    )(q, k, v, g, beta, reset)


def _bwd_call(q, k, v, g, beta, reset, cots, cfg: _Config):
    b, t, h, dk = q.shape
    dv, c = v.shape[-1], cfg.c
    sds = jax.ShapeDtypeStruct
    return pl.pallas_call(
        functools.partial(_bwd_kernel, cfg=cfg),
        grid=(b, h, t // c),
        in_specs=_in_specs(c, dk, dv) + _chunk_specs(c, dk, dv),
        out_specs=_in_specs(c, dk, dv)[:5],
        out_shape=[sds(q.shape, q.dtype), sds(k.shape, k.dtype), sds(v.shape, v.dtype), sds(g.shape, g.dtype),
                   sds(beta.shape, beta.dtype)],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg, dk, bwd=True),
        name="gdn_chunk_prepare_bwd",
    )(q, k, v, g, beta, reset, *cots)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _prepare(q, k, v, g, beta, reset, cfg):
    return tuple(_fwd_call(q, k, v, g, beta, reset, cfg))


def _prepare_fwd(q, k, v, g, beta, reset, cfg):
    # Residuals: the inputs only. Everything else is cheaper to recompute in the backward than to store.
    return _prepare(q, k, v, g, beta, reset, cfg), (q, k, v, g, beta, reset)


def _prepare_bwd(cfg, res, cots):
    q, k, v, g, beta, reset = res
    dq, dk, dv, dg, dbeta = _bwd_call(q, k, v, g, beta, reset, cots, cfg)
    return dq, dk, dv, dg, dbeta, jnp.zeros_like(reset)


_prepare.defvjp(_prepare_fwd, _prepare_bwd)


def chunk_prepare_pallas(q, k, v, g, beta, reset, *, scale, chunk_size=64, out_dtype=None, interpret=None,
                         mm_dtype=None, inv_precision="highest", solve_dtype=None, leaf=16, num_warps=None,
                         num_stages=None, bwd_num_warps=None) -> ChunkInputs:
    """Drop-in for ``chunk_prepare`` (same meaning and [b h n c .] shapes), as fused Pallas kernels.

    Args:
      q, k: [b t h k]. v: [b t h v]. g, beta: [b t h]. reset: [b t] bool, True where a document starts (t >= 1).
        t must be a multiple of chunk_size (the caller pads); chunk_size, k and v powers of two.
      scale: query scale. chunk_size: c, tokens per chunk.
      out_dtype: dtype of u_tilde, w, q_hat, p, k_dec (default q.dtype: bf16 outputs for bf16 models halve the
        traffic; the scan kernel streams bf16 operands anyway). gamma is always in the compute dtype.
      interpret: Pallas interpreter (default: whenever the backend is not a GPU).
      mm_dtype: operand dtype of k k^T, q k^T and the dq / dk products (default q.dtype; bf16 -> tensor cores).
      inv_precision: "highest" or "tf32x3": float32 products of the inverse (and of T rhs) on a GPU.
      solve_dtype: operand dtype of T rhs and of its backward products (default the compute dtype at
        inv_precision; "bfloat16" runs them on tensor cores, an error of the order of the bf16 outputs' rounding).
      leaf: rows of the diagonal blocks inverted by the nilpotent series (16, as in the XLA form).
      num_warps, num_stages, bwd_num_warps: Triton tunables (default 8 warps for k >= 128, else 4; 1 stage).
    """
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [b t h k]; got q {q.shape}, k {k.shape}")
    b, t, h, dk = q.shape
    if v.ndim != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be [b t h v] = [{b} {t} {h} v]; got {v.shape}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (b, t, h):
            raise ValueError(f"{name} must be [b t h] = {(b, t, h)}; got {x.shape}")
    if reset.shape != (b, t):
        raise ValueError(f"reset must be [b t] = {(b, t)}; got {reset.shape}")
    c = chunk_size
    if not _is_pow2(c) or t % c:
        raise ValueError(f"chunk_size must be a power of two dividing t = {t}; got {c}")
    for name, d in (("k", dk), ("v", v.shape[-1])):
        if not _is_pow2(d):
            raise ValueError(f"head dim {name} = {d} must be a power of two (Triton block shapes)")
    if inv_precision not in INV_PRECISIONS:
        raise ValueError(f"inv_precision must be one of {INV_PRECISIONS}; got {inv_precision!r}")
    if not _is_pow2(leaf):
        raise ValueError(f"leaf must be a power of two; got {leaf}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if (not interpret and inv_precision == "tf32x3" and solve_dtype is not None
            and jnp.dtype(solve_dtype) == jnp.bfloat16):
        # On an H100 (JAX 0.11.2) this pair did not finish within 5 minutes at (2, 256, 2, 64) while each option
        # alone ran in seconds (experiments/results/kernel_tests_gpu.txt), so it is refused rather than left to hang.
        raise NotImplementedError("chunk_prepare_pallas: inv_precision='tf32x3' with solve_dtype='bfloat16' "
                                  "does not complete as a native GPU kernel; use one of the two options")
    cd = state_dtype(q.dtype)
    cfg = _Config(scale=float(scale), c=c, cd=jnp.dtype(cd).name,
                  mm_dtype=jnp.dtype(mm_dtype or q.dtype).name, inv_precision=inv_precision,
                  solve_dtype=jnp.dtype(solve_dtype or cd).name, leaf=leaf,
                  out_dtype=jnp.dtype(out_dtype or q.dtype).name, num_warps=num_warps, num_stages=num_stages,
                  bwd_num_warps=bwd_num_warps, interpret=bool(interpret))
    ut, w, qh, p, kd, gam = _prepare(q, k, v, g, beta, reset.astype(cd), cfg)
    return ChunkInputs(ut, w, qh, p, kd, gam[..., -1])
