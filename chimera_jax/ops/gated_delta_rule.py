"""The gated delta rule (Yang, Kautz & Hatamizadeh, 2024, "Gated Delta Networks"), in fla's layout.

Per head, with the state ``S`` of shape [k v] (float32, or float64 for float64 inputs):

    S_t = exp(g_t) * S_{t-1}                        # gated decay (g = log decay, usually <= 0)
    u_t = beta_t * (v_t - S_t^T k_t)                 # delta-rule correction ("new value")
    S_t = S_t + k_t u_t^T
    o_t = S_t^T (scale * q_t)

Packed documents (``segment_ids``): where the id changes between t-1 and t (t >= 1), ``S_{t-1}`` is replaced
by zeros before step t, exactly. Position 0 never resets, so that ``initial_state`` (a cache from an earlier
prefill) continues into the first document.

Implementations (``impl``):
- ``reference``: token-by-token ``lax.scan`` of the recurrence above, the oracle.
- ``xla``: the chunkwise form. Inside a chunk of ``c`` tokens the recurrence is solved in parallel through the
  WY / UT representation: with ``A[t, j] = beta_t * exp(G_t - G_j) * k_t.k_j`` (j < t, same document) and
  ``T = (I + A)^-1`` (formed by matmuls, ``unit_lower_inverse``), the chunk's corrected values are ``U = T (beta v) - T (beta Gamma k) S0``, so the
  only serial work left is one small state update per chunk (``chunk_scan_xla``). The intra-chunk part has a
  hand-derived backward (``_prepare_bwd``, tested against autodiff); the rest is differentiated by autodiff.
- ``pallas``: the same intra-chunk preparation in XLA, and the serial inter-chunk scan (forward and backward)
  as Pallas kernels (``kernels_pallas/gated_delta_rule``); runs in interpret mode on CPU.
- ``auto``: ``pallas`` on a GPU for the shapes and dtypes its tests cover, otherwise ``xla`` (logged at debug).
"""
from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from chimera_jax.ops.common import resets as _resets, state_dtype as _state_dtype

log = logging.getLogger(__name__)

IMPLS = ("auto", "pallas", "xla", "reference")
REMAT_PREPARE = (True, False, "save_inverse")
UT_INVERSE = "gdn_ut_inverse"  # checkpoint name of the UT transform's inverse


def _check(q, k, v, g, beta, initial_state, segment_ids):
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [b t h k]; got q {q.shape}, k {k.shape}")
    b, t, h, _ = q.shape
    if v.ndim != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be [b t h v] = [{b} {t} {h} v]; got {v.shape}")
    if g is not None and g.shape != (b, t, h):
        raise ValueError(f"g (log decay) must be [b t h] = {(b, t, h)}; got {g.shape}")
    if beta.shape != (b, t, h):
        raise ValueError(f"beta must be [b t h] = {(b, t, h)}; got {beta.shape}")
    if initial_state is not None and initial_state.shape != (b, h, q.shape[-1], v.shape[-1]):
        raise ValueError(f"initial_state must be [b h k v] = {(b, h, q.shape[-1], v.shape[-1])}; "
                         f"got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [b t] = {(b, t)}; got {segment_ids.shape}")


# ----------------------------------------------------------------------------------------------- reference

