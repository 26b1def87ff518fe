"""Compile time of the LM train step, unrolled layers against ``model.scan_layers``, for each remat policy.

    python experiments/bench_compile.py --arch=gdn --size=350m --seq_len=256 --batch=2 --out=experiments/results

The step is the one train.py runs (``stages.build(config).train_step``), lowered and compiled on abstract
inputs: no parameters are allocated, so a large preset costs only its compile. Times are wall-clock seconds of
``jit(...).lower`` and ``.compile()``, each once (a compile is not repeatable within one process: the cache
would answer the second). Writes bench_compile.{md,json} with device and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from chimera_jax import stages  # noqa: E402
from configs import lm as lm_configs  # noqa: E402


def compile_one(arch: str, size: str, seq_len: int, batch: int, remat: str, scan: bool) -> dict:
    c = lm_configs.get_config(f"arch={arch},size={size}")
    c.data.source = "synthetic"
    c.data.seq_len, c.data.batch_size = seq_len, batch
    c.model.dtype = "bfloat16"
    c.model.remat, c.model.scan_layers = remat, scan
    stage = stages.build(c)
    rng = jax.random.PRNGKey(0)
    state = jax.eval_shape(lambda r: nn.meta.unbox(stage.init(r)), rng)
    batch_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), next(stage.data.train))
    t0 = time.perf_counter()
    lowered = jax.jit(stage.train_step).lower(state, batch_spec, rng)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return dict(arch=arch, size=size, layers=c.model.num_layers, remat=remat, scan_layers=scan,
                lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="gdn")
    ap.add_argument("--size", default="350m")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--remats", default="none,full,dots")
    ap.add_argument("--out", default="experiments/results")
    a = ap.parse_args()
    rows = []
    for remat in a.remats.split(","):
        for scan in (False, True):
            row = compile_one(a.arch, a.size, a.seq_len, a.batch, remat, scan)
            print(row, flush=True)
            rows.append(row)
    meta = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                flax=flax.__version__, python=platform.python_version(), seq_len=a.seq_len, batch=a.batch,
                command="python experiments/bench_compile.py "
                        + " ".join(x for x in sys.argv[1:] if not x.startswith("--out")))  # no local paths
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_compile.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# Train-step compile time, {a.arch} {a.size}: unrolled layers vs model.scan_layers (seconds)", "",
             "meta: " + ", ".join(f"{k}={v}" for k, v in meta.items()), "",
             "| remat | layers | unrolled lower | unrolled compile | scanned lower | scanned compile | compile ratio |",
             "|---|---|---|---|---|---|---|"]
    for remat in a.remats.split(","):
        u = next(r for r in rows if r["remat"] == remat and not r["scan_layers"])
        s = next(r for r in rows if r["remat"] == remat and r["scan_layers"])
        lines.append(f"| {remat} | {u['layers']} | {u['lower_s']} | {u['compile_s']} | {s['lower_s']} | "
                     f"{s['compile_s']} | {u['compile_s'] / max(s['compile_s'], 1e-9):.1f}x |")
    with open(os.path.join(a.out, "bench_compile.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
