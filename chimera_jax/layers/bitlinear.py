"""BitLinear (BitNet b1.58, Ma et al., 2024): ternary weights and int8 activations, trained through fake quantisation.

Training keeps full-precision latent weights; every forward pass uses their quantised values and the backward pass
treats the quantiser as the identity (straight-through estimator), so gradients reach the latent weights unchanged.

* Weights ``w [in, *out]``: the input axis (axis 0) is cut into groups of ``WEIGHT_GROUP`` = 128 rows (the last group
  is shorter when ``in`` is not a multiple of 128). Each (group, output unit) pair has its own absmean scale
  ``s = mean |w|`` over its rows, and the effective weight is ``s * clip(round(w / s), -1, 1)`` — exactly one of
  ``{-s, 0, +s}``. A per-output-unit scale (rather than one per group of rows) is what a fused kernel reads with no
  extra cost and it tracks columns of very different norm.
* Activations ``x [..., in]``: the feature axis is cut into blocks of ``ACT_BLOCK`` = 64 (last block shorter); each
  block of each token has an absmax scale and values are rounded to int8 levels ``-127..127``.

``export_packed`` turns the latent weights of a trained model into 2-bit packed ternary codes plus their scales.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

WEIGHT_GROUP = 128  # input rows sharing one absmean scale
ACT_BLOCK = 64      # features sharing one absmax scale
EPS = 1e-5          # keeps an all-zero group / block from dividing by zero


def _compute_dtype(dtype) -> jnp.dtype:
    # Scales and rounding in at least float32 so that bf16 inputs do not shift the rounding boundaries.
    return jnp.promote_types(dtype, jnp.float32)


def _grouped(a: jax.Array, axis: int, size: int) -> tuple[jax.Array, int]:
    """Pads ``axis`` of ``a`` with zeros to a multiple of ``size`` and splits it into (groups, size)."""
    a = jnp.moveaxis(a, axis, 0)
    n = a.shape[0]
    pad = (-n) % size
    if pad:
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((a.shape[0] // size, size) + a.shape[1:]), n


def _group_counts(n: int, size: int, dtype) -> jax.Array:
    """[groups] number of real (unpadded) entries in each group; the last group may be short."""
    groups = -(-n // size)
    return jnp.minimum(size, n - size * jnp.arange(groups)).astype(dtype)


def ternary_codes(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Latent weights [in, *out] -> (codes int8 in {-1, 0, 1} [in, *out], scales [groups, *out]).

    groups = ceil(in / 128); the scale of group j covers rows 128 j .. 128 j + 127.
    """
    if w.ndim < 2:
        raise ValueError(f"ternary weights need shape [in, *out], got {w.shape}")
    ct = _compute_dtype(w.dtype)
    g, n = _grouped(w.astype(ct), 0, WEIGHT_GROUP)  # [groups 128 *out]
    counts = _group_counts(n, WEIGHT_GROUP, ct).reshape((-1,) + (1,) * (w.ndim - 1))
    scale = jnp.sum(jnp.abs(g), axis=1) / counts + EPS  # [groups *out]  absmean
    codes = jnp.clip(jnp.round(g / scale[:, None]), -1, 1)
    codes = codes.reshape((-1,) + w.shape[1:])[:n]
    return codes.astype(jnp.int8), scale


def ternary_weights(w: jax.Array) -> jax.Array:
    """Fake-quantised (dequantised) ternary weights with the shape and dtype of ``w``; forward value only."""
    codes, scale = ternary_codes(w)
    scale_rows = jnp.repeat(scale, WEIGHT_GROUP, axis=0)[: w.shape[0]]  # [in *out]
    return (codes.astype(scale.dtype) * scale_rows).astype(w.dtype)


def int8_activations(x: jax.Array) -> jax.Array:
    """Fake-quantised int8 activations (absmax per block of 64 features); forward value only."""
    ct = _compute_dtype(x.dtype)
    g, n = _grouped(x.astype(ct), x.ndim - 1, ACT_BLOCK)  # [blocks 64 ...]
    scale = jnp.max(jnp.abs(g), axis=1, keepdims=True) / 127.0 + EPS
    q = jnp.clip(jnp.round(g / scale), -127, 127) * scale
    q = q.reshape((-1,) + q.shape[2:])[:n]
    return jnp.moveaxis(q, 0, -1).astype(x.dtype)


def straight_through(x: jax.Array, quantised: jax.Array) -> jax.Array:
    """Forward value ``quantised``, gradient of the identity in ``x``."""
    return x + jax.lax.stop_gradient(quantised - x)


