"""Pallas decode kernel: y = x @ (codes * scale) for few rows (m <= 64), one pallas_call per product.

Decode reads every weight once and does almost no arithmetic per byte, so the product is bound by how fast the
2-bit codes stream out of HBM (8192 x 8192: 16 MiB packed, ~6-7 us on an H100). What the general kernel
(``kernel.py``) spends on top of that is launches and latency: a pad of x to 16 rows, a split-k partial sum and a
cast are separate XLA ops, and each program waits on one small [32 bn] load at a time. Here:
- the grid runs over blocks of ``block_n`` output columns only (and optionally ``split_k`` slices of k), so x is
  never padded or copied: rows beyond m are read by clamping the row index to m - 1 (duplicates of a real row,
  whose equal results land on the same output row), and the output is written once, already in its dtype;
- each step of the k loop issues the loads of ``groups_per_step`` groups of 128 rows back to back (independent
  [32 bn] byte tiles); in the dot mode Triton's ``num_stages`` pipelining (cp.async through shared memory) keeps
  further steps in flight, in the fma mode ``prefetch`` steps are loaded ahead into registers;
- the 2-bit codes are decoded without integer-to-float conversions (a quarter-rate instruction on NVIDIA GPUs)
  and without shifts. fma mode: the byte is copied into three bytes of a 32-bit word on top of the bits of
  float32 2^23 (one multiply-add per 4 codes); one AND keeps those bits and plane p's code where it sits (bit
  offset s_p), the float read back is ``2^23 + code * 2^s_p`` and one subtraction gives ``(code - 1) * 2^s_p``
  exactly; x's plane p is pre-scaled by 2^-s_p (exact, a power of two). dot mode: the same in bfloat16 lanes
  (``128 + code * 4^p`` minus ``128 + 4^p``), two codes per packed instruction, straight into the tensor-core
  operand; x's planes or the weights' scales take the 4^-p;
- measured on the SASS (compiled for sm_90 with the Triton release of the same generation, on a CPU), the inner
  loop costs about 5 instructions per weight in fma mode (prefetch 0; 6 with prefetch 2) and ~4 in dot mode
  at 16 rows (~7 at 64, where the accumulator updates add up), against 6-9 before these tricks: at 8192 x 8192
  one row is ~11-14 us of instruction issue on an H100, above the 2-bit HBM floor (~7 us), so the decode
  product is bound by issue, not by bandwidth, once the loads overlap;
- "fma" mode (m <= 8) multiplies on the CUDA cores into a [32 bn] float32 accumulator per row, reduced over its
  32 rows once at the end; "dot" mode (the default) runs [bm 32] x [32 bn] tensor-core products (bm = m rounded
  up to a power of two >= 16) into a float32 accumulator, the per-group scales applied either to the group's
  partial (few rows) or to the unpacked weights (exact in bf16: a code times a bf16 scale);
- ``split_k`` > 1 adds the k slices with float32 atomics into a zeroed float32 buffer (extra XLA ops: the zero
  fill before, and after it the cast to a bf16 result, with a row slice in dot mode); it is off by default.

Packing (see ``chimera_jax/ops/ternary.py``): byte j of a group of 128 rows holds rows j, j+32, j+64, j+96 at bits
0-1, 2-3, 4-5, 6-7 as ``code + 1``; the per-group, per-column scale is bf16.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

GROUP = 128
PLANE = GROUP // 4  # rows per 2-bit plane of a group
MAX_M = 64
MAX_FMA_M = 8
MODES = ("fma", "dot")
_MAGIC = 0x4B000000  # the bits of float32 2^23: its mantissa's last bit is worth exactly 1


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


# Where plane p's 2-bit code sits in the byte copied 3 times (pk * 0x10101): planes 0-2 read their own byte
# copy (bits 0-1, 10-11, 20-21) and plane 3 reads bits 6-7 of copy 0, so every code lands in the 23-bit
# mantissa and no shift is needed.
_SHIFT = (0, 10, 20, 6)


def _replicate(pk, opaque=False):
    """[r c] uint8 -> int32 words holding the byte at bits 0, 8 and 16 plus the bits of 2^23 (which sit above
    bit 23, so the add cannot carry into them): a single multiply-add per byte, shared by its four codes.

    ``opaque`` computes it in inline PTX (GPU only): LLVM cannot then see that only a few bits are live and
    narrow the words it carries across loop steps into 8- and 16-bit lanes, which costs a byte permute per
    code to pack and unpack."""
    w = pk.astype(jnp.int32)
    if opaque:
        return pltriton.elementwise_inline_asm(
            f"mad.lo.u32 $0, $1, {0x10101}, {_MAGIC};", args=[w], constraints="=r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.int32)])[0]
    return w * 0x10101 + _MAGIC


def _plane_values(rep, plane):
    """[r c] words from ``_replicate`` -> float32 (code - 1) * 2^_SHIFT[plane] of the plane, exactly: keeping
    the bits of 2^23 and the code's two bits (one AND) reads back as 2^23 + code * 2^shift."""
    bits = rep & (_MAGIC | (3 << _SHIFT[plane]))
    return jax.lax.bitcast_convert_type(bits, jnp.float32) - float(2 ** 23 + 2 ** _SHIFT[plane])


