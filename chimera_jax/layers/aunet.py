"""The realization decoder: an autoregressive U-Net over bytes, conditioned on a concept vector.

After AU-Net (Videau et al., 2025, "From Bytes to Ideas: Language Modeling with Autoregressive U-Nets"): a
contracting path of causal depthwise-separable convolutions over the bytes generated so far pools every
``stride`` positions into one (the last position of each group, the only one that has seen the whole group);
the concept vector is projected into the bottleneck; the expanding path upsamples each coarse vector into
``stride`` positions with a separate linear map per position within the group, adds the skip connection of
the same resolution, and convolves again.

Strict causality: logits at position p depend on bytes < p only. Bytes enter shifted right by one (a BOS byte,
256, at position 0); convolutions are left-padded; and a coarse vector, which summarises group i, is used by
group i + 1 of the finer level (its first group gets a projection of the concept vector instead). So a
coarse vector built from positions <= i r + r - 1 reaches only positions >= (i + 1) r.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common

BOS = 256          # the start byte; 256 output classes (bytes), 257 input symbols
NUM_CLASSES = 256


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``aunet`` of the concept model config.

    widths: channel width of each resolution, finest first; len(widths) - 1 poolings.
    stride: positions pooled into one per contraction (segment lengths must divide by stride ** (len(widths)-1)).
    kernel: width of the causal depthwise convolutions.   blocks: depthwise-separable blocks per resolution
    and path.   expansion: hidden width factor of the pointwise feed-forward of each block.
    """
    return ml_collections.ConfigDict(dict(widths=(64, 96, 128), stride=4, kernel=4, blocks=1, expansion=2))


def causal_depthwise_conv(x, kernel):
    """y[t, c] = sum_j kernel[j, c] x[t - (w - 1) + j, c] with zeros before the start: x [b t c], kernel [w c]."""
    w = kernel.shape[0]
    xp = jnp.pad(x, ((0, 0), (w - 1, 0), (0, 0)))
    t = x.shape[1]
    return sum(xp[:, j:j + t] * kernel[j] for j in range(w))


def causal_depthwise_conv_reference(x, kernel):
    """The same with lax.conv (feature_group_count = channels), the oracle of the slice-sum form."""
    w, c = kernel.shape
    lhs = jnp.pad(x, ((0, 0), (w - 1, 0), (0, 0)))
    return jax.lax.conv_general_dilated(lhs, kernel[:, None, :], (1,), "VALID", feature_group_count=c,
                                        dimension_numbers=("NWC", "WIO", "NWC"))


class SeparableBlock(nn.Module):
    """x + pointwise_ffn(causal_depthwise(norm(x))): [b t c] -> [b t c]."""

    cfg: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, x):
        a = self.cfg.aunet
        c = x.shape[-1]
        h = common.rms_norm(self.cfg, name="norm")(x)
        kernel = common.param(self, "depthwise", nn.initializers.normal(a.kernel ** -0.5), (a.kernel, c),
                              ("conv", "embed"), common.dtype_of(self.cfg.param_dtype))
        h = causal_depthwise_conv(h, kernel.astype(h.dtype))
        h = common.dense(self.cfg, c * a.expansion, ("embed", "mlp"), name="pointwise_in")(h)
        h = common.dense(self.cfg, c, ("mlp", "embed"), name="pointwise_out")(nn.gelu(h))
        return x + h


class Upsample(nn.Module):
    """[b n c] -> [b n*r w]: coarse vector i becomes r vectors, one linear map per position within the group."""

    cfg: ml_collections.FrozenConfigDict
    stride: int
    features: int

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        w = common.param(self, "kernel", nn.initializers.normal(c ** -0.5), (self.stride, c, self.features),
                         ("conv", "mlp", "embed"), common.dtype_of(self.cfg.param_dtype))
        y = jnp.einsum("bnc,rcw->bnrw", x, w.astype(x.dtype))
        return y.reshape(b, n * self.stride, self.features)


class AUNet(nn.Module):
    """__call__(targets [b s] int bytes, concept [b e]) -> logits [b s 256] (float32), teacher-forced."""

    cfg: ml_collections.FrozenConfigDict  # the concept model block (dtype, norm_eps, ...) with sub-block aunet

    @nn.compact
    def __call__(self, targets, concept):
        cfg, a = self.cfg, self.cfg.aunet
        b, s = targets.shape
        widths, r = tuple(a.widths), a.stride
        depth = len(widths) - 1
        if s % (r ** depth):
            raise ValueError(f"AU-Net segment length {s} must be divisible by aunet.stride ** (len(widths) - 1) = "
                             f"{r ** depth}")
        dtype = common.dtype_of(cfg.dtype)
        concept = concept.astype(dtype)
        inputs = jnp.concatenate([jnp.full((b, 1), BOS, jnp.int32), targets[:, :-1].astype(jnp.int32)], axis=1)
        table = common.param(self, "embedding", nn.initializers.normal(1.0), (BOS + 1, widths[0]),
                             ("vocab", "embed"), common.dtype_of(cfg.param_dtype))
        x = jnp.take(table, inputs, axis=0).astype(dtype)                                  # [b s c0]
        x = x + common.dense(cfg, widths[0], (None, "embed"), name="concept_in")(concept)[:, None]

        skips = []
        for j in range(depth):                       # contracting path
            for i in range(a.blocks):
                x = SeparableBlock(cfg, name=f"down_{j}_{i}")(x)
            skips.append(x)
            x = common.dense(cfg, widths[j + 1], ("mlp", "embed"), name=f"pool_{j}")(x[:, r - 1::r])

        x = x + common.dense(cfg, widths[depth], (None, "embed"), name="concept_bottleneck")(concept)[:, None]
        for i in range(a.blocks):
            x = SeparableBlock(cfg, name=f"bottleneck_{i}")(x)

        for j in reversed(range(depth)):             # expanding path
            first = common.dense(cfg, widths[j + 1], (None, "embed"), name=f"concept_up_{j}")(concept)[:, None]
            shifted = jnp.concatenate([first, x[:, :-1]], axis=1)                         # group i -> i + 1
            x = skips[j] + Upsample(cfg, r, widths[j], name=f"up_{j}")(shifted)
            for i in range(a.blocks):
                x = SeparableBlock(cfg, name=f"expand_{j}_{i}")(x)

        x = common.rms_norm(cfg, name="final_norm")(x)
        return common.dense(cfg, NUM_CLASSES, ("embed", "vocab"), name="head")(x).astype(jnp.float32)


def sample(logits_fn, concept, segment_len: int, rng, temperature: float = 1.0):
    """Renders bytes one at a time: logits_fn(tokens [b s], concept) -> logits [b s 256]; returns [b s] int32.

    Each step reruns the whole (short) segment; causality makes the not-yet-generated zeros irrelevant.
    temperature 0 takes the most likely byte.
    """
    b = concept.shape[0]

    def body(i, carry):
        tokens, rng = carry
        rng, sub = jax.random.split(rng)
        logits = jax.lax.dynamic_index_in_dim(logits_fn(tokens, concept), i, axis=1, keepdims=False)  # [b 256]
        if temperature > 0:
            nxt = jax.random.categorical(sub, logits / temperature, axis=-1)
        else:
            nxt = jnp.argmax(logits, axis=-1)
        return tokens.at[:, i].set(nxt.astype(jnp.int32)), rng

    tokens, _ = jax.lax.fori_loop(0, segment_len, body, (jnp.zeros((b, segment_len), jnp.int32), rng))
    return tokens
