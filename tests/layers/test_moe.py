"""MoE: dispatch against the loop-over-experts oracle, routing semantics, aux-loss-free bias balancing."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from chimera_jax.layers import moe


def make_cfg(dtype="float64", d_model=16, ternary=False, **moe_fields):
    mc = moe.default_config()
    mc.update(dict(num_experts=8, top_k=2, expert_dim=8, num_shared_experts=1, shared_dim=4))
    mc.update(moe_fields)
    return ml_collections.FrozenConfigDict(dict(d_model=d_model, dtype=dtype, param_dtype=dtype, norm_eps=1e-6,
                                                ternary=ternary, moe=mc))


def _routing(m, variables, x):
    """The module's own routing decision for x, recomputed from its variables."""
    p = variables["params"]
    logits = x.reshape(-1, x.shape[-1]) @ p["router"].unbox()
    mc = m.cfg.moe
    return moe.route(logits, variables["moe_stats"]["bias"], mc.top_k, normalize=mc.normalize_weights,
                     route_scale=mc.route_scale)


def _expert_weights(variables):
    p = variables["params"]
    return tuple(p[n].unbox() for n in ("expert_gate_kernel", "expert_up_kernel", "expert_down_kernel"))


def test_dropless_equals_loop_over_experts():
    with jax.enable_x64(True):
        cfg = make_cfg(num_shared_experts=0)
        m = moe.MoE(cfg)
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 16), jnp.float64)
        variables = jax.jit(m.init)(jax.random.PRNGKey(1), x)
        # a non-zero bias, so that selection and weighting disagree somewhere
        variables = {**variables, "moe_stats": {"bias": jax.random.normal(jax.random.PRNGKey(2), (8,)) * 0.3}}
        y = m.apply(variables, x)
        experts, weights, _ = _routing(m, variables, x)
        ws = _expert_weights(variables)
        ref = moe.experts_reference(x.reshape(-1, 16), experts, weights, *ws).reshape(x.shape)
        np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
        direct = moe.experts_dropless(x.reshape(-1, 16), experts, weights, *ws).reshape(x.shape)
        np.testing.assert_allclose(direct, ref, rtol=1e-12, atol=1e-12)

        # gradients through the grouped matmuls equal those of the oracle
        xm = x.reshape(-1, 16)
        f = lambda ws, fn: jnp.sum(jnp.sin(fn(xm, experts, weights, *ws)))
        g_fast = jax.grad(f)(ws, moe.experts_dropless)
        g_ref = jax.grad(f)(ws, moe.experts_reference)
        for a, b in zip(g_fast, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_capacity_dispatch_drops_in_token_order():
    with jax.enable_x64(True):
        m_tok, d, e, k = 24, 16, 4, 2
        keys = jax.random.split(jax.random.PRNGKey(3), 5)
        x = jax.random.normal(keys[0], (m_tok, d), jnp.float64)
        experts, weights, _ = moe.route(jax.random.normal(keys[1], (m_tok, e)) + jnp.array([2.0, 0, 0, 0]),
                                        jnp.zeros(e), k)
        ws = (jax.random.normal(keys[2], (e, d, 8)), jax.random.normal(keys[3], (e, d, 8)),
              jax.random.normal(keys[4], (e, 8, d)))
        # ample capacity: identical to the oracle
        big = moe.experts_capacity(x, experts, weights, *ws, capacity_factor=float(e))
        np.testing.assert_allclose(big, moe.experts_reference(x, experts, weights, *ws), rtol=1e-12, atol=1e-12)
        # tight capacity: each expert keeps its first c assignments in token order, the rest are dropped
        factor = 0.75
        c = moe.capacity(m_tok, k, e, factor)
        counts = np.zeros(e, int)
        keep = np.zeros((m_tok, k), bool)
        for i in range(m_tok):
            for j in range(k):
                ex = int(experts[i, j])
                keep[i, j] = counts[ex] < c
                counts[ex] += 1
        assert not keep.all(), "the test needs some drops"
        kept_w = jnp.where(jnp.asarray(keep), weights, 0.0)
        small = moe.experts_capacity(x, experts, weights, *ws, capacity_factor=factor)
        np.testing.assert_allclose(small, moe.experts_reference(x, experts, kept_w, *ws), rtol=1e-12, atol=1e-12)


def test_module_capacity_matches_dropless_when_nothing_overflows():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 16), jnp.float64)
        a, b = moe.MoE(make_cfg(dispatch="dropless")), moe.MoE(make_cfg(dispatch="capacity", capacity_factor=8.0))
        variables = jax.jit(a.init)(jax.random.PRNGKey(5), x)
        np.testing.assert_allclose(a.apply(variables, x), b.apply(variables, x), rtol=1e-12, atol=1e-12)


