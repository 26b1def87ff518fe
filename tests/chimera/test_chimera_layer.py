"""The CHIMERA mixer (float64 on CPU): routing, capacity, the multi-mode cache and the balancer."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from chimera_jax.layers import attention, chimera, mamba2

D, B, T, W = 16, 2, 16, 4  # T > W: the window ring buffer wraps several times


def _cfg(dtype="float64", **ch):
    c = chimera.default_config()
    # decode_skip_unchosen with decode_read_block=4: the tests' decode runs the skipping path (the longer one), with
    # the m2 cache (<= T slots) read in lengths 4 and 16, so decode exercises both; the plain path is its reference.
    c.update(dict(window=W, router_hidden=8, decode_skip_unchosen=True, decode_read_block=4), **ch)
    m = mamba2.default_config()
    m.update(d_state=4, head_dim=8, expand=2, chunk_size=4)
    a = attention.default_config()
    a.update(num_heads=2, num_kv_heads=1, head_dim=8)
    return ml_collections.FrozenConfigDict(dict(d_model=D, dtype=dtype, param_dtype=dtype, norm_eps=1e-6,
                                                ternary=False, chimera=c, mamba2=m, attention=a))


UNCAPPED = dict(capacity_factor=(4.0, 4.0, 4.0, 4.0))
CAPPED = dict(capacity_factor=(1.0, 1.0, 1.0, 1.0))  # 1/4 of each document per mode: overflow happens


@functools.lru_cache(maxsize=None)
def _setup_cached(items):
    cfg = _cfg(**dict(items))
    mod = chimera.Chimera(cfg)
    with jax.enable_x64(True):
        variables = jax.jit(mod.init)(jax.random.PRNGKey(1), jnp.zeros((1, 1, D), jnp.float64))
    return mod, variables


def _setup(**ch):
    """(module, variables) per config, built once per test session (compiled programs are shared too)."""
    return _setup_cached(tuple(sorted(ch.items())))


def _force(variables, mode):
    """Variables whose balancing bias makes every token choose ``mode`` (None: the router decides)."""
    if mode is None:
        return variables
    bias = jnp.zeros((4,), jnp.float32).at[mode].set(1e4)
    return {**variables, "chimera_stats": {"bias": bias}}


def _x(b=B, t=T, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, t, D), jnp.float64)


# Jitted once per (module, shapes): compilation, not arithmetic, is what costs time at these sizes.
APPLY = jax.jit(lambda mod, v, x, cache, decode: mod.apply(v, x, cache=cache, decode=decode),
                static_argnums=(0, 4))
PARALLEL = jax.jit(lambda mod, v, x, seg: mod.apply(v, x, segment_ids=seg, mutable=["intermediates"]),
                   static_argnums=0)


def _run(mod, variables, x, segment_ids=None):
    """Parallel path: (y, mode each token ran)."""
    (y, _), st = PARALLEL(mod, variables, x, segment_ids)
    return y, np.asarray(st["intermediates"]["modes"][0])


def _modes(mod, variables, x, **kw):
    return _run(mod, variables, x, **kw)[1]


@pytest.mark.parametrize("routing,caps", [(0, UNCAPPED), (1, UNCAPPED), (2, UNCAPPED), (3, UNCAPPED),
                                          (None, UNCAPPED), (None, CAPPED), (2, CAPPED)],
                         ids=["ssm", "window", "full", "identity", "mixed", "mixed-capped", "full-capped"])
def test_prefill_then_decode_equals_parallel(routing, caps):
    """parallel == prefill(5) -> prefill(6 > W, from a non-empty cache) -> one-token decodes, rel. err <= 1e-12."""
    mod, variables = _setup(**caps)
    v = _force(variables, routing)
    with jax.enable_x64(True):
        x = _x()
        y_par, modes = _run(mod, v, x)
        if routing is not None and caps is UNCAPPED:
            assert (modes == routing).all()
        elif routing is None:
            assert len(np.unique(modes)) == 4, modes  # a genuinely mixed routing pattern
        if caps is CAPPED and routing == chimera.FULL:
            assert (modes == chimera.FULL).sum() == B * 4 and (modes == chimera.SSM).sum() == B * (T - 4)
        cache = mod.init_cache(B, T, jnp.float64)
        ys = []
        for lo, hi in ((0, 5), (5, 11)):
            y, cache = APPLY(mod, v, x[:, lo:hi], cache, False)
            ys.append(y)
        for i in range(11, T):
            y, cache = APPLY(mod, v, x[:, i:i + 1], cache, True)
            ys.append(y)
        y_seq = jnp.concatenate(ys, axis=1)
        if routing == chimera.IDENTITY:
            assert float(jnp.max(jnp.abs(y_par))) == 0.0 and float(jnp.max(jnp.abs(y_seq))) == 0.0
            return
        scale = float(jnp.max(jnp.abs(y_par)))
        assert scale > 1e-3
        assert float(jnp.max(jnp.abs(y_seq - y_par))) <= 1e-12 * scale
        # Each token's K/V sits only in the cache of its mode (the last W positions for the ring).
        wpos = set(np.asarray(cache.window.pos[0]).tolist()) - {-1}
        assert wpos == {p for p in range(T - W, T) if modes[0, p] == chimera.WINDOW}
        fpos = [p for p in np.asarray(cache.full.pos[0]).tolist() if p >= 0]
        assert fpos == [p for p in range(T) if modes[0, p] == chimera.FULL]
        np.testing.assert_array_equal(cache.count[0], np.bincount(modes[0], minlength=4))


def test_cache_sizes():
    mod = chimera.Chimera(_cfg(window=512, target_mix=(0.4, 0.3, 0.1, 0.2), capacity_factor=(1.0, 1.0, 2.0, 1.0)))
    cache = mod.init_cache(1, 32768, jnp.float32)
    assert cache.window.k.shape[1] == 512
    assert cache.full.k.shape[1] == int(np.ceil(round(0.2 * 1024) / 1024 * 32768))  # the m2 capacity
    assert cache.ssm.ssm.shape[0] == 1


def test_identity_leaves_residual_unchanged():
    """Tokens routed to m3 get a mixer output of exactly 0, so a block x + mixer(norm(x)) passes x through."""
    mod, variables = _setup(**UNCAPPED)
    with jax.enable_x64(True):
        x = _x(seed=7)
        y, modes = _run(mod, variables, x)
        ident = modes == chimera.IDENTITY
        assert ident.any() and (~ident).any()
        assert (np.asarray(y)[ident] == 0.0).all()
        assert (np.abs(np.asarray(y)[~ident]).max(-1) > 0).all()
        h = x + y  # the residual update of the block
        np.testing.assert_array_equal(np.asarray(h)[ident], np.asarray(x)[ident])


def test_admit_scan_equals_reference():
    """The fast capacity counters (closed form and associative scan) equal the token-by-token scan, with
    document resets and a non-empty starting count."""
    rng = np.random.default_rng(0)
    b, t = 3, 40
    chosen = jnp.asarray(rng.integers(0, 4, (b, t)), jnp.int32)
    starts = np.zeros((b, t), bool)
    starts[0, [0, 13, 27]] = True
    starts[1, [9]] = True       # row 1 continues a document (count0 applies until position 9)
    starts[2, 0] = True
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        p = 0 if starts[r, 0] else 20
        for i in range(t):
            p = 0 if starts[r, i] else (p + 1 if i else p)
            pos[r, i] = p
    units = jnp.asarray([300, 256, 700, 1024], jnp.int32)
    allow = chimera.allowance(jnp.asarray(pos), units)
    count0 = jnp.asarray([[0, 0, 0, 0], [3, 6, 2, 9], [0, 0, 0, 0]], jnp.int32)
    ok_ref, cnt_ref = jax.jit(chimera.admit_reference)(chosen, allow, jnp.asarray(starts), count0)
    for fast in (chimera.admit, chimera.admit_associative):
        ok, cnt = jax.jit(fast)(chosen, allow, jnp.asarray(starts), count0)
        np.testing.assert_array_equal(ok, ok_ref)
        np.testing.assert_array_equal(cnt, cnt_ref)
    assert (~np.asarray(ok_ref)).any() and np.asarray(ok_ref).any()
    assert (np.asarray(cnt) <= np.asarray(allow)).all()


def test_admit_closed_form_on_random_documents():
    """The closed form (cumsum / cummin) and the associative scan equal the token-by-token counter on random
    lengths, capacities, document starts and starting counts (each within its allowance, as a cache holds)."""
    rng = np.random.default_rng(1)
    admit, assoc, ref = (jax.jit(f) for f in (chimera.admit, chimera.admit_associative, chimera.admit_reference))
    for _ in range(12):
        b, t = 3, int(rng.choice([1, 7, 31, 48]))  # few distinct lengths: each one is a compilation
        chosen = jnp.asarray(rng.integers(0, 4, (b, t)), jnp.int32)
        starts = rng.random((b, t)) < rng.choice([0.0, 0.05, 0.3])
        units = jnp.asarray(rng.integers(1, chimera.CAPACITY_UNIT + 1, 4), jnp.int32)
        pos, count0 = np.zeros((b, t), np.int32), np.zeros((b, 4), np.int32)
        for r in range(b):
            p0 = 0 if starts[r, 0] else int(rng.integers(0, 30))  # a row may continue a cached document
            if p0:
                count0[r] = [rng.integers(0, a + 1) for a in np.asarray(chimera.allowance(jnp.asarray([[p0 - 1]]),
                                                                                          units))[0, 0]]
            p = p0
            for i in range(t):
                p = 0 if starts[r, i] else (p + 1 if i else p)
                pos[r, i] = p
        args = (chosen, chimera.allowance(jnp.asarray(pos), units), jnp.asarray(starts), jnp.asarray(count0))
        ok_ref, cnt_ref = ref(*args)
        for fast in (admit, assoc):
            ok, cnt = fast(*args)
            np.testing.assert_array_equal(ok, ok_ref)
            np.testing.assert_array_equal(cnt, cnt_ref)


def test_capacity_overflow_is_deterministic():
    """Every token wants m2 at capacity 1/4: exactly the tokens at positions 0, 4, 8, ... (first come first
    served) run m2, the rest fall to the overflow mode (m0), identically in every row, batch and call."""
    mod, variables = _setup(**CAPPED)
    v = _force(variables, chimera.FULL)
    with jax.enable_x64(True):
        x = _x(seed=11)
        modes = _modes(mod, v, x)
        expect = np.where(np.arange(T) % 4 == 0, chimera.FULL, chimera.SSM)
        np.testing.assert_array_equal(modes, np.broadcast_to(expect, modes.shape))
        np.testing.assert_array_equal(_modes(mod, v, x[::-1]), modes)  # no dependence on the other rows
        np.testing.assert_array_equal(_modes(mod, v, x), modes)        # nor on the call
        # Packed documents: each document has its own budget.
        seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 10], B, 0), jnp.int32)
        m2 = _modes(mod, v, x, segment_ids=seg)
        doc_pos = np.r_[np.arange(6), np.arange(10)]
        np.testing.assert_array_equal(m2[0], np.where(doc_pos % 4 == 0, chimera.FULL, chimera.SSM))


def test_packed_documents_equal_separate_runs():
    """Packed documents give what each document gives alone (alone = at the start of a row, padding after:
    the same shapes, hence the same compiled program)."""
    mod, variables = _setup(**CAPPED)
    lens = [5, 8, 3]
    seg = jnp.asarray(np.repeat(np.repeat(np.arange(1, 4), lens)[None], B, 0), jnp.int32)
    with jax.enable_x64(True):
        x = _x(seed=3)
        y, modes = _run(mod, variables, x, seg)
        assert len(np.unique(modes)) > 2
        start = 0
        for n in lens:
            x_alone = jnp.zeros_like(x).at[:, :n].set(x[:, start:start + n])
            seg_alone = jnp.zeros_like(seg).at[:, :n].set(1)
            y_alone, _ = _run(mod, variables, x_alone, seg_alone)
            np.testing.assert_allclose(y[:, start:start + n], y_alone[:, :n], rtol=1e-12, atol=1e-14)
            start += n
        # Padding (id 0) runs nothing and changes nothing.
        y_pad, _ = _run(mod, variables, x, seg.at[:, -3:].set(0))
        assert float(jnp.max(jnp.abs(y_pad[:, -3:]))) == 0.0
        np.testing.assert_array_equal(y_pad[:, :-3], y[:, :-3])


def test_balancer_reaches_target_mix_without_aux_loss():
    """Parameters frozen, no loss at all: only the bias update inside the forward pass moves the mode loads."""
    target = (0.4, 0.3, 0.1, 0.2)
    mod = chimera.Chimera(_cfg("float32", target_mix=target, capacity_factor=(8.0,) * 4, bias_update_rate=0.03))
    v = jax.jit(mod.init)(jax.random.PRNGKey(1), jnp.zeros((1, 1, D), jnp.float32))

    @jax.jit
    def step(stats, key):
        x = jax.random.normal(key, (4, 32, D), jnp.float32)
        _, upd = mod.apply({"params": v["params"], "chimera_stats": stats}, x,
                           mutable=["chimera_stats", "metrics"])
        mix = jnp.stack([upd["metrics"][f"mix_{n}"][0] for n in chimera.MODES])
        return upd["chimera_stats"], mix

    stats = v["chimera_stats"]
    mixes = []
    for i in range(120):
        stats, mix = step(stats, jax.random.PRNGKey(100 + i))
        mixes.append(np.asarray(mix))
    first, last = mixes[0], np.mean(mixes[-40:], axis=0)
    err0, err1 = np.abs(first - target).max(), np.abs(last - target).max()
    assert err0 > 0.1, first                  # the untrained router starts far from the target ...
    assert err1 < 0.03, (last, target)        # ... and the bias alone brings it there
    assert "params" not in jax.tree.map(lambda a: a, stats)


def test_router_gets_gradient_through_gate_and_params_have_axis_names():
    mod, variables = _setup(**UNCAPPED)
    with jax.enable_x64(True):
        x = _x(seed=5)

        def f(params):
            y, _ = mod.apply({**variables, "params": params}, x)
            return jnp.sum(y ** 2)

        g = jax.jit(jax.grad(f))(variables["params"])
        g = nn.meta.unbox(g)
        assert float(jnp.max(jnp.abs(g["router_out"]))) > 0
        assert float(jnp.max(jnp.abs(g["router_in"]))) > 0
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="target_mix"):
        chimera.capacity_units(ml_collections.ConfigDict(dict(target_mix=(0.5, 0.5, 0.5, 0.5),
                                                              capacity_factor=(1.0,) * 4, overflow_mode=0)))
    with pytest.raises(ValueError, match="overflow_mode"):
        chimera.capacity_units(ml_collections.ConfigDict(dict(target_mix=(0.25,) * 4,
                                                              capacity_factor=(1.0,) * 4, overflow_mode=2)))


def _decode_all(mod, v, x, n_prefill=5):
    """Prefill n_prefill tokens, then decode the rest one by one -> (y [b T d], the cache after every step)."""
    cache = mod.init_cache(B, T, jnp.float64)
    y, cache = APPLY(mod, v, x[:, :n_prefill], cache, False)
    ys, caches = [y], []
    for i in range(n_prefill, T):
        y, cache = APPLY(mod, v, x[:, i:i + 1], cache, True)
        ys.append(y)
        caches.append(cache)
    return jnp.concatenate(ys, axis=1), caches


def test_decode_skipping_unchosen_modes_equals_computing_them():
    """decode_skip_unchosen (lax.switch: no projection, read or write for a mode no row chose; m2 read only up to
    its filled part) gives what computing both attention modes over their whole buffers on every step gives."""
    mod, variables = _setup(**UNCAPPED)
    ref, _ = _setup(**UNCAPPED, decode_skip_unchosen=False, decode_read_block=0)
    with jax.enable_x64(True):
        x = _x(seed=21)
        modes = _modes(mod, variables, x)
        y, caches = _decode_all(mod, variables, x)
        y_ref, caches_ref = _decode_all(ref, variables, x)
        # The routing skips a mode on some steps and runs it on others (both switch sides are exercised).
        dec = modes[:, 5:]  # the decoded tokens (caches[i] is the cache after token 5 + i)
        for m in (chimera.WINDOW, chimera.FULL):
            chosen_by_some_row = (dec == m).any(0)
            assert chosen_by_some_row.any() and (~chosen_by_some_row).any(), (m, dec)
        # The m2 read length changes on the way (4 slots while at most 4 are filled, then all 16).
        filled = [int((np.asarray(c.full.pos) >= 0).sum(1).max()) for c in caches]
        assert min(filled) <= 4 < max(filled), filled
        scale = float(jnp.max(jnp.abs(y_ref)))
        assert scale > 1e-3
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-13 * scale)
        for c, c_ref in zip(caches, caches_ref):
            for a, a_ref in zip(jax.tree.leaves(c), jax.tree.leaves(c_ref)):
                np.testing.assert_allclose(a, a_ref, rtol=1e-13, atol=0)
        # A skipped step leaves that mode's buffer bit-identical (only its index advances).
        for i in range(1, len(caches)):
            if not (dec[:, i] == chimera.FULL).any():
                now, prev = caches[i].full, caches[i - 1].full
                for a, a0 in ((now.k, prev.k), (now.v, prev.v), (now.pos, prev.pos)):
                    np.testing.assert_array_equal(a, a0)
                np.testing.assert_array_equal(now.index, prev.index + 1)


def test_read_lengths_and_query_chunk():
    assert chimera.read_lengths(10262, 1024) == (1024, 4096, 10262)
    assert chimera.read_lengths(16, 4) == (4, 16) and chimera.read_lengths(16, 0) == (16,)
    assert chimera.read_lengths(4, 256) == (4,) and chimera.read_lengths(1024, 256) == (256, 1024)
    assert chimera.query_chunk(2, 2, 16, 16) == 16                       # fits: one chunk
    assert chimera.query_chunk(8, 32, 4096, 4096) == 128                 # 512 MiB of float32 logits per chunk
    assert chimera.query_chunk(8, 32, 4096, 4096, budget=1 << 20) == 1


def test_chunked_attention_equals_one_call_with_gradients():
    """attend_chunked (query chunks, padded when the chunk does not divide t, rematerialised) equals one attend
    call over the whole mask, values and gradients, with the combined two-mode mask of the parallel path."""
    rng = np.random.default_rng(3)
    b, t, h, g, k = 2, 11, 4, 2, 8
    with jax.enable_x64(True):
        q = jnp.asarray(rng.normal(size=(b, t, h, k)))
        kk = jnp.asarray(rng.normal(size=(b, t, g, k)))
        v = jnp.asarray(rng.normal(size=(b, t, g, k)))
        mode = jnp.asarray(rng.integers(0, 4, (b, t)), jnp.int32)
        seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 5], b, 0), jnp.int32)
        pos = jnp.asarray(np.repeat([np.r_[np.arange(6), np.arange(5)]], b, 0), jnp.int32)
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        aux = (mode, pos, idx, seg)
        vis = chimera.mode_visible(3)

        def f(chunk):
            return jax.jit(jax.value_and_grad(
                lambda q, kk, v: jnp.sum(jnp.sin(chimera.attend_chunked(q, kk, v, vis, aux, aux, chunk))),
                argnums=(0, 1, 2)))(q, kk, v)

        val, grads = f(t)
        for chunk in (4, 5):
            val_c, grads_c = f(chunk)
            np.testing.assert_allclose(val_c, val, rtol=1e-13)
            for a, a_ref in zip(grads_c, grads):
                np.testing.assert_allclose(a, a_ref, rtol=1e-12, atol=1e-14)
        assert float(jnp.max(jnp.abs(grads[0]))) > 0


def test_parallel_path_in_query_chunks_equals_one_call(monkeypatch):
    """The whole layer with a logits budget small enough to force several query chunks gives the same output
    (a fresh jit, so the patched budget is traced; gradients are held equal in the test above)."""
    mod, variables = _setup(**CAPPED)
    with jax.enable_x64(True):
        x = _x(seed=9)
        seg = jnp.asarray(np.repeat([[1] * 7 + [2] * 9], B, 0), jnp.int32)

        y_ref, modes = _run(mod, variables, x, seg)
        assert {chimera.WINDOW, chimera.FULL} <= set(np.unique(modes).tolist())
        monkeypatch.setattr(chimera, "LOGITS_BUDGET", B * 2 * T * 4 * 3)  # 3 queries' logits -> chunks of 2
        assert chimera.query_chunk(B, 2, T, T) == 2
        y, _ = jax.jit(lambda v, x: mod.apply(v, x, segment_ids=seg))(variables, x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-14)
