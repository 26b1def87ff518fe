"""xLSTM's mLSTM cell (Beck et al., 2024): matrix memory, exponential input gate, max-stabilised normaliser.

Per head, from the gate pre-activations ``i~_t`` (input) and ``f~_t`` (forget) and a state ``(C [k v], n [k], m)``
(float32, or float64 for float64 inputs; C is stored as the transpose of the paper's v k^T):

    log f_t = log sigmoid(f~_t)
    m_t  = max(log f_t + m_{t-1}, i~_t)                        # stabiliser: the running max of the log gates
    i'_t = exp(i~_t - m_t),   f'_t = exp(log f_t + m_{t-1} - m_t)
    C_t  = f'_t C_{t-1} + i'_t k_t v_t^T,   n_t = f'_t n_{t-1} + i'_t k_t
    h_t  = C_t^T q_t / max(|n_t . q_t|, exp(-m_t))

(the paper's lower bound 1 on the normaliser becomes exp(-m_t) once C and n carry the factor exp(-m_t)). Scaling
q or k (e.g. by 1/sqrt(k)) is the caller's business. h does not depend on the value of m as long as C and n are
scaled consistently, so a zero state may start from any m; ``m = 0`` is used.

Packed documents (``segment_ids``): where the id changes between t-1 and t (t >= 1) the state is dropped
(f'_t = 0, m_t = i~_t), exactly. Position 0 never resets, so an ``initial_state`` (a cache) continues.

Implementations (``impl``):
- ``reference``: the recurrent form above, token by token (``lax.scan``), the oracle.
- ``xla``: the chunkwise-parallel form. Inside a chunk of ``c`` tokens, token j reaches token i (j <= i, same
  document) with log weight ``F_i - F_j + i~_j`` (F = cumulative log f in the chunk) and the state entering the
  chunk with ``F_i + m_in``; m_i is the max of these weights (equal to the recurrent m_t), and the output is a
  masked attention-like product plus the entering state's term. One (C, n, m) update per chunk is the only serial
  work. With c >= T this is the fully parallel form. Any T works (padded tokens are masked out).
- ``auto``: ``xla``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from chimera_jax.ops.common import resets as _resets, state_dtype as _state_dtype

IMPLS = ("auto", "xla", "reference")


class MLSTMState(NamedTuple):
    C: jax.Array  # [b h k v] matrix memory
    n: jax.Array  # [b h k]   normaliser
    m: jax.Array  # [b h]     stabiliser (log scale of C and n)


def zero_state(b: int, h: int, dk: int, dv: int, dtype) -> MLSTMState:
    return MLSTMState(C=jnp.zeros((b, h, dk, dv), dtype), n=jnp.zeros((b, h, dk), dtype), m=jnp.zeros((b, h), dtype))






def _check(q, k, v, i_gate, f_gate, initial_state, segment_ids):
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [b t h k]; got q {q.shape}, k {k.shape}")
    b, t, h, dk = q.shape
    if v.ndim != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be [b t h v] = [{b} {t} {h} v]; got {v.shape}")
    if i_gate.shape != (b, t, h) or f_gate.shape != (b, t, h):
        raise ValueError(f"i_gate and f_gate must be [b t h] = {(b, t, h)}; got {i_gate.shape}, {f_gate.shape}")
    if initial_state is not None:
        want = MLSTMState(C=(b, h, dk, v.shape[-1]), n=(b, h, dk), m=(b, h))
        got = MLSTMState(*(a.shape for a in initial_state))
        if got != want:
            raise ValueError(f"initial_state must have shapes {want}; got {got}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [b t] = {(b, t)}; got {segment_ids.shape}")


def _initial(initial_state, b, h, dk, dv, sd) -> MLSTMState:
    if initial_state is None:
        return zero_state(b, h, dk, dv, sd)
    return MLSTMState(*(a.astype(sd) for a in initial_state))


def mlstm_reference(q, k, v, i_gate, f_gate, *, initial_state=None, segment_ids=None):
    """Recurrent stabilised form (the oracle). Returns (h [b t h v] in q.dtype, final MLSTMState)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    sd = _state_dtype(q.dtype)
    reset = _resets(segment_ids, b, t)

    def step(state, xs):
        C, n, m = state
        q_t, k_t, v_t, i_t, f_t, r_t = xs  # [b h k] [b h k] [b h v] [b h] [b h] [b]
        r = r_t[:, None]
        log_f = jax.nn.log_sigmoid(f_t)
        m_new = jnp.where(r, i_t, jnp.maximum(log_f + m, i_t))
        # -inf inside exp (not a where around it): exp of a dropped state's weight may overflow, and its
        # gradient must not turn into 0 * inf.
        f_p = jnp.exp(jnp.where(r, -jnp.inf, log_f + m - m_new))
        i_p = jnp.exp(i_t - m_new)
        C = f_p[..., None, None] * C + i_p[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        n = f_p[..., None] * n + i_p[..., None] * k_t
        num = jnp.einsum("bhk,bhkv->bhv", q_t, C)
        den = jnp.einsum("bhk,bhk->bh", q_t, n)
        out = num / jnp.maximum(jnp.abs(den), jnp.exp(-m_new))[..., None]
        return MLSTMState(C, n, m_new), out

    xs = tuple(a.astype(sd) for a in (q, k, v, i_gate, f_gate)) + (reset,)
    state, out = jax.lax.scan(step, _initial(initial_state, b, h, dk, dv, sd),
                              jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs))
    return jnp.moveaxis(out, 0, 1).astype(q.dtype), state


