"""Evolutionary architecture search over Griffin-style hybrids (seed 004): ``experiments/evolve.py --config=THIS``.

Each candidate is the base LM config with its genes applied, trained for a short run (``fixed``); its fitness is
the validation bits per byte at the end of that run (lower is better).

Fields:
  name: the search's name (log and best config in experiments/results/evolve/NAME, runs in workdirs/evolve/NAME).
  base: the LM config spec the genes are applied to.
  fixed: overrides of every candidate's short training run (nested like the LM config).
  genes: the allowed values of each gene (a mutation moves to a neighbouring value, sometimes to any value):
    d_model, num_layers, num_heads (query heads; head_dim = d_model / num_heads), num_kv_heads (repaired to the
    largest divisor of num_heads not above it), ffn_multiplier (ffn_dim = multiplier * d_model),
    recurrence_ratio (r recurrent layers per attention layer: every (r+1)-th layer is attention, 0 = all attention),
    window (sliding-window width of the attention layers).
    The LM has no dropout field (models/lm.py), so there is no dropout gene.
  recurrent_code / attention_code: the layer-pattern codes of the two layer kinds (layers/registry.py).
  fallback_recurrent_code: used instead of recurrent_code when that mixer cannot be built (then the search is
    over global ('A') vs local ('SW') attention layers, and the log says so).
  population, elite (best carried over unchanged), tournament (parent selection), crossover_rate (uniform
  crossover of two parents, else a copy of one), mutation_rate (per gene).
  generations: the generation limit.  budget: wall-clock limit of training time, e.g. '10m', '1h', '90s'.
  max_consecutive_failures: stop when this many candidates in a row fail to train (a broken environment, not
    bad shapes); fix it and rerun with --retry_failed.
  seed: everything random in the search derives from it and the generation number (so resuming is exact).
"""
from __future__ import annotations

import ml_collections

from chimera_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    v = config_lib.parse_variant(arg, dict(budget="10m", generations=50))
    c = ml_collections.ConfigDict()
    c.name = "griffin_tiny"
    c.base = "configs/lm.py:arch=griffin,size=tiny"
    c.fixed = ml_collections.ConfigDict(dict(
        total_steps=60, log_every=10, eval_every=60, checkpoint_every=60,
        checkpoint=dict(async_save=False, max_to_keep=1),
        optimizer=dict(learning_rate=3e-3, warmup_steps=6),
        data=dict(seq_len=64, batch_size=8, eval_batches=4),
    ))
    g = ml_collections.ConfigDict()
    g.d_model = (32, 48, 64, 96)
    g.num_layers = (2, 3, 4, 5, 6)
    g.num_heads = (1, 2, 4)
    g.num_kv_heads = (1, 2, 4)
    g.ffn_multiplier = (1.0, 2.0, 3.0, 4.0)
    g.recurrence_ratio = (0, 1, 2, 3)
    g.window = (8, 16, 32, 64)
    c.genes = g
    c.recurrent_code = "RG"
    c.attention_code = "SW"
    c.fallback_recurrent_code = "A"
    # Sized for a 10-minute CPU budget (~10-15 candidates): a small population buys more generations. For an
    # hour or more, raise it (--config.population=12 --config.elite=2).
    c.population = 4
    c.elite = 1
    c.tournament = 3
    c.crossover_rate = 0.5
    c.mutation_rate = 0.2
    c.generations = v["generations"]
    c.budget = str(v["budget"])
    c.max_consecutive_failures = 3
    c.seed = 0
    return config_lib.lock(c)
