"""A Pallas kernel for the UT transform's inverse T = (I + A)^-1 of every chunk, by 16 x 16 blocks.

A [r c c] is strictly lower triangular per chunk (r = b*h*n chunks, c = 64 tokens). XLA's form
(``chimera_jax.ops.gated_delta_rule.unit_lower_inverse``, the slow reference beside this one) builds T from
batched matmuls over whole [c c] matrices and their halves; on an H100 that was about half of the prepare stage's
forward (0.61 of 1.18 ms at B, T, H, D = 8, 2048, 16, 128: experiments/results/bench_gdn_run6.md), spent moving
[r c c] float32 slices and concatenations through HBM, not in arithmetic.

Here one program owns one chunk and never leaves registers between loading A and storing T. With blocks of
``leaf`` rows (nb = c / leaf of them; i, j block indices, A_ij the [leaf leaf] block):

    T_ii = (I + A_ii)^-1 = (I - A_ii)(I + A_ii^2)(I + A_ii^4)...     nilpotent series, repeated squaring
    T_ij = -T_ii sum_{m=j}^{i-1} A_im T_mj                           block forward substitution, j < i
    T_ij = 0                                                         j > i

(the first line is exact: A_ii^leaf = 0). For c = 64 that is 24 [16 16 16] products for the diagonal blocks and
16 for the others, about the arithmetic of XLA's recursion; what is saved is its traffic.
Products run at full float32 precision (CUDA-core FMAs on a GPU: the blocks are too small for that to matter);
float64 inputs stay float64 (the interpreter, in tests).

Its gradient needs no kernel: ``ut_solve``'s closed-form vjp uses T itself, never the way it was formed.

Lowering: the Pallas Triton path on GPU, ``interpret=True`` elsewhere.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=a.dtype)


def _diag_inverse(a, eye, leaf):
    """(I + a)^-1 for strictly lower a [leaf leaf]: sum_n (-a)^n by repeated squaring."""
    n = -a
    inv, p, span = eye + n, n, 2
    while span < leaf:  # after squaring to n^(2^i) the sum holds every power below 2^(i+1)
        p = _dot(p, p)
        inv = inv + _dot(inv, p)
        span *= 2
    return inv


def _kernel(a_ref, t_ref, *, c, leaf):
    nb = c // leaf
    rows = jax.lax.broadcasted_iota(jnp.int32, (leaf, leaf), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (leaf, leaf), 1)
    dt = t_ref.dtype
    eye = jnp.where(rows == cols, 1.0, 0.0).astype(dt)
    zero = jnp.zeros((leaf, leaf), dt)
    blk = lambda i: slice(i * leaf, (i + 1) * leaf)
    # The diagonal blocks' strict lower part only: the upper entries of A are zero by contract, masked anyway.
    diag = [_diag_inverse(jnp.where(cols < rows, a_ref[blk(i), blk(i)].astype(dt), 0.0), eye, leaf)
            for i in range(nb)]
    t = {}
    for i in range(nb):
        t[i, i] = diag[i]
        a_row = {m: a_ref[blk(i), blk(m)].astype(dt) for m in range(i)}  # this block row's A_im, loaded once
        for j in range(i - 1, -1, -1):
            acc = zero
            for m in range(j, i):
                acc = acc + _dot(a_row[m], t[m, j])
            t[i, j] = -_dot(diag[i], acc)
        for j in range(nb):
            t_ref[blk(i), blk(j)] = (t[i, j] if j <= i else zero).astype(t_ref.dtype)


@functools.partial(jax.jit, static_argnames=("leaf", "interpret", "num_warps"))
def unit_lower_inverse_pallas(a: jax.Array, leaf: int = 16, interpret: bool | None = None,
                              num_warps: int | None = None) -> jax.Array:
    """Drop-in for ``unit_lower_inverse``: (I + a)^-1 for strictly lower-triangular a [... c c].

    leaf: rows per block (16: the smallest tile of a GPU dot); c must be a multiple of it, or smaller.
    interpret: Pallas interpreter (default: whenever the backend is not a GPU).
    num_warps: Triton warps per program (default 2: 1 and 2 were the fastest on an H100, 4 and 8 slower).
    """
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a must be [... c c]; got {a.shape}")
    c = a.shape[-1]
    leaf = min(leaf, c)  # a chunk smaller than a block is one block
    if leaf <= 0 or c % leaf:
        raise ValueError(f"leaf = {leaf} must divide the chunk size c = {c}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    batch = a.shape[:-2]
    flat = a.reshape((-1, c, c))
    r = flat.shape[0]
    spec = pl.BlockSpec((None, c, c), lambda i: (i, 0, 0))
    t = pl.pallas_call(
        functools.partial(_kernel, c=c, leaf=leaf),
        grid=(r,),
        in_specs=[spec],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(flat.shape, a.dtype),
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps or 2, num_stages=1),
        name="gdn_ut_inverse",
    )(flat)
    return t.reshape(batch + (c, c))