_MAGIC_BF16 = 0x4300  # the bits of bfloat16 128: its mantissa's last bit is worth exactly 1


def _plane_values_bf16(pk16, plane):
    """[r c] int16 packed bytes -> bfloat16 (code - 1) * 4^plane, exactly: the same trick in 16-bit lanes (the
    codes sit at bits 2p..2p+1 <= 7 of the 7-bit mantissa; 2 * 4^3 = 128 carries into the exponent and still
    reads 128 + 128), so the tensor-core operand needs no float32 detour and two codes share an instruction."""
    bits = (pk16 & (3 << (2 * plane))) | _MAGIC_BF16
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16) - jnp.asarray(128 + 4 ** plane, jnp.bfloat16)


def _unit(plane):
    return 2.0 ** -_SHIFT[plane]


def _kernel(x_ref, p_ref, s_ref, *rest, m, bm, steps, groups_per_step, mode, atomic, prefetch, opaque):
    o_ref = rest[-1]  # with atomics the zeroed input buffer is aliased to the output (rest[0] is that input)
    bn = p_ref.shape[1]
    split = pl.program_id(1)
    g0 = split * (steps * groups_per_step)
    rows = jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (bm,), 0), m - 1)  # padded rows repeat row m - 1

    def load(gi):
        """The loads of group gi: packed bytes [32 bn] (widened), column scales [bn], and x's four planes."""
        # Widened here, at the load: with a prefetch the widened words are what the loop carries (opaque on a
        # GPU, so that LLVM keeps them 32-bit instead of re-packing them into bytes).
        pk = p_ref[pl.ds(gi * PLANE, PLANE), :]
        rep = _replicate(pk, opaque) if mode == "fma" else pk.astype(jnp.int16)  # [32 bn]
        ws = s_ref[gi, :]
        if mode == "fma":
            # x is rounded to bf16 (as in the reference) and pre-scaled here, so that what a prefetch carries is
            # float32 (bf16 pairs would be packed into and unpacked from 32-bit registers).
            xs = tuple(x_ref[r, pl.ds(gi * GROUP + plane * PLANE, PLANE)].astype(jnp.bfloat16).astype(jnp.float32)
                       * _unit(plane) for r in range(m) for plane in range(4))  # [32] each
        else:
            xs = tuple(x_ref[rows, pl.ds(gi * GROUP + plane * PLANE, PLANE)] for plane in range(4))  # [bm 32]
        return rep, ws, xs

    def use(data, acc):
        rep, ws, xs = data
        ws = ws.astype(jnp.float32)
        if mode == "fma":
            new = []
            for r in range(m):
                part = jnp.zeros((PLANE, bn), jnp.float32)
                for plane in range(4):  # x pre-scaled by 2^-shift meets (code - 1) * 2^shift
                    part += _plane_values(rep, plane) * xs[4 * r + plane][:, None]
                new.append(acc[r] + part * ws[None, :])
            return tuple(new)
        if bm / bn + bm / GROUP < 1:
            # Few rows: pre-scaling x's [bm 32] planes by 2^-shift and the group's [bm bn] partial by its scales
            # costs fewer operations than scaling the [32 bn] weights of every plane.
            part = jnp.zeros((bm, bn), jnp.float32)
            for plane in range(4):
                xp = (xs[plane].astype(jnp.bfloat16).astype(jnp.float32) * 0.25 ** plane).astype(jnp.bfloat16)
                w = _plane_values_bf16(rep, plane)  # [32 bn] (code - 1) * 4^plane, exact
                part += jnp.dot(xp, w, preferred_element_type=jnp.float32)
            return acc + part * ws[None, :]
        for plane in range(4):
            # (code - 1) * 4^plane * (scale * 4^-plane) = (code - 1) * scale: exact in bf16, so the group's scale
            # rides on the weights and every product adds straight into one accumulator.
            w = _plane_values_bf16(rep, plane) * (ws * 0.25 ** plane).astype(jnp.bfloat16)[None, :]  # [32 bn]
            acc += jnp.dot(xs[plane].astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
        return acc

    def load_step(i):
        return tuple(load(g0 + i * groups_per_step + j) for j in range(groups_per_step))

    def use_step(data, acc):
        for d in data:
            acc = use(d, acc)
        return acc

    if mode == "fma":
        acc = tuple(jnp.zeros((PLANE, bn), jnp.float32) for _ in range(m))
    else:
        acc = jnp.zeros((bm, bn), jnp.float32)
    if prefetch:
        # The loads of step i + prefetch are issued in step i and carried in registers, so the memory latency
        # overlaps the unpacking of the steps before it (the compiler sinks loads towards the end of an
        # iteration, so a distance of 1 overlaps little; 2 overlaps a whole step). Steps past the end reload
        # the last one rather than read past this program's k range.
        def body(i, carry):
            acc, *ahead = carry
            nxt = load_step(jnp.minimum(i + prefetch, steps - 1))
            return (use_step(ahead[0], acc), *ahead[1:], nxt)

        ahead = [load_step(min(d, steps - 1)) for d in range(prefetch)]
        acc = jax.lax.fori_loop(0, steps, body, (acc, *ahead))[0]
    else:
        acc = jax.lax.fori_loop(0, steps, lambda i, acc: use_step(load_step(i), acc), acc)
    if mode == "fma":
        ys = [jnp.sum(a, axis=0)[None, :] for a in acc]  # [1 bn] each
        if atomic:
            for r, y in enumerate(ys):
                _atomic_add_rows(o_ref, jnp.full((1, bn), r, jnp.int32), y)
        else:
            for r, y in enumerate(ys):
                o_ref[pl.ds(r, 1), :] = y.astype(o_ref.dtype)
    elif atomic:  # the buffer has bm rows, so every row of acc has its own place (no duplicates to add twice)
        _atomic_add_rows(o_ref, jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0), acc)
    else:
        o_ref[rows, :] = acc.astype(o_ref.dtype)  # padded rows rewrite row m - 1 with its own values


