"""The language model: token embedding -> a stack of pre-norm residual blocks from a layer pattern -> logits.

Each block is ``x + mixer(norm(x))`` then ``x + ffn(norm(x))``; the mixer comes from the pattern code of its
layer (``layers/registry.py``), the feed-forward is SwiGLU, MoE (every ``moe_every``-th layer) or none.
The same module runs the parallel path (training), prefill and one-token decode (sampling).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common, registry
from chimera_jax.layers.ffn import SwiGLU

ACT_AXES = ("act_batch", "act_length", "act_embed")  # logical names of [b t d] activations at block boundaries


def uses_moe(cfg, layer: int) -> bool:
    every = cfg.get("moe_every", 0)
    return bool(every) and (layer + 1) % every == 0


class Block(nn.Module):
    cfg: ml_collections.FrozenConfigDict
    code: str
    moe: bool = False

    @nn.compact
    def __call__(self, x, segment_ids=None, positions=None, cache=None, decode=False):
        cfg = self.cfg
        h = common.rms_norm(cfg, name="mixer_norm")(x)
        y, cache = registry.build_mixer(self.code, cfg, "mixer")(
            h, segment_ids=segment_ids, positions=positions, cache=cache, decode=decode)
        x = x + y.astype(x.dtype)
        if cfg.ffn != "none":
            h = common.rms_norm(cfg, name="ffn_norm")(x)
            if self.moe:
                from chimera_jax.layers import moe  # imported only by models that use it

                y = moe.MoE(cfg, name="ffn")(h, segment_ids=segment_ids)
            else:
                y = SwiGLU(cfg, name="ffn")(h)
            x = x + y.astype(x.dtype)
        return nn.with_logical_constraint(x, ACT_AXES), cache


class LM(nn.Module):
    """Decoder-only LM. ``cfg`` is the model block of the config (see configs/lm.py for every field)."""

    cfg: ml_collections.FrozenConfigDict

    def layer_codes(self) -> list[str]:
        return registry.parse_pattern(self.cfg.pattern, self.cfg.num_layers)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> tuple[Any, ...]:
        """One cache per layer, in layer order (each from its mixer's own init_cache)."""
        dtype = dtype or common.dtype_of(self.cfg.dtype)
        return tuple(registry.build_mixer(code, self.cfg, None, parent=None).init_cache(batch, max_len, dtype)
                     for code in self.layer_codes())

    @nn.compact
    def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None, decode=False):
        """tokens [b t] int32 -> (logits [b t v] float32, cache or None)."""
        cfg = self.cfg
        dtype = common.dtype_of(cfg.dtype)
        embedding = common.param(self, "embedding", nn.initializers.normal(cfg.init_std),
                                 (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), common.dtype_of(cfg.param_dtype))
        x = jnp.take(embedding, tokens, axis=0).astype(dtype)  # [b t d]
        x = nn.with_logical_constraint(x, ACT_AXES)

        block_cls = Block
        if cfg.remat != "none" and not decode and cache is None:
            policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[cfg.remat]
            block_cls = nn.remat(Block, policy=policy, static_argnums=(5,))
        new_cache = []
        for i, code in enumerate(self.layer_codes()):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = block_cls(cfg, code, uses_moe(cfg, i), name=f"layer_{i}")(
                x, segment_ids, positions, layer_cache, decode)
            new_cache.append(layer_cache)

        x = common.rms_norm(cfg, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, embedding.astype(dtype), preferred_element_type=jnp.float32)
        else:
            logits = common.dense(cfg, cfg.vocab_size, ("embed", "vocab"), name="lm_head")(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))
        return logits, (None if cache is None else tuple(new_cache))


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
