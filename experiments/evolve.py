"""Evolutionary architecture search (seed 004): the best LM shape for a training budget.

    python experiments/evolve.py --config=configs/evolve_griffin.py --budget=10m [--generations=20]
    python experiments/evolve.py --config=configs/evolve_griffin.py --config.population=8 --out=DIR

A candidate is a set of genes (configs/evolve_griffin.py lists them and their ranges). Generation 0 is random;
each later one keeps the ``elite`` best of the previous generation and fills the rest with children: parents by
tournament, uniform crossover, per-gene mutation to a neighbouring (sometimes any) allowed value. Fitness is the
validation bits per byte after the short training run of ``fixed`` (lower is better); a candidate that fails or
diverges gets +inf. A shape already evaluated is not trained again.

Everything goes to OUT/log.jsonl, one JSON object per line: the search's config, each candidate (genes, the
config overrides they map to, parents, origin, generation) when its generation is made, and each result
(fitness, seconds, error). Re-running the same command continues from the log: evaluated candidates are not
trained again, an interrupted candidate resumes from its own checkpoint, and the next generations are bred from
per-generation random streams (seed, generation), so an interrupted search makes the same choices as a straight
one. The budget counts training seconds recorded in the log across restarts.
The best candidate is written as OUT/best_config.py, a config file train.py takes, with OUT/summary.md and
OUT/fitness.png.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python experiments/evolve.py`
    sys.path.insert(0, REPO)

from experiments import sweep as sweep_lib  # noqa: E402  (load_config, read_rows)

GENES = ("d_model", "num_layers", "num_heads", "num_kv_heads", "ffn_multiplier", "recurrence_ratio", "window")


def parse_budget(text: str | int | float) -> float:
    """'10m' / '1h' / '1h30m' / '90s' / '90' -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or not parts or not any(parts.groups()):
        raise ValueError(f"budget {text!r} is not a duration such as '10m', '1h', '1h30m' or '90s'")
    h, m, s = (float(x) if x else 0.0 for x in parts.groups())
    return h * 3600 + m * 60 + s


