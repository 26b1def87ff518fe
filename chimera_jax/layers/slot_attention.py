"""Slot Attention (Locatello et al., 2020, "Object-Centric Learning with Slot Attention").

A fixed number of slots compete for the input vectors: the attention softmax runs over the *slots* axis, so each
input is shared out among slots; each slot then takes the weighted mean of the values of its inputs and is
updated by a GRU and a residual MLP, for a few iterations. Used as the optional front end of the concept
encoder: its slots, not patches, are quantized into concepts.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``slots`` of the concept model config.

    enabled: quantize slots instead of the top level's grid cells.   num_slots: slots per example.
    iters: attention iterations.   eps: added to the attention weights before the per-slot normalisation.
    """
    return ml_collections.ConfigDict(dict(enabled=False, num_slots=8, iters=3, eps=1e-8))


class GRU(nn.Module):
    """Gated recurrent unit (Cho et al., 2014): h' = (1 - z) n + z h, projections with logical axis names."""

    cfg: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, h, x):
        d = h.shape[-1]
        gx = common.dense(self.cfg, (3, d), ("embed", None, "mlp"), name="input", use_bias=True)(x)   # [.. 3 d]
        gh = common.dense(self.cfg, (3, d), ("embed", None, "mlp"), name="hidden", use_bias=True)(h)  # [.. 3 d]
        r = jax.nn.sigmoid(gx[..., 0, :] + gh[..., 0, :])
        z = jax.nn.sigmoid(gx[..., 1, :] + gh[..., 1, :])
        n = jnp.tanh(gx[..., 2, :] + r * gh[..., 2, :])
        return (1 - z) * n + z * h


def slot_attention_weights(q, k, mask, eps):
    """Softmax over slots, then normalised over inputs: q [b s d] (slots), k [b t d], mask [b t] -> [b s t]."""
    logits = jnp.einsum("bsd,btd->bst", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    attn = jax.nn.softmax(logits, axis=1) + eps
    attn = attn * mask[:, None, :]
    return attn / jnp.maximum(attn.sum(-1, keepdims=True), eps)


class SlotAttention(nn.Module):
    """inputs [b t d], mask [b t] -> (slots [b s d], attention [b s t]).

    Slots start at a learned mean plus learned-scale Gaussian noise when the 'slots' rng stream is given
    (training), at the mean otherwise (deterministic encoding).
    """

    cfg: ml_collections.FrozenConfigDict  # model block with sub-block slots

    @nn.compact
    def __call__(self, inputs, mask=None):
        cfg, sc = self.cfg, self.cfg.slots
        b, t, d = inputs.shape
        mask = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
        pdt = common.dtype_of(cfg.param_dtype)
        mu = common.param(self, "slot_mu", nn.initializers.normal(1.0), (d,), ("embed",), pdt)
        log_sigma = common.param(self, "slot_log_sigma", nn.initializers.zeros, (d,), ("embed",), pdt)
        slots = jnp.broadcast_to(mu, (b, sc.num_slots, d))
        if self.has_rng("slots"):
            slots = slots + jnp.exp(log_sigma) * jax.random.normal(self.make_rng("slots"), slots.shape)
        slots = slots.astype(common.dtype_of(cfg.dtype))
        x = common.rms_norm(cfg, name="input_norm")(inputs)
        k = common.dense(cfg, d, ("embed", "mlp"), name="k_proj")(x)
        v = common.dense(cfg, d, ("embed", "mlp"), name="v_proj")(x)
        gru = GRU(cfg, name="gru")
        q_proj = common.dense(cfg, d, ("embed", "mlp"), name="q_proj")
        slot_norm = common.rms_norm(cfg, name="slot_norm")
        mlp_norm = common.rms_norm(cfg, name="mlp_norm")
        mlp_in = common.dense(cfg, 2 * d, ("embed", "mlp"), name="mlp_in")
        mlp_out = common.dense(cfg, d, ("mlp", "embed"), name="mlp_out")
        attn = None
        for _ in range(sc.iters):
            attn = slot_attention_weights(q_proj(slot_norm(slots)), k, mask, sc.eps)          # [b s t]
            updates = jnp.einsum("bst,btd->bsd", attn.astype(v.dtype), v)
            slots = gru(slots, updates)
            slots = slots + mlp_out(nn.gelu(mlp_in(mlp_norm(slots))))
        return slots, attn
