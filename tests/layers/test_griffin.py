import jax
import ml_collections
import pytest

from chimera_jax.layers import griffin
from tests.layers import recurrent_contract as rc


def _cfg(**over):
    g = griffin.default_config()
    g.update(dict(lru_width=24, num_heads=3), **over)
    return ml_collections.FrozenConfigDict(dict(d_model=16, dtype="float64", param_dtype="float64", norm_eps=1e-6,
                                                ternary=False, griffin=g))


SEG = [[3, 5, 6, 2], [9, 7]]  # row 0: documents start inside a prefill, at a call boundary and while decoding


@pytest.fixture(scope="module")
def h():
    return rc.Harness(griffin.GriffinRecurrent(_cfg()), 16, jitter=True)


def test_parallel_equals_prefill_then_decode(h):
    with jax.enable_x64(True):
        h.check_prefill_then_decode()


def test_packed_parallel_equals_prefill_then_decode(h):
    with jax.enable_x64(True):
        h.check_prefill_then_decode(seg=rc.packed_ids(SEG))


def test_packed_equals_alone(h):
    with jax.enable_x64(True):
        h.check_packed_equals_alone([[1, 7, 8], [8, 1, 7]])


def test_reference_op_gives_the_same_layer(h):
    with jax.enable_x64(True):
        h.check_same_as(griffin.GriffinRecurrent(_cfg(impl="reference")), seg=rc.packed_ids(SEG))


def test_gradients_match_finite_differences(h):
    with jax.enable_x64(True):
        h.check_gradients(seg=rc.packed_ids([[2, 4]]))


def test_params_carry_axis_names_and_bad_config_is_named(h):
    h.check_params_have_axis_names()
    with jax.enable_x64(True):
        a = jax.nn.sigmoid(-h.init_params["params"]["a_param"].value)  # initial decays within [min_rad, max_rad]
        assert float(a.min()) >= 0.9 - 1e-6 and float(a.max()) <= 0.999 + 1e-6
    with pytest.raises(ValueError, match="num_heads"):
        griffin.GriffinRecurrent(_cfg(num_heads=5)).init_cache(1, 4, "float32")