def _atomic_add_rows(o_ref, rows, val):
    """o_ref[rows, cols] += val for [r bn] row indices, with whole index arrays (the interpreter's atomics
    take no masks and no mix of slices and arrays)."""
    cols = jax.lax.broadcasted_iota(jnp.int32, rows.shape, 1)
    pltriton.atomic_add(o_ref, (rows, cols), val)


def default_tunables(m: int, k: int, n: int, split_k: int = 1, mode: str = "dot") -> dict:
    """Starting tunables by shape; the sweep in ``experiments/bench_ternary.py`` picks better ones on a GPU.

    The dot mode is the default at every m: its loads are pipelined through shared memory by Triton and its
    inner loop issues fewer instructions per weight than the fma mode's, even at one row. Every program reads
    all of x ([m k] bf16) against k * block_n / 4 bytes of codes, i.e. 8 m / block_n times as many bytes from L2
    as it streams from HBM: wider blocks for more rows, yet enough programs (256 for a few rows: two per
    multiprocessor of an H100; 128 for more; fewer where n is small) to keep HBM busy.
    """
    if mode == "fma" or m <= 4:
        widest, programs = 32, 256
    else:
        widest, programs = (64 if m <= 16 else 128), 128
    block_n = widest
    # Not below 32: a [32 16] tile leaves each of 128 threads 4 codes a plane, and the per-tile overheads
    # (addresses, layout moves) then cost ~3x the instructions per weight of a [32 32] tile.
    while block_n > 32 and n // block_n < programs:
        block_n //= 2
    while block_n > 1 and n % block_n:
        block_n //= 2
    groups = k // GROUP // max(split_k, 1)
    groups_per_step = 4 if m <= 16 else 2  # more unrolled groups spill registers at 64 rows
    while groups_per_step > 1 and groups % groups_per_step:
        groups_per_step //= 2
    return dict(block_n=block_n, groups_per_step=groups_per_step, num_warps=4, num_stages=3, split_k=split_k,
                mode=mode, prefetch=default_prefetch(mode, m))


