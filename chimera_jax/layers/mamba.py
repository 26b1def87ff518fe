"""Mamba block (Gu & Dao, 2023): in-projection, short causal conv, selective SSM, SiLU gate, out-projection.

    x, z = in_proj(u)                                   # [b t f] each, f = expand * d_model
    x = silu(conv(x))                                   # depthwise causal conv of width w
    dt, B, C = dt_proj(x_proj(x)) ...                   # input-dependent: dt [b t f], B, C [b t n]
    y = selective_scan(x, softplus(dt + dt_bias), A = -exp(A_log), B, C, D)
    out = out_proj(y * silu(z))

The decoding cache holds the last w - 1 conv inputs, the SSM state [b f n] and the last segment id.
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
from chimera_jax.ops import selective_scan as scan_op


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``mamba`` of the model config.

    d_state: SSM state size per channel (n).   expand: inner width f / d_model.   conv_width: causal conv taps (w).
    dt_rank: rank of the dt projection; 0 means ceil(d_model / 16) as in the paper.
    dt_min, dt_max: range of the log-uniform initial step size.   dt_init_floor: smallest initial step.
    chunk_size: tokens per associative-scan chunk of the parallel path (bounds its [b c f n] memory; 32 was
        both faster and smaller than 128 or 512 at d_model 2048 on an H100).
    impl: 'auto' | 'xla' | 'reference' for the selective-scan op of the parallel path.
    """
    return ml_collections.ConfigDict(dict(d_state=16, expand=2, conv_width=4, dt_rank=0, dt_min=0.001,
                                          dt_max=0.1, dt_init_floor=1e-4, chunk_size=32, impl="auto"))


@flax.struct.dataclass
class MambaCache:
    conv: jax.Array        # [b w-1 f]  last conv inputs
    ssm: jax.Array         # [b f n]    SSM state (float32, or float64 in tests)
    segment_id: jax.Array  # [b] int32  segment id of the last token consumed


def _dt_bias_init(dt_min, dt_max, floor):
    """Inverse softplus of a log-uniform dt in [dt_min, dt_max], so the initial steps span the time scales."""
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def _symmetric_uniform(bound):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _a_log_init(key, shape, dtype=jnp.float32):
    """S4D-Real: A = -(1, 2, ..., n) for every channel."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)


class Mamba(nn.Module):
    """The Mamba mixer. ``sub`` replaces ``cfg.mamba`` as the sub-block read (HASSM nests its SSM head's)."""

    cfg: ml_collections.FrozenConfigDict
    sub: ml_collections.FrozenConfigDict | None = None

    @property
    def _m(self):
        return self.cfg.mamba if self.sub is None else self.sub

    def _dims(self):
        m = self._m
        if m.d_state < 1 or m.expand < 1 or m.conv_width < 1:
            raise ValueError(f"mamba: d_state={m.d_state}, expand={m.expand}, conv_width={m.conv_width} "
                             "must all be >= 1")
        return m.expand * self.cfg.d_model, m.d_state, (m.dt_rank or math.ceil(self.cfg.d_model / 16))

    def init_cache(self, batch: int, max_len: int, dtype) -> MambaCache:
        del max_len  # a recurrent state does not grow with the context
        f, n, _ = self._dims()
        return MambaCache(conv=jnp.zeros((batch, self._m.conv_width - 1, f), dtype),
                          ssm=jnp.zeros((batch, f, n), jnp.promote_types(dtype, jnp.float32)),
                          segment_id=jnp.zeros((batch,), jnp.int32))

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache: MambaCache | None = None, decode=False):
        del positions  # the recurrence needs no positions; documents are told apart by segment_ids
        cfg, m = self.cfg, self._m
        t = x.shape[1]
        f, n, r = self._dims()
        if decode and t != 1:
            raise ValueError(f"decode=True consumes one token per call, got x of length {t}")
        if decode and cache is None:
            raise ValueError("decode=True needs a cache (Mamba.init_cache)")
        dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
        conv0 = ssm0 = None
        if cache is not None:
            conv0, ssm0 = rec.carry_state((cache.conv, cache.ssm), rec.continues(segment_ids, cache.segment_id))

        xz = common.dense(cfg, (2, f), ("embed", None, "mlp"), name="in_proj")(x)  # [b t 2 f]
        xs, z = xz[:, :, 0], xz[:, :, 1]
        xs, conv = rec.CausalConv1D(width=m.conv_width, axis="mlp", dtype=dtype, param_dtype=pdtype, name="conv")(
            xs, segment_ids=segment_ids, state=conv0)
        xs = nn.silu(xs)                                                              # [b t f]

        dbc = common.dense(cfg, r + 2 * n, ("mlp", None), name="x_proj")(xs)          # [b t r+2n]
        dt_low, B, C = jnp.split(dbc, [r, r + n], axis=-1)
        dt = common.dense(cfg, f, (None, "mlp"), name="dt_proj", kernel_init=_symmetric_uniform(r ** -0.5))(dt_low)
        dt_bias = common.param(self, "dt_bias", _dt_bias_init(m.dt_min, m.dt_max, m.dt_init_floor), (f,),
                               ("mlp",), pdtype)
        a_log = common.param(self, "A_log", _a_log_init, (f, n), ("mlp", "state"), pdtype)
        D = common.param(self, "D", nn.initializers.ones, (f,), ("mlp",), pdtype)
        sd = jnp.promote_types(dtype, jnp.float32)
        dt = jax.nn.softplus(dt.astype(sd) + dt_bias.astype(sd))                     # [b t f]
        A = -jnp.exp(a_log.astype(sd))                                                # [f n]

        y, state = scan_op.selective_scan(xs, dt, A, B, C, D.astype(sd), chunk_size=m.chunk_size,
                                          initial_state=ssm0, segment_ids=segment_ids,
                                          impl="reference" if decode else m.impl)
        y = y * nn.silu(z)
        out = common.dense(cfg, cfg.d_model, ("mlp", "embed"), name="out_proj")(y.astype(dtype))
        new_cache = None if cache is None else MambaCache(
            conv=conv.astype(cache.conv.dtype), ssm=state.astype(cache.ssm.dtype),
            segment_id=rec.last_segment_id(segment_ids, cache.segment_id))
        return out, new_cache
