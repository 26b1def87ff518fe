"""The Pallas ternary matmul against the reference: interpreted on the CPU (CI), natively on a GPU."""
import jax
import jax.numpy as jnp
import pytest

from chimera_jax.ops.ternary import pack_ternary, ternary_matmul

ON_GPU = jax.default_backend() == "gpu"


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


@pytest.mark.parametrize("activations", ["bf16", "int8"])
@pytest.mark.parametrize("m,k,n", [(1, 512, 64), (20, 256, 128), (130, 256, 128)] +
                         ([(1, 4096, 4096), (64, 4096, 1024), (512, 2048, 1024)] if ON_GPU else []))
def test_pallas_matches_reference(m, k, n, activations):
    w = jax.random.normal(jax.random.key(k + n), (k, n))
    x = jax.random.normal(jax.random.key(m), (m, k)).astype(jnp.bfloat16)
    tw = pack_ternary(w)
    ref = ternary_matmul(x, tw, impl="reference", activations=activations, out_dtype=jnp.float32)
    y = ternary_matmul(x, tw, impl="pallas", activations=activations, out_dtype=jnp.float32)
    assert y.shape == (m, n) and not bool(jnp.isnan(y).any())
    assert _rel(y, ref) < 1e-5
