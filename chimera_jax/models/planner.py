"""The stage-2 planner and its discriminator.

Planner: a decoder-only stack over concept indices (models/lm.py's LM with the HASSM layer code 'H': a selective
SSM head and an ALiBi attention head in parallel), softmax over the K concepts plus one start symbol (index K).
Its predicted concept vector is the probability-weighted mean of the (frozen, stage-1) codebook vectors:
    v_hat_t = sum_k softmax(logits_t[:K])_k e_k.
Discriminator: a small causal transformer (LM blocks with code 'A') over concept-vector sequences, pooled over
the counted positions into one real-vs-generated logit per sequence.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common
from chimera_jax.models.lm import LM, Block


class Planner(nn.Module):
    """__call__(tokens [b t], codebook [K e]) -> (logits [b t K+1] float32, predicted vectors [b t e])."""

    cfg: ml_collections.FrozenConfigDict  # an LM model block with vocab_size = K + 1

    @nn.compact
    def __call__(self, tokens, codebook, *, segment_ids=None, positions=None):
        k = codebook.shape[0]
        if self.cfg.vocab_size != k + 1:
            raise ValueError(f"model.vocab_size={self.cfg.vocab_size} must be num_codes + 1 = {k + 1}")
        logits, _ = LM(self.cfg, name="lm")(tokens, segment_ids=segment_ids, positions=positions)
        probs = jax.nn.softmax(logits[..., :k], axis=-1)                     # [b t K]
        return logits, probs @ codebook.astype(jnp.promote_types(probs.dtype, codebook.dtype))


class Discriminator(nn.Module):
    """__call__(vectors [b t e], mask [b t], segment_ids [b t] | None) -> logits [b] (real > 0)."""

    cfg: ml_collections.FrozenConfigDict  # a small model block: d_model, num_layers, attention, ffn, ffn_dim, ...

    @nn.compact
    def __call__(self, vectors, mask, segment_ids=None):
        cfg = self.cfg
        x = common.dense(cfg, cfg.d_model, (None, "embed"), name="in_proj", use_bias=True)(vectors)
        for i in range(cfg.num_layers):
            x, _ = Block(cfg, "A", name=f"layer_{i}")(x, segment_ids)
        x = common.rms_norm(cfg, name="final_norm")(x)
        m = mask.astype(x.dtype)[..., None]
        pooled = jnp.sum(x * m, axis=1) / jnp.maximum(m.sum(1), 1.0)           # [b d]
        return common.dense(cfg, 1, ("embed", None), name="head", use_bias=True)(pooled)[..., 0].astype(jnp.float32)
