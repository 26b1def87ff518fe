"""Gated DeltaNet mixer: the sequence-mixer contract in float64, chunked == reference, gradients."""
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from chimera_jax.layers import gated_deltanet
from tests.layers import recurrent_contract as rc


def _cfg(**gdn):
    c = gated_deltanet.default_config()
    c.update(dict(num_heads=2, head_dim=4, expand_v=2, conv_width=3, chunk_size=4, impl="xla"))
    c.update(gdn)
    return ml_collections.FrozenConfigDict(dict(d_model=16, dtype="float64", param_dtype="float64", norm_eps=1e-6,
                                                ternary=False, gdn=c))


# Row 0: documents start inside the first prefill, at the second call's first token and in the decoded tail.
PACKED = rc.packed_ids([[3, 5, 6, 2], [9, 7]])


@pytest.fixture(scope="module")
def h():
    return rc.Harness(gated_deltanet.GatedDeltaNet(_cfg()), 16)


def test_parallel_equals_prefill_then_decode(h):
    with jax.enable_x64(True):
        h.check_prefill_then_decode()


def test_packed_parallel_equals_prefill_then_decode(h):
    with jax.enable_x64(True):
        h.check_prefill_then_decode(seg=PACKED)


def test_packed_equals_alone(h):
    with jax.enable_x64(True):
        h.check_packed_equals_alone([[1, 7, 8], [8, 1, 7]])


def test_chunked_op_equals_reference_op(h):
    with jax.enable_x64(True):
        h.check_same_as(gated_deltanet.GatedDeltaNet(_cfg(impl="reference")), seg=PACKED)


def test_gradients_match_finite_differences(h):
    with jax.enable_x64(True):
        h.check_gradients(seg=rc.packed_ids([[2, 4]]))


def test_without_short_conv_still_follows_the_contract():
    with jax.enable_x64(True):
        rc.Harness(gated_deltanet.GatedDeltaNet(_cfg(conv_width=1)), 16).check_prefill_then_decode(seg=PACKED)


def test_params_decay_and_errors(h):
    with jax.enable_x64(True):
        h.check_params_have_axis_names()
        # alpha = exp(g), g = -exp(A_log) softplus(.) < 0: with exp(A_log) >= 1 every head forgets, none explodes
        assert bool(jnp.all(jnp.exp(h.params["params"]["A_log"].unbox()) >= 1.0))
        with pytest.raises(ValueError, match="expand_v"):
            gated_deltanet.GatedDeltaNet(_cfg(expand_v=0.3)).init_cache(1, 4, "float32")
        with pytest.raises(ValueError, match="decode=True needs a cache"):
            h.mod.apply(h.params, rc.inputs(16, 1, 1), decode=True)


def test_remat_prepare_follows_block_remat(monkeypatch):
    """'auto' keeps the op's own recompute of its intra-chunk part unless whole blocks are rematerialised
    (their backward reruns the op's forward anyway); 'on' / 'off' force it; anything else names the field."""
    seen = []
    real = gated_deltanet.gdr_op.gated_delta_rule
    monkeypatch.setattr(gated_deltanet.gdr_op, "gated_delta_rule",
                        lambda *a, **kw: seen.append(kw["remat_prepare"]) or real(*a, **kw))
    with jax.enable_x64(True):
        x = rc.inputs(16, 1, 6)
        for remat, choice, want in [("none", "auto", True), ("full", "auto", False), ("dots", "auto", True),
                                    ("full", "on", True), ("none", "off", False),
                                    ("none", "save_inverse", "save_inverse")]:
            cfg = ml_collections.ConfigDict(_cfg(remat_prepare=choice))
            cfg.remat = remat
            gated_deltanet.GatedDeltaNet(ml_collections.FrozenConfigDict(cfg)).init(jax.random.key(0), x)
            assert seen[-1] == want and type(seen[-1]) is type(want), (remat, choice)
        with pytest.raises(ValueError, match="model.gdn.remat_prepare"):
            gated_deltanet.GatedDeltaNet(_cfg(remat_prepare="yes")).init(jax.random.key(0), x)
