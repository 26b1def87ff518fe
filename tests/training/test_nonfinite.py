import jax
import jax.numpy as jnp
import optax
import pytest

from chimera_jax.training import loop
from chimera_jax.training.metrics import read_metrics
from chimera_jax.training.train_state import TrainState, accumulated_grad
from tests.lm_testing import micro_config


def test_non_finite_update_is_skipped_and_counted():
    params = {"w": jnp.ones((2, 2))}
    state = TrainState.create(params, optax.sgd(0.1))
    bad = {"w": jnp.full((2, 2), jnp.nan)}
    new, m = state.apply_gradients(bad, jnp.asarray(1.0))
    assert int(m["skipped"]) == 1 and int(new.nonfinite_in_a_row) == 1 and int(new.step) == 1
    assert jnp.array_equal(new.params["w"], params["w"])
    new, m = new.apply_gradients({"w": jnp.ones((2, 2))}, jnp.asarray(1.0))
    assert int(m["skipped"]) == 0 and int(new.nonfinite_in_a_row) == 0 and int(new.nonfinite_total) == 1
    assert not jnp.array_equal(new.params["w"], params["w"])


def test_run_stops_after_too_many_non_finite_updates(tmp_path):
    c = micro_config(max_consecutive_nonfinite=2)
    c.optimizer.learning_rate = float("nan")  # poisons the params... but the update is rejected first
    c.optimizer.grad_clip_norm = float("inf")
    # A NaN learning rate gives NaN updates with finite gradients: make the loss itself NaN instead.
    c.model.init_std = float("nan")
    with pytest.raises(loop.NonFiniteError, match="max_consecutive_nonfinite"):
        loop.train(c, str(tmp_path))
    rows = [r for r in read_metrics(tmp_path) if "train/skipped" in r]
    assert [r["train/skipped"] for r in rows] == [1.0, 1.0]


def test_gradient_accumulation_equals_one_big_batch():
    w = jnp.arange(6.0).reshape(3, 2)
    batch = {"x": jax.random.normal(jax.random.PRNGKey(0), (8, 3))}

    def loss_fn(p, mb, rng):
        loss = jnp.mean((mb["x"] @ p) ** 2)
        return loss, {"l": loss}

    l1, _, g1 = accumulated_grad(loss_fn, w, batch, jax.random.PRNGKey(0), 1)
    l4, _, g4 = accumulated_grad(loss_fn, w, batch, jax.random.PRNGKey(0), 4)
    assert jnp.allclose(l1, l4, rtol=1e-6) and jnp.allclose(g1, g4, rtol=1e-5)
