"""MQAR sweep: 2-layer models per arch, d_model and (sequence length, kv pairs), best eval accuracy over learning rates.

    python experiments/mqar_sweep.py --grid=cpu  --out=experiments/results   # the reduced grid this CPU can run
    python experiments/mqar_sweep.py --grid=full --out=DIR                   # the issue's grid (accelerator)

Each run is ``python -m chimera_jax.train --config=configs/mqar.py:arch=..,d_model=..,seq_len=..,num_kv_pairs=..``
in its own work directory (a finished run is not trained again). Writes ``mqar_sweep.{md,json,png}`` to --out:
the table of best accuracy per cell (with the learning rate that gave it), the gap of every arch to dense, and
the grid cells that were not run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("dense", "chimera", "mamba2", "gdn", "sliding")  # the run order: the key comparison first
FULL = dict(d_models=(64, 128, 256), settings=((64, 4), (128, 8), (256, 16), (512, 64)),
            lrs=(3e-4, 1e-3, 3e-3), steps=4000, batch_size=64, vocab_size=8192)
# The busy 2-core CPU grid: one width, the shortest setting, one learning rate, a small vocabulary, short runs.
CPU = dict(d_models=(64,), settings=((64, 4),), lrs=(3e-3,), steps=1000, batch_size=32, vocab_size=256)


def run_one(arch, d, seq_len, pairs, lr, grid, root, timeout):
    name = f"{arch}_d{d}_L{seq_len}_P{pairs}_lr{lr:g}_s{grid['steps']}_b{grid['batch_size']}_v{grid['vocab_size']}"
    workdir = os.path.join(root, name)
    variant = (f"arch={arch},d_model={d},seq_len={seq_len},num_kv_pairs={pairs},lr={lr},steps={grid['steps']},"
               f"batch_size={grid['batch_size']},vocab_size={grid['vocab_size']}")
    metrics = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    if not _final_eval(metrics):
        env = dict(os.environ, PYTHONPATH=REPO)
        proc = subprocess.run([sys.executable, "-m", "chimera_jax.train", f"--config=configs/mqar.py:{variant}",
                               f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode:
            return dict(name=name, arch=arch, d_model=d, seq_len=seq_len, num_kv_pairs=pairs, lr=lr,
                        error=proc.stderr[-2000:])
    ev = _final_eval(metrics) or {}
    return dict(name=name, arch=arch, d_model=d, seq_len=seq_len, num_kv_pairs=pairs, lr=lr,
                accuracy=ev.get("eval/accuracy"), loss=ev.get("eval/loss"), seconds=round(time.time() - t0, 1))


def _final_eval(path):
    if not os.path.exists(path):
        return None
    evals = [json.loads(line) for line in open(path) if '"eval/accuracy"' in line]
    return evals[-1] if evals else None


def report(rows, grid, grid_name, out):
    best = {}
    for r in rows:
        if r.get("accuracy") is None:
            continue
        key = (r["arch"], r["d_model"], r["seq_len"], r["num_kv_pairs"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    cells = [(d, L, P) for d in grid["d_models"] for (L, P) in grid["settings"]]
    lines = [f"# MQAR sweep ({grid_name} grid)", "",
             f"2-layer models; vocab {grid['vocab_size']}, {grid['steps']} steps of batch {grid['batch_size']}, "
             f"learning rates {list(grid['lrs'])} (best shown). Accuracy = eval accuracy on the query positions of "
             f"{4 * grid['batch_size']} held-out rows.", "",
             "| arch | " + " | ".join(f"d={d} L={L} P={P}" for d, L, P in cells) + " |",
             "|---|" + "---|" * len(cells)]
    for arch in ARCHS:
        vals = []
        for d, L, P in cells:
            r = best.get((arch, d, L, P))
            vals.append("not run" if r is None else f"{100 * r['accuracy']:.1f}% (lr {r['lr']:g})")
        lines.append(f"| {arch} | " + " | ".join(vals) + " |")
    lines += ["", "Gap to dense (points):", ""]
    for arch in ARCHS:
        if arch == "dense":
            continue
        gaps = []
        for d, L, P in cells:
            a, b = best.get((arch, d, L, P)), best.get(("dense", d, L, P))
            gaps.append("-" if a is None or b is None else f"{100 * (a['accuracy'] - b['accuracy']):+.1f}")
        lines.append(f"- {arch}: " + ", ".join(f"d={d} L={L} P={P}: {g}" for (d, L, P), g in zip(cells, gaps)))
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Failed runs:", ""] + [f"- {r['name']}: {r['error'][-300:]!r}" for r in errors]
    not_run = [(d, L, P) for d in FULL["d_models"] for (L, P) in FULL["settings"] if (d, L, P) not in cells]
    if not_run:
        lines += ["", "Not run here (the issue's full grid; `--grid=full` on an accelerator): d_model x (L, P) = "
                  + ", ".join(f"{d}x({L},{P})" for d, L, P in not_run)
                  + f"; learning rates {list(FULL['lrs'])}; vocab {FULL['vocab_size']}; {FULL['steps']} steps."]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "mqar_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "mqar_sweep.json"), "w") as f:
        json.dump(dict(grid=grid_name, config=grid, runs=rows), f, indent=1)
    _plot(best, grid, os.path.join(out, "mqar_sweep.png"))
    print("\n".join(lines))


def _plot(best, grid, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = grid["d_models"]
    fig, axes = plt.subplots(1, len(ds), figsize=(4.5 * len(ds), 3.6), squeeze=False)
    for ax, d in zip(axes[0], ds):
        for arch in ARCHS:
            pts = [(L, best[(arch, d, L, P)]["accuracy"]) for L, P in grid["settings"] if (arch, d, L, P) in best]
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=arch)
        ax.set_xscale("log", base=2)
        ax.set_xticks([L for L, _ in grid["settings"]], [f"{L}/{P}" for L, P in grid["settings"]])
        ax.set_xlabel("sequence length / kv pairs")
        ax.set_ylabel("MQAR accuracy (%)")
        ax.set_ylim(0, 102)
        ax.set_title(f"d_model = {d}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=("cpu", "full"), default="cpu")
    p.add_argument("--out", default=os.path.join(REPO, "experiments", "results"))
    p.add_argument("--workdirs", default=os.path.join(REPO, "workdirs", "mqar_sweep"))
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--steps", type=int, default=0, help="override the grid's steps")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    args = p.parse_args(argv)
    grid = dict(CPU if args.grid == "cpu" else FULL)
    if args.steps:
        grid["steps"] = args.steps
    archs = [a for a in args.archs.split(",") if a]
    rows = []
    for d, (L, P), lr, arch in itertools.product(grid["d_models"], grid["settings"], grid["lrs"], archs):
        r = run_one(arch, d, L, P, lr, grid, args.workdirs, args.timeout)
        print(json.dumps(r)[:300], flush=True)
        rows.append(r)
        report(rows, grid, args.grid, args.out)  # the table is current after every run


if __name__ == "__main__":
    main()
