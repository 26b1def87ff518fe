"""Ternary matmul side by side on one GPU: ours (Pallas; bf16 and int8 activations), our decode kernel
(``ours-gemv``, m <= 64, best of a tunable sweep; ``ours-gemv-default`` with ``default_tunables``), XLA's bf16 dot, XLA's int8-to-bf16 upcast dot, and the HBM
floor (bytes that must move / measured copy bandwidth).

    python experiments/bench_ternary.py OUT_DIR          # writes OUT_DIR/bench_ternary.{md,json}
    python experiments/bench_ternary.py --smoke --out=D  # tiny shapes, interpreted kernels, on CPU (tested)

Each timed call runs R products on R different weight matrices (rotating, so that the 50 MB L2 cache cannot
hold the weights) inside one jit, and reports the median over repeats divided by R. The decode kernel's
tunables are swept greedily per shape (one tunable at a time from ``default_tunables``, keeping the best value
before moving to the next; later shapes also start from the best of the first shape with the same M); the
whole sweep is the second table. ``--budget-s`` caps the sweep's own wall time (compiles included), shared over
the shapes by ``SWEEP_WEIGHT`` (a shape out of time keeps the best found so far, at least the defaults). The
default run takes about 3 minutes on an H100 host; ``--budget-s 400`` sweeps further (one command <= 10 min).
"""
import argparse
import json
import math
import platform
import sys
import time

import jax
import jax.numpy as jnp

from chimera_jax.ops.ternary import pack_ternary, ternary_matmul
from kernels_pallas.ternary_matmul.gemv import (
    MAX_FMA_M,
    MAX_M,
    default_prefetch,
    default_tunables,
    ternary_gemv,
)

MS = [1, 16, 64, 4096]
KNS = [(4096, 4096), (8192, 8192), (4096, 14336)]
# Values tried per tunable, in the order the greedy sweep visits them.
SWEEP = dict(mode=("fma", "dot"), block_n=(32, 64, 128), split_k=(1, 2, 4), num_warps=(2, 4, 8),
             groups_per_step=(1, 2, 4, 8), prefetch=(0, 1, 2), num_stages=(2, 3, 4))
SMOKE_SWEEP = dict(mode=("fma", "dot"), block_n=(16, 32), split_k=(1, 2))
SWEEP_WEIGHT = {(8192, 8192): 3}  # share of the sweep's time budget per shape (others 1)


def _median(ts):
    ts = sorted(ts)
    return ts[len(ts) // 2]


def timeit(fn, *a, n=20, warmup=3):
    for _ in range(warmup):
        jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append(time.perf_counter() - t0)
    return _median(ts)


def copy_bandwidth(nbytes):
    x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x * 1.0001)
    return 2 * x.nbytes / timeit(f, x)


