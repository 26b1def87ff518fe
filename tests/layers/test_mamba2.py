import jax
import ml_collections
import pytest

from chimera_jax.layers import mamba2
from tests.layers import recurrent_contract as rc


def _cfg(**over):
    m = mamba2.default_config()
    m.update(dict(d_state=4, head_dim=8, expand=2, n_groups=2, chunk_size=5), **over)
    return ml_collections.FrozenConfigDict(dict(d_model=16, dtype="float64", param_dtype="float64", norm_eps=1e-6,
                                                ternary=False, mamba2=m))


@pytest.fixture(scope="module")
def h():
    return rc.Harness(mamba2.Mamba2(_cfg()), 16, jitter=True)


def test_parallel_equals_prefill_then_decode(h):
    with jax.enable_x64(True):
        h.check_prefill_then_decode()


def test_packed_parallel_equals_prefill_then_decode(h):
    with jax.enable_x64(True):
        # Row 0: a document starts inside the first prefill, at the second call and in the decoded tail.
        h.check_prefill_then_decode(seg=rc.packed_ids([[3, 5, 6, 2], [9, 7]]))


def test_packed_equals_alone(h):
    with jax.enable_x64(True):
        h.check_packed_equals_alone([[1, 7, 8], [8, 1, 7]])


def test_reference_op_gives_the_same_layer(h):
    with jax.enable_x64(True):
        h.check_same_as(mamba2.Mamba2(_cfg(impl="reference")), seg=rc.packed_ids([[3, 5, 6, 2], [9, 7]]))


def test_gradients_match_finite_differences(h):
    with jax.enable_x64(True):
        h.check_gradients(seg=rc.packed_ids([[2, 4]]))


def test_params_carry_axis_names_and_bad_config_is_named(h):
    h.check_params_have_axis_names()
    with pytest.raises(ValueError, match="head_dim"):
        mamba2.Mamba2(_cfg(head_dim=7)).init_cache(1, 4, "float32")
