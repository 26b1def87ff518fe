"""Micro configs of both concept stages, small enough to compile and run a few steps on one CPU core."""
from __future__ import annotations

from configs import stage1_vq, stage2_planner


def stage1_config(quantizer: str = "vq", **overrides):
    c = stage1_vq.get_config(f"quantizer={quantizer},data=mnist,size=tiny")
    c.total_steps = 4
    c.log_every = 1
    c.eval_every = 2
    c.checkpoint_every = 2
    c.checkpoint.async_save = False
    c.optimizer.warmup_steps = 1
    m = c.model
    m.d_model = 16
    m.quantizer.code_dim = 8
    if quantizer == "vq":
        m.quantizer.num_codes = 16
        m.quantizer.restart_after = 1
    else:
        m.quantizer.levels = (4, 4)
        m.quantizer.num_codes = 16
    m.pre.image_blocks = 0
    m.aunet.widths = (16, 16)
    m.aunet.stride = 8
    c.data.batch_size = 8
    c.data.eval_batches = 1
    c.data.max_examples = 100
    c.eval.grid_examples = 4
    _apply(c, overrides)
    return c


def stage2_config(stage1_workdir: str, cache_dir: str, **overrides):
    c = stage2_planner.get_config("size=tiny,num_codes=16,concept_dim=8,data=mnist,terms=full")
    c.stage1_workdir = stage1_workdir
    c.total_steps = 4
    c.log_every = 1
    c.eval_every = 2
    c.checkpoint_every = 2
    c.checkpoint.async_save = False
    c.optimizer.warmup_steps = 1
    c.model.num_layers = 1
    c.model.d_model = 16
    c.model.ffn_dim = 32
    for a in (c.model.attention, c.model.hassm.attention):
        a.num_heads = a.num_kv_heads = 2
        a.head_dim = 8
    c.disc.d_model = 16
    c.disc.ffn_dim = 16
    c.disc.attention.head_dim = 8
    c.data.seq_len = 16
    c.data.batch_size = 8
    c.data.eval_batches = 1
    c.data.cache_dir = cache_dir
    _apply(c, overrides)
    return c


def _apply(c, overrides):
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
