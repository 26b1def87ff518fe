"""Pieces the recurrent mixers (Mamba, Mamba-2, Griffin, mLSTM, HASSM) share.

Carrying documents across calls: a recurrent cache also holds the segment id of the last token it consumed, so
that a call whose first token starts a new document (a packed prompt prefilled in pieces) begins from a zero
state, while a call that continues the document (or gives no segment ids, as decoding usually does) continues it.
Inside a call, the ops reset wherever the id changes.

The short causal depthwise convolution that these mixers put before their recurrences:

``y_t = bias + sum_k kernel[k] * x_{t - (w - 1) + k}`` per channel (the last tap multiplies the current token).
A decoding cache keeps the last ``w - 1`` inputs. Packed documents: where the segment id changes between t-1
and t (t >= 1) the taps that would reach back across the change read zeros, exactly as if the document had
been run alone; position 0 never resets, so a cache from an earlier call continues into the first document.

And the block-diagonal projection of Griffin's gates and xLSTM's headwise q / k / v.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from chimera_jax.layers import common


def continues(segment_ids: jax.Array | None, cached_id: jax.Array) -> jax.Array:
    """[b] bool: True where a call's first token continues the document held by the cache."""
    if segment_ids is None:
        return jnp.ones(cached_id.shape, bool)
    return segment_ids[:, 0] == cached_id


def carry_state(state, keep: jax.Array):
    """Zeroes the rows of a cached state (any pytree of [b ...] arrays) whose document ended; keep: [b] bool."""
    return jax.tree.map(lambda s: jnp.where(keep.reshape((-1,) + (1,) * (s.ndim - 1)), s, jnp.zeros_like(s)),
                        state)


def last_segment_id(segment_ids: jax.Array | None, cached_id: jax.Array) -> jax.Array:
    """[b] int32: the segment id a cache records after a call."""
    return cached_id if segment_ids is None else segment_ids[:, -1].astype(cached_id.dtype)


def causal_conv1d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
                  segment_ids: jax.Array | None = None, state: jax.Array | None = None):
    """x [b t c], kernel [w c], bias [c], state [b w-1 c] (None = zeros) -> (y [b t c], new state [b w-1 c])."""
    b, t, ch = x.shape
    w = kernel.shape[0]
    if kernel.shape != (w, ch):
        raise ValueError(f"conv kernel must be [w c] with c = {ch}; got {kernel.shape}")
    if state is None:
        state = jnp.zeros((b, w - 1, ch), x.dtype)
    elif state.shape != (b, w - 1, ch):
        raise ValueError(f"conv state must be [b w-1 c] = {(b, w - 1, ch)}; got {state.shape}")
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [b w-1+t c]
    where_t = jnp.arange(t) + (w - 1)                           # index of token t inside xp
    if segment_ids is None:
        first = jnp.zeros((b, t), jnp.int32)                    # every tap may read every earlier input
    else:
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be [b t] = {(b, t)}; got {segment_ids.shape}")
        prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
        start = segment_ids != prev
        # xp index of the most recent document start at or before t; taps before it read zeros.
        first = jax.lax.cummax(jnp.where(start, where_t[None], 0), axis=1)  # [b t]
    y = jnp.zeros_like(x)
    for k in range(w):
        src = where_t - (w - 1) + k                               # xp index read by tap k
        ok = (src[None] >= first)[..., None]                      # [b t 1]
        y = y + jnp.where(ok, xp[:, k:k + t], 0) * kernel[k].astype(x.dtype)
    if bias is not None:
        y = y + bias.astype(x.dtype)
    # The carried inputs must not leak a finished document into the next call either.
    tail = jnp.arange(t, t + w - 1)                               # xp indices kept in the new state
    new_state = jnp.where((tail[None] >= first[:, -1:])[..., None], xp[:, t:], 0)
    return y, new_state


class CausalConv1D(nn.Module):
    """Depthwise causal conv with parameters ``kernel`` [w c] (axes conv, ``axis``) and ``bias`` [c]."""

    width: int = 4
    axis: str | None = "mlp"  # logical name of the channel axis of the parameters
    use_bias: bool = True
    dtype: common.Dtype = jnp.float32
    param_dtype: common.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, segment_ids=None, state=None):
        if self.width < 1:
            raise ValueError(f"conv width must be >= 1, got {self.width}")
        ch = x.shape[-1]
        # PyTorch's Conv1d default (bound 1/sqrt(fan_in), fan_in = w for a depthwise filter), as in Mamba.
        init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=0, out_axis=1)
        kernel = common.param(self, "kernel", init, (self.width, ch), ("conv", self.axis), self.param_dtype)
        bias = (common.param(self, "bias", nn.initializers.zeros, (ch,), (self.axis,), self.param_dtype)
                if self.use_bias else None)
        return causal_conv1d(x.astype(self.dtype), kernel, bias, segment_ids=segment_ids, state=state)


class BlockDiagonalLinear(nn.Module):
    """y = x W (+ b) with W block-diagonal over ``heads`` blocks: [b t f] -> [b t f]. Params carry 'heads'.

    Griffin's RG-LRU gates and xLSTM's headwise q/k/v projections. (Not ternary under ``model.ternary``: the
    BitLinear scales are defined per group of 128 inputs of a dense matrix.)
    """

    heads: int
    use_bias: bool = True
    dtype: common.Dtype = jnp.float32
    param_dtype: common.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        f = x.shape[-1]
        if f % self.heads:
            raise ValueError(f"block-diagonal projection: {self.heads} blocks do not divide width {f}")
        k = f // self.heads
        w = common.param(self, "kernel", nn.initializers.normal(stddev=k ** -0.5), (self.heads, k, k),
                         ("heads", None, None), self.param_dtype)
        xh = x.reshape(*x.shape[:-1], self.heads, k).astype(self.dtype)  # [b t h k]
        y = jnp.einsum("bthk,hkj->bthj", xh, w.astype(self.dtype))
        if self.use_bias:
            bias = common.param(self, "bias", nn.initializers.zeros, (self.heads, k), ("heads", None),
                                self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y.reshape(x.shape)
