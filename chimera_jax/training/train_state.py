"""Train state and the update rules every stage shares: gradient accumulation and skipping non-finite updates."""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array                 # int32 []: optimizer updates applied so far (skipped ones included)
    params: Any
    opt_state: Any
    model_state: Any                # non-parameter variables (e.g. MoE balancing biases); {} when none
    nonfinite_in_a_row: jax.Array   # int32 []: consecutive skipped updates (the loop stops past a limit)
    nonfinite_total: jax.Array      # int32 []
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, model_state=None) -> "TrainState":
        zero = jnp.zeros((), jnp.int32)
        return cls(step=zero, params=params, opt_state=tx.init(params), model_state=model_state or {},
                   nonfinite_in_a_row=zero, nonfinite_total=zero, tx=tx)

    def apply_gradients(self, grads, loss, model_state=None) -> tuple["TrainState", dict[str, jax.Array]]:
        """One optimizer update, unless the loss or a gradient is not finite: then the update is skipped
        (params, optimizer and model state unchanged) and counted."""
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = self.tx.update(grads, self.opt_state, self.params)
        new_params = optax.apply_updates(self.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        model_state = self.model_state if model_state is None else keep(model_state, self.model_state)
        skipped = (~finite).astype(jnp.int32)
        new = self.replace(step=self.step + 1, params=keep(new_params, self.params),
                           opt_state=keep(new_opt_state, self.opt_state), model_state=model_state,
                           nonfinite_in_a_row=jnp.where(finite, 0, self.nonfinite_in_a_row + 1),
                           nonfinite_total=self.nonfinite_total + skipped)
        return new, {"grad_norm": grad_norm, "skipped": skipped}


def split_microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """[b ...] -> [n b/n ...]: the leading axis is scanned over for gradient accumulation."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by optimizer.grad_accum_steps={n}")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree.map(split, batch)


def accumulated_grad(loss_fn: Callable, params, batch, rng, accum_steps: int):
    """Mean loss, aux and gradient over ``accum_steps`` microbatches of ``batch`` (one update for all).

    ``loss_fn(params, microbatch, rng) -> (loss, aux)``; aux values are averaged too.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss, aux), grads = grad_fn(params, batch, rng)
        return loss, aux, grads
    micro = split_microbatches(batch, accum_steps)

    def body(carry, xs):
        mb, i = xs
        (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    (loss0, aux0), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, aux0, g0))
    total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
    return jax.tree.map(lambda x: x / accum_steps, total)
