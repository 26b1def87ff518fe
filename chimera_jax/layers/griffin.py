"""Griffin's recurrent block (De et al., 2024): a GeLU gate branch and a conv + RG-LRU branch, multiplied.

    gate = gelu(W_gate u)                                       # [b t f], f = lru_width
    x = conv(W_x u)                                             # depthwise causal conv of width w
    r, i = sigmoid(blockdiag_a(x)), sigmoid(blockdiag_x(x))     # per-head block-diagonal gate projections
    out = W_out(RG-LRU(x, i, r) * gate)

Griffin's local-attention partner is ``layers.attention.Attention`` with a window; the 3:1 recurrent:attention
pattern is assembled by the LM. The decoding cache holds the last w - 1 conv inputs, the RG-LRU state [b f] and
the last segment id.
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common
from chimera_jax.layers import recurrent_common as rec
from chimera_jax.ops import rg_lru as rg_lru_op


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``griffin`` of the model config.

    lru_width: width f of the recurrence; 0 means d_model.   num_heads: blocks of the block-diagonal gate
    projections (divides f).   conv_width: causal conv taps (w).   c: the fixed RG-LRU exponent scale (8 in the
    paper).   min_rad, max_rad: range of the initial decay a = exp(-softplus(Lambda)) (a^2 uniform in between).
    impl: 'auto' | 'xla' | 'reference' for the RG-LRU op of the parallel path.
    """
    return ml_collections.ConfigDict(dict(lru_width=0, num_heads=4, conv_width=4, c=8.0, min_rad=0.9,
                                          max_rad=0.999, impl="auto"))


@flax.struct.dataclass
class GriffinCache:
    conv: jax.Array        # [b w-1 f] last conv inputs
    rnn: jax.Array         # [b f]     RG-LRU state (float32, or float64 in tests)
    segment_id: jax.Array  # [b] int32 segment id of the last token consumed


def _lambda_init(min_rad, max_rad):
    """Lambda with a = exp(-softplus(Lambda)) and a^2 ~ U(min_rad^2, max_rad^2): decays spread near 1."""
    def init(key, shape, dtype=jnp.float32):
        a2 = jax.random.uniform(key, shape, jnp.float32, min_rad ** 2, max_rad ** 2)
        softplus_lam = -0.5 * jnp.log(a2)
        return jnp.log(jnp.expm1(softplus_lam)).astype(dtype)  # inverse softplus
    return init


class GriffinRecurrent(nn.Module):
    cfg: ml_collections.FrozenConfigDict

    def _width(self):
        g = self.cfg.griffin
        f = g.lru_width or self.cfg.d_model
        if f % g.num_heads:
            raise ValueError(f"model.griffin.num_heads={g.num_heads} must divide lru_width={f}")
        return f

    def init_cache(self, batch: int, max_len: int, dtype) -> GriffinCache:
        del max_len  # a recurrent state does not grow with the context
        f = self._width()
        return GriffinCache(conv=jnp.zeros((batch, self.cfg.griffin.conv_width - 1, f), dtype),
                            rnn=jnp.zeros((batch, f), jnp.promote_types(dtype, jnp.float32)),
                            segment_id=jnp.zeros((batch,), jnp.int32))

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache: GriffinCache | None = None, decode=False):
        del positions  # the recurrence needs no positions; documents are told apart by segment_ids
        cfg, g = self.cfg, self.cfg.griffin
        t = x.shape[1]
        f = self._width()
        if decode and t != 1:
            raise ValueError(f"decode=True consumes one token per call, got x of length {t}")
        if decode and cache is None:
            raise ValueError("decode=True needs a cache (GriffinRecurrent.init_cache)")
        dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
        conv0 = rnn0 = None
        if cache is not None:
            conv0, rnn0 = rec.carry_state((cache.conv, cache.rnn), rec.continues(segment_ids, cache.segment_id))

        gate = nn.gelu(common.dense(cfg, f, ("embed", "mlp"), name="gate_proj")(x), approximate=True)  # [b t f]
        xs = common.dense(cfg, f, ("embed", "mlp"), name="x_proj")(x)                                   # [b t f]
        xs, conv = rec.CausalConv1D(width=g.conv_width, axis="mlp", dtype=dtype, param_dtype=pdtype, name="conv")(
            xs, segment_ids=segment_ids, state=conv0)

        bd = dict(heads=g.num_heads, dtype=dtype, param_dtype=pdtype)
        gate_a = jax.nn.sigmoid(rec.BlockDiagonalLinear(name="a_gate", **bd)(xs))  # recurrence gate r_t
        gate_x = jax.nn.sigmoid(rec.BlockDiagonalLinear(name="x_gate", **bd)(xs))  # input gate i_t
        a_param = common.param(self, "a_param", _lambda_init(g.min_rad, g.max_rad), (f,), ("mlp",), pdtype)
        y, state = rg_lru_op.rg_lru(xs, gate_x, gate_a, a_param, c=g.c, initial_state=rnn0, segment_ids=segment_ids,
                                    impl="reference" if decode else g.impl)

        out = common.dense(cfg, cfg.d_model, ("mlp", "embed"), name="out_proj")((y * gate).astype(dtype))
        new_cache = None if cache is None else GriffinCache(
            conv=conv.astype(cache.conv.dtype), rnn=state.astype(cache.rnn.dtype),
            segment_id=rec.last_segment_id(segment_ids, cache.segment_id))
        return out, new_cache
