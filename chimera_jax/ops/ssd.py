"""Mamba-2's state-space duality (SSD) scan (Dao & Gu, 2024, "Transformers are SSMs").

Per head, a scalar decay and a state ``S`` of shape [v n] (float32, or float64 for float64 inputs):

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T      # A < 0 one scalar per head, dt_t > 0
    y_t = S_t C_t

B and C are shared by the heads of a group (h = g * r). Packed documents (``segment_ids``): where the id
changes between t-1 and t (t >= 1) ``S_{t-1}`` is replaced by zeros, exactly. Position 0 never resets, so an
``initial_state`` (the state a cache carried out of an earlier call) continues into the first document.

Implementations (``impl``):
- ``reference``: token-by-token ``lax.scan`` of the recurrence, the oracle.
- ``xla``: the chunked SSD form. Inside a chunk of ``c`` tokens the output is a masked "attention"
  ``y_i = sum_j (C_i . B_j) exp(cs_i - cs_j) dt_j x_j`` (cs = cumulative log decay), plus the decayed state that
  entered the chunk; the only serial work is one [v n] state update per chunk. Any T works (the tail chunk is
  padded with dt = 0, which is the identity step).
- ``auto``: ``xla`` (no Pallas kernel yet).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from chimera_jax.ops.common import resets as _resets, state_dtype as _state_dtype

IMPLS = ("auto", "xla", "reference")






def _check(x, dt, A, B, C, initial_state, segment_ids):
    if x.ndim != 4:
        raise ValueError(f"x must be [b t h v]; got {x.shape}")
    b, t, h, v = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"dt must be [b t h] = {(b, t, h)}; got {dt.shape}")
    if A.shape != (h,):
        raise ValueError(f"A must be [h] = {(h,)}; got {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, t) or B.shape != C.shape:
        raise ValueError(f"B and C must both be [b t g n] with b t = {b, t}; got B {B.shape}, C {C.shape}")
    g, n = B.shape[2:]
    if h % g:
        raise ValueError(f"heads h={h} must be a multiple of the B/C groups g={g}")
    if initial_state is not None and initial_state.shape != (b, h, v, n):
        raise ValueError(f"initial_state must be [b h v n] = {(b, h, v, n)}; got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [b t] = {(b, t)}; got {segment_ids.shape}")


def ssd_reference(x, dt, A, B, C, *, initial_state=None, segment_ids=None):
    """Token-by-token recurrence (the oracle). Returns (y [b t h v] in x.dtype, final state [b h v n])."""
    b, t, h, v = x.shape
    g, n = B.shape[2:]
    sd = _state_dtype(x.dtype)
    s0 = jnp.zeros((b, h, v, n), sd) if initial_state is None else initial_state.astype(sd)
    Bh = jnp.repeat(B, h // g, axis=2).astype(sd)  # [b t h n]
    Ch = jnp.repeat(C, h // g, axis=2).astype(sd)  # [b t h n]
    reset = _resets(segment_ids, b, t)

    def step(s, xs):
        x_t, dt_t, b_t, c_t, r_t = xs  # [b h v] [b h] [b h n] [b h n] [b]
        s = jnp.where(r_t[:, None, None, None], 0.0, s)
        s = jnp.exp(dt_t * A)[..., None, None] * s + (dt_t[..., None] * x_t)[..., None] * b_t[:, :, None, :]
        return s, jnp.einsum("bhvn,bhn->bhv", s, c_t)

    xs = (x.astype(sd), dt.astype(sd), Bh, Ch, reset)
    s, y = jax.lax.scan(step, s0, jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs))
    return jnp.moveaxis(y, 0, 1).astype(x.dtype), s


def ssd_chunked(x, dt, A, B, C, *, chunk_size=64, initial_state=None, segment_ids=None):
    """The chunked SSD form. Returns (y [b t h v] in x.dtype, final state [b h v n])."""
    b, t, h, v = x.shape
    g, n = B.shape[2:]
    r = h // g
    c = int(chunk_size)
    if c < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    sd = _state_dtype(x.dtype)
    s0 = jnp.zeros((b, h, v, n), sd) if initial_state is None else initial_state.astype(sd)
    reset = _resets(segment_ids, b, t)
    pad = (-t) % c
    tp = t + pad
    z = tp // c  # number of chunks

    def chunks(a, *tail):  # [b t ...] -> [b z c ...], zero-padded in time
        a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return a.reshape(b, z, c, *tail)

    xc = chunks(x.astype(sd), g, r, v)            # [b z c g r v]
    dtc = chunks(dt.astype(sd), g, r)             # [b z c g r]   padded steps have dt = 0: identity
    Bc = chunks(B.astype(sd), g, n)               # [b z c g n]
    Cc = chunks(C.astype(sd), g, n)               # [b z c g n]
    doc = jnp.cumsum(chunks(reset), axis=2)       # [b z c]  document index inside the chunk

    cs = jnp.cumsum(dtc * A.astype(sd).reshape(g, r), axis=2)  # [b z c g r] cumulative log decay
    cs_t = jnp.moveaxis(cs, 2, -1)                              # [b z g r c]
    # Token j reaches token i (j <= i) with decay exp(cs_i - cs_j), unless a document starts in (j, i].
    reach = jnp.tril(jnp.ones((c, c), bool)) & (doc[..., :, None] == doc[..., None, :])  # [b z i j]
    seg = cs_t[..., :, None] - cs_t[..., None, :]                                          # [b z g r i j]
    # where() before exp(): masked entries (j > i) hold large positive values that must never be exponentiated.
    L = jnp.exp(jnp.where(reach[:, :, None, None], seg, -jnp.inf))
    xdt = xc * dtc[..., None]                                                               # [b z c g r v]
    CB = jnp.einsum("bzign,bzjgn->bzgij", Cc, Bc)
    y = jnp.einsum("bzgij,bzgrij,bzjgrv->bzigrv", CB, L, xdt)

    # Each chunk's own contribution to the state at its end, and how it decays a state that enters it.
    to_end = doc[..., -1:] == doc                                                           # [b z c]
    w_end = jnp.exp(jnp.where(to_end[:, :, None, None], cs_t[..., -1:] - cs_t, -jnp.inf))  # [b z g r c]
    local = jnp.einsum("bzgrj,bzjgrv,bzjgn->bzgrvn", w_end, xdt, Bc)                       # [b z g r v n]
    through = jnp.exp(cs_t[..., -1]) * (doc[:, :, -1] == 0)[..., None, None]               # [b z g r]

    def pass_state(s, inp):  # s: [b g r v n], the state entering this chunk
        loc, dec = inp
        return dec[..., None, None] * s + loc, s

    s_end, s_in = jax.lax.scan(pass_state, s0.reshape(b, g, r, v, n),
                               (jnp.moveaxis(local, 1, 0), jnp.moveaxis(through, 1, 0)))
    s_in = jnp.moveaxis(s_in, 0, 1)                                                        # [b z g r v n]
    # The entering state reaches token i with decay exp(cs_i), unless a document started at or before i.
    w_in = jnp.exp(cs) * (doc == 0)[..., None, None]                                       # [b z c g r]
    y = y + jnp.einsum("bzign,bzgrvn,bzigr->bzigrv", Cc, s_in, w_in)
    y = y.reshape(b, tp, h, v)[:, :t]
    return y.astype(x.dtype), s_end.reshape(b, h, v, n)


def ssd(x, dt, A, B, C, *, chunk_size=64, initial_state=None, segment_ids=None, impl="auto"):
    """SSD scan: x [b t h v], dt [b t h] (> 0), A [h] (< 0), B/C [b t g n] -> (y [b t h v], state [b h v n])."""
    _check(x, dt, A, B, C, initial_state, segment_ids)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return ssd_reference(x, dt, A, B, C, initial_state=initial_state, segment_ids=segment_ids)
    return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state, segment_ids=segment_ids)
