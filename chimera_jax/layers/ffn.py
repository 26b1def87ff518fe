"""Feed-forward blocks: SwiGLU (Shazeer, 2020)."""
from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections

from chimera_jax.layers import common


class SwiGLU(nn.Module):
    """y = W_down (silu(x W_gate) * x W_up); the hidden width is ``cfg.ffn_dim`` unless ``hidden`` is given."""

    cfg: ml_collections.FrozenConfigDict
    hidden: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [b t d] -> [b t d]
        cfg = self.cfg
        f = self.hidden or cfg.ffn_dim
        gate = common.dense(cfg, f, ("embed", "mlp"), name="gate_proj")(x)  # [b t f]
        up = common.dense(cfg, f, ("embed", "mlp"), name="up_proj")(x)      # [b t f]
        return common.dense(cfg, cfg.d_model, ("mlp", "embed"), name="down_proj")(nn.silu(gate) * up)
