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


def _poison_updates(monkeypatch, bad_steps):
    """Makes the loss NaN on the updates whose state.step (updates done before it) is in ``bad_steps``."""
    from chimera_jax import stages

    real_build = stages.build

    def build(config):
        stage = real_build(config)
        inner = stage.train_step

        def train_step(state, batch, rng):
            bad = jnp.isin(state.step, jnp.asarray(bad_steps, jnp.int32))
            return inner(state, dict(batch, loss_mask=batch["loss_mask"] * jnp.where(bad, jnp.nan, 1.0)), rng)

        stage.train_step = train_step
        return stage

    monkeypatch.setattr(stages, "build", build)


@pytest.mark.parametrize("bad_steps,stops", [((1, 2), True), ((1, 4), False)])
def test_streak_between_log_steps_is_still_caught(tmp_path, monkeypatch, bad_steps, stops):
    """Host reads happen only every log_every = 4 steps; a streak of 2 on updates 2-3 has ended (the counter is back
    at 0) by the log step 4, and must still stop the run. Two isolated skips must not."""
    _poison_updates(monkeypatch, bad_steps)
    c = micro_config(max_consecutive_nonfinite=2, log_every=4, eval_every=8, checkpoint_every=8)
    if stops:
        with pytest.raises(loop.NonFiniteError, match=r"2 non-finite updates in a row by step 4 .*"
                                                      r"max_consecutive_nonfinite=2"):
            loop.train(c, str(tmp_path))
    else:
        loop.train(c, str(tmp_path))
    rows = {r["step"]: r for r in read_metrics(tmp_path) if "train/loss" in r}
    assert rows[4]["train/nonfinite_in_a_row"] == 0 and rows[4]["train/skipped"] == 0
    assert (8 in rows) != stops  # a stopped run logs no later step
    assert not any(k.startswith("train/nonfinite_longest") for r in rows.values() for k in r)
