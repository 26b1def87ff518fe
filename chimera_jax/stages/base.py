"""The stage contract: data in, loss out. The shared loop (training/loop.py) runs any stage.

A stage builds its model(s), optimizer(s) and data from the config and exposes pure functions:

    init(rng) -> state                         parameters carry logical axis names (boxed); the loop unboxes
                                               them inside one jitted init whose out_shardings come from
                                               jax.eval_shape of this function
    train_step(state, batch, rng) -> (state, metrics)     metrics: dict of scalars, logged as 'train/<name>'
    eval_step(state, batch) -> sums             dict of scalars summed over the eval batches
    summarize_eval(sums) -> metrics             logged as 'eval/<name>'

plus ``data`` (``train``: a checkpointable grain iterator of numpy batches; ``eval_batches``: a fixed list), and
optionally ``tokens_per_step`` / ``flops_per_step`` for throughput and MFU, and ``on_eval(state, step, workdir)``
for artefacts such as reconstruction grids. The loop owns jit, sharding, checkpoints, logging and signals.
"""
from __future__ import annotations

from typing import Any


class Stage:
    name = "base"
    tokens_per_step: int = 0   # tokens (or examples) per optimizer step, for the throughput counter
    flops_per_step: float = 0  # model FLOPs per optimizer step (forward + backward), for MFU; 0 = unknown

    def __init__(self, config):
        self.config = config

    # The loop reads these.
    data: Any = None

    def init(self, rng):
        raise NotImplementedError

    def train_step(self, state, batch, rng):
        raise NotImplementedError

    def eval_step(self, state, batch):
        raise NotImplementedError

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return sums

    def on_eval(self, state, step: int, workdir: str) -> None:
        pass

    def prepare_workdir(self, workdir: str) -> None:
        """Called once on process 0 before training: save what inference needs besides the config."""
