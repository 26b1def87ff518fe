"""The intra-chunk ("prepare") stage of the gated delta rule: XLA ``chunk_prepare`` vs the fused Pallas kernels
(``kernels_pallas/gated_delta_rule/chunk_prepare.py``), alone and inside the whole op (``impl="pallas"``).

    python experiments/bench_gdn_prepare.py --out DIR                 # GPU: bf16, the shapes below
    python experiments/bench_gdn_prepare.py --out DIR --smoke         # CPU: tiny shapes, interpreter
    python experiments/bench_gdn_prepare.py --out DIR --variants "nw=8;nw=4;nw=8,inv=tf32x3"

Each variant is one set of kernel tunables (nw = num_warps, ns = num_stages, bnw = backward num_warps,
inv = highest | tf32x3, solve = float32 | bfloat16 for T rhs, leaf = diagonal block rows). Times are medians of --reps calls after warm-up
(``block_until_ready``); the Pallas outputs and gradients are compared with XLA's on the same device. Writes
DIR/bench_gdn_prepare.{md,json} after every row, so a run cut short still leaves its rows. Where the op has
``remat_prepare``, its forward+backward is timed both ways (prepare stage recomputed in the backward, or kept).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from chimera_jax.ops import gated_delta_rule as gdr
from kernels_pallas.gated_delta_rule import chunk_scan_pallas
from kernels_pallas.gated_delta_rule.chunk_prepare import chunk_prepare_pallas

SHAPES = [(8, 2048, 16, 128), (1, 32768, 8, 128)]
SMOKE_SHAPES = [(1, 64, 2, 16)]
SMOKE_CHUNK = 16  # c = 64 in XLA's recursive block inverse costs most of a CPU smoke run's compile time
KEYS = dict(nw="num_warps", ns="num_stages", bnw="bwd_num_warps", inv="inv_precision", solve="solve_dtype",
            leaf="leaf")
STRING_KEYS = ("inv", "solve")
DEFAULT_VARIANTS = "inv=highest;inv=tf32x3;inv=tf32x3,solve=bfloat16"
# Relative (Frobenius) error allowed between the bf16 kernel path and XLA's float32 one.
TOL = 3e-2


def parse_variants(spec: str) -> list[dict]:
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kw = {}
        for item in filter(None, part.split(",")):
            key, val = item.split("=")
            if key not in KEYS:
                raise ValueError(f"unknown variant key {key!r}; known: {sorted(KEYS)}")
            kw[KEYS[key]] = val if key in STRING_KEYS else int(val)
        out.append(kw)
    return out or [{}]


def _name(kw: dict) -> str:
    inv = {v: k for k, v in KEYS.items()}
    return "pallas[" + ",".join(f"{inv[k]}={v}" for k, v in kw.items()) + "]" if kw else "pallas"


def _median_ms(fn, args, reps, warmup):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def _rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    den = float(jnp.linalg.norm(b.ravel()))
    return float(jnp.linalg.norm((a - b).ravel())) / (den if den > 0 else 1.0)


@contextlib.contextmanager
def _module_prepare(prepare):
    """``gated_delta_rule_chunked`` looks ``chunk_prepare`` up in its module at trace time: everything traced
    inside this block uses ``prepare`` instead."""
    saved = gdr.chunk_prepare
    gdr.chunk_prepare = prepare
    try:
        yield
    finally:
        gdr.chunk_prepare = saved


def _chunked_params():
    return inspect.signature(gdr.gated_delta_rule_chunked).parameters


def op_with_prepare(stage, *, scale, c, remat=None):
    """What ``gated_delta_rule(impl="pallas")`` runs on a GPU (the chunked form with the Pallas scan on
    mm_dtype = q.dtype operands), with ``stage`` as its prepare stage; returns o. Takes a ``prepare=`` argument
    of ``gated_delta_rule_chunked`` where it has one, else swaps the module's ``chunk_prepare`` while tracing.
    remat: the op's ``remat_prepare`` (None: its default, or absent)."""
    takes_prepare = "prepare" in _chunked_params()

    def op(q, k, v, g, beta):
        kw = dict(scale=scale, chunk_size=c, scan=functools.partial(chunk_scan_pallas, mm_dtype=q.dtype))
        if remat is not None:
            kw["remat_prepare"] = remat
        if takes_prepare:
            return gdr.gated_delta_rule_chunked(q, k, v, g, beta, prepare=stage, **kw)[0]
        with _module_prepare(stage):
            return gdr.gated_delta_rule_chunked(q, k, v, g, beta, **kw)[0]
    return op


