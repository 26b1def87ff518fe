"""Sharded equals unsharded: one train step on 1 device and on a 2x2x2 (data x fsdp x tensor) mesh of 8 CPU devices."""
import flax.linen as nn
import jax
import numpy as np

from chimera_jax import stages
from chimera_jax.training import sharding
from tests.lm_testing import micro_config


def _one_step(config, devices):
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = list(sharding.LOGICAL_RULES)
    stage = stages.build(config)
    shardings, _ = sharding.state_shardings(stage.init, jax.random.PRNGKey(0), mesh, rules)
    with sharding.on_mesh(mesh, rules):
        state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=shardings)(jax.random.PRNGKey(0))
        batch = sharding.global_batch(next(stage.data.train), mesh)
        step = jax.jit(stage.train_step, in_shardings=(shardings, sharding.batch_sharding(mesh), None),
                       out_shardings=(shardings, None))
        new_state, metrics = step(state, batch, jax.random.PRNGKey(1))
    return state, new_state, metrics


def test_one_step_on_8_devices_equals_one_device():
    assert jax.device_count() >= 8, "tests/conftest.py asks XLA for 8 host devices"
    c1 = micro_config()
    c1.mesh.data, c1.mesh.fsdp, c1.mesh.tensor = 1, 1, 1
    c8 = micro_config()
    c8.mesh.data, c8.mesh.fsdp, c8.mesh.tensor = 2, 2, 2
    _, s1, m1 = _one_step(c1, jax.devices()[:1])
    init8, s8, m8 = _one_step(c8, jax.devices()[:8])
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)

    # The parameters really are split: each device holds a fraction of the big matrices.
    params = init8.params
    q = params["layer_0"]["mixer"]["q_proj"]["kernel"]   # [embed heads head_dim] -> (fsdp, tensor, None)
    emb = params["embedding"]                            # [vocab embed] -> (tensor, fsdp)
    for arr in (q, emb):
        shard = arr.addressable_shards[0].data
        assert shard.size * 4 == arr.size, (arr.shape, shard.shape, arr.sharding)
    assert len({d for s in q.addressable_shards for d in [s.device]}) == 8
    # optimizer moments follow their parameters
    mu = init8.opt_state[1][0].mu["layer_0"]["mixer"]["q_proj"]["kernel"]
    assert mu.sharding == q.sharding


def test_bad_mesh_is_named():
    import pytest

    c = micro_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 3, 1, 1
    with pytest.raises(ValueError, match="config.mesh"):
        sharding.make_mesh(c.mesh, jax.devices()[:8])
