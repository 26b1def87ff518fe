"""The optimizer factory: AdamW, linear warmup then cosine decay, global-norm clipping (all optax)."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    decay_steps = total_steps if opt_cfg.decay_steps == -1 else opt_cfg.decay_steps
    if opt_cfg.warmup_steps >= decay_steps:
        raise ValueError(f"optimizer.warmup_steps={opt_cfg.warmup_steps} must be below the decay length {decay_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.learning_rate, warmup_steps=opt_cfg.warmup_steps,
        decay_steps=decay_steps, end_value=opt_cfg.learning_rate * opt_cfg.min_lr_ratio)


def _decay_mask(params):
    """Weight decay on matrices only: norms' scales, biases and 1-d gains are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.grad_clip_norm),
        optax.adamw(learning_rate_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                    weight_decay=opt_cfg.weight_decay, mask=_decay_mask),
    )
