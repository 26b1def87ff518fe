"""MQAR sweep: 2-layer models per arch, d_model and (sequence length, kv pairs), best eval accuracy over learning rates.

    python experiments/mqar_sweep.py --grid=cpu  --out=experiments/results     # the reduced grid this CPU can run
    python experiments/mqar_sweep.py --grid=full --out=DIR --parallel=12 --budget_s=330   # one GPU: gpu_mqar.sh

Each run is ``python -m chimera_jax.train --config=configs/mqar.py:arch=..,d_model=..,seq_len=..,num_kv_pairs=..``
in its own work directory (a finished run is not trained again). ``--parallel=N`` keeps N runs going at once, each
capped at about 1/N of the accelerator's memory. Runs start in order of importance (``plan``): dense and chimera
in every cell at the first learning rate, then at the others, then the remaining archs likewise, so that a
``--budget_s`` cut (no run starts after it; runs already going finish, each within ``--timeout``) drops the least
important runs. Writes ``mqar_sweep.{md,json,png}`` to --out after every run: the table of best accuracy per cell
(with the learning rate that gave it), the gap of every arch to dense, the runs that failed or were not run.

``--engine=inproc`` (what ``gpu_mqar.sh`` uses) trains the runs one after another inside the sweep's own process
with the same config, stage, train_step and eval as ``chimera_jax.train`` but many steps per dispatch
(``train_inproc``), stopping a run early once it reaches 99.5%; ``--shard=i/n`` splits the runs over n such
processes sharing one accelerator, and ``--report_only --merge=a.json,b.json,...`` joins their tables. Tiny models
on a GPU are bound by the host round trip per step, and a dozen processes time-slicing one GPU slowed every run to
a crawl: the first full-grid call (12 ``train.py`` processes) finished only the smallest cells in 9 minutes.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("dense", "chimera", "mamba2", "gdn", "sliding")
KEY_ARCHS = ("dense", "chimera")  # the comparison the sweep exists for: these run first
# Named variants of an arch (``--variant=NAME=ARCH:key=value:...``, keys of configs/mqar.py): NAME -> (ARCH, extra
# config variant string); their rows sit in the table under NAME, e.g. CHIMERA with a slower balancer.
VARIANTS: dict[str, tuple[str, str]] = {}


def config_variant(job, grid) -> str:
    """The ``configs/mqar.py`` variant string of one run (a named variant expands to its arch and extra keys)."""
    arch, extra = VARIANTS.get(job["arch"], (job["arch"], ""))
    fields = dict(job, arch=arch)
    fields.update((k, grid[k]) for k in ("steps", "batch_size", "vocab_size", "evals") if k in grid)
    return ",".join(f"{k}={v}" for k, v in fields.items()) + (f",{extra}" if extra else "")


def parse_variant(spec: str) -> tuple[str, str, str]:
    """'NAME=ARCH:key=value:key=value' -> (NAME, ARCH, 'key=value,key=value')."""
    name, sep, rest = spec.partition("=")
    arch, *pairs = rest.split(":")
    if not sep or not name or arch not in ARCHS or any("=" not in kv for kv in pairs):
        raise ValueError(f"--variant={spec!r}: expected NAME=ARCH:key=value:... with ARCH one of {list(ARCHS)}")
    return name, arch, ",".join(pairs)
# lrs are in order of preference (the first is the one most likely best); runs at later ones start later.
FULL = dict(d_models=(64, 128, 256), settings=((64, 4), (128, 8), (256, 16), (512, 64)),
            lrs=(3e-3, 1e-3), steps=6000, batch_size=64, vocab_size=8192)
# The busy 2-core CPU grid: one width, the shortest setting, one learning rate, a short run.
CPU = dict(d_models=(64,), settings=((64, 4),), lrs=(3e-3,), steps=1000, batch_size=64, vocab_size=8192)
# Seconds per run anywhere: the tests' grid.
TINY = dict(d_models=(16,), settings=((16, 2),), lrs=(1e-3, 3e-3), steps=2, batch_size=8, vocab_size=32)
GRIDS = {"full": FULL, "cpu": CPU, "tiny": TINY}


def run_name(job, grid):
    return (f"{job['arch']}_d{job['d_model']}_L{job['seq_len']}_P{job['num_kv_pairs']}_lr{job['lr']:g}"
            f"_s{grid['steps']}_b{grid['batch_size']}_v{grid['vocab_size']}")


def plan(grid, archs):
    """The runs in launch order: key archs before the others, a learning rate's runs before the next one's, and
    within that the costliest cells first (long runs started early pack the parallel slots better)."""
    cells = sorted(((d, L, P) for d in grid["d_models"] for L, P in grid["settings"]),
                   key=lambda c: -c[0] * c[1])
    jobs = []
    for group in ([a for a in archs if a in KEY_ARCHS], [a for a in archs if a not in KEY_ARCHS]):
        for lr in grid["lrs"]:
            for d, L, P in cells:
                jobs += [dict(arch=a, d_model=d, seq_len=L, num_kv_pairs=P, lr=lr) for a in group]
    return jobs


class Run:
    """One training subprocess in its own work directory (and process group, so a timeout kills all of it)."""

    def __init__(self, job, grid, root, env):
        self.job, self.name = job, run_name(job, grid)
        self.workdir = os.path.join(root, self.name)
        self.metrics = os.path.join(self.workdir, "metrics.jsonl")
        self.t0 = time.time()
        self.proc = None
        if _evals(self.metrics, grid["steps"]):
            return  # finished before: only read back
        os.makedirs(self.workdir, exist_ok=True)
        variant = config_variant(job, grid)
        self.log = open(os.path.join(self.workdir, "train.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chimera_jax.train", f"--config=configs/mqar.py:{variant}",
             f"--workdir={self.workdir}"], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def poll(self, timeout):
        """None while running; else the result row (a run past ``timeout`` seconds is killed first)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                if time.time() - self.t0 < timeout:
                    return None
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                self.log.close()
                return self._row(error=f"timeout after {timeout} s")
            self.log.close()
            if self.proc.returncode:
                with open(self.log.name) as f:
                    text = f.read()
                at = text.rfind("error:")  # train.py's one-line message for a bad config, else the traceback's end
                return self._row(error=f"exit {self.proc.returncode}: " + (text[at:at + 500] if at >= 0
                                                                            else text[-2000:]))
        return self._row()

    def _row(self, error=None):
        row = dict(name=self.name, **self.job, seconds=round(time.time() - self.t0, 1))
        curve = _evals(self.metrics)
        if curve:  # accuracy after each eval: the learning curve (the last one is the run's result)
            row["curve"] = [(e["step"], round(e["eval/accuracy"], 4)) for e in curve]
            row.update(step=curve[-1]["step"], accuracy=curve[-1]["eval/accuracy"], loss=curve[-1]["eval/loss"])
        if error:
            row["error"] = error
        return row


