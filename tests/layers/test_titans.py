"""Titans MAC mixer: the sequence-mixer contract in float64 (with the default, chunked form), the chunked form
against the token-by-token reference, the retrieve -> attend -> update order, the memory."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.test_util import check_grads

from chimera_jax.layers import titans
from tests.layers import recurrent_contract as rc


def make_cfg(**fields):
    c = titans.default_config()
    c.update(dict(num_heads=2, head_dim=4, mem_hidden_mult=2, num_persistent=2, window=3, chunk_size=3,
                  lr_max=0.5))
    c.update(fields)
    return ml_collections.FrozenConfigDict(dict(d_model=16, dtype="float64", param_dtype="float64", norm_eps=1e-6,
                                                ternary=False, titans=c))


@pytest.fixture(scope="module")
def h():
    return rc.Harness(titans.TitansMAC(make_cfg()), 16)


def test_parallel_equals_prefill_then_decode(h):
    with jax.enable_x64(True):
        h.check_prefill_then_decode()  # chunks of 3 straddle both call boundaries (4, 8)


def test_packed_parallel_equals_prefill_then_decode(h):
    with jax.enable_x64(True):
        # documents start inside the first prefill, at the second call's first token and in the decoded tail
        h.check_prefill_then_decode(seg=rc.packed_ids([[3, 5, 6, 2], [9, 7]]))


def test_packed_equals_alone(h):
    with jax.enable_x64(True):
        h.check_packed_equals_alone([[1, 7, 8], [8, 1, 7]])


def test_gradients_match_finite_differences(h):
    """The token-by-token reference against finite differences; the chunked form's gradients equal the
    reference's (test_chunked_gradients_equal_reference)."""
    with jax.enable_x64(True):
        seg = rc.packed_ids([[4, 2]])  # crosses a memory chunk and a document start
        ref = titans.TitansMAC(make_cfg(impl="reference"))
        f = jax.jit(lambda p, xx: ref.apply(p, xx, segment_ids=seg)[0])
        check_grads(f, (h.params, rc.inputs(16, *seg.shape, seed=5)), order=1, modes=("rev",), atol=1e-6,
                    rtol=1e-6, eps=1e-5)


def test_memory_gradient_outer_product_form_equals_autodiff():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        w1, w2, k, v = (jnp.asarray(rng.standard_normal(shape)) for shape in
                        ((2, 3, 4, 8), (2, 3, 8, 4), (2, 3, 4), (2, 3, 4)))
        auto = jax.jit(jax.grad(titans.memory_loss, argnums=(0, 1)))(w1, w2, k, v)
        for a, b in zip(jax.jit(titans.memory_grad)(w1, w2, k, v), auto):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def h_local():
    """A long memory chunk and a short window: inside the first chunk only the window and the slots matter."""
    return rc.Harness(titans.TitansMAC(make_cfg(window=2, chunk_size=4)), 16)


def test_a_chunk_reads_only_memory_written_before_it(h_local):
    """Retrieve happens before update: the first chunk reads the initial memory whatever the write path does,
    while the next chunk reads what the first one wrote."""
    with jax.enable_x64(True):
        x = rc.inputs(16, rc.B, rc.T, seed=1)
        y, _ = h_local.apply(h_local.params, x)
        p = h_local.params["params"]
        changed = {**p, "write_v_proj": jax.tree.map(lambda a: a * 3.0, p["write_v_proj"])}
        y2, _ = h_local.apply({"params": changed}, x)
        np.testing.assert_allclose(y2[:, :4], y[:, :4], rtol=1e-13, atol=1e-14)
        assert float(jnp.max(jnp.abs(y2[:, 4:] - y[:, 4:]))) > 1e-6


