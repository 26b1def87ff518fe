"""Mixture-of-experts feed-forward (DeepSeekMoE / DeepSeek-V3 style): shared experts plus top-k routed SwiGLU experts.

Routing: affinities ``s = sigmoid(x W_router)`` [m e]; the top-k experts of ``s + bias`` are selected, and the
selected experts are weighted by ``s`` alone (optionally normalised over the k picks and times ``route_scale``).
The bias therefore only steers *which* experts are picked, never how much they contribute.

Auxiliary-loss-free balancing (Wang et al., 2024): after each training step, for every MoE layer,
``bias_i += gamma * sign(mean_j load_j - load_i)``, where ``load_i`` counts the (non-padding) tokens that picked
expert i in that step. The bias lives in the non-parameter collection ``moe_stats`` (never touched by the
optimizer) and the forward pass sows the loads in ``intermediates``; the train step applies the update:

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)   # loss_fn applies the model with
        # {'params': params, 'moe_stats': moe_stats}, mutable=['intermediates'] and returns the sown tree in aux
    moe_stats = moe.update_bias(moe_stats, aux['intermediates'], rate=cfg.moe.bias_update_rate)

Optional sequence-wise balance loss (DeepSeek-V3, eq. 17-20): ``seq_aux_loss * sum_i f_i P_i`` per sequence,
averaged over the batch, sown as ``intermediates/.../balance_loss``; ``moe.balance_loss(intermediates)`` sums it
over layers for the train step to add to the loss.

Dispatch: ``dropless`` sorts the (token, expert) assignments by expert and runs the experts as grouped matmuls
(``jax.lax.ragged_dot``) — no token is dropped. ``capacity`` gives each expert ``ceil(capacity_factor * m * k / e)``
slots, fills them in token order (later tokens overflowing an expert are dropped from it; the shared experts and
the residual still carry them) and runs the experts as one batched einsum over an [e c d] buffer, which shards
over the ``expert`` mesh axis. ``experts_reference`` (a loop over experts) is the oracle for both.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common
from chimera_jax.layers.ffn import SwiGLU

DISPATCHES = ("dropless", "capacity")


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``moe`` of the model config.

    num_experts: routed experts (e).   top_k: routed experts per token (k).
    expert_dim: hidden width of each routed SwiGLU expert (f).
    num_shared_experts: experts every token goes through (0 = none).   shared_dim: hidden width of each shared
      expert (0 = expert_dim); the shared experts run as one SwiGLU of width num_shared_experts * shared_dim.
    normalize_weights: divide the k selected affinities by their sum.   route_scale: multiplies the routing weights.
    bias_balance: use the aux-loss-free bias (False keeps it at zero in selection).
    bias_update_rate: gamma of bias_i += gamma * sign(mean load - load_i), applied by ``update_bias``.
    seq_aux_loss: coefficient of the sequence-wise balance loss (0 = off).
    dispatch: 'dropless' (grouped matmuls, nothing dropped) | 'capacity' (fixed slots per expert).
    capacity_factor: slots per expert = ceil(capacity_factor * tokens * k / e) under 'capacity'.
    """
    return ml_collections.ConfigDict(dict(num_experts=8, top_k=2, expert_dim=64, num_shared_experts=1, shared_dim=0,
                                          normalize_weights=True, route_scale=1.0, bias_balance=True,
                                          bias_update_rate=1e-3, seq_aux_loss=0.0, dispatch="dropless",
                                          capacity_factor=1.25))


# --------------------------------------------------------------------------------------------------- routing