def gated_delta_rule_reference(q, k, v, g, beta, *, scale, initial_state=None, segment_ids=None):
    """Token-by-token recurrence (the oracle). Returns (o [b t h v] in q.dtype, final state [b h k v])."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    sd = _state_dtype(q.dtype)
    s0 = jnp.zeros((b, h, dk, dv), sd) if initial_state is None else initial_state.astype(sd)
    reset = _resets(segment_ids, b, t)  # [b t]

    def step(s, xs):
        q_t, k_t, v_t, g_t, b_t, r_t = xs  # [b h k] [b h k] [b h v] [b h] [b h] [b]
        s = jnp.where(r_t[:, None, None, None], 0.0, s)
        s = s * jnp.exp(g_t)[..., None, None]
        u = b_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", s, k_t))
        s = s + k_t[..., :, None] * u[..., None, :]
        o = jnp.einsum("bhkv,bhk->bhv", s, q_t * scale)
        return s, o

    xs = tuple(jnp.moveaxis(x.astype(sd), 1, 0) for x in (q, k, v, g, beta)) + (jnp.moveaxis(reset, 1, 0),)
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), s


# --------------------------------------------------------------------------------------- chunkwise form

class ChunkInputs(NamedTuple):
    """What the serial inter-chunk scan needs, per (b, h) and chunk n, all in the compute dtype.

    u_tilde [b h n c v] = T (beta v): corrected values assuming a zero state at the chunk start.
    w       [b h n c k] = T (beta Gamma k): how the chunk-start state S0 enters the corrections, U = u_tilde - w S0.
    q_hat   [b h n c k] = scale * Gamma q: how S0 enters the outputs.
    p       [b h n c c] = scale * (q k^T) * decay, lower triangular incl. the diagonal: intra-chunk attention.
    k_dec   [b h n c k] = k * exp(G_last - G_j): how each token's correction reaches the chunk-end state.
    gamma   [b h n]     = exp(G_last), 0 when the chunk holds a document start: decay of S0 over the chunk.
    """
    u_tilde: jax.Array
    w: jax.Array
    q_hat: jax.Array
    p: jax.Array
    k_dec: jax.Array
    gamma: jax.Array


def _mm(a, b):
    # Full precision: the UT transform feeds the whole chunk, TF32 rounding would show downstream. (XLA's
    # multi-pass bf16 / TF32 algorithms were timed here and were no faster: the inverse is bound by traffic.)
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


# Who forms T = (I + A)^-1: "xla" (the matmul recursion below) or "pallas" (one program per chunk, by 16 x 16
# blocks kept in registers: kernels_pallas/gated_delta_rule/ut_inverse.py).
INVERSES = ("xla", "pallas")


def _unit_lower_inverse_by(a, inverse):
    if inverse == "pallas":  # loads only when asked for
        from kernels_pallas.gated_delta_rule.ut_inverse import unit_lower_inverse_pallas
        return unit_lower_inverse_pallas(a)
    return unit_lower_inverse(a)


def unit_lower_inverse(a: jax.Array, leaf: int = 16) -> jax.Array:
    """(I + a)^-1 for strictly lower-triangular a [... c c], by matmuls only (no serial triangular solve).

    Blocks of ``leaf`` rows use the nilpotent series (I + a)^-1 = sum_n (-a)^n, summed by repeated squaring;
    larger sizes halve recursively: inv([[L11, 0], [L21, L22]]) = [[X11, 0], [-X22 L21 X11, X22]].
    Batched GPU triangular solves of many tiny matrices are slow; these matmuls are not, but their slices and
    concatenations cost HBM passes: the op's GPU route forms T with the blocked Pallas kernel instead
    (``INVERSES``), and this is its reference.
    """
    c = a.shape[-1]
    if c <= leaf or c % 2:
        n = -a
        inv = jnp.eye(c, dtype=a.dtype) + n
        p, span = n, 2
        while span < c:  # after the step with power 2^i the sum holds every power below 2^(i+1)
            p = _mm(p, p)
            inv = inv + _mm(inv, p)
            span *= 2
        return inv
    h = c // 2
    x11 = unit_lower_inverse(a[..., :h, :h], leaf)
    x22 = unit_lower_inverse(a[..., h:, h:], leaf)
    x21 = -_mm(x22, _mm(a[..., h:, :h], x11))
    top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([x21, x22], axis=-1)], axis=-2)


def chunk_matmul(spec: str, x: jax.Array, y: jax.Array, *, mm_dtype, acc) -> jax.Array:
    """einsum with the chunkwise forms' operand precision: bf16 operands with ``acc`` (float32) accumulation when
    ``mm_dtype`` is bfloat16 (what fla does for bf16 models: tensor cores at full rate), otherwise full-precision
    ``acc`` products (``Precision.HIGHEST``: a float32 model gets no TF32 rounding on GPUs)."""
    if mm_dtype is not None and jnp.dtype(mm_dtype) == jnp.bfloat16:
        return jnp.einsum(spec, x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), preferred_element_type=acc)
    return jnp.einsum(spec, x.astype(acc), y.astype(acc), precision=jax.lax.Precision.HIGHEST)


_SOLVE = "...ij,...jm->...im"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def ut_solve(a: jax.Array, rhs_v: jax.Array, rhs_k: jax.Array, mm_dtype=None, inverse="xla"):
    """(T rhs_v, T rhs_k) with T = (I + a)^-1, for strictly lower-triangular a [... c c] (the UT transform).

    T itself is always formed at full precision (``unit_lower_inverse``, or its Pallas kernel with
    ``inverse="pallas"``: ``INVERSES``); ``mm_dtype`` sets the operands of
    the products with it (``chunk_matmul``). The gradient is written in closed form instead of differentiating
    the matmul recursion: with sol = T rhs,
        d rhs = T^T d sol,    d a = -strict_lower(sum over both right-hand sides of d rhs sol^T)
    (from dT = -T da T): a few products in place of the adjoint of every product of the recursion.
    The gradient never looks at how T was formed, so both ways of forming it share it.
    """
    return _ut_solve_fwd(a, rhs_v, rhs_k, mm_dtype, inverse)[0]


def _ut_solve_fwd(a, rhs_v, rhs_k, mm_dtype, inverse):
    # Named so that a rematerialised prepare can keep it (remat_prepare="save_inverse").
    t_inv = checkpoint_name(_unit_lower_inverse_by(a, inverse), UT_INVERSE)
    mm = functools.partial(chunk_matmul, mm_dtype=mm_dtype, acc=a.dtype)
    u, w = mm(_SOLVE, t_inv, rhs_v), mm(_SOLVE, t_inv, rhs_k)
    return (u, w), (t_inv, u, w)


def _ut_solve_bwd(mm_dtype, inverse, res, cot):
    t_inv, u, w = res
    return _ut_solve_vjp(t_inv, u, w, *cot, functools.partial(chunk_matmul, mm_dtype=mm_dtype, acc=t_inv.dtype))


def _ut_solve_vjp(t_inv, u, w, du, dw, mm):
    """(d a, d rhs_v, d rhs_k) of the UT solve (``ut_solve``'s closed form), with ``mm`` its products."""
    drhs_v = mm("...ji,...jm->...im", t_inv, du)
    drhs_k = mm("...ji,...jm->...im", t_inv, dw)
    da = mm("...im,...jm->...ij", drhs_v, u) + mm("...im,...jm->...ij", drhs_k, w)
    c = t_inv.shape[-1]
    # a is strictly lower triangular by construction: its other entries have no gradient.
    da = jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), -da, 0.0)
    return da, drhs_v, drhs_k


