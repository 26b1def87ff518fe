import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from chimera_jax.ops import mlstm


def _inputs(b=2, t=13, h=2, dk=3, dv=4, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 8)
    q = jax.random.normal(k[0], (b, t, h, dk), jnp.float64)
    kk = jax.random.normal(k[1], (b, t, h, dk), jnp.float64) / np.sqrt(dk)
    v = jax.random.normal(k[2], (b, t, h, dv), jnp.float64)
    ig = 2.0 * jax.random.normal(k[3], (b, t, h), jnp.float64)  # wide, so the stabiliser really moves
    fg = 2.0 + 2.0 * jax.random.normal(k[4], (b, t, h), jnp.float64)
    s0 = mlstm.MLSTMState(C=jax.random.normal(k[5], (b, h, dk, dv), jnp.float64),
                          n=jax.random.normal(k[6], (b, h, dk), jnp.float64),
                          m=jax.random.normal(k[7], (b, h), jnp.float64))
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 4, [7] * 13], jnp.int32)[:b, :t]
    return q, kk, v, ig, fg, s0, seg


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


run = jax.jit(mlstm.mlstm, static_argnames=("impl", "chunk_size"))


def _true_scale(s):
    """(C, n) times exp(m): the state without its stabiliser, comparable between forms."""
    e = jnp.exp(s.m)
    return s.C * e[..., None, None], s.n * e[..., None]


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_equals_recurrent(chunk):
    with jax.enable_x64(True):
        q, k, v, ig, fg, s0, seg = _inputs()
        y_ref, s_ref = run(q, k, v, ig, fg, initial_state=s0, segment_ids=seg, impl="reference")
        y, s = run(q, k, v, ig, fg, initial_state=s0, segment_ids=seg, chunk_size=chunk, impl="xla")
        assert _rel(y, y_ref) <= 1e-10
        for a, a_ref in zip(_true_scale(s), _true_scale(s_ref)):
            assert _rel(a, a_ref) <= 1e-10
        assert float(jnp.max(jnp.abs(s.m - s_ref.m))) <= 1e-10  # both track the same running max


def test_recurrent_form_equals_unstabilised_paper_form():
    with jax.enable_x64(True):
        q, k, v, ig, fg, s0, _ = _inputs(b=1, t=4)
        y, _ = run(q, k, v, ig, fg, initial_state=s0, impl="reference")
        C, n = _true_scale(s0)
        C, n = C[0], n[0]
        for i in range(4):
            f, ii = jax.nn.sigmoid(fg[0, i]), jnp.exp(ig[0, i])  # [h]
            C = f[:, None, None] * C + ii[:, None, None] * k[0, i][:, :, None] * v[0, i][:, None, :]
            n = f[:, None] * n + ii[:, None] * k[0, i]
            den = jnp.maximum(jnp.abs(jnp.einsum("hk,hk->h", q[0, i], n)), 1.0)
            np.testing.assert_allclose(y[0, i], jnp.einsum("hk,hkv->hv", q[0, i], C) / den[:, None], rtol=1e-10)


def test_segments_reset_state_exactly():
    with jax.enable_x64(True):
        q, k, v, ig, fg, s0, seg = _inputs(b=1)
        y, _ = run(q, k, v, ig, fg, initial_state=s0, segment_ids=seg, chunk_size=4, impl="xla")
        y3, _ = run(q[:, 9:], k[:, 9:], v[:, 9:], ig[:, 9:], fg[:, 9:], chunk_size=4, impl="xla")
        np.testing.assert_allclose(y[:, 9:], y3, rtol=1e-10)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_gradients_match_finite_differences(impl):
    with jax.enable_x64(True):
        q, k, v, ig, fg, s0, seg = _inputs(b=1, t=7, h=1, dk=2, dv=2)
        f = jax.jit(lambda q, k, v, ig, fg, C, n: mlstm.mlstm(
            q, k, v, ig, fg, initial_state=mlstm.MLSTMState(C, n, s0.m), segment_ids=seg[:, :7], chunk_size=3,
            impl=impl))
        check_grads(f, (q, k, v, ig, fg, s0.C, s0.n), order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=1e-5)


def test_bad_shapes_are_named():
    with jax.enable_x64(True):
        q, k, v, ig, fg, s0, _ = _inputs()
        with pytest.raises(ValueError, match="f_gate"):
            mlstm.mlstm(q, k, v, ig, fg[..., :1])
        with pytest.raises(ValueError, match="initial_state"):
            mlstm.mlstm(q, k, v, ig, fg, initial_state=s0._replace(m=s0.m[:, :1]))