def _evals(path, final_step=None):
    """The eval records of a run's metrics (only when it reached ``final_step``, if given)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        evals = [json.loads(line) for line in f if '"eval/accuracy"' in line]
    if final_step is not None and not (evals and evals[-1]["step"] >= final_step):
        return []
    return evals


def sweep(jobs, grid, root, *, parallel=1, timeout=1800, budget_s=0.0, on_row=None, run_cls=Run):
    """Runs ``jobs`` with up to ``parallel`` at once; returns (rows of the runs made, jobs never started).

    ``run_cls(job, grid, root, env)`` starts one run; its ``poll(timeout)`` is None while it runs, else its row.
    """
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if parallel > 1:  # N processes share one accelerator: each takes memory as it needs it, up to 1/N of it
        env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / parallel:.3f}")
    pending, running, rows = collections.deque(jobs), [], []
    t0 = time.time()
    while pending or running:
        while pending and len(running) < parallel and not (budget_s and time.time() - t0 > budget_s):
            running.append(run_cls(pending.popleft(), grid, root, env))
        if not running:
            break  # over budget: the rest is not started
        for run in list(running):
            row = run.poll(timeout)
            if row is not None:
                running.remove(run)
                rows.append(row)
                if on_row:
                    on_row(row, rows)
        if running:
            time.sleep(0.5)
    return rows, list(pending)


def report(rows, grid, grid_name, out, not_run=(), archs=ARCHS, wall_s=None):
    best, tried = {}, collections.defaultdict(set)
    for r in rows:
        if r.get("accuracy") is None or "error" in r:
            continue
        key = (r["arch"], r["d_model"], r["seq_len"], r["num_kv_pairs"])
        tried[key].add(r["lr"])  # (a cell run twice at one lr, e.g. in two merged calls, counts once)
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    cells = [(d, L, P) for d in grid["d_models"] for (L, P) in grid["settings"]]
    n_lr = len(grid["lrs"])
    lines = [f"# MQAR sweep ({grid_name} grid)", "",
             f"2-layer models; vocab {grid['vocab_size']}, {grid['steps']} steps of batch {grid['batch_size']} "
             f"(fresh rows every step), learning rates {list(grid['lrs'])} (best shown; `k/{n_lr} lr` when only k "
             f"of them finished). Accuracy = eval accuracy on the query positions of held-out rows "
             f"(configs/mqar.py).", "",
             "| arch | " + " | ".join(f"d={d} L={L} P={P}" for d, L, P in cells) + " |",
             "|---|" + "---|" * len(cells)]
    for arch in archs:
        vals = []
        for d, L, P in cells:
            key = (arch, d, L, P)
            r = best.get(key)
            part = "" if len(tried[key]) >= n_lr else f"; {len(tried[key])}/{n_lr} lr"
            vals.append("not run" if r is None else f"{100 * r['accuracy']:.1f}% (lr {r['lr']:g}{part})")
        lines.append(f"| {arch} | " + " | ".join(vals) + " |")
    lines += ["", "Gap to dense (points):", ""]
    for arch in archs:
        if arch == "dense":
            continue
        gaps = []
        for d, L, P in cells:
            a, b = best.get((arch, d, L, P)), best.get(("dense", d, L, P))
            gaps.append("-" if a is None or b is None else f"{100 * (a['accuracy'] - b['accuracy']):+.1f}")
        lines.append(f"- {arch}: " + ", ".join(f"d={d} L={L} P={P}: {g}" for (d, L, P), g in zip(cells, gaps)))
    dense = [r for r in rows if r["arch"] == "dense" and r.get("curve")]
    if dense:  # whether dense attention has converged (or is still on the plateau) is read off these
        lines += ["", "Dense learning curves (step: eval accuracy %):", ""]
        lines += [f"- {r['name']}: " + ", ".join(f"{s}: {100 * a:.0f}" for s, a in r["curve"]) for r in dense]
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Failed or cut runs (with the last eval they made, if any):", ""]
        lines += [f"- {r['name']}: {r['error'][-300:]!r}"
                  + (f"; at step {r['step']}: {100 * r['accuracy']:.1f}%" if r.get("accuracy") is not None else "")
                  for r in errors]
    if not_run:
        lines += ["", f"Not run (time budget spent, or absent from the merged files; {len(not_run)} runs):", ""]
        lines += [f"- {run_name(j, grid)}" for j in not_run]
    if wall_s is not None:
        lines += ["", f"Sweep wall time: {wall_s:.0f} s for {len(rows)} runs."]
    outside = [(d, L, P) for d in FULL["d_models"] for (L, P) in FULL["settings"] if (d, L, P) not in cells]
    if outside:
        lines += ["", "Outside this grid (the issue's full grid; `--grid=full` on an accelerator): d_model x (L, P) = "
                  + ", ".join(f"{d}x({L},{P})" for d, L, P in outside)
                  + f"; learning rates {list(FULL['lrs'])}; vocab {FULL['vocab_size']}; {FULL['steps']} steps."]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "mqar_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "mqar_sweep.json"), "w") as f:
        json.dump(dict(grid=grid_name, config=grid, runs=rows, not_run=[run_name(j, grid) for j in not_run],
                       wall_s=wall_s), f, indent=1)
    _plot(best, grid, archs, os.path.join(out, "mqar_sweep.png"))
    return "\n".join(lines)


def _plot(best, grid, archs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = grid["d_models"]
    fig, axes = plt.subplots(1, len(ds), figsize=(4.5 * len(ds), 3.6), squeeze=False)
    for ax, d in zip(axes[0], ds):
        for arch in archs:
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
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    p.add_argument("--out", default=os.path.join(REPO, "experiments", "results"))
    p.add_argument("--workdirs", default=os.path.join(REPO, "workdirs", "mqar_sweep"))
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=ARCH:key=value:... a named arch variant (keys of configs/mqar.py), usable in --archs; "
                   "e.g. --variant=chimera_r1e-3=chimera:router_rate=0.001 --archs=chimera_r1e-3")
    p.add_argument("--d_models", default="", help="comma-separated subset of the grid's widths")
    p.add_argument("--settings", default="", help="comma-separated LxP subset of the grid's, e.g. 64x4,512x64")
    p.add_argument("--lrs", default="", help="comma-separated learning rates in place of the grid's")
    p.add_argument("--steps", type=int, default=0, help="override the grid's steps")
    p.add_argument("--batch_size", type=int, default=0, help="override the grid's batch size")
    p.add_argument("--evals", type=int, default=0, help="evaluations per run (the learning curve; default 4)")
    p.add_argument("--vocab_size", type=int, default=0, help="override the grid's vocabulary")
    p.add_argument("--parallel", type=int, default=1, help="training runs at once (they share the accelerator)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run; a run past it is killed")
    p.add_argument("--budget_s", type=float, default=0, help="start no run after this many seconds (0: no limit)")
    p.add_argument("--engine", choices=("process", "inproc"), default="process",
                   help="process: one `python -m chimera_jax.train` per run; inproc: the runs one after another in "
                   "this process, many steps per dispatch (train_inproc), for accelerators")
    p.add_argument("--shard", default="0/1", help="i/n: this process makes every n-th run from the i-th "
                   "(inproc engine; several shards share one accelerator, then --merge their json files)")
    p.add_argument("--report_only", action="store_true", help="train nothing: the table of the --merge runs")
    p.add_argument("--merge", default="", help="previous calls' mqar_sweep.json files, comma-separated (same "
                   "steps, batch and vocab): their runs join this table, e.g. dense and chimera from one device call, the rest from another")
    args = p.parse_args(argv)
    grid = dict(GRIDS[args.grid])
    for key in ("steps", "batch_size", "evals", "vocab_size"):
        if getattr(args, key):
            grid[key] = getattr(args, key)
    if args.lrs:
        grid["lrs"] = tuple(float(x) for x in args.lrs.split(","))
    if args.d_models:
        grid["d_models"] = tuple(int(x) for x in args.d_models.split(","))
    if args.settings:
        grid["settings"] = tuple(tuple(int(n) for n in x.split("x")) for x in args.settings.split(","))
    for spec in args.variant:
        try:
            name, arch, extra = parse_variant(spec)
        except ValueError as e:
            p.error(str(e))
        VARIANTS[name] = (arch, extra)
    archs = [a for a in args.archs.split(",") if a]
    # Rows of earlier calls may carry variant names this call does not define (their table rows are kept).
    merged_archs = {r["arch"] for path in args.merge.split(",") if path
                    for r in _load_merge(path, grid, keep_failed=True)}
    bad = sorted(set(archs) - set(ARCHS) - set(VARIANTS) - merged_archs)
    if bad:
        p.error(f"--archs: unknown {bad}; choose from {list(ARCHS) + list(VARIANTS)}")
    if args.parallel < 1:
        p.error("--parallel must be >= 1")
    jobs = plan(grid, archs)
    earlier = [r for path in args.merge.split(",") if path for r in _load_merge(path, grid)]
    done = {_key(r) for r in earlier}
    jobs = [j for j in jobs if _key(j) not in done]
    t0 = time.time()

    def on_row(row, rows):
        print(json.dumps({k: v for k, v in row.items() if k != "curve"})[:300], flush=True)
        report(earlier + rows, grid, args.grid, args.out, archs=shown, wall_s=time.time() - t0)  # after every run

    known = list(ARCHS) + sorted({r["arch"] for r in earlier if r["arch"] not in ARCHS} | set(VARIANTS))
    shown = [a for a in known if a in archs or any(r["arch"] == a for r in earlier)]
    if args.report_only:
        merged = {}
        for path in (p for p in args.merge.split(",") if p):
            for r in _load_merge(path, grid, keep_failed=True):
                old = merged.get(_key(r))
                # A cell in several files: a finished run beats a failed or cut one, else the later file wins.
                if old is None or "error" not in r or "error" in old:
                    merged[_key(r)] = r
        not_run = [j for j in plan(grid, archs) if _key(j) not in merged]
        print(report(list(merged.values()), grid, args.grid, args.out, not_run=not_run, archs=shown))
        return
    print(f"{len(jobs)} runs, {args.parallel if args.engine == 'process' else 1} at a time", flush=True)
    if args.engine == "inproc":
        i, n = (int(x) for x in args.shard.split("/"))
        rows, not_run = [], []
        for job in jobs[i::n]:
            if args.budget_s and time.time() - t0 > args.budget_s:
                not_run.append(job)
                continue
            rows.append(train_inproc(job, grid, timeout=args.timeout))
            on_row(rows[-1], rows)
        print(report(earlier + rows, grid, args.grid, args.out, not_run=not_run, archs=shown,
                     wall_s=time.time() - t0))
        return
    rows, not_run = sweep(jobs, grid, args.workdirs, parallel=args.parallel, timeout=args.timeout,
                          budget_s=args.budget_s, on_row=on_row)
    print(report(earlier + rows, grid, args.grid, args.out, not_run=not_run, archs=shown, wall_s=time.time() - t0))


def train_inproc(job, grid, *, timeout=1800.0, inner=100, stop_at=0.995):
    """One run inside this process: the same config, stage, train_step and eval as ``chimera_jax.train``, but
    ``inner`` optimizer steps per dispatch (a ``lax.scan`` over stacked batches) and no checkpoints or logs.

    Why: the models are tiny, so a step is a few milliseconds of GPU work and the per-step host round trip of the
    training loop (and, with several processes on one GPU, context switches between them) dominates. A run stops
    early once eval accuracy reaches ``stop_at`` (its curve says where), or at ``timeout`` seconds with the evals it
    made. Returns the row ``report`` reads, as the subprocess engine's ``Run`` does.
    """
    import flax.linen as nn
    import jax
    import numpy as np

    sys.path.insert(0, REPO)
    from chimera_jax import stages
    from configs import mqar as mqar_config

    t0 = time.time()
    name = run_name(job, grid)
    row = dict(name=name, **job)
    variant = config_variant(job, dict(grid, evals=grid.get("evals", 4))) + ",read_threads=0"
    try:
        cfg = mqar_config.get_config(variant)
        stage = stages.build(cfg)
        inner = max(1, min(inner, cfg.eval_every))
        state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)))(jax.random.PRNGKey(cfg.seed))
        step_rng = jax.random.PRNGKey(cfg.seed + 1)

        def many(state, batches, first_step):
            def one(s, xs):
                batch, i = xs
                s, metrics = stage.train_step(s, batch, jax.random.fold_in(step_rng, first_step + i))
                return s, metrics["loss"]
            return jax.lax.scan(one, state, (batches, jax.numpy.arange(inner)))

        many = jax.jit(many, donate_argnums=0)
        evaluate = jax.jit(stage.eval_step)
        curve, step = [], 0
        while step < cfg.total_steps and time.time() - t0 < timeout:
            batches = [next(stage.data.train) for _ in range(inner)]
            stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
            state, _ = many(state, stacked, step)
            step += inner
            if step // cfg.eval_every > (step - inner) // cfg.eval_every or step >= cfg.total_steps:
                sums = None
                for b in stage.data.eval_batches:
                    out = evaluate(state, b)
                    sums = out if sums is None else jax.tree.map(lambda a, c: a + c, sums, out)
                ev = stage.summarize_eval({k: float(v) for k, v in jax.device_get(sums).items()})
                curve.append((step, round(ev["accuracy"], 4)))
                row.update(step=step, accuracy=ev["accuracy"], loss=ev["loss"])
                if ev["accuracy"] >= stop_at:
                    break
        row["curve"] = curve
        if step < cfg.total_steps and (not curve or curve[-1][1] < stop_at):
            row["error"] = f"timeout after {timeout:.0f} s at step {step}"
    except Exception as e:  # one failing run must not end the sweep
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    row["seconds"] = round(time.time() - t0, 1)
    return row


def _key(r):
    return (r["arch"], r["d_model"], r["seq_len"], r["num_kv_pairs"], r["lr"])


def _load_merge(path, grid, keep_failed=False):
    """The finished runs of an earlier call's json (and its failed or cut ones with ``keep_failed``); refused when
    it trained with other steps, batch or vocab."""
    with open(path) as f:
        saved = json.load(f)
    for k in ("steps", "batch_size", "vocab_size"):
        if saved["config"][k] != grid[k]:
            raise SystemExit(f"--merge={path}: its {k}={saved['config'][k]} differs from this sweep's {grid[k]}")
    return [r for r in saved["runs"] if keep_failed or ("error" not in r and r.get("accuracy") is not None)]


if __name__ == "__main__":
    main()
