"""Evolutionary search: genes map to buildable configs, lineage is logged, resume from the log is exact, the budget
stops the search, and a real (tiny) search writes a best config that train.py trains."""
import json
import math
import os
import time

import pytest

from configs import evolve_griffin
from experiments import evolve, sweep
from tests.lm_testing import cli


def _cfg(**changes):
    cfg = evolve_griffin.get_config()
    with cfg.unlocked():
        cfg.recurrent_code = "A"  # independent of which recurrent mixers exist in this checkout
        for k, v in changes.items():
            node = cfg
            *path, last = k.split(".")
            for p in path:
                node = node[p]
            node[last] = v
    return cfg


def _fake_fitness(calls):
    """A smooth landscape over the overrides (best at d_model 64, 4 layers, ffn 2x): no training."""
    def fitness(overrides, workdir):
        calls.append(workdir)
        d, layers = overrides["model.d_model"], overrides["model.num_layers"]
        ffn = overrides["model.ffn_dim"] / d
        return {"fitness": abs(math.log2(d / 64)) + abs(layers - 4) / 2 + abs(ffn - 2) / 4}
    return fitness


def test_parse_budget():
    assert evolve.parse_budget("10m") == 600 and evolve.parse_budget("1h") == 3600
    assert evolve.parse_budget("1h30m") == 5400 and evolve.parse_budget("90s") == 90
    assert evolve.parse_budget("2.5") == 2.5
    for bad in ("", "ten minutes", "5d"):
        with pytest.raises(ValueError, match="budget"):
            evolve.parse_budget(bad)


def test_genes_map_to_buildable_configs():
    assert evolve.layer_pattern(5, 2, "RG", "SW") == "RG RG SW RG RG"
    assert evolve.layer_pattern(3, 0, "RG", "SW") == "SW SW SW"
    g = evolve.repair(dict(d_model=48, num_heads=4, num_kv_heads=3, num_layers=2, ffn_multiplier=2.0,
                           recurrence_ratio=1, window=8))
    assert (g["num_heads"], g["num_kv_heads"]) == (4, 2)
    g = evolve.repair(dict(d_model=6, num_heads=2, num_kv_heads=2))  # head_dim 3 is odd: RoPE refuses it
    assert g["num_heads"] == 1 and g["num_kv_heads"] == 1
    o = evolve.gene_overrides(dict(d_model=32, num_heads=4, num_kv_heads=2, num_layers=3, ffn_multiplier=3.0,
                                   recurrence_ratio=2, window=16), "RG", "SW")
    c = sweep.load_config("configs/lm.py:arch=griffin,size=tiny", o)
    assert c.model.pattern == "RG RG SW" and c.model.ffn_dim == 96 and c.model.attention.head_dim == 8
    assert c.model.attention.window == 16 and c.model.griffin.num_heads == 4
    with pytest.raises(ValueError, match="dropout"):
        evolve.Search(_cfg(**{"genes.dropout": (0.0, 0.1)}), "unused", "unused", check_mixer=False)