ut_solve.defvjp(_ut_solve_fwd, _ut_solve_bwd)


# Who differentiates the intra-chunk part: "closed_form" (``_prepare_bwd``: one hand-derived backward pass that
# reuses T from the forward) or "autodiff" (JAX's transpose of the forward, the reference the other is tested
# against; with ``remat_prepare`` it reruns the whole forward inside the backward).
PREPARE_VJPS = ("closed_form", "autodiff")


class _Intra(NamedTuple):
    """The intra-chunk quantities both the forward and the closed-form backward form from the inputs."""
    q: jax.Array      # [b h n c k] input dtype
    k: jax.Array      # [b h n c k]
    v: jax.Array      # [b h n c v]
    beta: jax.Array   # [b h n c] compute dtype
    dec: jax.Array    # [b h n c c] exp(G_i - G_j) where j <= i in the same document, else 0
    gam: jax.Array    # [b h n c] exp(G_i) while no document has started in this chunk, else 0
    e: jax.Array      # [b h n c] exp(G_last - G_j) where j is in the chunk's last document, else 0
    kk: jax.Array     # [b h n c c] k k^T (mm products)


def _to_chunks(x, c):
    """[b t h ...] -> [b h n c ...] (in the input dtype: the transpose moves half the bytes for bf16)."""
    b, t, h = x.shape[:3]
    return jnp.moveaxis(x.reshape((b, t // c, c, h) + x.shape[3:]), 3, 1)


def _from_chunks(x):
    """[b h n c ...] -> [b t h ...], the inverse of ``_to_chunks``."""
    b, h, n, c = x.shape[:4]
    return jnp.moveaxis(x, 1, 3).reshape((b, n * c, h) + x.shape[4:])


def _intra(q, k, v, g, beta, reset, c, mm) -> _Intra:
    b, t = reset.shape
    cd = _state_dtype(q.dtype)
    q, k, v = (_to_chunks(x, c) for x in (q, k, v))
    g, beta = (_to_chunks(x, c).astype(cd) for x in (g, beta))
    seg = jnp.cumsum(reset.reshape(b, t // c, c).astype(jnp.int32), axis=-1)[:, None]  # [b 1 n c] document index
    same = seg[..., :, None] == seg[..., None, :]  # [b 1 n c c]: no document start in (j, i]
    conn = same & jnp.tril(jnp.ones((c, c), bool))
    conn0 = seg == 0  # [b 1 n c]: no document start in [0, i] of this chunk
    conn_last = conn[..., -1, :]  # [b 1 n c]: no document start in (j, c-1]

    G = jnp.cumsum(g, axis=-1)  # [b h n c]
    # where() before exp(): the masked entries (j > i) may overflow and would poison the gradient.
    dec = jnp.where(conn, jnp.exp(jnp.where(conn, G[..., :, None] - G[..., None, :], 0.0)), 0.0)
    gam = jnp.where(conn0, jnp.exp(jnp.where(conn0, G, 0.0)), 0.0)
    e = jnp.where(conn_last, jnp.exp(jnp.where(conn_last, G[..., -1:] - G, 0.0)), 0.0)
    return _Intra(q, k, v, beta, dec, gam, e, mm("bhnik,bhnjk->bhnij", k, k))


def _strict_a(x: _Intra):
    """A = strictly-lower(beta_i D_ij (k k^T)_ij), the matrix of the UT transform."""
    c = x.dec.shape[-1]
    return jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), x.beta[..., :, None] * x.dec * x.kk, 0.0)


def chunk_prepare(q, k, v, g, beta, reset, *, scale, chunk_size, mm_dtype=None, out_dtype=None,
                  inverse="xla", vjp="closed_form", keep_inverse=True) -> ChunkInputs:
    """The parallel (intra-chunk) part of the chunkwise form. Inputs [b t h .] with t a multiple of c.

    mm_dtype: operand dtype of the products (``chunk_matmul``): None = full precision in the state dtype;
      bfloat16 = bf16 operands with float32 accumulation (the masks, decays and the inverse stay float32).
    out_dtype: dtype of the returned arrays other than gamma (default: the state dtype); bf16 halves what the
      scan kernels read.
    inverse: who forms the float32 inverse of the UT transform (``INVERSES``).
    vjp: how it is differentiated (``PREPARE_VJPS``). "closed_form" keeps the inputs, U~, W (outputs anyway)
      and, with ``keep_inverse``, T in the products' operand dtype (one [b h n c c] array, the size of P);
      without it T is formed again in the backward.
    """
    if inverse not in INVERSES:
        raise ValueError(f"inverse must be one of {INVERSES}; got {inverse!r}")
    if vjp not in PREPARE_VJPS:
        raise ValueError(f"vjp must be one of {PREPARE_VJPS}; got {vjp!r}")
    cfg = _PrepareCfg(float(scale), chunk_size, None if mm_dtype is None else jnp.dtype(mm_dtype).name,
                      jnp.dtype(out_dtype or _state_dtype(q.dtype)).name, inverse, bool(keep_inverse))
    if vjp == "autodiff":
        return _prepare_autodiff(q, k, v, g, beta, reset, cfg)
    return ChunkInputs(*_prepare_closed_form(q, k, v, g, beta, reset, cfg))


class _PrepareCfg(NamedTuple):
    """Static settings of one prepare (hashable: a non-differentiable argument of its custom_vjp)."""
    scale: float
    c: int
    mm_dtype: str | None
    out_dtype: str
    inverse: str
    keep_inverse: bool

    def mm(self, acc):
        return functools.partial(chunk_matmul, mm_dtype=self.mm_dtype, acc=acc)

    def solve_dtype(self, cd):
        """Operand dtype of the products with T: what T, U~ and W are kept in for the backward."""
        return jnp.bfloat16 if self.mm_dtype is not None and jnp.dtype(self.mm_dtype) == jnp.bfloat16 else cd


def _prepare_autodiff(q, k, v, g, beta, reset, cfg: _PrepareCfg) -> ChunkInputs:
    cd = _state_dtype(q.dtype)
    x = _intra(q, k, v, g, beta, reset, cfg.c, cfg.mm(cd))
    u_tilde, w = ut_solve(_strict_a(x), x.beta[..., None] * x.v.astype(cd),
                          (x.beta * x.gam)[..., None] * x.k.astype(cd), cfg.mm_dtype, cfg.inverse)
    return _outputs(x, u_tilde, w, cfg, cd)


def _outputs(x: _Intra, u_tilde, w, cfg: _PrepareCfg, cd) -> ChunkInputs:
    q_hat = (cfg.scale * x.gam)[..., None] * x.q.astype(cd)
    p = cfg.scale * cfg.mm(cd)("bhnik,bhnjk->bhnij", x.q, x.k) * x.dec
    k_dec = x.e[..., None] * x.k.astype(cd)
    od = jnp.dtype(cfg.out_dtype)
    return ChunkInputs(*(y.astype(od) for y in (u_tilde, w, q_hat, p, k_dec)), x.gam[..., -1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _prepare_closed_form(q, k, v, g, beta, reset, cfg: _PrepareCfg):
    return _prepare_fwd(q, k, v, g, beta, reset, cfg)[0]


def _prepare_fwd(q, k, v, g, beta, reset, cfg: _PrepareCfg):
    cd = _state_dtype(q.dtype)
    mm = cfg.mm(cd)
    x = _intra(q, k, v, g, beta, reset, cfg.c, mm)
    t_inv = _unit_lower_inverse_by(_strict_a(x), cfg.inverse)
    u_tilde = mm(_SOLVE, t_inv, x.beta[..., None] * x.v.astype(cd))
    w = mm(_SOLVE, t_inv, (x.beta * x.gam)[..., None] * x.k.astype(cd))
    out = _outputs(x, u_tilde, w, cfg, cd)
    # The backward multiplies by T, U~ and W only as operands of mm: kept in that dtype they are exact, and for a
    # bf16 model U~ and W are then the very arrays handed to the scan (no extra memory).
    sd = cfg.solve_dtype(cd)
    kept_t = t_inv.astype(sd) if cfg.keep_inverse else None
    return tuple(out), (q, k, v, g, beta, reset, kept_t, u_tilde.astype(sd), w.astype(sd))


def _prepare_bwd(cfg: _PrepareCfg, res, cot):
    """The intra-chunk part's vjp, derived by hand (per chunk; i the row, j the column; sums over the chunk):

        d rv = T^T dU~,  d rk = T^T dW              (rv = beta v, rk = beta gam k; U~ = T rv, W = T rk)
        dA   = -strictly-lower(d rv U~^T + d rk W^T)                       (from dT = -T dA T)
        dKK  = beta_i D dA      dQK = scale D dP     dD = beta_i KK dA + scale QK dP     (elementwise)
        dq   = dQK k + scale gam dQ^
        dk   = dQK^T q + (dKK + dKK^T) k + beta gam d rk + e dKd
        dv   = beta d rv        dbeta_i = sum_j (dA D KK)_ij + <d rv_i, v_i> + gam_i <d rk_i, k_i>
        dG_i = sum_j (dD D)_ij - sum_j (dD D)_ji + gam_i dgam_i - e_i <dKd_i, k_i> [+ sum_j e_j <dKd_j, k_j>, i last]
        dg   = reverse cumulative sum of dG within the chunk  (G = cumsum g)

    with dgam_i = beta_i <d rk_i, k_i> + scale <dQ^_i, q_i> [+ dgamma on the last row]. One pass of a few batched
    products and elementwise fusions, in place of autodiff's transpose of every forward op (and, with
    ``remat_prepare``, a second forward).
    """
    q, k, v, g, beta, reset, kept_t, u_tilde, w = res
    du, dw, dqh, dp, dkd, dgamma = cot
    cd = _state_dtype(q.dtype)
    mm = cfg.mm(cd)
    x = _intra(q, k, v, g, beta, reset, cfg.c, mm)
    t_inv = kept_t if kept_t is not None else _unit_lower_inverse_by(_strict_a(x), cfg.inverse)
    c = cfg.c
    kf, vf, qf = x.k.astype(cd), x.v.astype(cd), x.q.astype(cd)
    dqh, dp, dkd = (y.astype(cd) for y in (dqh, dp, dkd))

    da, drv, drk = _ut_solve_vjp(t_inv, u_tilde, w, du, dw, mm)  # [b h n c c], [b h n c v], [b h n c k]
    qk = mm("bhnik,bhnjk->bhnij", x.q, x.k)
    dkk = da * x.beta[..., :, None] * x.dec
    dqk = cfg.scale * dp * x.dec
    z = (da * x.beta[..., :, None] * x.kk + cfg.scale * dp * qk) * x.dec  # dD D

    rk_k = jnp.sum(drk * kf, axis=-1)  # [b h n c]: <d rk_i, k_i>
    last = jnp.arange(c) == c - 1
    dgam = x.beta * rk_k + cfg.scale * jnp.sum(dqh * qf, axis=-1) + jnp.where(last, dgamma[..., None], 0.0)
    dbeta = jnp.sum(da * x.dec * x.kk, axis=-1) + jnp.sum(drv * vf, axis=-1) + x.gam * rk_k
    dq = mm("bhnij,bhnjk->bhnik", dqk, x.k) + (cfg.scale * x.gam)[..., None] * dqh
    dk = (mm("bhnji,bhnjk->bhnik", dqk, x.q) + mm("bhnij,bhnjk->bhnik", dkk + jnp.swapaxes(dkk, -1, -2), x.k)
          + (x.beta * x.gam)[..., None] * drk + x.e[..., None] * dkd)
    dv = x.beta[..., None] * drv

    y = jnp.sum(dkd * kf, axis=-1) * x.e  # [b h n c]: d e_j e_j
    dG = (jnp.sum(z, axis=-1) - jnp.sum(z, axis=-2) + dgam * x.gam - y
          + jnp.where(last, jnp.sum(y, axis=-1, keepdims=True), 0.0))
    dg = jnp.flip(jnp.cumsum(jnp.flip(dG, -1), axis=-1), -1)
    grads = (dq, dk, dv, dg, dbeta)
    return tuple(_from_chunks(d).astype(p.dtype) for d, p in zip(grads, (q, k, v, g, beta))) + (None,)


_prepare_closed_form.defvjp(_prepare_fwd, _prepare_bwd)


def chunk_scan_xla(ci: ChunkInputs, s0):
    """The serial part in plain JAX: one state update per chunk. Returns (o [b h n c v], final state [b h k v])."""

    mm = functools.partial(chunk_matmul, mm_dtype=None, acc=s0.dtype)

    def step(s, x):
        u_tilde, w, q_hat, p, k_dec, gamma = x
        u = u_tilde - mm("bhck,bhkv->bhcv", w, s)
        o = mm("bhck,bhkv->bhcv", q_hat, s) + mm("bhij,bhjv->bhiv", p, u)
        s = gamma[..., None, None] * s + mm("bhck,bhcv->bhkv", k_dec, u)
        return s, o

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in ci)
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 2), s


def _pad_time(x, pad, mode="constant"):
    if pad == 0 or x is None:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, mode=mode)


def gated_delta_rule_chunked(q, k, v, g, beta, *, scale, initial_state=None, segment_ids=None, chunk_size=64,
                             scan=None, prepare=None, prepare_options=None, remat_prepare=True,
                             prepare_vjp="closed_form"):
    """Chunkwise form; ``scan`` is the serial inter-chunk part (defaults to ``chunk_scan_xla``), ``prepare`` the
    intra-chunk part (defaults to ``chunk_prepare`` with ``prepare_options``, e.g. its mm / out dtypes and inverse).

    remat_prepare: what the intra-chunk part keeps from forward to backward.
      With ``chunk_prepare`` and prepare_vjp="closed_form" (its hand-derived backward, the default), the inputs,
      U~ and W are kept in any case; True forms T again in the backward, "save_inverse" and False keep T (one
      [b h n c c] array in the products' operand dtype).
      With prepare_vjp="autodiff", or a ``prepare`` of the caller's: True recomputes the whole intra-chunk part
      in the backward pass instead of keeping its float32 intermediates (about ten [b h n c c] / [b h n c k]
      arrays per layer, what kept a 24-layer, 1.3B Gated DeltaNet from fitting in 80 GB) at the price of one
      more prepare pass; "save_inverse" recomputes all but the float32 inverse T; False keeps everything.
    prepare_vjp: ``PREPARE_VJPS``, for the default ``chunk_prepare``.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    sd = _state_dtype(q.dtype)
    c = chunk_size
    pad = (-t) % c
    # Padding tokens carry beta = 0, k = 0 and g = 0: they leave the state untouched. Segment ids are padded by
    # repeating the last one, so that no spurious document start zeroes the final state.
    q_, k_, v_, g_, beta_ = (_pad_time(x, pad) for x in (q, k, v, g, beta))
    seg_ = _pad_time(segment_ids, pad, mode="edge")
    reset = _resets(seg_, b, t + pad)
    if remat_prepare not in REMAT_PREPARE:
        raise ValueError(f"remat_prepare must be one of {REMAT_PREPARE}; got {remat_prepare!r}")
    if prepare_vjp not in PREPARE_VJPS:
        raise ValueError(f"prepare_vjp must be one of {PREPARE_VJPS}; got {prepare_vjp!r}")
    if prepare is not None and prepare_options:
        raise ValueError("prepare_options apply to the default chunk_prepare only; bind them into `prepare`")
    if prepare is None and prepare_vjp == "closed_form":
        # The hand-derived backward decides what it keeps itself: no checkpoint around it.
        prep = functools.partial(chunk_prepare, scale=scale, chunk_size=c, **(prepare_options or {}),
                                 vjp="closed_form", keep_inverse=remat_prepare is not True)
    else:
        opts = dict(prepare_options or {}, vjp="autodiff") if prepare is None else {}
        prep = functools.partial(prepare or chunk_prepare, scale=scale, chunk_size=c, **opts)
        if remat_prepare == "save_inverse":
            prep = jax.checkpoint(prep, policy=jax.checkpoint_policies.save_only_these_names(UT_INVERSE))
        elif remat_prepare:
            prep = jax.checkpoint(prep)
    ci = prep(q_, k_, v_, g_, beta_, reset)
    s0 = jnp.zeros((b, h, dk, dv), sd) if initial_state is None else initial_state.astype(sd)
    o, s = (scan or chunk_scan_xla)(ci, s0)  # [b h n c v]
    o = jnp.moveaxis(o.reshape(b, h, t + pad, dv), 1, 2)[:, :t]
    return o.astype(q.dtype), s


# ------------------------------------------------------------------------------------------------ dispatch

def _pallas_supported(q, v, chunk_size) -> str | None:
    """None when the Pallas kernel covers this call on this device, else the reason it does not."""
    if jax.default_backend() != "gpu":
        return f"backend {jax.default_backend()!r} is not a GPU"
    if q.shape[-1] not in (64, 128) or v.shape[-1] not in (64, 128):
        return f"head dims k={q.shape[-1]} v={v.shape[-1]} not in (64, 128)"
    if q.dtype not in (jnp.bfloat16, jnp.float32):
        return f"dtype {q.dtype} not bfloat16/float32"
    if chunk_size != 64:
        return f"chunk_size {chunk_size} != 64"
    return None


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     segment_ids=None, impl="auto", chunk_size=64, remat_prepare=True, ut_inverse="pallas",
                     prepare_vjp="closed_form"):
    """Gated delta rule over [b t h k] inputs (fla's ``chunk_gated_delta_rule`` layout and meaning).

    Args:
      q, k: [b t h k]. v: [b t h v]. g: [b t h] log decay (None = plain delta rule, g = 0). beta: [b t h].
      scale: query scale, default k ** -0.5.
      initial_state: [b h k v] state before position 0 (None = zeros).
      output_final_state: return the [b h k v] state after the last position (float32; float64 for f64 inputs).
      segment_ids: [b t] int; where the id changes between t-1 and t the state restarts from zero.
      impl: "auto" | "pallas" | "xla" | "reference".
      chunk_size: tokens per chunk of the chunkwise forms.
      remat_prepare: True | False | "save_inverse": what the chunkwise forms' intra-chunk part keeps for its
        backward (``gated_delta_rule_chunked``): with the closed-form backward True forms the UT inverse again
        and the others keep it; with autodiff True reruns the whole intra-chunk forward.
      ut_inverse: "pallas" | "xla": who forms the UT transform's inverse on the pallas route (``INVERSES``).
        "pallas" is the blocked kernel of ``kernels_pallas/gated_delta_rule/ut_inverse.py``, 2.2-3.2x faster
        than XLA's recursion on an H100 (experiments/results/bench_gdn_run7.md); TPUs and the xla route use XLA's.
      prepare_vjp: "closed_form" | "autodiff": how the chunkwise forms differentiate their intra-chunk part
        (``PREPARE_VJPS``; autodiff is the reference the hand-derived backward is tested against).
    Returns:
      (o [b t h v] in q.dtype, final_state or None)
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if ut_inverse not in INVERSES:
        raise ValueError(f"ut_inverse must be one of {INVERSES}; got {ut_inverse!r}")
    _check(q, k, v, g, beta, initial_state, segment_ids)
    if g is None:
        g = jnp.zeros(beta.shape, jnp.float32)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if impl == "auto":
        why = _pallas_supported(q, v, chunk_size)
        if why is None:
            impl = "pallas"
        else:
            log.debug("gated_delta_rule: falling back to impl='xla' (%s)", why)
            impl = "xla"
    kw = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids)
    if impl == "reference":
        o, s = gated_delta_rule_reference(q, k, v, g, beta, **kw)
        return o, (s if output_final_state else None)
    kw.update(remat_prepare=remat_prepare, prepare_vjp=prepare_vjp)
    if impl == "xla":
        o, s = gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=chunk_size, **kw)
    else:
        # The kernels load only when asked for.
        if jax.default_backend() == "tpu":  # the Mosaic TPU kernel; checked in the TPU interpreter only (no TPU here)
            from kernels_pallas.gated_delta_rule.chunk_scan_tpu import chunk_scan_pallas_tpu as chunk_scan_pallas
        else:
            from kernels_pallas.gated_delta_rule import chunk_scan_pallas
        scan = functools.partial(chunk_scan_pallas, mm_dtype=q.dtype)
        # bf16 models: bf16 operands and bf16 chunk inputs for the kernels, float32 state and accumulation.
        low = jnp.dtype(q.dtype) == jnp.bfloat16
        # The UT inverse kernel is a Triton one (GPUs, and the interpreter on CPU): TPUs keep XLA's.
        inverse = "xla" if jax.default_backend() == "tpu" else ut_inverse
        opts = dict(mm_dtype=q.dtype if low else None, out_dtype=q.dtype if low else None, inverse=inverse)
        o, s = gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=chunk_size, scan=scan, prepare_options=opts,
                                        **kw)
    return o, (s if output_final_state else None)