def _valid(t, m, k, n):
    groups = k // 128
    # Values live per thread in one loop step (unrolled groups x prefetched steps, and in the CUDA-core mode x
    # rows x columns per thread): past the defaults' amount the compiler spills registers and takes minutes
    # (fma, 8 groups with prefetch 2: 35 s; 16 groups: 6 min to compile on a slow CPU).
    unrolled = t["groups_per_step"] * max(t["prefetch"], 1)
    if t["mode"] == "fma":
        unrolled *= m * t["block_n"] / (8 * t["num_warps"])
    else:  # the [bm bn] accumulator (64 x 128 with 2 groups a step spills)
        unrolled *= max(16, 1 << (m - 1).bit_length()) * t["block_n"] / 1024
    return (not (t["mode"] == "fma" and m > MAX_FMA_M) and n % t["block_n"] == 0 and groups % t["split_k"] == 0
            and (groups // t["split_k"]) % t["groups_per_step"] == 0 and unrolled <= 8)


def _stages(space, m, n):
    """The greedy sweep's stages: each a list of changes tried on top of the best so far. block_n and split_k
    move together (both set how many programs share the chip and how often x is re-read), limited to 64-512
    programs and tried nearest 256 programs first."""
    stages = [[dict(mode=v) for v in space.get("mode", ())]]
    pairs = [dict(block_n=b, split_k=s) for b in space.get("block_n", ()) for s in space.get("split_k", (1,))
             if 64 <= n // b * s <= 512 or n // b < 64 and s == 1]
    stages.append(sorted(pairs, key=lambda c: abs(math.log2(n // c["block_n"] * c["split_k"]) - 8)))  # ~256 first
    stages += [[{name: v} for v in space[name]] for name in space if name not in ("mode", "block_n", "split_k")]
    return stages


def sweep_gemv(m, k, n, xs, tws, R, reps, space, deadline, starts=()):
    """Greedy sweep from the defaults (and any other ``starts``); returns (best tunables, best us, rows tried)."""
    def run(t):
        f = jax.jit(lambda xs, ws: [ternary_gemv(x, w.packed, w.scale, **t) for x, w in zip(xs, ws)])
        return timeit(f, xs, tws, n=reps) / R * 1e6

    tried = {}

    def measure(t):
        key = tuple(sorted(t.items()))
        if key not in tried:
            row = dict(M=m, K=k, N=n, **t)
            try:
                row["us"] = run(t)
            except Exception as e:  # a tunable the compiler rejects (e.g. out of shared memory) is a row, not a stop
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            tried[key] = row
        return tried[key].get("us", float("inf"))

    best = default_tunables(m, k, n)
    best_us = measure(best)
    for t in starts:
        if _valid(t, m, k, n) and time.time() < deadline and (us := measure(t)) < best_us:
            best, best_us = dict(t), us
    for stage in _stages(space, m, n):
        base = best
        for change in stage:
            if time.time() > deadline:
                break
            if "prefetch" in change and base["mode"] == "dot":  # the dot mode pipelines through shared memory
                continue
            t = dict(base, **change)
            if "mode" in change:  # each mode starts from its own prefetch default
                t["prefetch"] = default_prefetch(change["mode"], m)
            while not _valid(t, m, k, n) and t["groups_per_step"] > 1 and "groups_per_step" not in change:
                t["groups_per_step"] //= 2  # fewer groups a step to fit a wider block in registers
            if t == base or not _valid(t, m, k, n):
                continue
            us = measure(t)
            if us < best_us:
                best, best_us = t, us
    return best, best_us, list(tried.values())


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out_dir", nargs="?", default=None)
    p.add_argument("--out", default=None, help="output folder (same as the positional OUT_DIR)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted kernels, few repeats (CPU)")
    p.add_argument("--budget-s", type=float, default=120.0, help="wall-time cap of the decode tunable sweep")
    args = p.parse_args(argv)
    out_dir = args.out or args.out_dir
    if not out_dir:
        p.error("give OUT_DIR or --out")
    if args.smoke:
        ms, kns, space, reps, warmup, bw_bytes = [1, 3], [(256, 128)], SMOKE_SWEEP, 2, 1, 2 ** 20
    else:
        ms, kns, space, reps, warmup, bw_bytes = MS, KNS, SWEEP, 20, 3, 2 ** 30
    sweep_left = args.budget_s  # seconds of sweeping left (the other columns' time is not counted)
    n_small = sum(m <= MAX_M for m in ms)
    weight_left = n_small * sum(SWEEP_WEIGHT.get(kn, 1) for kn in kns)
    best_at_m = {}  # the best tunables found so far per M: a second start for the next shapes
    bw = copy_bandwidth(bw_bytes)
    meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, python=platform.python_version(),
                copy_bandwidth_TBps=bw / 1e12, smoke=args.smoke)
    rows, sweep_rows = [], []
    for (K, N) in sorted(kns, key=lambda kn: -SWEEP_WEIGHT.get(kn, 1)):  # the weighted shapes sweep first
        R = 2 if args.smoke else (6 if K * N >= 8192 * 8192 else 8)
        ws = [jax.random.normal(jax.random.key(i), (K, N), jnp.float32) * 0.02 for i in range(R)]
        tws = [pack_ternary(w) for w in ws]
        wb = [w.astype(jnp.bfloat16) for w in ws]
        w8 = [jnp.clip(jnp.round(w * 2000), -127, 127).astype(jnp.int8) for w in ws]
        del ws
        for M in ms:
            xs = [jax.random.normal(jax.random.key(100 + i), (M, K), jnp.bfloat16) for i in range(R)]
            impls = {
                "ours-bf16": (lambda xs, ws: [ternary_matmul(x, w, impl="pallas") for x, w in zip(xs, ws)], tws),
                "ours-int8act": (lambda xs, ws: [ternary_matmul(x, w, impl="pallas", activations="int8")
                                                 for x, w in zip(xs, ws)], tws),
                # our XLA form: unpack the 2-bit codes to bf16, then XLA's dot (what impl="xla" runs)
                "ours-xla": (lambda xs, ws: [ternary_matmul(x, w, impl="xla") for x, w in zip(xs, ws)], tws),
                "xla-bf16": (lambda xs, ws: [jnp.dot(x, w) for x, w in zip(xs, ws)], wb),
                "xla-int8-upcast": (lambda xs, ws: [jnp.dot(x, w.astype(jnp.bfloat16)) for x, w in zip(xs, ws)], w8),
            }
            for name, (f, wl) in impls.items():
                row = dict(impl=name, M=M, K=K, N=N)
                try:
                    row["us"] = timeit(jax.jit(f), xs, wl, n=reps, warmup=warmup) / R * 1e6
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(row, flush=True)
                rows.append(row)
            if M <= MAX_M:
                w = SWEEP_WEIGHT.get((K, N), 1)
                t0 = time.time()
                deadline = t0 + max(0.0, sweep_left) * w / weight_left  # this shape's share of what is left
                weight_left -= w
                starts = [best_at_m[M]] if M in best_at_m else []
                best, best_us, tried = sweep_gemv(M, K, N, xs, tws, R, reps, space, deadline, starts)
                sweep_left -= time.time() - t0
                best_at_m.setdefault(M, best)
                sweep_rows += tried
                d = tried[0]  # the defaults, measured first: what ternary_matmul's dispatch runs untuned
                rows.append(dict(impl="ours-gemv-default", M=M, K=K, N=N,
                                 **({"us": d["us"]} if "us" in d else {"error": d.get("error", "?")})))
                row = dict(impl="ours-gemv", M=M, K=K, N=N, tunables=best)
                if best_us < float("inf"):
                    row["us"] = best_us
                else:
                    row["error"] = next((r["error"] for r in tried if "error" in r), "no config ran")
                print(row, flush=True)
                rows.append(row)
            floor_bytes = K * N // 4 + (K // 128) * N * 2 + M * K * 2 + M * N * 2
            rows.append(dict(impl="hbm-floor-2bit", M=M, K=K, N=N, us=floor_bytes / bw * 1e6))
        del tws, wb, w8
        lines = write(out_dir, rows, sweep_rows, meta, ms, kns)  # after every shape: a run cut short keeps its rows
    print("\n".join(lines))
    return rows, sweep_rows


def write(out_dir, rows, sweep_rows, meta, ms, kns):
    lines = report(rows, sweep_rows, meta, ms, kns)
    with open(f"{out_dir}/bench_ternary.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(f"{out_dir}/bench_ternary.json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, sweep=sweep_rows), f, indent=1)
    return lines


def report(rows, sweep_rows, meta, ms, kns):
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ratios = [("xla-bf16", "ours-bf16"), ("xla-bf16", "ours-int8act"), ("xla-bf16", "ours-xla"),
              ("xla-bf16", "ours-gemv-default"), ("xla-bf16", "ours-gemv")]
    lines = ["# Ternary matmul, median us per product (weights rotating over R copies)", "",
             "meta: " + ", ".join(f"{k}={v}" for k, v in meta.items()), "",
             "| M | K x N | " + " | ".join(impls) + " | " + " | ".join(f"{a} / {b}" for a, b in ratios) + " |",
             "|---" * (len(impls) + len(ratios) + 2) + "|"]
    for (K, N) in kns:
        for M in ms:
            get = {r["impl"]: r.get("us") for r in rows if (r["M"], r["K"], r["N"]) == (M, K, N)}
            cells = [f"{get[i]:.1f}" if get.get(i) else ("-" if i not in get else "err") for i in impls]
            ratio = lambda a, b: f"{get[a] / get[b]:.2f}x" if get.get(a) and get.get(b) else "-"
            lines.append(f"| {M} | {K} x {N} | " + " | ".join(cells) + " | " +
                         " | ".join(ratio(a, b) for a, b in ratios) + " |")
    chosen = [r for r in rows if r["impl"] == "ours-gemv" and "tunables" in r]
    if chosen:
        lines += ["", "ours-gemv tunables chosen:", ""] + [
            f"- M={r['M']} {r['K']}x{r['N']}: " + ", ".join(f"{k}={v}" for k, v in r["tunables"].items())
            for r in chosen]
    names = list(SWEEP)
    lines += ["", "## ours-gemv tunable sweep", "", "us per product; greedy, one tunable at a time from the defaults.",
              "", "| M | K x N | " + " | ".join(names) + " | us |", "|---" * (len(names) + 3) + "|"]
    for r in sweep_rows:
        us = f"{r['us']:.1f}" if "us" in r else "err"
        lines.append(f"| {r['M']} | {r['K']} x {r['N']} | " + " | ".join(str(r[k]) for k in names) + f" | {us} |")
    errs = [r for r in rows + sweep_rows if "error" in r]
    if errs:
        lines += ["", "## errors", ""] + [f"- {r.get('impl', 'gemv-sweep')} M={r['M']} {r['K']}x{r['N']}: "
                                          f"{r['error']}" for r in errs]
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