def test_search_logs_lineage_and_resumes_exactly(tmp_path):
    cfg = _cfg(population=5, elite=2, generations=4, budget="1h")
    straight_calls, resumed_calls = [], []
    straight = evolve.Search(cfg, str(tmp_path / "straight"), str(tmp_path / "w"),
                             fitness_fn=_fake_fitness(straight_calls), log=lambda m: None, check_mixer=False)
    assert straight.run() == "generations"

    # The same search interrupted: 2 generations, then a kill that loses the last two results, then resumed.
    out = str(tmp_path / "resumed")
    first = evolve.Search(_cfg(population=5, elite=2, generations=2, budget="1h"), out, str(tmp_path / "w"),
                          fitness_fn=_fake_fitness(resumed_calls), log=lambda m: None, check_mixer=False)
    first.run()
    log_path = os.path.join(out, "log.jsonl")
    lines = open(log_path).read().splitlines()
    result_lines = [i for i, line in enumerate(lines) if json.loads(line)["event"] == "result"]
    for i in sorted(result_lines[-2:], reverse=True):
        del lines[i]
    open(log_path, "w").write("\n".join(lines) + "\n" + '{"event": "resu')  # plus a torn last line
    n_before = len(resumed_calls)
    again = evolve.Search(cfg, out, str(tmp_path / "w"), fitness_fn=_fake_fitness(resumed_calls),
                          log=lambda m: None, check_mixer=False)
    assert len(again.results) == len(result_lines) - 2
    assert again.run() == "generations"
    assert len(resumed_calls) - n_before == len(straight_calls) - (len(result_lines) - 2)  # nothing trained twice

    def strip(search):
        return ({i: (c["genes"], c["parents"], c["origin"]) for i, c in search.candidates.items()},
                {i: r["fitness"] for i, r in search.results.items()}, search.generations)

    assert strip(again) == strip(straight)
    # Lineage: every child's parents were evaluated members of the previous generation.
    for cid, c in straight.candidates.items():
        for p in c["parents"]:
            assert p in straight.generations[c["generation"] - 1] and p in straight.results
        for gene, value in c["genes"].items():
            assert value in list(cfg.genes[gene]), (cid, gene, value)
    bests = straight.generation_bests()
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:]))  # elitism: the best never gets worse
    summary = json.load(open(tmp_path / "straight" / "summary.json"))
    assert summary["generation_best_fitness"] == bests and summary["evaluated"] == len(straight.results)
    assert os.path.exists(tmp_path / "straight" / "fitness.png")


def test_budget_stops_the_search(tmp_path):
    def slow(overrides, workdir):
        time.sleep(0.3)
        return {"fitness": 1.0}

    s = evolve.Search(_cfg(population=6, generations=5, budget="0.7s"), str(tmp_path), str(tmp_path / "w"),
                      fitness_fn=slow, log=lambda m: None, check_mixer=False)
    assert s.run() == "budget"
    assert 2 <= len(s.results) <= 3 and s.spent < 1.5


def test_tiny_real_search_and_winner_trains_through_train_py(tmp_path):
    cfg = _cfg(population=2, elite=1, generations=1, budget="10m", **{
        "genes.d_model": (16, 32), "genes.num_layers": (1, 2), "genes.num_heads": (1, 2),
        "genes.num_kv_heads": (1,), "genes.ffn_multiplier": (1.0, 2.0), "genes.recurrence_ratio": (0, 1),
        "genes.window": (4, 8), "fixed.total_steps": 3, "fixed.eval_every": 3, "fixed.checkpoint_every": 3,
        "fixed.log_every": 1, "fixed.optimizer.warmup_steps": 1, "fixed.data.seq_len": 16,
        "fixed.data.eval_batches": 1})
    out = str(tmp_path / "out")
    s = evolve.Search(cfg, out, str(tmp_path / "runs"), log=lambda m: None, check_mixer=False)
    assert s.run() == "generations"
    assert len(s.results) == 2 and all(math.isfinite(r["fitness"]) for r in s.results.values())
    best = s.best()
    assert best["fitness"] == min(r["fitness"] for r in s.results.values())
    c = sweep.load_config(os.path.join(out, "best_config.py"))
    for k, v in s.candidates[best["id"]]["overrides"].items():
        node = c
        for part in k.split("."):
            node = node[part]
        assert node == v, k
    assert c.total_steps == 3 and c.data.seq_len == 16
    base_steps = sweep.load_config("configs/lm.py:arch=griffin,size=tiny").total_steps
    assert sweep.load_config(os.path.join(out, "best_config.py") + ":schedule=base").total_steps == base_steps
    proc = cli("chimera_jax.train", f"--config={os.path.join(out, 'best_config.py')}",
               f"--workdir={tmp_path / 'winner'}")
    assert "final eval" in proc.stdout
    rows = sweep.read_rows(str(tmp_path / "winner"))
    assert max(r["step"] for r in rows) == 3
