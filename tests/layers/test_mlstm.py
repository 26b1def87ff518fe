import jax
import ml_collections
import pytest

from chimera_jax.layers import mlstm
from tests.layers import recurrent_contract as rc


def _cfg(**over):
    m = mlstm.default_config()
    m.update(dict(num_heads=2, chunk_size=5), **over)
    return ml_collections.FrozenConfigDict(dict(d_model=16, dtype="float64", param_dtype="float64", norm_eps=1e-6,
                                                ternary=False, mlstm=m))


SEG = [[3, 5, 6, 2], [9, 7]]  # row 0: documents start inside a prefill, at a call boundary and while decoding


@pytest.fixture(scope="module")
def h():
    return rc.Harness(mlstm.MLSTM(_cfg()), 16, jitter=True)


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
        h.check_same_as(mlstm.MLSTM(_cfg(impl="reference")), seg=rc.packed_ids(SEG))


def test_gradients_match_finite_differences(h):
    with jax.enable_x64(True):
        h.check_gradients(seg=rc.packed_ids([[2, 4]]))


def test_dense_qkv_variant_has_dense_projections():
    mod = mlstm.MLSTM(_cfg(qkv_block_size=0))
    with jax.enable_x64(True):
        shapes = jax.eval_shape(mod.init, jax.random.PRNGKey(0), jax.numpy.ones((1, 3, 16)))
    assert shapes["params"]["q_proj"]["kernel"].value.shape == (32, 32)


def test_params_carry_axis_names_and_bad_config_is_named(h):
    with jax.enable_x64(True):
        h.check_params_have_axis_names()
        p = h.init_params["params"]
        assert float(p["f_bias"].value[0]) == 3.0 and float(p["f_bias"].value[-1]) == 6.0
    with pytest.raises(ValueError, match="num_heads"):
        mlstm.MLSTM(_cfg(num_heads=5)).init_cache(1, 4, "float32")
