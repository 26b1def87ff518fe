"""Ternary (BitNet b1.58) weights: absmean ternarisation, 2-bit packing and the ternary matmul.

``pack_ternary(w)`` for ``w: [k n]`` splits the k input rows into groups of 128, takes per group and output
column the absmean ``s = mean |w|`` (Ma et al., 2024, "The Era of 1-bit LLMs"), and keeps
``round(clip(w / s, -1, 1))`` in {-1, 0, +1} with ``s`` in bfloat16. Each weight is stored as the 2-bit code
``w + 1`` (0, 1 or 2), four to a byte. Inside a group of 128 rows, byte j of the group holds rows j, j+32,
j+64, j+96 at bits 0-1, 2-3, 4-5, 6-7: unpacking a byte plane gives 32 *consecutive* rows, so a kernel multiplies
each plane by a contiguous slice of the activations.

``ternary_matmul(x, tw)`` computes ``x @ unpack_ternary(tw)`` for ``x: [m k]``:
- activations="bf16": x in bf16, float32 accumulation;
- activations="int8": x quantised per row and block of 128 columns to int8 with an absmax scale
  (``x ~ q * s, s = max|x| / 127``), int8 x ternary products summed exactly in int32, then scaled.
impl: "reference" (unpack, then a float32 dot), "xla" (unpack in XLA then a bf16 / int8 dot), "pallas"
(the kernel in ``kernels_pallas/ternary_matmul``), "auto" (pallas on a GPU where covered, else xla, logged).
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

GROUP = 128  # input rows per scale
IMPLS = ("auto", "pallas", "xla", "reference")
ACTIVATIONS = ("bf16", "int8")


class TernaryWeight(NamedTuple):
    """A packed ternary matrix of logical shape [k n] (a pytree: jit, device_put and sharding see two arrays).

    packed: [k/4 n] uint8, four 2-bit codes per byte (layout in the module docstring).
    scale:  [k/128 n] bfloat16, the absmean of each group of 128 input rows per output column.
    """
    packed: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0] * 4, self.packed.shape[1])


def ternarize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [k n] -> (codes in {-1, 0, 1} as int8 [k n], scale float32 [k/128 n]), absmean per group of rows."""
    if w.ndim != 2 or w.shape[0] % GROUP:
        raise ValueError(f"w must be [k n] with k a multiple of {GROUP}; got shape {w.shape}")
    k, n = w.shape
    wg = w.astype(jnp.float32).reshape(k // GROUP, GROUP, n)
    # The scale is rounded to bf16 first, so that the codes are chosen against the scale that is stored.
    scale = jnp.maximum(jnp.mean(jnp.abs(wg), axis=1), 1e-8).astype(jnp.bfloat16).astype(jnp.float32)
    codes = jnp.clip(jnp.round(wg / scale[:, None, :]), -1, 1).astype(jnp.int8)
    return codes.reshape(k, n), scale


def pack_ternary(w: jax.Array) -> TernaryWeight:
    """Absmean-ternarises w [k n] per group of 128 input rows and packs it 2 bits per weight."""
    codes, scale = ternarize(w)
    k, n = codes.shape
    c = (codes + 1).astype(jnp.uint8).reshape(k // GROUP, 4, GROUP // 4, n)  # [groups plane j n]
    packed = c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)
    return TernaryWeight(packed.reshape(k // 4, n), scale.astype(jnp.bfloat16))


def unpack_codes(packed: jax.Array) -> jax.Array:
    """[k/4 n] uint8 -> [k n] int8 codes in {-1, 0, 1}."""
    k4, n = packed.shape
    p = packed.reshape(k4 // (GROUP // 4), 1, GROUP // 4, n)
    shifts = jnp.arange(4, dtype=jnp.uint8).reshape(1, 4, 1, 1) * 2
    codes = ((p >> shifts) & 3).astype(jnp.int8) - 1
    return codes.reshape(k4 * 4, n)


def unpack_ternary(tw: TernaryWeight, dtype=jnp.float32) -> jax.Array:
    """The dequantised matrix [k n] = codes * scale."""
    codes = unpack_codes(tw.packed)
    k, n = codes.shape
    scale = jnp.repeat(tw.scale.astype(jnp.float32), GROUP, axis=0)
    return (codes.astype(jnp.float32) * scale).astype(dtype)


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [m k] -> (int8 [m k], float32 scale [m k/128]) with absmax per row and block of 128 columns."""
    m, k = x.shape
    xb = x.astype(jnp.float32).reshape(m, k // GROUP, GROUP)
    scale = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1), 1e-8) / 127.0
    q = jnp.clip(jnp.round(xb / scale[..., None]), -127, 127).astype(jnp.int8)
    return q.reshape(m, k), scale


def _check(x, tw, activations, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}; got {activations!r}")
    k, n = tw.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [m k] with k = {k} (the weight's input rows); got {x.shape}")
    if tw.scale.shape != (k // GROUP, n):
        raise ValueError(f"tw.scale must be [k/{GROUP} n] = {(k // GROUP, n)}; got {tw.scale.shape}")


def ternary_matmul_reference(x, tw, *, activations="bf16"):
    """Unpack, then one float32 dot (the int8 path dequantises its activations first)."""
    if activations == "int8":
        q, s = quantize_activations(x)
        xf = q.astype(jnp.float32) * jnp.repeat(s, GROUP, axis=1)
    else:
        xf = x.astype(jnp.bfloat16).astype(jnp.float32)
    w = unpack_ternary(tw, jnp.float32)
    return jnp.dot(xf, w, precision=jax.lax.Precision.HIGHEST)


def ternary_matmul_xla(x, tw, *, activations="bf16"):
    """XLA form: unpack to bf16 (or int8 codes) then a native dot; the int8 path sums per group in int32."""
    if activations == "int8":
        q, s = quantize_activations(x)
        m, k = q.shape
        codes = unpack_codes(tw.packed).reshape(k // GROUP, GROUP, -1)
        part = jnp.einsum("mgk,gkn->gmn", q.reshape(m, k // GROUP, GROUP), codes,
                          preferred_element_type=jnp.int32)  # exact per group
        return jnp.einsum("gmn,mg,gn->mn", part.astype(jnp.float32), s, tw.scale.astype(jnp.float32))
    w = unpack_ternary(tw, jnp.bfloat16)
    return jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)


# Rows up to which "auto" picks the Pallas kernels for bf16 activations. Past it XLA's bf16 dot of the unpacked
# weights wins: on an H100 the general kernel took 0.27-0.29x XLA's time at m = 4096 against 1.01-1.06x at m = 64
# (experiments/results/bench_ternary.md). With the unpack included (impl="xla") it was still 3.0-3.4x faster than
# the kernel at m = 4096 and slower at m <= 64 (experiments/results/bench_ternary_run4.md). int8 activations keep
# the kernel: XLA's int8 form materialises per-group partial sums.
PALLAS_MAX_M = 64


def _pallas_supported(x, tw, activations="bf16") -> str | None:
    if jax.default_backend() != "gpu":
        return f"backend {jax.default_backend()!r} is not a GPU"
    k, n = tw.shape
    if n % 64:
        return f"n={n} is not a multiple of 64"
    if activations == "bf16" and x.shape[0] > PALLAS_MAX_M:
        return f"m={x.shape[0]} > {PALLAS_MAX_M}: XLA's bf16 dot of the unpacked weights is faster there"
    return None


def ternary_matmul(x: jax.Array, tw: TernaryWeight, *, impl: str = "auto", activations: str = "bf16",
                   out_dtype=None) -> jax.Array:
    """x [m k] @ ternary W [k n] -> [m n] in out_dtype (default x.dtype); float32 accumulation."""
    _check(x, tw, activations, impl)
    out_dtype = out_dtype or x.dtype
    if impl == "auto":
        why = _pallas_supported(x, tw, activations)
        if why is None:
            impl = "pallas"
        else:
            log.debug("ternary_matmul: falling back to impl='xla' (%s)", why)
            impl = "xla"
    if impl == "reference":
        y = ternary_matmul_reference(x, tw, activations=activations)
    elif impl == "xla":
        y = ternary_matmul_xla(x, tw, activations=activations)
    else:
        from kernels_pallas.ternary_matmul import ternary_matmul_pallas  # the kernel loads only when asked for

        from kernels_pallas.ternary_matmul import gemv

        why_not_gemv = gemv.decode_supported(x.shape[0], *tw.shape)
        if activations == "int8":
            q, s = quantize_activations(x)
            y = ternary_matmul_pallas(q, tw.packed, tw.scale, x_scale=s)
        elif why_not_gemv is None:
            # One row (batch-1 decode): the kernel built for it, 1.2-1.4x the general one on an H100.
            y = gemv.ternary_gemv(x.astype(jnp.bfloat16), tw.packed, tw.scale, out_dtype=jnp.float32,
                                  **gemv.decode_tunables(*tw.shape))
        else:
            log.debug("ternary_matmul: general Pallas kernel, not the decode kernel (%s)", why_not_gemv)
            y = ternary_matmul_pallas(x.astype(jnp.bfloat16), tw.packed, tw.scale)
    return y.astype(out_dtype)
