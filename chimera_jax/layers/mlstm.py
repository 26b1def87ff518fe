"""xLSTM's mLSTM block (Beck et al., 2024): up-projection, conv, mLSTM cell, per-head norm, gate, down-projection.

    x, z = up_proj(u)                                        # [b t f] each, f = proj_factor * d_model
    x_c = silu(conv(x))                                      # depthwise causal conv of width w
    q, k = headwise(x_c), v = headwise(x)                    # block-diagonal projections (blocks of qkv_block_size)
    i~, f~ = W_i [q k v] + b_i, W_f [q k v] + b_f             # gate pre-activations, one per head
    h = mLSTM(q, k / sqrt(k), v, i~, f~)                     # exponential input gate, sigmoid forget gate
    out = down_proj((norm(h) + skip * x_c) * silu(z))        # norm: per-head layer norm

The decoding cache holds the last w - 1 conv inputs, the mLSTM state (C, n, m) and the last segment id.
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common
from chimera_jax.layers import recurrent_common as rec
from chimera_jax.ops import mlstm as mlstm_op


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``mlstm`` of the model config.

    num_heads: mLSTM heads (h); head width k = v = f / h.   proj_factor: up-projection width f / d_model.
    qkv_block_size: block size of the headwise q / k / v projections (0 = dense projections).
    conv_width: causal conv taps (w).   chunk_size: chunk length (c) of the chunkwise-parallel form; with
        head widths near 1024 the per-chunk [k v] states dominate memory, so chunks are long (256).
    forget_bias_min, forget_bias_max: the forget-gate biases start evenly spaced in this range (long memory).
    impl: 'auto' | 'xla' | 'reference' for the mLSTM op of the parallel path.
    """
    return ml_collections.ConfigDict(dict(num_heads=4, proj_factor=2.0, qkv_block_size=4, conv_width=4,
                                          chunk_size=256, forget_bias_min=3.0, forget_bias_max=6.0, impl="auto"))


@flax.struct.dataclass
class MLSTMCache:
    conv: jax.Array        # [b w-1 f]  last conv inputs
    C: jax.Array           # [b h k v]  matrix memory (float32, or float64 in tests)
    n: jax.Array           # [b h k]    normaliser
    m: jax.Array           # [b h]      stabiliser
    segment_id: jax.Array  # [b] int32  segment id of the last token consumed


def _linspace_init(lo, hi):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.linspace(lo, hi, shape[0], dtype=jnp.float32).astype(dtype)
    return init


