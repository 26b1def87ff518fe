import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from chimera_jax.layers import attention, positions


def _cfg(**att):
    a = attention.default_config()
    a.update(dict(num_heads=4, num_kv_heads=2, head_dim=8), **att)
    return ml_collections.FrozenConfigDict(dict(d_model=16, dtype="float64", param_dtype="float64", norm_eps=1e-6,
                                                ternary=False, attention=a))


CASES = [dict(position="rope"), dict(position="alibi"), dict(position="none", num_kv_heads=1),
         dict(position="rope", window=5), dict(position="alibi", window=3, num_kv_heads=4),
         dict(position="rope", rope_scaling_factor=4.0)]


@pytest.mark.parametrize("att", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_parallel_equals_prefill_then_decode(att):
    with jax.enable_x64(True):
        cfg = _cfg(**att)
        b, t, split = 2, 13, 6
        x = jax.random.normal(jax.random.PRNGKey(0), (b, t, cfg.d_model), jnp.float64)
        mod = attention.Attention(cfg)
        params = mod.init(jax.random.PRNGKey(1), x)
        y_par, _ = mod.apply(params, x)
        cache = mod.init_cache(b, t, jnp.float64)
        y1, cache = mod.apply(params, x[:, :split], cache=cache)
        ys = [y1]
        for i in range(split, t):
            yi, cache = mod.apply(params, x[:, i:i + 1], cache=cache, decode=True)
            ys.append(yi)
        y_seq = jnp.concatenate(ys, axis=1)
        np.testing.assert_allclose(y_seq, y_par, rtol=1e-10, atol=1e-12)
        if att.get("window"):
            assert cache.k.shape[1] == att["window"]  # ring buffer holds exactly W entries


def test_two_prefills_equal_one():
    with jax.enable_x64(True):
        cfg = _cfg(window=4)
        x = jax.random.normal(jax.random.PRNGKey(2), (1, 11, 16), jnp.float64)
        mod = attention.Attention(cfg)
        params = mod.init(jax.random.PRNGKey(1), x)
        y_par, _ = mod.apply(params, x)
        cache = mod.init_cache(1, 11, jnp.float64)
        ya, cache = mod.apply(params, x[:, :3], cache=cache)
        yb, cache = mod.apply(params, x[:, 3:], cache=cache)  # 8 new tokens > W: wraps the ring
        np.testing.assert_allclose(jnp.concatenate([ya, yb], 1), y_par, rtol=1e-10)


@pytest.mark.parametrize("att", [dict(position="rope"), dict(position="alibi", window=4)])
def test_packed_documents_equal_separate_runs(att):
    with jax.enable_x64(True):
        cfg = _cfg(**att)
        lens = [5, 7, 3]
        x = jax.random.normal(jax.random.PRNGKey(3), (1, sum(lens), 16), jnp.float64)
        seg = jnp.asarray(np.repeat(np.arange(1, 4), lens))[None]
        pos = jnp.asarray(np.concatenate([np.arange(n) for n in lens]))[None]
        mod = attention.Attention(cfg)
        params = mod.init(jax.random.PRNGKey(1), x)
        y_packed, _ = mod.apply(params, x, segment_ids=seg, positions=pos)
        start = 0
        for n in lens:
            y_alone, _ = mod.apply(params, x[:, start:start + n])
            np.testing.assert_allclose(y_packed[:, start:start + n], y_alone, rtol=1e-10)
            start += n


def test_ntk_scaling_keeps_highest_frequency():
    base = positions.rope_frequencies(64, 10_000.0, 1.0)
    scaled = positions.rope_frequencies(64, 10_000.0, 8.0)
    assert float(scaled[0]) == float(base[0]) == 1.0
    assert float(scaled[-1]) < float(base[-1]) / 7  # lowest frequency stretched by about the factor


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(positions.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-6)
    assert positions.alibi_slopes(6).shape == (6,)


def test_bad_head_counts_are_named():
    cfg = _cfg(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        attention.Attention(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 2, 16)))


def test_per_shard_attention_equals_unsharded_under_a_mesh():
    """The cuDNN path runs through attention.per_shard inside shard_map; the XLA kernel stands in for it on CPU."""
    from chimera_jax.training import sharding

    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (8, 16, 8, 4))   # [b t h k]
    k = jax.random.normal(ks[1], (8, 16, 2, 4))   # [b t g k]: grouped KV heads, as in the failing FSDP case
    v = jax.random.normal(ks[2], (8, 16, 2, 4))
    flash = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla")
    want = flash(q, k, v)
    for layout in (dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=8, tensor=1), dict(data=1, fsdp=2, tensor=4)):
        mesh = sharding.make_mesh(ml_collections.ConfigDict(layout))
        with sharding.on_mesh(mesh):
            fn = lambda a, b, c: attention.per_shard(flash, a, b, c)  # noqa: E731
            assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
            got = jax.jit(fn)(q, k, v)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=str(layout))
