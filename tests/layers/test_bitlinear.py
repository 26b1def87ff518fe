"""BitLinear: ternary weights per group, int8 activations per block, straight-through gradients, DenseGeneral hook."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from chimera_jax.layers import bitlinear, common


@pytest.mark.parametrize("shape", [(256, 6), (300, 2, 3), (50, 4)])
def test_effective_weights_take_three_values_per_group(shape):
    w = jax.random.normal(jax.random.PRNGKey(0), shape) * jnp.linspace(0.1, 2.0, shape[0])[:, None].reshape(
        (shape[0],) + (1,) * (len(shape) - 1))
    wq = np.asarray(bitlinear.ternary_weights(w)).reshape(shape[0], -1)
    wf = np.asarray(w).reshape(shape[0], -1)
    n_groups = -(-shape[0] // 128)
    for g in range(n_groups):
        rows = slice(128 * g, min(128 * (g + 1), shape[0]))
        for col in range(wq.shape[1]):
            vals = wq[rows, col]
            s = np.mean(np.abs(wf[rows, col])) + bitlinear.EPS  # absmean over the (possibly short) group
            np.testing.assert_allclose(np.unique(vals), [-s, 0.0, s], rtol=1e-6)
            # the code is round(w / s) clipped to [-1, 1]
            np.testing.assert_allclose(vals, s * np.clip(np.round(wf[rows, col] / s), -1, 1), rtol=1e-6)


def test_int8_activation_levels_per_block():
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 150)) * 3.0
    xq = np.asarray(bitlinear.int8_activations(x))
    xf = np.asarray(x)
    for start in range(0, 150, 64):
        blk = slice(start, min(start + 64, 150))
        scale = np.abs(xf[:, blk]).max(axis=1, keepdims=True) / 127.0 + bitlinear.EPS
        levels = xq[:, blk] / scale
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
        assert np.abs(levels).max() <= 127 + 1e-4
        np.testing.assert_allclose(xq[:, blk], xf[:, blk], atol=float(scale.max()) / 2 + 1e-6)


def test_straight_through_gradient_is_identity():
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 130))
    w = jax.random.normal(jax.random.PRNGKey(3), (130, 5))
    ct = jax.random.normal(jax.random.PRNGKey(4), (4, 5))

    def f(x, w):
        xq, wq = bitlinear.quantize_for_training(x, w)
        return jnp.sum((xq @ wq) * ct)

    gx, gw = jax.grad(f, argnums=(0, 1))(x, w)
    xq, wq = bitlinear.quantize_for_training(x, w)
    # STE: d/dx of sum(xq @ wq * ct) treats the quantisers as identities.
    np.testing.assert_allclose(gx, ct @ wq.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, xq.T @ ct, rtol=1e-5, atol=1e-5)
    # the gradient is not blocked where the rounding is flat: weights quantised to 0 still receive it
    zero = np.asarray(wq) == 0
    assert zero.any() and np.abs(np.asarray(gw)[zero]).max() > 0


def test_dense_general_ternary_switch():
    cfg = ml_collections.FrozenConfigDict(dict(d_model=16, dtype="float32", param_dtype="float32", norm_eps=1e-6,
                                               ternary=True))
    layer = common.dense(cfg, (2, 3), ("embed", "heads", "head_dim"))
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 4, 16))
    params = layer.init(jax.random.PRNGKey(6), x)
    y = layer.apply(params, x)
    w = params["params"]["kernel"].unbox()
    xq, wq = bitlinear.quantize_for_training(x, w)
    np.testing.assert_allclose(y, jnp.einsum("btd,dhk->bthk", xq, wq), rtol=1e-5, atol=1e-5)
    assert len(np.unique(np.asarray(wq)[:, 0, 0])) <= 3


def test_export_packed_matches_training_quantisation():
    ternary = pytest.importorskip("chimera_jax.ops.ternary")
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    params = {"params": {"block": {"q_proj": {"kernel": jax.random.normal(keys[0], (200, 2, 4))},
                                   "norm": {"scale": jnp.ones(200)}},
                         "moe": {"expert_up_kernel": jax.random.normal(keys[1], (3, 128, 8)),
                                 "router": jax.random.normal(keys[2], (128, 3))}}}
    conv = nn.LogicallyPartitioned(jnp.ones((4, 128)), ("conv", "heads"))  # short-conv taps stay float
    params["params"]["block"]["conv_q"] = {"kernel": conv}
    out = bitlinear.export_packed(params)
    assert set(out["params"]) == {"block", "moe"} and set(out["params"]["block"]) == {"q_proj"}
    assert set(out["params"]["moe"]) == {"expert_up_kernel"}  # routers stay in full precision

    def check(w, exported):
        wq = np.asarray(bitlinear.ternary_weights(w)).reshape(w.shape[0], -1)
        got = np.asarray(ternary.unpack_ternary(exported))[: w.shape[0]]
        # same codes; scales equal up to the op's bf16 storage (a code may flip right at a rounding boundary)
        same_code = np.sign(got) == np.sign(wq)
        assert same_code.mean() > 0.99
        np.testing.assert_allclose(got[same_code], wq[same_code], rtol=1e-2)

    q = out["params"]["block"]["q_proj"]["kernel"]
    assert q["shape"] == (200, 2, 4) and q["in_features"] == 200
    assert q["weight"].packed.shape == (64, 8) and q["weight"].scale.shape == (2, 8)
    check(params["params"]["block"]["q_proj"]["kernel"], q["weight"])
    m = out["params"]["moe"]["expert_up_kernel"]
    assert m["weight"].packed.shape == (3, 32, 8)
    for i in range(3):
        check(params["params"]["moe"]["expert_up_kernel"][i],
              ternary.TernaryWeight(m["weight"].packed[i], m["weight"].scale[i]))
