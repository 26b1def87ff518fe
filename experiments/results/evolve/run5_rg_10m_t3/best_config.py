"""Best shape of the evolutionary search 'griffin_tiny': candidate g009_c02, eval/bpb 3.8261.

    python -m chimera_jax.train --config=THIS_FILE --workdir=DIR               # the evaluated short run
    python -m chimera_jax.train --config=THIS_FILE:schedule=base --workdir=DIR # base schedule, this architecture

Written by experiments/evolve.py. Genes: {"d_model": 96, "ffn_multiplier": 3.0, "num_heads": 2, "num_kv_heads": 2, "num_layers": 4, "recurrence_ratio": 1, "window": 8}
"""
import importlib

from chimera_jax import config_lib

BASE = 'configs/lm.py:arch=griffin,size=tiny'
TRAINING = {
    "checkpoint.async_save": False,
    "checkpoint.max_to_keep": 1,
    "checkpoint_every": 60,
    "data.batch_size": 8,
    "data.eval_batches": 4,
    "data.seq_len": 64,
    "eval_every": 60,
    "log_every": 10,
    "optimizer.learning_rate": 0.003,
    "optimizer.warmup_steps": 6,
    "total_steps": 60
}
ARCHITECTURE = {
    "model.attention.head_dim": 48,
    "model.attention.num_heads": 2,
    "model.attention.num_kv_heads": 2,
    "model.attention.window": 8,
    "model.d_model": 96,
    "model.ffn_dim": 288,
    "model.griffin.num_heads": 4,
    "model.num_layers": 4,
    "model.pattern": "RG SW RG SW"
}


def get_config(arg=None):
    v = config_lib.parse_variant(arg, dict(schedule="search"))
    config_lib.check_choice("schedule", v["schedule"], ("search", "base"))
    path, _, variant = BASE.partition(":")
    config = importlib.import_module(path.removesuffix(".py").replace("/", ".")).get_config(variant or None)
    if v["schedule"] == "search":
        config_lib.apply_overrides(config, TRAINING)
    config_lib.apply_overrides(config, ARCHITECTURE)
    return config
