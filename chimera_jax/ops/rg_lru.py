"""Griffin's Real-Gated Linear Recurrent Unit (De et al., 2024, "Griffin"), a diagonal gated recurrence.

Per channel, with the recurrence gate ``r_t`` and input gate ``i_t`` in (0, 1) (sigmoids computed by the layer)
and a learnt ``Lambda`` (``a_param``), state in float32 (float64 for float64 inputs):

    log a_t = -c * r_t * softplus(Lambda)             # a_t = a^(c r_t), a = exp(-softplus(Lambda)), c = 8
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)
    y_t = h_t

Packed documents (``segment_ids``): where the id changes between t-1 and t (t >= 1) ``h_{t-1}`` is replaced by
zeros, exactly. Position 0 never resets, so an ``initial_state`` (a cache from an earlier call) continues. The
paper's normalisation sqrt(1 - a_t^2) is kept at document starts too, so a document's first step is the same
whether it follows another document, a zero cache or nothing.

Implementations (``impl``):
- ``reference``: token-by-token ``lax.scan``, the oracle.
- ``xla``: ``lax.associative_scan`` over composed affine maps h -> a h + u (the state is one vector per token,
  so the whole [b t d] sequence is scanned at once, in log(t) parallel steps).
- ``auto``: ``xla``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from chimera_jax.ops.common import resets as _resets, state_dtype as _state_dtype

IMPLS = ("auto", "xla", "reference")






def _check(x, gate_x, gate_a, a_param, initial_state, segment_ids):
    if x.ndim != 3:
        raise ValueError(f"x must be [b t d]; got {x.shape}")
    b, t, d = x.shape
    if gate_x.shape != x.shape or gate_a.shape != x.shape:
        raise ValueError(f"gate_x and gate_a must be [b t d] = {x.shape}; got {gate_x.shape}, {gate_a.shape}")
    if a_param.shape != (d,):
        raise ValueError(f"a_param must be [d] = {(d,)}; got {a_param.shape}")
    if initial_state is not None and initial_state.shape != (b, d):
        raise ValueError(f"initial_state must be [b d] = {(b, d)}; got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [b t] = {(b, t)}; got {segment_ids.shape}")


def _affine(x, gate_x, gate_a, a_param, reset, c):
    """The step as an affine map h -> a h + u; a = 0 at a reset. [.. d] each."""
    log_a = -c * gate_a * jax.nn.softplus(a_param)
    a = jnp.exp(log_a)
    # 1 - a^2 through expm1: exact near a = 1, where the slow channels live.
    u = jnp.sqrt(-jnp.expm1(2 * log_a)) * (gate_x * x)
    return jnp.where(reset[..., None], 0.0, a), u


def rg_lru_reference(x, gate_x, gate_a, a_param, *, c=8.0, initial_state=None, segment_ids=None):
    """Token-by-token recurrence (the oracle). Returns (y [b t d] in x.dtype, final state [b d])."""
    b, t, d = x.shape
    sd = _state_dtype(x.dtype)
    h0 = jnp.zeros((b, d), sd) if initial_state is None else initial_state.astype(sd)
    a_param = a_param.astype(sd)
    reset = _resets(segment_ids, b, t)

    def step(h, xs):
        x_t, gx_t, ga_t, r_t = xs
        a, u = _affine(x_t, gx_t, ga_t, a_param, r_t, c)
        h = a * h + u
        return h, h

    xs = (x.astype(sd), gate_x.astype(sd), gate_a.astype(sd), reset)
    h, y = jax.lax.scan(step, h0, jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs))
    return jnp.moveaxis(y, 0, 1).astype(x.dtype), h


def _compose(first, second):
    a1, u1 = first
    a2, u2 = second
    return a1 * a2, a2 * u1 + u2


def rg_lru_parallel(x, gate_x, gate_a, a_param, *, c=8.0, initial_state=None, segment_ids=None):
    """Associative-scan form. Returns (y [b t d] in x.dtype, final state [b d])."""
    b, t, _ = x.shape
    sd = _state_dtype(x.dtype)
    a, u = _affine(x.astype(sd), gate_x.astype(sd), gate_a.astype(sd), a_param.astype(sd),
                   _resets(segment_ids, b, t), c)                     # [b t d] each
    if initial_state is not None:
        u = u.at[:, 0].add(a[:, 0] * initial_state.astype(sd))       # fold the entering state into step 0
    _, h = jax.lax.associative_scan(_compose, (a, u), axis=1)
    return h.astype(x.dtype), h[:, -1]


def rg_lru(x, gate_x, gate_a, a_param, *, c=8.0, initial_state=None, segment_ids=None, impl="auto"):
    """x, gate_x, gate_a [b t d] (gates in (0, 1)), a_param [d] -> (y [b t d], final state [b d])."""
    _check(x, gate_x, gate_a, a_param, initial_state, segment_ids)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    fn = rg_lru_reference if impl == "reference" else rg_lru_parallel
    return fn(x, gate_x, gate_a, a_param, c=c, initial_state=initial_state, segment_ids=segment_ids)
