"""Mamba's selective scan (Gu & Dao, 2023): a diagonal SSM whose step size and input / output maps depend on x.

Per channel ``d`` a state of ``n`` entries (float32, or float64 for float64 inputs), with zero-order-hold
discretisation of A and the simplified (Euler) one of B, as in the paper:

    h_t = exp(dt_t * A) * h_{t-1} + (dt_t * x_t) * B_t        # A [d n] < 0, dt_t [d] > 0, B_t [n]
    y_t = h_t . C_t + D * x_t

Packed documents (``segment_ids``): where the id changes between t-1 and t (t >= 1) ``h_{t-1}`` is replaced by
zeros, exactly. Position 0 never resets, so an ``initial_state`` (a cache from an earlier call) continues.

Implementations (``impl``):
- ``reference``: token-by-token ``lax.scan``, the oracle.
- ``xla``: the parallel form. The recurrence is the linear map h -> a h + b, and composing two such maps is
  associative, so ``lax.associative_scan`` solves a chunk of ``c`` tokens in log(c) parallel steps; chunks are
  chained by a ``lax.scan`` whose body is rematerialised, so the [b c d n] states of only one chunk are live at
  a time (forward and backward), not [b t d n]. Any T works (the tail is padded with dt = 0, the identity step).
- ``auto``: ``xla``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from chimera_jax.ops.common import resets as _resets, state_dtype as _state_dtype

IMPLS = ("auto", "xla", "reference")






def _check(x, dt, A, B, C, D, initial_state, segment_ids):
    if x.ndim != 3:
        raise ValueError(f"x must be [b t d]; got {x.shape}")
    b, t, d = x.shape
    if dt.shape != x.shape:
        raise ValueError(f"dt must be [b t d] = {x.shape}; got {dt.shape}")
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A must be [d n] with d = {d}; got {A.shape}")
    n = A.shape[1]
    if B.shape != (b, t, n) or C.shape != (b, t, n):
        raise ValueError(f"B and C must be [b t n] = {(b, t, n)}; got B {B.shape}, C {C.shape}")
    if D is not None and D.shape != (d,):
        raise ValueError(f"D must be [d] = {(d,)}; got {D.shape}")
    if initial_state is not None and initial_state.shape != (b, d, n):
        raise ValueError(f"initial_state must be [b d n] = {(b, d, n)}; got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [b t] = {(b, t)}; got {segment_ids.shape}")


def _discretise(x, dt, A, B, reset):
    """Per-token linear maps h -> a h + u: a = exp(dt A) (0 at a reset), u = dt x B. [.. d n] each."""
    a = jnp.exp(dt[..., None] * A)
    a = jnp.where(reset[..., None, None], 0.0, a)
    u = (dt * x)[..., None] * B[..., None, :]
    return a, u


def selective_scan_reference(x, dt, A, B, C, D=None, *, initial_state=None, segment_ids=None):
    """Token-by-token recurrence (the oracle). Returns (y [b t d] in x.dtype, final state [b d n])."""
    b, t, d = x.shape
    n = A.shape[1]
    sd = _state_dtype(x.dtype)
    h0 = jnp.zeros((b, d, n), sd) if initial_state is None else initial_state.astype(sd)
    A = A.astype(sd)
    reset = _resets(segment_ids, b, t)

    def step(h, xs):
        x_t, dt_t, b_t, c_t, r_t = xs  # [b d] [b d] [b n] [b n] [b]
        a, u = _discretise(x_t, dt_t, A, b_t, r_t)
        h = a * h + u
        return h, jnp.einsum("bdn,bn->bd", h, c_t)

    xs = (x.astype(sd), dt.astype(sd), B.astype(sd), C.astype(sd), reset)
    h, y = jax.lax.scan(step, h0, jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs))
    y = jnp.moveaxis(y, 0, 1)
    if D is not None:
        y = y + D.astype(sd) * x.astype(sd)
    return y.astype(x.dtype), h


def _compose(first, second):
    """The map 'apply first, then second' of two affine maps h -> a h + u."""
    a1, u1 = first
    a2, u2 = second
    return a1 * a2, a2 * u1 + u2


def selective_scan_parallel(x, dt, A, B, C, D=None, *, chunk_size=128, initial_state=None, segment_ids=None):
    """Chunked associative-scan form. Returns (y [b t d] in x.dtype, final state [b d n])."""
    b, t, d = x.shape
    n = A.shape[1]
    c = int(chunk_size)
    if c < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    sd = _state_dtype(x.dtype)
    h0 = jnp.zeros((b, d, n), sd) if initial_state is None else initial_state.astype(sd)
    A = A.astype(sd)
    reset = _resets(segment_ids, b, t)
    pad = (-t) % c
    z = (t + pad) // c

    def chunks(a):  # [b t ...] -> [z b c ...], zero-padded in time (dt = 0 there: the identity map)
        a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(b, z, c, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk(h, xs):
        x_c, dt_c, b_c, c_c, r_c = xs                         # [b c d] [b c d] [b c n] [b c n] [b c]
        a, u = _discretise(x_c, dt_c, A, b_c, r_c)            # [b c d n] each
        u = u.at[:, 0].add(a[:, 0] * h)                       # fold the entering state into the first map
        _, hs = jax.lax.associative_scan(_compose, (a, u), axis=1)
        return hs[:, -1], jnp.einsum("bcdn,bcn->bcd", hs, c_c)

    xs = (x.astype(sd), dt.astype(sd), B.astype(sd), C.astype(sd), reset)
    h, y = jax.lax.scan(chunk, h0, jax.tree.map(chunks, xs))
    y = jnp.moveaxis(y, 0, 1).reshape(b, t + pad, d)[:, :t]
    if D is not None:
        y = y + D.astype(sd) * x.astype(sd)
    return y.astype(x.dtype), h


def selective_scan(x, dt, A, B, C, D=None, *, chunk_size=128, initial_state=None, segment_ids=None, impl="auto"):
    """x [b t d], dt [b t d] (> 0), A [d n] (< 0), B/C [b t n], D [d] -> (y [b t d], final state [b d n])."""
    _check(x, dt, A, B, C, D, initial_state, segment_ids)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    kw = dict(initial_state=initial_state, segment_ids=segment_ids)
    if impl == "reference":
        return selective_scan_reference(x, dt, A, B, C, D, **kw)
    return selective_scan_parallel(x, dt, A, B, C, D, chunk_size=chunk_size, **kw)