def flatten(tree, prefix: str = "") -> dict[str, Any]:
    """Nested dict / ConfigDict -> {dotted key: leaf}."""
    out = {}
    for k, v in (tree.items() if hasattr(tree, "items") else []):
        if hasattr(v, "items"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


# ----------------------------------------------------------------------------------------------- genes -> config

def _choices(cfg) -> dict[str, list]:
    genes = {k: list(v) for k, v in cfg.genes.items()}
    unknown = set(genes) - set(GENES)
    if unknown:
        raise ValueError(f"config.genes has unknown genes {sorted(unknown)}; known genes: {list(GENES)} "
                         "(there is no dropout gene: the LM has no dropout)")
    missing = set(GENES) - set(genes)
    if missing:
        raise ValueError(f"config.genes lacks {sorted(missing)}")
    for k, v in genes.items():
        if not v:
            raise ValueError(f"config.genes.{k} is empty")
    return genes


def repair(genes: dict[str, Any]) -> dict[str, Any]:
    """Makes a gene set buildable: heads divide d_model with an even head_dim (RoPE), kv heads divide heads."""
    g = dict(genes)
    d = g["d_model"]
    h = g["num_heads"]
    while h > 1 and (d % h or (d // h) % 2):
        h -= 1
    g["num_heads"] = h
    kv = min(g["num_kv_heads"], h)
    while h % kv:
        kv -= 1
    g["num_kv_heads"] = kv
    return g


def layer_pattern(num_layers: int, ratio: int, recurrent: str, attention: str) -> str:
    """Every (ratio+1)-th layer is attention, the others recurrent: 5 layers at ratio 2 -> 'RG RG SW RG RG'."""
    return " ".join(attention if (i + 1) % (ratio + 1) == 0 else recurrent for i in range(num_layers))


def gene_overrides(genes: dict[str, Any], recurrent_code: str, attention_code: str) -> dict[str, Any]:
    """The dotted config overrides a (repaired) gene set stands for."""
    g = repair(genes)
    d, h = g["d_model"], g["num_heads"]
    out = {"model.d_model": d, "model.num_layers": g["num_layers"],
           "model.pattern": layer_pattern(g["num_layers"], g["recurrence_ratio"], recurrent_code, attention_code),
           "model.ffn_dim": int(round(g["ffn_multiplier"] * d)),
           "model.attention.num_heads": h, "model.attention.num_kv_heads": g["num_kv_heads"],
           "model.attention.head_dim": d // h, "model.attention.window": g["window"]}
    if recurrent_code == "RG":  # the RG-LRU's block-diagonal gates need heads that divide its width (= d_model)
        out["model.griffin.num_heads"] = math.gcd(4, d)
    return out


def mixer_builds(code: str) -> bool:
    """Whether layer code ``code`` can be built here (its module exists and initialises on a tiny input)."""
    try:
        import jax
        import jax.numpy as jnp
        import ml_collections

        from chimera_jax.models.lm import LM

        c = sweep_lib.load_config("configs/lm.py:arch=griffin,size=tiny",
                                  {"model.pattern": code, "model.num_layers": 1, "model.d_model": 16,
                                   "model.attention.head_dim": 4, "model.ffn_dim": 16})
        jax.eval_shape(LM(ml_collections.FrozenConfigDict(c.model)).init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 4), jnp.int32))
        return True
    except Exception:  # any import or build failure means: not available in this checkout
        return False


# ------------------------------------------------------------------------------------------------- the log

class Log:
    """Append-only JSONL; each event is one write() of whole lines, flushed and synced, so a kill loses at most
    the event being written (a torn last line is ignored on reading)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        events = []
        with open(self.path) as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return events

    def write(self, *events: dict) -> None:
        torn = False
        if os.path.exists(self.path) and os.path.getsize(self.path):
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"  # a kill mid-line: start on a fresh line so no new event is lost
        with open(self.path, "a") as f:
            f.write("\n" * torn + "".join(json.dumps(e, sort_keys=True) + "\n" for e in events))
            f.flush()
            os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------- the search

class Interrupted(Exception):
    pass


class SearchBroken(RuntimeError):
    """Several candidates in a row failed: the environment is broken, not the shapes."""


def train_fitness(search_cfg, overrides: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Trains the candidate (resuming its workdir if it has a checkpoint); returns {'fitness', 'metrics'}."""
    from chimera_jax.training import loop

    config = sweep_lib.load_config(search_cfg.base, {**flatten(search_cfg.fixed), **overrides})
    state, result = loop.train(config, workdir)
    del state
    rows = sweep_lib.read_rows(workdir)
    if not any(r.get("step", -1) >= config.total_steps for r in rows):
        raise Interrupted(f"training of {workdir} stopped before step {config.total_steps}")
    final = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}  # the last of each eval metric
    bpb = final.get("eval/bpb", float("nan"))
    return {"fitness": bpb if math.isfinite(bpb) else float("inf"), "metrics": final}


class Search:
    def __init__(self, cfg, out_dir: str, workdir_root: str, *, fitness_fn: Callable | None = None,
                 log: Callable[[str], None] = print, check_mixer: bool = True, retry_failed: bool = False):
        self.cfg = cfg
        self.out_dir = out_dir
        self.workdir_root = workdir_root
        self.choices = _choices(cfg)
        self.budget = parse_budget(cfg.budget)
        self.fitness_fn = fitness_fn or (lambda overrides, workdir: train_fitness(cfg, overrides, workdir))
        self.print = log
        self.log = Log(os.path.join(out_dir, "log.jsonl"))
        for key in ("population", "elite", "tournament", "generations"):
            if cfg[key] < (0 if key == "elite" else 1):
                raise ValueError(f"config.{key}={cfg[key]} is too small")
        if cfg.elite >= cfg.population:
            raise ValueError(f"config.elite={cfg.elite} must be below config.population={cfg.population}")
        self.recurrent_code = cfg.recurrent_code
        if check_mixer and cfg.recurrent_code != cfg.fallback_recurrent_code and not mixer_builds(cfg.recurrent_code):
            self.print(f"layer code {cfg.recurrent_code!r} cannot be built in this checkout; searching with "
                       f"{cfg.fallback_recurrent_code!r} as the second layer kind instead")
            self.recurrent_code = cfg.fallback_recurrent_code
        self.retry_failed = retry_failed
        self._failures = 0
        self._load()

    # ---- state from the log
    def _load(self) -> None:
        events = self.log.read()
        self.candidates: dict[str, dict] = {}
        self.results: dict[str, dict] = {}
        self.generations: list[list[str]] = []
        for e in events:
            kind = e.get("event")
            if kind == "start" and "recurrent_code" in e:
                self.recurrent_code = e["recurrent_code"]  # a resumed search keeps the layer kinds it began with
            elif kind == "candidate":
                self.candidates[e["id"]] = e
            elif kind == "result":
                if self.retry_failed and "error" in e:
                    self.results.pop(e["id"], None)  # train it again
                else:
                    self.results[e["id"]] = e
            elif kind == "generation":
                if e["generation"] != len(self.generations):
                    raise ValueError(f"{self.log.path}: generation {e['generation']} out of order")
                self.generations.append(e["members"])
        self.spent = sum(r.get("seconds", 0.0) for r in self.results.values())

    def _key(self, genes) -> str:
        return json.dumps(gene_overrides(genes, self.recurrent_code, self.cfg.attention_code), sort_keys=True)

    # ---- variation
    def _random_genes(self, rng) -> dict:
        return {k: v[rng.integers(len(v))] for k, v in self.choices.items()}

    def _mutate(self, genes, rng, force: bool) -> dict:
        out = dict(genes)
        names = list(self.choices)
        must = names[rng.integers(len(names))] if force else None
        for name in names:
            values = self.choices[name]
            if len(values) < 2 or (name != must and rng.random() >= self.cfg.mutation_rate):
                continue
            i = values.index(out[name]) if out[name] in values else rng.integers(len(values))
            if rng.random() < 0.7:  # a small step most of the time, a jump sometimes
                j = min(max(i + (1 if rng.random() < 0.5 else -1), 0), len(values) - 1)
                j = j if j != i else (i + 1 if i + 1 < len(values) else i - 1)
            else:
                j = int(rng.choice([x for x in range(len(values)) if x != i]))
            out[name] = values[j]
        return out

    def _tournament(self, members: list[str], rng) -> str:
        picks = [members[rng.integers(len(members))] for _ in range(self.cfg.tournament)]
        return min(picks, key=lambda i: self.results[i]["fitness"])

    def _candidate(self, cid, generation, genes, parents, origin) -> dict:
        genes = repair(genes)
        return {"event": "candidate", "id": cid, "generation": generation, "genes": genes, "parents": parents,
                "origin": origin, "overrides": gene_overrides(genes, self.recurrent_code, self.cfg.attention_code)}

    def _make_generation(self, g: int) -> None:
        """Creates generation g (from generation g-1's results) and logs it in one write."""
        rng = np.random.default_rng([self.cfg.seed, g])
        seen = {self._key(c["genes"]) for c in self.candidates.values()}
        new, members = [], []
        if g == 0:
            while len(new) < self.cfg.population:
                genes = self._random_genes(rng)
                if self._key(genes) in seen and len(seen) < 10_000:
                    if rng.random() < 0.99:  # retry duplicates; the tiny chance keeps a tiny gene space finite
                        continue
                seen.add(self._key(genes))
                new.append(self._candidate(f"g{g:03d}_c{len(new):02d}", g, genes, [], "random"))
        else:
            prev = [i for i in self.generations[g - 1] if i in self.results]
            ranked = sorted(prev, key=lambda i: self.results[i]["fitness"])
            members = ranked[: self.cfg.elite]
            while len(members) + len(new) < self.cfg.population:
                for attempt in range(20):
                    p1 = self._tournament(prev, rng)
                    p2 = self._tournament(prev, rng) if rng.random() < self.cfg.crossover_rate else p1
                    if p2 != p1:
                        a, b = self.candidates[p1]["genes"], self.candidates[p2]["genes"]
                        genes = {k: (a if rng.random() < 0.5 else b)[k] for k in self.choices}
                        parents, origin = sorted({p1, p2}), "crossover+mutation"
                    else:  # no crossover, or both tournaments picked the same parent
                        genes, parents, origin = dict(self.candidates[p1]["genes"]), [p1], "mutation"
                    genes = self._mutate(genes, rng, force=origin == "mutation")
                    if self._key(genes) not in seen:
                        break
                seen.add(self._key(genes))
                new.append(self._candidate(f"g{g:03d}_c{len(new):02d}", g, genes, parents, origin))
        members += [c["id"] for c in new]
        self.log.write(*new, {"event": "generation", "generation": g, "members": members})
        for c in new:
            self.candidates[c["id"]] = c
        self.generations.append(members)

    # ---- evaluation
    def _evaluate(self, cid: str) -> None:
        cand = self.candidates[cid]
        key = self._key(cand["genes"])
        twin = next((r for i, r in self.results.items() if self._key(self.candidates[i]["genes"]) == key), None)
        if twin is not None:  # the same shape trained before: same seed, same data, same fitness
            result = {"event": "result", "id": cid, "fitness": twin["fitness"], "seconds": 0.0,
                      "metrics": twin.get("metrics", {}), "copy_of": twin["id"]}
        else:
            workdir = os.path.join(self.workdir_root, cid)
            self.print(f"[{cid}] gen {cand['generation']} {cand['origin']} {cand['genes']}")
            t0 = time.time()
            try:
                out = self.fitness_fn(cand["overrides"], workdir)
                result = {"event": "result", "id": cid, "fitness": float(out["fitness"]),
                          "metrics": out.get("metrics", {})}
            except Interrupted:
                raise
            except Exception as e:  # a shape that cannot train is a bad shape, not a broken search
                result = {"event": "result", "id": cid, "fitness": float("inf"),
                          "error": f"{type(e).__name__}: {str(e)[:300]}"}
            result["seconds"] = time.time() - t0
        self.spent += result["seconds"]
        result["spent"] = self.spent
        self.log.write(result)
        self.results[cid] = result
        self.print(f"[{cid}] fitness {result['fitness']:.4f} ({result['seconds']:.1f}s, spent "
                   f"{self.spent:.0f}/{self.budget:.0f}s)" + (f" error {result['error']}" if "error" in result else ""))
        self._failures = self._failures + 1 if "error" in result and "copy_of" not in result else 0
        limit = self.cfg.get("max_consecutive_failures", 3)
        if limit and self._failures >= limit:
            raise SearchBroken(f"{self._failures} candidates in a row failed to train, the last with "
                               f"{result['error']}; fix the cause and rerun with --retry_failed")

    def _estimate(self) -> float:
        times = [r["seconds"] for r in self.results.values() if r.get("seconds", 0) > 0]
        return statistics.median(times) if times else 0.0

    def run(self) -> str:
        """Runs until the budget or the generation limit; returns why it stopped."""
        if not self.log.read():
            self.log.write({"event": "start", "time": time.time(), "recurrent_code": self.recurrent_code,
                            "config": json.loads(self.cfg.to_json_best_effort())})
        else:
            self.log.write({"event": "resume", "time": time.time(), "spent": self.spent,
                            "evaluated": len(self.results)})
            self.print(f"resuming from {self.log.path}: {len(self.results)} evaluated, {self.spent:.0f}s spent")
        reason = "generations"
        while True:
            if not self.generations:
                self._make_generation(0)
            g = len(self.generations) - 1
            pending = [i for i in self.generations[g] if i not in self.results]
            stop = False
            for cid in pending:
                if self.spent + self._estimate() > self.budget:
                    reason, stop = "budget", True
                    break
                self._evaluate(cid)
            if stop:
                break
            if g + 1 >= self.cfg.generations:
                break
            self._make_generation(g + 1)
        self.write_outputs(reason)
        return reason

    # ---- outputs
    def best(self) -> dict | None:
        done = [r for r in self.results.values() if math.isfinite(r["fitness"])]
        return min(done, key=lambda r: (r["fitness"], r["id"])) if done else None

    def generation_bests(self) -> list[float | None]:
        out = []
        for members in self.generations:
            vals = [self.results[i]["fitness"] for i in members if i in self.results]
            vals = [v for v in vals if math.isfinite(v)]
            out.append(min(vals) if vals else None)
        return out

    def write_outputs(self, reason: str) -> None:
        best = self.best()
        bests = self.generation_bests()
        summary = {"stopped_by": reason, "spent_seconds": self.spent, "budget_seconds": self.budget,
                   "evaluated": len(self.results), "generations": len(self.generations),
                   "recurrent_code": self.recurrent_code, "generation_best_fitness": bests,
                   "first_generation_best": bests[0] if bests else None,
                   "best": None if best is None else {"id": best["id"], "fitness": best["fitness"],
                                                      "genes": self.candidates[best["id"]]["genes"],
                                                      "overrides": self.candidates[best["id"]]["overrides"]}}
        if best is not None and bests and bests[0] is not None:
            summary["improved_over_first_generation"] = best["fitness"] < bests[0]
        with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if best is not None:
            write_best_config(os.path.join(self.out_dir, "best_config.py"), self.cfg, best,
                              self.candidates[best["id"]])
        self._write_markdown(summary)
        self._plot()

    def _write_markdown(self, summary) -> None:
        lines = [f"# Evolutionary search {self.cfg.name}", "",
                 f"stopped by: {summary['stopped_by']}; {summary['evaluated']} candidates in "
                 f"{summary['generations']} generations; {summary['spent_seconds']:.0f} s of "
                 f"{summary['budget_seconds']:.0f} s budget; layer kinds: {self.recurrent_code!r} (recurrent) and "
                 f"{self.cfg.attention_code!r} (attention)", "",
                 "| generation | best eval/bpb |", "|---|---|"]
        lines += [f"| {g} | {'' if v is None else f'{v:.4f}'} |" for g, v in enumerate(summary["generation_best_fitness"])]
        if summary["best"]:
            b = summary["best"]
            lines += ["", f"best: {b['id']} eval/bpb {b['fitness']:.4f}, genes {b['genes']}",
                      f"improved over the first generation: {summary.get('improved_over_first_generation')}"]
        lines += ["", "| id | gen | origin | parents | d_model | layers | heads | kv | ffn x | ratio | window | "
                  "eval/bpb | s |", "|" + "---|" * 13]
        for cid, c in self.candidates.items():
            r = self.results.get(cid, {})
            g = c["genes"]
            fit = r.get("fitness")
            lines.append(f"| {cid} | {c['generation']} | {c['origin']} | {' '.join(c['parents'])} | {g['d_model']} | "
                         f"{g['num_layers']} | {g['num_heads']} | {g['num_kv_heads']} | {g['ffn_multiplier']} | "
                         f"{g['recurrence_ratio']} | {g['window']} | {'' if fit is None else f'{fit:.4f}'} | "
                         f"{r.get('seconds', 0):.1f} |")
        with open(os.path.join(self.out_dir, "summary.md"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        order = [i for i in self.candidates if i in self.results and math.isfinite(self.results[i]["fitness"])]
        if order:
            xs = range(len(order))
            ax.scatter(xs, [self.results[i]["fitness"] for i in order],
                       c=[self.candidates[i]["generation"] for i in order], cmap="viridis", label="candidate")
            running = np.minimum.accumulate([self.results[i]["fitness"] for i in order])
            ax.step(xs, running, where="post", color="tab:red", label="best so far")
            ax.legend()
        ax.set(xlabel="candidate (evaluation order)", ylabel="eval/bpb", title=f"evolve {self.cfg.name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(self.out_dir, "fitness.png"), dpi=110)
        plt.close(fig)


def write_best_config(path: str, cfg, result: dict, candidate: dict) -> None:
    """A config file train.py accepts: the base config, the search's short-run settings and the winning genes.

    ``--config=PATH`` trains exactly the evaluated run; ``--config=PATH:schedule=base`` keeps the base config's own
    training schedule and applies only the architecture.
    """
    fixed = flatten(cfg.fixed)
    text = f'''"""Best shape of the evolutionary search {cfg.name!r}: candidate {result["id"]}, eval/bpb {result["fitness"]:.4f}.

    python -m chimera_jax.train --config=THIS_FILE --workdir=DIR               # the evaluated short run
    python -m chimera_jax.train --config=THIS_FILE:schedule=base --workdir=DIR # base schedule, this architecture

Written by experiments/evolve.py. Genes: {json.dumps(candidate["genes"], sort_keys=True)}
"""
import importlib

from chimera_jax import config_lib

BASE = {cfg.base!r}
TRAINING = {json.dumps(fixed, indent=4, sort_keys=True)}
ARCHITECTURE = {json.dumps(candidate["overrides"], indent=4, sort_keys=True)}


def get_config(arg=None):
    v = config_lib.parse_variant(arg, dict(schedule="search"))
    config_lib.check_choice("schedule", v["schedule"], ("search", "base"))
    path, _, variant = BASE.partition(":")
    config = importlib.import_module(path.removesuffix(".py").replace("/", ".")).get_config(variant or None)
    if v["schedule"] == "search":
        config_lib.apply_overrides(config, TRAINING)
    config_lib.apply_overrides(config, ARCHITECTURE)
    return config
'''
    text = text.replace(": true", ": True").replace(": false", ": False").replace(": null", ": None")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/evolve_griffin.py", "Search config (configs/evolve_*.py).")
    flags.DEFINE_string("budget", None, "Wall-clock training budget, e.g. 10m or 1h (overrides config.budget).")
    flags.DEFINE_integer("generations", None, "Generation limit (overrides config.generations).")
    flags.DEFINE_string("out", None, "Log and results (default experiments/results/evolve/NAME).")
    flags.DEFINE_string("workdir_root", None, "Candidate runs (default workdirs/evolve/NAME).")
    flags.DEFINE_bool("retry_failed", False, "Train again the candidates whose training failed (after a fix).")

    def _main(argv):
        del argv
        import logging

        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.basicConfig(level=logging.WARNING)
        for noisy in ("absl", "orbax", "jax._src"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        cfg = flags.FLAGS.config
        with cfg.unlocked():
            if flags.FLAGS.budget:
                cfg.budget = flags.FLAGS.budget
            if flags.FLAGS.generations:
                cfg.generations = flags.FLAGS.generations
        out = flags.FLAGS.out or os.path.join(REPO, "experiments", "results", "evolve", cfg.name)
        root = flags.FLAGS.workdir_root or os.path.join(REPO, "workdirs", "evolve", cfg.name)
        search = Search(cfg, out, os.path.abspath(root), retry_failed=flags.FLAGS.retry_failed)

        def on_term(signum, frame):  # outside a training run (which checkpoints on its own), stop at once
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        try:
            reason = search.run()
        except (Interrupted, KeyboardInterrupt):
            search.write_outputs("interrupted")
            print(f"interrupted; rerun the same command to continue from {search.log.path}")
            return 3
        except SearchBroken as e:
            search.write_outputs("failures")
            print(f"error: {e}", file=sys.stderr)
            return 4
        best = search.best()
        print(f"stopped by {reason}; best {best['id'] if best else None} "
              f"eval/bpb {best['fitness'] if best else float('nan'):.4f}; outputs in {out}")
        return 0

    return app.run(_main, argv)


if __name__ == "__main__":
    main()