def decode_tunables(k: int, n: int) -> dict:
    """Tunables for one row (batch-1 decode), from the H100 sweep in experiments/results/bench_ternary.md, where the
    best at each of its three shapes was the fma mode with 2 groups per step, register prefetch 2, 3 stages and 4
    warps: 27.6 / 45.7 / 44.1 us at 4096^2 / 8192^2 / 4096 x 14336 against 33.1 / 65.5 / 59.0 for the general
    kernel. Its best block_n and split_k follow one rule: 64-column blocks where that still gives >= 128 programs
    (else 32), and the k range split in two where fewer than 192 programs would run (the split's atomics cost less
    than an idle half of the GPU)."""
    block_n = 64 if n % 64 == 0 and n // 64 >= 128 else 32
    groups = k // GROUP
    split_k = 2 if n // block_n < 192 and groups % 4 == 0 else 1
    return dict(mode="fma", block_n=block_n, split_k=split_k, groups_per_step=2, prefetch=2, num_stages=3,
                num_warps=4)


def decode_supported(m: int, k: int, n: int) -> str | None:
    """Why ``decode_tunables`` does not apply to [m k] @ [k n] (None: it does)."""
    if m != 1:
        return f"m={m} (the decode kernel is dispatched for one row only: the sweep measured no gain at 16 and 64)"
    if k % (2 * GROUP):
        return f"k={k} is not a multiple of {2 * GROUP}"
    if n % 32:
        return f"n={n} is not a multiple of 32"
    return None


def default_prefetch(mode: str, m: int) -> int:
    """Register prefetch serves the CUDA-core mode (two steps ahead for one row; one for more, whose unrolled
    steps already fill the registers); the dot mode's loads are pipelined through shared memory by Triton."""
    return 0 if mode == "dot" else (2 if m == 1 else 1)


