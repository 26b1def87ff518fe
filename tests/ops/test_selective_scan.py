import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from chimera_jax.ops import selective_scan as ss


def _inputs(b=2, t=13, d=3, n=4, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 7)
    x = jax.random.normal(k[0], (b, t, d), jnp.float64)
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, t, d), jnp.float64))
    A = -jnp.exp(jax.random.normal(k[2], (d, n), jnp.float64))
    B = jax.random.normal(k[3], (b, t, n), jnp.float64)
    C = jax.random.normal(k[4], (b, t, n), jnp.float64)
    D = jax.random.normal(k[5], (d,), jnp.float64)
    h0 = jax.random.normal(k[6], (b, d, n), jnp.float64)
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 4, [7] * 13], jnp.int32)[:b, :t]
    return x, dt, A, B, C, D, h0, seg


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


run = jax.jit(ss.selective_scan, static_argnames=("impl", "chunk_size"))


@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
def test_parallel_equals_reference(chunk):
    with jax.enable_x64(True):
        x, dt, A, B, C, D, h0, seg = _inputs()
        y_ref, h_ref = run(x, dt, A, B, C, D, initial_state=h0, segment_ids=seg, impl="reference")
        y, h = run(x, dt, A, B, C, D, initial_state=h0, segment_ids=seg, chunk_size=chunk, impl="xla")
        assert _rel(y, y_ref) <= 1e-10 and _rel(h, h_ref) <= 1e-10


def test_reference_follows_the_recurrence_by_hand():
    with jax.enable_x64(True):
        x, dt, A, B, C, D, h0, _ = _inputs(b=1, t=3)
        y, _ = run(x, dt, A, B, C, D, initial_state=h0, impl="reference")
        h = h0[0]
        for i in range(3):
            h = jnp.exp(dt[0, i, :, None] * A) * h + (dt[0, i] * x[0, i])[:, None] * B[0, i]
            np.testing.assert_allclose(y[0, i], h @ C[0, i] + D * x[0, i], rtol=1e-12)


def test_segments_reset_state_exactly():
    with jax.enable_x64(True):
        x, dt, A, B, C, D, h0, seg = _inputs(b=1)
        y, _ = run(x, dt, A, B, C, D, initial_state=h0, segment_ids=seg, chunk_size=4, impl="xla")
        y3, _ = run(x[:, 9:], dt[:, 9:], A, B[:, 9:], C[:, 9:], D, chunk_size=4, impl="xla")  # document 3 alone
        np.testing.assert_allclose(y[:, 9:], y3, rtol=1e-10)


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        x, dt, A, B, C, D, h0, seg = _inputs(b=1, t=7, d=2, n=3)
        f = jax.jit(lambda x, dt, A, B, C, D, h0: ss.selective_scan(
            x, dt, A, B, C, D, initial_state=h0, segment_ids=seg[:, :7], chunk_size=3, impl="xla"))
        check_grads(f, (x, dt, A, B, C, D, h0), order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=1e-5)


def test_bad_shapes_are_named():
    with jax.enable_x64(True):
        x, dt, A, B, C, D, h0, _ = _inputs()
        with pytest.raises(ValueError, match="A must be"):
            ss.selective_scan(x, dt, A[:2], B, C, D)
        with pytest.raises(ValueError, match="initial_state"):
            ss.selective_scan(x, dt, A, B, C, D, initial_state=h0[:, :2])