def _inputs(B, T, H, D, dtype):
    ks = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, D), dtype)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H))) / 4
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))).astype(dtype)
    # Packed documents: a few starts inside chunks and one on a chunk edge, so the masked paths are timed too.
    reset = jnp.zeros((B, T), bool).at[:, T // 3].set(True).at[:, T // 2].set(True)
    return (q, k, v, g, beta, reset), ks[5]


def bench_shape(B, T, H, D, variants, *, c, dtype, reps, warmup, interpret, remat="both",
                on_row=lambda rows: None):
    scale = D ** -0.5
    remats = {"both": (True, False), "on": (True,), "off": (False,), "default": (None,)}[remat]
    if "remat_prepare" not in _chunked_params():
        remats = (None,)
    (q, k, v, g, beta, reset), key = _inputs(B, T, H, D, dtype)
    # Each entry has chunk_prepare's signature, so that the whole op can take it in place of the XLA one.
    impls = {"xla": gdr.chunk_prepare}
    for kw in variants:
        impls[_name(kw)] = functools.partial(chunk_prepare_pallas, interpret=interpret, **kw)
    rows, ref, ref_op = [], None, None  # XLA's outputs and gradients, of the stage and of the op, when its row ran
    for name, stage in impls.items():
        row = dict(impl=name, B=B, T=T, H=H, D=D)
        prep = functools.partial(stage, scale=scale, chunk_size=c)
        try:
            fwd = jax.jit(prep)
            out = fwd(q, k, v, g, beta, reset)
            # One fixed cotangent per output (drawn in float32, cast to each implementation's output dtype).
            cks = jax.random.split(key, 6)
            cots = type(out)(*(jax.random.normal(ck, x.shape, jnp.float32).astype(x.dtype)
                               for ck, x in zip(cks, out)))

            def fb(q, k, v, g, beta, reset, cots, prep=prep):
                _, vjp = jax.vjp(lambda *a: prep(*a, reset), q, k, v, g, beta)
                return vjp(cots)

            fb = jax.jit(fb)
            grads = fb(q, k, v, g, beta, reset, cots)
            row["prep_fwd_ms"] = _median_ms(fwd, (q, k, v, g, beta, reset), reps, warmup)
            row["prep_fwd_bwd_ms"] = _median_ms(fb, (q, k, v, g, beta, reset, cots), reps, warmup)
            if name == "xla":
                ref = (out, grads)
            elif ref is not None:
                row["max_rel_err_out"] = max(_rel(a, b) for a, b in zip(out, ref[0]))
                row["max_rel_err_grad"] = max(_rel(a, b) for a, b in zip(grads, ref[1]))

            # The whole op, impl="pallas" (Pallas scan), with this prepare stage; the backward with the prepare
            # stage recomputed (remat) and kept, where the op offers the choice.
            op = op_with_prepare(stage, scale=scale, c=c)
            op_f = jax.jit(op).lower(q, k, v, g, beta).compile()
            row["op_fwd_ms"] = _median_ms(op_f, (q, k, v, g, beta), reps, warmup)
            for remat in remats:
                op_r = op_with_prepare(stage, scale=scale, c=c, remat=remat)
                loss = lambda *a, op_r=op_r: (op_r(*a).astype(jnp.float32) ** 2).sum()
                op_fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(q, k, v, g, beta).compile()
                sfx = {None: "", True: "_remat", False: "_keep"}[remat]
                row["op_fwd_bwd" + sfx + "_ms"] = _median_ms(op_fb, (q, k, v, g, beta), reps, warmup)
                try:  # scratch of the training step: the memory the fused backward is meant to save
                    row["op_fwd_bwd" + sfx + "_temp_mb"] = op_fb.memory_analysis().temp_size_in_bytes / 2 ** 20
                except Exception:  # not every backend reports it
                    pass
            o, og = op_f(q, k, v, g, beta), op_fb(q, k, v, g, beta)
            if name == "xla":
                ref_op = (o, og)
            elif ref_op is not None:
                row["op_rel_err"] = _rel(o, ref_op[0])
                row["op_grad_rel_err"] = max(_rel(a, b) for a, b in zip(og, ref_op[1]))
            if name != "xla":
                errs = ("max_rel_err_out", "max_rel_err_grad", "op_rel_err", "op_grad_rel_err")
                row["ok"] = all(x in row and row[x] < TOL for x in errs)
        except Exception as e:  # one failing variant must not cost the others' numbers
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print(row, flush=True)
        rows.append(row)
        on_row(rows)
    return rows


def table(rows, meta) -> str:
    cols = [("prep_fwd_ms", "prepare fwd"), ("prep_fwd_bwd_ms", "prepare fwd+bwd"), ("op_fwd_ms", "op fwd")]
    for sfx, what in (("", ""), ("_remat", " (prepare remat)"), ("_keep", " (prepare kept)")):
        if any(f"op_fwd_bwd{sfx}_ms" in r for r in rows):
            cols += [(f"op_fwd_bwd{sfx}_ms", f"op fwd+bwd{what}"), (f"op_fwd_bwd{sfx}_temp_mb", f"temp MiB{what}")]
    lines = ["# Gated delta rule prepare stage: XLA vs fused Pallas, median ms", "",
             "meta: " + ", ".join(f"{k}={v}" for k, v in meta.items()), "",
             "| B, T, H, D | impl | " + " | ".join(c[1] for c in cols)
             + " | max rel err vs XLA: out / grad / op out / op grad | ok |",
             "|---" * (len(cols) + 4) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['B']}, {r['T']}, {r['H']}, {r['D']} | {r['impl']} | error: "
                         f"{r['error'][:160]} |" + " |" * (len(cols) + 1))
            continue
        cells = [f"{r[c]:.3f}" if c in r else "-" for c, _ in cols]
        errs = " / ".join(f"{r[x]:.1e}" for x in ("max_rel_err_out", "max_rel_err_grad", "op_rel_err",
                                                   "op_grad_rel_err") if x in r)
        lines.append(f"| {r['B']}, {r['T']}, {r['H']}, {r['D']} | {r['impl']} | " + " | ".join(cells)
                     + f" | {errs or '(reference)'} | {r.get('ok', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for bench_gdn_prepare.{md,json}")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the interpreter (CPU check)")
    ap.add_argument("--variants", default=None,
                    help=f"';'-separated kernel tunables (default on a GPU: {DEFAULT_VARIANTS!r}; --smoke: defaults)")
    ap.add_argument("--remat", choices=("both", "on", "off", "default"), default="both",
                    help="the op's remat_prepare in its fwd+bwd timings (both: one timing each)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    variants = parse_variants(args.variants if args.variants is not None else ("" if args.smoke else DEFAULT_VARIANTS))
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    reps, warmup = (1, 1) if args.smoke else (args.reps, args.warmup)
    c = SMOKE_CHUNK if args.smoke else 64
    if not args.smoke and not on_gpu:
        raise SystemExit("the full benchmark needs a GPU; use --smoke on a CPU")
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), jax=jax.__version__,
                python=platform.python_version(), dtype="bfloat16", chunk_size=c,
                shapes=[list(s) for s in shapes], reps=reps, warmup=warmup, interpret=not on_gpu)
    rows = []

    def write(new_rows):  # after every row, so that a run cut short keeps what it measured
        md = table(rows + new_rows, meta)
        with open(os.path.join(args.out, "bench_gdn_prepare.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "bench_gdn_prepare.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows + new_rows), f, indent=1)
        return md

    for (B, T, H, D) in shapes:
        rows += bench_shape(B, T, H, D, variants, c=c, dtype=jnp.bfloat16, reps=reps, warmup=warmup,
                            interpret=not on_gpu, remat=args.remat, on_row=write)
    print(write([]))
    return rows


if __name__ == "__main__":
    main()