def check_shapes(x, packed, scale, *, block_n, groups_per_step, split_k, mode):
    """Raises a ValueError naming the bad shape or tunable."""
    if x.ndim != 2:
        raise ValueError(f"x must be [m k]; got shape {x.shape}")
    m, k = x.shape
    if packed.ndim != 2 or packed.shape[0] * 4 != k:
        raise ValueError(f"packed must be [k/4 n] with k = {k} (x's columns); got shape {packed.shape}")
    n = packed.shape[1]
    if packed.dtype != jnp.uint8:
        raise ValueError(f"packed must be uint8; got {packed.dtype}")
    if k % GROUP:
        raise ValueError(f"k must be a multiple of {GROUP}; got x shape {x.shape}")
    if scale.shape != (k // GROUP, n):
        raise ValueError(f"scale must be [k/{GROUP} n] = {(k // GROUP, n)}; got shape {scale.shape}")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"the decode kernel takes 1 <= m <= {MAX_M} rows; got x shape {x.shape}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if mode == "fma" and m > MAX_FMA_M:
        raise ValueError(f"mode='fma' takes m <= {MAX_FMA_M} rows; got x shape {x.shape}")
    if n % 16:
        raise ValueError(f"n must be a multiple of 16; got packed shape {packed.shape}")
    if not (_pow2(block_n) and block_n >= 16 and n % block_n == 0):
        raise ValueError(f"block_n must be a power of two >= 16 dividing n; got block_n={block_n} for n={n} "
                         f"(packed shape {packed.shape})")
    groups = k // GROUP
    if split_k < 1 or groups % split_k:
        raise ValueError(f"split_k must divide the {groups} groups of k={k}; got split_k={split_k}")
    if groups_per_step < 1 or (groups // split_k) % groups_per_step:
        raise ValueError(f"groups_per_step must divide the {groups // split_k} groups per k slice "
                         f"(k={k}, split_k={split_k}); got groups_per_step={groups_per_step}")


@functools.partial(jax.jit, static_argnames=("block_n", "groups_per_step", "num_warps", "num_stages", "split_k",
                                             "mode", "prefetch", "out_dtype", "interpret"))
def ternary_gemv(x, packed, scale, *, block_n=None, groups_per_step=None, num_warps=None, num_stages=None,
                 split_k=None, mode=None, prefetch=None, out_dtype=None, interpret=None):
    """x [m k] (bf16 or float32, rounded to bf16 like the reference) @ packed ternary [k/4 n] -> [m n].

    The output dtype is ``out_dtype`` (default x.dtype); float32 accumulation. Tunables left as None take
    ``default_tunables(m, k, n)``. One pallas_call and nothing else unless ``split_k`` > 1.
    """
    if x.ndim != 2 or packed.ndim != 2:
        raise ValueError(f"x must be [m k] and packed [k/4 n]; got shapes {x.shape} and {packed.shape}")
    m, k = x.shape
    n = packed.shape[1]
    split_k = split_k or 1
    mode = mode or "dot"
    tun = default_tunables(m, k, n, split_k, mode if mode in MODES else "dot")
    block_n = block_n or tun["block_n"]
    groups_per_step = groups_per_step or tun["groups_per_step"]
    prefetch = default_prefetch(mode, m) if prefetch is None else int(prefetch)
    check_shapes(x, packed, scale, block_n=block_n, groups_per_step=groups_per_step, split_k=split_k, mode=mode)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    groups = k // GROUP
    bm = max(16, 1 << (m - 1).bit_length())  # the tensor-core tile needs >= 16 rows
    atomic = split_k > 1
    kernel = functools.partial(_kernel, m=m, bm=bm, steps=groups // split_k // groups_per_step,
                               groups_per_step=groups_per_step, mode=mode, atomic=atomic, prefetch=prefetch,
                               opaque=bool(prefetch) and not interpret)
    in_specs = [pl.BlockSpec((m, k), lambda j, s: (0, 0)),
                pl.BlockSpec((k // 4, block_n), lambda j, s: (0, j)),
                pl.BlockSpec((groups, block_n), lambda j, s: (0, j))]
    args = [x, packed, scale]
    acc_dtype = jnp.float32 if atomic else out_dtype
    m_out = m
    if atomic:  # the slices add into this zeroed buffer, which becomes the output (bm rows in dot mode)
        m_out = m if mode == "fma" else bm
        args.append(jnp.zeros((m_out, n), jnp.float32))
        in_specs.append(pl.BlockSpec((m_out, block_n), lambda j, s: (0, j)))
    params = None
    if not interpret:
        params = pltriton.CompilerParams(num_warps=num_warps or tun["num_warps"],
                                         num_stages=num_stages or tun["num_stages"])
    y = pl.pallas_call(
        kernel,
        grid=(n // block_n, split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((m_out, block_n), lambda j, s: (0, j)),
        out_shape=jax.ShapeDtypeStruct((m_out, n), acc_dtype),
        input_output_aliases={3: 0} if atomic else {},
        interpret=interpret,
        compiler_params=params,
        name="ternary_gemv",
    )(*args)
    return y[:m].astype(out_dtype)


def ternary_gemv_reference(x, packed, scale, *, dtype=jnp.float32):
    """The slow oracle beside the kernel: unpack to ``dtype`` and one full-precision dot (x rounded to bf16)."""
    k4, n = packed.shape
    p = packed.reshape(k4 // PLANE, 1, PLANE, n)
    shifts = (jnp.arange(4, dtype=jnp.uint8) * 2).reshape(1, 4, 1, 1)
    codes = ((p >> shifts) & 3).astype(dtype).reshape(k4 * 4, n) - 1
    w = codes * jnp.repeat(scale.astype(dtype), GROUP, axis=0)
    xf = x.astype(jnp.bfloat16).astype(dtype)
    return jnp.dot(xf, w, precision=jax.lax.Precision.HIGHEST)
