"""Gated delta rule, forward and forward + backward, bf16, side by side on one GPU (median ms after warm-up).

    python experiments/bench_gdn.py jax OUT.json   # ours (pallas, xla) and jax-linear-attention, one process
    python experiments/bench_gdn.py fla OUT.json   # fla's chunk_gated_delta_rule (PyTorch + Triton)
    python experiments/bench_gdn.py stages OUT.json  # ours, by stage: intra-chunk prepare (XLA), inter-chunk scan
                                                     # (GDN_STAGE_SWEEP: scan variants to time)
    python experiments/bench_gdn.py report OUT_DIR A.json B.json   # merge into OUT_DIR/bench_gdn.{md,json}

GDN_IMPLS=a,b limits the jax run to those implementations; GDN_PREFIX=NAME- renames them in the table (to time
an earlier checkout of the package, put it first on PYTHONPATH and give it a prefix).
"""
import functools
import json
import os
import platform
import sys
import time

SHAPES = [(8, 2048, 16, 128), (2, 8192, 16, 128), (4, 4096, 32, 64), (1, 32768, 8, 128)]
# the scan kernels' num_stages to sweep in `stages` (default: the kernels' own choice only)
STAGE_SWEEP = [None if x == "default" else int(x) for x in os.environ.get("GDN_STAGE_SWEEP", "default").split(",")]
# v-columns per scan program to time in `stages` besides the kernels' own rule (e.g. "16,32")
VB_SWEEP = [int(x) for x in os.environ.get("GDN_VB_SWEEP", "").split(",") if x]
# warps per program of the UT inverse kernel to time in `stages` besides its default (e.g. "1,2,8")
INV_WARPS = [int(x) for x in os.environ.get("GDN_INV_WARPS", "").split(",") if x]


def _median(ts):
    ts = sorted(ts)
    return ts[len(ts) // 2]


def _timeit_jax(fn, *a, n=30):
    """Median ms of ``fn(*a)`` over n runs after compilation and 3 warm-up runs."""
    import jax

    for _ in range(4):
        jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append(time.perf_counter() - t0)
    return _median(ts) * 1e3


def bench_jax(path):
    import jax
    import jax.numpy as jnp

    from chimera_jax.ops.gated_delta_rule import gated_delta_rule

    timeit = _timeit_jax
    impls = {
        # The default: the intra-chunk part differentiated in closed form, T formed again in the backward.
        "ours-pallas": lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, impl="pallas")[0],
        # The same keeping T (one [b h n c c] bf16 array) from forward to backward.
        "ours-pallas-saveinv": lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, impl="pallas",
                                                                      remat_prepare="save_inverse")[0],
        # The intra-chunk part differentiated by autodiff, its forward recomputed in the backward (the default
        # before the closed form), and with all its intermediates kept instead.
        "ours-pallas-autodiff": lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, impl="pallas",
                                                                       prepare_vjp="autodiff")[0],
        "ours-pallas-keep": lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, impl="pallas",
                                                                   prepare_vjp="autodiff", remat_prepare=False)[0],
        # The UT transform's inverse by XLA's matmul recursion instead of its Pallas kernel.
        "ours-pallas-xlainv": lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, impl="pallas",
                                                                     ut_inverse="xla")[0],
        "ours-xla": lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, impl="xla")[0],
    }
    try:
        if os.environ.get("GDN_IMPLS") and "jla-mosaic_gpu" not in os.environ["GDN_IMPLS"]:
            raise ImportError("not asked for (GDN_IMPLS)")
        from jla import ops as jla_ops
        impls["jla-mosaic_gpu"] = lambda q, k, v, g, b: jla_ops.linear_attention(
            "gated_deltanet", q, k, v, g=g, beta=b, impl="mosaic_gpu")[0]
    except Exception as e:  # the peer is optional: its absence is recorded, not fatal
        print("jax-linear-attention unavailable:", e)
    if os.environ.get("GDN_IMPLS"):
        impls = {n: f for n, f in impls.items() if n in os.environ["GDN_IMPLS"].split(",")}
    prefix = os.environ.get("GDN_PREFIX", "")
    rows = []
    for (B, T, H, D) in SHAPES:
        q, k, v, g, beta = _inputs_jax(B, T, H, D)
        for name, f in impls.items():
            row = dict(impl=prefix + name, B=B, T=T, H=H, D=D)
            try:
                fwd = jax.jit(f)
                loss = lambda *a, f=f: (f(*a).astype(jnp.float32) ** 2).sum()
                fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
                row["fwd_ms"] = timeit(fwd, q, k, v, g, beta)
                row["fwd_bwd_ms"] = timeit(fb, q, k, v, g, beta)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(row, flush=True)
            rows.append(row)
    _dump_jax(path, rows)


def _dump_jax(path, rows):
    """A jax run's rows with the device and versions, as JSON for ``report``."""
    import jax

    meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, python=platform.python_version())
    json.dump(dict(meta=meta, rows=rows), open(path, "w"), indent=1)


def _inputs_jax(B, T, H, D):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, D), jnp.bfloat16)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H))) / 4
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))).astype(jnp.bfloat16)
    return q, k, v, g, beta


