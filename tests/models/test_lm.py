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
