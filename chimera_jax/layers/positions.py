"""Position encodings: RoPE with NTK-aware scaling (for context extension) and ALiBi slopes."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float = 10_000.0, scaling_factor: float = 1.0) -> jax.Array:
    """Inverse frequencies [k/2] of rotary embeddings (Su et al., 2021).

    NTK-aware scaling stretches the base instead of the positions, theta' = theta * s^(k / (k - 2)), so the high
    frequencies (local order) are kept and only the low ones are interpolated when a model trained at length L
    runs at s * L.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if scaling_factor < 1.0:
        raise ValueError(f"rope_scaling_factor must be >= 1, got {scaling_factor}")
    base = theta * scaling_factor ** (head_dim / (head_dim - 2)) if scaling_factor > 1.0 else theta
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x [b t h k] by angles positions [b t] x inv_freq [k/2] (rotate-half convention)."""
    ftype = jnp.promote_types(x.dtype, jnp.float32)
    angles = positions[..., None].astype(ftype) * inv_freq.astype(ftype)  # [b t k/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(ftype), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def alibi_slopes(num_heads: int, dtype=jnp.float32) -> jax.Array:
    """Per-head ALiBi slopes [h] (Press et al., 2022): a geometric sequence 2^(-8i/n).

    For a head count that is not a power of two, the paper takes the slopes of the nearest lower power of two and
    fills the rest with every other slope of the next power of two.
    """

    def pow2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = pow2(num_heads)
    else:
        lower = 2 ** math.floor(math.log2(num_heads))
        slopes = pow2(lower) + pow2(2 * lower)[0::2][: num_heads - lower]
    return jnp.asarray(slopes, dtype)
