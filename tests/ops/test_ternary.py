"""Ternary packing and the ternary matmul's XLA form against the unpack-then-float32-dot reference."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera_jax.ops.ternary import (TernaryWeight, pack_ternary, quantize_activations, ternarize,
                                     ternary_matmul, unpack_codes, unpack_ternary)


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def test_pack_round_trips_the_codes_and_scales():
    w = jax.random.normal(jax.random.key(0), (384, 96)) * 0.02
    codes, scale = ternarize(w)
    tw = pack_ternary(w)
    assert tw.packed.dtype == jnp.uint8 and tw.packed.shape == (96, 96) and tw.shape == (384, 96)
    assert tw.scale.dtype == jnp.bfloat16 and tw.scale.shape == (3, 96)
    np.testing.assert_array_equal(unpack_codes(tw.packed), codes)
    np.testing.assert_array_equal(tw.scale.astype(jnp.float32), scale)
    # Ternarising the dequantised matrix again keeps every code (the scale shrinks to the mean over the
    # non-zero fraction, the codes cannot move).
    np.testing.assert_array_equal(pack_ternary(unpack_ternary(tw)).packed, tw.packed)


def test_each_group_holds_exactly_three_values():
    w = jax.random.normal(jax.random.key(1), (256, 8))
    tw = pack_ternary(w)
    wd = np.asarray(unpack_ternary(tw)).reshape(2, 128, 8)
    s = np.asarray(tw.scale.astype(jnp.float32))
    for g in range(2):
        for n in range(8):
            vals = set(np.unique(wd[g, :, n]).tolist())
            assert vals == {-s[g, n], 0.0, s[g, n]}, (g, n, vals)


def test_absmean_scale_and_codes_follow_the_paper():
    w = jax.random.normal(jax.random.key(2), (128, 4))
    codes, scale = ternarize(w)
    expect = np.asarray(jnp.mean(jnp.abs(w), axis=0).astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(scale[0]), expect)
    np.testing.assert_array_equal(codes, jnp.clip(jnp.round(w / scale[0]), -1, 1).astype(jnp.int8))


@pytest.mark.parametrize("activations,tol", [("bf16", 1e-5), ("int8", 1e-5)])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_xla_matches_reference(m, activations, tol):
    w = jax.random.normal(jax.random.key(m), (256, 64))
    x = jax.random.normal(jax.random.key(m + 1), (m, 256)).astype(jnp.bfloat16)
    tw = pack_ternary(w)
    ref = ternary_matmul(x, tw, impl="reference", activations=activations, out_dtype=jnp.float32)
    y = ternary_matmul(x, tw, impl="xla", activations=activations, out_dtype=jnp.float32)
    assert y.shape == (m, 64) and _rel(y, ref) < tol


def test_int8_activations_are_close_to_bf16():
    w = jax.random.normal(jax.random.key(3), (256, 64))
    x = jax.random.normal(jax.random.key(4), (8, 256))
    q, s = quantize_activations(x)
    assert q.dtype == jnp.int8 and s.shape == (8, 2) and int(jnp.abs(q.astype(jnp.int32)).max()) == 127
    tw = pack_ternary(w)
    a = ternary_matmul(x, tw, impl="reference", activations="int8", out_dtype=jnp.float32)
    b = ternary_matmul(x, tw, impl="reference", activations="bf16", out_dtype=jnp.float32)
    assert _rel(a, b) < 2e-2


def test_auto_falls_back_with_debug_log_and_errors_name_fields(caplog):
    tw = pack_ternary(jax.random.normal(jax.random.key(5), (128, 32)))
    x = jnp.ones((2, 128), jnp.bfloat16)
    with caplog.at_level(logging.DEBUG, logger="chimera_jax.ops.ternary"):
        ternary_matmul(x, tw)
    assert any("falling back" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="x must be"):
        ternary_matmul(jnp.ones((2, 64)), tw)
    with pytest.raises(ValueError, match="multiple of 128"):
        pack_ternary(jnp.ones((100, 4)))
    assert isinstance(jax.tree_util.tree_map(lambda a: a, tw), TernaryWeight)


def test_auto_sends_large_m_bf16_to_xla_on_gpu(monkeypatch):
    """The dispatch rule itself (no kernel runs): on a GPU, bf16 activations with m past PALLAS_MAX_M go to XLA's
    dot, decode-sized m and int8 activations stay on the kernels."""
    from chimera_jax.ops import ternary

    monkeypatch.setattr(ternary.jax, "default_backend", lambda: "gpu")
    tw = pack_ternary(jax.random.normal(jax.random.key(6), (128, 64)))
    small, large = jnp.ones((ternary.PALLAS_MAX_M, 128)), jnp.ones((ternary.PALLAS_MAX_M + 1, 128))
    assert ternary._pallas_supported(small, tw) is None
    assert "m=65" in ternary._pallas_supported(large, tw)
    assert ternary._pallas_supported(large, tw, "int8") is None
