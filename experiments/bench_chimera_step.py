"""Compile time and step time of the MQAR training step per arch: where CHIMERA's training time goes.

    python experiments/bench_chimera_step.py --out=experiments/results                 # one GPU: the sweep's shapes
    python experiments/bench_chimera_step.py --smoke --out=/tmp/bench_chimera_step      # tiny shapes on CPU

For each arch and (d_model, seq_len) it builds the stage of ``configs/mqar.py`` as ``mqar_sweep.train_inproc``
does (batch 64, vocab 8192 unless overridden) and reports, for the jitted ``train_step`` and for the
``inner``-step ``lax.scan`` that the in-process sweep dispatches: trace+lower seconds, compile seconds, the
steady-state milliseconds per optimizer step, and counts from the optimized HLO (instructions, fusions, while
loops, conditionals, sorts, gathers, scatters). Compile and step are timed apart because a run cut at a fixed
wall-clock limit cannot tell a slow compile from a slow step.

``--chimera_module=FILE`` loads the CHIMERA layer from another copy of ``chimera_jax/layers/chimera.py`` (e.g.
an older commit's, from ``git show REV:chimera_jax/layers/chimera.py > FILE``) so that two versions can be
compared in one call; rows from it are labelled ``chimera@FILE``.

Writes ``bench_chimera_step.{md,json}`` to --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

OPS = ("while", "conditional", "sort", "fusion", "gather", "scatter")


def hlo_counts(compiled) -> dict:
    text = compiled.as_text()
    counts = {op: len(re.findall(rf" {op}\(", text)) for op in OPS}
    counts["instructions"] = sum(1 for line in text.splitlines() if " = " in line)
    return counts


def use_chimera_module(path: str):
    """Makes ``chimera_jax.layers.chimera`` the module at ``path`` (the registry imports it by that name)."""
    import chimera_jax.layers as layers

    spec = importlib.util.spec_from_file_location("chimera_jax.layers.chimera", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["chimera_jax.layers.chimera"] = module
    spec.loader.exec_module(module)
    layers.chimera = module


def measure(arch, d, seq_len, *, batch, vocab, inner, repeats):
    from chimera_jax import stages
    from configs import mqar as mqar_config

    cfg = mqar_config.get_config(f"arch={arch},d_model={d},seq_len={seq_len},num_kv_pairs=4,batch_size={batch},"
                                 f"vocab_size={vocab},steps={inner * (repeats + 1)},read_threads=0")
    stage = stages.build(cfg)
    state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)))(jax.random.PRNGKey(0))
    rng = jax.random.PRNGKey(1)
    row = dict(arch=arch, d_model=d, seq_len=seq_len, batch=batch, vocab=vocab)

    # One step, as train.py jits it.
    batch0 = next(stage.data.train)
    t0 = time.perf_counter()
    lowered = jax.jit(stage.train_step).lower(state, batch0, rng)
    t1 = time.perf_counter()
    one = lowered.compile()
    t2 = time.perf_counter()
    row.update(step_lower_s=round(t1 - t0, 2), step_compile_s=round(t2 - t1, 2), **hlo_counts(one))

    # ``inner`` steps per dispatch, as mqar_sweep.train_inproc runs them.
    def many(state, batches):
        def body(s, xs):
            b, i = xs
            s, metrics = stage.train_step(s, b, jax.random.fold_in(rng, i))
            return s, metrics["loss"]
        return jax.lax.scan(body, state, (batches, jax.numpy.arange(inner)))

    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[next(stage.data.train) for _ in range(inner)])
    t0 = time.perf_counter()
    scan = jax.jit(many, donate_argnums=0).lower(state, stacked).compile()
    row["scan_compile_s"] = round(time.perf_counter() - t0, 2)
    state, loss = scan(state, stacked)
    jax.block_until_ready(loss)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, loss = scan(state, stacked)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    row["step_ms"] = round(1000 * min(times) / inner, 3)
    row["finite"] = bool(np.isfinite(np.asarray(loss)).all())
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--archs", default="dense,mamba2,chimera")
    p.add_argument("--shapes", default="64x128,64x256,128x512,256x256", help="d_model x seq_len, comma-separated")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--inner", type=int, default=100, help="optimizer steps per dispatch (the sweep's 100)")
    p.add_argument("--repeats", type=int, default=3, help="timed dispatches after the warm-up one")
    p.add_argument("--chimera_module", default="", help="also time CHIMERA from this copy of chimera.py")
    p.add_argument("--smoke", action="store_true", help="tiny shapes for a CPU check")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.batch, args.vocab, args.inner, args.repeats = "16x16", 4, 64, 2, 1
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",") if s]
    archs = [a for a in args.archs.split(",") if a]
    rows = []
    runs = [(a, None) for a in archs]
    if args.chimera_module:
        runs.append(("chimera", args.chimera_module))
    for arch, module in runs:
        if module:
            use_chimera_module(module)
        for d, seq_len in shapes:
            row = measure(arch, d, seq_len, batch=args.batch, vocab=args.vocab, inner=args.inner,
                          repeats=args.repeats)
            if module:
                row["arch"] = f"chimera@{os.path.basename(module)}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    dev = jax.devices()[0]
    head = ["arch", "d_model", "seq_len", "step_lower_s", "step_compile_s", "scan_compile_s", "step_ms",
            "instructions", "fusion", "while", "conditional", "sort", "gather", "scatter"]
    lines = ["# bench_chimera_step: MQAR train step per arch", "",
             f"Device {dev.device_kind} ({jax.default_backend()}), JAX {jax.__version__}; batch "
             f"{args.batch}, vocab {args.vocab}, 2 layers (configs/mqar.py); step_ms = best of {args.repeats} "
             f"dispatches of {args.inner} steps / {args.inner}; counts from the optimized HLO of one train_step.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_chimera_step.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "bench_chimera_step.json"), "w") as f:
        json.dump(dict(device=dev.device_kind, jax=jax.__version__, rows=rows), f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
