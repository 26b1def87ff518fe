"""Ternary matmul side by side on one GPU: ours (Pallas; bf16 and int8 activations), XLA's bf16 dot, XLA's
int8-to-bf16 upcast dot, and the HBM floor (bytes that must move / measured copy bandwidth).

    python experiments/bench_ternary.py OUT_DIR     # writes OUT_DIR/bench_ternary.{md,json}

Each timed call runs R products on R different weight matrices (rotating, so that the 50 MB L2 cache cannot
hold the weights) inside one jit, and reports the median over repeats divided by R.
"""
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp

from chimera_jax.ops.ternary import pack_ternary, ternary_matmul

MS = [1, 16, 64, 4096]
KNS = [(4096, 4096), (8192, 8192), (4096, 14336)]


def _median(ts):
    ts = sorted(ts)
    return ts[len(ts) // 2]


def timeit(fn, *a, n=20):
    for _ in range(3):
        jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append(time.perf_counter() - t0)
    return _median(ts)


def copy_bandwidth():
    x = jax.random.normal(jax.random.key(0), (256 * 2 ** 20,), jnp.float32)  # 1 GiB
    f = jax.jit(lambda x: x * 1.0001)
    return 2 * x.nbytes / timeit(f, x)


def main(out_dir):
    bw = copy_bandwidth()
    rows = []
    for (K, N) in KNS:
        R = 6 if K * N >= 8192 * 8192 else 8
        ws = [jax.random.normal(jax.random.key(i), (K, N), jnp.float32) * 0.02 for i in range(R)]
        tws = [pack_ternary(w) for w in ws]
        wb = [w.astype(jnp.bfloat16) for w in ws]
        w8 = [jnp.clip(jnp.round(w * 2000), -127, 127).astype(jnp.int8) for w in ws]
        del ws
        for M in MS:
            xs = [jax.random.normal(jax.random.key(100 + i), (M, K), jnp.bfloat16) for i in range(R)]
            impls = {
                "ours-bf16": (lambda xs, ws: [ternary_matmul(x, w, impl="pallas") for x, w in zip(xs, ws)], tws),
                "ours-int8act": (lambda xs, ws: [ternary_matmul(x, w, impl="pallas", activations="int8")
                                                 for x, w in zip(xs, ws)], tws),
                "xla-bf16": (lambda xs, ws: [jnp.dot(x, w) for x, w in zip(xs, ws)], wb),
                "xla-int8-upcast": (lambda xs, ws: [jnp.dot(x, w.astype(jnp.bfloat16)) for x, w in zip(xs, ws)], w8),
            }
            for name, (f, wl) in impls.items():
                row = dict(impl=name, M=M, K=K, N=N)
                try:
                    row["us"] = timeit(jax.jit(f), xs, wl) / R * 1e6
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(row, flush=True)
                rows.append(row)
            floor_bytes = K * N // 4 + (K // 128) * N * 2 + M * K * 2 + M * N * 2
            rows.append(dict(impl="hbm-floor-2bit", M=M, K=K, N=N, us=floor_bytes / bw * 1e6))
        del tws, wb, w8
    meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, python=platform.python_version(),
                copy_bandwidth_TBps=bw / 1e12)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = ["# Ternary matmul, median us per product (weights rotating over R copies)", "",
             "meta: " + ", ".join(f"{k}={v}" for k, v in meta.items()), "",
             "| M | K x N | " + " | ".join(impls) + " | xla-bf16 / ours-bf16 | xla-bf16 / ours-int8act |",
             "|---" * (len(impls) + 4) + "|"]
    for (K, N) in KNS:
        for M in MS:
            get = {r["impl"]: r.get("us") for r in rows if (r["M"], r["K"], r["N"]) == (M, K, N)}
            cells = [f"{get[i]:.1f}" if get.get(i) else "err" for i in impls]
            ratio = lambda a, b: f"{get[a] / get[b]:.2f}x" if get.get(a) and get.get(b) else "-"
            lines.append(f"| {M} | {K} x {N} | " + " | ".join(cells) +
                         f" | {ratio('xla-bf16', 'ours-bf16')} | {ratio('xla-bf16', 'ours-int8act')} |")
    errs = [r for r in rows if "error" in r]
    if errs:
        lines += ["", "## errors", ""] + [f"- {r['impl']} M={r['M']} {r['K']}x{r['N']}: {r['error']}" for r in errs]
    open(f"{out_dir}/bench_ternary.md", "w").write("\n".join(lines) + "\n")
    json.dump(dict(meta=meta, rows=rows), open(f"{out_dir}/bench_ternary.json", "w"), indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
