"""The chunkwise gated delta rule (impl='xla') against the token-by-token oracle, in float64 on the CPU."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera_jax.ops.gated_delta_rule import gated_delta_rule


def _inputs(key, b, t, h, dk, dv, dtype=jnp.float64):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (b, t, h, dk), dtype)
    k = jax.random.normal(ks[1], (b, t, h, dk), dtype)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # as the layer feeds it (L2-normalised keys)
    v = jax.random.normal(ks[2], (b, t, h, dv), dtype)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h), dtype)) / 2
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h), dtype))
    s0 = jax.random.normal(ks[5], (b, h, dk, dv), dtype) * 0.5
    return q, k, v, g, beta, s0


def _segments(b, t, rng):
    """Random packed documents, with boundaries inside chunks and at chunk edges."""
    ids = np.zeros((b, t), np.int32)
    for i in range(b):
        starts = np.sort(rng.choice(np.arange(1, t), size=min(3, t - 1), replace=False))
        ids[i] = 1 + np.searchsorted(starts, np.arange(t), side="right")
    return jnp.asarray(ids)


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / (jnp.linalg.norm(b.ravel()) + 1e-300))


def _loss(impl, seg, c):
    def f(q, k, v, g, beta, s0):
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, segment_ids=seg,
                                impl=impl, chunk_size=c)
        # Non-linear read-outs so that every output element gets a distinct cotangent.
        return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(s))
    return f


@pytest.mark.parametrize("b,t,h,d,c,packed", [
    (2, 27, 2, 8, 8, True),      # non-multiple of the chunk, boundaries inside chunks
    (1, 21, 1, 64, 16, True),   # K = V = 64
    (1, 11, 1, 128, 8, False),  # K = V = 128
])
def test_xla_matches_reference_values_and_gradients(b, t, h, d, c, packed):
    with jax.enable_x64(True):
        q, k, v, g, beta, s0 = _inputs(jax.random.key(t), b, t, h, d, d)
        seg = _segments(b, t, np.random.default_rng(t)) if packed else None
        o_ref, s_ref = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                        segment_ids=seg, impl="reference")
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, segment_ids=seg,
                                impl="xla", chunk_size=c)
        assert o.dtype == jnp.float64 and s.dtype == jnp.float64
        assert _rel(o, o_ref) < 1e-10 and _rel(s, s_ref) < 1e-10
        grads = jax.jit(jax.grad(_loss("xla", seg, c), argnums=range(6)))(q, k, v, g, beta, s0)
        grads_ref = jax.jit(jax.grad(_loss("reference", seg, c), argnums=range(6)))(q, k, v, g, beta, s0)
        for name, a, r in zip("q k v g beta initial_state".split(), grads, grads_ref):
            assert _rel(a, r) < 1e-10, name


def test_document_start_resets_state_exactly():
    """Outputs after a boundary equal a fresh run over that document alone (and ignore the initial state)."""
    with jax.enable_x64(True):
        q, k, v, g, beta, s0 = _inputs(jax.random.key(1), 1, 24, 1, 8, 8)
        seg = jnp.asarray([[3] * 11 + [4] * 13])
        o, _ = gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg, impl="xla", chunk_size=8)
        o2, _ = gated_delta_rule(*(x[:, 11:] for x in (q, k, v, g, beta)), impl="reference")
        np.testing.assert_allclose(o[:, 11:], o2, rtol=1e-12, atol=1e-12)


def test_plain_delta_rule_and_state_continuation():
    """g=None is the ungated delta rule; two calls chained through the final state equal one call."""
    with jax.enable_x64(True):
        q, k, v, _, beta, s0 = _inputs(jax.random.key(2), 2, 19, 2, 8, 16)
        o, s = gated_delta_rule(q, k, v, None, beta, initial_state=s0, output_final_state=True, impl="xla",
                                chunk_size=8)
        o_ref, s_ref = gated_delta_rule(q, k, v, jnp.zeros(beta.shape), beta, initial_state=s0,
                                        output_final_state=True, impl="reference")
        assert _rel(o, o_ref) < 1e-10 and _rel(s, s_ref) < 1e-10
        o1, s1 = gated_delta_rule(*(x[:, :7] for x in (q, k, v)), None, beta[:, :7], initial_state=s0,
                                  output_final_state=True, impl="xla", chunk_size=8)
        o2, s2 = gated_delta_rule(*(x[:, 7:] for x in (q, k, v)), None, beta[:, 7:], initial_state=s1,
                                  output_final_state=True, impl="xla", chunk_size=8)
        assert _rel(jnp.concatenate([o1, o2], 1), o_ref) < 1e-10 and _rel(s2, s_ref) < 1e-10


def test_bfloat16_inputs_keep_float32_state():
    q, k, v, g, beta, _ = _inputs(jax.random.key(3), 1, 40, 2, 16, 16, jnp.float32)
    o_ref, s_ref = gated_delta_rule(q, k, v, g, beta, output_final_state=True, impl="reference")
    bf = lambda x: x.astype(jnp.bfloat16)
    o, s = gated_delta_rule(bf(q), bf(k), bf(v), g, bf(beta), output_final_state=True, impl="xla", chunk_size=16)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert _rel(o.astype(jnp.float32), o_ref) < 3e-2 and _rel(s, s_ref) < 3e-2
    assert gated_delta_rule(q, k, v, g, beta, impl="xla")[1] is None


def test_auto_falls_back_with_debug_log(caplog):
    q, k, v, g, beta, _ = _inputs(jax.random.key(4), 1, 8, 1, 8, 8, jnp.float32)
    with caplog.at_level(logging.DEBUG, logger="chimera_jax.ops.gated_delta_rule"):
        o, _ = gated_delta_rule(q, k, v, g, beta, impl="auto", chunk_size=8)
    assert any("falling back" in r.getMessage() for r in caplog.records)
    o_ref, _ = gated_delta_rule(q, k, v, g, beta, impl="reference")
    assert _rel(o, o_ref) < 1e-5


def test_bad_shapes_name_the_field():
    q, k, v, g, beta, _ = _inputs(jax.random.key(5), 1, 8, 1, 8, 8, jnp.float32)
    with pytest.raises(ValueError, match="beta"):
        gated_delta_rule(q, k, v, g, beta[:, :4], impl="xla")
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, k, v, g, beta, initial_state=jnp.zeros((1, 1, 8, 4)), impl="xla")
    with pytest.raises(ValueError, match="impl"):
        gated_delta_rule(q, k, v, g, beta, impl="cuda")


def test_ut_solve_closed_form_gradient_matches_autodiff():
    """ut_solve's hand-written vjp equals autodiff through the matmul recursion of unit_lower_inverse."""
    from chimera_jax.ops.gated_delta_rule import _mm, unit_lower_inverse, ut_solve

    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.key(7), 5)
        c = 32
        a = jnp.tril(jax.random.normal(ks[0], (3, c, c), jnp.float64) * 0.3, -1)
        rv, rk = jax.random.normal(ks[1], (3, c, 5), jnp.float64), jax.random.normal(ks[2], (3, c, 4), jnp.float64)
        wv, wk = jax.random.normal(ks[3], (3, c, 5), jnp.float64), jax.random.normal(ks[4], (3, c, 4), jnp.float64)

        def loss(solve):
            return lambda a, rv, rk: sum(jnp.sum(jnp.sin(x) * w) for x, w in zip(solve(a, rv, rk), (wv, wk)))

        plain = lambda a, rv, rk: (_mm(unit_lower_inverse(a), rv), _mm(unit_lower_inverse(a), rk))
        got = jax.grad(loss(ut_solve), argnums=range(3))(a, rv, rk)
        want = jax.grad(loss(plain), argnums=range(3))(a, rv, rk)
        np.testing.assert_allclose(got[0], jnp.tril(want[0], -1), rtol=1e-10, atol=1e-12)
        for x, y in zip(got[1:], want[1:]):
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)
        # and the values: the solve really is (I + a)^-1 rhs
        np.testing.assert_allclose(ut_solve(a, rv, rk)[0], jnp.linalg.solve(jnp.eye(c) + a, rv), rtol=1e-10)


