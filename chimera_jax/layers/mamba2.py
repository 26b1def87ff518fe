"""Mamba-2 block (Dao & Gu, 2024): in-projection, short causal conv, SSD with a scalar decay per head, gated RMSNorm.

    z, x, B, C, dt = in_proj(u)                  # x, z: [b t h v] (v = head_dim), B, C: [b t g n], dt: [b t h]
    x, B, C = silu(conv(x)), silu(conv(B, C))     # depthwise causal conv of width w over time
    y = SSD(x, softplus(dt + dt_bias), A = -exp(A_log), B, C) + D * x
    out = out_proj(RMSNorm(y * silu(z)))

The decoding cache holds the last w - 1 conv inputs, the SSD state [b h v n] and the last segment id.
"""
from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common
from chimera_jax.layers import recurrent_common as rec
from chimera_jax.ops import ssd as ssd_op


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``mamba2`` of the model config.

    d_state: SSM state size per head (n).   head_dim: channels per head (v).   expand: inner width / d_model;
    heads h = expand * d_model / head_dim.   n_groups: groups of heads sharing B and C (g, divides h).
    conv_width: taps of the causal conv (w).   chunk_size: SSD chunk length (c) of the parallel form.
    dt_min, dt_max: range of the log-uniform initial step size.   dt_init_floor: smallest initial step.
    a_init_min, a_init_max: range of the uniform initial -A per head.
    impl: 'auto' | 'xla' | 'reference' for the SSD op of the parallel path.
    """
    return ml_collections.ConfigDict(dict(d_state=128, head_dim=64, expand=2, n_groups=1, conv_width=4,
                                          chunk_size=64, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                                          a_init_min=1.0, a_init_max=16.0, impl="auto"))


@flax.struct.dataclass
class Mamba2Cache:
    conv_x: jax.Array   # [b w-1 h*v]  last conv inputs of x
    conv_bc: jax.Array  # [b w-1 2*g*n] last conv inputs of B and C
    ssm: jax.Array      # [b h v n]    SSD state (float32, or float64 in tests)
    segment_id: jax.Array  # [b] int32 segment id of the last token consumed


def _dims(cfg):
    m = cfg.mamba2
    d_inner = m.expand * cfg.d_model
    if d_inner % m.head_dim:
        raise ValueError(f"model.mamba2: expand * d_model = {d_inner} must be a multiple of head_dim={m.head_dim}")
    h = d_inner // m.head_dim
    if h % m.n_groups:
        raise ValueError(f"model.mamba2.n_groups={m.n_groups} must divide the number of heads {h}")
    return h, m.head_dim, m.n_groups, m.d_state


def _dt_bias_init(dt_min, dt_max, floor):
    """Inverse softplus of a log-uniform dt in [dt_min, dt_max], so the initial steps span the time scales."""
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def _a_log_init(lo, hi):
    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)
    return init


class Mamba2(nn.Module):
    cfg: ml_collections.FrozenConfigDict

    def init_cache(self, batch: int, max_len: int, dtype) -> Mamba2Cache:
        del max_len  # a recurrent state does not grow with the context
        h, v, g, n = _dims(self.cfg)
        w = self.cfg.mamba2.conv_width
        return Mamba2Cache(conv_x=jnp.zeros((batch, w - 1, h * v), dtype),
                           conv_bc=jnp.zeros((batch, w - 1, 2 * g * n), dtype),
                           ssm=jnp.zeros((batch, h, v, n), jnp.promote_types(dtype, jnp.float32)),
                           segment_id=jnp.zeros((batch,), jnp.int32))

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache: Mamba2Cache | None = None, decode=False):
        del positions  # the recurrence needs no positions; documents are told apart by segment_ids
        cfg, m = self.cfg, self.cfg.mamba2
        b, t, _ = x.shape
        h, v, g, n = _dims(cfg)
        if decode and t != 1:
            raise ValueError(f"decode=True consumes one token per call, got x of length {t}")
        if decode and cache is None:
            raise ValueError("decode=True needs a cache (Mamba2.init_cache)")
        dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
        conv_x0 = conv_bc0 = ssm0 = None
        if cache is not None:
            keep = rec.continues(segment_ids, cache.segment_id)
            conv_x0, conv_bc0, ssm0 = rec.carry_state((cache.conv_x, cache.conv_bc, cache.ssm), keep)

        z = common.dense(cfg, (h, v), ("embed", "heads", "head_dim"), name="z_proj")(x)   # [b t h v]
        xs = common.dense(cfg, (h, v), ("embed", "heads", "head_dim"), name="x_proj")(x)  # [b t h v]
        bc = common.dense(cfg, (2, g, n), ("embed", None, None, "state"), name="bc_proj")(x)  # [b t 2 g n]
        dt = common.dense(cfg, h, ("embed", "heads"), name="dt_proj")(x)                 # [b t h]

        conv = dict(width=m.conv_width, dtype=dtype, param_dtype=pdtype)
        xs, conv_x = rec.CausalConv1D(axis="heads", name="conv_x", **conv)(
            xs.reshape(b, t, h * v), segment_ids=segment_ids, state=conv_x0)
        bc, conv_bc = rec.CausalConv1D(axis=None, name="conv_bc", **conv)(
            bc.reshape(b, t, 2 * g * n), segment_ids=segment_ids, state=conv_bc0)
        xs = nn.silu(xs).reshape(b, t, h, v)
        B, C = jnp.moveaxis(nn.silu(bc).reshape(b, t, 2, g, n), 2, 0)  # [b t g n] each

        dt_bias = common.param(self, "dt_bias", _dt_bias_init(m.dt_min, m.dt_max, m.dt_init_floor), (h,),
                               ("heads",), pdtype)
        a_log = common.param(self, "A_log", _a_log_init(m.a_init_min, m.a_init_max), (h,), ("heads",), pdtype)
        D = common.param(self, "D", nn.initializers.ones, (h,), ("heads",), pdtype)
        sd = jnp.promote_types(dtype, jnp.float32)
        dt = jax.nn.softplus(dt.astype(sd) + dt_bias.astype(sd))  # [b t h]
        A = -jnp.exp(a_log.astype(sd))                             # [h]

        y, state = ssd_op.ssd(xs, dt, A, B, C, chunk_size=m.chunk_size, segment_ids=segment_ids,
                              initial_state=ssm0,
                              impl="reference" if decode else m.impl)
        y = y + D.astype(dtype)[:, None] * xs                       # [b t h v]
        y = (y * nn.silu(z)).reshape(b, t, h * v)
        y = common.rms_norm(cfg, name="norm")(y)
        out = common.dense(cfg, cfg.d_model, ("heads", "embed"), name="out_proj")(y.astype(dtype))
        new_cache = None if cache is None else Mamba2Cache(conv_x=conv_x.astype(cache.conv_x.dtype),
                                                           conv_bc=conv_bc.astype(cache.conv_bc.dtype),
                                                           ssm=state.astype(cache.ssm.dtype),
                                                           segment_id=rec.last_segment_id(segment_ids,
                                                                                          cache.segment_id))
        return out, new_cache
