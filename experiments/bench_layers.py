"""Forward + backward of every sequence mixer at one shape, side by side with dense attention, in one process.

    python experiments/bench_layers.py --out=experiments/results [--codes=A,SW,M2,...] [--d_model=2048 ...]

Each mixer (a layer-pattern code of chimera_jax/layers/registry.py) is built exactly as the LM builds it, from
configs/lm.py's 1p3b shapes (d_model 2048, 32 query / 8 KV heads of 64; families sized by fit_blocks_to_width),
and timed as jit(grad(sum(y^2))) with respect to its parameters and input: median of --reps after a warm-up,
block_until_ready. Memory is the compiled program's temporary allocation (XLA's memory analysis).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from chimera_jax.layers import registry  # noqa: E402
from configs import lm as lm_configs  # noqa: E402

# code -> the preset whose config carries its sub-block
ARCH_OF = {"A": "dense", "SW": "griffin", "M1": "mamba", "M2": "mamba2", "RG": "griffin", "GD": "gdn",
           "XM": "mlstm", "TM": "titans", "H": "hassm", "CH": "chimera"}


def model_cfg(code: str, d_model: int) -> ml_collections.FrozenConfigDict:
    m = lm_configs.model_config(ARCH_OF[code], "1p3b")
    m.d_model = d_model
    m.dtype = "bfloat16"
    lm_configs.fit_blocks_to_width(m)
    if code == "SW":
        m.attention.window = 1024
    return ml_collections.FrozenConfigDict(m)


def bench(code: str, b: int, t: int, d: int, reps: int) -> dict:
    cfg = model_cfg(code, d)
    mixer = registry.build_mixer(code, cfg, None, parent=None)
    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, d), jnp.bfloat16)
    variables = jax.jit(mixer.init)(jax.random.PRNGKey(1), x[:, :64])

    def loss(v, x):
        y, _ = mixer.apply(v, x)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    t0 = time.perf_counter()
    compiled = step.lower(variables, x).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    jax.block_until_ready(compiled(variables, x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(variables, x))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return dict(code=code, description=registry.MIXERS[code].description, ms=med * 1e3,
                tokens_per_sec=b * t / med, temp_gib=temp / 2**30, compile_s=compile_s,
                params=sum(v.size for v in jax.tree.leaves(variables)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--codes", default="A,SW,M1,M2,RG,GD,XM,TM,H,CH")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--d_model", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args()
    rows = []
    for code in args.codes.split(","):
        if code not in registry.MIXERS:
            continue
        try:
            row = bench(code, args.batch, args.seq_len, args.d_model, args.reps)
        except Exception as e:  # one failing mixer must not hide the others
            row = dict(code=code, error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(rows, args)  # after every mixer, so a run cut by a time limit keeps what it measured
    print(write(rows, args))


def write(rows, args) -> str:
    dev = jax.devices()[0]
    env = dict(device=dev.device_kind, jax=jax.__version__, flax=flax.__version__, date=time.strftime("%Y-%m-%d"),
               batch=args.batch, seq_len=args.seq_len, d_model=args.d_model, dtype="bfloat16")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_layers.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=2)
    base = next((r for r in rows if r.get("code") == "A" and "ms" in r), None)
    lines = ["# bench_layers: forward + backward of each mixer", "",
             f"Device {env['device']}, JAX {env['jax']}, Flax {env['flax']}, {env['date']}; "
             f"batch {args.batch} x sequence {args.seq_len} x d_model {args.d_model}, bf16 compute, fp32 params; "
             f"median of {args.reps} after warm-up.", "",
             "| code | mixer | ms (fwd+bwd) | tokens/s | vs attention | temp GiB | params |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['code']} | failed | {r['error'][:100]} | | | | |")
            continue
        ratio = f"{base['ms'] / r['ms']:.2f}x" if base else ""
        lines.append(f"| {r['code']} | {r['description']} | {r['ms']:.1f} | {r['tokens_per_sec']:,.0f} | {ratio} | "
                     f"{r['temp_gib']:.1f} | {r['params'] / 1e6:.1f}M |")
    with open(os.path.join(args.out, "bench_layers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