def route(logits: jax.Array, bias: jax.Array, top_k: int, *, normalize: bool = True, route_scale: float = 1.0
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sigmoid top-k routing. logits [m e], bias [e] -> (experts [m k] int32, weights [m k], affinities [m e])."""
    scores = jax.nn.sigmoid(logits)  # [m e]
    _, experts = jax.lax.top_k(scores + jax.lax.stop_gradient(bias), top_k)  # the bias selects ...
    weights = jnp.take_along_axis(scores, experts, axis=-1)  # [m k]  ... but only s weights
    if normalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return experts.astype(jnp.int32), weights * route_scale, scores


def expert_loads(experts: jax.Array, num_experts: int, mask: jax.Array | None = None) -> jax.Array:
    """[e] number of (unmasked) tokens that picked each expert; experts [m k], mask [m] bool."""
    onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [m k e]
    if mask is not None:
        onehot = onehot * mask[:, None, None]
    return jnp.sum(onehot, axis=(0, 1))


def sequence_balance_loss(scores: jax.Array, experts: jax.Array, top_k: int, mask: jax.Array) -> jax.Array:
    """DeepSeek-V3 sequence-wise balance loss sum_i f_i P_i, averaged over sequences (coefficient not applied).

    scores [b t e] affinities, experts [b t k], mask [b t] (False = padding). f_i = e / (k T) * #tokens picking i,
    P_i = mean over the sequence of the affinities normalised over all experts.
    """
    e = scores.shape[-1]
    maskf = mask.astype(scores.dtype)
    n_tok = jnp.maximum(jnp.sum(maskf, axis=1), 1.0)  # [b]
    picked = jnp.sum(jax.nn.one_hot(experts, e, dtype=scores.dtype), axis=2) * maskf[..., None]  # [b t e]
    f = e / (top_k * n_tok[:, None]) * jnp.sum(picked, axis=1)  # [b e]; a count, no gradient flows through it
    p = jnp.sum(scores / jnp.sum(scores, axis=-1, keepdims=True) * maskf[..., None], axis=1) / n_tok[:, None]
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1))


# --------------------------------------------------------------------------------------------------- experts

def _swiglu_experts_reference(x, w_gate, w_up, w_down, e_idx):
    h = jax.nn.silu(x @ w_gate[e_idx]) * (x @ w_up[e_idx])
    return h @ w_down[e_idx]


def experts_reference(x, experts, weights, w_gate, w_up, w_down) -> jax.Array:
    """The oracle: every expert on every token, masked to its routing weight. x [m d] -> [m d]."""
    y = jnp.zeros_like(x)
    for i in range(w_gate.shape[0]):
        gate_i = jnp.sum(jnp.where(experts == i, weights, 0.0), axis=-1)  # [m]
        y = y + gate_i[:, None].astype(x.dtype) * _swiglu_experts_reference(x, w_gate, w_up, w_down, i)
    return y


def _sorted_assignments(experts: jax.Array, weights: jax.Array):
    """Flattens [m k] assignments and sorts them by expert (stable: token order kept inside an expert)."""
    k = experts.shape[1]
    flat = experts.reshape(-1)  # [m*k]
    order = jnp.argsort(flat, stable=True)
    return flat[order], order // k, weights.reshape(-1)[order]  # expert, token, weight of each sorted row


def experts_dropless(x, experts, weights, w_gate, w_up, w_down, *, act_quant=None) -> jax.Array:
    """Grouped-matmul dispatch: nothing dropped. x [m d], experts/weights [m k], w_* [e d f] / [e f d] -> [m d]."""
    e = w_gate.shape[0]
    q = act_quant or (lambda a: a)
    e_sorted, tok, w_sorted = _sorted_assignments(experts, weights)
    sizes = jnp.bincount(e_sorted, length=e).astype(jnp.int32)  # [e]
    xs = q(x)[tok]  # [m*k d]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)  # [m*k f]
    out = jax.lax.ragged_dot(q(h), w_down, sizes)  # [m*k d]
    out = out * w_sorted[:, None].astype(out.dtype)
    return jnp.zeros_like(x).at[tok].add(out.astype(x.dtype))


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def experts_capacity(x, experts, weights, w_gate, w_up, w_down, *, capacity_factor: float, act_quant=None
                     ) -> jax.Array:
    """Fixed-slot dispatch: each expert takes at most c tokens, first come first served (token order).

    x [m d] -> [m d]; assignments beyond an expert's c slots contribute nothing.
    """
    m, d = x.shape
    e = w_gate.shape[0]
    c = capacity(m, experts.shape[1], e, capacity_factor)
    q = act_quant or (lambda a: a)
    e_sorted, tok, w_sorted = _sorted_assignments(experts, weights)
    sizes = jnp.bincount(e_sorted, length=e)
    starts = jnp.cumsum(sizes) - sizes  # [e] first sorted row of each expert
    rank = jnp.arange(e_sorted.shape[0]) - starts[e_sorted]  # position of the row inside its expert
    slot = jnp.where(rank < c, e_sorted * c + rank, e * c)  # e * c = out of range = dropped
    buf = jnp.zeros((e * c, d), x.dtype).at[slot].set(q(x)[tok], mode="drop").reshape(e, c, d)  # [e c d]
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, w_gate)) * jnp.einsum("ecd,edf->ecf", buf, w_up)
    out = jnp.einsum("ecf,efd->ecd", q(h), w_down).reshape(e * c, d)
    out = jnp.take(out, slot, axis=0, mode="fill", fill_value=0)  # [m*k d], zeros for the dropped rows
    out = out * w_sorted[:, None].astype(out.dtype)
    return jnp.zeros_like(x).at[tok].add(out)


# ---------------------------------------------------------------------------------------------------- module

class MoE(nn.Module):
    """Shared + routed SwiGLU experts; ``y = MoE(cfg)(x, segment_ids=None)`` with x, y [b t d].

    Variables: ``params`` (router, expert weights with the ``expert`` logical axis, shared experts) and
    ``moe_stats/bias`` [e] (selection bias; pass the collection on every apply). Sows into ``intermediates``:
    ``expert_load`` [e] (tokens per expert), ``max_load_ratio`` (max / mean load) and, when ``seq_aux_loss`` > 0,
    ``balance_loss`` (already times its coefficient).
    """

    cfg: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        cfg, mc = self.cfg, self.cfg.moe
        b, t, d = x.shape
        e, k = mc.num_experts, mc.top_k
        if not 1 <= k <= e:
            raise ValueError(f"model.moe.top_k={k} must lie in [1, num_experts={e}]")
        if mc.dispatch not in DISPATCHES:
            raise ValueError(f"model.moe.dispatch must be one of {DISPATCHES}, got {mc.dispatch!r}")
        dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
        f = mc.expert_dim

        # The router stays in full precision (also under ternary=True): a flipped choice costs a whole expert.
        w_router = common.param(self, "router", nn.initializers.normal(d ** -0.5), (d, e), ("embed", None), pdtype)
        bias = self.variable("moe_stats", "bias", jnp.zeros, (e,), jnp.float32).value
        if not mc.bias_balance:
            bias = jnp.zeros_like(bias)

        xm = x.reshape(b * t, d)  # [m d]
        rdt = jnp.promote_types(x.dtype, jnp.float32)
        logits = xm.astype(rdt) @ w_router.astype(rdt)  # [m e]
        experts, weights, scores = route(logits, bias, k, normalize=mc.normalize_weights,
                                         route_scale=mc.route_scale)
        mask = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0  # id 0 = padding
        weights = weights * mask.reshape(-1, 1)

        load = expert_loads(experts, e, mask.reshape(-1))
        self.sow("intermediates", "expert_load", load)
        self.sow("intermediates", "max_load_ratio", jnp.max(load) / jnp.maximum(jnp.mean(load), 1e-9))
        if mc.seq_aux_loss > 0:
            l_bal = sequence_balance_loss(scores.reshape(b, t, e), experts.reshape(b, t, k), k, mask)
            self.sow("intermediates", "balance_loss", mc.seq_aux_loss * l_bal)

        init = lambda fan_in: nn.initializers.normal(fan_in ** -0.5)
        w_gate = common.param(self, "expert_gate_kernel", init(d), (e, d, f), ("expert", "embed", "mlp"), pdtype)
        w_up = common.param(self, "expert_up_kernel", init(d), (e, d, f), ("expert", "embed", "mlp"), pdtype)
        w_down = common.param(self, "expert_down_kernel", init(f), (e, f, d), ("expert", "mlp", "embed"), pdtype)
        act_quant = None
        if cfg.get("ternary", False):
            from chimera_jax.layers import bitlinear

            w_gate, w_up, w_down = (jax.vmap(bitlinear.quantize_weights)(w) for w in (w_gate, w_up, w_down))
            act_quant = bitlinear.quantize_activations
        w_gate, w_up, w_down = (w.astype(dtype) for w in (w_gate, w_up, w_down))
        xm = xm.astype(dtype)
        if mc.dispatch == "dropless":
            y = experts_dropless(xm, experts, weights, w_gate, w_up, w_down, act_quant=act_quant)
        else:
            y = experts_capacity(xm, experts, weights, w_gate, w_up, w_down, capacity_factor=mc.capacity_factor,
                                 act_quant=act_quant)
        y = y.reshape(b, t, d)

        if mc.num_shared_experts:
            width = mc.num_shared_experts * (mc.shared_dim or f)
            y = y + SwiGLU(cfg, hidden=width, name="shared")(x)
        return y.astype(dtype)


# ------------------------------------------------------------------------------------------- train-step hooks

def _sum_sown(v: Any) -> jax.Array:
    # sow() appends to a tuple: a module called several times (looped depth) contributes each call.
    return sum(v) if isinstance(v, tuple) else v


def update_bias(moe_stats: Any, intermediates: Any, rate: float = 1e-3) -> Any:
    """bias_i += rate * sign(mean load - load_i) for every MoE layer; a pure function of (stats, sown loads).

    ``moe_stats`` and ``intermediates`` are the collections' trees (with or without their top-level collection
    key); each ``bias`` is matched with the ``expert_load`` sown at the same module path. Layers stacked by
    ``nn.scan`` carry a leading layer axis on both, which the update keeps (mean over the last, expert, axis).
    """

    def walk(stats, inter, path):
        out = {}
        for key, value in stats.items():
            if key == "bias" and not hasattr(value, "items"):
                if inter is None or "expert_load" not in inter:
                    raise KeyError(f"no intermediates/expert_load sown at {'/'.join(path) or '/'} to update "
                                   f"moe_stats bias; apply the model with mutable=['intermediates']")
                load = _sum_sown(inter["expert_load"])
                delta = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
                out[key] = value + rate * delta.astype(value.dtype)
            else:
                sub = None if inter is None else inter.get(key)
                out[key] = walk(value, sub, path + (str(key),))
        return out

    stats = moe_stats.get("moe_stats", moe_stats) if hasattr(moe_stats, "get") else moe_stats
    inter = intermediates.get("intermediates", intermediates) if hasattr(intermediates, "get") else intermediates
    new = walk(stats, inter, ())
    return {"moe_stats": new} if "moe_stats" in moe_stats else new


def balance_loss(intermediates: Any) -> jax.Array:
    """Sum of every sown ``balance_loss`` (0.0 when the sequence-wise loss is off)."""
    total = jnp.zeros((), jnp.float32)
    flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
    for path, leaf in flat:
        if any(getattr(p, "key", None) == "balance_loss" for p in path):
            total = total + jnp.sum(leaf)
    return total
