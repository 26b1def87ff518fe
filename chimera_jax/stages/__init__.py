"""Training stages by name (``config.stage``); each module is imported only when its stage runs."""
from __future__ import annotations

import importlib

STAGES = {
    "lm": ("chimera_jax.stages.lm", "LMStage"),
    "vq": ("chimera_jax.stages.vq", "VQStage"),
    "planner": ("chimera_jax.stages.planner", "PlannerStage"),
}


def build(config):
    if config.stage not in STAGES:
        raise ValueError(f"config.stage={config.stage!r} is not a known stage; valid stages: {sorted(STAGES)}")
    module, cls = STAGES[config.stage]
    return getattr(importlib.import_module(module), cls)(config)