class MLSTM(nn.Module):
    cfg: ml_collections.FrozenConfigDict

    def _dims(self):
        m = self.cfg.mlstm
        f = round(m.proj_factor * self.cfg.d_model)
        if f % m.num_heads:
            raise ValueError(f"model.mlstm: inner width proj_factor * d_model = {f} must be a multiple of "
                             f"num_heads={m.num_heads}")
        if m.qkv_block_size and f % m.qkv_block_size:
            raise ValueError(f"model.mlstm.qkv_block_size={m.qkv_block_size} must divide the inner width {f}")
        return f, m.num_heads, f // m.num_heads

    def init_cache(self, batch: int, max_len: int, dtype) -> MLSTMCache:
        del max_len  # a recurrent state does not grow with the context
        f, h, k = self._dims()
        s = mlstm_op.zero_state(batch, h, k, k, jnp.promote_types(dtype, jnp.float32))
        return MLSTMCache(conv=jnp.zeros((batch, self.cfg.mlstm.conv_width - 1, f), dtype), C=s.C, n=s.n, m=s.m,
                          segment_id=jnp.zeros((batch,), jnp.int32))

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache: MLSTMCache | None = None, decode=False):
        del positions  # the recurrence needs no positions; documents are told apart by segment_ids
        cfg, m = self.cfg, self.cfg.mlstm
        b, t, _ = x.shape
        f, h, hd = self._dims()
        if decode and t != 1:
            raise ValueError(f"decode=True consumes one token per call, got x of length {t}")
        if decode and cache is None:
            raise ValueError("decode=True needs a cache (MLSTM.init_cache)")
        dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
        conv0 = state0 = None
        if cache is not None:
            conv0, C0, n0, m0 = rec.carry_state((cache.conv, cache.C, cache.n, cache.m),
                                                rec.continues(segment_ids, cache.segment_id))
            state0 = mlstm_op.MLSTMState(C0, n0, m0)

        up = common.dense(cfg, (2, f), ("embed", None, "mlp"), name="up_proj")(x)  # [b t 2 f]
        xm, z = up[:, :, 0], up[:, :, 1]
        xc, conv = rec.CausalConv1D(width=m.conv_width, axis="mlp", dtype=dtype, param_dtype=pdtype, name="conv")(
            xm, segment_ids=segment_ids, state=conv0)
        xc = nn.silu(xc)                                                               # [b t f]

        def headwise(name, inp):
            if m.qkv_block_size:
                return rec.BlockDiagonalLinear(heads=f // m.qkv_block_size, use_bias=False, dtype=dtype,
                                               param_dtype=pdtype, name=name)(inp)
            return common.dense(cfg, f, ("mlp", None), name=name)(inp)

        q, k, v = headwise("q_proj", xc), headwise("k_proj", xc), headwise("v_proj", xm)  # [b t f] each
        qkv = jnp.concatenate([q, k, v], axis=-1)                                         # [b t 3f]
        # Gate weights start at zero (the gates start input-independent), as in xLSTM.
        i_gate = common.dense(cfg, h, ("mlp", "heads"), name="i_gate", kernel_init=nn.initializers.zeros)(qkv)
        f_gate = common.dense(cfg, h, ("mlp", "heads"), name="f_gate", kernel_init=nn.initializers.zeros)(qkv)
        i_bias = common.param(self, "i_bias", nn.initializers.normal(0.1), (h,), ("heads",), pdtype)
        f_bias = common.param(self, "f_bias", _linspace_init(m.forget_bias_min, m.forget_bias_max), (h,),
                              ("heads",), pdtype)

        def heads(a):  # [b t f] -> [b t h k]
            return a.reshape(b, t, h, hd)

        sd = jnp.promote_types(dtype, jnp.float32)  # gate pre-activations feed exp(): keep them in float32+
        y, state = mlstm_op.mlstm(heads(q), heads(k) * hd ** -0.5, heads(v), i_gate.astype(sd) + i_bias.astype(sd),
                                  f_gate.astype(sd) + f_bias.astype(sd), chunk_size=m.chunk_size,
                                  initial_state=state0, segment_ids=segment_ids,
                                  impl="reference" if decode else m.impl)

        # Per-head layer norm (xLSTM's MultiHeadLayerNorm), statistics in float32 or wider.
        yf = y.astype(jnp.promote_types(y.dtype, jnp.float32))                          # [b t h k]
        yf = yf - jnp.mean(yf, axis=-1, keepdims=True)
        yf = yf * jax.lax.rsqrt(jnp.mean(yf * yf, axis=-1, keepdims=True) + cfg.get("norm_eps", 1e-6))
        scale = common.param(self, "norm_scale", nn.initializers.ones, (f,), ("mlp",), pdtype)
        y = yf.reshape(b, t, f).astype(dtype) * scale.astype(dtype)
        skip = common.param(self, "skip", nn.initializers.ones, (f,), ("mlp",), pdtype)
        y = (y + skip.astype(dtype) * xc) * nn.silu(z)
        out = common.dense(cfg, cfg.d_model, ("mlp", "embed"), name="down_proj")(y)
        new_cache = None if cache is None else MLSTMCache(
            conv=conv.astype(cache.conv.dtype), C=state.C.astype(cache.C.dtype), n=state.n.astype(cache.n.dtype),
            m=state.m.astype(cache.m.dtype), segment_id=rec.last_segment_id(segment_ids, cache.segment_id))
        return out, new_cache
