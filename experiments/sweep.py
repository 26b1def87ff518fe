"""Config-swap sweeps: one base config, axes of overrides, every point trained in turn, one table and plots.

    python experiments/sweep.py experiments/sweeps/example_lm.py                   # run each point, then collect
    python experiments/sweep.py experiments/sweeps/example_lm.py --print_commands  # one train.py command per point
    python experiments/sweep.py experiments/sweeps/example_lm.py --collect_only    # table + plots from what exists

A sweep file is a small Python file with ``get_sweep()`` returning a dict:

    name    the sweep's name (results go to experiments/results/sweeps/NAME, runs to workdirs/sweeps/NAME)
    base    a config spec as train.py takes it, e.g. "configs/lm.py:arch=dense,size=tiny"
    fixed   {dotted field: value} applied to every point (e.g. a short total_steps)
    axes    {dotted field: [values]}; mode "product" (every combination) or "zip" (the i-th values together)
    points  instead of axes: an explicit list of {dotted field: value} dicts, one per point
    metric  the final metric compared across points (default "eval/bpb"; lower is better unless maximize=True)

Each point trains in its own workdir; a point is finished when its metrics.jsonl has a row at its config's
total_steps, and finished points are skipped on re-run (an unfinished one resumes from its last checkpoint, since
train.py resumes any workdir). The collected table (CSV + markdown), the long-format curves and the PNG plots are
written to the output directory.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python experiments/sweep.py`: make chimera_jax and configs importable
    sys.path.insert(0, REPO)

from chimera_jax import config_lib  # noqa: E402

FINAL_COLUMNS = ("train/loss", "eval/loss", "eval/bpb", "eval/accuracy")


@dataclasses.dataclass
class Sweep:
    name: str
    base: str
    fixed: dict[str, Any]
    points: list[dict[str, Any]]   # the overrides of each point (without ``fixed``)
    axes: list[str]                # the dotted fields that vary, in column order
    metric: str = "eval/bpb"
    maximize: bool = False


@dataclasses.dataclass
class Point:
    index: int
    name: str
    overrides: dict[str, Any]


def load_module(path: str, name: str = "_loaded"):
    """Imports a Python file by path (relative to the working directory, else to the repository root)."""
    for candidate in (path, os.path.join(REPO, path)):
        if os.path.exists(candidate):
            spec = importlib.util.spec_from_file_location(name, candidate)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise FileNotFoundError(f"{path} not found (relative to {os.getcwd()} or {REPO})")


def load_config(spec: str, overrides: dict[str, Any] | None = None):
    """'configs/lm.py:arch=dense,size=tiny' -> the locked ConfigDict, with dotted ``overrides`` applied."""
    path, _, arg = spec.partition(":")
    config = load_module(path, "_config_" + os.path.basename(path).removesuffix(".py")).get_config(arg or None)
    config_lib.apply_overrides(config, overrides or {})
    return config


def load_sweep(path: str) -> Sweep:
    spec = load_module(path, "_sweep").get_sweep()
    unknown = set(spec) - {"name", "base", "fixed", "axes", "mode", "points", "metric", "maximize"}
    if unknown:
        raise ValueError(f"sweep file {path}: unknown keys {sorted(unknown)}")
    for key in ("name", "base"):
        if key not in spec:
            raise ValueError(f"sweep file {path}: get_sweep() must give {key!r}")
    axes, points = spec.get("axes"), spec.get("points")
    if bool(axes) == bool(points):
        raise ValueError(f"sweep file {path}: give exactly one of 'axes' (with mode) or 'points'")
    if axes:
        mode = spec.get("mode", "product")
        keys = list(axes)
        if mode == "product":
            combos = list(itertools.product(*(axes[k] for k in keys)))
        elif mode == "zip":
            lengths = {k: len(v) for k, v in axes.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"sweep file {path}: mode 'zip' needs axes of equal length, got {lengths}")
            combos = list(zip(*(axes[k] for k in keys)))
        else:
            raise ValueError(f"sweep file {path}: mode must be 'product' or 'zip', got {mode!r}")
        points = [dict(zip(keys, combo)) for combo in combos]
    else:
        keys = list(dict.fromkeys(k for p in points for k in p))
    return Sweep(name=spec["name"], base=spec["base"], fixed=dict(spec.get("fixed", {})), points=points,
                 axes=keys, metric=spec.get("metric", "eval/bpb"), maximize=bool(spec.get("maximize", False)))


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else (f"{value:g}" if isinstance(value, float) else str(value))
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)


def point_list(sweep: Sweep) -> list[Point]:
    """Points named by index and their axis values (the last part of each dotted field), e.g. 01_d_model=64."""
    out = []
    for i, overrides in enumerate(sweep.points):
        label = "_".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in overrides.items())
        out.append(Point(i, f"{i:02d}_{label}"[:120], overrides))
    return out


def point_config(sweep: Sweep, point: Point):
    return load_config(sweep.base, {**sweep.fixed, **point.overrides})


def read_rows(workdir: str) -> list[dict[str, float]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill; the resumed run rewrites it
                    pass
    return rows


def is_finished(workdir: str, total_steps: int) -> bool:
    return any(r.get("step", -1) >= total_steps for r in read_rows(workdir))


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def train_command(sweep: Sweep, point: Point, workdir: str) -> list[str]:
    """The train.py command line of one point (the same run as the in-process one)."""
    args = [sys.executable, "-m", "chimera_jax.train", f"--config={sweep.base}", f"--workdir={workdir}"]
    args += [f"--config.{k}={_flag_value(v)}" for k, v in {**sweep.fixed, **point.overrides}.items()]
    return args


def run_point(sweep: Sweep, point: Point, workdir: str, *, subprocess_mode: bool) -> None:
    if subprocess_mode:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(train_command(sweep, point, workdir), cwd=REPO, env=env)
        if proc.returncode:
            raise RuntimeError(f"train.py exited {proc.returncode}")
        return
    from chimera_jax.training import loop  # imported late: --print_commands needs no JAX

    loop.train(point_config(sweep, point), workdir)


def run(sweep: Sweep, workdir_root: str, *, subprocess_mode: bool = False, only: set[int] | None = None,
        log=print) -> dict[str, str]:
    """Trains every unfinished point in turn; returns {point name: 'trained' | 'skipped' | 'failed: ...'}."""
    status = {}
    for point in point_list(sweep):
        if only is not None and point.index not in only:
            continue
        workdir = os.path.join(workdir_root, point.name)
        total = point_config(sweep, point).total_steps
        if is_finished(workdir, total):
            log(f"[{point.name}] finished earlier, skipped")
            status[point.name] = "skipped"
            continue
        log(f"[{point.name}] training {point.overrides} -> {workdir}")
        t0 = time.time()
        try:
            run_point(sweep, point, workdir, subprocess_mode=subprocess_mode)
        except Exception as e:  # one broken point must not stop the sweep; its error goes into the table
            status[point.name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            log(f"[{point.name}] {status[point.name]}")
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, "sweep_error.txt"), "w") as f:
                f.write(status[point.name] + "\n")
            continue
        status[point.name] = "trained" if is_finished(workdir, total) else "interrupted"
        log(f"[{point.name}] {status[point.name]} in {time.time() - t0:.1f}s")
    return status


def _last(rows, key):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def summarize(sweep: Sweep, workdir_root: str) -> list[dict[str, Any]]:
    """One row per point: its axis values, status, last step and final metrics."""
    table = []
    for point in point_list(sweep):
        workdir = os.path.join(workdir_root, point.name)
        rows = read_rows(workdir)
        total = point_config(sweep, point).total_steps
        err_path = os.path.join(workdir, "sweep_error.txt")
        if is_finished(workdir, total):
            status = "done"
        elif os.path.exists(err_path):
            status = "failed"
        elif rows:
            status = "partial"
        else:
            status = "not run"
        row = {"point": point.name, **{k: point.overrides.get(k, "") for k in sweep.axes}, "status": status,
               "step": max((r["step"] for r in rows), default=0)}
        for key in FINAL_COLUMNS:
            row[key] = _last(rows, key)
        if sweep.metric not in row:
            row[sweep.metric] = _last(rows, sweep.metric)
        rates = [r["perf/tokens_per_sec"] for r in rows if "perf/tokens_per_sec" in r][1:]  # first holds compile
        row["tokens/s"] = statistics.median(rates) if rates else None
        table.append(row)
    return table


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def write_outputs(sweep: Sweep, workdir_root: str, out_dir: str) -> dict[str, str]:
    """results.csv, results.md, curves.csv (step, point, metric, value), loss_curves.png, final_metric.png."""
    os.makedirs(out_dir, exist_ok=True)
    table = summarize(sweep, workdir_root)
    columns = list(table[0]) if table else []
    paths = {k: os.path.join(out_dir, f) for k, f in
             dict(csv="results.csv", md="results.md", curves="curves.csv", loss_png="loss_curves.png",
                  final_png="final_metric.png").items()}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in table)

    done = [r for r in table if r[sweep.metric] is not None and r["status"] == "done"]
    best = (max if sweep.maximize else min)(done, key=lambda r: r[sweep.metric]) if done else None
    lines = [f"# Sweep {sweep.name}", "", f"base: `{sweep.base}`", ""]
    if sweep.fixed:
        lines += ["fixed: " + ", ".join(f"`{k}={v}`" for k, v in sweep.fixed.items()), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [_fmt(row[c]) for c in columns]
        if row is best:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    if best:
        lines += ["", f"best {sweep.metric}: **{best['point']}** ({_fmt(best[sweep.metric])})"]
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")

    curves = {}
    with open(paths["curves"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["point", "step", "metric", "value"])
        for point in point_list(sweep):
            rows = read_rows(os.path.join(workdir_root, point.name))
            curves[point.name] = rows
            for r in rows:
                for k, v in r.items():
                    if k != "step":
                        writer.writerow([point.name, r["step"], k, v])
    _plot(sweep, table, curves, paths)
    return paths


def _plot(sweep: Sweep, table, curves, paths) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in curves.items():
        train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
        evals = [(r["step"], r[sweep.metric]) for r in rows if sweep.metric in r]
        if train:
            ax_train.plot(*zip(*train), label=name)
        if evals:
            ax_eval.plot(*zip(*evals), marker="o", label=name)
    ax_train.set(xlabel="step", ylabel="train/loss", title=f"{sweep.name}: training loss")
    ax_eval.set(xlabel="step", ylabel=sweep.metric, title=f"{sweep.name}: {sweep.metric}")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["loss_png"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(table) + 2), 4.5))
    names = [r["point"] for r in table]
    values = [r[sweep.metric] if r[sweep.metric] is not None else float("nan") for r in table]
    bars = ax.bar(range(len(names)), values, color=["tab:blue" if r["status"] == "done" else "tab:gray"
                                                    for r in table])
    for bar, v in zip(bars, values):
        if math.isfinite(v):
            ax.annotate(f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=f"final {sweep.metric}", title=f"{sweep.name}: final {sweep.metric} per point")
    finite = [v for v in values if math.isfinite(v)]
    if finite:  # zoom on the differences: the bars share a large common offset
        lo, hi = min(finite), max(finite)
        pad = max(hi - lo, 1e-3) * 0.5
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    fig.tight_layout()
    fig.savefig(paths["final_png"], dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_file")
    p.add_argument("--out", help="results directory (default experiments/results/sweeps/NAME)")
    p.add_argument("--workdir_root", help="where the runs live (default workdirs/sweeps/NAME)")
    p.add_argument("--print_commands", action="store_true", help="print one train.py command per unfinished point")
    p.add_argument("--collect_only", action="store_true", help="only (re)write the table and plots")
    p.add_argument("--subprocess", action="store_true", help="run each point as `python -m chimera_jax.train`")
    p.add_argument("--only", help="comma-separated point indices to run (default: all)")
    args = p.parse_args(argv)

    sweep = load_sweep(args.sweep_file)
    out = args.out or os.path.join(REPO, "experiments", "results", "sweeps", sweep.name)
    root = os.path.abspath(args.workdir_root or os.path.join(REPO, "workdirs", "sweeps", sweep.name))
    if args.print_commands:
        for point in point_list(sweep):
            workdir = os.path.join(root, point.name)
            if not is_finished(workdir, point_config(sweep, point).total_steps):
                print("python " + shlex.join(train_command(sweep, point, workdir)[1:]))
        return 0
    status = {}
    if not args.collect_only:
        only = {int(i) for i in args.only.split(",")} if args.only else None
        status = run(sweep, root, subprocess_mode=args.subprocess, only=only)
    paths = write_outputs(sweep, root, out)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 1 if any(s.startswith("failed") for s in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
