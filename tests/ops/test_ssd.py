import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from chimera_jax.ops import ssd


def _inputs(b=2, t=13, h=4, v=3, g=2, n=5, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(k[0], (b, t, h, v), jnp.float64)
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, t, h), jnp.float64))
    A = -jnp.exp(jax.random.normal(k[2], (h,), jnp.float64))
    B = jax.random.normal(k[3], (b, t, g, n), jnp.float64)
    C = jax.random.normal(k[4], (b, t, g, n), jnp.float64)
    s0 = jax.random.normal(k[5], (b, h, v, n), jnp.float64)
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 4, [7] * 13], jnp.int32)[:b, :t]
    return x, dt, A, B, C, s0, seg


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 16])
def test_chunked_equals_reference(chunk):
    with jax.enable_x64(True):
        x, dt, A, B, C, s0, seg = _inputs()
        y_ref, s_ref = jax.jit(ssd.ssd, static_argnames="impl")(x, dt, A, B, C, initial_state=s0,
                                                                 segment_ids=seg, impl="reference")
        y, s = jax.jit(ssd.ssd, static_argnames=("impl", "chunk_size"))(x, dt, A, B, C, initial_state=s0,
                                                                       segment_ids=seg, chunk_size=chunk, impl="xla")
        assert _rel(y, y_ref) <= 1e-10 and _rel(s, s_ref) <= 1e-10


def test_reference_follows_the_recurrence_by_hand():
    with jax.enable_x64(True):
        x, dt, A, B, C, s0, _ = _inputs(b=1, t=3, h=2, g=1)
        y, _ = ssd.ssd(x, dt, A, B, C, initial_state=s0, impl="reference")
        s = s0[0]
        for i in range(3):
            s = jnp.exp(dt[0, i] * A)[:, None, None] * s + (dt[0, i, :, None] * x[0, i])[..., None] * B[0, i, 0]
            np.testing.assert_allclose(y[0, i], jnp.einsum("hvn,n->hv", s, C[0, i, 0]), rtol=1e-12)


def test_segments_reset_state_exactly():
    with jax.enable_x64(True):
        x, dt, A, B, C, s0, seg = _inputs(b=1)
        run = jax.jit(ssd.ssd, static_argnames=("impl", "chunk_size"))
        y, _ = run(x, dt, A, B, C, initial_state=s0, segment_ids=seg[:1], chunk_size=4)
        y3, _ = run(x[:, 9:], dt[:, 9:], A, B[:, 9:], C[:, 9:], chunk_size=4)  # third document alone
        np.testing.assert_allclose(y[:, 9:], y3, rtol=1e-10)


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        x, dt, A, B, C, s0, seg = _inputs(b=1, t=7, h=2, v=2, g=1, n=3)
        f = jax.jit(lambda x, dt, A, B, C, s0: ssd.ssd(x, dt, A, B, C, initial_state=s0, segment_ids=seg[:1, :7],
                                                       chunk_size=3, impl="xla"))
        check_grads(f, (x, dt, A, B, C, s0), order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=1e-5)


def test_bad_shapes_are_named():
    with jax.enable_x64(True):
        x, dt, A, B, C, _, _ = _inputs()
        with pytest.raises(ValueError, match="dt"):
            ssd.ssd(x, dt[:, :, :2], A, B, C)
        with pytest.raises(ValueError, match="multiple"):
            ssd.ssd(x, dt, A, B[:, :, :1].repeat(3, 2), C[:, :, :1].repeat(3, 2))
