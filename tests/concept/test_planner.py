"""The planner (HASSM stack over concept indices) is causal; its vector is the probability-weighted codebook mean."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chimera_jax.models.planner import Discriminator, Planner
from tests.concept.concept_testing import stage2_config


def _cfgs():
    c = stage2_config("unused", "unused")
    m = c.model
    m.dtype = m.param_dtype = "float64"
    return ml_collections.FrozenConfigDict(m), ml_collections.FrozenConfigDict(c.disc)


def test_planner_is_causal_and_predicts_the_weighted_codebook_mean():
    with jax.enable_x64(True):
        cfg, _ = _cfgs()
        k, t = cfg.num_codes, 12
        codebook = jax.random.normal(jax.random.PRNGKey(0), (k, cfg.concept_dim), jnp.float64)
        tokens = jax.random.randint(jax.random.PRNGKey(1), (2, t), 0, k + 1)
        model = Planner(cfg)
        params = model.init(jax.random.PRNGKey(2), tokens, codebook)
        apply = jax.jit(model.apply)
        logits, pred = apply(params, tokens, codebook)
        assert logits.shape == (2, t, k + 1) and pred.shape == (2, t, cfg.concept_dim)
        np.testing.assert_allclose(pred, jax.nn.softmax(logits[..., :k], -1) @ codebook, rtol=1e-10)
        for i in range(t):
            changed = tokens.at[:, i].set((tokens[:, i] + 3) % (k + 1))
            lg, pr = apply(params, changed, codebook)
            np.testing.assert_array_equal(lg[:, :i], logits[:, :i])
            np.testing.assert_array_equal(pr[:, :i], pred[:, :i])
            assert np.abs(lg[:, i] - logits[:, i]).max() > 0


def test_discriminator_scores_each_sequence_over_counted_positions():
    _, dcfg = _cfgs()
    disc = Discriminator(dcfg)
    v = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 8))
    mask = jnp.ones((3, 6)).at[:, 4:].set(0.0)
    params = disc.init(jax.random.PRNGKey(1), v, mask)
    out = disc.apply(params, v, mask)
    assert out.shape == (3,)
    # Positions outside the mask (here the last two, which nothing before them attends to) do not matter.
    np.testing.assert_allclose(disc.apply(params, v.at[:, 4:].set(9.0), mask), out, rtol=1e-5)
