"""The scaling table of ``experiments/gpu_fsdp.sh``: tokens/s of train.py on one GPU and on two, from each run's
metrics.jsonl (the loop's ``perf/tokens_per_sec`` rows, median over the steady-state rows: the first row, which
holds compilation, is dropped).

    python experiments/fsdp_report.py --runs=DIR --out=experiments/results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chimera_jax.training.metrics import read_metrics  # noqa: E402

RUNS = (("gpu1", 1, "one GPU"),
        ("gpu2_fsdp", 2, "two GPUs, one process, FSDP over both"),
        ("gpu2_2proc", 2, "two GPUs, two processes (jax.distributed), FSDP over both"))


def steady_rate(workdir: str) -> tuple[float, int] | None:
    rows = [r for r in read_metrics(workdir) if "perf/tokens_per_sec" in r] if os.path.isdir(workdir) else []
    rates = [r["perf/tokens_per_sec"] for r in rows[1:]]
    return (statistics.median(rates), len(rates)) if rates else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import flax
    import jax
    gpu = open(os.path.join(a.out, "gpu.txt")).read().strip().splitlines() if os.path.exists(
        os.path.join(a.out, "gpu.txt")) else ["?"]
    rows = []
    for name, gpus, what in RUNS:
        got = steady_rate(os.path.join(a.runs, name))
        rows.append(dict(run=name, gpus=gpus, what=what, tokens_per_sec=got[0] if got else None,
                         rows=got[1] if got else 0))
    base = rows[0]["tokens_per_sec"]
    for r in rows:
        r["scaling"] = (r["tokens_per_sec"] / base) if (base and r["tokens_per_sec"]) else None
    meta = dict(devices=gpu, jax=jax.__version__, flax=flax.__version__, python=platform.python_version(),
                preset="configs/lm.py:arch=dense,size=1p3b", seq_len=2048, batch_per_gpu=8, dtype="bfloat16",
                data="synthetic")
    with open(os.path.join(a.out, "bench_fsdp.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = ["# Training on two GPUs: train.py, dense 1p3b, FSDP", "",
             f"Devices: {'; '.join(gpu)}. JAX {jax.__version__}, Flax {flax.__version__}. Sequence 2048 x batch 8 "
             "per GPU (global batch 16 on two), synthetic tokens, bf16 compute, fp32 params, AdamW, no remat. "
             "tokens/s = the loop's `perf/tokens_per_sec` (global tokens per wall second between log rows, every "
             "5 steps), median over the rows after the first. Command: `bash experiments/gpu_fsdp.sh`.", "",
             "| run | GPUs | tokens/s | steady rows | scaling vs one GPU |", "|---|---|---|---|---|"]
    for r in rows:
        tps = f"{r['tokens_per_sec']:,.0f}" if r["tokens_per_sec"] else "failed"
        sc = f"{r['scaling']:.2f}x" if r["scaling"] else "-"
        lines.append(f"| {r['what']} | {r['gpus']} | {tps} | {r['rows']} | {sc} |")
    lines += ["", "Goal: >= 1.9x one GPU for the 1.3B preset."]
    with open(os.path.join(a.out, "bench_fsdp.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
