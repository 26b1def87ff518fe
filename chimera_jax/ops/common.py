"""Helpers every scan op shares: the state dtype and where packed documents reset the state."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def state_dtype(dtype) -> jnp.dtype:
    """float32 state for bf16 / fp32 inputs; float64 when the inputs are float64 (tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def resets(segment_ids: jax.Array | None, b: int, t: int) -> jax.Array:
    """[b t] bool: True where the state is zeroed before the step (document starts other than position 0).

    Position 0 never resets, so a state carried in from a cache (or ``initial_state``) reaches the first token.
    """
    if segment_ids is None:
        return jnp.zeros((b, t), bool)
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return segment_ids != prev
