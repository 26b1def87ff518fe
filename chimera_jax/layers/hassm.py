"""HASSM mixer (the Chimera-1 planner's block): a selective-SSM head and an ALiBi attention head side by side.

    s = Mamba(u)                       # selective SSM head (layers.mamba, configured by hassm.ssm)
    a = Attention(u)                   # causal attention head with ALiBi (layers.attention, by hassm.attention)
    g = sigmoid(W_g u + b_g)           # learnt per-channel fusion gate, [b t d]
    y = g * s + (1 - g) * a

Both heads read the same input; the feed-forward that follows belongs to the LM block. The cache is the pair of
the heads' caches. Attention with a cache holds one document per row (see layers.attention), so a packed prompt
is run through the parallel path, not prefilled in pieces.
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import ml_collections

from chimera_jax.layers import attention, common, mamba


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``hassm`` of the model config.

    ssm: the selective-SSM head, fields as ``layers.mamba.default_config()`` (d_state 16, conv width 4, ...).
    attention: the attention head, fields as ``layers.attention.default_config()`` with position 'alibi'.
    gate_bias_init: initial bias of the fusion gate (0 = even mix at the start).
    """
    att = attention.default_config()
    att.position = "alibi"
    return ml_collections.ConfigDict(dict(ssm=mamba.default_config(), attention=att, gate_bias_init=0.0))


@flax.struct.dataclass
class HASSMCache:
    ssm: mamba.MambaCache
    attention: attention.KVCache


class HASSM(nn.Module):
    cfg: ml_collections.FrozenConfigDict

    @property
    def _attention_cfg(self) -> ml_collections.FrozenConfigDict:
        """The model block with ``attention`` replaced by the HASSM head's own (the model's may differ)."""
        return ml_collections.FrozenConfigDict(dict(self.cfg.items(), attention=self.cfg.hassm.attention))

    def init_cache(self, batch: int, max_len: int, dtype) -> HASSMCache:
        # parent=None: stand-alone heads, not children of this (possibly bound) module.
        ssm = mamba.Mamba(self.cfg, sub=self.cfg.hassm.ssm, parent=None)
        att = attention.Attention(self._attention_cfg, parent=None)
        return HASSMCache(ssm=ssm.init_cache(batch, max_len, dtype), attention=att.init_cache(batch, max_len, dtype))

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache: HASSMCache | None = None, decode=False):
        cfg = self.cfg
        if cfg.hassm.attention.position != "alibi":
            raise ValueError(f"model.hassm.attention.position must be 'alibi' (the HASSM attention head), got "
                             f"{cfg.hassm.attention.position!r}")
        kw = dict(segment_ids=segment_ids, positions=positions, decode=decode)
        s, ssm_cache = mamba.Mamba(cfg, sub=cfg.hassm.ssm, name="ssm")(
            x, cache=None if cache is None else cache.ssm, **kw)
        a, att_cache = attention.Attention(self._attention_cfg, name="attention")(
            x, cache=None if cache is None else cache.attention, **kw)
        bias_init = nn.initializers.constant(cfg.hassm.gate_bias_init)
        g = common.dense(cfg, cfg.d_model, ("embed", None), name="gate_proj")(x)  # [b t d]
        g_bias = common.param(self, "gate_bias", bias_init, (cfg.d_model,), ("norm",),
                              common.dtype_of(cfg.param_dtype))
        g = jax.nn.sigmoid(g + g_bias.astype(g.dtype))
        y = g * s.astype(g.dtype) + (1 - g) * a.astype(g.dtype)
        new_cache = None if cache is None else HASSMCache(ssm=ssm_cache, attention=att_cache)
        return y.astype(common.dtype_of(cfg.dtype)), new_cache
