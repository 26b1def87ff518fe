"""Training throughput of the LM presets on one accelerator: tokens/s, MFU and peak memory.

    python experiments/bench_train.py --sizes=125m,350m,1p3b --arch=dense --out=experiments/results

Each preset trains on synthetic tokens at sequence 2048 x batch 8 in bf16 (the shape jax-linear-attention's
trainer was measured at), through the same stage and train_step that train.py runs; steps are timed after a
warm-up with block_until_ready and the median is reported. MFU uses the PaLM FLOP count (6 N + 12 L h k T per
token) over the device's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from chimera_jax import stages  # noqa: E402
from chimera_jax.training import metrics as metrics_lib, sharding  # noqa: E402
from configs import lm as lm_configs  # noqa: E402


def bench_one(arch: str, size: str, seq_len: int, batch: int, steps: int, remat: str, extra: dict) -> dict:
    c = lm_configs.get_config(f"arch={arch},size={size}")
    c.data.source = "synthetic"
    c.data.seq_len, c.data.batch_size = seq_len, batch
    c.model.dtype = "bfloat16"
    c.model.remat = remat
    for k, v in extra.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    mesh = sharding.make_mesh(c.mesh)
    rules = list(sharding.LOGICAL_RULES)
    stage = stages.build(c)
    shard, _ = sharding.state_shardings(stage.init, jax.random.PRNGKey(0), mesh, rules)
    with sharding.on_mesh(mesh, rules):
        state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=shard)(jax.random.PRNGKey(0))
        step = jax.jit(stage.train_step, in_shardings=(shard, sharding.batch_sharding(mesh), None),
                       out_shardings=(shard, None), donate_argnums=0)
        batches = [sharding.global_batch(next(stage.data.train), mesh) for _ in range(4)]
        t0 = time.perf_counter()
        state, m = step(state, batches[0], jax.random.PRNGKey(0))
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for i in range(3):
            state, m = step(state, batches[i % 4], jax.random.PRNGKey(i))
        jax.block_until_ready(m)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state, m = step(state, batches[i % 4], jax.random.PRNGKey(i))
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = seq_len * batch
    peak = metrics_lib.peak_flops()
    mem = jax.devices()[0].memory_stats() or {}
    return dict(arch=arch, size=size, remat=remat, seq_len=seq_len, batch=batch, params=stage.num_params,
                step_ms=med * 1e3, tokens_per_sec=tokens / med,
                mfu=(stage.flops_per_step / med / peak) if peak else None,
                tflops_per_sec=stage.flops_per_step / med / 1e12, compile_s=compile_s,
                peak_mem_gib=mem.get("peak_bytes_in_use", 0) / 2**30, loss=float(m["loss"]), **extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="dense")
    ap.add_argument("--sizes", default="125m,350m,1p3b")
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--remat", default="none", help="comma list tried in order until one fits in memory")
    ap.add_argument("--set", default="", help="extra overrides k=v;k=v (e.g. model.gdn.impl=pallas)")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--name", default="bench_train")
    args = ap.parse_args()
    extra = {}
    for kv in filter(None, args.set.split(";")):
        k, v = kv.split("=", 1)
        try:
            extra[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            extra[k] = v
    dev = jax.devices()[0]
    rows = []
    for size in args.sizes.split(","):
        for remat in args.remat.split(","):
            try:
                row = bench_one(args.arch, size, args.seq_len, args.batch, args.steps, remat, extra)
                rows.append(row)
                print(json.dumps(row), flush=True)
                break
            except Exception as e:  # out of memory: try the next remat policy
                print(f"{args.arch} {size} remat={remat}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                rows.append(dict(arch=args.arch, size=size, remat=remat, error=f"{type(e).__name__}: {str(e)[:300]}"))
    env = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__, flax=flax.__version__,
               python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=2)
    lines = [f"# {args.name}: training throughput", "",
             f"Device {env['device']}, JAX {env['jax']}, Flax {env['flax']}, {env['date']}; synthetic tokens, "
             f"bf16 compute / fp32 params, AdamW; median of {args.steps} steps after warm-up.", "",
             "| arch | size | params | seq x batch | remat | step ms | tokens/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['size']} | | | {r['remat']} | failed: {r['error'][:80]} | | | |")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            lines.append(f"| {r['arch']} | {r['size']} | {r['params'] / 1e6:.0f}M | {r['seq_len']} x {r['batch']} | "
                         f"{r['remat']} | {r['step_ms']:.1f} | {r['tokens_per_sec']:,.0f} | {mfu} | "
                         f"{r['peak_mem_gib']:.1f} |")
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