def _strict_lower_a(k, beta, c=64):
    """A = strictly-lower(beta_i (k k^T)_ij) per chunk, [b h n c c] float32: the matrix the UT transform inverts."""
    import jax.numpy as jnp

    b, t, h, d = k.shape
    kc = jnp.moveaxis(k.reshape(b, t // c, c, h, d), 3, 1).astype(jnp.float32)
    bc = jnp.moveaxis(beta.reshape(b, t // c, c, h), 3, 1).astype(jnp.float32)
    kk = jnp.einsum("bhnik,bhnjk->bhnij", kc, kc)
    return jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), bc[..., :, None] * kk, 0.0)


def bench_stages(path):
    """Where the op's time goes: the intra-chunk prepare (XLA) and the inter-chunk scan (Pallas), each forward
    and forward + backward, at the benchmark's shapes."""
    import jax
    import jax.numpy as jnp

    from chimera_jax.ops import gated_delta_rule as gdr
    from chimera_jax.ops.common import resets
    from kernels_pallas.gated_delta_rule import chunk_scan as scan_mod, chunk_scan_pallas, ut_inverse

    timeit = functools.partial(_timeit_jax, n=20)

    def prep_with(q, k, v, g, beta, *, inverse, reset, D, **kw):
        return gdr.chunk_prepare(q, k, v, g, beta, reset, scale=D ** -0.5, chunk_size=64, mm_dtype=jnp.bfloat16,
                                 out_dtype=jnp.bfloat16, inverse=inverse, **kw)

    sq = lambda tree: sum((x.astype(jnp.float32) ** 2).sum() for x in jax.tree.leaves(tree))
    rows = []
    default = scan_mod.NUM_STAGES
    for (B, T, H, D) in SHAPES:
        q, k, v, g, beta = _inputs_jax(B, T, H, D)
        reset = resets(None, B, T)
        # as the op's pallas route prepares a bf16 model's chunks: bf16 operands and outputs, the Pallas inverse
        prep = functools.partial(prep_with, inverse="pallas", reset=reset, D=D)
        ci = jax.jit(prep)(q, k, v, g, beta)
        s0 = jnp.zeros((B, H, D, D), jnp.float32)
        scan = lambda ci, s0: chunk_scan_pallas(ci, s0, mm_dtype=jnp.bfloat16)
        row = dict(impl="ours-pallas-stages", B=B, T=T, H=H, D=D)
        try:
            row["prepare_fwd_ms"] = timeit(jax.jit(prep), q, k, v, g, beta)
            row["prepare_fwd_bwd_ms"] = timeit(jax.jit(jax.grad(lambda *a: sq(prep(*a)), argnums=range(5))),
                                               q, k, v, g, beta)
            # the closed-form backward forming T again, and autodiff's backward (no remat in any of the three)
            for sfx, kw in (("_recompute_t", dict(keep_inverse=False)), ("_autodiff", dict(vjp="autodiff"))):
                p_kw = functools.partial(prep_with, inverse="pallas", reset=reset, D=D, **kw)
                row["prepare_fwd_bwd_ms" + sfx] = timeit(
                    jax.jit(jax.grad(lambda *a: sq(p_kw(*a)), argnums=range(5))), q, k, v, g, beta)
            # the same prepare with XLA's inverse (the matmul recursion), and how far its U~ and W move
            p_xla = functools.partial(prep_with, inverse="xla", reset=reset, D=D)
            row["prepare_fwd_ms_xlainv"] = timeit(jax.jit(p_xla), q, k, v, g, beta)
            row["prepare_fwd_bwd_ms_xlainv"] = timeit(
                jax.jit(jax.grad(lambda *a: sq(p_xla(*a)), argnums=range(5))), q, k, v, g, beta)
            got = jax.jit(p_xla)(q, k, v, g, beta)
            row["prepare_rel_diff_xlainv"] = max(
                float(jnp.linalg.norm((a.astype(jnp.float32) - b.astype(jnp.float32)).ravel())
                      / jnp.linalg.norm(b.astype(jnp.float32).ravel())) for a, b in zip(got[:2], ci[:2]))
            # the float32 inverse alone, on an A of the prepare's shape [b h n c c]: XLA's and the kernel
            a = _strict_lower_a(k, beta)
            row["inverse_ms_xla"] = timeit(jax.jit(gdr.unit_lower_inverse), a)
            row["inverse_ms_pallas"] = timeit(ut_inverse.unit_lower_inverse_pallas, a)
            for nw in INV_WARPS:
                row[f"inverse_ms_pallas_w{nw}"] = timeit(
                    functools.partial(ut_inverse.unit_lower_inverse_pallas, num_warps=nw), a)
            for ns in STAGE_SWEEP:  # the scan kernels' load pipelining depth
                scan_mod.NUM_STAGES = ns
                sfx = "" if ns == default else f"_ns{ns}"
                f = lambda ci, s0: scan(ci, s0)  # a fresh function: traced again with this depth
                row["scan_fwd_ms" + sfx] = timeit(jax.jit(f), ci, s0)
                row["scan_fwd_bwd_ms" + sfx] = timeit(jax.jit(jax.grad(lambda ci, s0: sq(f(ci, s0)[0]))), ci, s0)
            for vb in VB_SWEEP:  # v-columns per program (more programs on the serial chain at small b*h)
                scan_mod.VBLOCK = vb
                f = lambda ci, s0: scan(ci, s0)
                row[f"scan_fwd_ms_vb{vb}"] = timeit(jax.jit(f), ci, s0)
                row[f"scan_fwd_bwd_ms_vb{vb}"] = timeit(jax.jit(jax.grad(lambda ci, s0: sq(f(ci, s0)[0]))), ci, s0)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            scan_mod.NUM_STAGES = default  # the next shape (and the caller) see the kernels' own choice
            scan_mod.VBLOCK = None
        print(row, flush=True)
        rows.append(row)
    _dump_jax(path, rows)


def bench_fla(path):
    import torch
    import triton
    import fla
    import fla.ops.common.chunk_o as chunk_o

    chunk_o.IS_NVIDIA_HOPPER = False  # timing only: fla refuses its Hopper backward with Triton 3.6 (fla #640)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    rows = []
    for (B, T, H, D) in SHAPES:
        mk = lambda *s, dt=torch.bfloat16: torch.randn(*s, device="cuda", dtype=dt)
        q = mk(B, T, H, D).requires_grad_()
        k = torch.nn.functional.normalize(mk(B, T, H, D, dt=torch.float32), dim=-1).bfloat16().requires_grad_()
        v = mk(B, T, H, D).requires_grad_()
        g = torch.nn.functional.logsigmoid(mk(B, T, H, dt=torch.float32)).div(4).requires_grad_()
        beta = mk(B, T, H, dt=torch.float32).sigmoid().bfloat16().requires_grad_()
        do = mk(B, T, H, D)
        f = lambda: chunk_gated_delta_rule(q, k, v, g, beta)[0]

        def fb():
            chunk_gated_delta_rule(q, k, v, g, beta)[0].backward(do)

        row = dict(impl="fla", B=B, T=T, H=H, D=D,
                   fwd_ms=triton.testing.do_bench(f, warmup=25, rep=300, return_mode="median"),
                   fwd_bwd_ms=triton.testing.do_bench(fb, warmup=25, rep=300, return_mode="median"))
        print(row, flush=True)
        rows.append(row)
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    fla=getattr(fla, "__version__", "?"))
        json.dump(dict(meta=meta, rows=rows), open(path, "w"), indent=1)  # after every shape: a timeout keeps them


def report(out_dir, *parts):
    rows, meta = [], {}
    for p in parts:
        try:
            d = json.load(open(p))
        except Exception as e:
            print("missing part", p, e)
            continue
        rows += d["rows"]
        meta.update(d["meta"])
    stages = [r for r in rows if "prepare_fwd_ms" in r]
    rows = [r for r in rows if r not in stages]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = ["# Gated delta rule, bf16, median ms (one process per framework, same GPU)", "",
             "meta: " + ", ".join(f"{k}={v}" for k, v in meta.items()), ""]
    for key in ("fwd_bwd_ms", "fwd_ms") if impls else ():
        lines += [f"## {key}", "", "| B, T, H, D | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
        for (B, T, H, D) in SHAPES:
            cells = []
            for i in impls:
                r = [x for x in rows if x["impl"] == i and (x["B"], x["T"], x["H"], x["D"]) == (B, T, H, D)]
                cells.append(f"{r[0][key]:.3f}" if r and key in r[0] else ("err" if r else "-"))
            lines.append(f"| {B}, {T}, {H}, {D} | " + " | ".join(cells) + " |")
        lines.append("")
    if stages:
        keys = ("prepare_fwd_ms", "prepare_fwd_bwd_ms", "scan_fwd_ms", "scan_fwd_bwd_ms")
        keys += tuple(sorted({k for r in stages for k in r if k.startswith(("scan_", "prepare_", "inverse_")) and k not in keys}))
        lines += ["## ours-pallas by stage, ms (intra-chunk prepare: XLA with the Pallas UT inverse; inter-chunk scan: Pallas)", "",
                  "| B, T, H, D | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for r in stages:
            lines.append(f"| {r['B']}, {r['T']}, {r['H']}, {r['D']} | "
                         + " | ".join(f"{r[k]:.3g}" if k in r else "err" for k in keys) + " |")
        lines.append("")
    errs = [r for r in rows + stages if "error" in r]
    if errs:
        lines += ["## errors", ""] + [f"- {r['impl']} {r['B']},{r['T']},{r['H']},{r['D']}: {r['error']}" for r in errs]
    open(f"{out_dir}/bench_gdn.md", "w").write("\n".join(lines) + "\n")
    json.dump(dict(meta=meta, rows=rows), open(f"{out_dir}/bench_gdn.json", "w"), indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    which = sys.argv[1]
    if which == "jax":
        bench_jax(sys.argv[2])
    elif which == "fla":
        bench_fla(sys.argv[2])
    elif which == "stages":
        bench_stages(sys.argv[2])
    else:
        report(sys.argv[2], *sys.argv[3:])
