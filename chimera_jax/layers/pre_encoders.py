"""Modality pre-encoders into one width d: a ResNet-style CNN for images, a dilated 1-D convolution stack for
audio waveforms, a small bidirectional transformer for text bytes.

Each maps its raw input to a grid of d-wide vectors, downsampled by its own stride:
    image  [b H W] or [b H W C] uint8     -> [b H/r W/r d]
    audio  [b t] float in [-1, 1]          -> [b t/r d]
    text   [b t] int bytes, mask [b t]     -> [b t/r d]
An example may lack a modality: the concept model only runs the pre-encoders of the modalities its config
lists and masks the ones an example does not have.
Also here: the N-d convolution with logical axis names every convolutional layer of the concept model uses.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``pre`` of the concept model config.

    image_blocks: residual blocks of the image CNN.   image_stride: its downsampling (1 or 2).
    audio_dilations: dilation of each residual block of the audio stack.   audio_stride: its downsampling.
    text_layers, text_heads: the byte transformer.   text_stride: downsampling after it (a strided conv).
    """
    return ml_collections.ConfigDict(dict(image_blocks=1, image_stride=2, audio_dilations=(1, 2, 4, 8),
                                          audio_stride=4, text_layers=2, text_heads=4, text_stride=4))


class Conv(nn.Module):
    """N-d convolution, 'SAME' padding (or causal for 1-d), kernel [*window in out] with logical axis names."""

    cfg: ml_collections.FrozenConfigDict
    features: int
    window: Sequence[int]
    stride: int = 1
    dilation: int = 1

    @nn.compact
    def __call__(self, x):  # [b *spatial c] -> [b *spatial/stride features]
        nd = len(self.window)
        fan_in = x.shape[-1] * math.prod(self.window)
        kernel = common.param(self, "kernel", nn.initializers.normal(fan_in ** -0.5),
                              (*self.window, x.shape[-1], self.features), ("conv",) + (None,) * nd + ("embed",),
                              common.dtype_of(self.cfg.param_dtype))
        bias = common.param(self, "bias", nn.initializers.zeros, (self.features,), ("embed",),
                            common.dtype_of(self.cfg.param_dtype))
        dtype = common.dtype_of(self.cfg.dtype)
        spatial = "".join("HWD"[:nd]) if nd > 1 else "W"
        dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        y = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (self.stride,) * nd, "SAME",
                                         rhs_dilation=(self.dilation,) * nd, dimension_numbers=dn)
        return y + bias.astype(dtype)


class ResBlock(nn.Module):
    """x + conv(gelu(conv(gelu(norm(x))))) over any number of spatial dims."""

    cfg: ml_collections.FrozenConfigDict
    window: Sequence[int]
    dilation: int = 1

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = nn.gelu(common.rms_norm(self.cfg, name="norm")(x))
        h = Conv(self.cfg, c, self.window, dilation=self.dilation, name="conv1")(h)
        h = Conv(self.cfg, c, (1,) * len(self.window), name="conv2")(nn.gelu(h))
        return x + h


class ImageEncoder(nn.Module):
    """ResNet-style CNN: pixels [b H W (C)] uint8 -> [b H/r W/r d]."""

    cfg: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, image):
        p = self.cfg.pre
        x = image.astype(common.dtype_of(self.cfg.dtype)) / 127.5 - 1.0
        if x.ndim == 3:
            x = x[..., None]
        x = Conv(self.cfg, self.cfg.d_model, (3, 3), name="stem")(x)
        for i in range(p.image_blocks):
            x = ResBlock(self.cfg, (3, 3), name=f"block_{i}")(x)
        if p.image_stride > 1:
            x = Conv(self.cfg, self.cfg.d_model, (p.image_stride, p.image_stride), stride=p.image_stride,
                     name="down")(x)
        return x


class AudioEncoder(nn.Module):
    """Dilated 1-D convolutions (WaveNet-style receptive field growth): waveform [b t] -> [b t/r d]."""

    cfg: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, wave):
        p = self.cfg.pre
        x = wave.astype(common.dtype_of(self.cfg.dtype))[..., None]
        x = Conv(self.cfg, self.cfg.d_model, (3,), name="stem")(x)
        for i, dil in enumerate(p.audio_dilations):
            x = ResBlock(self.cfg, (3,), dilation=dil, name=f"block_{i}")(x)
        if p.audio_stride > 1:
            x = Conv(self.cfg, self.cfg.d_model, (p.audio_stride,), stride=p.audio_stride, name="down")(x)
        return x


class BidirectionalSelfAttention(nn.Module):
    """Multi-head self-attention over all valid positions (an encoder: no causal mask). x [b t d], mask [b t]."""

    cfg: ml_collections.FrozenConfigDict
    num_heads: int

    @nn.compact
    def __call__(self, x, mask):
        d = x.shape[-1]
        h = self.num_heads
        if d % h:
            raise ValueError(f"pre.text_heads={h} must divide model.d_model={d}")
        k = d // h
        q = common.dense(self.cfg, (h, k), ("embed", "heads", "head_dim"), name="q_proj")(x)   # [b t h k]
        kk = common.dense(self.cfg, (h, k), ("embed", "heads", "head_dim"), name="k_proj")(x)  # [b t h k]
        v = common.dense(self.cfg, (h, k), ("embed", "heads", "head_dim"), name="v_proj")(x)   # [b t h k]
        logits = jnp.einsum("bthk,bshk->bhts", q, kk).astype(jnp.float32) * k ** -0.5
        logits = jnp.where(mask[:, None, None, :] > 0, logits, -1e30)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhts,bshk->bthk", probs, v)
        # heads and head_dim flattened into one input axis of the output projection
        return common.dense(self.cfg, d, ("heads", "embed"), name="o_proj")(out.reshape(*out.shape[:2], d))


class TextEncoder(nn.Module):
    """A small byte transformer: bytes [b t] (mask [b t]) -> [b t/r d] after a strided convolution."""

    cfg: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, text, mask):
        cfg, p = self.cfg, self.cfg.pre
        d = cfg.d_model
        t = text.shape[1]
        table = common.param(self, "embedding", nn.initializers.normal(1.0), (257, d), ("vocab", "embed"),
                             common.dtype_of(cfg.param_dtype))
        pos = common.param(self, "positions", nn.initializers.normal(0.02), (t, d), (None, "embed"),
                           common.dtype_of(cfg.param_dtype))
        x = (jnp.take(table, text.astype(jnp.int32), axis=0) + pos[None]).astype(common.dtype_of(cfg.dtype))
        for i in range(p.text_layers):
            h = common.rms_norm(cfg, name=f"attn_norm_{i}")(x)
            x = x + BidirectionalSelfAttention(cfg, p.text_heads, name=f"attn_{i}")(h, mask)
            h = common.rms_norm(cfg, name=f"ffn_norm_{i}")(x)
            h = common.dense(cfg, 2 * d, ("embed", "mlp"), name=f"ffn_in_{i}")(h)
            x = x + common.dense(cfg, d, ("mlp", "embed"), name=f"ffn_out_{i}")(nn.gelu(h))
        if p.text_stride > 1:
            x = Conv(cfg, d, (p.text_stride,), stride=p.text_stride, name="down")(x)
        return x
