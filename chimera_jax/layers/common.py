"""Pieces every layer family shares: parameter initialisers with logical axis names, RMSNorm, dtypes.

Logical axis names used on parameters (the rules table in ``training/sharding.py`` maps them to mesh axes):
``embed`` (d_model), ``mlp`` (ffn width), ``heads`` (query heads), ``kv_heads``, ``head_dim``, ``vocab``,
``expert``, ``state`` (SSM state), ``conv`` (short-conv taps), ``norm`` (a vector over a replicated axis).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def dtype_of(name: str | Dtype) -> jnp.dtype:
    """'bfloat16' / 'float32' / 'float64' -> a jnp dtype (configs store dtypes as strings)."""
    return jnp.dtype(name)


def param(module: nn.Module, name: str, init: nn.initializers.Initializer, shape: Sequence[int],
          axes: Sequence[str | None], dtype: Dtype = jnp.float32) -> jax.Array:
    """Declares a parameter whose value carries logical axis names (one per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name!r}: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class DenseGeneral(nn.Module):
    """y = x @ W over the last axis, W of shape [in, *features], with logical axis names on W.

    Computation runs in ``dtype`` (bf16 on accelerators) while W is stored in ``param_dtype``.
    """

    features: Sequence[int] | int
    axes: Sequence[str | None]  # logical names of W: (in_axis, *out_axes)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_bias: bool = False
    kernel_init: nn.initializers.Initializer | None = None
    ternary: bool = False  # BitNet b1.58: ternary weights + int8 activations (layers/bitlinear.py)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        fan_in = x.shape[-1]
        init = self.kernel_init or nn.initializers.normal(stddev=fan_in ** -0.5)
        w = param(self, "kernel", init, (fan_in, *features), self.axes, self.param_dtype)
        if self.ternary:
            # Imported here so that the float path never depends on the ternary code.
            from chimera_jax.layers import bitlinear

            x, w = bitlinear.quantize_for_training(x, w)
        y = jnp.tensordot(x.astype(self.dtype), w.astype(self.dtype), axes=((x.ndim - 1,), (0,)))
        if self.use_bias:
            b = param(self, "bias", nn.initializers.zeros, features, self.axes[1:], self.param_dtype)
            y = y + b.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019); statistics in float32 whatever the input dtype."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.param_dtype)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(y.dtype)).astype(self.dtype)


def segment_starts(segment_ids: jax.Array | None, t: int, b: int) -> jax.Array:
    """[b t] bool: True where a new document begins (position 0 and wherever the segment id changes).

    Recurrent mixers reset their state at these positions so packed documents never see each other.
    """
    if segment_ids is None:
        return jnp.zeros((b, t), bool).at[:, 0].set(True)
    prev = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    return segment_ids != prev


def dense(cfg, features: Sequence[int] | int, axes: Sequence[str | None], *, name: str | None = None,
          use_bias: bool = False, kernel_init=None) -> DenseGeneral:
    """A projection configured from the model block ``cfg`` (its dtype, param_dtype and ternary switch).

    Every projection of every layer goes through here, so ``model.ternary=True`` reaches all of them.
    """
    return DenseGeneral(features=features, axes=axes, dtype=dtype_of(cfg.dtype),
                        param_dtype=dtype_of(cfg.param_dtype), use_bias=use_bias, kernel_init=kernel_init,
                        ternary=bool(cfg.get("ternary", False)), name=name)


def rms_norm(cfg, *, name: str | None = None) -> RMSNorm:
    return RMSNorm(eps=cfg.get("norm_eps", 1e-6), dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                   name=name)