def test_bias_selects_but_does_not_weight():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    experts, weights, scores = moe.route(logits, jnp.array([0.0, 0.0, 0.0, 5.0]), 2, normalize=False)
    assert set(np.asarray(experts[0]).tolist()) == {0, 3}  # expert 3 is picked only thanks to its bias
    np.testing.assert_allclose(weights[0], jax.nn.sigmoid(logits[0, np.asarray(experts[0])]), rtol=1e-6)
    _, w_norm, _ = moe.route(logits, jnp.zeros(4), 2, normalize=True, route_scale=2.5)
    np.testing.assert_allclose(jnp.sum(w_norm), 2.5, rtol=1e-6)


def test_update_bias_rule_and_padding_excluded_from_loads():
    cfg = make_cfg(dtype="float32")
    m = moe.MoE(cfg)
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 8, 16))
    seg = jnp.array([[1] * 8, [1] * 5 + [0] * 3])  # three padding tokens
    variables = jax.jit(m.init)(jax.random.PRNGKey(7), x)
    _, inter = m.apply(variables, x, segment_ids=seg, mutable=["intermediates"])
    load = inter["intermediates"]["expert_load"][0]
    assert float(jnp.sum(load)) == 13 * cfg.moe.top_k
    new = moe.update_bias({"moe_stats": variables["moe_stats"]}, inter, rate=0.01)
    expect = 0.01 * np.sign(np.mean(load) - np.asarray(load))
    np.testing.assert_allclose(new["moe_stats"]["bias"], expect, rtol=1e-6)
    with pytest.raises(KeyError, match="expert_load"):
        moe.update_bias(variables["moe_stats"], {}, rate=0.01)


def test_sequence_balance_loss_is_sown_and_differentiable():
    cfg = make_cfg(dtype="float32", seq_aux_loss=0.01)
    m = moe.MoE(cfg)
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 8, 16))
    variables = jax.jit(m.init)(jax.random.PRNGKey(9), x)

    def loss(params):
        _, inter = m.apply({**variables, "params": params}, x, mutable=["intermediates"])
        return moe.balance_loss(inter)

    value, grads = jax.value_and_grad(loss)(variables["params"])
    # sum_i f_i P_i is 1 for a perfectly uniform router and grows with imbalance; always positive
    assert 0.0 < float(value) < 0.01 * cfg.moe.num_experts
    assert float(jnp.abs(grads["router"].unbox()).sum()) > 0
    assert float(moe.balance_loss({})) == 0.0


def test_ternary_experts_run_and_are_ternary():
    cfg = make_cfg(dtype="float32", ternary=True)
    m = moe.MoE(cfg)
    x = jax.random.normal(jax.random.PRNGKey(10), (1, 4, 16))
    variables = jax.jit(m.init)(jax.random.PRNGKey(11), x)
    y = m.apply(variables, x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    assert "kernel" in variables["params"]["shared"]["gate_proj"]  # shared experts go through common.dense


def _balancer_run(balance: bool, steps: int = 300) -> float:
    cfg = make_cfg(dtype="float32", num_shared_experts=0, bias_balance=balance)
    m = moe.MoE(cfg)
    skew = jax.random.normal(jax.random.PRNGKey(1), (16,)) * 0.7  # a common direction that favours some experts
    batches = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 64, 16)) + skew
    variables = jax.jit(m.init)(jax.random.PRNGKey(0), batches[0])
    params, stats = variables["params"], variables["moe_stats"]

    @jax.jit
    def step(stats, x):  # no auxiliary loss, no training: only the bias moves
        _, inter = m.apply({"params": params, "moe_stats": stats}, x, mutable=["intermediates"])
        return moe.update_bias(stats, inter, rate=cfg.moe.bias_update_rate)

    for i in range(steps):
        stats = step(stats, batches[i % len(batches)])
    _, inter = m.apply({"params": params, "moe_stats": stats}, batches.reshape(-1, 64, 16),
                       mutable=["intermediates"])
    return float(inter["intermediates"]["max_load_ratio"][0])


def test_bias_balancing_evens_out_expert_load():
    on, off = _balancer_run(True), _balancer_run(False)
    assert on < 1.15, on
    assert off > 1.15, off
