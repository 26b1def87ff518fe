"""Forward + backward of the CHIMERA mixer and of each of its parts, side by side, in one process.

    python experiments/bench_chimera_parts.py --out=experiments/results          # one GPU
    python experiments/bench_chimera_parts.py --smoke --out=/tmp/parts           # tiny shapes on CPU

Why: on the H100 the whole mixer took several times the sum of its parts' separate layers (bench_layers.md). Each
row here is jit(grad(sum(y^2))) of one piece, built from the same config (configs/lm.py's chimera preset at the
given width), with the median of --reps after a warm-up:

  CH          the CHIMERA mixer as the LM builds it (router, capacity, SSM, both attention modes)
  CH/ssm      its Mamba-2 mode alone (the same sub-config)
  CH/attn     its one masked attention call over both attention modes (``attend_chunked`` with
              ``mode_visible``), random modes, Q/K/V given
  CH/route    router logits -> capacity -> modes (forward only: no gradient flows through the counts)
  A           dense attention as the LM builds it (cuDNN flash attention on GPU in bf16)
  A/xla       the written-out masked attention (``attend``) with a causal mask, Q/K/V given

Writes ``bench_chimera_parts.{md,json}`` to --out, one row per (shape, part), after every row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from chimera_jax.layers import attention as attn_lib, chimera as ch, registry  # noqa: E402
from configs import lm as lm_configs  # noqa: E402


def model_cfg(d: int, head_dim: int, window: int) -> ml_collections.FrozenConfigDict:
    m = lm_configs.model_config("chimera", "tiny")
    m.d_model = d
    m.dtype = "bfloat16"
    m.attention.head_dim = head_dim
    m.attention.num_heads = m.attention.num_kv_heads = max(1, d // head_dim)
    lm_configs.fit_blocks_to_width(m)
    m.chimera.window = window
    return ml_collections.FrozenConfigDict(m)


def timed(fn, args, reps):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    return dict(ms=1e3 * statistics.median(times), compile_s=compile_s, temp_mib=temp / 2**20)


def sq(y):
    return jnp.sum(y.astype(jnp.float32) ** 2)


def parts(cfg, b, t):
    """name -> (function, args) of every part at [b t d]."""
    d, a = cfg.d_model, cfg.attention
    kx, kq, km = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (b, t, d), jnp.bfloat16)
    out = {}
    for name, code in (("CH", "CH"), ("CH/ssm", "M2"), ("A", "A")):
        mixer = registry.build_mixer(code, cfg, None, parent=None)
        v = jax.jit(mixer.init)(jax.random.PRNGKey(1), x[:, :64])

        def loss(v, x, mixer=mixer):
            y, _ = mixer.apply(v, x, mutable=["chimera_stats"])[0] if code == "CH" else mixer.apply(v, x)
            return sq(y)
        out[name] = (jax.grad(loss, argnums=(0, 1)), (v, x))

    q = jax.random.normal(kq, (b, t, a.num_heads, a.head_dim), jnp.bfloat16)
    k = jax.random.normal(jax.random.fold_in(kq, 1), (b, t, a.num_kv_heads, a.head_dim), jnp.bfloat16)
    vv = jax.random.normal(jax.random.fold_in(kq, 2), (b, t, a.num_kv_heads, a.head_dim), jnp.bfloat16)
    mode = jax.random.randint(km, (b, t), 0, 4, jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    aux = (mode, idx, idx, jnp.zeros((b, t), jnp.int32))
    chunk = ch.query_chunk(b, a.num_heads, t, t)

    def chimera_attn(q, k, v):
        return sq(ch.attend_chunked(q, k, v, ch.mode_visible(cfg.chimera.window), aux, aux, chunk))
    out["CH/attn"] = (jax.grad(chimera_attn, argnums=(0, 1, 2)), (q, k, vv))

    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))

    def xla_attn(q, k, v):
        return sq(attn_lib.attend(q, k, v, causal))
    out["A/xla"] = (jax.grad(xla_attn, argnums=(0, 1, 2)), (q, k, vv))

    units = jnp.asarray(ch.capacity_units(cfg.chimera), jnp.int32)
    w = jax.random.normal(jax.random.fold_in(km, 1), (d, 4), jnp.float32)

    def route(x):
        chosen = jnp.argmax(x.astype(jnp.float32) @ w, axis=-1).astype(jnp.int32)
        starts = jnp.zeros((b, t), bool).at[:, 0].set(True)
        mode, before, count, over = ch.route_modes(chosen, ch.allowance(idx, units), starts,
                                                   jnp.zeros((b, 4), jnp.int32), cfg.chimera.overflow_mode)
        return mode.sum() + before.sum() + count.sum() + over.sum()
    out["CH/route"] = (route, (x,))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="64x512x128,64x256x64,8x2048x1024",
                   help="batch x seq_len x d_model, comma-separated (the MQAR shapes, then an LM shape)")
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny shapes for a CPU check")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.head_dim, args.window, args.reps = "2x32x32", 16, 8, 1
    rows = []
    for shape in args.shapes.split(","):
        b, t, d = (int(n) for n in shape.split("x"))
        cfg = model_cfg(d, min(args.head_dim, d), args.window)
        for name, (fn, fargs) in parts(cfg, b, t).items():
            try:
                row = dict(part=name, batch=b, seq_len=t, d_model=d, **timed(fn, fargs, args.reps))
            except Exception as e:  # one failing part must not hide the others
                row = dict(part=name, batch=b, seq_len=t, d_model=d, error=f"{type(e).__name__}: {str(e)[:200]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(rows, args)
    print(write(rows, args))


def write(rows, args) -> str:
    dev = jax.devices()[0]
    lines = ["# bench_chimera_parts: forward + backward of the CHIMERA mixer and its parts", "",
             f"Device {dev.device_kind} ({jax.default_backend()}), JAX {jax.__version__}; bf16 compute, fp32 params; "
             f"attention head_dim {args.head_dim}, window {args.window}; median of {args.reps} after warm-up; "
             f"CH/route is forward only.", "",
             "| batch | seq_len | d_model | part | ms | compile s | temp MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['seq_len']} | {r['d_model']} | {r['part']} | failed: "
                         f"{r['error'][:80]} | | |")
        else:
            lines.append(f"| {r['batch']} | {r['seq_len']} | {r['d_model']} | {r['part']} | {r['ms']:.3f} | "
                         f"{r['compile_s']:.1f} | {r['temp_mib']:.0f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_chimera_parts.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "bench_chimera_parts.json"), "w") as f:
        json.dump(dict(device=dev.device_kind, jax=jax.__version__, rows=rows), f, indent=1)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
