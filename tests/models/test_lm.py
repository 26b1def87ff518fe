import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from chimera_jax.models.lm import LM
from tests.lm_testing import micro_config


@pytest.mark.parametrize("overrides", [{}, {"model.tie_embeddings": False, "model.remat": "full"},
                                       {"model.pattern": "A SW", "model.attention.window": 4}])
def test_prefill_then_decode_equals_parallel(overrides):
    with jax.enable_x64(True):
        c = micro_config(**{"model.dtype": "float64", "model.param_dtype": "float64", **overrides})
        cfg = ml_collections.FrozenConfigDict(c.model)
        model = LM(cfg)
        tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 11), 0, 259)
        params = model.init(jax.random.PRNGKey(1), tokens)
        full, _ = model.apply(params, tokens)
        cache = model.init_cache(2, 11)
        part, cache = model.apply(params, tokens[:, :5], cache=cache)
        outs = [part]
        for i in range(5, 11):
            o, cache = model.apply(params, tokens[:, i:i + 1], cache=cache, decode=True)
            outs.append(o)
        np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_bad_pattern_is_named():
    c = micro_config(**{"model.pattern": "A ZZ"})
    with pytest.raises(ValueError, match=r"unknown layer codes \['ZZ'\]"):
        LM(ml_collections.FrozenConfigDict(c.model)).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))


LOOP = {"model.num_layers": 4, "model.loop.prelude": 1, "model.loop.core": 2, "model.loop.min_loops": 1,
        "model.loop.max_loops": 3, "model.loop.inference_loops": 2, "model.loop.backprop_last_k": 1}


def test_looped_model_decodes_like_its_parallel_path():
    with jax.enable_x64(True):
        c = micro_config(**{"model.dtype": "float64", "model.param_dtype": "float64", **LOOP})
        model = LM(ml_collections.FrozenConfigDict(c.model))
        tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 259)
        params = model.init(jax.random.PRNGKey(1), tokens)
        full, _ = model.apply(params, tokens)  # inference_loops for every sequence
        cache = model.init_cache(2, 9)
        assert len(cache) == 1 + 2 * 2 + 1  # prelude + core x inference loops + coda
        part, cache = model.apply(params, tokens[:, :4], cache=cache)
        outs = [part]
        for i in range(4, 9):
            o, cache = model.apply(params, tokens[:, i:i + 1], cache=cache, decode=True)
            outs.append(o)
        np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-10, atol=1e-10)
        # A per-sequence count of 2 loops equals the fixed inference count of 2.
        counted, _ = model.apply(params, tokens, loop_counts=jnp.array([2, 2]))
        np.testing.assert_allclose(counted, full, rtol=1e-12)
        one, _ = model.apply(params, tokens, loop_counts=jnp.array([1, 3]))
        assert not np.allclose(one, full)


def test_loop_backprop_is_truncated_to_the_last_k_loops():
    c = micro_config(**LOOP)
    model = LM(ml_collections.FrozenConfigDict(c.model))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 6), 0, 259)
    params = model.init(jax.random.PRNGKey(1), tokens)

    def grad_for(count):
        def loss(core_params):
            p = jax.tree.map(lambda x: x, params)
            p["params"]["layer_1"] = core_params
            return model.apply(p, tokens, loop_counts=jnp.array([count]))[0].sum()
        return jax.grad(loss)(params["params"]["layer_1"])

    # With k=1, the core's gradient comes from its last loop only; with 1 loop it is that loop's gradient.
    g1, g3 = grad_for(1), grad_for(3)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g3))
    assert any(np.abs(np.asarray(x)).sum() > 0 for x in jax.tree.leaves(g1))