def test_attention_window_and_persistent_slots(h_local):
    """Inside the first chunk (initial memory only) token t sees positions t-window+1 .. t and nothing older."""
    with jax.enable_x64(True):
        x = rc.inputs(16, rc.B, rc.T, seed=4)
        y, _ = h_local.apply(h_local.params, x)
        y_old, _ = h_local.apply(h_local.params, x.at[:, 1].add(1.0))  # outside the window of position 3
        np.testing.assert_allclose(y_old[:, 3], y[:, 3], rtol=1e-13, atol=1e-14)
        assert float(jnp.max(jnp.abs(y_old[:, 2] - y[:, 2]))) > 1e-6  # ... but inside that of position 2
        p = h_local.params["params"]
        y_p, _ = h_local.apply({"params": {**p, "persistent": jax.tree.map(lambda a: a + 1.0, p["persistent"])}}, x)
        assert float(jnp.min(jnp.max(jnp.abs(y_p - y), axis=-1))) > 1e-8  # every position sees the slots


def test_memory_is_written_with_the_attention_output(h):
    """Attend happens before update: replaying the update rule on the sown attention outputs reproduces the cached
    memory (momentum, forgetting, gradients at the chunk-start memory)."""
    with jax.enable_x64(True):
        cfg, b, t = h.mod.cfg, rc.B, 8
        x = rc.inputs(16, b, t, seed=2)
        run = jax.jit(lambda p, xx, c: h.mod.apply(p, xx, cache=c, mutable=["intermediates"]))
        (y, cache), inter = run(h.params, x, h.mod.init_cache(b, t, jnp.float64))
        attn = inter["intermediates"]["attn_out"][0]  # [b t h k]
        p = nn.meta.unbox(h.params["params"])
        nh, k = cfg.titans.num_heads, cfg.titans.head_dim
        gates = jnp.einsum("btd,dgh->btgh", x, p["gate_proj"]["kernel"])
        theta = cfg.titans.lr_max * jax.nn.sigmoid(gates[:, :, 0])
        alpha, eta = jax.nn.sigmoid(gates[:, :, 1]), jax.nn.sigmoid(gates[:, :, 2])
        y_re = attn.reshape(b, t, nh * k) @ p["o_proj"]["kernel"]
        np.testing.assert_allclose(y_re, y, rtol=1e-12)  # the layer output is the attention output

        @jax.jit
        def replay(p, y_re, theta, alpha, eta):
            mem = [jnp.broadcast_to(p["memory_w1"], (b,) + p["memory_w1"].shape),
                   jnp.broadcast_to(p["memory_w2"], (b,) + p["memory_w2"].shape)]
            mom = [jnp.zeros_like(mem[0]), jnp.zeros_like(mem[1])]
            for i in range(t):
                if i % cfg.titans.chunk_size == 0:
                    seg = list(mem)
                kw = titans.l2_normalize(jnp.einsum("bd,dhk->bhk", y_re[:, i], p["write_k_proj"]["kernel"]))
                vw = jnp.einsum("bd,dhk->bhk", y_re[:, i], p["write_v_proj"]["kernel"])
                grads = titans.memory_grad(seg[0], seg[1], kw, vw)
                for j in range(2):
                    mom[j] = eta[:, i, :, None, None] * mom[j] - theta[:, i, :, None, None] * grads[j]
                    mem[j] = (1 - alpha[:, i, :, None, None]) * mem[j] + mom[j]
            return mem, mom, seg

        mem, mom, seg = replay(p, y_re, theta, alpha, eta)
        np.testing.assert_allclose(cache.mem1, mem[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cache.mem2, mem[1], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cache.mom2, mom[1], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cache.seg1, seg[0], rtol=1e-10, atol=1e-12)
        assert float(jnp.max(jnp.abs(cache.mem1 - p["memory_w1"]))) > 1e-4  # the memory did move


def test_axis_names_and_errors(h):
    with jax.enable_x64(True):
        h.check_params_have_axis_names()
        with pytest.raises(ValueError, match="decode=True needs a cache"):
            h.mod.apply(h.params, rc.inputs(16, 1, 1), decode=True)
        with pytest.raises(ValueError, match="model.titans.window"):
            titans.TitansMAC(make_cfg(window=0)).init_cache(1, 4, jnp.float64)


# ------------------------------------------------------------------------- chunked form == token reference

_STATE = ("mem1", "mem2", "seg1", "seg2", "mom1", "mom2", "win_k", "win_v")


@pytest.fixture(scope="module")
def pair(h):
    """The layer as the chunked form and as the token scan (window reaching across blocks, chunks of 4, the
    parameters of ``h``), random inputs of 19 tokens (not a multiple of 4) in packed documents whose starts are
    not chunk aligned, and a cache holding a random state: 6 tokens of document 1 consumed, which the first
    document of each row continues (so its memory chunks straddle the blocks), a full window."""
    with jax.enable_x64(True):
        mods = {i: titans.TitansMAC(make_cfg(impl=i, window=5, chunk_size=4)) for i in ("chunked", "reference")}
        seg = rc.packed_ids([[3, 9, 1, 6], [12, 2, 5]])
        b, t = seg.shape
        rng = np.random.default_rng(7)  # numpy draws: no programs to compile
        x = jnp.asarray(rng.standard_normal((b, t, 16)))
        empty = mods["chunked"].init_cache(b, t, jnp.float64)
        noise = {n: jnp.asarray(0.3 * rng.standard_normal(getattr(empty, n).shape)) for n in _STATE}

        @jax.jit
        def setup(params):
            params = jax.tree.map(lambda a: 1.5 * a, params)  # a faster-moving memory
            cache = empty.replace(**noise)
            p = nn.meta.unbox(params["params"])
            cache = cache.replace(mem1=cache.mem1 + p["memory_w1"], mem2=cache.mem2 + p["memory_w2"],
                                  win_valid=jnp.ones_like(cache.win_valid), pos=jnp.full((b,), 6, jnp.int32),
                                  last_segment=jnp.ones((b,), jnp.int32))
            return params, cache

        params, cache = setup(h.params)
    return mods, params, x, seg, cache


def test_chunked_equals_reference(pair):
    with jax.enable_x64(True):
        mods, params, x, seg, cache = pair
        for s, c in ((None, None), (seg, cache)):  # plain from the initial memory; packed from a cache
            (yc, cc), (yr, cr) = (jax.jit(mods[i].apply)(params, x, segment_ids=s, cache=c)
                                  for i in ("chunked", "reference"))
            assert rc.rel_err(yc, yr) <= 1e-10
        for name in _STATE:
            assert rc.rel_err(getattr(cc, name), getattr(cr, name)) <= 1e-10, name
        np.testing.assert_array_equal(cc.win_valid, cr.win_valid)
        np.testing.assert_array_equal(cc.pos, cr.pos)
        assert float(jnp.max(jnp.abs(cc.seg1 - cc.mem1))) > 1e-4  # the chunk-start memory is not the last one


def test_chunked_gradients_equal_reference(pair):
    """Gradients w.r.t. the parameters, the inputs and the cached state (memory, momentum, window)."""
    with jax.enable_x64(True):
        mods, params, x, seg, cache = pair
        probe = jnp.asarray(np.random.default_rng(9).standard_normal(x.shape))
        state = {n: getattr(cache, n) for n in _STATE}

        def loss(impl, p, xx, st):
            y, c2 = mods[impl].apply(p, xx, segment_ids=seg, cache=cache.replace(**st))
            return jnp.sum(y * probe) + sum(jnp.sum(jnp.sin(getattr(c2, n))) for n in _STATE)

        flat_c, flat_r = (jax.tree.leaves(jax.jit(jax.grad(lambda *a, i=impl: loss(i, *a), argnums=(0, 1, 2)))(
            params, x, state)) for impl in ("chunked", "reference"))
        assert len(flat_c) == len(flat_r) > 10
        for a, b in zip(flat_c, flat_r):
            assert a.shape == b.shape
            scale = float(jnp.max(jnp.abs(b)))
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-10 * max(scale, 1e-3), (a.shape, scale)
