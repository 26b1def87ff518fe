"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, 2024) as a sequence mixer.

    q, k, v = silu(conv(W_q x)), silu(conv(W_k x)), silu(conv(W_v x))    # [b t h k], [b t h k], [b t h v]
    q, k = q / |q|, k / |k|                                              # L2 norm per head
    g = -exp(A_log) * softplus(W_a x + dt_bias)                          # [b t h] log decay, alpha_t = exp(g_t)
    beta = sigmoid(W_b x)                                                # [b t h] writing strength
    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T ;  o_t = S_t q_t / sqrt(k)
    y = W_o (RMSNorm(o) * silu(W_g x))                                   # gated output norm per head

The decay follows Mamba-2's parameterisation (a per-head rate A times a data-dependent step), so alpha_t lies in
(0, 1) and a long step forgets more. The recurrence is ``chimera_jax.ops.gated_delta_rule`` (reference, chunked
WY form, Pallas kernel); decode steps call its token-by-token form.

Cache: the last w - 1 conv inputs of q, k, v, the state S [b h k v] and the segment id of the last token seen.
Packed documents: where the segment id changes the state and the conv taps restart from zero — also between the
last token of the cache and the first token of the next call, which is why the cache keeps that id.
"""
from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common, recurrent_common as rec
from chimera_jax.layers.recurrent_common import CausalConv1D
from chimera_jax.ops import gated_delta_rule as gdr_op


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``gdn`` of the model config.

    num_heads: heads (h).   head_dim: query/key width per head (k).   expand_v: value width per head / head_dim,
      so v = head_dim * expand_v.
    conv_width: taps of the short causal convs on q, k, v (w; 0 or 1 = no conv history).
    chunk_size: chunk length (c) of the chunkwise form.   impl: 'auto' | 'pallas' | 'xla' | 'reference' for the
      parallel path (decode always uses the token-by-token step).
    dt_min, dt_max: range of the log-uniform initial step (softplus(dt_bias)).
    a_init_min, a_init_max: range of the uniform initial decay rate exp(A_log).
    remat_prepare: 'auto' | 'on' | 'off' | 'save_inverse': what the op's intra-chunk part keeps for its backward
      (``gated_delta_rule``'s flag: with its closed-form backward, 'on' forms the UT inverse again and the others
      keep it, one [b h n c c] array in the operand dtype). 'auto': on,
      unless the model rematerialises whole blocks (``model.remat = 'full'``): the block's backward already
      reruns the op's forward, and a second prepare pass there would buy no memory.
    ut_inverse: 'pallas' | 'xla': who forms the UT transform's inverse on the op's pallas route
      (``gated_delta_rule``'s flag: the Pallas kernel by default, XLA's matmul recursion to compare).
    """
    return ml_collections.ConfigDict(dict(num_heads=4, head_dim=64, expand_v=1.0, conv_width=4, chunk_size=64,
                                          impl="auto", dt_min=0.001, dt_max=0.1, a_init_min=1.0, a_init_max=16.0,
                                          remat_prepare="auto", ut_inverse="pallas"))


@flax.struct.dataclass
class GDNCache:
    conv_q: jax.Array        # [b w-1 h*k] last conv inputs
    conv_k: jax.Array        # [b w-1 h*k]
    conv_v: jax.Array        # [b w-1 h*v]
    state: jax.Array         # [b h k v]  delta-rule state (float32, or float64 in tests)
    last_segment: jax.Array  # [b] int32 segment id of the last token consumed (-1 = none yet)


def _dims(cfg):
    c = cfg.gdn
    if c.num_heads < 1 or c.head_dim < 1:
        raise ValueError(f"model.gdn.num_heads={c.num_heads} and head_dim={c.head_dim} must be positive")
    v = int(round(c.head_dim * c.expand_v))
    if v < 1 or abs(v - c.head_dim * c.expand_v) > 1e-9:
        raise ValueError(f"model.gdn.head_dim * expand_v = {c.head_dim * c.expand_v} must be a positive integer")
    return c.num_heads, c.head_dim, v


def _dt_bias_init(dt_min, dt_max):
    """Inverse softplus of a log-uniform step in [dt_min, dt_max]: the heads start on a spread of time scales."""
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def _a_log_init(lo, hi):
    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)
    return init


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / |x| over the last axis (computed in float32 or wider)."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)


def remat_prepare(cfg) -> bool | str:
    """The op's ``remat_prepare`` for this model config (see ``remat_prepare`` in the layer's config)."""
    choice = cfg.gdn.get("remat_prepare", "auto")
    if choice not in ("auto", "on", "off", "save_inverse"):
        raise ValueError(f"model.gdn.remat_prepare must be 'auto', 'on', 'off' or 'save_inverse'; got {choice!r}")
    if choice == "auto":
        return cfg.get("remat", "none") != "full"
    return choice if choice == "save_inverse" else choice == "on"


