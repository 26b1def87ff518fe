"""Pallas kernel: y = x @ (codes * scale) with the codes unpacked from 2 bits on the fly.

One program computes a [bm bn] tile of y (or a split-k partial of it). It walks the groups of 128 input rows
of its k-range: loads the [32 bn] packed bytes of the group once, unpacks the four 2-bit planes (each plane =
32 consecutive input rows, see ``chimera_jax/ops/ternary.py``) and multiplies each with the matching [bm 32]
slice of x on the tensor cores, then applies the group's per-column scale to the group's partial sum.
- bf16 activations: bf16 x bf16 products, float32 accumulation.
- int8 activations: int8 x int8 (codes) products summed exactly in int32 per group, then scaled by the row's
  activation scale for that group and the weight scale.
Weights move at 2 bits each plus 1/64 of a bf16 per weight for the scales, 8x fewer bytes than bf16: at small m
the kernel is bound by reading them, so small m splits k across programs (partials added by XLA) to keep every
multiprocessor streaming.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

GROUP = 128
PLANE = GROUP // 4  # rows per 2-bit plane of a group


def _kernel(x_ref, p_ref, s_ref, *rest, groups_per_split, int8):
    if int8:
        xs_ref, o_ref = rest
    else:
        (o_ref,) = rest
    split = pl.program_id(2)
    bm, bn = o_ref.shape

    def body(i, acc):
        gi = split * groups_per_split + i
        pk = p_ref[pl.ds(gi * PLANE, PLANE), :].astype(jnp.int32)  # [32 bn]
        part = jnp.zeros((bm, bn), jnp.int32 if int8 else jnp.float32)
        for plane in range(4):
            codes = ((pk >> (2 * plane)) & 3) - 1
            xs = x_ref[:, pl.ds(gi * GROUP + plane * PLANE, PLANE)]  # [bm 32]
            if int8:
                part += pltriton.dot(xs, codes.astype(jnp.int8))
            else:
                part += pltriton.dot(xs, codes.astype(jnp.bfloat16))
        ws = s_ref[gi, :].astype(jnp.float32)  # [bn]
        if int8:
            return acc + part.astype(jnp.float32) * xs_ref[gi, :][:, None] * ws[None, :]
        return acc + part * ws[None, :]

    acc = jax.lax.fori_loop(0, groups_per_split, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc


def _blocks(m, n, groups):
    """(bm, bn, splits): small m reads weights only, so spread k over programs until ~4 waves fill the chip."""
    if m <= 16:
        bm, bn = 16, 64
    elif m <= 64:
        bm, bn = 64, 64
    else:
        bm, bn = 128, 128
    while n % bn:
        bn //= 2
    tiles = -(-m // bm) * (n // bn)
    splits = 1
    while tiles * splits < 512 and groups % (splits * 2) == 0 and groups // (splits * 2) >= 2:
        splits *= 2
    return bm, bn, splits


@functools.partial(jax.jit, static_argnames=("interpret", "blocks"))
def ternary_matmul_pallas(x, packed, scale, x_scale=None, *, interpret=None, blocks=None):
    """x [m k] (bf16, or int8 with x_scale [m k/128] float32) @ packed ternary [k/4 n] -> float32 [m n]."""
    m, k = x.shape
    n = packed.shape[1]
    groups = k // GROUP
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    int8 = x_scale is not None
    bm, bn, splits = blocks or _blocks(m, n, groups)
    mp = -(-m // bm) * bm
    if mp != m:  # the tensor-core tiles need >= 16 rows; padded rows are dropped at the end
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
        if int8:
            x_scale = jnp.pad(x_scale, ((0, mp - m), (0, 0)))
    args = [x, packed, scale]
    in_specs = [pl.BlockSpec((bm, k), lambda i, j, s: (i, 0)),
                pl.BlockSpec((k // 4, bn), lambda i, j, s: (0, j)),
                pl.BlockSpec((groups, bn), lambda i, j, s: (0, j))]
    if int8:
        args.append(x_scale.T)  # [k/128 m]: one group's scales are one contiguous row
        in_specs.append(pl.BlockSpec((groups, bm), lambda i, j, s: (0, i)))
    kernel = functools.partial(_kernel, groups_per_split=groups // splits, int8=int8)
    out = pl.pallas_call(
        kernel,
        grid=(mp // bm, n // bn, splits),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, n), jnp.float32),
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=3),
        name="ternary_matmul",
    )(*args)
    return out.sum(0)[:m] if splits > 1 else out[0, :m]