def mlstm_chunked(q, k, v, i_gate, f_gate, *, chunk_size=64, initial_state=None, segment_ids=None):
    """Chunkwise-parallel form. Returns (h [b t h v] in q.dtype, final MLSTMState)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = int(chunk_size)
    if c < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    sd = _state_dtype(q.dtype)
    pad = (-t) % c
    z = (t + pad) // c

    def chunks(a):  # [b t ...] -> [b z c ...], zero-padded in time
        a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return a.reshape(b, z, c, *a.shape[2:])

    qc, kc, vc = (chunks(a.astype(sd)) for a in (q, k, v))          # [b z c h k] / [b z c h v]
    ig = jnp.moveaxis(chunks(i_gate.astype(sd)), 2, -1)             # [b z h c]
    log_f = jnp.moveaxis(chunks(jax.nn.log_sigmoid(f_gate.astype(sd))), 2, -1)  # [b z h c] (0 where padded)
    F = jnp.cumsum(log_f, axis=-1)                                  # [b z h c] cumulative log forget
    doc = jnp.cumsum(chunks(_resets(segment_ids, b, t)), axis=2)    # [b z c] document index inside the chunk
    real = chunks(jnp.ones((b, t), bool))                           # [b z c] False on padding

    # Token j -> token i inside the chunk: j <= i, same document, j a real token.
    reach = jnp.tril(jnp.ones((c, c), bool)) & (doc[..., :, None] == doc[..., None, :]) & real[..., None, :]
    log_w = jnp.where(reach[:, :, None], F[..., :, None] - F[..., None, :] + ig[..., None, :], -jnp.inf)  # [b z h i j]

    # Each chunk's own state at its end (relative to its own max), and how it passes an entering state on.
    to_end = (doc[..., -1:] == doc) & real                          # [b z c]
    log_e = jnp.where(to_end[:, :, None], F[..., -1:] - F + ig, -jnp.inf)  # [b z h c]
    m_loc = jnp.max(log_e, axis=-1)                                 # [b z h]
    w_e = jnp.exp(log_e - m_loc[..., None])
    C_loc = jnp.einsum("bzhj,bzjhk,bzjhv->bzhkv", w_e, kc, vc)
    n_loc = jnp.einsum("bzhj,bzjhk->bzhk", w_e, kc)
    through = (doc[:, :, -1] == 0)[..., None]                       # [b z 1] no document starts in the chunk

    def pass_state(state, xs):
        C, n, m = state
        C_l, n_l, m_l, g, thr = xs
        m_new = jnp.where(thr, jnp.maximum(g + m, m_l), m_l)
        a = jnp.exp(jnp.where(thr, g + m - m_new, -jnp.inf))        # weight of the entering state
        e = jnp.exp(m_l - m_new)                                    # weight of the chunk's own state
        return MLSTMState(a[..., None, None] * C + e[..., None, None] * C_l,
                          a[..., None] * n + e[..., None] * n_l, m_new), state

    per_chunk = (C_loc, n_loc, m_loc, F[..., -1], through)
    final, entering = jax.lax.scan(pass_state, _initial(initial_state, b, h, dk, dv, sd),
                                   jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), per_chunk))
    C_in, n_in, m_in = (jnp.moveaxis(a, 0, 1) for a in entering)    # [b z h k v] [b z h k] [b z h]

    # The entering state reaches token i with log weight F_i + m_in, unless a document started at or before i.
    log_in = jnp.where((doc == 0)[:, :, None], F + m_in[..., None], -jnp.inf)  # [b z h i]
    m = jnp.maximum(jnp.max(log_w, axis=-1), log_in)                # [b z h i] = the recurrent m_t
    S = jnp.exp(log_w - m[..., None]) * jnp.einsum("bzihk,bzjhk->bzhij", qc, kc)
    w_in = jnp.exp(log_in - m)                                      # [b z h i]
    num = jnp.einsum("bzhij,bzjhv->bzhiv", S, vc) + w_in[..., None] * jnp.einsum("bzihk,bzhkv->bzhiv", qc, C_in)
    den = jnp.sum(S, axis=-1) + w_in * jnp.einsum("bzihk,bzhk->bzhi", qc, n_in)
    out = num / jnp.maximum(jnp.abs(den), jnp.exp(-m))[..., None]   # [b z h i v]
    out = jnp.moveaxis(out, 3, 2).reshape(b, t + pad, h, dv)[:, :t]
    return out.astype(q.dtype), final


def mlstm(q, k, v, i_gate, f_gate, *, chunk_size=64, initial_state=None, segment_ids=None, impl="auto"):
    """q, k [b t h k], v [b t h v], gate pre-activations [b t h] -> (h [b t h v], final MLSTMState)."""
    _check(q, k, v, i_gate, f_gate, initial_state, segment_ids)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    kw = dict(initial_state=initial_state, segment_ids=segment_ids)
    if impl == "reference":
        return mlstm_reference(q, k, v, i_gate, f_gate, **kw)
    return mlstm_chunked(q, k, v, i_gate, f_gate, chunk_size=chunk_size, **kw)
