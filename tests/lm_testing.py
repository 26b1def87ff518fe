"""Small configs and runners shared by the training tests."""
from __future__ import annotations

import os
import subprocess
import sys

from configs import lm as lm_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_config(arch: str = "dense", **overrides):
    """A model and data small enough that a few steps (compile included) take seconds on one CPU core."""
    c = lm_configs.get_config(f"arch={arch},size=tiny")
    c.total_steps = 8
    c.log_every = 1
    c.eval_every = 4
    c.checkpoint_every = 4
    c.checkpoint.async_save = False
    c.model.num_layers = len(c.model.pattern.split()) * (2 if len(c.model.pattern.split()) < 4 else 1)
    c.model.d_model = 32
    c.model.ffn_dim = 64
    c.model.attention.num_heads = 2
    c.model.attention.num_kv_heads = 1
    c.model.attention.head_dim = 16
    lm_configs.fit_blocks_to_width(c.model)
    c.optimizer.warmup_steps = 2
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.data.eval_batches = 2
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def cli(*args: str, env: dict | None = None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``python -m chimera_jax.<args>`` in a fresh process (CPU, one device)."""
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
