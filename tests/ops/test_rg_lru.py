import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from chimera_jax.ops import rg_lru


def _inputs(b=2, t=13, d=5, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(k[0], (b, t, d), jnp.float64)
    gate_x = jax.nn.sigmoid(jax.random.normal(k[1], (b, t, d), jnp.float64))
    gate_a = jax.nn.sigmoid(jax.random.normal(k[2], (b, t, d), jnp.float64))
    a_param = jax.random.normal(k[3], (d,), jnp.float64)
    h0 = jax.random.normal(k[4], (b, d), jnp.float64)
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 4, [7] * 13], jnp.int32)[:b, :t]
    return x, gate_x, gate_a, a_param, h0, seg


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


run = jax.jit(rg_lru.rg_lru, static_argnames=("impl",))


def test_parallel_equals_reference():
    with jax.enable_x64(True):
        x, gx, ga, lam, h0, seg = _inputs()
        y_ref, h_ref = run(x, gx, ga, lam, initial_state=h0, segment_ids=seg, impl="reference")
        y, h = run(x, gx, ga, lam, initial_state=h0, segment_ids=seg, impl="xla")
        assert _rel(y, y_ref) <= 1e-10 and _rel(h, h_ref) <= 1e-10


def test_reference_follows_the_paper_by_hand():
    with jax.enable_x64(True):
        x, gx, ga, lam, h0, _ = _inputs(b=1, t=3)
        y, _ = run(x, gx, ga, lam, initial_state=h0, impl="reference")
        a_base = jax.nn.sigmoid(-lam)  # exp(-softplus(L)) = sigmoid(-L)
        h = h0[0]
        for i in range(3):
            a = a_base ** (8.0 * ga[0, i])
            h = a * h + jnp.sqrt(1 - a ** 2) * gx[0, i] * x[0, i]
            np.testing.assert_allclose(y[0, i], h, rtol=1e-12)


def test_segments_reset_state_exactly():
    with jax.enable_x64(True):
        x, gx, ga, lam, h0, seg = _inputs(b=1)
        y, _ = run(x, gx, ga, lam, initial_state=h0, segment_ids=seg, impl="xla")
        y3, _ = run(x[:, 9:], gx[:, 9:], ga[:, 9:], lam, impl="xla")
        np.testing.assert_allclose(y[:, 9:], y3, rtol=1e-10)


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        x, gx, ga, lam, h0, seg = _inputs(b=1, t=7, d=3)
        f = jax.jit(lambda *a: rg_lru.rg_lru(*a[:4], initial_state=a[4], segment_ids=seg[:, :7], impl="xla"))
        check_grads(f, (x, gx, ga, lam, h0), order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=1e-5)


def test_bad_shapes_are_named():
    with jax.enable_x64(True):
        x, gx, ga, lam, _, _ = _inputs()
        with pytest.raises(ValueError, match="a_param"):
            rg_lru.rg_lru(x, gx, ga, lam[:2])