def quantize_weights(w: jax.Array) -> jax.Array:
    """Ternary fake quantisation of ``w [in, *out]`` with a straight-through gradient."""
    return straight_through(w, ternary_weights(w))


def quantize_activations(x: jax.Array) -> jax.Array:
    """Int8 fake quantisation of ``x [..., in]`` with a straight-through gradient."""
    return straight_through(x, int8_activations(x))


def quantize_for_training(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The BitLinear pair used by ``common.DenseGeneral(ternary=True)``: (x_q [..., in], w_q [in, *out])."""
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"activations [..., {x.shape[-1]}] do not match weights {w.shape} (input axis 0)")
    return quantize_activations(x), quantize_weights(w)


# ------------------------------------------------------------------------------------------------ export

def default_ternary_leaf(path: tuple[str, ...], leaf: jax.Array, names: tuple | None = None) -> int | None:
    """Which parameters are ternary projections, and how many leading axes stack independent matrices.

    ``kernel`` leaves of rank >= 2 are ``DenseGeneral`` weights [in, *out] -> 0, except short-conv taps (their
    first logical axis is ``conv``). MoE expert weights named ``expert_*_kernel`` are [e, in, out] -> 1 (one
    matrix per expert). Everything else (embeddings, norms, biases, routers, memories) stays in full precision
    -> None. ``names`` are the leaf's logical axis names when the tree carries them.
    """
    name = path[-1] if path else ""
    if name == "kernel" and leaf.ndim >= 2 and not (names and names[0] == "conv"):
        return 0
    if name.startswith("expert_") and name.endswith("_kernel") and leaf.ndim >= 3:
        return 1
    return None


def export_packed(params: Any, *, is_ternary: Callable[..., int | None] = default_ternary_leaf) -> dict:
    """Walks a param tree and packs every ternary projection for inference.

    Returns a nested dict mirroring ``params`` that holds, for each ternary leaf, a dict with ``weight`` (a
    ``chimera_jax.ops.ternary.TernaryWeight``: 2-bit codes [*stack, in_pad/4, prod(out)] and bf16 scales
    [*stack, in_pad/128, prod(out)]), ``shape`` (the latent weight's shape) and ``in_features``. Leaves that are
    not ternary are left out: the result is exactly what an inference runtime needs beside the full-precision rest.
    ``is_ternary(path, leaf, names)`` gives the number of leading stacked axes (0 for a plain [in, *out] matrix)
    or None; ``names`` are the logical axis names of a boxed (nn.LogicallyPartitioned) leaf, else None.

    The packed op wants the input rows in whole groups of 128. When ``in`` is not a multiple of 128 the rows are
    padded; the padding rows hold the short group's absmean, so that the stored scale equals the one used in
    training (zeros would dilute it). The runtime pads activations with zeros there, so those rows add nothing.
    """
    import flax.linen as nn

    from chimera_jax.ops import ternary as ternary_ops  # only export needs the packing op

    def pack_one(w: jax.Array, stacked: int) -> dict:
        fn = lambda m: ternary_ops.pack_ternary(_padded_rows(m.reshape(m.shape[0], -1)))
        for _ in range(stacked):
            fn = jax.vmap(fn)
        return dict(weight=fn(w), shape=tuple(w.shape), in_features=w.shape[stacked])

    def walk(node: Any, path: tuple[str, ...]) -> dict:
        out = {}
        for key, value in node.items():
            p = path + (str(key),)
            names = None
            if isinstance(value, nn.meta.AxisMetadata):  # boxed with logical axis names
                names = getattr(value, "names", None)
                value = value.unbox()
            if hasattr(value, "items"):
                sub = walk(value, p)
                if sub:
                    out[key] = sub
            else:
                stacked = is_ternary(p, value, names)
                if stacked is not None:
                    out[key] = pack_one(jnp.asarray(value), stacked)
        return out

    return walk(params, ())


def _padded_rows(w: jax.Array) -> jax.Array:
    """[in n] -> [ceil(in / 128) * 128, n]; padding rows carry the last group's absmean (see export_packed)."""
    n_in = w.shape[0]
    pad = (-n_in) % WEIGHT_GROUP
    if not pad:
        return w
    last = w[n_in - (n_in % WEIGHT_GROUP):].astype(jnp.float32)
    fill = jnp.broadcast_to(jnp.mean(jnp.abs(last), axis=0), (pad, w.shape[1]))
    return jnp.concatenate([w, fill.astype(w.dtype)], axis=0)
