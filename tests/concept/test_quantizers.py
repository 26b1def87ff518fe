"""VQ (EMA, restarts, STE, losses), FSQ (bijection) and the codebook health metrics."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chimera_jax.layers import quantizers as qz


def _cfg(**kw):
    c = qz.default_config()
    c.update(kw)
    return ml_collections.FrozenConfigDict(c)


def test_straight_through_passes_gradients_unchanged():
    z = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    q = jnp.round(z * 2) / 2
    w = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    assert np.array_equal(qz.straight_through(z, q), q)
    g = jax.grad(lambda z: jnp.sum(w * qz.straight_through(z, q)))(z)
    np.testing.assert_array_equal(g, w)


def test_vq_straight_through_gradient_reaches_encoder_unchanged():
    cfg = _cfg(num_codes=4, code_dim=3, restart_after=0, beta=0.0)
    vq = qz.VectorQuantizer(cfg)
    z = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    variables = vq.init(jax.random.PRNGKey(1), z)
    w = jax.random.normal(jax.random.PRNGKey(2), (6, 3))
    g = jax.grad(lambda z: jnp.sum(w * vq.apply(variables, z)[0]))(z)
    np.testing.assert_allclose(g, w, rtol=0, atol=0)


def test_distances_fast_equals_reference():
    with jax.enable_x64(True):
        z = jax.random.normal(jax.random.PRNGKey(0), (7, 5), jnp.float64)
        e = jax.random.normal(jax.random.PRNGKey(1), (9, 5), jnp.float64)
        np.testing.assert_allclose(qz.squared_distances(z, e), qz.squared_distances_reference(z, e), atol=1e-12)


def test_ema_update_equals_hand_closed_form():
    # Two codes in 1-d, decay 0.5, eps 0: vectors 1 and 3 go to code 0, vector 10 to code 1.
    count = jnp.array([2.0, 2.0])
    total = jnp.array([[4.0], [8.0]])
    z = jnp.array([[1.0], [3.0], [10.0]])
    onehot = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    c, s, e = qz.ema_update(count, total, z, onehot, decay=0.5, eps=0.0)
    # N = 0.5*2 + 0.5*[2, 1] = [2, 1.5];  S = 0.5*[4, 8] + 0.5*[4, 10] = [4, 9];  e = S / N = [2, 6]
    np.testing.assert_allclose(c, [2.0, 1.5])
    np.testing.assert_allclose(s, [[4.0], [9.0]])
    np.testing.assert_allclose(e, [[2.0], [6.0]])
    # Laplace smoothing: N~ = (N + eps) / (n + K eps) * n with n = 3.5, eps = 0.5 -> [2.5/4.5*3.5, 2/4.5*3.5]
    _, _, e2 = qz.ema_update(count, total, z, onehot, decay=0.5, eps=0.5)
    np.testing.assert_allclose(e2[:, 0], [4.0 / (2.5 / 4.5 * 3.5), 9.0 / (2.0 / 4.5 * 3.5)], rtol=1e-6)


def test_vq_module_applies_the_ema_update():
    cfg = _cfg(num_codes=3, code_dim=2, decay=0.9, eps=0.0, restart_after=0)
    vq = qz.VectorQuantizer(cfg)
    z = jax.random.normal(jax.random.PRNGKey(0), (10, 2))
    v = vq.init(jax.random.PRNGKey(1), z)
    (_, idx, _), upd = vq.apply(v, z, update=True, mutable=["quantizer"])
    st = v["quantizer"]
    onehot = jax.nn.one_hot(idx, 3)
    _, _, expect = qz.ema_update(st["ema_count"], st["ema_sum"], z, onehot, 0.9, 0.0)
    np.testing.assert_allclose(upd["quantizer"]["codebook"], expect, rtol=1e-6)


def test_dead_code_restart_revives_unused_codes():
    # Codebook far from the data: code 0 takes every vector, codes 1..3 are never used.
    cfg = _cfg(num_codes=4, code_dim=2, restart_after=2, decay=0.9, init_scale=1.0)
    vq = qz.VectorQuantizer(cfg)
    z = jax.random.normal(jax.random.PRNGKey(0), (64, 2)) * 0.1
    v = vq.init(jax.random.PRNGKey(1), z)
    v = {"quantizer": dict(v["quantizer"], codebook=jnp.array([[0.0, 0.0], [50.0, 50.0], [60, 60], [70, 70]]),
                           ema_sum=jnp.array([[0.0, 0.0], [50.0, 50.0], [60, 60], [70, 70]]))}
    used = []
    for i in range(3):
        (_, idx, aux), upd = vq.apply(v, z, update=True, mutable=["quantizer"], rngs={"quantizer": jax.random.PRNGKey(i)})
        v = {"quantizer": upd["quantizer"]}
        used.append(len(set(np.asarray(idx).tolist())))
    assert used[0] == 1 and used[1] == 1
    # After restart_after=2 unused updates, the dead codes sit on data points and get used.
    cb = np.asarray(v["quantizer"]["codebook"])
    assert np.abs(cb).max() < 1.0, cb
    (_, idx, _), _ = vq.apply(v, z, update=True, mutable=["quantizer"], rngs={"quantizer": jax.random.PRNGKey(9)})
    assert len(set(np.asarray(idx).tolist())) == 4

    # Without restarts the same codes stay dead.
    cfg0 = _cfg(num_codes=4, code_dim=2, restart_after=0, decay=0.9)
    vq0 = qz.VectorQuantizer(cfg0)
    far = jnp.array([[0.0, 0.0], [50.0, 50.0], [60, 60], [70, 70]])
    v0 = {"quantizer": dict(vq0.init(jax.random.PRNGKey(1), z)["quantizer"], codebook=far, ema_sum=far)}
    for i in range(4):
        (_, idx, _), upd = vq0.apply(v0, z, update=True, mutable=["quantizer"])
        v0 = {"quantizer": upd["quantizer"]}
    assert len(set(np.asarray(idx).tolist())) == 1


def test_kmeans_init_places_codes_on_clusters():
    cfg = _cfg(num_codes=2, code_dim=1, init="kmeans", kmeans_iters=5, restart_after=0, decay=0.0)
    vq = qz.VectorQuantizer(cfg)
    z = jnp.concatenate([jnp.full((8, 1), -5.0), jnp.full((8, 1), 5.0)])
    v = vq.init(jax.random.PRNGKey(0), z)
    (_, idx, _), upd = vq.apply(v, z, update=True, mutable=["quantizer"], rngs={"quantizer": jax.random.PRNGKey(3)})
    np.testing.assert_allclose(np.sort(np.asarray(upd["quantizer"]["codebook"][:, 0])), [-5.0, 5.0], atol=1e-3)


def test_vq_losses_match_hand_computation():
    cfg = _cfg(num_codes=2, code_dim=1, restart_after=0, beta=0.25)
    vq = qz.VectorQuantizer(cfg)
    z = jnp.array([[0.5], [2.0], [7.0]])
    v = vq.init(jax.random.PRNGKey(0), z)
    v = {"quantizer": dict(v["quantizer"], codebook=jnp.array([[0.0], [3.0]]))}
    zq, idx, aux = vq.apply(v, z, jnp.array([1.0, 1.0, 0.0]))
    np.testing.assert_array_equal(idx, [0, 1, 1])
    np.testing.assert_allclose(zq[:, 0], [0.0, 3.0, 3.0])
    np.testing.assert_allclose(aux["commitment"], (0.25 + 1.0) / 2)      # the masked row is left out
    np.testing.assert_allclose(aux["loss"], 0.25 * (0.25 + 1.0) / 2)     # EMA: no codebook-loss gradient term


def test_fsq_codes_indices_bijection_over_full_codebook():
    levels = (8, 5, 5, 5)
    k = int(np.prod(levels))
    idx = jnp.arange(k)
    codes = qz.fsq_indices_to_codes(idx, levels)
    np.testing.assert_array_equal(qz.fsq_codes_to_indices(codes, levels), idx)
    assert len({tuple(c) for c in np.asarray(codes).tolist()}) == k
    # Every grid point is reachable by quantizing: the rounded grid equals the indexed grid.
    grid = np.array(list(itertools.product(*[range(l) for l in reversed(levels)])))[:, ::-1]
    half = np.array([l // 2 for l in levels])
    np.testing.assert_allclose(np.asarray(codes), (grid - half) / half)
    np.testing.assert_array_equal(qz.fsq_codes_to_indices(jnp.asarray((grid - half) / half, jnp.float32), levels), idx)


def test_fsq_quantize_hits_every_level_and_is_straight_through():
    levels = (8, 5)
    z = jnp.stack(jnp.meshgrid(jnp.linspace(-4, 4, 101), jnp.linspace(-4, 4, 101)), -1).reshape(-1, 2)
    codes = qz.fsq_quantize(z, levels)
    idx = qz.fsq_codes_to_indices(codes, levels)
    assert len(set(np.asarray(idx).tolist())) == 40
    g = jax.grad(lambda z: jnp.sum(qz.fsq_quantize(z, levels)))(z)
    ref = jax.grad(lambda z: jnp.sum(qz.fsq_bound(z, levels) / jnp.array([4.0, 2.0])))(z)
    np.testing.assert_allclose(g, ref, rtol=1e-6)


def test_fsq_module_usage_and_codebook():
    cfg = _cfg(kind="fsq", levels=(4, 3), num_codes=12, code_dim=6)
    m = qz.FSQ(cfg)
    z = jax.random.normal(jax.random.PRNGKey(0), (50, 6))
    v = m.init(jax.random.PRNGKey(1), z)
    (zq, idx, aux), upd = m.apply(v, z, update=True, mutable=["quantizer"])
    cb = m.apply(v, method=m.codebook_vectors)
    np.testing.assert_allclose(zq, cb[idx], rtol=1e-5, atol=1e-6)
    assert int((upd["quantizer"]["unused"] == 0).sum()) == len(set(np.asarray(idx).tolist()))


def test_codebook_stats_and_usage_kl_by_hand():
    idx = jnp.array([0, 0, 1, 3, 3, 3])
    mask = jnp.array([1, 1, 1, 1, 1, 0.0])
    s = qz.codebook_stats(idx, mask, 4, unused=jnp.array([0, 5, 1, 7]), dead_after=5)
    p = np.array([2, 1, 0, 2]) / 5
    h = -np.sum(p[p > 0] * np.log(p[p > 0]))
    np.testing.assert_allclose(s["perplexity"], np.exp(h), rtol=1e-6)
    np.testing.assert_allclose(s["used_fraction"], 0.75)
    np.testing.assert_allclose(s["max_code_ratio"], 4 * 0.4, rtol=1e-6)
    np.testing.assert_allclose(s["dead_fraction"], 0.5)
    assign = jax.nn.one_hot(idx, 4)
    np.testing.assert_allclose(qz.usage_kl_to_uniform(assign, mask), np.log(4) - h, rtol=1e-6)
    np.testing.assert_allclose(qz.usage_kl_to_uniform(jnp.full((3, 4), 0.25), jnp.ones(3)), 0.0, atol=1e-7)


def test_fsq_codes_spread_over_every_level_at_init_whatever_the_input_scale():
    # Layer norm before the down projection: at init h has unit scale whatever the encoder's output scale, so the
    # bound spreads it over every level of every dimension, in evaluation (running statistics) as in training.
    levels = (8, 5, 5, 5)
    cfg = _cfg(kind="fsq", levels=levels, num_codes=1000, code_dim=32)
    m = qz.FSQ(cfg)
    v = m.init(jax.random.PRNGKey(1), jnp.zeros((2, 32)))
    for scale in (1e-3, 1.0, 1e3):
        z = scale * (jax.random.normal(jax.random.PRNGKey(2), (4000, 32)) + 3.0)   # off-centre too
        for update in (False, True):
            (_, idx, _), _ = m.apply(v, z, update=update, mutable=["quantizer"])
            digits = (np.asarray(idx)[:, None] // qz.fsq_basis(levels)) % np.asarray(levels)
            for i, l in enumerate(levels):
                assert sorted(set(digits[:, i].tolist())) == list(range(l)), (scale, update, i)
    # Without the normalisations a small-scale input rounds to the centre level of every dimension.
    bare = qz.FSQ(_cfg(kind="fsq", levels=levels, num_codes=1000, code_dim=32, fsq_layer_norm=False,
                       fsq_whiten=False))
    vb = bare.init(jax.random.PRNGKey(1), jnp.zeros((2, 32)))
    _, idx, _ = bare.apply(vb, 1e-3 * jax.random.normal(jax.random.PRNGKey(2), (4000, 32)))
    assert len(set(np.asarray(idx).tolist())) == 1


def test_whiten_fast_equals_reference_and_gives_unit_uncorrelated_dimensions():
    with jax.enable_x64(True):
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
        mix = jax.random.normal(k1, (4, 4), jnp.float64) + 3 * jnp.eye(4)
        h = 5.0 + 10.0 * jax.random.normal(k2, (300, 4), jnp.float64) @ mix       # correlated, shifted, scaled
        mask = (jax.random.uniform(k3, (300,)) > 0.3).astype(jnp.float64)
        mu, cov = qz.batch_moments(h, mask)
        valid = np.asarray(h)[np.asarray(mask) > 0]
        np.testing.assert_allclose(mu, valid.mean(0), rtol=1e-10)
        np.testing.assert_allclose(cov, np.cov(valid.T, bias=True), rtol=1e-9)
        w = qz.whiten(h, mu, cov, eps=1e-12)
        np.testing.assert_allclose(w, qz.whiten_reference(h, mu, cov, eps=1e-12), atol=1e-9)
        wv = np.asarray(w)[np.asarray(mask) > 0]
        np.testing.assert_allclose(wv.mean(0), 0.0, atol=1e-9)
        np.testing.assert_allclose(np.cov(wv.T, bias=True), np.eye(4), atol=1e-9)


def test_fsq_whitening_running_statistics():
    levels = (4, 3)
    cfg = _cfg(kind="fsq", levels=levels, num_codes=12, code_dim=6, fsq_stats_decay=0.75)
    m = qz.FSQ(cfg)
    z = jax.random.normal(jax.random.PRNGKey(0), (64, 6))
    mask = jnp.ones(64).at[:10].set(0.0)
    v = m.init(jax.random.PRNGKey(1), z)
    down = nn.unbox(v["params"])["down"]
    h = qz.layer_norm(z) @ down["kernel"] + down["bias"]
    mu, cov = qz.batch_moments(h, mask)
    (zq_train, idx_train, _), upd = m.apply(v, z, mask, update=True, mutable=["quantizer"])
    st = upd["quantizer"]
    np.testing.assert_allclose(st["h_mean"], 0.25 * mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["h_cov"], 0.75 * np.eye(2) + 0.25 * cov, rtol=1e-5, atol=1e-6)
    # Evaluation reads the running statistics: set to the batch's moments, it gives the training output.
    ev = {"params": v["params"], "quantizer": dict(st, h_mean=mu, h_cov=cov)}
    zq_eval, idx_eval, _ = m.apply(ev, z, mask)
    np.testing.assert_array_equal(idx_eval, idx_train)
    np.testing.assert_allclose(zq_eval, zq_train, rtol=1e-5, atol=1e-5)
    # A batch with fewer than 2 valid rows leaves the statistics alone; gradients stay finite.
    _, upd1 = m.apply(v, z, jnp.zeros(64).at[0].set(1.0), update=True, mutable=["quantizer"])
    np.testing.assert_array_equal(upd1["quantizer"]["h_cov"], v["quantizer"]["h_cov"])
    g = jax.grad(lambda z: jnp.sum(m.apply(v, z, mask, update=True, mutable=["quantizer"])[0][0] ** 2))(z)
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_fsq_config_without_the_normalisation_fields_builds_the_bare_quantizer():
    # Configs saved before fsq_layer_norm / fsq_whiten existed describe models trained without them.
    c = qz.default_config()
    c.update(kind="fsq", levels=(4, 3), num_codes=12, code_dim=6)
    for f in ("fsq_layer_norm", "fsq_whiten", "fsq_stats_decay"):
        del c[f]
    m = qz.FSQ(ml_collections.FrozenConfigDict(c))
    z = jax.random.normal(jax.random.PRNGKey(0), (8, 6))
    v = m.init(jax.random.PRNGKey(1), z)
    assert set(v["quantizer"]) == {"unused"}
    down = nn.unbox(v["params"])["down"]
    codes = qz.fsq_quantize(z @ down["kernel"] + down["bias"], (4, 3))
    np.testing.assert_array_equal(m.apply(v, z)[1], qz.fsq_codes_to_indices(codes, (4, 3)))


def test_fsq_joint_soft_assign_equals_reference_and_marginals():
    levels = (4, 3, 2)
    with jax.enable_x64(True):
        bounded = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (7, 3), jnp.float64)
        fast = qz.fsq_joint_soft_assign(bounded, levels, 0.7)
        np.testing.assert_allclose(fast, qz.fsq_joint_soft_assign_reference(bounded, levels, 0.7), atol=1e-14)
        np.testing.assert_allclose(fast.sum(-1), 1.0, atol=1e-12)
        # Summing out the other dimensions gives each dimension's own level softmax.
        per_dim = qz.fsq_soft_levels(bounded, levels, 0.7)
        grid = np.asarray(fast).reshape(7, *reversed(levels))          # dimension 0 varies fastest: last axis
        for i in range(3):
            axis = 3 - i
            other = tuple(a for a in (1, 2, 3) if a != axis)
            np.testing.assert_allclose(grid.sum(axis=other), per_dim[i], atol=1e-12)


def test_fsq_usage_kl_is_the_joint_grid_usage_kl():
    levels = (4, 3)
    cfg = _cfg(kind="fsq", levels=levels, num_codes=12, code_dim=6, usage_kl_weight=0.5, usage_temperature=0.3)
    m = qz.FSQ(cfg)
    z = jax.random.normal(jax.random.PRNGKey(0), (40, 6))
    mask = jnp.ones(40).at[:5].set(0.0)
    v = m.init(jax.random.PRNGKey(1), z)
    (_, _, aux), _ = m.apply(v, z, mask, update=True, mutable=["quantizer"])
    h = m.apply(v, z, mask, True, method=m.pre_quantization, mutable=["quantizer"])[0]
    joint = qz.fsq_joint_soft_assign_reference(qz.fsq_bound(h, levels), levels, 0.3)
    np.testing.assert_allclose(aux["usage_kl"], qz.usage_kl_to_uniform(joint, mask), rtol=1e-5)
    np.testing.assert_allclose(aux["loss"], 0.5 * aux["usage_kl"], rtol=1e-6)


def test_fsq_bound_range_for_even_and_odd_levels():
    # Even L: tanh's range is shifted by half a level, so rounding gives the L integers -L/2 .. L/2 - 1 with 0 at
    # h = 0; odd L: -(L-1)/2 .. (L-1)/2, symmetric.
    levels = (8, 5, 6, 3)
    far = jnp.array([[-100.0] * 4, [100.0] * 4, [0.0] * 4])
    b = np.asarray(qz.fsq_bound(far, levels))
    np.testing.assert_array_equal(np.round(b[0]), [-4, -2, -3, -1])
    np.testing.assert_array_equal(np.round(b[1]), [3, 2, 2, 1])
    np.testing.assert_allclose(b[2], 0.0, atol=1e-6)
    # The extreme levels are reached at finite inputs (|h| = 3), not only in tanh's limit.
    b3 = np.round(np.asarray(qz.fsq_bound(jnp.array([[-3.0] * 4, [3.0] * 4]), levels)))
    np.testing.assert_array_equal(b3, np.round(b[:2]))