def test_chunk_prepare_names_a_bad_inverse():
    from chimera_jax.ops.gated_delta_rule import chunk_prepare

    z = jnp.zeros((1, 64, 1, 8))
    with pytest.raises(ValueError, match="inverse"):
        chunk_prepare(z, z, z, z[..., 0], z[..., 0], jnp.zeros((1, 64), bool), scale=1.0, chunk_size=64,
                      inverse="cusolver")


@pytest.mark.parametrize("prepare_vjp", ["closed_form", "autodiff"])
def test_remat_prepare_modes_agree_and_save_inverse_skips_its_recompute(prepare_vjp):
    """remat_prepare True / False / "save_inverse" give the same values and gradients (float64) under either
    backward of the intra-chunk part; "save_inverse" forms the inverse once (fewer products in the gradient's
    program than with True, which forms it again in the backward); a bad value names the argument."""
    with jax.enable_x64(True):
        q, k, v, g, beta, s0 = _inputs(jax.random.key(11), 1, 40, 2, 8, 8)

        def loss(mode):
            def f(q, k, v, g, beta):
                o, _ = gated_delta_rule(q, k, v, g, beta, initial_state=s0, impl="xla", chunk_size=16,
                                        remat_prepare=mode, prepare_vjp=prepare_vjp)
                return jnp.sum(jnp.sin(o))
            return f

        grads = {m: jax.grad(loss(m), argnums=range(5))(q, k, v, g, beta) for m in (True, False, "save_inverse")}
        for m in (False, "save_inverse"):
            for a, b in zip(grads[m], grads[True]):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        dots = {m: str(jax.make_jaxpr(jax.grad(loss(m), argnums=range(5)))(q, k, v, g, beta)).count("dot_general")
                for m in (True, "save_inverse")}
        assert dots["save_inverse"] < dots[True], dots
        with pytest.raises(ValueError, match="remat_prepare"):
            gated_delta_rule(q, k, v, g, beta, impl="xla", remat_prepare="sometimes")
        with pytest.raises(ValueError, match="prepare_vjp"):
            gated_delta_rule(q, k, v, g, beta, impl="xla", prepare_vjp="numeric")


