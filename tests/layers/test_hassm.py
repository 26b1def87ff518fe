import jax
import ml_collections
import pytest

from chimera_jax.layers import attention, hassm, mamba
from tests.layers import recurrent_contract as rc


def _cfg(**over):
    c = hassm.default_config()
    c.ssm.update(d_state=4, chunk_size=5)
    c.attention.update(num_heads=2, num_kv_heads=1, head_dim=8)
    c.update(over)
    return ml_collections.FrozenConfigDict(dict(d_model=16, dtype="float64", param_dtype="float64", norm_eps=1e-6,
                                                ternary=False, hassm=c))


@pytest.fixture(scope="module")
def h():
    return rc.Harness(hassm.HASSM(_cfg()), 16, jitter=True)


def test_parallel_equals_prefill_then_decode(h):
    with jax.enable_x64(True):
        h.check_prefill_then_decode()


def test_packed_equals_alone(h):
    with jax.enable_x64(True):
        h.check_packed_equals_alone([[1, 7, 8], [8, 1, 7]])


def test_gradients_match_finite_differences(h):
    with jax.enable_x64(True):
        h.check_gradients(seg=rc.packed_ids([[2, 4]]))


def test_output_is_the_gated_mix_of_both_heads(h):
    with jax.enable_x64(True):
        x = rc.inputs(16, 1, 5)
        p = h.params["params"]
        y, _ = h.apply(h.params, x)
        s, _ = jax.jit(mamba.Mamba(h.mod.cfg, sub=h.mod.cfg.hassm.ssm).apply)({"params": p["ssm"]}, x)
        a, _ = jax.jit(attention.Attention(h.mod._attention_cfg).apply)({"params": p["attention"]}, x)
        g = jax.nn.sigmoid(x @ p["gate_proj"]["kernel"].value + p["gate_bias"].value)
        assert rc.rel_err(y, g * s + (1 - g) * a) <= 1e-12
        assert h.mod._attention_cfg.attention.position == "alibi"


def test_params_carry_axis_names_and_bad_config_is_named(h):
    with jax.enable_x64(True):
        h.check_params_have_axis_names()
    bad = _cfg()
    bad = ml_collections.FrozenConfigDict(dict(bad.items(), hassm=dict(bad.hassm.items(), attention=dict(
        bad.hassm.attention.items(), position="rope"))))
    with pytest.raises(ValueError, match="alibi"):
        hassm.HASSM(bad).init(jax.random.PRNGKey(0), jax.numpy.ones((1, 2, 16)))