class GatedDeltaNet(nn.Module):
    cfg: ml_collections.FrozenConfigDict

    def init_cache(self, batch: int, max_len: int, dtype) -> GDNCache:
        del max_len  # a recurrent state does not grow with the context
        h, dk, dv = _dims(self.cfg)
        w1 = max(self.cfg.gdn.conv_width - 1, 0)
        return GDNCache(conv_q=jnp.zeros((batch, w1, h * dk), dtype), conv_k=jnp.zeros((batch, w1, h * dk), dtype),
                        conv_v=jnp.zeros((batch, w1, h * dv), dtype),
                        state=jnp.zeros((batch, h, dk, dv), jnp.promote_types(dtype, jnp.float32)),
                        last_segment=jnp.full((batch,), -1, jnp.int32))

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache: GDNCache | None = None, decode=False):
        del positions  # the recurrence needs no positions; documents are told apart by segment_ids
        cfg, c = self.cfg, self.cfg.gdn
        b, t, _ = x.shape
        h, dk, dv = _dims(cfg)
        if decode and t != 1:
            raise ValueError(f"decode=True consumes one token per call, got x of length {t}")
        if decode and cache is None:
            raise ValueError("decode=True needs a cache (GatedDeltaNet.init_cache)")
        if segment_ids is not None and segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be [b t] = {(b, t)}; got {segment_ids.shape}")
        dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
        sd = jnp.promote_types(dtype, jnp.float32)

        keep = None if cache is None else rec.continues(segment_ids, cache.last_segment)  # [b]
        carried = lambda a: rec.carry_state(a, keep)  # zero rows whose first token starts a new document

        q = common.dense(cfg, (h, dk), ("embed", "heads", "head_dim"), name="q_proj")(x)  # [b t h k]
        k = common.dense(cfg, (h, dk), ("embed", "heads", "head_dim"), name="k_proj")(x)  # [b t h k]
        v = common.dense(cfg, (h, dv), ("embed", "heads", "head_dim"), name="v_proj")(x)  # [b t h v]
        a = common.dense(cfg, h, ("embed", "heads"), name="a_proj")(x)                    # [b t h]
        beta_logit = common.dense(cfg, h, ("embed", "heads"), name="b_proj")(x)            # [b t h]
        gate = common.dense(cfg, (h, dv), ("embed", "heads", "head_dim"), name="g_proj")(x)  # [b t h v]

        conv_states = {}
        if c.conv_width > 1:
            conv = dict(width=c.conv_width, axis="heads", use_bias=False, dtype=dtype, param_dtype=pdtype)
            outs = []
            for name, z, width in (("q", q, dk), ("k", k, dk), ("v", v, dv)):
                prev = None if cache is None else carried(getattr(cache, f"conv_{name}"))
                z, conv_states[name] = CausalConv1D(name=f"conv_{name}", **conv)(
                    z.reshape(b, t, h * width), segment_ids=segment_ids, state=prev)
                outs.append(nn.silu(z).reshape(b, t, h, width))
            q, k, v = outs
        else:
            q, k, v = nn.silu(q), nn.silu(k), nn.silu(v)
        q, k = l2_normalize(q).astype(dtype), l2_normalize(k).astype(dtype)

        dt_bias = common.param(self, "dt_bias", _dt_bias_init(c.dt_min, c.dt_max), (h,), ("heads",), pdtype)
        a_log = common.param(self, "A_log", _a_log_init(c.a_init_min, c.a_init_max), (h,), ("heads",), pdtype)
        g = -jnp.exp(a_log.astype(sd)) * jax.nn.softplus(a.astype(sd) + dt_bias.astype(sd))  # [b t h]
        beta = jax.nn.sigmoid(beta_logit.astype(sd))                                          # [b t h]

        o, state = gdr_op.gated_delta_rule(
            q, k, v.astype(dtype), g, beta, scale=dk ** -0.5,
            initial_state=None if cache is None else carried(cache.state), output_final_state=cache is not None,
            segment_ids=segment_ids, impl="reference" if decode else c.impl, chunk_size=c.chunk_size,
            remat_prepare=remat_prepare(cfg), ut_inverse=c.get("ut_inverse", "pallas"))  # [b t h v]

        # Gated RMSNorm over each head's v channels, one scale vector shared by the heads.
        o = common.RMSNorm(eps=cfg.get("norm_eps", 1e-6), dtype=dtype, param_dtype=pdtype, name="o_norm")(o)
        o = (o * nn.silu(gate)).reshape(b, t, h * dv)
        y = common.dense(cfg, cfg.d_model, ("heads", "embed"), name="o_proj")(o.astype(dtype))

        new_cache = None
        if cache is not None:
            last = rec.last_segment_id(segment_ids, cache.last_segment)
            conv_new = {n: conv_states.get(n, getattr(cache, f"conv_{n}")) for n in ("q", "k", "v")}
            new_cache = GDNCache(**{f"conv_{n}": s.astype(getattr(cache, f"conv_{n}").dtype)
                                    for n, s in conv_new.items()},
                                 state=state.astype(cache.state.dtype), last_segment=last)
        return y, new_cache
