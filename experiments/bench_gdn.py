"""Gated delta rule, forward and forward + backward, bf16, side by side on one GPU (median ms after warm-up).

    python experiments/bench_gdn.py jax OUT.json   # ours (pallas, xla) and jax-linear-attention, one process
    python experiments/bench_gdn.py fla OUT.json   # fla's chunk_gated_delta_rule (PyTorch + Triton)
    python experiments/bench_gdn.py report OUT_DIR A.json B.json   # merge into OUT_DIR/bench_gdn.{md,json}
"""
import json
import platform
import sys
import time

SHAPES = [(8, 2048, 16, 128), (2, 8192, 16, 128), (4, 4096, 32, 64), (1, 32768, 8, 128)]


def _median(ts):
    ts = sorted(ts)
    return ts[len(ts) // 2]


def bench_jax(path):
    import jax
    import jax.numpy as jnp

    from chimera_jax.ops.gated_delta_rule import gated_delta_rule

    def timeit(fn, *a, n=30):
        jax.block_until_ready(fn(*a))
        for _ in range(3):
            jax.block_until_ready(fn(*a))
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t0)
        return _median(ts) * 1e3

    impls = {
        "ours-pallas": lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, impl="pallas")[0],
        # The same with the intra-chunk intermediates kept from forward to backward (more memory, no recompute).
        "ours-pallas-keep": lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, impl="pallas",
                                                                   remat_prepare=False)[0],
        "ours-xla": lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, impl="xla")[0],
    }
    try:
        from jla import ops as jla_ops
        impls["jla-mosaic_gpu"] = lambda q, k, v, g, b: jla_ops.linear_attention(
            "gated_deltanet", q, k, v, g=g, beta=b, impl="mosaic_gpu")[0]
    except Exception as e:  # the peer is optional: its absence is recorded, not fatal
        print("jax-linear-attention unavailable:", e)
    rows = []
    for (B, T, H, D) in SHAPES:
        ks = jax.random.split(jax.random.key(0), 5)
        q = jax.random.normal(ks[0], (B, T, H, D), jnp.bfloat16)
        k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32)
        k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
        v = jax.random.normal(ks[2], (B, T, H, D), jnp.bfloat16)
        g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H))) / 4
        beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))).astype(jnp.bfloat16)
        for name, f in impls.items():
            row = dict(impl=name, B=B, T=T, H=H, D=D)
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
    meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, python=platform.python_version())
    json.dump(dict(meta=meta, rows=rows), open(path, "w"), indent=1)


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
    json.dump(dict(meta=meta, rows=rows), open(path, "w"), indent=1)


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
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = ["# Gated delta rule, bf16, median ms (one process per framework, same GPU)", "",
             "meta: " + ", ".join(f"{k}={v}" for k, v in meta.items()), ""]
    for key in ("fwd_bwd_ms", "fwd_ms"):
        lines += [f"## {key}", "", "| B, T, H, D | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
        for (B, T, H, D) in SHAPES:
            cells = []
            for i in impls:
                r = [x for x in rows if x["impl"] == i and (x["B"], x["T"], x["H"], x["D"]) == (B, T, H, D)]
                cells.append(f"{r[0][key]:.3f}" if r and key in r[0] else ("err" if r else "-"))
            lines.append(f"| {B}, {T}, {H}, {D} | " + " | ".join(cells) + " |")
        lines.append("")
    errs = [r for r in rows if "error" in r]
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
    else:
        report(sys.argv[2], *sys.argv[3:])
