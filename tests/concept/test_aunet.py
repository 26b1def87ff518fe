"""AU-Net byte decoder: strict causality, the depthwise conv against lax.conv, sampling consistency."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chimera_jax.layers import aunet


def _cfg(dtype="float64"):
    a = aunet.default_config()
    a.widths, a.stride, a.kernel = (8, 12, 16), 2, 3
    return ml_collections.FrozenConfigDict(dict(d_model=8, dtype=dtype, param_dtype=dtype, norm_eps=1e-6,
                                                ternary=False, aunet=a))


def test_depthwise_conv_equals_lax_conv():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 5), jnp.float64)
        k = jax.random.normal(jax.random.PRNGKey(1), (4, 5), jnp.float64)
        np.testing.assert_allclose(aunet.causal_depthwise_conv(x, k), aunet.causal_depthwise_conv_reference(x, k),
                                   atol=1e-12)


def test_aunet_is_strictly_causal():
    with jax.enable_x64(True):
        cfg = _cfg()
        model = aunet.AUNet(cfg)
        s = 16
        tokens = jax.random.randint(jax.random.PRNGKey(0), (2, s), 0, 256)
        concept = jax.random.normal(jax.random.PRNGKey(1), (2, 7), jnp.float64)
        params = model.init(jax.random.PRNGKey(2), tokens, concept)
        apply = jax.jit(model.apply)
        base = apply(params, tokens, concept)
        assert base.shape == (2, s, 256)
        for t in range(s):
            changed = tokens.at[:, t].set((tokens[:, t] + 17) % 256)
            out = apply(params, changed, concept)
            # Changing byte t changes no logit at positions <= t ...
            np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
            # ... and the very next position does see it.
            if t + 1 < s:
                assert np.abs(out[:, t + 1] - base[:, t + 1]).max() > 0
        # The concept reaches every position, the first included.
        out = apply(params, tokens, concept + 1.0)
        assert np.all(np.abs(out - base).max(-1) > 0)


def test_sampling_is_consistent_with_teacher_forcing():
    cfg = _cfg("float32")
    model = aunet.AUNet(cfg)
    concept = jax.random.normal(jax.random.PRNGKey(1), (3, 7))
    params = model.init(jax.random.PRNGKey(2), jnp.zeros((3, 8), jnp.int32), concept)
    fn = lambda t, c: model.apply(params, t, c)
    greedy = jax.jit(lambda c: aunet.sample(fn, c, 8, jax.random.PRNGKey(0), temperature=0.0))(concept)
    np.testing.assert_array_equal(jnp.argmax(fn(greedy, concept), -1), greedy)