def _prepare_loss(reset, c, **kw):
    """A scalar of every output of ``chunk_prepare`` (each with its own weight, so each gets its own cotangent)."""
    from chimera_jax.ops.gated_delta_rule import chunk_prepare

    def f(q, k, v, g, beta):
        out = chunk_prepare(q, k, v, g, beta, reset, scale=0.3, chunk_size=c, **kw)
        return sum(jnp.sum(jnp.sin((i + 1) * y.astype(jnp.float32 if y.dtype == jnp.bfloat16 else y.dtype)))
                   for i, y in enumerate(out))
    return f


@pytest.mark.parametrize("keep_inverse,inverse", [(True, "xla"), (False, "xla"), (True, "pallas")])
def test_prepare_closed_form_vjp_matches_autodiff(keep_inverse, inverse):
    """The hand-derived backward of the intra-chunk part equals autodiff's (float64, packed documents with
    starts inside chunks, the gamma output included), whether T is kept or formed again, by either inverse."""
    from chimera_jax.ops.common import resets

    with jax.enable_x64(True):
        b, t, h, c = 2, 96, 2, 32
        q, k, v, g, beta, _ = _inputs(jax.random.key(5), b, t, h, 16, 8)
        reset = resets(_segments(b, t, np.random.default_rng(5)), b, t)
        kw = dict(inverse=inverse, keep_inverse=keep_inverse)
        want = jax.value_and_grad(_prepare_loss(reset, c, vjp="autodiff", **kw), argnums=range(5))(q, k, v, g, beta)
        got = jax.value_and_grad(_prepare_loss(reset, c, vjp="closed_form", **kw), argnums=range(5))(q, k, v, g,
                                                                                                     beta)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-13)
        for name, a, r in zip("q k v g beta".split(), got[1], want[1]):
            assert _rel(a, r) < 1e-12, name


def test_prepare_closed_form_vjp_bfloat16_operands():
    """With bf16 operands and outputs (the pallas route for bf16 models) the closed-form gradient stays within
    bf16 error of the float32 one, as autodiff's does."""
    from chimera_jax.ops.common import resets

    b, t, h, c = 1, 128, 2, 64
    q, k, v, g, beta, _ = _inputs(jax.random.key(6), b, t, h, 64, 32, jnp.float32)
    reset = resets(_segments(b, t, np.random.default_rng(6)), b, t)
    bf = lambda x: x.astype(jnp.bfloat16)
    want = jax.grad(_prepare_loss(reset, c, vjp="autodiff"), argnums=range(5))(q, k, v, g, beta)
    low = dict(mm_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16)
    for vjp in ("closed_form", "autodiff"):
        f = _prepare_loss(reset, c, vjp=vjp, **low)
        got = jax.grad(lambda q, k, v, g, beta: f(bf(q), bf(k), bf(v), g, bf(beta)), argnums=range(5))(
            q, k, v, g, beta)
        for name, a, r in zip("q k v g beta".split(), got, want):
            assert _rel(a.astype(jnp.float32), r) < 1e-2, (vjp, name)


def test_prepare_options_only_with_the_default_prepare():
    from chimera_jax.ops.gated_delta_rule import chunk_prepare, gated_delta_rule_chunked

    q, k, v, g, beta, _ = _inputs(jax.random.key(1), 1, 16, 1, 8, 8, jnp.float32)
    with pytest.raises(ValueError, match="prepare_options"):
        gated_delta_rule_chunked(q, k, v, g, beta, scale=1.0, chunk_size=16, prepare=chunk_prepare,
                                 prepare_options=dict(inverse="xla"))
    with pytest.raises(ValueError, match="vjp"):
        chunk_prepare(q, k, v, g, beta, jnp.zeros((1, 16), bool), scale=1.0, chunk_size=16, vjp="numeric")

